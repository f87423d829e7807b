"""How the service gets lists and images from their endorsers: a path, a file:// URL or an http(s):// URL.

Both reads are bounded: a list by :data:`MAX_LIST_BYTES`, an image by the
size its list declares. An image is written to a temporary file beside its
place, hashed while it arrives, and renamed into place only when its size
and sha256 are the list's, so the store directory never holds a file that
is not the content its name says.
"""

from __future__ import annotations

import hashlib
import os
from urllib.parse import unquote, urlsplit

from workspace_common.errors import failure_words
from service_adapter.images.imagelist import MAX_LIST_BYTES

CHUNK = 1024 * 1024


class TransferError(Exception):
    """A list or image that could not be fetched; ``str()`` is one line."""


def read_source(source: str, *, timeout_s: float = 60.0, ca_file: str | None = None) -> bytes:
    """The bytes at ``source`` (an absolute path, file:// or http(s):// URL), at most MAX_LIST_BYTES + 1."""
    limit = MAX_LIST_BYTES + 1
    body = bytearray()
    for chunk in _chunks(source, timeout_s, ca_file):
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


def check_source(source: str) -> str:
    """``source`` if it is an absolute path or a file:// or http(s):// URL; TransferError otherwise."""
    scheme = urlsplit(source).scheme
    if scheme in ("http", "https"):
        if not urlsplit(source).hostname:
            raise TransferError(f"{source}: a URL needs a host")
        return source
    _local_path(source)
    return source


def _local_path(source: str) -> str:
    parts = urlsplit(source)
    if parts.scheme == "file":
        path = unquote(parts.path)
    elif parts.scheme == "":
        path = source
    else:
        raise TransferError(f"{source}: not a path, file:// or http(s):// URL")
    if not os.path.isabs(path):
        raise TransferError(f"{source}: give an absolute path")
    return path


def stored_path(store_dir: str, sha256: str) -> str:
    """Where the image with this content lives in the service's image store."""
    return os.path.join(store_dir, sha256)


def download(urls: tuple[str, ...], sha256: str, size: int, store_dir: str, *, timeout_s: float = 60.0,
             ca_file: str | None = None) -> str:
    """Fetch the image into ``store_dir`` from the first of ``urls`` that gives the right content; its path.

    A file already in place is kept. TransferError names what each URL did
    wrong when none worked; the store directory is then as it was.
    """
    final = stored_path(store_dir, sha256)
    if os.path.exists(final):
        return final
    os.makedirs(store_dir, mode=0o700, exist_ok=True)
    problems = []
    for url in urls:
        try:
            _fetch_one(url, sha256, size, final, timeout_s, ca_file)
            return final
        except TransferError as exc:
            problems.append(str(exc))
    raise TransferError("; ".join(problems) or "no URL to fetch it from")


def _fetch_one(url: str, sha256: str, size: int, final: str, timeout_s: float, ca_file: str | None) -> None:
    temp = f"{final}.part-{os.getpid()}"
    digest, written = hashlib.sha256(), 0
    try:
        with open(temp, "wb") as out:
            for chunk in _chunks(url, timeout_s, ca_file):
                written += len(chunk)
                if written > size:
                    raise TransferError(f"{url}: more than the {size} bytes the list says")
                digest.update(chunk)
                out.write(chunk)
            if written != size:
                raise TransferError(f"{url}: {written} bytes, the list says {size}")
            if digest.hexdigest() != sha256:
                raise TransferError(f"{url}: sha256 {digest.hexdigest()}, the list says {sha256}: refused")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o600)
        os.replace(temp, final)
    finally:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass


def _chunks(url: str, timeout_s: float, ca_file: str | None):
    scheme = urlsplit(url).scheme
    if scheme in ("http", "https"):
        import requests

        try:
            with requests.get(url, stream=True, timeout=timeout_s, verify=ca_file or True) as answer:
                if answer.status_code != 200:
                    raise TransferError(f"{url}: HTTP {answer.status_code}")
                yield from answer.iter_content(CHUNK)
        except requests.RequestException as exc:
            raise TransferError(f"{url}: {_reason(exc)}") from None
        return
    try:
        with open(_local_path(url), "rb") as handle:
            while chunk := handle.read(CHUNK):
                yield chunk
    except OSError as exc:
        raise TransferError(f"{url}: cannot read: {exc.strerror}") from None


def _reason(exc: BaseException) -> str:
    return failure_words(exc)
