"""Shared fixtures: a real receiver on 127.0.0.1, the real hugepage pool, pilot processes."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import requests
from requests.auth import HTTPDigestAuth

from pilot.credentials import HOST_PLACEHOLDER
from workspace_common.protocol import SIGNATURE_HEADER, SLOT_SECRET_ENV, Notification, format_time, sign, utc_now
from service_adapter.digest import DigestVerifier
from service_adapter.local_site import write_pilot_config
from service_adapter.nodekeys import NodeAccounts, new_site_key, provision_node_key
from service_adapter.receiver import ReceiverThread, make_app
from service_adapter.store import Store
from tests.support.ports import free_port  # noqa: F401 (the tests import it from here)

HUGEPAGES_DIR = "/sys/kernel/mm/hugepages/hugepages-2048kB"
NR_HUGEPAGES = os.path.join(HUGEPAGES_DIR, "nr_hugepages")
REALM = "workspace-pilot"
#: Every slot secret a test Service handed out, so that start_pilot can put it in the pilot's environment
#: as the slot's job would.
SLOT_SECRETS: dict[str, str] = {}
#: The simulated nodes a test Service provisions keys for.
TEST_HOSTS = tuple(f"node{i}" for i in range(1, 9))

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def pool_pages() -> int:
    """The 2 MiB hugepage pool's size."""
    with open(NR_HUGEPAGES, encoding="ascii") as handle:
        return int(handle.read())


