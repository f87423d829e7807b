"""A VM job's share of its batch job (pilot.vmjob.jobshare) on the kernel's real cgroup v1 memory controller.

The cgroups here are the test's own (``wptest-jobshare-<pid>/job_42`` under the memory hierarchy), made and
removed by the test; a real process filling memory in them stands for the job's own processes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from pilot.vmjob.jobshare import (
    JobShareError, cpuset_text, job_cpus, job_memory_cgroup, lower_limit, read_limit, restore_limit,
)

MEMORY = "/sys/fs/cgroup/memory"
MB = 1024 * 1024


def test_cpusets_are_written_as_the_kernel_and_libvirt_read_them():
    assert cpuset_text([0, 1, 2, 5]) == "0-2,5"
    assert cpuset_text([3]) == "3" and cpuset_text([0, 2, 4]) == "0,2,4" and cpuset_text([]) == ""
    assert set(job_cpus()) == os.sched_getaffinity(0)


def test_the_jobs_cgroup_is_the_kernels_path_for_the_process_and_must_name_the_job(tmp_path):
    job = tmp_path / "slurm_node1" / "uid_0" / "job_42"
    (job / "step_batch").mkdir(parents=True)
    proc = tmp_path / "cgroup"
    proc.write_text("5:devices:/\n4:memory:/slurm_node1/uid_0/job_42/step_batch/task_0\n3:cpuset:/\n")
    assert job_memory_cgroup("42", proc_cgroup=str(proc), root=str(tmp_path)) == str(job)
    assert job_memory_cgroup("4", proc_cgroup=str(proc), root=str(tmp_path)) is None  # job_42 is not job_4
    proc.write_text("4:memory:/process_api/abc\n")
    assert job_memory_cgroup("42", proc_cgroup=str(proc), root=str(tmp_path)) is None
    assert job_memory_cgroup("42", proc_cgroup=str(tmp_path / "none"), root=str(tmp_path)) is None


@pytest.fixture
def job_cgroup():
    if os.geteuid() != 0 or not os.access(MEMORY, os.W_OK):
        pytest.skip("needs root and a writable cgroup v1 memory controller")
    top = os.path.join(MEMORY, f"wptest-jobshare-{os.getpid()}")
    job = os.path.join(top, "job_42")
    os.makedirs(job)
    filler = None
    try:
        with open(os.path.join(job, "memory.limit_in_bytes"), "w", encoding="ascii") as handle:
            handle.write(str(200 * MB))
        # The job's own processes: 80 MB touched, in the job's cgroup from before they allocate.
        filler = subprocess.Popen(
            [sys.executable, "-c", "import sys; b = bytearray(80 << 20); b[::4096] = b'x' * len(b[::4096]); "
             "print('ready', flush=True); sys.stdin.read()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            preexec_fn=lambda: open(os.path.join(job, "cgroup.procs"), "w").write(str(os.getpid())))
        assert filler.stdout.readline().strip() == "ready"
        yield job
    finally:
        if filler is not None:
            filler.kill()
            filler.wait()
        os.rmdir(job)
        os.rmdir(top)


def test_the_limit_is_lowered_by_the_vm_only_while_the_jobs_processes_fit_beside_it(job_cgroup):
    assert read_limit(job_cgroup) == 200 * MB
    assert lower_limit(job_cgroup, 200 * MB, 64) == 136 * MB
    assert read_limit(job_cgroup) == 136 * MB
    restore_limit(job_cgroup, 200 * MB)
    assert read_limit(job_cgroup) == 200 * MB
    with pytest.raises(JobShareError) as refused:
        lower_limit(job_cgroup, 200 * MB, 150)
    assert re.fullmatch(r"memory: the job's processes use (\d+) MB of its 200 MB; a VM taking 150 MB does not fit "
                        r"beside them \(at most (\d+) MB does, VM overhead included\)", str(refused.value))
    used, room = map(int, re.findall(r"\d+", str(refused.value))[:1] + re.findall(r"at most (\d+)", str(refused.value)))
    assert 80 <= used < 150 and 200 - used - 2 <= room < 200 - used
    assert read_limit(job_cgroup) == 200 * MB  # nothing changed
    restore_limit(os.path.join(job_cgroup, "gone"), 1)  # a job whose cgroup is gone: nothing to do


def test_whoever_undoes_a_dead_wrappers_entry_gives_the_job_its_limit_back(job_cgroup, tmp_path):
    from pilot.node.journal import Entry, Journal
    from pilot.recovery import undo_entry
    from pilot.node.owner import Owner

    journal = Journal(str(tmp_path / "journal"))
    journal.prepare()
    entry = Entry("job42.node1", "node1", Owner.current(), job_limit=(job_cgroup, 200 * MB))
    journal.write(entry)
    lower_limit(job_cgroup, 200 * MB, 64)  # the wrapper died here, its VM's share still off the job's limit
    assert Entry.from_json(entry.to_json()) == entry
    said = undo_entry(journal, entry, verify_timeout=5)
    assert f"gave job cgroup {job_cgroup} its memory limit back" in said
    assert read_limit(job_cgroup) == 200 * MB
    assert [e for e in journal.entries() if isinstance(e, Entry)] == []
