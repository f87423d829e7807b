"""workspace-vmjob's parts that need no VM: the image list, Slurm's allocation lines, the run directory's
guard against what the user (or the guest) may plant, output following, the command line's refusals.

The Slurm lines are ``scontrol show job -d -o`` output captured from the test cluster (Slurm 22.05);
tests/test_vmjob_real.py asks the real scontrol.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from pilot.node.journal import Entry, Journal
from pilot.recovery import undo_entry
from pilot.node.owner import Owner
from workspace_common.ini import ConfigError
from pilot.vmjob import cli
from pilot.vmjob.allocation import AllocationError, count_cpu_ids, memory_mb, parse_job
from pilot.vmjob.catalog import load_catalog
from pilot.vmjob.exitcodes import VmJobExit
from pilot.vmjob.output import GuestOutput
from pilot.vmjob.rundir import RunDir, RunDirError, SlotBusy, open_guest_file, read_status, remove_run_dir

SHA_A = "a" * 64
SHA_B = "b" * 64
NOBODY = 65534

TWO_NODES = (
    "JobId=4 JobName=l.sh UserId=alice(1001) GroupId=alice(1001) MCS_label=N/A JobState=RUNNING Reason=None "
    "NodeList=node[1-2] BatchHost=node1 NumNodes=2 NumCPUs=4 NumTasks=2 CPUs/Task=2 ReqB:S:C:T=0:0:*:* "
    "TRES=cpu=4,node=2,billing=4 JOB_GRES=(null)   Nodes=node[1-2] CPU_IDs=0-1 Mem=0 GRES= MinCPUsNode=2 "
    "MinMemoryCPU=100M MinTmpDiskNode=0 Features=(null) Command=/tmp/l.sh WorkDir=/tmp StdOut=/dev/null Power= "
)
ONE_NODE = (
    "JobId=1 JobName=j.sh UserId=nobody(65534) GroupId=nogroup(65534) JobState=RUNNING NodeList=node3 "
    "NumNodes=1 NumCPUs=1 JOB_GRES=(null)   Nodes=node3 CPU_IDs=0 Mem=0 GRES= MinCPUsNode=1 MinMemoryNode=300M "
    "MinTmpDiskNode=0 Features=(null) Power= "
)


def expand(hostlist: str) -> list[str]:
    return {"node[1-2]": ["node1", "node2"]}.get(hostlist, hostlist.split(","))


# -- the image list --------------------------------------------------------------------------------


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_the_image_list_gives_each_image_its_files_and_boot(tmp_path):
    images = load_catalog(write(tmp_path / "images.conf", f"""
