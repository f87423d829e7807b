"""The embedded default: a whole workspace site on one machine, for demos, tests and benchmarks.

A :class:`LocalSite` holds the store (SQLite on disk), the receiver on
127.0.0.1, a site key (kept in the workdir) and a key for each simulated node (made when the local
provider starts its pilot), a pilot configuration file for the local "nodes", the local provider and a
lease manager (its thread running).
Closing it stops the manager, every pilot (by pid) and the receiver.
"""

from __future__ import annotations

import json
import os
import secrets

from workspace_common.protocol import is_key
from service_adapter.allocation import Allocations
from service_adapter.commandboard import CommandBoard
from service_adapter.digest import Account, DigestVerifier
from service_adapter.lease import LeaseManager
from service_adapter.nodekeys import NodeAccounts, new_site_key, provision_node_key
from service_adapter.providers.local import LocalProvider
from service_adapter.receiver import ReceiverThread, make_app
from service_adapter.store import Store
from service_adapter.vms import VmManager

REALM = "workspace-pilot"
OPERATOR_REALM = "workspace-operators"
OPERATOR_USER = "operator"
SITE_FILE = "site.json"


def write_pilot_config(
    path: str, *, contact: str, node_key_file: str, log_dir: str,
    journal_dir: str = "/var/lib/workspace-pilot", reserved_timeout_s: float = 30.0,
    request_timeout_s: float = 5.0, sections: dict[str, dict[str, object]] | None = None,
) -> None:
    """Write a pilot configuration file readable by its owner only.

    ``node_key_file`` may hold ``{host}`` (one key file per simulated node).
    ``sections`` adds options, e.g. ``{"memory": {"backend": "cgroup", "cgroup": "/sys/..."}}``.
    """
    options: dict[str, dict[str, object]] = {
        "service": {
            "contact": contact, "node_key_file": node_key_file,
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
    """Store, receiver, account, pilot config, local provider and a running lease manager under ``workdir``.

    ``contact`` may point the pilots elsewhere than the receiver (tests use
    it to simulate a service that is down). ``queue_timeout_s``,
    ``release_grace_s`` and ``status_interval_s`` go to the
    :class:`LeaseManager`; ``network_plan`` (a
    :class:`~service_adapter.networks.NetworkPlan`) gives the VMs addresses;
    ``images=True`` gives it an image catalogue (``catalog``: endorser keys in
    ``workdir/endorsers``, approved images in ``workdir/image-store``) and the
    pilots' image endpoint;
    ``start_manager=False`` leaves its thread
    stopped (the caller ticks, or waits with :meth:`LeaseManager.wait`,
    which ticks for it).

    The site key and the receiver's port are kept in ``workdir``
    (``site.json``, mode 0600), the nodes' keys in ``workdir/node-keys``
    (written when the local provider starts a pilot on a node): a new LocalSite over the same
    workdir is the same service restarted, and the pilots still running
    from before keep reporting to it. ``close(stop_pilots=False)`` is the
    service going away while its pilots go on.
    """

    def __init__(
        self, workdir: str, *, grace_s: float = 10.0, reserved_timeout_s: float = 30.0,
        journal_dir: str = "/var/lib/workspace-pilot", contact: str | None = None, max_skew_s: float = 300.0,
        queue_timeout_s: float = 300.0, release_grace_s: float = 30.0, status_interval_s: float = 0.5,
        start_manager: bool = True, lost_after_s: float | None = 120.0, vm_overhead_mb: int = 64,
        pilot_sections: dict[str, dict[str, object]] | None = None, provider=None,
        listen_host: str = "127.0.0.1", operator_api: bool = False, warn_before_s: float = 0.0,
        network_plan=None, images: bool = False,
    ):
        os.makedirs(workdir, mode=0o700, exist_ok=True)
        self.workdir = workdir
        saved = _load_site(workdir)
        site_key = saved.get("site_key") if is_key(saved.get("site_key")) else new_site_key()
        self.nodes = NodeAccounts(site_key, REALM)
        self.verifier = DigestVerifier(REALM, self.nodes)
        self.node_key_dir = os.path.join(workdir, "node-keys")
        self.store = Store(os.path.join(workdir, "service.sqlite"))
        self.board = CommandBoard()
        self.log_dir = os.path.join(workdir, "logs")
        self.provider = provider if provider is not None else LocalProvider(self.log_dir)
        # A simulated node gets its key the way a real one would from its admin: before its first pilot.
        self.provider.prepare_node = lambda host: provision_node_key(self.node_key_dir, site_key, host)
        self.pilot_config = os.path.join(workdir, "pilot.conf")
        self.operator_secret = saved.get("operator_secret") or secrets.token_urlsafe(24)
        app = make_app(self.store, self.verifier, max_skew_s, board=self.board,
                       allocations=Allocations(self.provider))
        # The manager is built before the receiver starts (the API needs it); its contact is set once the
        # port is known, before its thread or any reserve can use it.
        self.leases = LeaseManager(
            self.store, self.provider, contact=contact or "http://unset.invalid", pilot_config=self.pilot_config,
            grace_s=grace_s, queue_timeout_s=queue_timeout_s, release_grace_s=release_grace_s,
            status_interval_s=status_interval_s, board=self.board, lost_after_s=lost_after_s,
            warn_before_s=warn_before_s,
        )
        self.catalog = None
        if images:
            from service_adapter.images.catalog import ImageCatalog
            from service_adapter.images.routes import add_image_routes

            self.catalog = ImageCatalog(self.store, keys_dir=os.path.join(workdir, "endorsers"),
                                        store_dir=os.path.join(workdir, "image-store"))
            add_image_routes(app, self.catalog, operators=False)  # the pilots' image fetch
        self.vms = VmManager(self.store, overhead_mb=vm_overhead_mb, network_plan=network_plan, catalog=self.catalog)
        if operator_api:
            from service_adapter.api import add_api

            operators = {OPERATOR_USER: Account.from_secret(OPERATOR_USER, OPERATOR_REALM, self.operator_secret)}
            add_api(app, self.leases, DigestVerifier(OPERATOR_REALM, operators), self.vms)
        try:
            self.receiver = ReceiverThread(app, host=listen_host, port=int(saved.get("port", 0)))
            self.url = self.receiver.start()
        except BaseException:
            self.store.close()
            raise
        _save_site(workdir, {"site_key": site_key, "port": self.receiver.port, "operator_secret": self.operator_secret})
        self.contact = contact or self.url
        self.leases.contact = self.contact
        # "{host}": each simulated node's pilot reads its own key file.
        write_pilot_config(
            self.pilot_config, contact=self.contact,
            node_key_file=os.path.join(self.node_key_dir, "{host}.key"), log_dir=self.log_dir,
            journal_dir=journal_dir, reserved_timeout_s=reserved_timeout_s,
            sections=pilot_sections,
        )
        if start_manager:
            self.leases.start()

    def close(self, stop_pilots: bool = True) -> None:
        """Stop the lease manager, every pilot still running (they restore their nodes; unless
        ``stop_pilots`` is False), then the receiver and store."""
        try:
            self.leases.stop()
            if stop_pilots:
                self.provider.close()
        finally:
            self.receiver.stop()
            self.store.close()

    def __enter__(self) -> "LocalSite":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _load_site(workdir: str) -> dict:
    try:
        with open(os.path.join(workdir, SITE_FILE), encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return {}


def _save_site(workdir: str, values: dict) -> None:
    path = os.path.join(workdir, SITE_FILE)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(values, handle)
    os.replace(path + ".tmp", path)
