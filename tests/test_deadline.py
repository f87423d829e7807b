"""The pilot's own deadline: the requested duration against every walltime source.

Slurm and its Torque wrapper are not installed on the test machines yet, so
the command sources run *fake* ``squeue``/``qstat`` executables: tiny shell
scripts under ``tmp_path/bin`` that print what the real commands print, run
as real subprocesses found on the [batch] path of the client under test
(:class:`pilot.batchenv.BatchClient`, what pilot.conf configures). That path
holds only the fakes' directory, so a real Slurm installed later never
answers in their place; a PATH in the job's environment is never looked at.
"""

from __future__ import annotations

import calendar
import json
import logging
import os
import subprocess
import sys
import time

import pytest

from pilot.batchenv import BatchClient
from pilot.deadline import Deadline, DeadlineError, compute_deadline, extended_deadline, walltime_end
from pilot.walltime import base as walltime_base
from pilot.walltime.base import parse_walltime as _parse_walltime
from pilot.walltime.qstat_full import parse_ctime as _parse_ctime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = 1.0 / os.sysconf("SC_CLK_TCK")
T = float(int(time.time()))  # "now" for the tests that fix it: whole seconds, so ends compare exactly


#: A client that finds no batch-system command at all.
NO_COMMANDS = BatchClient(path="/nonexistent")


def fixed_now():
    return T


#: The last source's answer once /proc is hidden: counted from "now" (T), so it is the same on any machine.
ESTIMATE = "PBS_WALLTIME (estimate: counted from now)"


@pytest.fixture
def no_proc(monkeypatch, tmp_path):
    """Hide /proc from the module: PBS_WALLTIME counts from now(), whenever this test's session began."""
    monkeypatch.setattr(walltime_base, "PROC", str(tmp_path / "no-proc"))


class CountingRun:
    """subprocess.run, counting what it ran (the commands still really run)."""

    def __init__(self):
        self.commands: list[str] = []

    def __call__(self, argv, **options):
        self.commands.append(os.path.basename(argv[0]))
        return subprocess.run(argv, **options)


@pytest.fixture
def fakes(tmp_path):
    """A directory for fake LRM commands; ``fakes.add(name, comment, body)`` writes one."""

    class Fakes:
        bin = tmp_path / "bin"

        def add(self, name: str, comment: str, body: str) -> None:
            self.bin.mkdir(exist_ok=True)
            path = self.bin / name
            path.write_text(f"#!/bin/sh\n# fake {name}: {comment}\n{body}\n")
            path.chmod(0o755)

        @property
        def client(self) -> BatchClient:
            self.bin.mkdir(exist_ok=True)
            return BatchClient(path=str(self.bin))

        def env(self, **variables: str) -> dict[str, str]:
            return dict(variables)

    return Fakes()


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pilot.deadline" and r.levelno == logging.WARNING]


def squeue_fake(fakes, job: str, output: str) -> None:
    # Checks the arguments and the pinned time format, as the real squeue's output depends on both.
    fakes.add(
        "squeue", "prints what Slurm 22.05's squeue -h -o %e prints",
        f'[ "$*" = "-h -j {job} -o %e" ] || {{ echo "fake squeue: unexpected arguments: $*" >&2; exit 2; }}\n'
        '[ "$SLURM_TIME_FORMAT" = standard ] || { echo "fake squeue: SLURM_TIME_FORMAT not pinned" >&2; exit 2; }\n'
        f"printf '%s\\n' '{output}'",
    )


def qstat_fake(fakes, job: str, comment: str, output: str) -> None:
    fakes.add(
        "qstat", comment,
        # slurm-wlm-torque's qstat exits 153 when no job matches the id
        f'[ "$*" = "-f {job}" ] || exit 153\n'
        f"/bin/cat <<'EOF'\n{output}EOF",
    )


def ctime(epoch: float) -> str:
    """What Perl's scalar localtime (and ctime(3)) prints: English names, day padded with a space."""
    days = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
    months = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
    t = time.localtime(epoch)
    clock = f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    return f"{days[t.tm_wday]} {months[t.tm_mon - 1]} {t.tm_mday:2d} {clock} {t.tm_year}"


# --- duration and SLURM_JOB_END_TIME ---------------------------------------------------------------


def test_duration_only_outside_a_batch_job():
    run = CountingRun()
    found = compute_deadline(started=T, duration_s=600, grace_s=10, margin_s=30, env={},
                             client=NO_COMMANDS, query_timeout=1, run=run, now=fixed_now)
    assert found == Deadline(T + 600, "duration", None)
    assert run.commands == []


