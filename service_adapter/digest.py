"""HTTP Digest verification (RFC 7616) for the service's pilot endpoints.

Written here rather than taken from a library: none of the server-side
digest libraries we looked at supports SHA-256 together with nonce-count
tracking and stateless expiring nonces.

What it promises:

* SHA-256 with ``qop=auth``; MD5 only when the verifier is built with
  ``allow_md5=True``; ``-sess`` variants and ``userhash`` are refused.
* Nonces are stateless: ``base64url(issued_at | random | HMAC(server key))``,
  so issuing one stores nothing. A nonce older than ``nonce_lifetime``
  that is otherwise answered correctly gets ``stale=true`` in the new
  challenge, so clients re-authenticate without asking for the password.
* For each live nonce the nonce count must strictly increase; a repeated or
  smaller ``nc`` is a replay and is refused.
* Only HA1 values are kept (never a password), and every comparison of a
  secret-derived value is constant-time.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import os
import re
import struct
import threading
import time

from workspace_common.protocol import digest_ha1
from workspace_common.protocol.digest import HASHES as _HASHES, parse_params, response_digest

__all__ = ["Account", "DigestResult", "DigestVerifier", "parse_params", "response_digest"]

_NONCE_RAW_LEN = 8 + 8 + 16


@dataclasses.dataclass(frozen=True)
class Account:
    """A digest account as the service keeps it: the user name and HA1 values only.

    ``ha1_sha256`` is also the key of the body signature. ``ha1_md5`` is
    needed only where MD5 is allowed.
    """

    user: str
    ha1_sha256: str
    ha1_md5: str | None = None

    @classmethod
    def from_secret(cls, user: str, realm: str, secret: str, *, md5: bool = False) -> "Account":
        """Derive the HA1 values from a secret (which is then not kept)."""
        return cls(
            user,
            digest_ha1(user, realm, secret, "SHA-256"),
            digest_ha1(user, realm, secret, "MD5") if md5 else None,
        )

    def ha1(self, algorithm: str) -> str | None:
        """The HA1 for ``algorithm`` ("SHA-256" or "MD5"), or None if not kept."""
        return self.ha1_sha256 if algorithm == "SHA-256" else self.ha1_md5


@dataclasses.dataclass(frozen=True)
class DigestResult:
    """The outcome of verifying one ``Authorization`` header.

    ``account`` is set only when the request is authenticated. ``stale`` is
    true when the credentials were right but the nonce had expired; the
    caller answers 401 with a fresh challenge that says ``stale=true``.
    ``reason`` says, for logs only, why a request was refused.
    """

    account: Account | None
    stale: bool = False
    reason: str = ""

    @property
    def ok(self) -> bool:
        """Whether the request is authenticated."""
        return self.account is not None


class DigestVerifier:
    """Issues digest challenges and verifies ``Authorization: Digest`` headers.

    Thread-safe. The server key is random per instance unless given, so a
    restarted service makes old nonces invalid and clients simply re-challenge.
    """

    def __init__(
        self,
        realm: str,
        accounts,
        *,
        nonce_lifetime: float = 300.0,
        allow_md5: bool = False,
        server_key: bytes | None = None,
        clock=time.time,
    ):
        if not realm or '"' in realm or "\\" in realm:
            raise ValueError("realm must be non-empty and free of quotes and backslashes")
        self.realm = realm
        # A dict, or any mapping-like object with get(user) (NodeAccounts derives accounts on demand).
        self.accounts = dict(accounts) if isinstance(accounts, dict) else accounts
        self.nonce_lifetime = nonce_lifetime
        self.allow_md5 = allow_md5
        self._key = server_key or os.urandom(32)
        self._clock = clock
        self._lock = threading.Lock()
        self._last_nc: dict[str, tuple[int, float]] = {}
        self._next_prune = clock() + nonce_lifetime

    # -- challenges ---------------------------------------------------------

    def new_nonce(self) -> str:
        """A fresh stateless nonce."""
        head = struct.pack(">d", self._clock()) + os.urandom(8)
        mac = hmac.new(self._key, head, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(head + mac).decode().rstrip("=")

    def challenges(self, stale: bool = False) -> list[str]:
        """``WWW-Authenticate`` values, strongest first (SHA-256, then MD5 if allowed)."""
        algorithms = ["SHA-256"] + (["MD5"] if self.allow_md5 else [])
        suffix = ", stale=true" if stale else ""
        return [
            f'Digest realm="{self.realm}", qop="auth", algorithm={alg}, '
            f'nonce="{self.new_nonce()}"{suffix}'
            for alg in algorithms
        ]

    # -- verification -------------------------------------------------------

    def verify(self, method: str, uri: str, header: str | None) -> DigestResult:
        """Verify an ``Authorization`` header for a request of ``method`` to ``uri``.

        ``uri`` is the request target as received (path plus query). Every
        failure gives a result with ``account=None``.
        """
        if not header or not header[:7].lower() == "digest ":
            return DigestResult(None, reason="no digest credentials")
        params = parse_params(header[7:])
        if params is None:
            return DigestResult(None, reason="malformed Authorization header")
        required = ("username", "realm", "nonce", "uri", "response", "qop", "nc", "cnonce")
        missing = [name for name in required if name not in params]
        if missing:
            return DigestResult(None, reason=f"missing {', '.join(missing)}")
        algorithm = params.get("algorithm", "MD5")
        if algorithm not in _HASHES:
            return DigestResult(None, reason=f"algorithm {algorithm} not supported")
        if algorithm == "MD5" and not self.allow_md5:
            return DigestResult(None, reason="MD5 is not allowed")
        if params.get("userhash", "false").lower() != "false":
            return DigestResult(None, reason="userhash is not supported")
        if params["qop"] != "auth":
            return DigestResult(None, reason=f"qop {params['qop']} not supported")
        if not hmac.compare_digest(params["realm"].encode(), self.realm.encode()):
            return DigestResult(None, reason="wrong realm")
        if params["uri"] != uri:
            return DigestResult(None, reason="uri does not match the request")
        nc_text = params["nc"]
        if not re.fullmatch(r"[0-9a-fA-F]{8}", nc_text):
            return DigestResult(None, reason="malformed nc")
        # A (user, nonce) counted before carries its nonce's time, checked then: no base64 or HMAC on every
        # request of a pilot that keeps its nonce (a dict read is atomic; a prune replaces the dict whole).
        counted_as = f"{params['username']}\0{params['nonce']}"
        counted = self._last_nc.get(counted_as)
        issued_at = counted[1] if counted is not None else self._nonce_issued_at(params["nonce"])
        if issued_at is None:
            return DigestResult(None, reason="nonce not issued by this service")
        account = self.accounts.get(params["username"])
        ha1 = account.ha1(algorithm) if account else None
        if ha1 is None:
            # Do the same hashing work for unknown users as for known ones.
            ha1 = "0" * 64
        expected = response_digest(
            algorithm, ha1, params["nonce"], nc_text, params["cnonce"], method, params["uri"]
        )
        if not hmac.compare_digest(expected.encode(), params["response"].lower().encode()):
            return DigestResult(None, reason="wrong credentials")
        if account is None:
            return DigestResult(None, reason="unknown user")
        now = self._clock()
        if now - issued_at > self.nonce_lifetime:
            return DigestResult(None, stale=True, reason="nonce expired")
        # Counted per (user, nonce): another account that saw this nonce on the wire cannot
        # advance the count and make this client's next request look replayed.
        if not self._advance_nc(counted_as, int(nc_text, 16), issued_at, now):
            return DigestResult(None, reason="nonce count replayed")
        return DigestResult(account)

    def _nonce_issued_at(self, nonce: str) -> float | None:
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (ValueError, TypeError):
            return None
        if len(raw) != _NONCE_RAW_LEN:
            return None
        head, mac = raw[:16], raw[16:]
        if not hmac.compare_digest(mac, hmac.new(self._key, head, hashlib.sha256).digest()[:16]):
            return None
        (issued_at,) = struct.unpack(">d", head[:8])
        if issued_at > self._clock() + 1:
            return None
        return issued_at

    def _advance_nc(self, nonce: str, nc: int, issued_at: float, now: float) -> bool:
        with self._lock:
            if now >= self._next_prune:
                # Expired nonces are refused anyway, so their counts can go.
                cutoff = now - self.nonce_lifetime
                self._last_nc = {n: v for n, v in self._last_nc.items() if v[1] >= cutoff}
                self._next_prune = now + self.nonce_lifetime
            last = self._last_nc.get(nonce, (0, issued_at))[0]
            if nc <= last:
                return False
            self._last_nc[nonce] = (nc, issued_at)
            return True
