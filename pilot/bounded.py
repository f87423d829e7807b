"""Reading an HTTP answer with a bound known before the first byte.

The pilot runs as root and talks to servers it must not trust with its
memory: an image mirror, the lease's other nodes, and (through a proxy, or
compromised) the service. An answer read whole before its length is checked
lets such a server grow root's memory without limit. Every answer the pilot
reads goes through :func:`read_at_most` on a streamed response
(``stream=True``): it refuses a declared ``Content-Length`` over the bound
before reading anything, reads the raw bytes (never decompressed: a small
gzip answer could expand to any size in one read) a piece at a time, and
stops at the first byte past the bound.

Requests that use it send :data:`IDENTITY` so no honest server compresses.
"""

from __future__ import annotations

#: Headers that ask for the body as it is (no content coding): what the bound is counted in.
IDENTITY = {"Accept-Encoding": "identity"}
#: The most read from the socket at once.
PIECE = 256 * 1024


class AnswerTooLong(Exception):
    """An answer that declared, or sent, more than its bound; one line naming both numbers."""


def read_at_most(response, limit: int) -> bytes:
    """The body of the streamed ``response``, at most ``limit`` bytes; the response is closed after.

    Raises :class:`AnswerTooLong` (before reading) when its Content-Length
    says more than ``limit``, or as soon as more than ``limit`` bytes
    arrived, or when the body is content-coded (gzip, ...), whose size
    after decoding no bound known beforehand covers. Errors of the
    transfer itself (a reset, a timeout) come from ``requests``/``urllib3``
    as they are.
    """
    return b"".join(stream_at_most(response, limit))


def stream_at_most(response, limit: int, piece: int = PIECE):
    """The body of the streamed ``response`` in pieces of at most ``piece`` bytes, ``limit`` bytes in all.

    As :func:`read_at_most`, but yields as it reads (for a download that
    goes to disk); :class:`AnswerTooLong` comes before a piece that would
    cross ``limit`` is yielded. The response is closed when the generator
    ends or is closed.
    """
    try:
        coding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if coding not in ("", "identity"):
            raise AnswerTooLong(f"the answer is {coding}-coded, which no bound covers (identity was asked for)")
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise AnswerTooLong(f"the answer declares {int(declared)} bytes, more than the {limit} expected")
        sent = 0
        while True:
            data = _read(response, min(piece, limit + 1 - sent))
            if not data:
                return
            sent += len(data)
            if sent > limit:
                raise AnswerTooLong(f"the answer goes on past the {limit} bytes expected")
            yield data
    finally:
        response.close()


def _read(response, amount: int) -> bytes:
    """Up to ``amount`` raw bytes of the body; a broken or stalled transfer as ``requests.ConnectionError``, as
    ``iter_content`` would raise it (urllib3's own errors are not ``requests``')."""
    from urllib3.exceptions import HTTPError

    try:
        return response.raw.read(amount, decode_content=False)
    except (HTTPError, OSError) as exc:
        import requests

        raise requests.ConnectionError(exc) from None