def test_earlier_slurm_job_end_time_wins_less_margin_and_grace(fakes):
    # squeue would fail the test if asked: the variable must answer without any query.
    fakes.add("squeue", "must not run", "echo 'fake squeue ran' >&2; exit 99")
    run = CountingRun()
    env = fakes.env(SLURM_JOB_END_TIME=str(int(T) + 600), SLURM_JOB_ID="4242")
    found = compute_deadline(started=T, duration_s=3600, grace_s=20, margin_s=30, env=env,
                             client=fakes.client, query_timeout=1, run=run, now=fixed_now)
    assert found == Deadline(T + 600 - 30 - 20, "SLURM_JOB_END_TIME", T + 600)
    assert found.remaining(now=T) == 550
    assert run.commands == []


def test_later_slurm_job_end_time_loses_to_the_duration():
    env = {"SLURM_JOB_END_TIME": str(int(T) + 7200)}
    found = compute_deadline(started=T, duration_s=3600, grace_s=20, margin_s=30, env=env,
                             client=NO_COMMANDS, query_timeout=1, now=fixed_now)
    assert found == Deadline(T + 3600, "duration", T + 7200)


def test_remaining_counts_from_the_real_clock_by_default():
    found = Deadline(time.time() + 100, "duration", None)
    assert 99 < found.remaining() <= 100


@pytest.mark.parametrize("left, phrase", [(45, "in 45 s"), (40, "in 40 s"), (-5, "5 s ago")])
def test_a_walltime_that_leaves_no_time_is_an_error_naming_the_numbers(left, phrase):
    # 45 s left with margin 30 + grace 15: the deadline would be now itself, which is no time either.
    env = {"SLURM_JOB_END_TIME": str(int(T) + left)}
    with pytest.raises(DeadlineError) as raised:
        compute_deadline(started=T, duration_s=3600, grace_s=15, margin_s=30, env=env,
                         client=NO_COMMANDS, query_timeout=1, now=fixed_now)
    message = str(raised.value)
    assert "\n" not in message
    for part in (phrase, "SLURM_JOB_END_TIME", "walltime margin of 30 s", "grace of 15 s",
                 "longer walltime", "smaller walltime_margin", time.strftime("%H:%M:%S", time.localtime(T + left))):
        assert part in message, (part, message)


def test_one_second_to_spare_is_enough():
    env = {"SLURM_JOB_END_TIME": str(int(T) + 46)}
    found = compute_deadline(started=T, duration_s=3600, grace_s=15, margin_s=30, env=env,
                             client=NO_COMMANDS, query_timeout=1, now=fixed_now)
    assert found == Deadline(T + 1, "SLURM_JOB_END_TIME", T + 46)


@pytest.mark.parametrize("value", ["soon", "", "-5", "0", "1.5e9"])
def test_a_bad_slurm_job_end_time_is_skipped_with_a_warning(value, caplog):
    assert walltime_end({"SLURM_JOB_END_TIME": value}, client=NO_COMMANDS, query_timeout=1, now=fixed_now) is None
    assert any("SLURM_JOB_END_TIME" in w and "not an epoch time" in w for w in warnings_of(caplog))


@pytest.mark.parametrize("offset, why", [(-2 * 86400, "in the past"), (4 * 366 * 86400, "three years")])
def test_an_absurd_end_is_ignored_and_the_next_source_asked(offset, why, caplog, no_proc):
    env = {"SLURM_JOB_END_TIME": str(int(T + offset)), "PBS_WALLTIME": "600"}
    assert walltime_end(env, client=NO_COMMANDS, query_timeout=1, now=fixed_now) == (T + 600, ESTIMATE)
    assert any("SLURM_JOB_END_TIME" in w and why in w for w in warnings_of(caplog))


# --- PBS_WALLTIME from the session leader's start --------------------------------------------------

CHILD = """
import json, logging
from pilot.deadline import compute_deadline, walltime_end
logging.basicConfig(level=logging.WARNING)
env = {"PBS_WALLTIME": "3600"}
end, source = walltime_end(env, query_timeout=1)
found = compute_deadline(started=end - 7200, duration_s=7200, grace_s=20, margin_s=30, env=env, query_timeout=1)
print(json.dumps([end, source, found.at, found.source, found.walltime_end]))
"""


