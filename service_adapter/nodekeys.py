"""The pilots' credentials as the service sees them: one digest account per node, one signing key per (slot, host).

The service keeps one secret, the *site key*. Every node's key (its digest
password, installed on the node like a host key) is derived from it and
the host name (:func:`workspace_common.protocol.node_key`), so the service needs no
list of nodes: an account exists for every valid host name, and only the
node holding that host's key can use it. The digest user name *is* the
host name; the receiver accepts a notification or a command poll only for
the host the request authenticated as.

A slot's secret (random, kept in the store, handed to the slot's job in its
environment) combines with the node key into the key that signs that
(slot, host)'s bodies and command answers (:func:`workspace_common.protocol.slot_key`).
"""

from __future__ import annotations

import functools
import os
import secrets

from workspace_common.protocol import digest_ha1, is_host, is_key, node_key, slot_key

__all__ = ["NodeAccounts", "SiteKeyError", "new_site_key", "new_slot_secret", "provision_node_key", "write_key_file"]
from service_adapter.digest import Account


class SiteKeyError(ValueError):
    """A site key that cannot be used; the message is one line saying what to do."""


def new_site_key() -> str:
    """A fresh site key: 64 hex digits from the OS's random source."""
    return secrets.token_hex(32)


def new_slot_secret() -> str:
    """A fresh slot secret: 64 hex digits from the OS's random source."""
    return secrets.token_hex(32)


def write_key_file(path: str, key: str) -> None:
    """Create ``path`` (mode 0600, never replacing a file) holding ``key``; OSError as raised."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(key + "\n")


#: Node accounts kept derived (about 300 bytes each): more than a site has nodes.
ACCOUNT_CACHE_SIZE = 32_768


class NodeAccounts:
    """Every node's digest account, derived on demand from the site key (a mapping with ``get``).

    ``get(user)`` gives the account of host ``user`` (None for a name that
    is not a valid host name); the digest verifier then checks that the
    request was made with that host's key.
    """

    def __init__(self, site_key: str, realm: str, *, md5: bool = False):
        if not is_key(site_key):
            raise SiteKeyError("a site key is 64 lowercase hex digits")
        self._site_key = site_key
        self.realm = realm
        self.md5 = md5
        # Bounded: an attacker's made-up user names can only churn the cache, not grow it. Large enough for
        # every node of a big site (at 4,096, 10,000 polling nodes derived their account on every request).
        self._account = functools.lru_cache(maxsize=ACCOUNT_CACHE_SIZE)(self._derive)
        # Every command answer is signed with a key made from the node's and the slot's: two HMACs saved per
        # answer (a twentieth of a parked poll's renewal). Reached only once the request authenticated as the host
        # and its slot was found, so only real (slot, host) pairs fill it.
        self._node_key = functools.lru_cache(maxsize=ACCOUNT_CACHE_SIZE)(functools.partial(node_key, site_key))
        self._slot_key = functools.lru_cache(maxsize=ACCOUNT_CACHE_SIZE)(self._derive_slot_key)

    def get(self, user: str, default=None) -> Account | None:
        """The account of host ``user``, or ``default`` when it is not a valid host name."""
        if not is_host(user):
            return default
        return self._account(user)

    def node_key(self, host: str) -> str:
        """Host ``host``'s key, as installed on the node."""
        return self._node_key(host)

    def slot_key(self, host: str, slot: str, slot_secret: str) -> str:
        """The key that signs (slot, host)'s notification bodies and command answers."""
        return self._slot_key(host, slot, slot_secret)

    def _derive_slot_key(self, host: str, slot: str, slot_secret: str) -> str:
        return slot_key(self.node_key(host), slot, slot_secret)

    def _derive(self, host: str) -> Account:
        key = self.node_key(host)
        return Account(
            host,
            digest_ha1(host, self.realm, key, "SHA-256"),
            digest_ha1(host, self.realm, key, "MD5") if self.md5 else None,
        )


def provision_node_key(directory: str, site_key: str, host: str) -> str:
    """Write ``host``'s key as ``directory/<host>.key`` (0600) if it is not there; returns the path.

    For simulated nodes (the local provider) and test clusters whose nodes
    share one file system: their pilot config names ``directory/{host}.key``.
    """
    if not is_host(host):
        raise ValueError(f"{host!r} is not a host name")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, f"{host}.key")
    try:
        write_key_file(path, node_key(site_key, host))
    except FileExistsError:
        pass
    return path
