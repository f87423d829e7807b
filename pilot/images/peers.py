"""The nodes of one lease fetch an image together: each serves the chunks it has verified to the others.

:class:`PeerServer` answers ``GET /chunks/{sha256}/{index}`` for the chunks
this pilot holds, verified, only to requests proving the lease's peer key
(every node the slot's job runs on has it, no other node: see
:func:`workspace_common.protocol.chunks.peer_key`). :class:`SwarmFetch` fills a
``.part`` chunk by chunk: the chunks the service's tracker hands it
(``seed``) from the service, the others from peers that announced them,
rarest first; every chunk is checked against the signed manifest before it
is written or served on, and a peer that sent a bad one is dropped for
good. A peer that vanishes costs a retry elsewhere; when no peer has
anything it lacks for :data:`STALL_S`, it takes chunks from the service
itself, so no schedule depends on any one peer staying up. After its last
chunk it keeps announcing (and serving) for the others while any of them
still lacks something, until the pilot tears down.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hmac
import http.server
import logging
import os
import random
import re
import threading
import time
from typing import Callable

from pilot.images.cache import CacheError, FetchCancelled
from workspace_common.protocol.chunks import (
    PEER_AUTH_HEADER, PEER_HOST_HEADER, PEER_SKEW_S, PEER_TIME_HEADER, ChunkManifest, peer_auth,
)

log = logging.getLogger(__name__)

#: Chunks in flight at once per node.
PARALLEL = 4
#: Chunks in flight from one peer at once.
PER_PEER = 2
#: Seconds between announces while fetching (and after a chunk arrives, at once).
ANNOUNCE_EVERY_S = 0.5
#: Seconds with nothing to take from peers or seeds before the service is asked directly.
STALL_S = 3.0
#: Seconds a peer that could not be reached is left alone.
PEER_DOWN_S = 10.0
#: Seconds between announces once done (while seeding for the others).
SEED_EVERY_S = 1.0
#: Seconds a peer connection may stay silent (or stop reading), and how many the server holds at once.
REQUEST_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 64
_PATH_RE = re.compile(r"/chunks/([0-9a-f]{64})/([0-9]{1,7})")


def bitmap(have: set[int], count: int) -> bytes:
    """The chunks in ``have`` as a bitmap (bit ``i % 8`` of byte ``i // 8``)."""
    out = bytearray((count + 7) // 8)
    for index in have:
        out[index >> 3] |= 1 << (index & 7)
    return bytes(out)


def from_bitmap(data: bytes, count: int) -> set[int]:
    """The chunk indices set in ``data`` (below ``count``)."""
    return {i for i in range(min(count, len(data) * 8)) if data[i >> 3] & (1 << (i & 7))}


class _Offer:
    """One image this node can serve chunks of: its manifest, where its bytes are, which chunks are verified."""

    def __init__(self, manifest: ChunkManifest, paths: tuple[str, str], have: set[int]):
        self.manifest = manifest
        self.paths = paths  # (the cached file, the partial download): the first that exists is read
        self.have = have
        self.lock = threading.Lock()

    def read(self, index: int) -> bytes | None:
        with self.lock:
            if index not in self.have:
                return None
        offset, length = self.manifest.span(index)
        for path in self.paths:
            try:
                with open(path, "rb") as handle:
                    return os.pread(handle.fileno(), length, offset)
            except FileNotFoundError:
                continue
        return None


class _CappedServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server that serves at most ``max_connections`` connections at once.

    Anyone on the network can connect: the cap is taken in the accepting thread, in the order connections
    are accepted, so a connection over it is closed before any thread is made for it.
    """

    daemon_threads = True

    def __init__(self, address, handler, max_connections: int):
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class PeerServer:
    """This node's chunk server for the other nodes of its lease, on ``bind:port`` (0: any free port)."""

    def __init__(self, key: str, bind: str = "127.0.0.1", port: int = 0, *, advertise: str | None = None,
                 request_timeout_s: float = REQUEST_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS):
        self.key = key
        self._offers: dict[str, _Offer] = {}
        self.served = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = request_timeout_s  # a connection that sends nothing (or stops reading) is closed

            def log_message(self, *args):
                pass

            def do_GET(self):
                status, body = server._answer(self.path, self.headers)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                self.wfile.write(body)

        self._httpd = _CappedServer((bind, port), Handler, max_connections)
        self._httpd.timeout = 30
        host, real_port = self._httpd.server_address[:2]
        self.address = f"{advertise or host}:{real_port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="peer-server", daemon=True)
        self._thread.start()

    def offer(self, manifest: ChunkManifest, paths: tuple[str, str], have: set[int]) -> _Offer:
        """Serve the verified chunks of this image (``have`` is shared and grows as chunks arrive)."""
        offer = self._offers[manifest.sha256] = _Offer(manifest, paths, have)
        return offer

    def _answer(self, path: str, headers) -> tuple[int, bytes]:
        match = _PATH_RE.fullmatch(path)
        if match is None:
            return 404, b"no such path\n"
        host, at, proof = (headers.get(h, "") for h in (PEER_HOST_HEADER, PEER_TIME_HEADER, PEER_AUTH_HEADER))
        try:
            fresh = abs(time.time() - int(at)) <= PEER_SKEW_S
        except ValueError:
            fresh = False
        if not fresh or not hmac.compare_digest(proof, peer_auth(self.key, path, host, int(at) if fresh else 0)):
            return 403, b"not a node of this lease\n"
        offer = self._offers.get(match.group(1))
        index = int(match.group(2))
        data = offer.read(index) if offer is not None and index < offer.manifest.count else None
        if data is None:
            return 404, b"not here\n"
        self.served += 1
        return 200, data

    def stop(self) -> None:
        """Stop serving (the pilot's teardown)."""
        self._httpd.shutdown()
        self._httpd.server_close()


class SwarmFetch:
    """Fill one image's ``.part`` from the service and the lease's peers, every chunk verified.

    ``source`` is the :class:`pilot.images.fetch.ImageSource` (service,
    tracker, peers); ``key`` the (slot, host) key that signs the service's
    answers; ``server`` this node's :class:`PeerServer`.
    """

    def __init__(self, source, key: str, server: PeerServer, *, cancel: threading.Event | None = None,
                 progress: Callable[[int], None] | None = None):
        self.source = source
        self.key = key
        self.server = server
        self.cancel = cancel or threading.Event()
        self.progress = progress
        self.from_peers = 0
        self.from_service = 0
        self.bad_peers: set[str] = set()
        self._down: dict[str, float] = {}

    def fill(self, manifest: ChunkManifest, part: str, final: str) -> None:
        """Write every chunk of the image into ``part`` (created or resumed); CacheError if it cannot be done."""
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            have = self._verified(fd, manifest)
            os.ftruncate(fd, manifest.size)
            offer = self.server.offer(manifest, (final, part), have)
            self._run(fd, manifest, offer)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _verified(self, fd: int, manifest: ChunkManifest) -> set[int]:
        """The chunks a partial file already holds (checked one by one against the manifest)."""
        length = os.fstat(fd).st_size
        have = set()
        for index in range(manifest.count):
            offset, size = manifest.span(index)
            if offset + size > length:
                break
            if manifest.holds(index, os.pread(fd, size, offset)):
                have.add(index)
        if have:
            log.info("image %s: %d of %d chunks already here", manifest.sha256, len(have), manifest.count)
        return have

    def _run(self, fd: int, manifest: ChunkManifest, offer: _Offer) -> None:
        have = offer.have
        inflight: dict[concurrent.futures.Future, tuple[int, str | None]] = {}
        peers: list[dict] = []
        seeds: list[int] = []
        last_announce = 0.0
        last_useful = time.monotonic()
        pool = concurrent.futures.ThreadPoolExecutor(PARALLEL, thread_name_prefix="swarm")
        try:
            while True:
                with offer.lock:
                    done = len(have) == manifest.count
                if done and not inflight:
                    return
                if self.cancel.is_set():
                    raise FetchCancelled("the pilot is stopping: the partial download stays, to be resumed")
                now = time.monotonic()
                if now - last_announce >= ANNOUNCE_EVERY_S:
                    peers, seeds = self._announce(manifest, have, offer)
                    last_announce = now
                busy = {index for index, _ in inflight.values()}
                while len(inflight) < PARALLEL:
                    pick = self._pick(manifest, have, busy, peers, seeds, inflight, stalled=now - last_useful > STALL_S)
                    if pick is None:
                        break
                    index, peer = pick
                    busy.add(index)
                    inflight[pool.submit(self._get, manifest, index, peer)] = (index, peer)
                if not inflight:
                    self.cancel.wait(ANNOUNCE_EVERY_S)
                    continue
                finished, _ = concurrent.futures.wait(inflight, timeout=ANNOUNCE_EVERY_S,
                                                      return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    index, peer = inflight.pop(future)
                    data = future.result()
                    if data is None:
                        continue
                    if not manifest.holds(index, data):
                        if peer is None:
                            raise CacheError(f"the service sent chunk {index} of {manifest.sha256} wrong")
                        log.warning("peer %s sent chunk %d of %s wrong: dropped", peer["host"], index,
                                    manifest.sha256)
                        self.bad_peers.add(peer["host"])
                        continue
                    os.pwrite(fd, data, manifest.span(index)[0])
                    with offer.lock:
                        have.add(index)
                        count = len(have)
                    last_useful = time.monotonic()
                    if peer is None:
                        self.from_service += 1
                    else:
                        self.from_peers += 1
                    if self.progress is not None:
                        self.progress(min(count * manifest.chunk_size, manifest.size))
                    last_announce = 0.0  # tell the others at once
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _announce(self, manifest: ChunkManifest, have: set[int], offer: _Offer):
        with offer.lock:
            mine = bitmap(have, manifest.count)
        try:
            return self.source.announce(manifest.sha256, self.key, self.server.address, mine)
        except CacheError as exc:
            log.warning("image %s: the tracker did not answer: %s", manifest.sha256, exc)
            return [], []

    def _pick(self, manifest, have, busy, peers, seeds, inflight, *, stalled: bool):
        missing = [i for i in range(manifest.count) if i not in have and i not in busy]
        if not missing:
            return None
        for index in seeds:
            if index in missing:
                return index, None
        now = time.monotonic()
        load: dict[str, int] = {}
        for _, peer in inflight.values():
            if peer is not None:
                load[peer["host"]] = load.get(peer["host"], 0) + 1
        usable = [p for p in peers if p["host"] not in self.bad_peers and self._down.get(p["host"], 0) <= now
                  and load.get(p["host"], 0) < PER_PEER]
        holders: dict[int, list[dict]] = {}
        wanted = set(missing)
        for peer in usable:
            for index in peer["chunks"] & wanted:
                holders.setdefault(index, []).append(peer)
        if holders:
            rarest = min(len(h) for h in holders.values())
            index = random.choice([i for i, h in holders.items() if len(h) == rarest])
            return index, random.choice(holders[index])
        if stalled:
            return random.choice(missing), None
        return None

    def _get(self, manifest: ChunkManifest, index: int, peer: dict | None) -> bytes | None:
        offset, length = manifest.span(index)
        try:
            if peer is None:
                return self.source.chunk_from_service(manifest.sha256, offset, length)
            return self.source.chunk_from_peer(peer["address"], manifest.sha256, index, length)
        except CacheError as exc:
            if peer is not None:
                self._down[peer["host"]] = time.monotonic() + PEER_DOWN_S
            log.info("chunk %d of %s from %s: %s", index, manifest.sha256, peer["host"] if peer else "the service",
                     exc)
            return None

    def seed_on(self, manifest: ChunkManifest, offer: _Offer, until: float) -> None:
        """After the last chunk: keep announcing (so the others find this node) until every node of the lease
        it sees has the whole image, the monotonic ``until``, or the pilot stops."""
        while not self.cancel.is_set() and time.monotonic() < until:
            peers, _ = self._announce(manifest, offer.have, offer)
            if peers and all(len(p["chunks"] & set(range(manifest.count))) == manifest.count for p in peers):
                return
            self.cancel.wait(SEED_EVERY_S)


def decode_peers(items: list, count: int) -> list[dict]:
    """The tracker's peers as ``{"host", "address", "chunks": set}``."""
    peers = []
    for item in items:
        try:
            peers.append({"host": str(item["host"]), "address": str(item["address"]),
                          "chunks": from_bitmap(base64.b64decode(item["have"]), count)})
        except (KeyError, TypeError, ValueError):
            continue
    return peers

