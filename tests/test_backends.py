"""The cgroup, xen, xl and none backends on real parts.

- cgroup: a real cgroup v1 memory cgroup that each test creates under
  /sys/fs/cgroup/memory and removes again, with a real process in it for EBUSY;
- xen: libvirt-python against libvirt's built-in test driver (a node file
  with a running ``Domain-0``; no daemon);
- xl: a stand-in executable, ``fake-xl`` (a fake: scripted answers, e.g. a failing or hanging
  xl), that implements exactly the two xl commands the backend uses and keeps Domain-0's MB in a
  file; the real ``xl`` on a real Xen dom0 is ``tests/test_xen_real.py``;
- hugepages: only whether 1 GiB pages are offered (the pool is not written here).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from tests.support.fakes import FAKE_XL_SOURCE, install_fake_xl
from pilot.node.backends import BackendError, make_backend
from pilot.node.backends.base import read_meminfo_kb
from pilot.node.backends.cgroup import UNLIMITED, CgroupBackend
from pilot.node.backends.hugepages import HugepagesBackend
from pilot.node.backends.none import NoBackend
from pilot.node.backends.xen import XenBackend
from pilot.node.backends.xl import XlBackend

MIB = 2**20
MEMORY_V1 = "/sys/fs/cgroup/memory"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates cgroups)")


def mem_total_bytes() -> int:
    return read_meminfo_kb("MemTotal") * 1024


def one_line(message: str) -> bool:
    return "\n" not in message and message.strip() == message and message != ""


# ---------------------------------------------------------------- cgroup (v1, real)


class MadeCgroup:
    """A cgroup this test created, and the processes it started inside it."""

    def __init__(self, path: str):
        self.path = path
        self.processes: list[subprocess.Popen] = []

    def limit_file(self) -> int:
        with open(os.path.join(self.path, "memory.limit_in_bytes"), encoding="ascii") as handle:
            return int(handle.read())

    def start_hog(self, megabytes: int) -> subprocess.Popen:
        """A python child, moved into this cgroup, that then holds ``megabytes`` of written memory."""
        code = textwrap.dedent(f"""
            import sys
            sys.stdin.readline()              # wait until the parent moved us into the cgroup
            held = b"x" * ({megabytes} << 20)  # written, so every page is charged to the cgroup
            print("held", flush=True)
            sys.stdin.readline()              # hold it until told or killed
        """)
        process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.processes.append(process)
        with open(os.path.join(self.path, "cgroup.procs"), "w", encoding="ascii") as handle:
            handle.write(str(process.pid))
        process.stdin.write("go\n")
        process.stdin.flush()
        assert process.stdout.readline() == "held\n"
        return process

    def end(self, process: subprocess.Popen) -> None:
        """End one of our processes by its pid and reap it."""
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        for stream in (process.stdin, process.stdout):
            with contextlib.suppress(OSError):
                stream.close()


def _new_cgroup(hierarchy: str):
    if os.geteuid() != 0:
        pytest.skip("needs root to create cgroups")
    if not os.path.isdir(hierarchy):
        pytest.skip(f"{hierarchy} is missing (no cgroup v1 hierarchy there)")
    path = os.path.join(hierarchy, f"workspace-pilot-test-{uuid.uuid4().hex[:12]}")
    os.mkdir(path)
    group = MadeCgroup(path)
    try:
        yield group
    finally:
        for process in group.processes:
            group.end(process)
        # The kernel may take a moment to let go of a cgroup whose last process just exited.
        for attempt in range(50):
            try:
                os.rmdir(path)
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or attempt == 49:
                    raise
                time.sleep(0.02)


@pytest.fixture
def memcg():
    """A fresh, empty memory cgroup under /sys/fs/cgroup/memory, removed at the end whatever happened."""
    yield from _new_cgroup(MEMORY_V1)


def test_cgroup_reads_and_writes_a_finite_limit(memcg):
    backend = CgroupBackend(memcg.path)
    assert backend.version == 1
    assert backend.read() == UNLIMITED  # a new v1 cgroup has no limit
    backend.write(512 * MIB)
    assert backend.read() == 512 * MIB == memcg.limit_file()
    # The kernel keeps limits in pages: a target off the page grid reads back rounded down, and counts.
    backend.write(10**9)
    assert backend.read() == 10**9 - 10**9 % os.sysconf("SC_PAGE_SIZE")
    assert backend.reached(backend.read(), 10**9)
    backend.write(UNLIMITED)
    assert backend.read() == UNLIMITED
    assert memcg.limit_file() >= 2**62  # v1's own "no limit" value, not a number we made up


def test_cgroup_take_from_unlimited_and_give_back_is_unlimited_again(memcg):
    backend = CgroupBackend(memcg.path)
    total = mem_total_bytes()
    start = backend.read()
    assert start == UNLIMITED
    units = backend.units_for(256)
    assert units == 256 * MIB and backend.mb_of(units) == 256
    taken = backend.level_after_take(start, units)
    assert taken == total - 256 * MIB
    backend.write(taken)
    assert backend.reached(backend.read(), taken)
    assert backend.host_mb(backend.read()) == (total - 256 * MIB) // MIB
    given = backend.level_after_give(backend.read(), units)
    assert given == UNLIMITED
    backend.write(given)
    assert backend.read() == UNLIMITED
    assert backend.host_mb(UNLIMITED) == total // MIB


@pytest.mark.parametrize("start_mb", [None, 2048], ids=["unlimited", "finite"])
@pytest.mark.parametrize("first_out", ["first-in", "second-in"])
def test_cgroup_two_leases_compose_in_either_order(memcg, start_mb, first_out):
    backend = CgroupBackend(memcg.path)
    if start_mb is not None:
        backend.write(start_mb * MIB)
    start = backend.read()
    one, two = backend.units_for(100), backend.units_for(300)

    backend.write(backend.level_after_take(backend.read(), one))
    backend.write(backend.level_after_take(backend.read(), two))
    assert backend.read() == min(start, mem_total_bytes()) - 400 * MIB

    order = [one, two] if first_out == "first-in" else [two, one]
    backend.write(backend.level_after_give(backend.read(), order[0]))
    assert backend.read() == min(start, mem_total_bytes()) - order[1]
    backend.write(backend.level_after_give(backend.read(), order[1]))
    assert backend.read() == start


def test_cgroup_limit_below_usage_is_refused_and_the_old_limit_stays(memcg):
    backend = CgroupBackend(memcg.path)
    backend.write(512 * MIB)
    hog = memcg.start_hog(50)
    with pytest.raises(BackendError) as caught:
        backend.write(10 * MIB)
    message = str(caught.value)
    assert one_line(message)
    assert "processes use" in message and "more than the new limit" in message and "nothing changed" in message
    assert backend.read() == 512 * MIB == memcg.limit_file()
    memcg.end(hog)
    # With the process gone the same limit is accepted.
    backend.write(10 * MIB)
    assert backend.read() == 10 * MIB


def test_cgroup_refuses_the_hierarchy_root():
    if not os.path.isdir(MEMORY_V1):
        pytest.skip(f"{MEMORY_V1} is missing")
    with pytest.raises(BackendError, match="root of a cgroup hierarchy"):
        CgroupBackend(MEMORY_V1)


def test_cgroup_refuses_a_path_outside_sys_fs_cgroup(tmp_path):
    (tmp_path / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    with pytest.raises(BackendError, match="not below /sys/fs/cgroup/") as caught:
        CgroupBackend(str(tmp_path))
    assert one_line(str(caught.value))
    assert (tmp_path / "memory.limit_in_bytes").read_text() == "9223372036854771712\n"


def test_cgroup_refuses_a_symlink(memcg, tmp_path):
    link = tmp_path / "host-cgroup"
    link.symlink_to(memcg.path)
    with pytest.raises(BackendError, match="symlink"):
        CgroupBackend(str(link))
    with pytest.raises(BackendError, match="symlink"):
        CgroupBackend(str(link) + "/.")


def test_cgroup_refuses_a_missing_directory_and_a_relative_path():
    with pytest.raises(BackendError, match="not an existing directory"):
        CgroupBackend(f"{MEMORY_V1}/workspace-pilot-test-missing-{uuid.uuid4().hex[:12]}")
    with pytest.raises(BackendError, match="not an absolute path"):
        CgroupBackend("sys/fs/cgroup/memory/x")


@pytest.fixture
def pidscg():
    """A fresh cgroup in the pids hierarchy (no memory controller), removed at the end."""
    yield from _new_cgroup("/sys/fs/cgroup/pids")


def test_cgroup_refuses_a_cgroup_without_a_memory_limit(pidscg):
    with pytest.raises(BackendError, match="neither memory.limit_in_bytes"):
        CgroupBackend(pidscg.path)


def test_cgroup_boot_level_and_params(memcg):
    backend = CgroupBackend(memcg.path)
    assert backend.boot_level("max") == UNLIMITED
    assert backend.boot_level(4096) == 4096 * MIB
    with pytest.raises(BackendError, match="boot_mb"):
        backend.boot_level("lots")
    again = make_backend("cgroup", backend.params())
    assert isinstance(again, CgroupBackend) and again.path == memcg.path and again.read() == backend.read()


# ---------------------------------------------------------------- xen (libvirt's test driver)

NODE_XML = """\
<node>
  <cpu><mode>fixed</mode><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads>
       <active>2</active><mhz>2000</mhz></cpu>
  <memory>8388608</memory>
  <domain type="test">
    <name>{name}</name>
    <memory unit="KiB">4194304</memory>
    <currentMemory unit="KiB">3145728</currentMemory>
    <vcpu>2</vcpu>
    <os><type arch="x86_64">hvm</type></os>
  </domain>
