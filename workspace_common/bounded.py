"""Reading an HTTP answer with a bound known before the first byte, on either side.

The pilot runs as root and talks to servers it must not trust with its
memory (an image mirror, the lease's other nodes, and through a proxy, or
compromised, the service); the service's long-running clients (the COBalD
pool, ``workspace-lease``) talk to a service that may sit behind a proxy.
An answer read whole before its length is checked lets such a server grow
the reader's memory without limit. Every answer goes through
:func:`stream_at_most` on a streamed ``requests`` response
(``stream=True``): it refuses a declared ``Content-Length`` over the bound
before reading anything, reads the raw bytes (never decompressed: a small
gzip answer could expand to any size in one read) a piece at a time, and
stops at the first byte past the bound. Requests that use it send
:data:`IDENTITY` so no honest server compresses.

``requests``' digest auth reads a 401's body whole before it answers the
challenge; :class:`BoundedChallenge` reads it within a bound first.

Standard library only: the responses are used by their attributes
(``headers``, ``raw.read``, ``close``), and each side passes its own
``read`` to turn its HTTP library's transfer errors into its own.
"""

from __future__ import annotations

#: Headers that ask for the body as it is (no content coding): what the bound is counted in.
IDENTITY = {"Accept-Encoding": "identity"}
#: The most read from the socket at once.
PIECE = 256 * 1024
#: The most of a 401 challenge's body that is read (and dropped): the service's is a few hundred bytes.
CHALLENGE_BODY_BYTES = 64 * 1024


class AnswerTooLong(Exception):
    """An answer that declared, or sent, more than its bound; one line naming both numbers."""


def raw_read(response, amount: int) -> bytes:
    """Up to ``amount`` raw bytes of a streamed response's body (as sent: no content decoding)."""
    return response.raw.read(amount, decode_content=False)


def read_at_most(response, limit: int, read=raw_read) -> bytes:
    """The body of the streamed ``response``, at most ``limit`` bytes; the response is closed after.

    Raises :class:`AnswerTooLong` (before reading) when its Content-Length
    says more than ``limit``, or as soon as more than ``limit`` bytes
    arrived, or when the body is content-coded (gzip, ...), whose size
    after decoding no bound known beforehand covers. Errors of the
    transfer itself are what ``read(response, amount)`` raises.
    """
    return b"".join(stream_at_most(response, limit, read=read))


def stream_at_most(response, limit: int, piece: int = PIECE, read=raw_read):
    """The body of the streamed ``response`` in pieces of at most ``piece`` bytes, ``limit`` bytes in all.

    As :func:`read_at_most`, but yields as it reads (for a download that
    goes to disk); :class:`AnswerTooLong` comes before a piece that would
    cross ``limit`` is yielded. The response is closed when the generator
    ends or is closed.
    """
    try:
        yield from _pieces(response, limit, piece, read)
    finally:
        response.close()


def _pieces(response, limit: int, piece: int, read):
    coding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        raise AnswerTooLong(f"the answer is {coding}-coded, which no bound covers (identity was asked for)")
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise AnswerTooLong(f"the answer declares {int(declared)} bytes, more than the {limit} expected")
    sent = 0
    while True:
        data = read(response, min(piece, limit + 1 - sent))
        if not data:
            return
        sent += len(data)
        if sent > limit:
            raise AnswerTooLong(f"the answer goes on past the {limit} bytes expected")
        yield data


class BoundedChallenge:
    """Put before ``requests.auth.HTTPDigestAuth`` in a class's bases: a 401's body is read within a bound.

    ``HTTPDigestAuth.handle_401`` reads the challenge's body whole (to free
    the connection for the authenticated retry), however long it is. This
    reads at most :data:`CHALLENGE_BODY_BYTES` of it first and hands that on
    as the body; a longer one is dropped and its connection closed, so the
    retry goes out on a new one.
    """

    def handle_401(self, r, **kwargs):
        """Bound the body of a challenge digest auth will answer, then let it answer as it would; any other
        answer (a final 401, a 403) is left unread for the caller's own bounded read."""
        # requests keeps a streamed body unread as ``_content = False``; setting it is how a body already read is
        # handed to requests (``Response.content`` returns it).
        answers_it = (400 <= r.status_code < 500 and "digest" in r.headers.get("www-authenticate", "").lower()
                      and self._thread_local.num_401_calls < 2)  # HTTPDigestAuth's own test for a retry
        if answers_it and getattr(r, "_content", None) is False:
            try:
                body = b"".join(_pieces(r, CHALLENGE_BODY_BYTES, PIECE, raw_read))
            except Exception:  # too long, or a transfer that broke: the challenge is in the head; drop the connection
                body = b""
                r.raw.close()
            # A body read to its end leaves the connection to carry the retry.
            r._content, r._content_consumed = body, True
        return super().handle_401(r, **kwargs)
