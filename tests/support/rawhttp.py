"""Rude clients on raw sockets against a real service: connect, send what a client would (or would not), read the answer's head, and the service's log and file limits."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import socket

import requests
from requests.adapters import HTTPAdapter
from requests.auth import HTTPDigestAuth

from service_adapter.digest import parse_params, response_digest
from workspace_common.protocol import digest_ha1

from tests.support.imagesource import Endorser, ImageServer, image_entry, write_file
from tests.support.site import OPERATOR, OPERATOR_REALM, PILOT_REALM, Site, serving


HANG_S = 30  # a hang detector, not a timing goal


class FromAddress(HTTPAdapter):
    """A requests adapter whose connections come from ``address`` (a loopback address: one peer per attack)."""

    def __init__(self, address: str):
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def session(address: str = "127.0.0.1", user: str | None = None, secret: str | None = None) -> requests.Session:
    """A requests session from ``address``, with digest auth when ``user`` is given."""
    result = requests.Session()
    adapter = FromAddress(address)
    result.mount("http://", adapter)
    if user is not None:
        result.auth = HTTPDigestAuth(user, secret)
    return result


def connect(site: Site, address: str = "127.0.0.1") -> socket.socket:
    """A raw TCP connection to the service from ``address``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((address, 0))
    sock.connect(("127.0.0.1", site.port))
    return sock


def authorization(site: Site, method: str, path: str, *, user: str, secret: str, realm: str) -> str:
    """A fresh digest ``Authorization`` header for one request (a challenge fetched first, as a client does)."""
    challenge = requests.request(method, site.url + path, timeout=10).headers["WWW-Authenticate"]
    nonce = parse_params(challenge.split(" ", 1)[1].split(", Digest")[0])["nonce"]
    cnonce = os.urandom(8).hex()
    answer = response_digest("SHA-256", digest_ha1(user, realm, secret), nonce, "00000001", cnonce, method, path)
    return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{path}", response="{answer}", '
            f'qop=auth, nc=00000001, cnonce="{cnonce}", algorithm=SHA-256')


def status_of(raw: bytes) -> int:
    """The status code of a raw HTTP answer."""
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", raw)
    assert match, raw[:200]
    return int(match.group(1))


def log_text(site: Site) -> str:
    return site.log_file.read_text(errors="replace")


@contextlib.contextmanager
def open_file_limit(wanted: int):
    """This test process's soft open-file limit at least ``wanted`` for the block (it holds the flood's sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
IMAGE_BYTES = 8 * 1024 * 1024 + 5  # an image of 8 MiB and a few bytes: no read lands on its end by chance


def node_auth(site: Site, host: str) -> HTTPDigestAuth:
    """The digest credentials of node ``host`` (its key, derived from the site key as the node's is)."""
    return HTTPDigestAuth(host, site.nodes.node_key(host))


def node_header(site: Site, host: str, path: str) -> str:
    """A fresh Authorization header of node ``host`` for one GET of ``path``."""
    return authorization(site, "GET", path, user=host, secret=site.nodes.node_key(host), realm=PILOT_REALM)


@contextlib.contextmanager
def leased_with_an_image(site: Site, nodes: int = 4):
    """``site`` served under ``prlimit --nofile=1024``, an 8 MiB image approved from a real HTTP server, and a lease
    of ``nodes`` nodes held by real pilots: sets ``site.lease_id``, ``slot``, ``hosts``, ``sha256``, ``pid``.
    The lease is released at the end of the block (when it went well)."""
    root = site.root
    published = root / "published"
    published.mkdir()
    write_file(str(published / "worker.img"), IMAGE_BYTES, seed=3)
    server = ImageServer(str(published))
    endorser = Endorser(str(root / "endorser"))
    endorser.trust_in(str(root / "endorsers"))
    entry = image_entry("worker", "1.0", str(published / "worker.img"), f"{server.url}/worker.img")
    endorser.publish(str(published / "hep.list"), [entry])
    with open(site.config, "a", encoding="utf-8") as handle:
        handle.write(f"[images]\nendorser_keys = {root / 'endorsers'}\nstore_dir = {root / 'image-store'}\n")
    with open_file_limit(8192), serving(site, wrapper=("prlimit", "--nofile=1024:1024")) as process:
        try:
            assert site.api("POST", "/image-lists", json={"source": f"{server.url}/hep.list"}).status_code == 201
            assert site.api("POST", "/images/worker/approve", json={"version": "1.0"}).status_code == 200
            reserved = site.cli("reserve", "--nodes", str(nodes), "--memory", "16", "--duration", "900", "--json",
                                "--wait")
            assert reserved.returncode == 0, reserved.stderr
            lease = json.loads(reserved.stdout)
            site.lease_id, site.slot, site.sha256, site.pid = lease["id"], lease["slot"], entry["sha256"], process.pid
            site.hosts = sorted(pilot["host"] for pilot in lease["pilots"])  # the attackers' nodes and a good one
            assert len(site.hosts) == nodes
            yield site
            if not getattr(site, "released", False):  # the block may have released it itself
                released = site.cli("release", site.lease_id, "--wait", timeout=120)
                assert released.returncode == 0, released.stderr
        finally:
            server.close()


def guess(url: str, secret: str) -> str:
    """An operator's Authorization header for one GET of ``url`` with ``secret``, on a fresh challenge."""
    path = "/" + url.split("/", 3)[3]
    challenge = requests.get(url, timeout=HANG_S).headers["WWW-Authenticate"]
    nonce = parse_params(challenge.split(" ", 1)[1].split(", Digest")[0])["nonce"]
    cnonce = os.urandom(8).hex()
    answer = response_digest("SHA-256", digest_ha1(OPERATOR, OPERATOR_REALM, secret), nonce, "00000001", cnonce,
                             "GET", path)
    return (f'Digest username="{OPERATOR}", realm="{OPERATOR_REALM}", nonce="{nonce}", uri="{path}", '
            f'response="{answer}", qop=auth, nc=00000001, cnonce="{cnonce}", algorithm=SHA-256')