</node>
"""


def node_uri(tmp_path, name: str = "Domain-0") -> str:
    """A libvirt test-driver URI for a host with one running domain (4 GiB max, 3 GiB current)."""
    path = tmp_path / "node.xml"
    path.write_text(NODE_XML.format(name=name))
    return f"test://{path}"


@pytest.fixture
def xen(tmp_path):
    backend = XenBackend(node_uri(tmp_path))
    yield backend
    backend.close()


def test_xen_reads_domain0_found_by_name(xen):
    # The test driver never gives a domain id 0, so this found Domain-0 by its name.
    assert xen.read() == 3 * 1024 * 1024
    assert xen.host_mb(xen.read()) == 3072


def test_xen_take_and_give_back(xen):
    start = xen.read()
    units = xen.units_for(1024)
    assert units == 1024 * 1024 and xen.mb_of(units) == 1024
    taken = xen.level_after_take(start, units)
    assert taken == 2 * 1024 * 1024
    xen.write(taken)
    assert xen.read() == taken and xen.reached(xen.read(), taken)
    given = xen.level_after_give(xen.read(), units)
    xen.write(given)
    assert xen.read() == start


def test_xen_above_max_memory_is_refused_and_the_level_stays(xen):
    start = xen.read()
    with pytest.raises(BackendError) as caught:
        xen.write(5 * 1024 * 1024)
    message = str(caught.value)
    assert one_line(message) and "Domain-0" in message and "max memory" in message
    assert xen.read() == start


def test_xen_unreachable_uri_is_one_clear_line(tmp_path):
    backend = XenBackend(f"qemu+unix:///system?socket={tmp_path}/no-libvirtd.sock")
    with pytest.raises(BackendError) as caught:
        backend.read()
    message = str(caught.value)
    assert one_line(message)
    assert message.startswith(f"xen: cannot connect to {backend.uri}: ") and "is libvirtd running?" in message
    backend.close()
    backend.close()


def test_xen_host_without_domain0(tmp_path):
    backend = XenBackend(node_uri(tmp_path, name="guest"))
    with pytest.raises(BackendError, match="has no Domain-0") as caught:
        backend.read()
    assert one_line(str(caught.value))
    backend.close()


def test_xen_params_round_trip_and_reconnect(xen):
    again = make_backend("xen", xen.params())
    assert isinstance(again, XenBackend) and again.params() == xen.params()
    assert again.read() == 3 * 1024 * 1024
    again.close()
    again.close()  # twice is fine
    assert again.read() == 3 * 1024 * 1024  # connects again on use


def test_xen_tolerance_and_boot_level(xen):
    assert xen.reached(2 * 1024 * 1024 - 1024, 2 * 1024 * 1024)
    assert not xen.reached(2 * 1024 * 1024 - 1025, 2 * 1024 * 1024)
    assert xen.boot_level(4096) == 4096 * 1024
    with pytest.raises(BackendError, match="boot_mb"):
        xen.boot_level("max")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_libvirt_is_imported_only_when_the_xen_backend_is_used():
    done = _python(
        "import sys\n"
        "from pilot.node.backends import BackendError, make_backend\n"
        "import pilot.node.backends.xen\n"
        "make_backend('xen', {'uri': 'test:///default'})\n"
        "make_backend('none', {}).read()\n"
        "assert 'libvirt' not in sys.modules, 'imported too early'\n"
        "try:\n"
        "    make_backend('xen', {'uri': 'test:///default'}).read()  # no Domain-0 there, but it connects\n"
        "except BackendError:\n"
        "    pass\n"
        "assert 'libvirt' in sys.modules\n"
    )
    assert done.returncode == 0, done.stderr


def test_xen_without_libvirt_python_says_so():
    # sys.modules['libvirt'] = None makes `import libvirt` fail as it does where it is not installed.
    done = _python(
        "import sys\n"
        "sys.modules['libvirt'] = None\n"
        "from pilot.node.backends import BackendError, make_backend\n"
        "try:\n"
        "    make_backend('xen', {'uri': 'test:///default'}).read()\n"
        "except BackendError as exc:\n"
        "    print(exc)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("xen: libvirt-python is missing") and "bootstrap.sh" in done.stdout
    assert done.stdout.count("\n") == 1


# ---------------------------------------------------------------- xl (a fake xl command: tests/support/fakes)



def write_fake(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def fake_xl(tmp_path):
    """Path of a fake xl whose Domain-0 starts with 4096 MB (max 8192)."""
    return install_fake_xl(str(tmp_path), 4096)


def test_xl_reads_writes_takes_and_gives(fake_xl, tmp_path):
    backend = XlBackend(command=fake_xl)
    assert backend.read() == 4096
    units = backend.units_for(1024)
    assert units == 1024 and backend.mb_of(units) == 1024
    backend.write(backend.level_after_take(backend.read(), units))
    assert backend.read() == 3072 and (tmp_path / "fake-xl.state").read_text() == "3072"
    assert backend.host_mb(backend.read()) == 3072
    backend.write(backend.level_after_give(backend.read(), units))
    assert backend.read() == 4096
    assert backend.boot_level(4096) == 4096
    assert backend.reached(4095, 4096) and not backend.reached(4094, 4096)


def test_xl_refused_mem_set_is_one_line_with_xls_last_stderr_line(fake_xl):
    backend = XlBackend(command=fake_xl)
    with pytest.raises(BackendError) as caught:
        backend.write(9000)
    message = str(caught.value)
    assert one_line(message)
    assert message == (
        f"xl: `{fake_xl} mem-set 0 9000m` failed (exit 1): cannot set domid 0 memory to 9000 MB: "
        "above the maximum 8192 MB"
    )
    assert backend.read() == 4096


def test_xl_missing_command(tmp_path):
    backend = XlBackend(command=str(tmp_path / "no-such-xl"))
    with pytest.raises(BackendError, match="not found") as caught:
        backend.read()
    assert one_line(str(caught.value))


def test_xl_command_that_is_not_executable(tmp_path):
    path = tmp_path / "fake-xl-not-executable"
    path.write_text(open(FAKE_XL_SOURCE).read())
    path.chmod(0o644)
    if os.geteuid() == 0 and os.access(path, os.X_OK):
        pytest.skip("root may execute this file here")
    with pytest.raises(BackendError, match="permission denied"):
        XlBackend(command=str(path)).read()


@pytest.mark.parametrize("output", [
    "",
    "this is not xl\n",
    "Name  ID  Mem VCPUs State Time(s)\nDomain-0  0  lots  4  r-----  1.0\n",
    "Name  ID  Mem VCPUs State Time(s)\nguest  7  512  1  -b----  1.0\n",
])
def test_xl_unparsable_output(tmp_path, output):
    fake = write_fake(tmp_path, "fake-xl-garbage", f"#!/bin/sh\n# FAKE xl printing garbage\nprintf '%s' '{output}'\n")
    with pytest.raises(BackendError, match="no Domain-0 line") as caught:
        XlBackend(command=fake).read()
    assert one_line(str(caught.value))


def test_xl_unknown_command_fails_clearly(fake_xl):
    # The fake refuses anything but its two commands, so a wrong invocation cannot pass unnoticed.
    done = subprocess.run([fake_xl, "info"], capture_output=True, text=True, timeout=10)
    assert done.returncode == 2 and "unsupported arguments" in done.stderr


@pytest.mark.skipif(shutil.which("sudo") is not None, reason="sudo is installed here")
def test_xl_with_sudo_missing(fake_xl):
    with pytest.raises(BackendError, match="^xl: sudo not found"):
        XlBackend(command=fake_xl, sudo=True).read()


@pytest.mark.skipif(shutil.which("sudo") is None or os.geteuid() != 0, reason="needs sudo and root")
def test_xl_through_sudo(fake_xl):
    assert XlBackend(command=fake_xl, sudo=True).read() == 4096


def test_xl_params_round_trip(fake_xl):
    backend = XlBackend(command=fake_xl, sudo=False)
    again = make_backend("xl", backend.params())
    assert again.params() == {"command": fake_xl, "sudo": False} and again.read() == 4096


# ---------------------------------------------------------------- none


def test_none_changes_nothing():
    backend = make_backend("none", {})
    assert isinstance(backend, NoBackend) and backend.params() == {}
    assert backend.read() == 0
    units = backend.units_for(2048)
    assert units == 2048 and backend.mb_of(units) == 2048
    assert backend.level_after_take(0, units) == 0
    backend.write(backend.level_after_take(0, units))
    assert backend.read() == 0
    assert backend.level_after_give(0, units) == 0
    assert backend.host_mb(0) == read_meminfo_kb("MemTotal") // 1024
    assert backend.boot_level(4096) == 0
    assert "NO protection" in NoBackend.__doc__


# ---------------------------------------------------------------- hugepages (read only)


def test_hugepages_1g_works_or_says_the_kernel_has_none():
    offered = os.path.isdir("/sys/kernel/mm/hugepages/hugepages-1048576kB")
    if offered:
        backend = HugepagesBackend(page_kb=1048576)
        assert backend.read() >= 0
        assert backend.units_for(1500) == 2 and backend.mb_of(2) == 2048
    else:
        with pytest.raises(BackendError, match="no 1048576 kB hugepages") as caught:
            HugepagesBackend(page_kb=1048576)
        assert one_line(str(caught.value))
