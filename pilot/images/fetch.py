"""Where a pilot gets the images its VMs name: a site mirror, then the service's image endpoint.

The service's endpoint (``GET {contact}/pilot/v2/slots/{slot}/hosts/{host}/images/{sha256}``)
is fetched on the notifier's session: the same digest account as the
notifications and the command poll, the same connections. A mirror
(``[images] mirror``) is plain HTTP(S), ``{mirror}/{sha256}``: what it
serves is verified here like anything else, so it need not be trusted.
Both resume with a Range request from what a partial download holds.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from typing import Callable, Iterator

import requests

from pilot.images.cache import CacheError, FetchCancelled, ImageCache
from pilot.protocol import SIGNATURE_HEADER, ImageFile, image_path, sign_commands
from pilot.shared.errors import failure_words

log = logging.getLogger(__name__)

#: Read size: also the most a transfer that breaks off loses of what arrived (the unfinished read is dropped).
#: 256 KiB: at 64 KiB, urllib3's per-read cost made a 1 GiB download over loopback take 1.02 s instead of 0.23 s.
CHUNK = 256 * 1024
#: Tries of one image per VM start; each resumes from what the one before it got.
ATTEMPTS = 3


class ImageSource:
    """The URLs an image is fetched from, in order: ``{mirror}/{sha256}`` (if set), then the service's endpoint."""

    def __init__(self, session: requests.Session, contact: str, slot: str, host: str, *, mirror: str | None = None,
                 timeout_s: float = 30.0):
        self.session = session
        self.service = contact.rstrip("/")
        self.slot = slot
        self.host = host
        self.mirror = mirror.rstrip("/") if mirror else None
        self.timeout_s = timeout_s
        self._plain: requests.Session | None = None

    def urls(self, sha256: str) -> list[tuple[str, requests.Session]]:
        """(URL, session) to try, in order."""
        urls = []
        if self.mirror:
            if self._plain is None:
                self._plain = requests.Session()
                self._plain.verify = self.session.verify
            urls.append((f"{self.mirror}/{sha256}", self._plain))
        urls.append((self.service + image_path(self.slot, self.host, sha256), self.session))
        return urls

    def approved(self, key: str) -> set[str]:
        """The sha256s the service approves now (its signed answer, checked with the (slot, host) ``key``);
        CacheError if it cannot be had or the signature is wrong."""
        target = image_path(self.slot, self.host, "x").rsplit("/", 1)[0]
        try:
            response = self.session.get(self.service + target, timeout=self.timeout_s, verify=self.session.verify)
        except requests.RequestException as exc:
            raise CacheError(f"{self.service}{target}: {failure_words(exc)}") from None
        if response.status_code != 200:
            raise CacheError(f"{self.service}{target}: HTTP {response.status_code}")
        expected = sign_commands(key, target, response.content)
        if not hmac.compare_digest(response.headers.get(SIGNATURE_HEADER, ""), expected):
            raise CacheError(f"{self.service}{target}: the answer's signature is wrong: ignored")
        try:
            listed = json.loads(response.content)["sha256"]
            return {sha for sha in listed if isinstance(sha, str) and len(sha) == 64}
        except (ValueError, KeyError, TypeError):
            raise CacheError(f"{self.service}{target}: not a list of sha256s") from None

    def fetcher(self, sha256: str) -> Callable[[int], Iterator[bytes]]:
        """``fetch(offset)`` for :meth:`ImageCache.ensure`: the bytes from ``offset`` on, from the first URL that
        answers; CacheError (one line per URL) if none does."""

        def fetch(offset: int) -> Iterator[bytes]:
            problems = []
            for url, session in self.urls(sha256):
                try:
                    response = session.get(url, stream=True, timeout=self.timeout_s, verify=session.verify,
                                           headers={"Range": f"bytes={offset}-"} if offset else {})
                except requests.RequestException as exc:
                    problems.append(f"{url}: {failure_words(exc)}")
                    continue
                if response.status_code not in (200, 206):
                    problems.append(f"{url}: HTTP {response.status_code}")
                    response.close()
                    continue
                return _body(response, url, offset)
            raise CacheError("; ".join(problems))

        return fetch


def _body(response: requests.Response, url: str, offset: int) -> Iterator[bytes]:
    skip = offset if response.status_code == 200 else 0  # a server that ignored the Range sends it all
    if response.status_code == 206 and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
        response.close()
        raise CacheError(f"{url}: answered a range other than the one asked for")
    try:
        for chunk in response.iter_content(CHUNK):
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            if chunk:
                yield chunk
    except requests.RequestException as exc:
        raise CacheError(f"{url}: the transfer broke off: {failure_words(exc)}") from None
    finally:
        response.close()


class NodeImages:
    """A slot's way to have named images on the node: the cache, the source, and the journal note of fetches.

    ``note_fetching(sha256s)`` journals what this pilot is downloading
    (before the first byte, and again when done), so that kill-all can
    remove a partial download its pilot left.
    """

    def __init__(self, cache: ImageCache, source: ImageSource, *,
                 note_fetching: Callable[[tuple[str, ...]], None] = lambda sha256s: None, key: str | None = None):
        self.cache = cache
        self.source = source
        self.note_fetching = note_fetching
        self.key = key
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
            for attempt in range(1, ATTEMPTS + 1):
                before = self.cache.partial_bytes(sha256)
                try:
                    return self.cache.ensure(
                        sha256, size, self.source.fetcher(sha256), cancel=cancel,
                        progress=(lambda done: progress(done, size)) if progress else None,
                    )
                except FetchCancelled:
                    raise
                except CacheError as exc:
                    # Only a try that got further is worth another: a source that refuses refuses again.
                    if attempt == ATTEMPTS or self.cache.partial_bytes(sha256) <= before:
                        raise CacheError(f"{image.label}: {exc}") from None
                    log.warning("image %s: %s; resuming (try %d of %d)", sha256, exc, attempt + 1, ATTEMPTS)
            raise AssertionError("unreachable")
        finally:
            self._note(sha256, -1)

    def _note(self, sha256: str, delta: int) -> None:
        with self._lock:
            fetching = dict(self._fetching)
            fetching[sha256] = fetching.get(sha256, 0) + delta
            if not fetching[sha256]:
                del fetching[sha256]
            self.note_fetching(tuple(sorted(fetching)))  # journalled first: a failure fetches nothing
            self._fetching = fetching
