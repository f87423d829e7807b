"""The nodes of one lease fetch an image together (issue 16): peers serve peers, every chunk verified.

The real service app (store, digest, tracker, manifest) on 127.0.0.1 with
an approved image; each node is the pilot's own ``NodeImages`` with its own
cache directory and its own real peer server. Node 1 is a separate process
where a test must kill it by its pid.
"""

from __future__ import annotations

import hashlib
import http.server
import signal
import subprocess
import sys
import threading

import pytest
import requests

from pilot.images.cache import ImageCache
from pilot.images.fetch import ImageSource, NodeImages
from pilot.images.peers import bitmap
from workspace_common.protocol import ImageFile
from workspace_common.protocol.chunks import CHUNK_SIZE, PEER_CHUNK_PATH, peer_auth, peer_key
from service_adapter.images.routes import SWARMS_KEY
from tests.support.imagesource import Endorser, image_entry, write_file
from tests.support.vmservice import VmService

CHUNKS = 6
SIZE = CHUNKS * CHUNK_SIZE - 12345  # the last chunk is short


@pytest.fixture
def lease(tmp_path):
    """A ready 3-node lease on a service whose image catalogue holds one approved image of 6 chunks."""
    svc = VmService(tmp_path, images=True)
    image = str(tmp_path / "worker.img")
    sha = write_file(image, SIZE, seed=7)
    endorser = Endorser(str(tmp_path / "endorser"))
    endorser.trust_in(str(tmp_path / "endorsers"))
    endorser.publish(str(tmp_path / "hep.list"), [image_entry("worker", "1", image, f"file://{image}")])
    svc.catalog.subscribe(str(tmp_path / "hep.list"), "alice")
    svc.catalog.approve("worker", "1", "alice")
    _, slot = svc.ready_lease(("node1", "node2", "node3"))

    class Lease:
        pass

    lease = Lease()
    lease.svc, lease.slot, lease.sha, lease.root = svc, slot, sha, tmp_path
    lease.peer_key = peer_key(svc.store.slot_secret(slot), slot)
    yield lease
    svc.close()


def node(lease, host: str, *, peers: bool = True) -> NodeImages:
    source = ImageSource(lease.svc.pilot_session(host), lease.svc.url, lease.slot, host, peer_key=lease.peer_key)
    return NodeImages(ImageCache(str(lease.root / f"cache-{host}"), 1 << 40), source,
                      key=lease.svc.sign_key(lease.slot, host), peers=peers)


def the_image(lease) -> ImageFile:
    return ImageFile(None, lease.sha, "worker", "1", SIZE)