def test_pbs_walltime_counts_from_the_session_leaders_start():
    # The child is its own session leader (start_new_session), so its fork is the start to find.
    before = time.time()
    child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    after = time.time()  # Popen returns once the child has exec'd: its fork lies in [before, after]
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    end, source, at, deadline_source, walltime = json.loads(out)
    assert source == "PBS_WALLTIME"
    # starttime is whole clock ticks, cut down: up to a tick early, never later than the fork.
    assert before - 2 * TICK <= end - 3600 <= after + TICK, (before, end - 3600, after)
    # compute_deadline asked again: the boot time is re-read, so equal to well under a tick.
    assert deadline_source == "PBS_WALLTIME"
    assert (at, walltime) == (pytest.approx(end - 50, abs=1e-3), pytest.approx(end, abs=1e-3))
    assert err == ""  # no warning: the start was read, not estimated


BTIME_CHILD = """
import json, os
from pilot.walltime import base
with open(f"/proc/{os.getsid(0)}/stat", "rb") as handle:
    stat = handle.read()
ticks = int(stat[stat.rindex(b")") + 2:].split()[19])
with open("/proc/stat", encoding="ascii") as handle:
    btime = next(int(line.split()[1]) for line in handle if line.startswith("btime "))
print(json.dumps([btime + ticks / os.sysconf("SC_CLK_TCK"), base.session_start()]))
"""


def test_session_start_agrees_with_proc_stat_btime():
    # The same computation from /proc/stat's btime (whole seconds) as the pilot's docs describe it.
    # In a child that leads its own session: under CI the runner's session leader may sit outside
    # this pid namespace (getsid gives 0), which _session_start rightly refuses.
    out = subprocess.run([sys.executable, "-c", BTIME_CHILD], cwd=REPO, start_new_session=True,
                         capture_output=True, text=True, timeout=30, check=True).stdout
    expected, found = json.loads(out)
    assert abs(found - expected) <= 1 + TICK  # btime drops its second's fraction


def test_session_start_outside_this_pid_namespace_is_an_error(monkeypatch):
    # getsid() is 0 when the session leader lives in a parent pid namespace (containers, CI).
    monkeypatch.setattr(walltime_base.os, "getsid", lambda pid: 0)
    with pytest.raises(OSError, match="outside this pid namespace"):
        walltime_base.session_start()


def test_pbs_walltime_without_proc_is_counted_from_now_and_says_so(no_proc, caplog):
    assert walltime_end({"PBS_WALLTIME": "3600"}, client=NO_COMMANDS, query_timeout=1, now=fixed_now) == (T + 3600, ESTIMATE)
    assert any("counting from now" in w for w in warnings_of(caplog))


def test_a_bad_pbs_walltime_is_skipped(caplog):
    assert walltime_end({"PBS_WALLTIME": "forever"}, client=NO_COMMANDS, query_timeout=1, now=fixed_now) is None
    assert any("PBS_WALLTIME" in w and "'forever'" in w for w in warnings_of(caplog))


# --- squeue ----------------------------------------------------------------------------------------


def test_squeue_end_is_read_in_local_time(fakes, local_tz):
    end = T + 3 * 3600
    wall_clock = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(end - local_tz))  # as squeue prints it in UTC-5
    squeue_fake(fakes, "4242", wall_clock)
    run = CountingRun()
    assert walltime_end(fakes.env(SLURM_JOB_ID="4242"), client=fakes.client, query_timeout=5, run=run, now=fixed_now) == (end, "squeue")
    assert run.commands == ["squeue"]
    assert calendar.timegm(time.strptime(wall_clock, "%Y-%m-%dT%H:%M:%S")) == end - local_tz  # not read as UTC


def test_squeue_na_falls_through_to_qstat(fakes, caplog):
    squeue_fake(fakes, "4242", "N/A")
    qstat_fake(fakes, "4242", "Torque 6's qstat -f, an excerpt", "Job Id: 4242\n    Walltime.Remaining = 1200\n")
    run = CountingRun()
    env = fakes.env(SLURM_JOB_ID="4242", PBS_JOBID="4242")
    assert walltime_end(env, client=fakes.client, query_timeout=5, run=run, now=fixed_now) == (T + 1200, "qstat -f")
    assert run.commands == ["squeue", "qstat"]
    assert any("squeue" in w and "no end time known" in w and "'N/A'" in w for w in warnings_of(caplog))


