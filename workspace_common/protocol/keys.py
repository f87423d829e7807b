"""Keys and signatures of the wire protocol (:mod:`workspace_common.protocol`): the digest account's HA1, the
node and slot keys (who may speak for which slot and host), and the HMAC that binds a body to them.

Standard library only; on the pilot's start path with :mod:`.wire`.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from workspace_common.protocol.wire import _HOST_RE, MAX_HOST_LEN, SIGNATURE_PREFIX


def digest_ha1(user: str, realm: str, secret: str, algorithm: str = "SHA-256") -> str:
    """The RFC 7616 HA1 for an account: ``H(user:realm:secret)`` as lowercase hex."""
    name = {"SHA-256": "sha256", "MD5": "md5"}[algorithm]
    return hashlib.new(name, f"{user}:{realm}:{secret}".encode()).hexdigest()


# -- credentials: who may speak for which (slot, host) ---------------------------------------------

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


def is_key(text: str) -> bool:
    """Whether ``text`` has the shape of a node key or slot secret: 64 lowercase hex digits."""
    return isinstance(text, str) and bool(_KEY_RE.match(text))


def is_host(text: str) -> bool:
    """Whether ``text`` is a valid host name for the protocol."""
    return isinstance(text, str) and len(text) <= MAX_HOST_LEN and bool(_HOST_RE.match(text))


def node_key(site_key: str, host: str) -> str:
    """The key of one node (its digest password), derived from the service's site key and the host name.

    Only the service (which holds the site key) and root on that node
    (which holds the result, like a host key) know it.
    """
    message = b"workspace-pilot node key v1\0" + host.encode()
    return hmac.new(site_key.encode(), message, hashlib.sha256).hexdigest()


def slot_key(node_key_hex: str, slot: str, slot_secret: str) -> str:
    """The key that signs one (slot, host)'s notification bodies and command answers.

    It needs both the node's key (only that node has it) and the slot's
    secret (only the nodes the slot's job runs on get it): another node of
    the same slot cannot forge it, and neither can a node outside the slot.
    """
    message = b"workspace-pilot slot key v1\0" + slot.encode() + b"\0" + slot_secret.encode()
    return hmac.new(node_key_hex.encode(), message, hashlib.sha256).hexdigest()


def sign(key_ha1: str, body: bytes) -> str:
    """The ``X-Pilot-Signature`` header value for ``body``, keyed by the SHA-256 HA1."""
    mac = hmac.new(key_ha1.encode("ascii"), body, hashlib.sha256).hexdigest()
    return SIGNATURE_PREFIX + mac


def signature_matches(key_ha1: str, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is the right signature of ``body``; compares in constant time."""
    if not header:
        return False
    return hmac.compare_digest(sign(key_ha1, body).encode(), header.strip().encode())
