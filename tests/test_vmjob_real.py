"""workspace-vmjob on real parts: libvirtd with QEMU (TCG) booting the test guest, the real hugepage pool as
the VM's memory, virtiofsd, the test Slurm with its real sudo, scancel and epilog, and Slurm's job_submit/lua.

Every test ends with the pool where it started (the ``hugepages`` fixture fails the test otherwise), no
domain carrying the project's tag, and the node journal empty. The jobs run as ``nobody`` through a
sudo rule that the module installs (with /etc/workspace-pilot/pilot.conf, which a sudo caller cannot
replace) and removes; they are skipped if that file was there before.
"""

from __future__ import annotations

import contextlib
import glob
import http.server
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from pilot.node.journal import Entry, Journal
from pilot.vm.tag import tagged_domains
from pilot.vmjob.exitcodes import VmJobExit
from tests.support.pilots import killed_after, read_until
from tests.support.libvirt_daemon import GUEST_DIR, guest_files
from tests.support.slurm_cluster import SlurmCluster
from tests.support.system_node import SYSTEM_CONFIG, sudo_rule_and_config

libvirt = pytest.importorskip("libvirt")

VMJOB = os.path.join(os.path.dirname(sys.executable), "workspace-vmjob")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGING = os.path.join(REPO, "packaging")
NOBODY, NOGROUP = 65534, 65534
SUDOERS = "/etc/sudoers.d/workspace-vmjob-tests"
#: The most any wait below lasts: TCG boots the guest in 3-4 s; these are give-up points, not expectations.
GIVE_UP_S = 90


def guest_release() -> str:
    """The test guest's kernel release (what uname -r prints inside it)."""
    with open(os.path.join(GUEST_DIR, "inputs"), encoding="utf-8") as handle:
        return re.search(r"kernel=linux-image-(\S+?)=", handle.read()).group(1)


