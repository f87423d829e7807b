"""A lease service for VM tests: a real receiver and operators' API on 127.0.0.1 over a real store, a batch-system stand-in, VM specs and the answers' checks."""

from __future__ import annotations

import os
import subprocess

import pytest
import requests
from requests.auth import HTTPDigestAuth

from service_adapter.api import add_api
from service_adapter.commandboard import CommandBoard
from service_adapter.digest import Account, DigestVerifier
from service_adapter.images.catalog import ImageCatalog
from service_adapter.images.routes import add_image_routes
from service_adapter.lease import LeaseManager
from service_adapter.loginthrottle import LoginThrottle
from service_adapter.nodekeys import NodeAccounts, new_site_key
from service_adapter.providers.base import JobState, Provider
from service_adapter.receiver import ReceiverThread, make_app
from service_adapter.store import Store
from service_adapter.vms import VmManager
from workspace_common.protocol import NOTIFICATIONS_PATH, SIGNATURE_HEADER, sign

from tests.support.service import notification
from tests.support.site import (  # noqa: F401 (the tests' too)
    CLI, OPERATOR, OPERATOR_REALM, OPERATOR_SECRET, PILOT_REALM,
)


OTHER_OPERATOR, OTHER_SECRET = "bob", "bob-secret-45678"
OVERHEAD_MB = 64
SHA = "0123456789abcdef" * 4


class BatchSystemStandIn(Provider):
    """Stand-in for the LRM: every submitted job runs at once and until cancelled (no pilot is started)."""

    name = "stand-in"

    def __init__(self):
        self.submitted, self.cancelled = [], set()

    def submit(self, job):
        self.submitted.append(job)
        return f"job-{len(self.submitted)}"

    def cancel(self, job_id, force=False):
        self.cancelled.add(job_id)

    def status(self, job_ids):
        return {j: JobState.CANCELLED if j in self.cancelled else JobState.RUNNING for j in job_ids}

    def allocated_hosts(self, job_id):
        return None  # never asked: this service's receiver has no allocation check


