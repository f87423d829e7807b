"""HTTP Digest (RFC 7616, ``qop=auth``) arithmetic both sides share: the response value and the
header parameter list. Standard library only and cheap to import (one regex, compiled on first
use): the pilot's first notification is authenticated with it before anything heavy is loaded.

The service's verifier (:mod:`service_adapter.digest`) checks with these functions what the
pilot's first-shot sender (:mod:`pilot.firstshot`) computes with them.
"""

from __future__ import annotations

import hashlib
import re

HASHES = {"SHA-256": hashlib.sha256, "MD5": hashlib.md5}
# A quoted value as "the unrolled loop" (runs of plain characters between escapes): the same strings as
# (?:[^"\\]|\\.)*, matched in half the time (one alternation per run, not per character).
_PARAM_PATTERN = r'\s*([A-Za-z0-9_-]+)\s*=\s*("([^"\\]*(?:\\.[^"\\]*)*)"|[^,\s]*)\s*(?:,|$)'


def response_digest(algorithm: str, ha1: str, nonce: str, nc: str, cnonce: str, method: str, uri: str) -> str:
    """The RFC 7616 ``response`` value for ``qop=auth``: ``KD(HA1, nonce:nc:cnonce:auth:HA2)``."""
    hash_fn = HASHES[algorithm]
    ha2 = hash_fn(f"{method}:{uri}".encode()).hexdigest()
    return hash_fn(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}".encode()).hexdigest()


def parse_params(text: str) -> dict[str, str] | None:
    """Parse the comma-separated ``name=value`` list of a Digest header.

    Quoted values are unescaped. Returns None for anything malformed or for
    a repeated parameter.
    """
    match_at = _param_matcher()
    params: dict[str, str] = {}
    pos = 0
    text = text.strip()
    end = len(text)
    while pos < end:
        match = match_at(text, pos)
        if match is None or match.end() == pos:
            return None
        name, bare, quoted = match.groups()
        name = name.lower()
        if name in params:
            return None
        if quoted is None:
            params[name] = bare
        else:
            # Every request's header passes here: unescape only what has a backslash (few ever do).
            params[name] = re.sub(r"\\(.)", r"\1", quoted) if "\\" in quoted else quoted
        pos = match.end()
    return params


_matcher = None


def _param_matcher():
    """The compiled parameter pattern's ``match`` (compiled on the first header, not at import)."""
    global _matcher
    if _matcher is None:
        _matcher = re.compile(_PARAM_PATTERN).match
    return _matcher