def test_a_failing_squeue_falls_through_with_its_message(fakes, caplog, no_proc):
    fakes.add("squeue", "what Slurm 22.05's squeue says for a job it does not know",
              "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1")
    env = fakes.env(SLURM_JOB_ID="4242", PBS_WALLTIME="600")
    assert walltime_end(env, client=fakes.client, query_timeout=5, now=fixed_now)== (T + 600, ESTIMATE)
    assert any("exited with status 1" in w and "Invalid job id specified" in w for w in warnings_of(caplog))


def test_a_hanging_squeue_is_given_up_after_the_query_timeout(fakes, caplog, no_proc):
    fakes.add("squeue", "a slurmctld that does not answer", "exec /bin/sleep 30")
    env = fakes.env(SLURM_JOB_ID="4242", PBS_WALLTIME="600")
    # The fall-through to PBS_WALLTIME and the warning show the query was given up; how fast is
    # the benchmark's business, not a test's.
    assert walltime_end(env, client=fakes.client, query_timeout=0.3, now=fixed_now) == (T + 600, ESTIMATE)
    assert any("no answer within 0.3 s" in w for w in warnings_of(caplog))


def test_missing_commands_fall_through(fakes, caplog):
    run = CountingRun()
    env = fakes.env(SLURM_JOB_ID="4242", PBS_JOBID="4242.head")  # an empty bin: no squeue, no qstat
    assert walltime_end(env, client=fakes.client, query_timeout=5, run=run, now=fixed_now) is None
    assert run.commands == []
    found = warnings_of(caplog)
    assert any("squeue not found in [batch] path" in w for w in found)
    assert any("qstat not found in [batch] path" in w for w in found)


@pytest.mark.parametrize("output", ["tomorrow at noon", "2026-13-45T99:00:00", "1795223927"])
def test_garbage_from_squeue_falls_through_with_a_warning(fakes, caplog, output):
    squeue_fake(fakes, "4242", output)
    assert walltime_end(fakes.env(SLURM_JOB_ID="4242"), client=fakes.client, query_timeout=5, now=fixed_now) is None
    found = warnings_of(caplog)
    assert len(found) == 1 and "\n" not in found[0]
    assert "walltime source squeue" in found[0] and repr(output) in found[0]


# --- qstat -f --------------------------------------------------------------------------------------


def test_qstat_walltime_remaining_is_preferred(fakes):
    # start_time + walltime would say T + 3600; Walltime.Remaining (the LRM's own count) says T + 3540.
    qstat_fake(fakes, "4242.head", "Torque 6's qstat -f, an excerpt (4-space indent, seconds remaining)", (
        "Job Id: 4242.head\n"
        "    Job_Name = pilot\n"
        "    job_state = R\n"
        "    Resource_List.walltime = 01:00:00\n"
        f"    start_time = {ctime(T)}\n"
        "    Walltime.Remaining = 3540\n"
    ))
    env = fakes.env(PBS_JOBID="4242.head")
    assert walltime_end(env, client=fakes.client, query_timeout=5, now=fixed_now) == (T + 3540, "qstat -f")


def test_qstat_torque_start_time_plus_walltime(fakes):
    qstat_fake(fakes, "4242.head", "Torque's qstat -f before Walltime.Remaining, an excerpt", (
        "Job Id: 4242.head\n"
        "    job_state = R\n"
        f"    ctime = {ctime(T - 900)}\n"
        f"    start_time = {ctime(T - 600)}\n"
        "    Resource_List.walltime = 1:00:00:00\n"
    ))
    env = fakes.env(PBS_JOBID="4242.head")
    assert walltime_end(env, client=fakes.client, query_timeout=5, now=fixed_now) == (T - 600 + 86400, "qstat -f")


# What slurm-wlm-torque 22.05's qstat (a Perl script) prints for `qstat -f <id>`, from its
# print_job_full: tab-indented; Slurm's start time as mtime and its end time as ctime, both as
# Perl's scalar localtime; Resource_List.walltime = hhmmss(time_limit * 60), hours unbounded.
# It prints no start_time and no Walltime.Remaining.
SLURM_QSTAT_F = (
    "Job Id:\t4242\n"
    "\tJob_Name = pilot\n"
    "\tJob_Owner = root@node1\n"
    "\tjob_state = R\n"
    "\tqueue = debug\n"
    "\tqtime = {submitted}\n"
    "\tmtime = {started}\n"
    "\tctime = {ends}\n"
    "\texec_host = node1/1\n"
    "\tPriority = 4294901759\n"
    "\teuser = root(0)\n"
    "\tegroup = root(0)\n"
    "\tResource_List.walltime = {walltime}\n"
    "\tResource_List.nodect = 1\n"
    "\tResource_List.ncpus = 1\n"
    "\n"
)


