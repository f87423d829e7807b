"""A whole service as its operators meet it, for tests and benchmarks: ``workspace-lease serve`` with a real config, operators' accounts, and its CLI."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests
from requests.auth import HTTPDigestAuth

from service_adapter.local_site import write_pilot_config
from service_adapter.nodekeys import NodeAccounts, new_site_key, provision_node_key
from service_adapter.store.postgres import shown as store_shown

from tests.support.pilots import read_until
from tests.support.ports import free_port


OPERATOR, OPERATOR_SECRET = "alice", "alice-secret-0123"
PILOT_REALM, OPERATOR_REALM = "workspace-pilot", "workspace-lease"
CLI = [sys.executable, "-m", "service_adapter"]


def private(path, text: str) -> str:
    path.write_text(text)
    os.chmod(path, 0o600)
    return str(path)


class Site:
    """The files of one service under ``root``: config, secrets, accounts, the pilots' config."""

    def __init__(self, root, *, tls: "Tls | None" = None, provider: dict | None = None, nodes: tuple[str, ...] = (),
                 pilot_sections: dict | None = None, store: str | None = None, **service_options):
        """``service_options``: more ``[service]`` options (e.g. ``request_timeout=2``); ``store``: a PostgreSQL
        URL (else a SQLite file in ``root``); ``tls``: serve https
        with its certificate, and give pilots and operators its CA. ``provider``: the ``[provider]`` options
        (else the local provider's), with ``nodes`` the batch system's nodes, each given its key here;
        ``pilot_sections``: more sections of the pilots' config."""
        self.root = root
        self.port = free_port()
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        if tls:
            service_options = dict(service_options, tls_cert_file=tls.cert, tls_key_file=tls.key)
        self.journal_dir = root / "journal"
        self.store = store or root / "service.sqlite"
        #: The store as serve names it (a URL without its password).
        self.store_shown = store_shown(str(self.store))
        self.log_file = root / "service.log"
        self.site_key = new_site_key()
        site_key_file = private(root / "site.key", self.site_key + "\n")
        self.nodes = NodeAccounts(self.site_key, PILOT_REALM)
        ha1 = hashlib.sha256(f"{OPERATOR}:{OPERATOR_REALM}:{OPERATOR_SECRET}".encode()).hexdigest()
        accounts = private(root / "operators.htdigest", f"{OPERATOR}:{OPERATOR_REALM}:{ha1}\n")
        self.secret_file = private(root / "alice.secret", OPERATOR_SECRET + "\n")
        self.pilot_config = str(root / "pilot.conf")
        key_dir = root / "local" / "node-keys"
        for node in nodes:  # a batch system's nodes get their keys as a site installs them
            provision_node_key(str(key_dir), self.site_key, node)
        sections = dict(pilot_sections or {})
        if tls:
            sections["service"] = {"ca_file": tls.ca}
        write_pilot_config(
            self.pilot_config, contact=self.url, node_key_file=str(key_dir / "{host}.key"),
            log_dir=str(root / "logs"), journal_dir=str(self.journal_dir), reserved_timeout_s=15,
            sections=sections or None,
        )
        self.provider_name = (provider or {}).get("name", "local")
        provider_lines = "".join(f"{name} = {value}\n" for name, value in provider.items()) if provider else (
            "name = local\n"
            f"state_dir = {root / 'local'}\n"
            f"output_dir = {root / 'jobs'}\n")
        self.config = str(root / "service.conf")
        (root / "service.conf").write_text(
            "[service]\n"
            f"port = {self.port}\n"
            f"store = {self.store}\n"
            f"log_file = {self.log_file}\n"
            "log_level = debug\n"
            + "".join(f"{name} = {value}\n" for name, value in service_options.items()) +
            "[pilots]\n"
            f"site_key_file = {site_key_file}\n"
            f"pilot_config = {self.pilot_config}\n"
            "grace = 5\n"
            "release_grace = 10\n"
            "status_interval = 0.5\n"
            "queue_timeout = 30\n"
            "lost_after = 60\n"
            "[vms]\n"
            "overhead_mb = 32\n"
            "[provider]\n"
            + provider_lines +
            "[operators]\n"
            f"accounts_file = {accounts}\n"
            "[client]\n"
            f"user = {OPERATOR}\n"
            f"secret_file = {self.secret_file}\n"
            "timeout = 20\n"
            + (f"ca_file = {tls.ca}\n" if tls else "")
        )

    def cli(self, *args: str, config: bool = True, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``workspace-lease ARGS --config <this site's file>`` as a real process."""
        argv = [*CLI, *args] + (["--config", self.config] if config else [])
        environment = dict(os.environ)
        environment.pop("WORKSPACE_LEASE_SECRET_FILE", None)
        environment.update(env or {})
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=environment)

    def api(self, method: str, path: str, user: str = OPERATOR, secret: str = OPERATOR_SECRET, **kwargs):
        """One request to the API with ``requests``' digest auth (checking the site's CA when it has one)."""
        kwargs.setdefault("verify", self.tls.ca if self.tls else True)
        return requests.request(
            method, f"{self.url}/api/v1{path}", auth=HTTPDigestAuth(user, secret), timeout=20, **kwargs,
        )

    def pilot_pids(self) -> list[int]:
        """Owner pids of the node journal's entries (pilots that hold or held memory)."""
        pids = []
        for entry in self.journal_dir.glob("*.json") if self.journal_dir.exists() else []:
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(entry.read_text())
                pid = data.get("owner", {}).get("pid") if isinstance(data.get("owner"), dict) else data.get("pid")
                if isinstance(pid, int):
                    pids.append(pid)
        return pids