[debian12]
kernel = debian12/vmlinuz
kernel_sha256 = {SHA_A}
initrd = debian12/initrd.img
initrd_sha256 = {SHA_B}
cmdline = console=ttyS0 quiet
[disk-only]
disk = disk.qcow2
disk_sha256 = {SHA_B}
disk_readonly = yes
network = user
"""))
    assert sorted(images) == ["debian12", "disk-only"]
    assert (images["debian12"].network, images["disk-only"].network) == ("none", "user")
    spec = images["debian12"].spec("job", memory_mb=256, vcpus=2, console_log="c.log")
    assert (spec.kernel.path, spec.kernel.sha256, spec.initrd.path, spec.cmdline) == (
        "debian12/vmlinuz", SHA_A, "debian12/initrd.img", "console=ttyS0 quiet")
    assert (spec.memory_mb, spec.vcpus, spec.disk, spec.console_log) == (256, 2, None, "c.log")
    disk = images["disk-only"].spec("job", memory_mb=64, vcpus=1, console_log=None)
    assert disk.disk.path == "disk.qcow2" and disk.disk_readonly and disk.kernel is None


def test_every_problem_of_an_image_list_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_catalog(write(tmp_path / "images.conf", f"""
[bad name!]
kernel = k
kernel_sha256 = {SHA_A}
[no-sha]
kernel = k
[nothing]
cmdline = x
[initrd-only]
disk = d
disk_sha256 = {SHA_A}
initrd = i
initrd_sha256 = {SHA_A}
[typo]
kernal = k
[bridged]
disk = d
disk_sha256 = {SHA_A}
network = bridge
[ok]
disk = d
disk_sha256 = {SHA_A}
"""))
    problems = caught.value.problems
    assert len(problems) == 6, problems
    assert "[bad name!]: not an image name" in problems[0]
    assert "[no-sha]: kernel needs a path and kernel_sha256" in problems[1]
    assert "[nothing]: needs a disk or a kernel" in problems[2]
    assert "[initrd-only]: an initrd needs a kernel" in problems[3]
    assert "[typo]: unknown option 'kernal'" in problems[4]
    assert "[bridged]: network = 'bridge': must be one of none, user" in problems[5]


# -- Slurm's allocation ------------------------------------------------------------------------------


def test_memory_and_cpu_counts_as_slurm_writes_them():
    assert [memory_mb(t) for t in ("300M", "2G", "0", "512K", "x")] == [300, 2048, None, None, None]
    assert [count_cpu_ids(t) for t in ("0", "0-1", "0-1,4,6-7")] == [1, 2, 5]
    with pytest.raises(ValueError):
        count_cpu_ids("3-1")


def test_the_allocation_on_this_node_from_scontrols_line():
    assert parse_job(ONE_NODE, "node3", expand).__dict__ == {
        "job_id": "1", "uid": NOBODY, "node": "node3", "cpus": 1, "memory_mb": 300}
    two = parse_job(TWO_NODES, "node2", expand)
    assert (two.uid, two.cpus, two.memory_mb) == (1001, 2, 200)  # 100M per CPU, 2 CPUs here
    tracked = parse_job(ONE_NODE.replace("Mem=0", "Mem=750"), "node3", expand)
    assert tracked.memory_mb == 750  # what the node gave the job, when Slurm tracks memory


def test_a_stopping_guest_never_waits_into_slurms_sigkill():
    from pilot.vmjob.runner import RESTORE_RESERVE_S, guest_stop_wait

    assert guest_stop_wait(5, None) == 5  # outside Slurm, or it did not say: the site's stop_timeout
    assert guest_stop_wait(5, 30) == 5  # Slurm's default KillWait leaves room
    assert guest_stop_wait(2, 5) == 5 - RESTORE_RESERVE_S  # a short KillWait: the destroy and restore come first
    assert guest_stop_wait(2, 3) == 0  # shorter still: no wait, straight to the destroy


def test_slurms_kill_wait_is_read_from_the_real_scontrol(slurm_cluster):
    from pilot.batchenv import BatchClient
    from pilot.vmjob.allocation import SlurmAllocations

    client = BatchClient(slurm_conf=slurm_cluster.conf)
    assert SlurmAllocations(client).kill_wait_s() == slurm_cluster.kill_wait


def test_a_job_that_does_not_run_or_not_here_is_refused():
    with pytest.raises(AllocationError, match="job 1 is COMPLETING, not RUNNING"):
        parse_job(ONE_NODE.replace("JobState=RUNNING", "JobState=COMPLETING"), "node3", expand)
    with pytest.raises(AllocationError, match="job 4 has no cores on node node3"):
        parse_job(TWO_NODES, "node3", expand)


# -- the run directory ------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the run directory is handed to another user: needs root")
    base = tmp_path / "run"
    return RunDir(str(base), "job7.node1")


def test_the_command_is_written_by_root_then_the_control_directory_is_the_users(run_dir):
    run_dir.make(b"#!/bin/sh\ntrue\n", NOBODY, NOBODY)
    base = os.stat(run_dir.base)
    assert stat.S_IMODE(base.st_mode) == 0o711 and base.st_uid == 0
    assert stat.S_IMODE(os.stat(run_dir.path).st_mode) == 0o711
    sockets = os.stat(os.path.dirname(run_dir.socket("control")))
    assert (sockets.st_uid, stat.S_IMODE(sockets.st_mode)) == (0, 0o700)  # QEMU connects to what root bound
    control = os.stat(run_dir.control)
    assert (control.st_uid, stat.S_IMODE(control.st_mode)) == (NOBODY, 0o700)
    command = os.stat(os.path.join(run_dir.control, "command"))
    assert (command.st_uid, stat.S_IMODE(command.st_mode)) == (NOBODY, 0o700)


def test_a_slots_run_directory_is_a_tmpfs_of_its_own_that_its_user_can_fill_and_nothing_else():
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    top = tempfile.mkdtemp(prefix="workspace-vmjob-")  # not pytest's 0700 tree: the job's user passes through
    os.chmod(top, 0o755)
    capped = RunDir(os.path.join(top, "run"), "job8.node1", size_mb=4)
    capped.make(b"#!/bin/sh\ntrue\n", NOBODY, NOBODY)
    try:
        assert os.path.ismount(capped.path)
        assert stat.S_IMODE(os.stat(capped.path).st_mode) == 0o711  # the tmpfs's root, as the plain one
        before = os.statvfs(top)
        # The job's user fills its control directory: it stops at the cap, the filesystem below keeps its room.
        filler = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "dd",
                                 "if=/dev/zero", f"of={capped.control}/stdout", "bs=1M", "count=64"],
                                capture_output=True, text=True, timeout=30)
        assert filler.returncode != 0 and "No space left on device" in filler.stderr
        assert os.path.getsize(os.path.join(capped.control, "stdout")) <= 4 * 1024 * 1024
        after = os.statvfs(top)
        assert (before.f_bavail - after.f_bavail) * after.f_frsize < 1024 * 1024
    finally:
        remove_run_dir(capped.path)
    try:
        assert not os.path.exists(capped.path)
        assert capped.path not in open("/proc/self/mounts", encoding="utf-8").read()  # unmounted, not just emptied
    finally:
        shutil.rmtree(top)


def test_one_run_per_slot(run_dir):
    held = run_dir.lock()
    try:
        with pytest.raises(SlotBusy, match="already runs a VM on this node"):
            run_dir.lock()
    finally:
        run_dir.unlock(held, remove=False)
    run_dir.unlock(run_dir.lock(), remove=True)
    assert not os.path.exists(os.path.join(run_dir.base, "job7.node1.lock"))


def test_root_reads_only_the_users_own_regular_files_from_the_guest(run_dir, tmp_path):
    run_dir.make(b"#!/bin/sh\n", NOBODY, NOBODY)
    control = run_dir.control
    assert open_guest_file(os.path.join(control, "stdout"), NOBODY) is None  # not there yet
    secret = tmp_path / "secret"
    secret.write_text("root's\n")
    os.symlink(secret, os.path.join(control, "stdout"))
    with pytest.raises(RunDirError, match="Too many levels of symbolic links|not a regular file"):
        open_guest_file(os.path.join(control, "stdout"), NOBODY)
    os.link(secret, os.path.join(control, "stderr"))  # root may link it; the user could not, but check anyway
    with pytest.raises(RunDirError, match="not a regular file of uid 65534"):
        open_guest_file(os.path.join(control, "stderr"), NOBODY)
    os.mkfifo(os.path.join(control, "status"))
    with pytest.raises(RunDirError, match="not a regular file"):
        read_status(os.path.join(control, "status"), NOBODY)


@pytest.mark.parametrize("text, expected", [("3\n", 3), ("0", 0), ("255\n", 255)])
def test_the_exit_status_the_guest_wrote(run_dir, text, expected):
    run_dir.make(b"#!/bin/sh\n", NOBODY, NOBODY)
    path = os.path.join(run_dir.control, "status")
    with open(path, "w") as handle:
        handle.write(text)
    os.chown(path, NOBODY, NOBODY)
    assert read_status(path, NOBODY) == expected


@pytest.mark.parametrize("text", ["256", "-1", "three", "", "3" * 40])
def test_a_status_that_is_not_one_is_refused(run_dir, text):
    run_dir.make(b"#!/bin/sh\n", NOBODY, NOBODY)
    path = os.path.join(run_dir.control, "status")
    with open(path, "w") as handle:
        handle.write(text)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(RunDirError, match="is not an exit status from 0 to 255"):
        read_status(path, NOBODY)


def test_output_is_copied_as_it_grows_once_and_up_to_the_limit(tmp_path):
    control = tmp_path / "control"
    control.mkdir()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    uid = os.getuid()
    output = GuestOutput(str(control), uid, limit=10, stdout=out_w, stderr=err_w)
    assert not output.pump()  # nothing written yet
    with open(control / "stdout", "w") as handle:
        handle.write("line 1\n")
        handle.flush()
        assert output.pump() and os.read(out_r, 100) == b"line 1\n"
        handle.write("line 2\n")
        handle.flush()
        output.pump()
    (control / "stderr").write_text("oops\n")
    output.close()
    output.pump()  # after close: nothing is read twice
    os.close(out_w)
    os.close(err_w)
    assert os.read(out_r, 100) == b"lin" and os.read(err_r, 100) == b"oops\n"
    assert output.problems() == [f"{control}/stdout: more than 10 bytes; the rest is not copied"]


# -- the journal -------------------------------------------------------------------------------------


def test_a_run_directory_is_journalled_and_undoing_the_entry_removes_it(tmp_path):
    journal = Journal(str(tmp_path / "journal"))
    journal.prepare()
    leftover = tmp_path / "run" / "job9.node1"
    (leftover / "control").mkdir(parents=True)
    (leftover / "control" / "stdout").write_text("x")
    dead = Entry("job9.node1", "node1", Owner(999999, 1, Owner.current().boot), run_dir=str(leftover))
    journal.write(dead)
    (entry,) = journal.entries()
    assert entry.run_dir == str(leftover) and not entry.empty
    assert "removed" in undo_entry(journal, entry, 1.0)
    assert not leftover.exists() and journal.entries() == []


@pytest.mark.parametrize("run_dir", ["relative", "/a/../b", "/"])
def test_an_entry_with_a_bad_run_directory_is_not_an_entry(run_dir):
    raw = Entry("job9.node1", "node1", Owner(1, 1, "b")).to_json().replace(b'"run_dir": null',
                                                                          f'"run_dir": "{run_dir}"'.encode())
    with pytest.raises(ValueError, match="run_dir"):
        Entry.from_json(raw)


# -- the command line --------------------------------------------------------------------------------


def vmjob(*args: str, **options) -> subprocess.CompletedProcess:
    command = os.path.join(os.path.dirname(sys.executable), "workspace-vmjob")
    return subprocess.run([command, *args], capture_output=True, text=True, timeout=60, **options)


def test_usage_errors_are_one_line_and_their_own_code():
    for args, words in [(["run", "--image", "x"], "give a COMMAND after '--', or --script FILE"),
                        (["run", "--image", "x", "--script", "-", "--", "true"], "not both"),
                        (["run", "--image", "x", "--memory", "lots", "--", "true"], "is not a whole number")]:
        result = vmjob(*args)
        assert result.returncode == VmJobExit.USAGE, (args, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and words in result.stderr


def test_an_unknown_image_or_one_whose_file_changed_runs_nothing_and_changes_nothing(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "vmlinuz").write_bytes(b"not the kernel the list names")
    image_list = write(tmp_path / "images.conf", f"[test]\nkernel = vmlinuz\nkernel_sha256 = {SHA_A}\n")
    config = write(tmp_path / "pilot.conf", f"""