@pytest.mark.parametrize("walltime, seconds, end_after_start", [
    ("02:00:00", 7200, 7200),
    ("48:00:00", 172800, 172800),
    # TimeLimit=UNLIMITED: 0xffffffff minutes, printed as hours; Slurm sets end_time a year on.
    ("71582788:15:00", 257698037700, 365 * 86400),
])
def test_qstat_from_slurm_wlm_torque(fakes, local_tz, walltime, seconds, end_after_start):
    started = T - 600
    qstat_fake(fakes, "4242", "prints what slurm-wlm-torque 22.05's qstat -f prints (print_job_full)",
               SLURM_QSTAT_F.format(submitted=ctime(started - 2), started=ctime(started),
                                    ends=ctime(started + end_after_start), walltime=walltime))
    env = fakes.env(PBS_JOBID="4242")
    assert walltime_end(env, client=fakes.client, query_timeout=5, now=fixed_now) == (started + min(seconds, end_after_start), "qstat -f")


def test_qstat_openpbs_stime_plus_walltime(fakes):
    qstat_fake(fakes, "77.pbs", "OpenPBS's qstat -f, an excerpt (stime is the start)", (
        "Job Id: 77.pbs\n"
        "    job_state = R\n"
        f"    ctime = {ctime(T - 900)}\n"
        f"    mtime = {ctime(T - 10)}\n"
        "    Resource_List.walltime = 00:30:00\n"
        "    resources_used.walltime = 00:10:00\n"
        f"    stime = {ctime(T - 600)}\n"
    ))
    env = fakes.env(PBS_JOBID="77.pbs")
    assert walltime_end(env, client=fakes.client, query_timeout=5, now=fixed_now) == (T - 600 + 1800, "qstat -f")


@pytest.mark.parametrize("output, problem", [
    ("", "no job 4242"),
    ("Job Id:\t4242\n\tjob_state = R\n\tqueue = debug\n", "neither Walltime.Remaining"),
    ("Job Id: 4242\n    Walltime.Remaining = soon\n", "unparsable Walltime.Remaining 'soon'"),
    ("Job Id:\t4242\n\tmtime = yesterday\n\tResource_List.walltime = 01:00:00\n", "unparsable mtime 'yesterday'"),
])
def test_garbage_from_qstat_falls_through_with_a_warning(fakes, caplog, no_proc, output, problem):
    qstat_fake(fakes, "4242", "printing nonsense", output)
    env = fakes.env(PBS_JOBID="4242", PBS_WALLTIME="600")
    assert walltime_end(env, client=fakes.client, query_timeout=5, now=fixed_now)== (T + 600, ESTIMATE)
    found = [w for w in warnings_of(caplog) if w.startswith("walltime source qstat -f")]
    assert len(found) == 1 and "\n" not in found[0] and problem in found[0], found


def test_qstat_for_an_unknown_job_falls_through(fakes, caplog):
    qstat_fake(fakes, "4242", "slurm-wlm-torque's qstat for another job id: nothing, exit 153", "")
    assert walltime_end(fakes.env(PBS_JOBID="999"), client=fakes.client, query_timeout=5, now=fixed_now) is None
    assert any("exited with status 153" in w for w in warnings_of(caplog))


# --- the parsers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("3540", 3540),
    ("0", 0),
    ("59:00", 3540),
    ("90:00", 5400),
    ("01:00:00", 3600),
    ("1:2:3", 3723),
    ("48:00:00", 172800),
    ("1:02:03:04", 93784),
    ("1-02:03:04", 93784),
    ("0-00:00:05", 5),
    (" 00:30:00\n", 1800),
])
def test_walltime_formats(text, seconds):
    assert _parse_walltime(text) == seconds


@pytest.mark.parametrize("text", [
    "", "  ", "abc", "Infinite", "UNLIMITED", "-5", "1.5", "01:60:00", "01:00:60", "1:24:00:00",
    "1-24:00:00", "1-02:03", "1:2:3:4:5", ":30", "30:", "1::00", "\u0663\u0660", "01:00:00 extra",
])
def test_bad_walltimes_are_rejected(text):
    with pytest.raises(ValueError):
        _parse_walltime(text)