@contextlib.contextmanager
def machine_lock(name: str):
    """An exclusive flock on /tmp/workspace-pilot-tests.<name>.lock for the block.

    The hugepage pool is one per machine: test runs started side by side
    (two checkouts, a benchmark) take turns instead of seeing each other's pages.
    """
    with open(f"/tmp/workspace-pilot-tests.{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@pytest.fixture
def hugepages():
    """The real 2 MiB hugepage pool; the test fails if it does not end where it started."""
    if os.geteuid() != 0 or not os.access(NR_HUGEPAGES, os.W_OK):
        pytest.skip("needs root and a writable 2 MiB hugepage pool")
    with machine_lock("hugepages"):
        yield from _pool_checked()


@pytest.fixture(scope="module")
def hugepages_module():
    """:func:`hugepages` for a module whose tests share one lease (its pilots hold pages across the tests)."""
    if os.geteuid() != 0 or not os.access(NR_HUGEPAGES, os.W_OK):
        pytest.skip("needs root and a writable 2 MiB hugepage pool")
    with machine_lock("hugepages"):
        yield from _pool_checked()


def _pool_checked():
    start = pool_pages()
    yield start
    end = pool_pages()
    if end != start:
        with open(NR_HUGEPAGES, "w", encoding="ascii") as handle:
            handle.write(str(start))  # leave the machine clean even when the test failed
        pytest.fail(f"hugepage pool ended at {end} pages, started at {start}")


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

    def __init__(self, workdir: str, *, verifier_options=None, max_skew_s: float = 300.0, store_options=None):
        self.site_key = new_site_key()
        self.nodes = NodeAccounts(self.site_key, REALM, md5=True)
        self.verifier = DigestVerifier(REALM, self.nodes, **(verifier_options or {}))
        self.key_dir = os.path.join(workdir, "node-keys")
        for host in TEST_HOSTS:
            provision_node_key(self.key_dir, self.site_key, host)
        self.slot_secrets: dict[str, str] = {}
        self.store = Store(os.path.join(workdir, "service.sqlite"), **(store_options or {}))
        self.receiver = ReceiverThread(make_app(self.store, self.verifier, max_skew_s))
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

    def send_release(self, slot: str, host: str) -> None:
        """Queue the service's ``release`` command for one pilot, as a lease's release does (waits for the write)."""
        from service_adapter.store import vms as vmstore

        now = time.time()
        self.store.submit(
            lambda conn: vmstore.queue_command(conn, slot, host, {"op": "release"}, now, self.store._wake_target)
        ).result()

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


@pytest.fixture
def service(tmp_path):
    """A running service on 127.0.0.1 (stopped at the end)."""
    svc = Service(str(tmp_path))
    yield svc
    svc.close()


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


def pilot_config(tmp_path, contact: str, node_key_file: str, **options) -> str:
    """Write a pilot config under ``tmp_path`` (its own journal and log dirs); returns its path."""
    path = str(tmp_path / "pilot.conf")
    write_pilot_config(
        path, contact=contact, node_key_file=node_key_file,
        log_dir=str(tmp_path / "logs"), journal_dir=str(tmp_path / "journal"), **options,
    )
    return path


def start_pilot(config: str, slot: str, *, memory: int = 64, duration: float = 30, grace: float = 5,
                host: str = "node1", extra: tuple = (), pause_at: str | None = None,
                slot_secret: str | None = None) -> subprocess.Popen:
    """Start ``workspace-pilot reserve`` as a real process (paused at a fault checkpoint if asked).

    Its environment carries the slot's secret, as the slot's job would: ``slot_secret``, else the one
    a test Service gave the slot (a made-up one for a slot no Service knows).
    """
    argv = [
        sys.executable, "-m", "pilot", "reserve", "--slot", slot, "--memory", str(memory),
        "--duration", str(duration), "--grace", str(grace), "--config", config, "--host", host, *extra,
    ]
    env = dict(os.environ)
    env[SLOT_SECRET_ENV] = slot_secret or SLOT_SECRETS.get(slot) or "0" * 64
    if pause_at:
        env["WORKSPACE_PILOT_TEST_PAUSE_AT"] = pause_at
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@contextlib.contextmanager
def killed_after(process: subprocess.Popen):
    """``process`` for the ``with`` block; killed by its pid afterwards if it still runs."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def running_pilot(config: str, slot: str, **options):
    """A pilot process for the ``with`` block; killed by its pid afterwards if it still runs."""
    return killed_after(start_pilot(config, slot, **options))


def read_until(process: subprocess.Popen, needle: str, timeout: float = 15.0) -> str:
    """Read a process's output until a line holds ``needle``; returns what was read.

    Waits on the pipe itself (select), so there is no polling; fails the test
    if the process ends or ``timeout`` passes first.
    """
    import selectors

    fd = process.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while needle.encode() not in seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                pytest.fail(f"no {needle!r} within {timeout} s; output so far:\n{seen.decode(errors='replace')}")
            chunk = os.read(fd, 65536)
            if not chunk:
                pytest.fail(f"process ended before {needle!r}; output:\n{seen.decode(errors='replace')}")
            seen += chunk
    return seen.decode(errors="replace")


def journal_files(tmp_path) -> list[str]:
    """The entries in the test's journal directory (``tmp_path/journal``)."""
    directory = tmp_path / "journal"
    return sorted(p.name for p in directory.glob("*.json")) if directory.exists() else []


@pytest.fixture
def local_tz():
    """A fixed non-UTC local time zone (UTC-5, no DST) for this process, so "local" is visible."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "XST+5"
    time.tzset()
    yield 5 * 3600
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


#: The session cluster's partition with a time limit (MaxTime=5 minutes).
SHORT_PARTITION = "short"


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real 4-node Slurm (munged, slurmctld, 4 slurmd) with SchedMD's qsub/qdel/qstat, for the session.

    Installed by ``scripts/bootstrap.sh --cluster`` (the test command does
    that); skipped only where it cannot run at all (not root, not
    installed). The daemons are stopped by pid at the end of the session.
    """
    from tests.support.slurm_cluster import SlurmCluster, missing_commands

    if os.geteuid() != 0:
        pytest.skip("the Slurm cluster needs root")
    missing = missing_commands()
    if missing:
        pytest.skip(f"Slurm not installed ({', '.join(missing)}): run scripts/bootstrap.sh --cluster")
    # Not under pytest's tmp dirs: those are 0700 root, and munged runs as the munge user.
    workdir = tempfile.mkdtemp(prefix="workspace-pilot-slurm-")
    os.chmod(workdir, 0o755)
    # Besides the default partition "debug" (no time limit): "short", whose MaxTime of 5 minutes an extension
    # must respect; and a backfill pass every 5 s (Slurm's 30 s would start a begin-time job up to 30 s late:
    # tests/test_slurm_lease_time.py waits for one).
    cluster = SlurmCluster(workdir, extra_config=(f"PartitionName={SHORT_PARTITION} Nodes=ALL MaxTime=5 State=UP",),
                           backfill_interval_s=5)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def sge_cluster():
    """A real Son of Grid Engine: a qmaster and 2 execution hosts, each in namespaces of its own, for the session.

    Unpacked by ``scripts/bootstrap.sh --sge`` (the test command does that);
    skipped only where it cannot run at all (not root, not unpacked). The
    daemons are stopped by pid and the namespaces deleted at the end.
    """
    from tests.support.sge_cluster import SgeCluster, missing

    lacking = missing()
    if lacking:
        pytest.skip(f"Grid Engine cannot run here: missing {', '.join(lacking)}")
    workdir = tempfile.mkdtemp(prefix="workspace-pilot-sge-")
    os.chmod(workdir, 0o755)
    cluster = SgeCluster(workdir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def guest_reachable(tmp_path, tmp_path_factory):
    """``tmp_path``, searchable (not listable) by the guests' user (libvirt-qemu) down from /tmp: pytest makes its
    directories 0700, and each new session (another one side by side too) makes its root 0700 again."""
    base = tmp_path_factory.getbasetemp()
    for directory in (base.parent, base, tmp_path):
        os.chmod(directory, 0o711)
    return tmp_path


@pytest.fixture(scope="session")
def libvirt_qemu():
    """A real libvirtd with the QEMU driver (TCG guests) for the session: a ``tests.support.libvirt_daemon.LibvirtDaemon``.

    Its ``uri`` is ``qemu:///system``; ``connect()`` opens a libvirt
    connection; ``owned`` says whether this session started the daemon.
    ``tests.support.libvirt_daemon.guest_files()`` / ``guest_xml()`` give the tiny test
    guest. Installed by ``scripts/bootstrap.sh --vm`` (the test command does
    that); skipped only where it cannot run at all (not root, not installed,
    guest not built). Domains named ``wp-*``/``wptest-*`` still there at the
    end are destroyed with a warning; daemons we started are stopped by pid.
    """
    from tests.support.libvirt_daemon import GUEST_DIR, LibvirtDaemon, missing_commands

    if os.geteuid() != 0:
        pytest.skip("libvirtd with QEMU needs root")
    missing = missing_commands()
    if missing:
        pytest.skip(f"libvirt/QEMU not installed ({', '.join(missing)}): run scripts/bootstrap.sh --vm")
    if not all(os.path.isfile(os.path.join(GUEST_DIR, name)) for name in ("vmlinuz", "initrd.img")):
        pytest.skip(f"no test guest in {GUEST_DIR}: run scripts/build-test-guest.sh")
    workdir = tempfile.mkdtemp(prefix="workspace-pilot-libvirt-")
    os.chmod(workdir, 0o755)
    daemon = LibvirtDaemon(workdir)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def conn():
    """libvirt's test driver (its state is shared by every connection of this process); the test's
    ``wp-test-*`` domains are destroyed at the end."""
    import libvirt

    connection = libvirt.open("test:///default")
    yield connection
    for domain in connection.listAllDomains(0):
        if domain.name().startswith("wp-test-"):
            domain.destroy()  # transient: gone once destroyed
    connection.close()