def start_serve(site: Site, *, wrapper: tuple[str, ...] = (), umask: int | None = None) -> subprocess.Popen:
    """``workspace-lease serve`` as a real process; returns once it prints that it is serving.

    ``wrapper`` goes before the command (e.g. ``prlimit --nofile=1024:1024``);
    ``umask`` is the process's umask (None: this one's).
    """
    process = subprocess.Popen(
        [*wrapper, *CLI, "serve", "--config", site.config],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )
    try:
        out = read_until(process, "workspace-lease: serving on", timeout=15)
    except BaseException:
        stop_process(process)
        raise
    assert f"serving on {site.url} (store {site.store_shown}, provider {site.provider_name}" in out
    return process


def reserve_then_kill_serve(site: Site, pages_before: int) -> str:
    """Start serve, reserve a ready lease of 2 x 32 MB (the local nodes' hugepages taken), then SIGKILL serve by
    its pid (no clean shutdown); the lease's id. Its pilots outlive the service."""
    from tests.support.pool import pool_pages

    process = start_serve(site)
    try:
        reserved = site.cli("reserve", "--nodes", "2", "--memory", "32", "--duration", "30", "--json", "--wait")
        assert reserved.returncode == 0, reserved.stderr
        lease_id = json.loads(reserved.stdout)["id"]
        assert pool_pages() == pages_before + 32
    except BaseException:
        stop_process(process)
        end_pilots(site)
        raise
    process.kill()
    process.wait()
    return lease_id


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
    """Signal ``process`` by its pid and reap it (SIGKILL if it does not end in ``timeout``)."""
    if process.poll() is None:
        os.kill(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def end_pilots(site: Site) -> None:
    """After a failed test: SIGTERM any pilot still holding memory (by its journalled pid) and wait."""
    deadline = time.monotonic() + 15
    for pid in site.pilot_pids():
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if site.pilot_config.encode() not in handle.read():
                    continue  # not one of this test's pilots (the pid was reused)
            os.kill(pid, signal.SIGTERM)
    while site.pilot_pids() and time.monotonic() < deadline:
        time.sleep(0.1)


@contextlib.contextmanager
def serving(site: Site, **options):
    """A running ``serve`` for the block (``options`` go to :func:`start_serve`); stopped by pid afterwards, then
    any leftover pilot."""
    process = start_serve(site, **options)
    try:
        yield process
    finally:
        stop_process(process)
        end_pilots(site)


@pytest.fixture
def site(tmp_path):
    return Site(tmp_path)
