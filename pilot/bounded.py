"""The pilot's bounded reads: :mod:`workspace_common.bounded` with ``requests``' errors, and its digest auth.

Every answer the pilot reads goes through :func:`read_at_most` or
:func:`stream_at_most` on a streamed response (see the shared module for
the bound's rules). A transfer that breaks or stalls surfaces as
``requests.ConnectionError``, as ``iter_content`` would raise it (urllib3's
own errors are not ``requests``'). :func:`digest_auth` is the pilot's
``HTTPDigestAuth`` that reads a 401's body within a bound.
"""

from __future__ import annotations

import functools

from workspace_common import bounded
from workspace_common.bounded import IDENTITY, PIECE, AnswerTooLong

__all__ = ["IDENTITY", "PIECE", "AnswerTooLong", "digest_auth", "read_at_most", "stream_at_most"]


def read_at_most(response, limit: int) -> bytes:
    """The body of the streamed ``response``, at most ``limit`` bytes (:func:`workspace_common.bounded.read_at_most`)."""
    return bounded.read_at_most(response, limit, read=_read)


def stream_at_most(response, limit: int, piece: int = PIECE):
    """The body in pieces, ``limit`` bytes in all (:func:`workspace_common.bounded.stream_at_most`)."""
    return bounded.stream_at_most(response, limit, piece, read=_read)


def digest_auth(user: str, password: str):
    """``requests``' digest auth for ``user``, reading a 401's body within a bound (imports ``requests``)."""
    return _digest_auth_class()(user, password)


@functools.cache
def _digest_auth_class():
    from requests.auth import HTTPDigestAuth

    class DigestAuth(bounded.BoundedChallenge, HTTPDigestAuth):
        """HTTP digest auth whose challenge body costs at most a bounded read."""

    return DigestAuth


def _read(response, amount: int) -> bytes:
    from urllib3.exceptions import HTTPError

    try:
        return response.raw.read(amount, decode_content=False)
    except (HTTPError, OSError) as exc:
        import requests

        raise requests.ConnectionError(exc) from None
