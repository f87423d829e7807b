"""The fixtures: a real receiver on 127.0.0.1, the real hugepage pool, the session's clusters and libvirtd.

What tests use besides fixtures lives in :mod:`tests.support`; no test imports this module."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

from tests.support.pool import NR_HUGEPAGES, machine_lock, pool_checked
from tests.support.postgres import PostgresServer
from tests.support.service import Service
from tests.support.slurm_cluster import SHORT_PARTITION


#: What a test stands on, by the fixtures it uses (directly or through others) or its module's own mark.
_CLUSTER_FIXTURES = {"slurm_cluster", "sge_cluster"}
_HYPERVISOR_FIXTURES = {"libvirt_qemu", "xen_host"}
_XEN_FIXTURES = {"xen_host"}
_ROOT_FIXTURES = {"hugepages", "hugepages_module", "libvirt_qemu", "slurm_cluster", "sge_cluster", "guest_reachable",
                  "postgres_server"}


def pytest_collection_modifyitems(config, items):
    """Mark each test ``cluster``, ``hypervisor``, ``xen`` and ``root`` from what it stands on (setup.cfg lists them)."""
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & _CLUSTER_FIXTURES:
            item.add_marker(pytest.mark.cluster)
        if used & _HYPERVISOR_FIXTURES:
            item.add_marker(pytest.mark.hypervisor)
        if used & _XEN_FIXTURES:
            item.add_marker(pytest.mark.xen)
        needs_root = any("root" in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif"))
        if used & _ROOT_FIXTURES or needs_root or item.get_closest_marker("hypervisor"):
            item.add_marker(pytest.mark.root)


@pytest.fixture
def hugepages():
    """The real 2 MiB hugepage pool; the test fails if it does not end where it started."""
    if os.geteuid() != 0 or not os.access(NR_HUGEPAGES, os.W_OK):
        pytest.skip("needs root and a writable 2 MiB hugepage pool")
    with machine_lock("hugepages"):
        yield from pool_checked()


@pytest.fixture(scope="module")
def hugepages_module():
    """:func:`hugepages` for a module whose tests share one lease (its pilots hold pages across the tests)."""
    if os.geteuid() != 0 or not os.access(NR_HUGEPAGES, os.W_OK):
        pytest.skip("needs root and a writable 2 MiB hugepage pool")
    with machine_lock("hugepages"):
        yield from pool_checked()


@pytest.fixture(scope="session")
def postgres_server():
    """The session's real PostgreSQL server (initdb in a temporary directory, 127.0.0.1, stopped by its pid)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (the server runs as the postgres account)")
    server = PostgresServer()
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_location(request, tmp_path):
    """Where a test's store lives, once on each backend: a SQLite file, then a new database of the session's
    PostgreSQL server."""
    if request.param == "sqlite":
        yield str(tmp_path / "service.sqlite")
        return
    server = request.getfixturevalue("postgres_server")
    url = server.new_database()
    yield url
    server.drop_database(url)  # a database is ~7 MB on disk: the session makes over a hundred


@pytest.fixture
def service(tmp_path):
    """A running service on 127.0.0.1 (stopped at the end)."""
    svc = Service(str(tmp_path))
    yield svc
    svc.close()


@pytest.fixture
def any_store_service(tmp_path, store_location):
    """:func:`service` on each store backend (SQLite, PostgreSQL)."""
    svc = Service(str(tmp_path), store_location=store_location)
    yield svc
    svc.close()


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
    # must respect; and the main scheduler's pass every 2 s: with Slurm's 60 s a job whose begin time has passed
    # started 25-55 s late (a backfill pass every 5 s did not start it), and tests/test_slurm_lease_time.py
    # waits for one.
    cluster = SlurmCluster(workdir, extra_config=(f"PartitionName={SHORT_PARTITION} Nodes=ALL MaxTime=5 State=UP",),
                           schedule_interval_s=2)
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


@pytest.fixture(scope="module")
def xen_host():
    """A real Xen 4.17 host under QEMU (TCG) for a test module: a ``tests.support.xen_host.XenHost``, booted once.

    Stopped when the module's tests are done (it holds 2 GB and two emulated CPUs meanwhile).

    dom0 has 1024 MB at boot (``dom0_mem``, its balloon may grow to 1536) and
    runs this project's code; ``run()`` runs a command there, ``start_libvirtd()``
    starts libvirt's Xen driver there (once), ``domains()`` lists Xen's domains. Built by
    ``scripts/bootstrap.sh --xen`` (the test command does that); skipped only
    where it cannot run (QEMU or the build missing). Stopped by its pid.
    """
    from tests.support.xen_host import BUILD_DIR, XenHost

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("QEMU is not installed: run scripts/bootstrap.sh --xen")
    if not os.path.isfile(os.path.join(BUILD_DIR, "dom0.cpio")):
        pytest.skip(f"no Xen test host in {BUILD_DIR}: run scripts/build-xen-host.sh")
    workdir = tempfile.mkdtemp(prefix="workspace-pilot-xen-")
    host = XenHost(workdir)
    try:
        host.start()
        yield host
    finally:
        host.stop()
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
