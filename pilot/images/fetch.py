"""Where a pilot gets the images its VMs name: a site mirror, then the service's image endpoint.

The service's endpoint (``GET {contact}/pilot/v2/slots/{slot}/hosts/{host}/images/{sha256}``)
is fetched on the notifier's session: the same digest account as the
notifications and the command poll, the same connections. A mirror
(``[images] mirror``) is plain HTTP(S), ``{mirror}/{sha256}``: what it
serves is verified here like anything else, so it need not be trusted.
Both resume with a Range request from what a partial download holds.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import threading
import time
from typing import Callable, Iterator

import requests

from pilot.bounded import IDENTITY, AnswerTooLong, read_at_most, stream_at_most
from pilot.images.cache import BadSource, CacheError, FetchCancelled, ImageCache
from workspace_common.protocol import SIGNATURE_HEADER, ImageFile, ProtocolError, image_path, sign_commands
from workspace_common.protocol.chunks import (
    PEER_AUTH_HEADER, PEER_CHUNK_PATH, PEER_HOST_HEADER, PEER_TIME_HEADER, ChunkManifest, manifest_bytes_bound, peer_auth,
    swarm_bytes_bound,
)
from pilot.retryafter import retry_after_s
from workspace_common.errors import failure_words

log = logging.getLogger(__name__)

#: Read size: also the most a transfer that breaks off loses of what arrived (the unfinished read is dropped).
#: 256 KiB: at 64 KiB, urllib3's per-read cost made a 1 GiB download over loopback take 1.02 s instead of 0.23 s.
CHUNK = 256 * 1024
#: Tries of one image per VM start; each resumes from what the one before it got.
ATTEMPTS = 3
#: The most the service's list of approved sha256s may be (about 15,000 images).
MAX_APPROVED_BYTES = 1024 * 1024
#: Requests of one part of an image the service may answer "wait" (429, 503 with Retry-After) before it counts
#: as a failed try.
ADMIT_TRIES = 5
#: The longest a node keeps serving an image it has to the lease's nodes that still lack chunks of it.
SEED_FOR_S = 600.0


class ImageSource:
    """The URLs an image is fetched from, in order: ``{mirror}/{sha256}`` (if set), then the service's endpoint."""

    def __init__(self, session: requests.Session, contact: str, slot: str, host: str, *, mirror: str | None = None,
                 timeout_s: float = 30.0, peer_key: str | None = None):
        self.session = session
        self.service = contact.rstrip("/")
        self.slot = slot
        self.host = host
        self.mirror = mirror.rstrip("/") if mirror else None
        self.timeout_s = timeout_s
        self.peer_key = peer_key
        self._plain: requests.Session | None = None
        self._peers: requests.Session | None = None
        #: Sources that sent more than was declared: never asked again by this pilot.
        self.bad_sources: set[str] = set()

    def urls(self, sha256: str) -> list[tuple[str, requests.Session]]:
        """(URL, session) to try, in order; a mirror that sent more than was declared is left out."""
        urls = []
        if self.mirror and self.mirror not in self.bad_sources:
            if self._plain is None:
                self._plain = requests.Session()
                self._plain.verify = self.session.verify
            urls.append((f"{self.mirror}/{sha256}", self._plain))
        urls.append((self.service + image_path(self.slot, self.host, sha256), self.session))
        return urls

    def _signed(self, method: str, target: str, key: str, limit: int, body: dict | None = None):
        """The service's JSON answer to ``target``, if signed with the (slot, host) ``key``; CacheError else.

        Read up to ``limit`` bytes: a longer answer is refused before it is all in memory."""
        try:
            response = self._admitted(self.session, method, self.service + target, timeout=self.timeout_s,
                                      verify=self.session.verify, json=body, stream=True, headers=IDENTITY)
            if response.status_code != 200:
                response.close()
                raise CacheError(f"{self.service}{target}: HTTP {response.status_code}")
            content = read_at_most(response, limit)
        except requests.RequestException as exc:
            raise CacheError(f"{self.service}{target}: {failure_words(exc)}") from None
        except AnswerTooLong as exc:
            raise CacheError(f"{self.service}{target}: {exc}: dropped") from None
        expected = sign_commands(key, target, content)
        if not hmac.compare_digest(response.headers.get(SIGNATURE_HEADER, ""), expected):
            raise CacheError(f"{self.service}{target}: the answer's signature is wrong: ignored")
        try:
            return json.loads(content), content
        except ValueError:
            raise CacheError(f"{self.service}{target}: not JSON") from None

    def approved(self, key: str) -> set[str]:
        """The sha256s the service approves now (its signed answer, checked with the (slot, host) ``key``);
        CacheError if it cannot be had or the signature is wrong."""
        target = image_path(self.slot, self.host, "x").rsplit("/", 1)[0]
        data, _ = self._signed("GET", target, key, MAX_APPROVED_BYTES)
        try:
            return {sha for sha in data["sha256"] if isinstance(sha, str) and len(sha) == 64}
        except (KeyError, TypeError):
            raise CacheError(f"{self.service}{target}: not a list of sha256s") from None

    def manifest(self, sha256: str, key: str, size: int) -> ChunkManifest:
        """The chunk manifest of the image of ``size`` bytes, signed by the service; CacheError if it cannot be
        had (or is longer than such an image's manifest can be)."""
        target = image_path(self.slot, self.host, sha256) + "/chunks"
        _, raw = self._signed("GET", target, key, manifest_bytes_bound(size))
        try:
            manifest = ChunkManifest.from_json(raw)
        except ProtocolError as exc:
            raise CacheError(f"{self.service}{target}: {exc}") from None
        if manifest.sha256 != sha256 or manifest.size != size:
            raise CacheError(f"{self.service}{target}: a manifest of another image")
        return manifest

    def announce(self, sha256: str, key: str, address: str | None, have: bytes) -> tuple[list[dict], list[int]]:
        """Tell the tracker what this node holds; (the slot's other nodes with their chunks, chunks to seed)."""
        from pilot.images.peers import decode_peers

        target = image_path(self.slot, self.host, sha256) + "/swarm"
        count = len(have) * 8
        data, _ = self._signed("POST", target, key, swarm_bytes_bound(count),
                               {"address": address, "have": base64.b64encode(have).decode()})
        try:
            return decode_peers(data["peers"], count), [int(i) for i in data["seed"] if 0 <= int(i) < count]
        except (KeyError, TypeError, ValueError):
            raise CacheError(f"{self.service}{target}: not a swarm answer") from None

    def chunk_from_service(self, sha256: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the image from ``offset``: from the mirror, else the service (Range).

        Each answer is read up to ``length`` bytes: a source that sends more is dropped (a mirror for good)."""
        problems = []
        for url, session in self.urls(sha256):
            try:
                response = self._admitted(session, "GET", url, timeout=self.timeout_s, verify=session.verify,
                                          stream=True,
                                          headers={"Range": f"bytes={offset}-{offset + length - 1}", **IDENTITY})
                if response.status_code != 206:
                    response.close()
                    problems.append(f"{url}: HTTP {response.status_code}")
                    continue
                data = read_at_most(response, length)
            except requests.RequestException as exc:
                problems.append(f"{url}: {failure_words(exc)}")
                continue
            except AnswerTooLong as exc:
                problems.append(f"{url}: {exc}: a bad source, dropped")
                self._drop(url)
                continue
            if len(data) == length:
                return data
            problems.append(f"{url}: HTTP 206 ({len(data)} bytes)")
        raise CacheError("; ".join(problems))

    def chunk_from_peer(self, address: str, sha256: str, index: int, length: int) -> bytes:
        """Chunk ``index`` (``length`` bytes) from the peer at ``address``, proving this node's membership of the
        lease; read up to ``length`` bytes, so a peer that sends more or never stops costs no more."""
        path = PEER_CHUNK_PATH.format(sha256=sha256, index=index)
        at = int(time.time())
        headers = {PEER_HOST_HEADER: self.host, PEER_TIME_HEADER: str(at),
                   PEER_AUTH_HEADER: peer_auth(self.peer_key, path, self.host, at), **IDENTITY}
        if self._peers is None:
            self._peers = requests.Session()
        try:
            response = self._peers.get(f"http://{address}{path}", headers=headers, timeout=self.timeout_s,
                                       stream=True)
            if response.status_code != 200:
                response.close()
                raise CacheError(f"peer {address}: HTTP {response.status_code}")
            return read_at_most(response, length)
        except requests.RequestException as exc:
            raise CacheError(f"peer {address}: {failure_words(exc)}") from None
        except AnswerTooLong as exc:
            raise CacheError(f"peer {address}: {exc}: dropped") from None

    def _admitted(self, session: requests.Session, method: str, url: str, **kwargs) -> requests.Response:
        """``session.request(method, url, **kwargs)``, asked again (up to :data:`ADMIT_TRIES` times in all) after
        the wait a 429 or 503 answer's Retry-After names: the service holds each node to its share."""
        for _ in range(ADMIT_TRIES - 1):
            response = session.request(method, url, **kwargs)
            wait = retry_after_s(response.status_code, response.headers)
            if wait is None:
                return response
            response.close()
            log.info("%s: HTTP %d, asked to wait %g s", url, response.status_code, wait)
            time.sleep(wait)  # what the service asked for; a fetch runs in its own thread
        return session.request(method, url, **kwargs)

    def _drop(self, url: str) -> None:
        """Leave the mirror out from now on if ``url`` is one of its (the service is never left out)."""
        if self.mirror and url.startswith(self.mirror + "/"):
            if self.mirror not in self.bad_sources:
                log.warning("image mirror %s sent more than was declared: not asked again", self.mirror)
            self.bad_sources.add(self.mirror)

    def fetcher(self, sha256: str, size: int) -> Callable[[int], Iterator[bytes]]:
        """``fetch(offset)`` for :meth:`ImageCache.ensure`: the image's bytes from ``offset`` on (``size`` in all),
        from the first URL that answers; CacheError (one line per URL) if none does. An answer that goes on
        past ``size`` raises CacheError at that point and drops its source (a mirror for good), so the next
        try goes to the next source."""

        def fetch(offset: int) -> Iterator[bytes]:
            problems = []
            for url, session in self.urls(sha256):
                try:
                    response = self._admitted(session, "GET", url, stream=True, timeout=self.timeout_s,
                                              verify=session.verify,
                                              headers={"Range": f"bytes={offset}-", **IDENTITY} if offset else IDENTITY)
                except requests.RequestException as exc:
                    problems.append(f"{url}: {failure_words(exc)}")
                    continue
                if response.status_code not in (200, 206):
                    problems.append(f"{url}: HTTP {response.status_code}")
                    response.close()
                    continue
                return self._body(response, url, offset, size)
            raise CacheError("; ".join(problems))

        return fetch

    def _body(self, response: requests.Response, url: str, offset: int, size: int) -> Iterator[bytes]:
        """The bytes from ``offset`` to ``size`` of a 200 (whole file) or 206 (from ``offset``) answer."""
        skip = offset if response.status_code == 200 else 0  # a server that ignored the Range sends it all
        if response.status_code == 206 and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            response.close()
            raise CacheError(f"{url}: answered a range other than the one asked for")
        try:
            for chunk in stream_at_most(response, size - offset + skip, CHUNK):
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                if chunk:
                    yield chunk
        except requests.RequestException as exc:
            raise CacheError(f"{url}: the transfer broke off: {failure_words(exc)}") from None
        except AnswerTooLong as exc:
            self._drop(url)
            raise BadSource(f"{url}: {exc}: a bad source, dropped") from None


class NodeImages:
    """A slot's way to have named images on the node: the cache, the source, and the journal note of fetches.

    ``note_fetching(sha256s)`` journals what this pilot is downloading
    (before the first byte, and again when done), so that kill-all can
    remove a partial download its pilot left.
    """

    def __init__(self, cache: ImageCache, source: ImageSource, *,
                 note_fetching: Callable[[tuple[str, ...]], None] = lambda sha256s: None, key: str | None = None,
                 peers: bool = False, peer_bind: str = "127.0.0.1", peer_port: int = 0,
                 peer_advertise: str | None = None):
        self.cache = cache
        self.source = source
        self.note_fetching = note_fetching
        self.key = key
        # Peering needs the (slot, host) key (the tracker's answers) and the lease's peer key (the peers').
        self.peers = peers and key is not None and source.peer_key is not None
        self.peer_bind, self.peer_port, self.peer_advertise = peer_bind, peer_port, peer_advertise
        self.server = None
        self.swarms: list = []
        self._lock = threading.Lock()
        self._fetching: dict[str, int] = {}
        self._retired = key is None  # with the (slot, host) key, the first use retires what the site dropped

    def retire_unlisted(self) -> list[str]:
        """Remove cached images the service no longer approves (not those a VM uses); the sha256s removed.

        Done once per pilot, at its first use of the cache; a failure is
        logged and changes nothing (an image the site dropped can start no
        VM anyway: the service refuses it first).
        """
        self._retired = True
        try:
            keep = self.source.approved(self.key)
        except CacheError as exc:
            log.warning("image cache: not retiring anything: %s", exc)
            return []
        return self.cache.retire(keep | set(self._fetching))

    def ensure(self, image: ImageFile, *, cancel: threading.Event | None = None,
               progress: Callable[[int, int], None] | None = None) -> str:
        """The cached file of a named, resolved image, fetched if needed; CacheError (one line) if it cannot be had.

        ``progress(bytes_so_far, size)`` is called while it downloads.
        """
        if not image.resolved:
            raise CacheError(f"{image.label}: the service did not say its sha256 and size")
        sha256, size = image.sha256, image.size
        self.cache.prepare()
        if not self._retired:
            self.retire_unlisted()
        if self.cache.has(sha256):
            self.cache.touch(sha256)
            return self.cache.path(sha256)
        self._note(sha256, +1)
        try:
            if self.peers:
                swarmed = self._swarm(image, cancel, progress)
                if swarmed is not None:
                    return swarmed
            attempt = 1
            while True:
                before = self.cache.partial_bytes(sha256)
                try:
                    return self.cache.ensure(
                        sha256, size, self.source.fetcher(sha256, size), cancel=cancel,
                        progress=(lambda done: progress(done, size)) if progress else None,
                    )
                except FetchCancelled:
                    raise
                except CacheError as exc:
                    # Only a try that got further is worth another: a source that refuses refuses again. A bad
                    # source is dropped, so the next try asks another.
                    if attempt == ATTEMPTS or (self.cache.partial_bytes(sha256) <= before
                                               and not isinstance(exc, BadSource)):
                        raise CacheError(f"{image.label}: {exc}") from None
                    attempt += 1
                    log.warning("image %s: %s; resuming (try %d of %d)", sha256, exc, attempt, ATTEMPTS)
        finally:
            self._note(sha256, -1)

    def _swarm(self, image: ImageFile, cancel, progress) -> str | None:
        """Fetch with the lease's peers (:mod:`pilot.images.peers`); None when the service offers no manifest
        (then the plain download runs)."""
        from pilot.images.peers import PeerServer, SwarmFetch

        try:
            manifest = self.source.manifest(image.sha256, self.key, image.size)
        except CacheError as exc:
            log.info("image %s: no chunk manifest (%s): fetching it whole", image.sha256, exc)
            return None
        with self._lock:
            if self.server is None:
                self.server = PeerServer(self.source.peer_key, self.peer_bind, self.peer_port,
                                         advertise=self.peer_advertise)
                log.info("serving image chunks to this lease's nodes at %s", self.server.address)
        swarm = SwarmFetch(self.source, self.key, self.server, cancel=cancel,
                           progress=(lambda done: progress(done, image.size)) if progress else None)
        self.swarms.append(swarm)
        path = self.cache.ensure(image.sha256, image.size, None, cancel=cancel,
                                 fill=lambda part, final: swarm.fill(manifest, part, final))
        log.info("image %s: %d chunk(s) from peers, %d from the service", image.sha256, swarm.from_peers,
                 swarm.from_service)
        offer = self.server.offer(manifest, (path, path + ".part"), set(range(manifest.count)))
        threading.Thread(target=swarm.seed_on, args=(manifest, offer, time.monotonic() + SEED_FOR_S),
                         name="image-seed", daemon=True).start()
        return path

    def close(self) -> None:
        """Stop serving chunks (the pilot's teardown); seeding threads end with it."""
        for swarm in self.swarms:
            swarm.cancel.set()
        if self.server is not None:
            self.server.stop()

    def _note(self, sha256: str, delta: int) -> None:
        with self._lock:
            fetching = dict(self._fetching)
            fetching[sha256] = fetching.get(sha256, 0) + delta
            if not fetching[sha256]:
                del fetching[sha256]
            self.note_fetching(tuple(sorted(fetching)))  # journalled first: a failure fetches nothing
            self._fetching = fetching
