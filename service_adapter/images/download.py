"""Sending an image's bytes to a pilot: the whole file or one byte range, a chunk at a time.

Why not aiohttp's ``FileResponse``: it keeps the file open for the whole
transfer (two descriptors per download where the connection cap counts
one), answers a bad ``Range`` with a 416 that has no length (chunked, then
the connection dropped) and, once prepared inside a handler, turns a client
that goes away into an ERROR traceback. Here:

- ``Range`` is one ``bytes=A-B``, ``bytes=A-`` or ``bytes=-N``; anything else
  (several ranges, junk, a start past the end) is answered 416 with
  ``Content-Range: bytes */SIZE`` and an empty body: the pilot then knows the
  size and asks again;
- the file is opened, read (``os.pread``, in a worker thread) and closed for
  each :data:`READ_BYTES`, so a download holds its socket only;
- a client that goes away mid-transfer, or stops reading (the send timeout of
  :mod:`service_adapter.connections` aborts it), costs one log line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re

from aiohttp import web

log = logging.getLogger(__name__)

#: Bytes read from the file per step (and handed to the transport at once).
READ_BYTES = 1024 * 1024
_RANGE_RE = re.compile(r"bytes=(?:([0-9]{1,19})-([0-9]{0,19})|-([0-9]{1,19}))")


class Unsatisfiable(Exception):
    """The Range header asks for nothing this file has (or is not one byte range)."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of the one range ``header`` asks for in a file of ``size`` bytes; None: the whole
    file. Raises :class:`Unsatisfiable` for a range past the end, a malformed header or several ranges."""
    if header is None:
        return None
    match = _RANGE_RE.fullmatch(header.strip())
    if match is None:
        raise Unsatisfiable(f"not one byte range: {header[:80]!r}")
    first, last, suffix = match.groups()
    if suffix is not None:
        length = int(suffix)
        if length == 0 or size == 0:
            raise Unsatisfiable("an empty suffix range")
        return max(size - length, 0), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        raise Unsatisfiable(f"bytes {start}-{last} of a file of {size} bytes")
    return start, min(end, size - 1)


def _read(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


async def send_file(request: web.Request, path: str, *, what: str, on_sent=None) -> web.StreamResponse:
    """Answer ``request`` with the bytes of ``path`` (200, or 206 for its Range; 416 for a bad Range).

    ``what`` names the transfer in the log line of a client that went
    away; ``on_sent(n)`` is called with the bytes handed to the client.
    Returns the response (prepared and finished unless the client went away).
    """
    loop = asyncio.get_running_loop()
    try:
        size = (await loop.run_in_executor(None, os.stat, path)).st_size
    except FileNotFoundError:
        raise web.HTTPNotFound() from None
    try:
        wanted = byte_range(request.headers.get("Range"), size)
    except Unsatisfiable:
        return web.Response(status=416, headers={"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"})
    first, last = wanted if wanted is not None else (0, size - 1)
    response = web.StreamResponse(status=200 if wanted is None else 206, headers={
        "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"})
    if wanted is not None:
        response.headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    response.content_length = last - first + 1
    offset = first
    try:
        await response.prepare(request)
        while offset <= last:
            data = await loop.run_in_executor(None, _read, path, offset, min(READ_BYTES, last + 1 - offset))
            if not data:
                raise OSError(f"the file ended at byte {offset} (it was {size} bytes)")
            await response.write(data)
            offset += len(data)
            if on_sent is not None:
                on_sent(len(data))
        await response.write_eof()
    except OSError as exc:  # ConnectionError included
        # The client went away, or the send timeout aborted it, or the image left the store (revoked).
        log.info("%s to %s: stopped after %d of %d bytes (%s)", what, request.remote, offset - first,
                 last + 1 - first, type(exc).__name__ if isinstance(exc, ConnectionError) else exc)
        response.force_close()
        if request.transport is not None:
            request.transport.abort()
    return response