def write_node(directory: str, *, slurm_conf: str | None = None, stop_timeout: float = 2, run_size: int = 64,
               output_limit: int = 16) -> str:
    """A node for VM jobs under ``directory`` (journal, logs, run dir; hugepages; the test guest as image
    ``test``, and as ``test-net`` with a NIC behind QEMU's user-mode NAT); the config file's path. ``directory`` must be searchable by the guests' user."""
    files = guest_files()
    images = os.path.join(directory, "images.conf")
    with open(images, "w", encoding="utf-8") as handle:
        for name, extra in (("test", ""), ("test-net", "network = user\n")):
            handle.write(f"[{name}]\nkernel = vmlinuz\nkernel_sha256 = {files.kernel_sha256}\ninitrd = initrd.img\n"
                         f"initrd_sha256 = {files.initrd_sha256}\ncmdline = console=ttyS0 panic=-1 quiet\n{extra}")
    vmjob = {"images": images, "run_dir": f"{directory}/run", "stop_timeout": stop_timeout, "run_size": run_size,
             "output_limit": output_limit}
    sections = {
        "memory": {"backend": "hugepages", "minmem": 512},
        "journal": {"dir": f"{directory}/journal"},
        "libvirt": {"uri": "qemu:///system"},
        "vms": {"image_dir": GUEST_DIR, "console_dir": f"{directory}/consoles", "virt_type": "qemu"},
        "vmjob": vmjob,
        **({"batch": {"slurm_conf": slurm_conf}} if slurm_conf else {}),
        "logging": {"dir": f"{directory}/logs"},
    }
    path = os.path.join(directory, "pilot.conf")
    with open(path, "w", encoding="utf-8") as handle:
        for section, values in sections.items():
            handle.write(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    return path


def system_node_cluster_conf(directory: str) -> str:
    """The slurm.conf the node's config first named (the session's cluster)."""
    with open(os.path.join(directory, "session-slurm.conf.path"), encoding="utf-8") as handle:
        return handle.read()


def journal_entries(directory: str) -> list[Entry]:
    return [e for e in Journal(os.path.join(directory, "journal")).entries() if isinstance(e, Entry)]


def our_domains() -> list[str]:
    conn = libvirt.open("qemu:///system")
    try:
        return [domain.name() for domain, _tag in tagged_domains(conn)]
    finally:
        conn.close()


def assert_node_clean(directory: str) -> None:
    """No journal entry, no tagged domain, no run directory and no console log left (slot locks may stay until
    the epilog)."""
    assert journal_entries(directory) == []
    assert our_domains() == []
    consoles = os.path.join(directory, "consoles")
    assert (os.listdir(consoles) if os.path.isdir(consoles) else []) == []
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        assert f"{directory}/run/" not in mounts.read()  # no job's tmpfs left mounted
    run = os.path.join(directory, "run")
    assert [n for n in os.listdir(run) if not n.endswith(".lock")] == [] if os.path.isdir(run) else True


def wait_for(condition, what: str, timeout: float = GIVE_UP_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.1)  # polling things (files, squeue) that have no change notification


def vmjob_argv(config: str, shell_line: str, image: str = "test") -> list[str]:
    """``workspace-vmjob run`` of the test image (128 MB) with ``sh -c shell_line`` as root, outside a batch job."""
    return [VMJOB, "run", "--config", config, "--image", image, "--memory", "128", "--", "sh", "-c", shell_line]


def running_vmjob(config: str, cwd, shell_line: str, **popen):
    """The wrapper as a process for the block; killed by its pid afterwards if it still runs."""
    return killed_after(subprocess.Popen(vmjob_argv(config, shell_line), cwd=cwd, **popen))


@pytest.fixture
def node(guest_reachable, libvirt_qemu, hugepages):
    directory = str(guest_reachable)
    yield directory, write_node(directory)
    _destroy_left_domains()


def _destroy_left_domains() -> None:
    conn = libvirt.open("qemu:///system")
    try:
        for domain, _tag in tagged_domains(conn):
            with contextlib.suppress(libvirt.libvirtError):
                domain.destroy()
    finally:
        conn.close()


# -- as root, outside a batch job -------------------------------------------------------------------


def test_a_command_runs_in_the_guest_with_its_output_its_files_and_its_exit_status(node, tmp_path):
    directory, config = node
    work = tmp_path / "work"
    work.mkdir()
    (work / "input.txt").write_text("from the host\n")
    result = subprocess.run(
        vmjob_argv(config, "uname -r; cat input.txt; echo made > output.txt; echo oops >&2; exit 3"),
        cwd=work, capture_output=True, text=True, timeout=GIVE_UP_S,
    )
    assert result.returncode == 3, result.stderr
    assert result.stdout.splitlines() == [guest_release(), "from the host"]
    assert result.stderr == "oops\n"
    assert (work / "output.txt").read_text() == "made\n"
    assert_node_clean(directory)
    (log,) = [n for n in os.listdir(tmp_path / "logs") if re.fullmatch(r"vmjob-vmjob\d+\.log", n)]
    assert stat.S_IMODE((tmp_path / "logs" / log).stat().st_mode) == 0o640
    (line,) = [line for line in (tmp_path / "logs" / log).read_text().splitlines() if "vmjob timings" in line]
    moments = json.loads(line.split("vmjob timings ", 1)[1])  # the split the benchmark reports, in order
    order = ["image_ready", "memory_taken", "domain_created", "guest_started", "first_output", "status",
             "domain_destroyed", "shares_stopped", "restored"]
    assert sorted(moments, key=moments.get) == order


def test_an_image_the_site_gives_a_network_reaches_what_the_job_reaches_and_others_have_no_nic(node, tmp_path):
    directory, config = node
    served = []

    class Probe(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            served.append(self.path)
            body = b"reached the node\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Probe)  # on the node, as a job's process sees it
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # The guest's view of the node's loopback through QEMU's user-mode NAT is 10.0.2.2: QEMU delivers the
        # connection to the server above on 127.0.0.1, and the guest goes nowhere else.
        result = subprocess.run(
            vmjob_argv(config, f"cat /run-address; wget -q -O - http://10.0.2.2:{server.server_port}/from-guest",
                       image="test-net"), cwd=tmp_path, capture_output=True, text=True, timeout=GIVE_UP_S)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["10.0.2.15", "reached the node"]
        assert served == ["/from-guest"]
        plain = subprocess.run(vmjob_argv(config, "ls /sys/class/net"), cwd=tmp_path, capture_output=True, text=True,
                               timeout=GIVE_UP_S)
        assert plain.returncode == 0 and plain.stdout.split() == ["lo"], plain.stderr  # the default: no NIC
    finally:
        server.shutdown()
        server.server_close()
    assert_node_clean(directory)


def test_a_guest_flooding_its_console_cannot_fill_the_nodes_disk(node, tmp_path):
    """The serial console's log goes through virtlogd, which rotates it at 2 MiB and keeps 3 old ones, in the
    job's own tmpfs, and it goes with the job."""
    directory, config = node
    with running_vmjob(config, tmp_path, "head -c 3000000 /dev/zero | tr '\\0' x > /dev/ttyS0; echo flooded; "
                       "sleep 600", stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        read_until(process, "flooded", timeout=GIVE_UP_S)
        (slot,) = [path for path in (tmp_path / "run").iterdir() if path.is_dir()]
        sizes = {path.name: path.stat().st_size for path in slot.iterdir() if path.name.startswith("console.")}
        (current,) = [name for name in sizes if name.endswith(".log")]
        assert sizes[current + ".0"] == 2 * 1024 * 1024 and sizes[current] < 2 * 1024 * 1024, sizes
        process.send_signal(signal.SIGTERM)
        assert process.wait(GIVE_UP_S) == 128 + signal.SIGTERM
    assert_node_clean(directory)  # the console log and its rotations too


def test_a_guest_writing_without_end_fills_its_jobs_own_tmpfs_and_nothing_the_node_needs(guest_reachable,
                                                                                        libvirt_qemu, hugepages):
    tmp_path = guest_reachable
    directory = str(tmp_path)
    config = write_node(directory, run_size=24, output_limit=4)
    run_fs = os.statvfs(os.path.dirname(directory))
    try:
        result = subprocess.run(
            vmjob_argv(config, "head -c 100000000 /dev/zero | tr '\\0' x; echo exit $? >&2"),
            cwd=tmp_path, capture_output=True, timeout=GIVE_UP_S * 2,
        )
    finally:
        _destroy_left_domains()
    # The guest wrote 100 MB to its stdout, in its job's 24 MB tmpfs: the wrapper read it as it came and freed
    # what it read, so the guest never met a full disk and its exit status found room. The job's output got
    # the first 4 MB and a line saying the rest was not copied; the filesystem under the node's run_dir did not
    # lose what the guest wrote.
    assert len(result.stdout) == 4 * 1024 * 1024 and set(result.stdout) == {ord("x")}
    assert b"exit 0" in result.stderr, result.stderr[-800:]
    assert result.returncode == 0, result.stderr[-800:]  # its exit status still had room: the job ended as it said
    assert b"more than 4194304 bytes; the rest is not copied" in result.stderr, result.stderr[-500:]
    after = os.statvfs(os.path.dirname(directory))
    assert (run_fs.f_bavail - after.f_bavail) * after.f_frsize < 16 * 1024 * 1024
    assert_node_clean(directory)


def test_sigterm_shuts_the_guest_down_and_gives_everything_back(node, tmp_path):
    directory, config = node
    with running_vmjob(config, tmp_path, "echo started; sleep 600", stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE) as process:
        read_until(process, "started", timeout=GIVE_UP_S)
        (entry,) = journal_entries(directory)
        assert entry.memory.phase == "held" and entry.vm_uri and entry.run_dir  # all journalled while it runs
        assert len(our_domains()) == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(GIVE_UP_S) == 128 + signal.SIGTERM
    assert b"stopped by SIGTERM" in process.stderr.read()
    assert_node_clean(directory)


def test_a_storm_of_signals_stops_the_wrapper_and_never_hangs_it(node, tmp_path):
    """Signals keep coming while the wrapper follows its guest (every 20 ms it waits on its stop flag): its
    handler must never wait for a lock the interrupted wait holds (a wrapper whose stop flag was a
    threading.Event hung so, in a futex, with the VM and its memory held), nor nest without end (one that
    handled every one of 33,000 SIGHUPs died of a RecursionError mid-run)."""
    directory, config = node
    with running_vmjob(config, tmp_path, "echo started; sleep 600", stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE) as process:
        read_until(process, "started", timeout=GIVE_UP_S)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and process.poll() is None:
            process.send_signal(signal.SIGHUP)  # a stop, as SIGTERM is; thousands of them
        assert process.wait(GIVE_UP_S) == 128 + signal.SIGHUP
    assert_node_clean(directory)


@pytest.mark.parametrize("delay_s", [0.05, 0.15, 0.3, 0.5, 0.8, 1.2])
def test_sigterm_in_any_phase_of_the_start_leaves_nothing(node, tmp_path, delay_s):
    """The start's phases (imports, the image check, the memory, the run directory, the daemons, createXML,
    the boot) each take from ~5 to ~900 ms here: a signal in any of them ends the job as stopped, with the
    node as it was."""
    directory, config = node
    with running_vmjob(config, tmp_path, "sleep 600", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as process:
        time.sleep(delay_s)  # where in the start the signal lands is the test's parameter
        process.send_signal(signal.SIGTERM)
        status = process.wait(GIVE_UP_S)
    stderr = process.stderr.read().decode()
    # Before the handlers are in place the default action ends it (-15): nothing had been changed yet.
    assert status in (128 + signal.SIGTERM, -signal.SIGTERM), stderr
    assert_node_clean(directory)


def test_a_wrapper_killed_outright_leaves_its_entry_and_killall_undoes_it(node, tmp_path):
    directory, config = node
    with running_vmjob(config, tmp_path, "echo started; sleep 600", stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL) as process:
        read_until(process, "started", timeout=GIVE_UP_S)
        (entry,) = journal_entries(directory)
        daemons = _share_daemons(entry.run_dir)
        assert len(daemons) == 2
        process.kill()  # by its pid: SIGKILL, as the batch system's kill after its wait would
        process.wait()
    # What the journal says is what is left: the VM, its memory, its run directory.
    (left,) = journal_entries(directory)
    assert left.memory.phase == "held" and os.path.isdir(left.run_dir) and len(our_domains()) == 1
    wait_for(lambda: not _share_daemons(left.run_dir), "the share daemons ending with their wrapper", 10)
    killall = subprocess.run([os.path.join(os.path.dirname(sys.executable), "workspace-killall"),
                              "--config", config, "--no-notify"], capture_output=True, text=True, timeout=GIVE_UP_S)
    assert killall.returncode == 0, killall.stdout + killall.stderr
    assert_node_clean(directory)


def _share_daemons(run_dir: str) -> list[int]:
    """The pids of virtiofsd processes serving sockets of ``run_dir`` (looked up, not stopped, by name)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"virtiofsd") and any(run_dir.encode() in a for a in argv):
            found.append(int(pid))
    return found


# -- as a user, inside Slurm jobs, through the sudo rule ---------------------------------------------


@pytest.fixture(scope="module")
def system_node(slurm_cluster, libvirt_qemu):
    """/etc/workspace-pilot/pilot.conf and a sudo rule for nobody, for the module; removed afterwards."""
    rule = (f'Defaults!{VMJOB} env_keep += "SLURM_JOB_ID SLURMD_NODENAME"\n'
            f"nobody ALL=(root) NOPASSWD: {VMJOB} run *\n")
    with sudo_rule_and_config(SUDOERS, rule):
        directory = tempfile.mkdtemp(prefix="workspace-vmjob-")
        os.chmod(directory, 0o755)
        try:
            shutil.copy(write_node(directory, slurm_conf=slurm_cluster.conf), SYSTEM_CONFIG)
            with open(os.path.join(directory, "session-slurm.conf.path"), "w", encoding="utf-8") as handle:
                handle.write(slurm_cluster.conf)
            yield directory
        finally:
            # What a failed test left journalled (a VM, its hugepages, a job's lowered limit) is undone the way
            # a site would undo it, before the journal goes with the directory.
            subprocess.run([sys.executable, "-m", "admin_tools.killall", "--config",
                            os.path.join(directory, "pilot.conf"), "--term-timeout", "10"],
                           capture_output=True, timeout=120, check=False)
            _destroy_left_domains()
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def user_dir(system_node, hugepages):
    """A working directory of nobody's for one job."""
    work = tempfile.mkdtemp(prefix="job-", dir=system_node)
    os.chown(work, NOBODY, NOGROUP)
    yield work
    assert_node_clean(system_node)


def submit(cluster, script: str, work: str, *extra: str) -> str:
    path = os.path.join(work, "job.sh")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(script)
    os.chmod(path, 0o755)
    result = cluster.run(["sbatch", "--parsable", "--uid=nobody", "--gid=nogroup", "-D", work,
                          "-o", os.path.join(work, "out.txt"), *extra, path])
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_field(cluster, job: str, field: str) -> str | None:
    shown = cluster.run(["scontrol", "show", "job", "-o", job]).stdout
    match = re.search(rf"\b{field}=(\S+)", shown)
    return match.group(1) if match else None


def wait_job_done(cluster, job: str) -> None:
    wait_for(lambda: job_field(cluster, job, "JobState") not in ("PENDING", "RUNNING", "COMPLETING", None),
             f"job {job} ending")


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def test_a_users_job_shows_the_guests_output_and_exit_code_in_slurm(slurm_cluster, system_node, user_dir):
    job = submit(slurm_cluster, f"#!/bin/sh\nsudo -n {VMJOB} run --image test -- "
                                "sh -c 'uname -r; echo made > made.txt; exit 3'\n", user_dir)
    wait_job_done(slurm_cluster, job)
    assert read(os.path.join(user_dir, "out.txt")) == guest_release() + "\n"
    assert job_field(slurm_cluster, job, "ExitCode") == "3:0"
    made = os.stat(os.path.join(user_dir, "made.txt"))
    assert (made.st_uid, made.st_gid) == (NOBODY, NOGROUP)  # the guest's root wrote it as the job's user


def test_scancel_mid_job_leaves_no_vm_and_no_memory_held(slurm_cluster, system_node, user_dir):
    job = submit(slurm_cluster, f"#!/bin/sh\nsudo -n {VMJOB} run --image test -- sh -c 'echo started; sleep 600'\n",
                 user_dir, "--mem=128")
    out = os.path.join(user_dir, "out.txt")
    wait_for(lambda: os.path.exists(out) and "started" in read(out), "the guest's first line")
    (entry,) = journal_entries(system_node)
    assert entry.slot == f"job{job}.{entry.host}" and entry.memory.memory_mb == 128 + 64
    assert slurm_cluster.run(["scancel", job]).returncode == 0
    wait_job_done(slurm_cluster, job)
    wait_for(lambda: not journal_entries(system_node), "the wrapper restoring the node")
    # user_dir's teardown asserts no tagged domain and no run directory; hugepages' the pool.


def test_more_memory_than_the_job_has_is_refused_in_the_job(slurm_cluster, system_node, user_dir):
    job = submit(slurm_cluster, f"#!/bin/sh\nsudo -n {VMJOB} run --image test --memory 512 -- true\necho rc=$?\n",
                 user_dir, "--mem=256")
    wait_job_done(slurm_cluster, job)
    assert read(os.path.join(user_dir, "out.txt")) == (
        f"workspace-vmjob: --memory 512: job {job} has 256 MB on {job_field(slurm_cluster, job, 'BatchHost')}\n"
        f"rc={VmJobExit.ALLOCATION.value}\n")


def test_outside_a_job_a_user_reaches_root_only_to_be_refused(system_node):
    """The user-side form: `workspace-vmjob run` re-runs itself through sudo, its command carried on stdin."""
    check = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOGROUP}", "--clear-groups",
                            "/usr/bin/python3", "-c", f"import os; assert os.access({REPO + '/pilot/__init__.py'!r}, os.R_OK)"],
                           capture_output=True)
    if check.returncode != 0:
        pytest.skip(f"{REPO} is not readable by nobody (a checkout under a private directory)")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": REPO}
    result = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOGROUP}", "--clear-groups",
                             "/usr/bin/python3", VMJOB, "run", "--image", "test", "--", "true"],
                            capture_output=True, text=True, env=env, cwd="/", timeout=60)
    assert result.returncode == VmJobExit.ALLOCATION, result.stderr
    assert result.stderr == "workspace-vmjob: not inside a batch job: run it in a job's script (or as root)\n"


