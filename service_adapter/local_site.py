"""The embedded default: a whole workspace site on one machine, for demos, tests and benchmarks.

A :class:`LocalSite` holds the store (SQLite on disk), the receiver on
127.0.0.1, a fresh pilot account, a pilot configuration file for the local
"nodes", the local provider and a lease manager. Closing it stops every
pilot (by pid) and the receiver.
"""

from __future__ import annotations

import os
import secrets

from service_adapter.digest import Account, DigestVerifier
from service_adapter.lease import LeaseManager
from service_adapter.providers.local import LocalProvider
from service_adapter.receiver import ReceiverThread, make_app
from service_adapter.store import Store

REALM = "workspace-pilot"
PILOT_USER = "pilot"


def write_pilot_config(
    path: str, *, contact: str, user: str, secret: str, realm: str, log_dir: str,
    journal_dir: str = "/var/lib/workspace-pilot", reserved_timeout_s: float = 30.0,
    request_timeout_s: float = 5.0, sections: dict[str, dict[str, object]] | None = None,
) -> None:
    """Write a pilot configuration file readable by its owner only (it holds the secret).

    ``sections`` adds options, e.g. ``{"memory": {"backend": "cgroup", "cgroup": "/sys/..."}}``.
    """
    options: dict[str, dict[str, object]] = {
        "service": {
            "contact": contact, "user": user, "secret": secret, "realm": realm,
            "request_timeout": f"{request_timeout_s:g}", "reserved_timeout": f"{reserved_timeout_s:g}",
        },
        "journal": {"dir": journal_dir},
        "logging": {"dir": log_dir},
    }
    for section, values in (sections or {}).items():
        options.setdefault(section, {}).update(values)
    text = "\n".join(
        f"[{section}]\n" + "".join(f"{key} = {value}\n" for key, value in values.items())
        for section, values in options.items()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


class LocalSite:
    """Store, receiver, account, pilot config, local provider and lease manager under ``workdir``.

    ``contact`` may point the pilots elsewhere than the receiver (tests use
    it to simulate a service that is down).
    """

    def __init__(
        self, workdir: str, *, grace_s: float = 10.0, reserved_timeout_s: float = 30.0,
        journal_dir: str = "/var/lib/workspace-pilot", contact: str | None = None, max_skew_s: float = 300.0,
    ):
        os.makedirs(workdir, mode=0o700, exist_ok=True)
        self.workdir = workdir
        secret = secrets.token_urlsafe(24)
        self.account = Account.from_secret(PILOT_USER, REALM, secret)
        self.verifier = DigestVerifier(REALM, {PILOT_USER: self.account})
        self.store = Store(os.path.join(workdir, "service.sqlite"))
        self.receiver = ReceiverThread(make_app(self.store, self.verifier, max_skew_s))
        self.url = self.receiver.start()
        self.contact = contact or self.url
        self.pilot_config = os.path.join(workdir, "pilot.conf")
        self.log_dir = os.path.join(workdir, "logs")
        write_pilot_config(
            self.pilot_config, contact=self.contact, user=PILOT_USER, secret=secret, realm=REALM,
            log_dir=self.log_dir, journal_dir=journal_dir, reserved_timeout_s=reserved_timeout_s,
        )
        self.provider = LocalProvider(self.log_dir)
        self.leases = LeaseManager(self.store, self.provider, self.contact, self.pilot_config, grace_s)

    def close(self) -> None:
        """Stop every pilot still running (they restore their nodes), then the receiver and store."""
        try:
            self.provider.close()
        finally:
            self.receiver.stop()
            self.store.close()

    def __enter__(self) -> "LocalSite":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