[memory]
backend = none
[journal]
dir = {tmp_path}/journal
[vms]
image_dir = {images}
console_dir = {tmp_path}/consoles
[vmjob]
images = {image_list}
run_dir = {tmp_path}/run
[logging]
dir = {tmp_path}/logs
""")
    unknown = vmjob("run", "--config", config, "--image", "debian", "--", "true")
    assert unknown.returncode == VmJobExit.IMAGE
    assert unknown.stderr == "workspace-vmjob: image 'debian' is not on this node's list (known: test)\n"
    changed = vmjob("run", "--config", config, "--image", "test", "--memory", "64", "--", "true")
    assert changed.returncode == VmJobExit.IMAGE, changed.stderr
    assert "kernel: vmlinuz has sha256" in changed.stderr and f"not the {SHA_A} asked for" in changed.stderr
    assert not any(p.endswith(".json") for p in os.listdir(tmp_path / "journal"))
    assert os.listdir(tmp_path / "run") == []  # the slot's lock went with the run
    listed = vmjob("images", "--config", config)
    assert (listed.returncode, listed.stdout) == (0, "test: kernel vmlinuz\n")


def test_a_bad_image_list_is_a_config_error(tmp_path):
    image_list = write(tmp_path / "i.conf", "[x]\ncmdline = y\n")
    config = write(tmp_path / "pilot.conf", f"[vmjob]\nimages = {image_list}\n")
    result = vmjob("images", "--config", config)
    assert result.returncode == VmJobExit.CONFIG
    assert result.stderr.startswith("workspace-vmjob: image list: ") and "needs a disk or a kernel" in result.stderr


def test_the_exit_code_table_says_each_code_once():
    codes = [line.split()[0] for line in cli.EXIT_CODES_HELP.splitlines()[1:] if line[:7].strip()]
    assert codes == ["0-255"] + [str(code.value) for code in VmJobExit]


def test_a_share_daemon_runs_as_the_user_and_its_log_stays_bounded(tmp_path):
    """The daemon's messages reach the root-owned log only up to LOG_LIMIT: it runs as the user, who could
    make it write without end. A stand-in for virtiofsd (a shell script) writes 1 MB and says who it is."""
    if os.geteuid() != 0:
        pytest.skip("starts a process as another user: needs root")
    from pilot.vmjob.virtiofs import LOG_LIMIT, ShareDaemon

    public = tempfile.mkdtemp(prefix="wp-share-")  # pytest's tmp dirs are root's alone; nobody must exec this
    try:
        os.chmod(public, 0o755)
        stand_in = os.path.join(public, "virtiofsd")
        with open(stand_in, "w") as handle:
            handle.write("#!/bin/sh\nid -u >&2\nhead -c 1048576 /dev/zero | tr '\\\\0' x >&2\n")
        os.chmod(stand_in, 0o755)
        (tmp_path / "sock").mkdir()
        daemon = ShareDaemon("workdir", public, str(tmp_path / "sock" / "w.sock"), virtiofsd=stand_in,
                             uid=NOBODY, gid=NOBODY, log_path=str(tmp_path / "share.log"))
        daemon.start()
        deadline = time.monotonic() + 30
        while daemon.process.poll() is None and time.monotonic() < deadline:
            daemon.drain()  # as the wrapper's poll does: a pipe nobody reads would stop the daemon
            time.sleep(0.01)
        daemon.stop()
        log = (tmp_path / "share.log").read_bytes()
        assert len(log) == LOG_LIMIT
        assert log.startswith(b"0\n")  # uid 0 inside its user namespace...
        assert "its virtiofsd exited with 0" in daemon.failed()  # ...and said so when asked why it is gone
        assert os.stat(stand_in).st_uid == 0
    finally:
        shutil.rmtree(public)