# -- the hidden form: Slurm's job_submit/lua and Epilog ----------------------------------------------


@pytest.fixture(scope="module")
def wrapping_cluster(system_node):
    """A one-node Slurm whose job_submit.lua and Epilog are the shipped ones (paths pointed at this checkout)."""
    workdir = tempfile.mkdtemp(prefix="workspace-vmjob-slurm-")
    os.chmod(workdir, 0o755)
    config = os.path.join(system_node, "pilot.conf")
    with open(os.path.join(PACKAGING, "slurm", "job_submit.lua"), encoding="utf-8") as handle:
        lua = handle.read().replace('local VMJOB = "/usr/bin/workspace-vmjob"', f'local VMJOB = "{VMJOB}"')
    with open(os.path.join(workdir, "job_submit.lua"), "w", encoding="utf-8") as handle:
        handle.write(lua)
    with open(os.path.join(PACKAGING, "slurm", "epilog"), encoding="utf-8") as handle:
        epilog = handle.read().replace("VMJOB=/usr/bin/workspace-vmjob", f"VMJOB={VMJOB}").replace(
            "CONFIG=/etc/workspace-pilot/pilot.conf", f"CONFIG={config}")
    epilog_path = os.path.join(workdir, "epilog")
    with open(epilog_path, "w", encoding="utf-8") as handle:
        handle.write(epilog)
    os.chmod(epilog_path, 0o755)
    yield from the_nodes_cluster(system_node, workdir, ("JobSubmitPlugins=lua", f"Epilog={epilog_path}"))