def test_ctime_is_read_in_local_time_with_english_names(local_tz):
    assert _parse_ctime("Thu Sep  9 01:46:40 2027") == calendar.timegm((2027, 9, 9, 1, 46, 40)) + local_tz
    assert _parse_ctime("Sat Nov 21 10:00:00 2026") == calendar.timegm((2026, 11, 21, 10, 0, 0)) + local_tz
    for bad in ("Infinite", "Foo Nov 21 10:00:00", "Sat Nov 31 10:00:00 2026", "Sat Xyz 21 10:00:00 2026"):
        with pytest.raises(ValueError):
            _parse_ctime(bad)


def test_a_time_repeated_by_a_dst_change_reads_as_the_earlier_one():
    old = os.environ.get("TZ")
    os.environ["TZ"] = "EST5EDT,M3.2.0,M11.1.0"  # POSIX rule: no tzdata needed
    time.tzset()
    try:
        # 2026-11-01 01:30 happens twice in New York: 05:30Z (EDT) and 06:30Z (EST).
        assert _parse_ctime("Sun Nov  1 01:30:00 2026") == calendar.timegm((2026, 11, 1, 5, 30, 0))
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


def test_grid_engines_run_time_limit_is_the_least_of_h_rt_and_s_rt():
    from pilot.walltime.sge import sge_runtime_limit

    shown = ("job_number:                 7\nhard resource_list:         h_rt=3600,mem_free=32M,s_rt=0:50:00\n"
             "soft resource_list:         h_rt=10\n")
    assert sge_runtime_limit(shown) == 3000  # soft requests do not limit anything
    assert sge_runtime_limit("job_number: 7\nhard resource_list:         mem_free=32M\n") is None
    assert sge_runtime_limit("job_number: 7\n") is None


# --- an extension ------------------------------------------------------------------------------------


def test_an_extension_asks_squeue_for_the_new_end_not_the_variable_fixed_at_the_jobs_start(fakes):
    old = compute_deadline(started=T, duration_s=3600, grace_s=20, margin_s=30, client=fakes.client, query_timeout=1, now=fixed_now,
                           env=fakes.env(SLURM_JOB_END_TIME=str(int(T) + 600), SLURM_JOB_ID="4242"))
    assert old == Deadline(T + 550, "SLURM_JOB_END_TIME", T + 600)
    squeue_fake(fakes, "4242", time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(T + 1200)))
    run = CountingRun()
    env = fakes.env(SLURM_JOB_END_TIME=str(int(T) + 600), SLURM_JOB_ID="4242")
    new = extended_deadline(old, started=T, duration_s=3600, grace_s=20, margin_s=30, env=env, client=fakes.client, query_timeout=5,
                            run=run, now=fixed_now)
    assert new == Deadline(T + 1200 - 50, "squeue", T + 1200)
    assert run.commands == ["squeue"]


def test_an_extension_the_duration_bounds_takes_the_new_duration(fakes):
    squeue_fake(fakes, "4242", time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(T + 7200)))
    old = Deadline(T + 600, "duration", T + 3600)
    new = extended_deadline(old, started=T, duration_s=900, grace_s=20, margin_s=30, client=fakes.client, query_timeout=5,
                            env=fakes.env(SLURM_JOB_ID="4242"), now=fixed_now)
    assert new == Deadline(T + 900, "duration", T + 7200)


def test_without_a_live_source_the_end_known_before_still_bounds_an_extension(fakes, caplog):
    fakes.add("squeue", "a slurmctld that is down", "echo 'slurm_load_jobs error: Unable to contact' >&2; exit 1")
    old = Deadline(T + 550, "SLURM_JOB_END_TIME", T + 600)
    env = fakes.env(SLURM_JOB_END_TIME=str(int(T) + 600), SLURM_JOB_ID="4242")
    # The service said the limit was raised, but nothing the pilot can ask says so: it keeps its deadline.
    assert extended_deadline(old, started=T, duration_s=3600, grace_s=20, margin_s=30, env=env, client=fakes.client, query_timeout=5,
                             now=fixed_now) is old
    assert any("Unable to contact" in w for w in warnings_of(caplog))


def test_an_extension_never_moves_the_deadline_earlier(fakes):
    squeue_fake(fakes, "4242", time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(T + 300)))
    old = Deadline(T + 550, "SLURM_JOB_END_TIME", T + 600)
    new = extended_deadline(old, started=T, duration_s=3600, grace_s=20, margin_s=30, client=fakes.client, query_timeout=5,
                            env=fakes.env(SLURM_JOB_ID="4242"), now=fixed_now)
    assert new is old