class VmService:
    """The service's app on a free loopback port, with its store, lease manager and VM manager."""

    def __init__(self, root, *, images: bool = False, network_plan=None, store_location: str | None = None):
        self.root = root
        self.nodes = NodeAccounts(new_site_key(), PILOT_REALM)
        pilots = DigestVerifier(PILOT_REALM, self.nodes)
        operators = DigestVerifier(OPERATOR_REALM, {
            user: Account.from_secret(user, OPERATOR_REALM, secret)
            for user, secret in ((OPERATOR, OPERATOR_SECRET), (OTHER_OPERATOR, OTHER_SECRET))})
        self.store = Store(store_location or str(root / "service.sqlite"))
        board = CommandBoard()
        self.provider = BatchSystemStandIn()
        self.manager = LeaseManager(
            self.store, self.provider, contact="http://127.0.0.1:9", pilot_config="/nonexistent/pilot.conf",
            status_interval_s=0.1, board=board, lost_after_s=3600,
        )
        app = make_app(self.store, pilots, board=board)
        # images: the site's image catalogue, trusting the keys in <root>/endorsers, storing in <root>/image-store.
        self.catalog = ImageCatalog(self.store, keys_dir=str(root / "endorsers"),
                                    store_dir=str(root / "image-store")) if images else None
        # Wrong credentials by the dozen, from one address: these tests are about the routes, not the throttle.
        self.vms = VmManager(self.store, overhead_mb=OVERHEAD_MB, catalog=self.catalog, network_plan=network_plan)
        add_api(app, self.manager, operators, vms=self.vms, throttle=LoginThrottle(burst=10**6))
        if images:
            add_image_routes(app, self.catalog)
        self.receiver = ReceiverThread(app)
        self.url = self.receiver.start()
        self.seq: dict[tuple[str, str], int] = {}
        self._pilot_sessions: dict[str, requests.Session] = {}

    def pilot_session(self, host: str = "node1") -> requests.Session:
        """The session of node ``host`` (digest with its own key), one per host."""
        if host not in self._pilot_sessions:
            session = self._pilot_sessions[host] = requests.Session()
            session.auth = HTTPDigestAuth(host, self.nodes.node_key(host))
        return self._pilot_sessions[host]

    def sign_key(self, slot: str, host: str = "node1") -> str:
        """The key of (slot, host)'s bodies and command answers."""
        return self.nodes.slot_key(host, slot, self.store.slot_secret(slot))

    def close(self) -> None:
        for session in self._pilot_sessions.values():
            session.close()
        self.receiver.stop()
        self.store.close()

    # -- the operators' side ----------------------------------------------------------------

    def api(self, method: str, path: str, user: str = OPERATOR, secret: str = OPERATOR_SECRET, **kwargs):
        return requests.request(method, f"{self.url}/api/v1{path}", auth=HTTPDigestAuth(user, secret), timeout=20,
                                **kwargs)

    def start(self, lease_id: str, *specs: dict, **kwargs):
        return self.api("POST", f"/leases/{lease_id}/vms", json={"vms": list(specs)}, **kwargs)

    # -- the pilots' side -------------------------------------------------------------------

    def notify(self, slot: str, host: str, state: str, **fields) -> None:
        """One signed notification from (slot, host), over HTTP, with the next seq; it must be accepted."""
        seq = self.seq[(slot, host)] = self.seq.get((slot, host), 0) + 1
        body = notification(slot, seq, state, host, **fields).to_json()
        response = self.pilot_session(host).post(
            self.url + NOTIFICATIONS_PATH, data=body, timeout=10,
            headers={SIGNATURE_HEADER: sign(self.sign_key(slot, host), body)},
        )
        assert response.status_code == 200, response.text

    def ready_lease(self, hosts=("node1",), memory_mb: int = 1024, addresses=None) -> tuple[str, str]:
        """A lease reserved through the API whose hosts all reported reserved (with ``addresses[host]``, when
        given, as the node's address); (lease id, slot)."""
        made = self.api("POST", "/leases", json={"nodes": len(hosts), "memory_mb": memory_mb, "duration_s": 600})
        assert made.status_code == 201, made.text
        lease_id, slot = made.json()["id"], made.json()["slot"]
        for host in hosts:
            extra = {"address": addresses[host]} if addresses and host in addresses else {}
            self.notify(slot, host, "reserved", memory_mb=memory_mb, **extra)
        self.manager.tick()
        assert self.api("GET", f"/leases/{lease_id}").json()["state"] == "ready"
        return lease_id, slot

    def commands(self, slot: str) -> list[tuple[str, str, dict]]:
        """(host, op, body) of every command queued for the slot, oldest first."""
        return [(c.host, c.op, c.body) for c in self.store.commands(slot)]


@pytest.fixture
def svc(tmp_path):
    service = VmService(tmp_path)
    yield service
    service.close()


def spec(name: str = "vm1", memory_mb: int = 256, **extra) -> dict:
    return {"name": name, "memory_mb": memory_mb,
            "disk": {"path": "/var/lib/workspace-pilot/images/guest.qcow2", "sha256": SHA}, **extra}


def one_line_error(response) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    assert "\n" not in body["error"]
    return body["error"]


@pytest.fixture
def cli(svc, tmp_path):
    """Run ``workspace-lease ARGS`` as a real process with a config whose [client] points at ``svc``."""
    secret_file = tmp_path / "alice.secret"
    secret_file.write_text(OPERATOR_SECRET + "\n")
    os.chmod(secret_file, 0o600)
    config = tmp_path / "client.conf"
    config.write_text(f"[client]\nurl = {svc.url}\nuser = {OPERATOR}\nsecret_file = {secret_file}\ntimeout = 20\n")

    def run(*args: str, stdin: str | None = None, background: bool = False):
        argv = [*CLI, *args, "--config", str(config)]
        env = dict(os.environ)
        env.pop("WORKSPACE_LEASE_SECRET_FILE", None)
        if background:
            return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, input=stdin)

    return run


def single_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]
