"""A real receiver for tests (aiohttp on 127.0.0.1, SQLite on disk, node accounts), and what tests give it."""

from __future__ import annotations

import json
import os
import time
import uuid

import requests
from requests.auth import HTTPDigestAuth

from pilot.credentials import HOST_PLACEHOLDER
from service_adapter.digest import DigestVerifier
from service_adapter.nodekeys import NodeAccounts, new_site_key, provision_node_key
from service_adapter.receiver import ReceiverThread, make_app
from service_adapter.store import Store
from workspace_common.protocol import SIGNATURE_HEADER, Notification, format_time, sign, utc_now

REALM = "workspace-pilot"
#: Every slot secret a test Service handed out, so that start_pilot can put it in the pilot's environment
#: as the slot's job would.
SLOT_SECRETS: dict[str, str] = {}
#: The simulated nodes a test Service provisions keys for.
TEST_HOSTS = tuple(f"node{i}" for i in range(1, 9))


def add_lease(store: Store, lease_id: str, nodes: int, memory_mb: int, duration_s: float, *,
              owner: str = "operator") -> None:
    """A lease without a slot (state ``pending``), as tests need: slots come with :func:`add_slot`."""
    from service_adapter.store import leases

    now = time.time()
    store.submit(lambda conn: leases.insert_lease(conn, lease_id, owner, nodes, memory_mb, duration_s, now, "",
                                                  None)).result()



def add_slot(store: Store, slot_id: str, lease_id: str, nodes: int, memory_mb: int) -> str:
    """One more slot of a test lease (several per lease, unlike the service's leases); returns its secret."""
    from service_adapter.store import leases

    def write(conn) -> str:
        secret = leases.insert_slot(conn, slot_id, lease_id, nodes, memory_mb, time.time())
        conn.execute("UPDATE leases SET slot = COALESCE(slot, ?) WHERE id = ?", (slot_id, lease_id))
        return secret

    return store.submit(write).result()



class Service:
    """A real receiver (aiohttp on 127.0.0.1) with a real SQLite store and node accounts from a site key.

    Keys for node1..node4 are written to ``<workdir>/node-keys/<host>.key``
    (:meth:`node_key_file` is the pilot config's template for them). There
    is no batch system behind it: any host within a slot's node count may
    report (the allocation check is tested with real providers).
    """

    def __init__(self, workdir: str, *, verifier_options=None, max_skew_s: float = 300.0, store_options=None,
                 allocations=None, store_location: str | None = None):
        """``allocations``: the receiver's allocation check (an ``Allocations`` over a real provider); none
        by default. ``store_location``: a SQLite file or a PostgreSQL URL (default: a file in ``workdir``)."""
        self.site_key = new_site_key()
        self.nodes = NodeAccounts(self.site_key, REALM, md5=True)
        self.verifier = DigestVerifier(REALM, self.nodes, **(verifier_options or {}))
        self.key_dir = os.path.join(workdir, "node-keys")
        for host in TEST_HOSTS:
            provision_node_key(self.key_dir, self.site_key, host)
        self.slot_secrets: dict[str, str] = {}
        self.store = Store(store_location or os.path.join(workdir, "service.sqlite"), **(store_options or {}))
        self.receiver = ReceiverThread(make_app(self.store, self.verifier, max_skew_s, allocations=allocations))
        self.url = self.receiver.start()
        self.notifications_url = self.url + "/pilot/v2/notifications"
        self.lease = "lease-" + uuid.uuid4().hex[:8]
        add_lease(self.store, self.lease, 4, 64, 60)

    def add_slot(self, nodes: int = 1, memory_mb: int = 64) -> str:
        """A new slot the service knows about (its secret in :attr:`slot_secrets` and :data:`SLOT_SECRETS`)."""
        slot = str(uuid.uuid4())
        secret = add_slot(self.store, slot, self.lease, nodes, memory_mb)
        self.slot_secrets[slot] = SLOT_SECRETS[slot] = secret
        return slot

    def node_key(self, host: str = "node1") -> str:
        """``host``'s node key (its digest password)."""
        return self.nodes.node_key(host)

    def node_key_file(self) -> str:
        """The pilot config's ``node_key_file``: one file per test host."""
        return os.path.join(self.key_dir, f"{HOST_PLACEHOLDER}.key")

    def sign_key(self, slot: str, host: str = "node1") -> str:
        """The key of (slot, host)'s bodies and command answers."""
        return self.nodes.slot_key(host, slot, self.slot_secrets[slot])

    def queue_command(self, slot: str, host: str, body: dict) -> None:
        """Queue one command (``{"op": ...}``) for (slot, host) and wake its parked poll, as the service does
        (waits for the write)."""
        from service_adapter.store import commands as commandstore

        now = time.time()
        self.store.submit(
            lambda conn: commandstore.queue_command(conn, slot, host, body, now, self.store._wake_target)
        ).result()

    def send_release(self, slot: str, host: str) -> None:
        """Queue the service's ``release`` command for one pilot, as a lease's release does (waits for the write)."""
        self.queue_command(slot, host, {"op": "release"})

    def session(self, host: str = "node1", key: str | None = None) -> requests.Session:
        """A requests session with digest auth as node ``host`` (with its key unless ``key`` is given)."""
        session = requests.Session()
        session.auth = HTTPDigestAuth(host, key or self.node_key(host))
        return session

    def post(self, session: requests.Session, body: bytes, signature: str | None = None) -> requests.Response:
        """POST a raw body, signed with its (slot, host)'s key unless ``signature`` is given.

        A body that names no slot this service handed out is signed with a key of no one's.
        """
        if signature is None:
            try:
                named = json.loads(body)
                key = self.sign_key(named["slot"], named["host"])
            except (ValueError, TypeError, KeyError):
                key = "0" * 64
            signature = sign(key, body)
        return session.post(self.notifications_url, data=body, headers={SIGNATURE_HEADER: signature}, timeout=10)

    def close(self) -> None:
        self.receiver.stop()
        self.store.close()



def notification(slot: str, seq: int = 1, state: str = "reserved", host: str = "node1", **fields) -> Notification:
    """A valid notification sent now."""
    fields.setdefault("sent_at", format_time(utc_now()))
    fields.setdefault("memory_mb", 64)
    return Notification(slot=slot, host=host, state=state, seq=seq, **fields)



def throwaway_node_keys(tmp_path) -> str:
    """Keys for node1..node4 from a site key no service has (for pilots that talk to no real service);
    returns the config's node_key_file template."""
    directory = str(tmp_path / "throwaway-node-keys")  # not a Service's node-keys: those are real
    site_key = new_site_key()
    for host in TEST_HOSTS:
        provision_node_key(directory, site_key, host)
    return os.path.join(directory, f"{HOST_PLACEHOLDER}.key")
