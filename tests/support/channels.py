"""The command channel as a pilot uses it: a poll thread against a test service, and how soon a poll must wake."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import requests
from requests.auth import HTTPDigestAuth

from service_adapter.commandboard import CommandBoard
from service_adapter.digest import DigestVerifier
from service_adapter.nodekeys import NodeAccounts, new_site_key
from service_adapter.receiver import ReceiverThread, make_app
from service_adapter.store import Store
from workspace_common.protocol import NOTIFICATIONS_PATH, SIGNATURE_HEADER, VmSpec, commands_path, sign, sign_commands

from tests.support.service import REALM, notification


SHA = "0123456789abcdef" * 4


class FakeClock:
    """The heartbeat clock, moved by hand."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def wait_until(predicate, what: str, timeout: float = 20.0) -> None:
    """Re-check ``predicate`` until it holds; fail the test (naming ``what``) if it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.01)


def vm_spec(name: str, memory_mb: int = 16) -> VmSpec:
    return VmSpec.from_dict({"name": name, "memory_mb": memory_mb,
                             "disk": {"path": f"/var/lib/workspace-pilot/images/{name}.qcow2", "sha256": SHA}})


class Channel:
    """The receiver (real aiohttp on a free loopback port), its SQLite store, a hand-clocked board, node accounts."""

    def __init__(self, root, store_path: str | None = None, site_key: str | None = None):
        """``store_path``: a SQLite file or PostgreSQL URL (default: a file in ``root``); ``site_key``: the site's
        key (default: a new one), the same for two receivers of one site."""
        self.site_key = site_key or new_site_key()
        self.nodes = NodeAccounts(self.site_key, REALM)
        self.verifier = DigestVerifier(REALM, self.nodes)
        self.store = Store(store_path or str(root / "service.sqlite"))
        self.clock = FakeClock()
        self.board = CommandBoard(clock=self.clock)
        self.receiver = ReceiverThread(make_app(self.store, self.verifier, board=self.board))
        self.url = self.receiver.start()
        self._seq: dict[tuple[str, str], int] = {}
        self._local = threading.local()

    def close(self) -> None:
        self.receiver.stop()
        self.store.close()

    def session(self, host: str = "node1", key: str | None = None) -> requests.Session:
        """A new session that authenticates as node ``host`` (with ``key`` instead of its own if given)."""
        session = requests.Session()
        session.auth = HTTPDigestAuth(host, key or self.nodes.node_key(host))
        return session

    def key(self, slot: str, host: str = "node1") -> str:
        """The key of (slot, host)'s bodies and command answers."""
        return self.nodes.slot_key(host, slot, self.store.slot_secret(slot))

    def _thread_session(self, host: str) -> requests.Session:
        sessions = getattr(self._local, "sessions", None)
        if sessions is None:
            sessions = self._local.sessions = {}
        if host not in sessions:
            sessions[host] = self.session(host)
        return sessions[host]

    # -- the pilots' notifications -------------------------------------------------------

    def notify(self, slot: str, host: str, state: str, status: int = 200, **fields) -> requests.Response:
        """One signed notification from (slot, host) with its next seq, over HTTP; expects ``status``."""
        seq = self._seq[(slot, host)] = self._seq.get((slot, host), 0) + 1
        body = notification(slot, seq, state, host, **fields).to_json()
        response = self._thread_session(host).post(
            self.url + NOTIFICATIONS_PATH, data=body, timeout=20,
            headers={SIGNATURE_HEADER: sign(self.key(slot, host), body)},
        )
        assert response.status_code == status, response.text
        return response

    # -- leases and commands, the service's way ----------------------------------------------

    def lease(self, hosts=("node1",), nodes: int | None = None, memory_mb: int = 1024,
              ready: bool = True) -> tuple[str, str]:
        """A lease whose ``hosts`` reported reserved (and, if ``ready``, moved to ready); (lease id, slot)."""
        lease_id, slot = "lease-" + uuid.uuid4().hex[:8], str(uuid.uuid4())
        self.store.create_lease(lease_id, slot, owner="alice", nodes=nodes or len(hosts), memory_mb=memory_mb,
                                duration_s=600, now=time.time())
        for host in hosts:
            self.notify(slot, host, "reserved", memory_mb=memory_mb)
        if ready:
            now = time.time()
            assert self.store.transition_lease(lease_id, "pending", "ready", "reserved", now=now, ready_at=now)
        return lease_id, slot

    def start(self, lease_id: str, name: str, host: str | None = None, memory_mb: int = 16) -> int:
        """Queue a start-vm (placed on ``host`` if given); returns the command's id."""
        self.store.start_vms(lease_id, [(vm_spec(name, memory_mb), host)], overhead_mb=0, now=time.time())
        slot = self.store.get_lease(lease_id).slot
        return [c.id for c in self.store.commands(slot) if c.op == "start-vm" and c.vm == name][-1]

    def stop(self, lease_id: str, name: str, force: bool = False) -> int:
        """Queue a stop-vm; returns the command's id."""
        vm = self.store.stop_vm(lease_id, name, force=force, now=time.time())
        return [c.id for c in self.store.commands(vm.slot_id) if c.op == "stop-vm" and c.vm == name][-1]

    # -- the pilots' polls --------------------------------------------------------------------

    def poll(self, slot: str, host: str, query: str = "after=0&wait=0", session: requests.Session | None = None,
             timeout: float = 90) -> requests.Response:
        """GET the command endpoint of (slot, host) with ``query``; the response's ``target`` is what was asked."""
        target = commands_path(slot, host) + (f"?{query}" if query else "")
        response = (session or self.session(host)).get(self.url + target, timeout=timeout)
        response.target, response.slot, response.host = target, slot, host
        return response

    def commands(self, response: requests.Response) -> list[dict]:
        """The commands of a 200 answer, after checking its signature against the target asked."""
        assert response.status_code == 200, response.text
        key = self.key(response.slot, response.host)
        assert response.headers[SIGNATURE_HEADER] == sign_commands(key, response.target, response.content)
        return response.json()["commands"]

    def wait_parked(self, slot: str, host: str) -> None:
        """Return once a poll of (slot, host) is open and its handler is waiting for a wake-up."""
        self.clock.now += 100.0  # anything not polling right now has been silent for a while
        wait_until(lambda: self.board.silent_for((slot, host)) == 0.0, f"a poll of {slot}/{host} to arrive")
        # One more request through the receiver's loop: it is served only once the poll's handler has yielded,
        # and that handler counts itself open, registers, reads and waits without yielding in between.
        assert requests.get(self.url + commands_path(slot, host), timeout=20).status_code == 401


#: How long a test waits for a woken 30 s poll. A poll that is not woken is answered only when its wait has
#: run out, and its re-read then finds the command all the same: so the test tells a wake from a timeout by
#: the poll ending well inside its own 30 s wait (a wake takes one commit and one loop turn).
WOKEN_WITHIN_S = 20.0


class PollThread(threading.Thread):
    """A long-poll made from its own thread (so the test can queue commands meanwhile)."""

    def __init__(self, channel: Channel, slot: str, host: str, query: str):
        super().__init__(name="test-poll", daemon=True)
        self.args_ = (channel, slot, host, query)
        self.response: requests.Response | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        channel, slot, host, query = self.args_
        try:
            self.response = channel.poll(slot, host, query)
        except BaseException as exc:  # reported by result()
            self.error = exc

    def result(self, timeout: float = 90) -> requests.Response:
        self.join(timeout)
        assert not self.is_alive(), f"the poll was not answered within {timeout} s"
        if self.error is not None:
            raise self.error
        return self.response


@pytest.fixture
def channel(tmp_path):
    service = Channel(tmp_path)
    yield service
    service.close()