def the_nodes_cluster(system_node: str, workdir: str, extra_config: tuple[str, ...]):
    """A one-node Slurm in ``workdir`` (removed afterwards) that the node's config names while it runs: the
    node's scontrol calls ask it (the config is the node's, read through sudo); the session's cluster after."""
    cluster = SlurmCluster(workdir, nodes=1, extra_config=extra_config)
    shutil.copy(write_node(system_node, slurm_conf=cluster.conf), SYSTEM_CONFIG)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.copy(write_node(system_node, slurm_conf=system_node_cluster_conf(system_node)), SYSTEM_CONFIG)
        shutil.rmtree(workdir, ignore_errors=True)


def test_an_unchanged_job_script_runs_in_a_vm_when_its_comment_names_an_image(wrapping_cluster, system_node, user_dir):
    script = "#!/bin/sh\n# the user's own script, unchanged\nuname -r\necho \"$((6 * 7))\"\nexit 3\n"
    job = submit(wrapping_cluster, script, user_dir, "--comment=vm:test")
    wait_job_done(wrapping_cluster, job)
    assert read(os.path.join(user_dir, "out.txt")) == f"{guest_release()}\n42\n"
    assert job_field(wrapping_cluster, job, "ExitCode") == "3:0"
    stored = wrapping_cluster.run(["scontrol", "write", "batch_script", job, "-"]).stdout
    assert "run --image test --script -" in stored and script in stored  # the original, handed over whole
    plain = submit(wrapping_cluster, "#!/bin/sh\nuname -r\n", user_dir)
    wait_job_done(wrapping_cluster, plain)
    assert read(os.path.join(user_dir, "out.txt")) == os.uname().release + "\n"  # no comment: no VM