def sha_of(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def test_a_node_fetches_from_a_peer_that_has_the_image_and_the_service_sends_nothing(lease):
    first, second = node(lease, "node1"), node(lease, "node2")
    try:
        assert sha_of(first.ensure(the_image(lease))) == lease.sha
        (alone,) = first.swarms
        assert (alone.from_service, alone.from_peers) == (CHUNKS, 0)  # nobody to share with yet
        assert sha_of(second.ensure(the_image(lease))) == lease.sha
        (swarm,) = second.swarms
        assert (swarm.from_service, swarm.from_peers) == (0, CHUNKS)
        assert first.server.served == CHUNKS
    finally:
        first.close()
        second.close()


_SEEDER = r"""
import sys, requests
from requests.auth import HTTPDigestAuth
from pilot.images.cache import ImageCache
from pilot.images.fetch import ImageSource, NodeImages
from workspace_common.protocol import ImageFile
url, slot, host, node_key, sign_key, peer_key, cache, sha, size = sys.argv[1:]
session = requests.Session()
session.auth = HTTPDigestAuth(host, node_key)
images = NodeImages(ImageCache(cache, 1 << 40), ImageSource(session, url, slot, host, peer_key=peer_key),
                    key=sign_key, peers=True)
images.ensure(ImageFile(None, sha, "worker", "1", int(size)))
print("seeding", flush=True)
sys.stdin.read()  # until the test closes stdin (or kills this process)
"""


def seeder(lease, host: str) -> subprocess.Popen:
    """A separate process that fetches the image as ``host`` and then serves it to the lease until killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", _SEEDER, lease.svc.url, lease.slot, host, lease.svc.nodes.node_key(host),
         lease.svc.sign_key(lease.slot, host), lease.peer_key, str(lease.root / f"cache-{host}"), lease.sha,
         str(SIZE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "seeding"
    return process


def test_a_transfer_that_loses_its_peer_half_way_still_completes(lease):
    process = seeder(lease, "node1")
    second = node(lease, "node2")
    try:
        def kill_after_the_first_chunk(done: int, size: int) -> None:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)  # the peer's node dies mid-transfer
                process.wait(10)

        path = second.ensure(the_image(lease), progress=kill_after_the_first_chunk)
        assert sha_of(path) == lease.sha
        (swarm,) = second.swarms
        assert swarm.from_peers >= 1 and swarm.from_service >= 1  # some from the peer, the rest from the service
        assert swarm.from_peers + swarm.from_service == CHUNKS
    finally:
        process.kill()
        process.wait()
        second.close()


class BadPeer:
    """A compromised node of the lease: it holds the peer key and announces every chunk, and serves garbage."""

    def __init__(self, lease, host: str):
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                body = b"\0" * CHUNK_SIZE
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        source = ImageSource(lease.svc.pilot_session(host), lease.svc.url, lease.slot, host, peer_key=lease.peer_key)
        self.announce = lambda: source.announce(lease.sha, lease.svc.sign_key(lease.slot, host), self.address,
                                                bitmap(set(range(CHUNKS)), CHUNKS))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_peer_serving_corrupted_chunks_is_dropped_and_the_image_is_still_right(lease):
    bad = BadPeer(lease, "node3")
    bad.announce()
    victim = node(lease, "node2")
    try:
        path = victim.ensure(the_image(lease))
        assert sha_of(path) == lease.sha
        (swarm,) = victim.swarms
        assert swarm.bad_peers == {"node3"}
        assert swarm.from_peers == 0 and swarm.from_service == CHUNKS
    finally:
        bad.close()
        victim.close()


def test_with_peering_off_every_node_fetches_from_the_service_and_serves_nothing(lease):
    nodes = [node(lease, host, peers=False) for host in ("node1", "node2")]
    for images in nodes:
        assert sha_of(images.ensure(the_image(lease))) == lease.sha
        assert images.server is None and images.swarms == []
    assert lease.svc.receiver.app[SWARMS_KEY].size() == 0  # no node ever announced


def test_a_node_outside_the_lease_gets_nothing_from_a_peer(lease):
    first = node(lease, "node1")
    try:
        first.ensure(the_image(lease))
        path = PEER_CHUNK_PATH.format(sha256=lease.sha, index=0)
        url = f"http://{first.server.address}{path}"

        def ask(key: str, at: int | None = None) -> int:
            import time

            at = at if at is not None else int(time.time())
            headers = {"X-Peer-Host": "node9", "X-Peer-Time": str(at), "X-Peer-Auth": peer_auth(key, path, "node9", at)}
            return requests.get(url, headers=headers, timeout=10).status_code

        other_lease_key = peer_key("f" * 64, lease.slot)
        assert ask(other_lease_key) == 403
        assert ask(lease.peer_key, at=1) == 403  # a recorded request, replayed much later
        assert ask(lease.peer_key) == 200
    finally:
        first.close()


def test_a_silent_connection_to_a_peer_server_is_closed_and_a_flood_is_capped(lease):
    import socket

    from pilot.images.peers import PeerServer

    quick = PeerServer(lease.peer_key, request_timeout_s=0.5)
    capped = PeerServer(lease.peer_key, request_timeout_s=60, max_connections=2)
    try:
        host, port = quick.address.rsplit(":", 1)
        silent = socket.create_connection((host, int(port)))
        silent.settimeout(10)
        assert silent.recv(1) == b""  # closed by the server, not held forever
        silent.close()
        host, port = capped.address.rsplit(":", 1)
        held = [socket.create_connection((host, int(port))) for _ in range(2)]
        for sock in held:
            sock.sendall(b"GET /chunks/")  # a request begun and never finished: each holds a connection
        extra = socket.create_connection((host, int(port)))
        extra.settimeout(10)
        extra.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert extra.recv(1) == b""  # over the cap: closed without an answer (a 404 otherwise)
        for sock in held:
            sock.close()
        extra.close()
    finally:
        quick.stop()
        capped.stop()
