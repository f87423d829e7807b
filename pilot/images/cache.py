"""The node's image cache: content-addressed, root-only, shared by every pilot on the node, safe to crash in.

Layout of the cache directory (0700, owned by the pilot's user):

- ``<sha256>``: a verified image, named by its content; read-only (0400);
- ``<sha256>.part``: a download under way or cut short, resumed from its
  length by the next fetch of that image (HTTP Range) and renamed into
  place only once its size and sha256 are right;
- ``<sha256>.lock``: the image's lock. A fetch holds it exclusively (flock),
  so when several pilots want one image, one downloads and the others wait
  and then find it in place; a VM that uses the image holds a shared lock
  on the image file itself, so eviction (which needs it exclusively) never
  takes an image from under a running VM.

Eviction is least-recently-used by modification time, which every use
touches; it runs before a download, until the new image fits under the
cap. Nothing here talks to the network: :meth:`ImageCache.ensure` is given
the function that fetches.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import queue
import re
import threading
from typing import Callable, Iterable, Iterator

from pilot.node.safedir import directory_problem

log = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
HASH_CHUNK = 1024 * 1024
#: How often a pilot waiting for another's download looks whether it should give up.
LOCK_POLL_S = 0.2

#: ``fetch(offset)``: the image's bytes from ``offset`` on, as an iterable of chunks.
Fetch = Callable[[int], Iterable[bytes]]


class CacheError(Exception):
    """An image that could not be put in the cache; ``str()`` is one line (nothing half-done stays in place)."""


class BadSource(CacheError):
    """A source that broke its word (it sent more than the image's declared size): nothing it sent in this try
    is kept, and the next try asks another source."""


class FetchCancelled(CacheError):
    """The fetch was given up because the pilot is stopping (the partial download stays, to be resumed)."""


class ImageCache:
    """The images under ``directory``, at most ``max_bytes`` of them (a single larger image is still allowed)."""

    def __init__(self, directory: str, max_bytes: int):
        self.directory = directory
        self.max_bytes = max_bytes

    def prepare(self) -> None:
        """Create the directory (0700) if missing; CacheError if it is not safe (others could plant images)."""
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"image cache {self.directory}: cannot create it: {exc.strerror}") from None
        problem = directory_problem(self.directory)
        if problem:
            raise CacheError(f"image cache {self.directory}{problem}")

    def path(self, sha256: str) -> str:
        """Where the image with this content is (or will be)."""
        if not _SHA256_RE.fullmatch(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return os.path.join(self.directory, sha256)

    def has(self, sha256: str) -> bool:
        """Whether the image is in the cache (verified: only verified files get this name)."""
        return os.path.isfile(self.path(sha256))

    def partial_bytes(self, sha256: str) -> int:
        """How much of the image a download has written so far (0: none under way or left)."""
        try:
            return os.stat(self.path(sha256) + ".part").st_size
        except FileNotFoundError:
            return 0

    def ensure(self, sha256: str, size: int, fetch: Fetch | None, *, cancel: threading.Event | None = None,
               progress: Callable[[int], None] | None = None,
               fill: Callable[[str, str], None] | None = None) -> str:
        """The cached image's path, fetching it first if it is not there; CacheError if it cannot be had.

        Holds the image's lock while fetching: a second pilot asking for the
        same image waits (giving up with FetchCancelled when ``cancel`` is
        set) and then finds it in place. A download resumes a ``.part`` left
        by an earlier one (after re-hashing what it holds); the result is
        renamed into place only if its size and sha256 are right, else the
        partial file is removed and CacheError says what was wrong.
        ``progress(bytes_so_far)`` is called as bytes arrive. ``fill(part,
        final)``, instead of ``fetch``, writes the partial file its own way
        (chunks from peers, out of order); the whole is verified the same.
        """
        final = self.path(sha256)
        with self._locked(sha256, cancel):
            if os.path.isfile(final):
                self.touch(sha256)
                return final
            self.make_room(size)
            if fill is not None:
                fill(final + ".part", final)
                self._into_place(sha256, size)
            else:
                self._download(sha256, size, fetch, cancel, progress)
            return final

    def touch(self, sha256: str) -> None:
        """Mark the image as just used (the eviction order)."""
        try:
            os.utime(self.path(sha256))
        except FileNotFoundError:
            pass

    def hold(self, sha256: str) -> int:
        """A file descriptor holding a shared lock on the image while a VM uses it (close it to let go)."""
        fd = os.open(self.path(sha256), os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self.touch(sha256)
        return fd

    def images(self) -> list[tuple[str, int, float]]:
        """(sha256, size, last use) of every cached image, least recently used first."""
        found = []
        for name in self._names():
            if _SHA256_RE.fullmatch(name):
                try:
                    st = os.stat(os.path.join(self.directory, name))
                except FileNotFoundError:
                    continue
                found.append((name, st.st_size, st.st_mtime))
        return sorted(found, key=lambda item: item[2])

    def make_room(self, size: int) -> list[str]:
        """Evict least-recently-used images not in use until ``size`` more bytes fit; the sha256s evicted."""
        cached = self.images()
        used = sum(item[1] for item in cached)
        evicted = []
        for sha256, image_size, _ in cached:
            if used + size <= self.max_bytes:
                break
            if self._remove_unused(sha256):
                used -= image_size
                evicted.append(sha256)
        if evicted:
            log.info("image cache: evicted %d image(s) to make room for %d bytes: %s", len(evicted), size,
                     ", ".join(evicted))
        return evicted

    def retire(self, keep: set[str]) -> list[str]:
        """Remove every cached image not in ``keep`` and not in use; the sha256s removed."""
        gone = [sha256 for sha256, _, _ in self.images() if sha256 not in keep and self._remove_unused(sha256)]
        if gone:
            log.info("image cache: retired %d image(s) no longer listed: %s", len(gone), ", ".join(gone))
        return gone

    def remove_partials(self, sha256s: Iterable[str]) -> list[str]:
        """Remove the partial downloads of these images where no fetch holds them; the sha256s removed."""
        removed = []
        for sha256 in sha256s:
            part = self.path(sha256) + ".part"
            if not os.path.exists(part):
                continue
            fd = self._lock_fd(sha256)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live fetch owns it
                try:
                    os.unlink(part)
                    removed.append(sha256)
                except FileNotFoundError:
                    pass
            finally:
                os.close(fd)
        return removed

    # -- inside --------------------------------------------------------------------------------

    def _names(self) -> list[str]:
        try:
            return os.listdir(self.directory)
        except FileNotFoundError:
            return []

    def _lock_fd(self, sha256: str) -> int:
        return os.open(self.path(sha256) + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @contextlib.contextmanager
    def _locked(self, sha256: str, cancel: threading.Event | None):
        fd = self._lock_fd(sha256)
        try:
            if cancel is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        # Another pilot fetches this image: wait for it, but not past our own stop.
                        if cancel.wait(LOCK_POLL_S):
                            raise FetchCancelled(f"gave up waiting for another pilot's download of {sha256}") \
                                from None
            yield
        finally:
            os.close(fd)  # drops the flock

    def _remove_unused(self, sha256: str) -> bool:
        path = self.path(sha256)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a VM uses it
            os.unlink(path)
            return True
        finally:
            os.close(fd)

    def _download(self, sha256: str, size: int, fetch: Fetch, cancel, progress) -> None:
        part = self.path(sha256) + ".part"
        digest = _Hasher()
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "r+b") as handle:
                have = _hash_into(handle, digest)
                if have > size:
                    digest.restart()
                    have = 0
                    handle.truncate(0)
                if have:
                    log.info("image %s: resuming a partial download at %d of %d bytes", sha256, have, size)
                handle.seek(have)
                written = have
                if written < size:
                    try:
                        for chunk in _bounded(fetch(written), cancel):
                            written += len(chunk)
                            if written > size:
                                break
                            handle.write(chunk)
                            digest.update(chunk)
                            if progress is not None:
                                progress(written)
                    except BadSource:
                        handle.truncate(have)  # its bytes are not worth resuming from
                        os.fsync(handle.fileno())
                        raise
                handle.flush()
                os.fsync(handle.fileno())
            got = digest.hexdigest()
        finally:
            digest.close()
        if written != size:
            os.unlink(part)
            raise CacheError(f"image {sha256}: got {written} bytes, expected {size}: discarded")
        if got != sha256:
            os.unlink(part)
            raise CacheError(f"image {sha256}: the bytes received have sha256 {got}: discarded")
        os.chmod(part, 0o400)
        os.replace(part, self.path(sha256))
        _fsync_dir(self.directory)


    def _into_place(self, sha256: str, size: int) -> None:
        """Verify a partial file filled by chunks (its whole sha256, read once more) and rename it into place."""
        part = self.path(sha256) + ".part"
        digest = _Hasher()
        try:
            with open(part, "rb") as handle:
                length = _hash_into(handle, digest)
            got = digest.hexdigest()
        finally:
            digest.close()
        if length != size or got != sha256:
            os.unlink(part)
            raise CacheError(f"image {sha256}: the chunks put together have sha256 {got} ({length} bytes): discarded")
        os.chmod(part, 0o400)
        os.replace(part, self.path(sha256))
        _fsync_dir(self.directory)


class _Hasher:
    """sha256 on a thread of its own, so hashing overlaps receiving and writing (hashlib and socket reads
    both let go of the GIL); ``update`` queues a chunk, ``hexdigest`` waits for the last."""

    def __init__(self):
        self._start()

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=32)  # at most 8 MiB of 256 KiB reads in flight
        self._digest = hashlib.sha256()
        self._thread = threading.Thread(target=self._run, name="image-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._digest.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def restart(self) -> None:
        """Forget what was hashed (a partial file that cannot be the image's start)."""
        self.close()
        self._start()

    def hexdigest(self) -> str:
        self.close()
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


def _hash_into(handle, digest) -> int:
    """Feed what a partial file already holds into ``digest``; its length."""
    handle.seek(0)
    total = 0
    while chunk := handle.read(HASH_CHUNK):
        digest.update(chunk)
        total += len(chunk)
    return total


def _bounded(chunks: Iterable[bytes], cancel: threading.Event | None) -> Iterator[bytes]:
    for chunk in chunks:
        if cancel is not None and cancel.is_set():
            raise FetchCancelled("the pilot is stopping: the partial download stays, to be resumed")
        yield chunk


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