def test_a_comment_that_names_no_image_is_refused_at_submission(wrapping_cluster, system_node, user_dir):
    result = wrapping_cluster.run(["sbatch", "--uid=nobody", "--gid=nogroup", "-D", user_dir,
                                   "--comment=vm:no such image", "--wrap", "true"])
    assert result.returncode != 0 and "not vm:IMAGE" in result.stderr


def test_the_epilog_cleans_up_after_a_wrapper_killed_outright(wrapping_cluster, system_node, user_dir):
    job = submit(wrapping_cluster, "#!/bin/sh\necho started\nsleep 600\n", user_dir, "--comment=vm:test")
    out = os.path.join(user_dir, "out.txt")
    wait_for(lambda: os.path.exists(out) and "started" in read(out), "the guest's first line")
    (entry,) = journal_entries(system_node)
    os.kill(entry.owner.pid, signal.SIGKILL)  # as the OOM killer or a SIGKILL after the kill wait would
    wait_job_done(wrapping_cluster, job)
    # Slurm ran the shipped epilog: the VM destroyed, the memory given back, the entry gone.
    wait_for(lambda: not journal_entries(system_node) and not our_domains(), "the epilog's clean-up")
    assert "DRAIN" not in wrapping_cluster.run(["sinfo", "-h", "-o", "%T"]).stdout.upper()


@pytest.fixture(scope="module")
def cgroup_cluster(system_node):
    """A one-node Slurm that enforces each job's cores and memory with cgroup v1 (task/cgroup, proctrack/cgroup)."""
    if not os.access("/sys/fs/cgroup/memory", os.W_OK) or not os.path.isdir("/sys/fs/cgroup/cpuset"):
        pytest.skip("no writable cgroup v1 memory and cpuset controllers")
    workdir = tempfile.mkdtemp(prefix="workspace-vmjob-cgroup-slurm-")
    os.chmod(workdir, 0o755)
    with open(os.path.join(workdir, "cgroup.conf"), "w", encoding="ascii") as handle:
        handle.write("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\nCgroupMountpoint=/sys/fs/cgroup\n"
                     "ConstrainCores=yes\nConstrainRAMSpace=yes\n")
    # CR_Core_Memory: memory is a consumable resource, so ConstrainRAMSpace limits each job to its --mem (with
    # CR_Core it would be the whole node's memory).
    made_by_slurm = [path for path in _slurm_cgroups() if not os.path.exists(path)]
    try:
        yield from the_nodes_cluster(system_node, workdir, ("TaskPlugin=task/cgroup",
                                                            "ProctrackType=proctrack/cgroup",
                                                            "SelectTypeParameters=CR_Core_Memory"))
    finally:
        # slurmd leaves its (empty) per-node cgroups behind: remove those this cluster made, deepest first.
        for top in made_by_slurm:
            for root, _dirs, _files in sorted(os.walk(top), key=lambda walked: -walked[0].count("/")):
                with contextlib.suppress(OSError):
                    os.rmdir(root)


def _slurm_cgroups() -> list[str]:
    """Where slurmd of the one-node cluster (node1) makes its cgroups, one per controller."""
    return [os.path.join("/sys/fs/cgroup", controller, "slurm_node1") for controller in os.listdir("/sys/fs/cgroup")
            if os.path.isdir(os.path.join("/sys/fs/cgroup", controller))]


def job_cgroup(controller: str, job: str) -> str:
    """The job's cgroup directory of ``controller`` that Slurm made."""
    found = [path for path in glob.glob(f"/sys/fs/cgroup/{controller}/slurm*/uid_*/job_{job}")]
    assert len(found) == 1, found
    return found[0]


def allowed_cpus(pid: int) -> set[str]:
    """The Cpus_allowed_list of every thread of ``pid``."""
    lists = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status", encoding="ascii") as handle:
            lists |= set(re.findall(r"^Cpus_allowed_list:\s*(\S+)$", handle.read(), re.M))
    return lists


def test_a_jobs_vm_runs_on_the_jobs_cores_and_its_memory_comes_out_of_the_jobs(cgroup_cluster, system_node,
                                                                              user_dir):
    # exec, as the job submit filter's script does: under proctrack/cgroup, slurmstepd kills what is left of the
    # job as soon as its script's own process ends, so the script must be the wrapper to let it restore on scancel.
    job = submit(cgroup_cluster, f"#!/bin/sh\nexec sudo -n {VMJOB} run --image test --memory 128 -- "
                                 "sh -c 'echo started; sleep 600'\n", user_dir, "--mem=400", "-c", "1")
    out = os.path.join(user_dir, "out.txt")
    wait_for(lambda: os.path.exists(out) and "started" in read(out), "the guest's command starting")
    memory, cpuset = job_cgroup("memory", job), job_cgroup("cpuset", job)
    with open(os.path.join(cpuset, "cpuset.cpus"), encoding="ascii") as handle:
        job_cores = handle.read().strip()
    # Its guest's vCPUs and QEMU's own threads run only on the job's cores, which are not all the machine's.
    assert job_cores != f"0-{os.cpu_count() - 1}"
    [domain] = our_domains()
    with open(f"/run/libvirt/qemu/{domain}.pid", encoding="ascii") as handle:
        assert allowed_cpus(int(handle.read())) == {job_cores}
    # The VM's 128 MB and its 64 MB overhead, taken from the host's hugepages, come off the job's 400 MB: its
    # own processes on the host may use 208 MB while the guest runs. The old limit is journalled first.
    with open(os.path.join(memory, "memory.limit_in_bytes"), encoding="ascii") as handle:
        assert int(handle.read()) == 208 * 2**20
    (entry,) = journal_entries(system_node)
    assert entry.job_limit == (memory, 400 * 2**20)
    cgroup_cluster.run(["scancel", job])
    wait_job_done(cgroup_cluster, job)
    wait_for(lambda: not journal_entries(system_node), "the wrapper restoring the node")


def test_a_vm_that_does_not_fit_beside_the_jobs_own_processes_is_refused_in_the_job(cgroup_cluster, system_node,
                                                                                    user_dir):
    # 128 MB + 64 MB of overhead would leave the job 8 MB of its 200: less than its shell, sudo and the wrapper use.
    job = submit(cgroup_cluster, f"#!/bin/sh\nsudo -n {VMJOB} run --image test --memory 128 -- true\n",
                 user_dir, "--mem=200", "-c", "1")
    wait_job_done(cgroup_cluster, job)
    said = read(os.path.join(user_dir, "out.txt"))
    assert re.search(r"workspace-vmjob: memory: the job's processes use \d+ MB of its 200 MB; a VM taking 192 MB "
                     r"does not fit beside them \(at most \d+ MB does, VM overhead included\)", said), said
    assert job_field(cgroup_cluster, job, "ExitCode") == f"{int(VmJobExit.ALLOCATION)}:0"
    assert our_domains() == []
