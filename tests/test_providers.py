"""The providers against real batch systems: a real 4-node Slurm with real sbatch, and SchedMD's real qsub.

The payload of every job is a stand-in for workspace-pilot (named as such
below), run through the real ``sudo -n --preserve-env=...`` as the job
script says: it records its arguments, its Slurm node and the batch
variables it received, then sleeps until SIGTERM or exits as a test
needs. The cluster is the session fixture ``slurm_cluster``
(tests/support/slurm_cluster.py); each test scancels what it submitted, by id, and
fails if a job outlives it. The local provider runs its stand-in pilots as
real processes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import stat
import subprocess
import sys
import time

import pytest

from workspace_common.protocol import BATCH_ENV
from service_adapter.providers.jobscript import JobScriptError, JobTemplate, pilot_arguments
from service_adapter.providers import JobState, PilotJob, ProviderError, ProviderSettings, make_provider
from service_adapter.providers.commands import Outcome, run_command
from service_adapter.providers.local import LocalProvider
from tests.support.ports import free_port
from tests.support.jobs import wait_state

SUDO = "/usr/bin/sudo"
NEVER_SUBMITTED = "999999"

STAND_IN = '''#!{python}
"""A stand-in for workspace-pilot (tests only): records what it was given, then {behaviour}."""
import json, os, signal, sys, time

path = os.path.join({records!r}, f"{{os.getpid()}}.json")

def on_term(signum, frame):
    open(path + ".term", "w").close()
    # os._exit: sudo relays the step's SIGTERM, so a second one may come while sys.exit unwinds.
    os._exit(0)

signal.signal(signal.SIGTERM, on_term)  # before the record: a TERM after it is always noted
record = {{"argv": sys.argv[1:], "node": os.environ.get("SLURMD_NODENAME"),
          "env": {{name: os.environ.get(name) for name in {names!r}}}}}
with open(path + ".tmp", "w") as handle:
    json.dump(record, handle)
os.rename(path + ".tmp", path)
if {exit_code!r} is None:
    time.sleep(120)
else:
    time.sleep({delay!r})
    sys.exit({exit_code!r})
'''


def write_stand_in(directory, exit_code: int | None = None, delay: float = 0.0) -> tuple[str, str]:
    """Write the stand-in pilot under ``directory``; returns (its path, the directory its records go to)."""
    records = os.path.join(directory, "records")
    os.makedirs(records, exist_ok=True)
    behaviour = "sleeps until SIGTERM" if exit_code is None else f"exits {exit_code}"
    path = os.path.join(directory, "stand-in-pilot")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(STAND_IN.format(
            python=sys.executable, behaviour=behaviour, records=records, names=(*BATCH_ENV, "SLURM_CONF", "SUDO_USER"),
            exit_code=exit_code, delay=delay,
        ))
    os.chmod(path, 0o755)
    return path, records


def read_records(records: str, count: int, timeout: float = 20.0) -> list[dict]:
    """The stand-ins' records once ``count`` exist.

    Polled (50 ms): a payload starting on a node signals nobody.
    """
    deadline = time.monotonic() + timeout
    while True:
        names = sorted(n for n in os.listdir(records) if n.endswith(".json"))
        if len(names) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(names) == count, f"{len(names)} payloads started, expected {count}"
    found = []
    for name in names:
        with open(os.path.join(records, name), encoding="utf-8") as handle:
            found.append(dict(json.load(handle), pid=int(name.split(".")[0])))
    return found


def terms(records: str, count: int, timeout: float = 20.0) -> int:
    """How many stand-ins noted a SIGTERM, once ``count`` have (or the timeout passed). Polled like read_records."""
    deadline = time.monotonic() + timeout
    while True:
        seen = len([n for n in os.listdir(records) if n.endswith(".term")])
        if seen >= count or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def pilot_job(tmp_path, nodes: int = 1, **fields) -> PilotJob:
    values = dict(slot="slot-" + os.urandom(6).hex(), nodes=nodes, memory_mb=64, duration_s=60, grace_s=5,
                  contact="http://127.0.0.1:9/service", pilot_config=str(tmp_path / "pilot.conf"), lease="lease-test",
                  slot_secret="5e" * 32)
    values.update(fields)
    return PilotJob(**values)


class Lrm:
    """Providers on the test cluster whose submitted jobs are all scancelled (by id) when the test ends."""

    def __init__(self, cluster, tmp_path):
        self.cluster = cluster
        self.tmp_path = tmp_path
        self.job_ids: list[str] = []

    def provider(self, name: str, pilot: str, *, conf: str | None = None, timeout: float = 20.0,
                 settings: dict | None = None, **template_options):
        template_options.setdefault("output_dir", str(self.tmp_path / "jobs"))
        template = JobTemplate(pilot_command=pilot, sudo=SUDO, walltime_padding_s=60, **template_options)
        return make_provider(ProviderSettings(
            name=name, template=template, env={"SLURM_CONF": conf or self.cluster.conf}, command_timeout_s=timeout,
            **(settings or {}),
        ))

    def submit(self, provider, job: PilotJob) -> str:
        """``provider.submit(job)``, the id remembered for the clean-up."""
        job_id = provider.submit(job)
        self.job_ids.append(job_id)
        return job_id

    def live(self) -> list[str]:
        """Which of our jobs slurmctld still has pending, running or completing."""
        if not self.job_ids:
            return []
        result = self.cluster.run(["squeue", "-h", "-j", ",".join(self.job_ids), "-o", "%i"])
        return result.stdout.split() if result.returncode == 0 else []

    def clean_up(self) -> None:
        for job_id in self.job_ids:
            self.cluster.run(["scancel", job_id])
        deadline = time.monotonic() + 30
        while self.live() and time.monotonic() < deadline:
            time.sleep(0.1)  # squeue has no way to wait for the end of a job
        assert not self.live(), f"jobs outlived their test: {self.live()}"


@pytest.fixture
def lrm(slurm_cluster, tmp_path):
    lrm = Lrm(slurm_cluster, tmp_path)
    yield lrm
    lrm.clean_up()


def conf_with_port(cluster, directory, port: int, *extra: str) -> str:
    """A copy of the cluster's slurm.conf whose controller is at 127.0.0.1:``port``."""
    with open(cluster.conf, encoding="ascii") as handle:
        text = handle.read()
    text = re.sub(r"^SlurmctldPort=.*$", f"SlurmctldPort={port}", text, flags=re.M)
    path = os.path.join(directory, "elsewhere.conf")
    with open(path, "w", encoding="ascii") as handle:
        handle.write(text + "".join(f"{line}\n" for line in extra))
    return path


BOTH = pytest.mark.parametrize("name", ["slurm", "pbs"])


# -- a two-node job, then cancelled ---------------------------------------------------------------------


@BOTH
def test_two_node_job_runs_one_pilot_on_each_of_two_nodes_then_is_cancelled(lrm, tmp_path, name, slurm_cluster):
    pilot, records = write_stand_in(str(tmp_path))
    provider = lrm.provider(name, pilot)
    job = pilot_job(tmp_path, nodes=2)
    job_id = lrm.submit(provider, job)
    assert re.fullmatch(r"[0-9]+", job_id)
    assert provider.status([job_id])[job_id] in (JobState.PENDING, JobState.RUNNING)

    found = read_records(records, 2)
    assert wait_state(provider, job_id, {JobState.RUNNING}) is JobState.RUNNING
    nodes = sorted(record["node"] for record in found)
    assert len(set(nodes)) == 2 and set(nodes) <= set(slurm_cluster.nodes), nodes
    for record in found:
        assert record["argv"] == pilot_arguments(job)
        env = record["env"]
        assert env["SUDO_USER"] == "root"  # it went through sudo
        # The batch variables the pilot reads crossed sudo (--preserve-env):
        assert env["SLURM_JOB_ID"] == job_id
        assert env["SLURMD_NODENAME"] == record["node"]
        assert env["SLURM_CONF"] is None  # the job had it, but it chooses what squeue loads: it stays behind
        assert env["PBS_JOBID"] == job_id  # set by spank_pbs for every Slurm job, qsub's or not
    script = tmp_path / "jobs" / f"{job.slot}.sh"
    assert stat.S_IMODE(script.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "jobs").stat().st_mode) == 0o700

    provider.cancel(job_id)  # the gentle way: SIGTERM to the pilots' step, srun left alone
    assert terms(records, 2) == 2  # each payload got its SIGTERM (it restores its node on that)
    # The payloads exit 0 on SIGTERM, so srun and the script end and the job completes by itself.
    # SchedMD's qstat shows a finished job as C with no exit status: ENDED, never "completed" by guess.
    ended = {JobState.COMPLETED} if name == "slurm" else {JobState.ENDED}
    assert wait_state(provider, job_id, ended | {JobState.FAILED, JobState.CANCELLED}) in ended
    assert (tmp_path / "jobs" / f"{job.slot}.out").exists()


@BOTH
def test_a_forced_cancel_ends_the_job_outright(lrm, tmp_path, name):
    pilot, records = write_stand_in(str(tmp_path))
    provider = lrm.provider(name, pilot)
    job_id = lrm.submit(provider, pilot_job(tmp_path, nodes=2))
    read_records(records, 2)
    provider.cancel(job_id, force=True)  # scancel ID / qdel ID
    ended = {JobState.CANCELLED} if name == "slurm" else {JobState.ENDED}
    assert wait_state(provider, job_id, ended | {JobState.FAILED, JobState.COMPLETED}) in ended


# -- how a payload's end is reported ----------------------------------------------------------------------


@pytest.mark.parametrize("name, exit_code, expected", [
    ("slurm", 0, JobState.COMPLETED),
    ("slurm", 3, JobState.FAILED),
    ("pbs", 3, JobState.ENDED),  # SchedMD's qstat: C without an exit status
])
def test_a_payload_that_exits_is_reported_by_its_exit(lrm, tmp_path, name, exit_code, expected):
    pilot, records = write_stand_in(str(tmp_path), exit_code=exit_code)
    provider = lrm.provider(name, pilot, launcher="single")  # one node: the script runs the pilot itself
    job_id = lrm.submit(provider, pilot_job(tmp_path))
    finished = {s for s in JobState if s.finished}
    assert wait_state(provider, job_id, finished) is expected
    assert len(read_records(records, 1)) == 1


# -- queued jobs ---------------------------------------------------------------------------------------


def test_a_held_slurm_job_is_held(lrm, tmp_path, slurm_cluster):
    pilot, _ = write_stand_in(str(tmp_path))
    provider = lrm.provider("slurm", pilot, extra_directives=("--hold",))
    job_id = lrm.submit(provider, pilot_job(tmp_path))
    assert provider.status([job_id]) == {job_id: JobState.HELD}
    assert JobState.HELD.queued
    provider.cancel(job_id)
    assert wait_state(provider, job_id, {JobState.CANCELLED}) is JobState.CANCELLED


def test_a_held_pbs_job_shows_as_pending_through_schedmds_qstat(lrm, tmp_path, slurm_cluster):
    pilot, _ = write_stand_in(str(tmp_path))
    provider = lrm.provider("pbs", pilot, extra_directives=("-h",))
    job_id = lrm.submit(provider, pilot_job(tmp_path))
    # sbatch read "#PBS -h": Slurm holds the job ...
    assert slurm_cluster.run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"]).stdout.strip() == "PENDING|JobHeldUser"
    # ... but SchedMD's qstat prints every pending job as Q, held or not (a real Torque says H).
    assert provider.status([job_id]) == {job_id: JobState.PENDING}
    provider.cancel(job_id)


@BOTH
def test_a_job_wanting_six_of_four_nodes_stays_pending(lrm, tmp_path, name):
    pilot, records = write_stand_in(str(tmp_path))
    provider = lrm.provider(name, pilot)
    job_id = lrm.submit(provider, pilot_job(tmp_path, nodes=6))
    assert provider.status([job_id]) == {job_id: JobState.PENDING}
    time.sleep(1)  # give the scheduler passes a chance to (wrongly) start it
    assert provider.status([job_id, NEVER_SUBMITTED]) == {job_id: JobState.PENDING, NEVER_SUBMITTED: JobState.GONE}
    assert os.listdir(records) == []
    provider.cancel(job_id)


# -- ids Slurm never had -----------------------------------------------------------------------------------


@BOTH
def test_an_id_that_never_existed_is_gone(lrm, tmp_path, name):
    pilot, _ = write_stand_in(str(tmp_path))
    provider = lrm.provider(name, pilot)
    assert provider.status([NEVER_SUBMITTED]) == {NEVER_SUBMITTED: JobState.GONE}
    assert provider.status([NEVER_SUBMITTED, "999998"]) == {NEVER_SUBMITTED: JobState.GONE, "999998": JobState.GONE}
    assert provider.status(["local-0123456789ab"]) == {"local-0123456789ab": JobState.GONE}  # not even an id here
    assert provider.status([]) == {}


# -- a controller that does not answer ------------------------------------------------------------------


@BOTH
def test_status_is_unknown_when_the_controller_refuses_connections(lrm, tmp_path, name, slurm_cluster):
    # MessageTimeout=1: without it the Slurm commands retry a refused connection for ~18 s
    # (they then fail the same way; a short command_timeout_s turns that into the timeout case below).
    conf = conf_with_port(slurm_cluster, str(tmp_path), free_port(), "MessageTimeout=1")
    pilot, _ = write_stand_in(str(tmp_path))
    provider = lrm.provider(name, pilot, conf=conf, timeout=10)
    assert provider.status(["1", NEVER_SUBMITTED]) == {"1": JobState.UNKNOWN, NEVER_SUBMITTED: JobState.UNKNOWN}
    assert provider.status(["1"]) == {"1": JobState.UNKNOWN}
    # A failure, not the timeout: Slurm's own error comes back.
    with pytest.raises(ProviderError, match="(?i)unable to contact slurm controller"):
        provider.cancel("1")  # not "already ended": the lease manager must try again
    with pytest.raises(ProviderError, match="(?i)unable to contact slurm controller"):
        lrm.submit(provider, pilot_job(tmp_path))


@BOTH
def test_status_is_unknown_when_the_controller_never_answers(lrm, tmp_path, name, slurm_cluster):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections are queued by the kernel and never answered
        conf = conf_with_port(slurm_cluster, str(tmp_path), silent.getsockname()[1])
        pilot, _ = write_stand_in(str(tmp_path))
        provider = lrm.provider(name, pilot, conf=conf, timeout=1)
        assert provider.status(["1"]) == {"1": JobState.UNKNOWN}
        with pytest.raises(ProviderError, match="did not finish within"):
            provider.cancel("1")


# -- cancel of what has ended --------------------------------------------------------------------------


@BOTH
def test_cancel_of_a_finished_or_unknown_job_is_not_an_error(lrm, tmp_path, name):
    pilot, _ = write_stand_in(str(tmp_path), exit_code=0)
    provider = lrm.provider(name, pilot, launcher="single")
    job_id = lrm.submit(provider, pilot_job(tmp_path))
    assert wait_state(provider, job_id, {s for s in JobState if s.finished}).finished
    provider.cancel(job_id)
    provider.cancel(job_id)
    provider.cancel(NEVER_SUBMITTED)
    with pytest.raises(ProviderError, match="is not a"):
        provider.cancel("-u root")  # never handed to scancel/qdel as options


# -- refusals ----------------------------------------------------------------------------------------------


@BOTH
def test_a_refused_submit_raises_with_slurms_message(lrm, tmp_path, name, slurm_cluster):
    pilot, _ = write_stand_in(str(tmp_path))
    provider = lrm.provider(name, pilot, queue="nosuchpartition")
    before = slurm_cluster.queue()
    with pytest.raises(ProviderError) as raised:
        lrm.submit(provider, pilot_job(tmp_path))
    message = str(raised.value)
    assert "refused the job" in message and "Invalid partition name specified" in message, message
    assert "\n" not in message
    assert slurm_cluster.queue() == before


@BOTH
def test_a_conflicting_script_is_refused_before_anything_is_written_or_submitted(lrm, tmp_path, name, slurm_cluster):
    pilot, _ = write_stand_in(str(tmp_path))
    extra = "--time=5" if name == "slurm" else "-l walltime=00:05:00"
    with pytest.raises(JobScriptError, match="conflicts with walltime_padding_s"):
        lrm.provider(name, pilot, extra_directives=(extra,))
    provider = lrm.provider(name, pilot, launcher="single")
    before = slurm_cluster.queue()
    with pytest.raises(JobScriptError, match="'single' launcher"):
        lrm.submit(provider, pilot_job(tmp_path, nodes=2))
    with pytest.raises(JobScriptError, match="not a valid slot name"):
        lrm.submit(provider, pilot_job(tmp_path, slot="../escape"))
    assert not (tmp_path / "jobs").exists()
    assert slurm_cluster.queue() == before


# -- PBS specifics -------------------------------------------------------------------------------------------


def test_pbs_python_that_cannot_load_falls_back_to_the_commands(lrm, tmp_path, caplog):
    pilot, _ = write_stand_in(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="service_adapter.providers.pbs"):
        provider = lrm.provider("pbs", pilot, settings={"use_pbs_python": True})
    assert [r.getMessage() for r in caplog.records if "pbs_python cannot be loaded" in r.getMessage()]
    assert provider.status([NEVER_SUBMITTED]) == {NEVER_SUBMITTED: JobState.GONE}


@pytest.mark.parametrize("history, expected", [
    ("auto", JobState.GONE),     # tries -x once, SchedMD's qstat refuses it, asks without
    ("no", JobState.GONE),
    ("yes", JobState.UNKNOWN),   # forced -x on a qstat that refuses it: nothing is known
])
def test_qstat_history_setting(lrm, tmp_path, caplog, history, expected):
    pilot, _ = write_stand_in(str(tmp_path))
    provider = lrm.provider("pbs", pilot, settings={"qstat_history": history})
    with caplog.at_level(logging.DEBUG, logger="service_adapter.providers.commands"):
        assert provider.status([NEVER_SUBMITTED]) == {NEVER_SUBMITTED: expected}
        assert provider.status([NEVER_SUBMITTED]) == {NEVER_SUBMITTED: expected}
    runs = [r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().startswith("qstat")]
    with_x = [run for run in runs if " -x " in run]
    assert len(with_x) == {"auto": 1, "no": 0, "yes": 2}[history], runs


# -- the command runner --------------------------------------------------------------------------------------


def test_run_command_reports_exit_timeout_and_missing_command(tmp_path):
    result = run_command(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10, env={"X_TEST": "1"})
    assert (result.outcome, result.rc, result.stdout, result.stderr) == (Outcome.EXITED, 3, "out\n", "err\n")
    assert not result.ok and result.message() == "err"
    assert run_command(["sh", "-c", 'test "$X_TEST" = 1'], timeout=10, env={"X_TEST": "1"}).ok
    # A timeout kills the whole group the command started (SchedMD's qsub runs sbatch in a shell).
    marker = tmp_path / "survived"
    result = run_command(["sh", "-c", f"(sleep 1; touch {marker}) & sleep 30"], timeout=0.5)
    assert result.outcome is Outcome.TIMED_OUT and result.rc is None
    assert "did not finish within" in result.message()
    time.sleep(1.5)  # past the moment the background child would have touched the marker
    assert not marker.exists()
    result = run_command([str(tmp_path / "no-such-command")], timeout=10)
    assert result.outcome is Outcome.NOT_RUN and "could not be run" in result.message()


# -- the local provider across a restart ---------------------------------------------------------------------


def test_local_provider_job_is_seen_and_cancelled_by_a_second_provider(tmp_path):
    pilot, records = write_stand_in(str(tmp_path))
    state_dir = str(tmp_path / "local")
    first = LocalProvider(state_dir, python=pilot)  # the stand-in takes python's place: "<it> -m pilot reserve ..."
    try:
        job = pilot_job(tmp_path, nodes=2)
        job_id = first.submit(job)
        assert re.fullmatch(r"local-[0-9a-f]{12}", job_id)
        found = read_records(records, 2)
        assert sorted(r["argv"][-1] for r in found) == ["local-node1", "local-node2"]
        assert found[0]["argv"][:2] == ["-m", "pilot"]

        second = LocalProvider(state_dir, python=pilot)  # the service restarted
        assert second.status([job_id, "local-000000000000"]) == {
            job_id: JobState.RUNNING, "local-000000000000": JobState.GONE}
        assert second.hosts(job_id) == first.hosts(job_id) and second.pids(job_id) == first.pids(job_id)

        second.cancel(job_id)
        assert terms(records, 2) == 2
        assert first.wait(job_id, 10) == [0, 0]
        assert first.status([job_id]) == {job_id: JobState.CANCELLED}
        assert second.status([job_id]) == {job_id: JobState.CANCELLED}
        second.cancel(job_id)  # ended: not an error

        # A third provider numbers its nodes after the ones recorded.
        third = LocalProvider(state_dir, python=pilot)
        other = third.submit(pilot_job(tmp_path, nodes=1))
        assert third.hosts(other) == ["local-node3"]
        read_records(records, 3)  # started, its SIGTERM handler set
        third.close()
        assert third.status([other]) == {other: JobState.CANCELLED}
    finally:
        first.close()


def test_local_provider_keeps_a_job_off_the_nodes_it_excludes(tmp_path):
    pilot, records = write_stand_in(str(tmp_path))
    counted = LocalProvider(str(tmp_path / "counted"), python=pilot)
    fixed = LocalProvider(str(tmp_path / "fixed"), python=pilot, fixed_hosts=("n1", "n2", "n3"))
    try:
        assert counted.hosts(counted.submit(pilot_job(tmp_path, nodes=2, exclude_nodes=("local-node1",)))) == [
            "local-node2", "local-node3"]
        assert fixed.hosts(fixed.submit(pilot_job(tmp_path, nodes=2, exclude_nodes=("n1",)))) == ["n2", "n3"]
        with pytest.raises(ProviderError, match="has 2 node\\(s\\) the job may use; it asks for 3"):
            fixed.submit(pilot_job(tmp_path, nodes=3, exclude_nodes=("n2",)))
        read_records(records, 4)  # the four pilots started (their SIGTERM handlers set): none for the refused job
    finally:
        counted.close()
        fixed.close()


def test_local_provider_reports_pilots_of_a_process_that_is_gone(tmp_path):
    pilot, records = write_stand_in(str(tmp_path), exit_code=0, delay=1.0)
    state_dir = str(tmp_path / "local")
    # The earlier service: another process that submits and exits; its pilots go on without it.
    code = (
        "import sys; from service_adapter.providers.local import LocalProvider; "
        "from service_adapter.providers import PilotJob; "
        f"p = LocalProvider({state_dir!r}, python={pilot!r}); "
        f"print(p.submit(PilotJob('slot-gone', 2, 64, 60, 5, 'http://127.0.0.1:9', {str(tmp_path / 'pilot.conf')!r}, "
        f"slot_secret={'5e' * 32!r})))"
    )
    job_id = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)), timeout=30).stdout.strip()
    later = LocalProvider(state_dir, python=pilot)
    assert later.status([job_id]) == {job_id: JobState.RUNNING}
    # Their exit codes went with their parent: ended, and not said how.
    assert wait_state(later, job_id, {JobState.ENDED}) is JobState.ENDED
    assert len(read_records(records, 2)) == 2


def test_local_provider_never_trusts_a_pid_whose_process_changed(tmp_path):
    pilot, records = write_stand_in(str(tmp_path))
    state_dir = str(tmp_path / "local")
    first = LocalProvider(state_dir, python=pilot)
    try:
        job_id = first.submit(pilot_job(tmp_path))
        read_records(records, 1)
        # The recorded create time no longer matches: as if the pid now belonged to another process.
        path = os.path.join(state_dir, "jobs.json")
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
        state["jobs"][job_id]["pilots"][0]["create_time"] -= 100
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(state, handle)
        second = LocalProvider(state_dir, python=pilot)
        assert second.status([job_id]) == {job_id: JobState.ENDED}
        second.cancel(job_id)  # must not signal that pid
        time.sleep(0.3)
        assert terms(records, 1, timeout=0) == 0
        assert first.status([job_id]) == {job_id: JobState.RUNNING}
    finally:
        first.close()


def test_make_provider_and_settings():
    settings = ProviderSettings(name="local", state_dir="/tmp/wp-state-test")
    provider = make_provider(settings)
    assert isinstance(provider, LocalProvider) and provider.output_dir == "/tmp/wp-state-test"
    for bad, message in [
        ({"name": "lsf"}, "unknown provider 'lsf': use one of local, pbs, sge, slurm"),
        ({"command_timeout_s": 0}, "command_timeout_s must be a number of seconds above 0"),
        ({"qstat_history": "maybe"}, "qstat_history must be one of auto, yes, no"),
        ({"env": {"SLURM CONF": "x"}}, "is not NAME=text"),
        ({"state_dir": "local"}, "state_dir must be an absolute path"),
        ({"use_pbs_python": "yes"}, "use_pbs_python must be True or False"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            ProviderSettings(**bad)


def test_adopted_jobs_run_while_their_process_runs_and_a_cancel_is_seen_by_every_reader(tmp_path):
    # What bench/bench_scale.py does: one process simulates the nodes of many jobs.
    simulator = subprocess.Popen(["sleep", "60"])
    try:
        ids = LocalProvider(str(tmp_path)).adopt(
            [("slot-a", "lease-a", ["sim-1", "sim-2"]), ("slot-b", "lease-b", ["sim-3"])], simulator.pid)
        reader = LocalProvider(str(tmp_path))  # another process's provider: it knows them from the state file
        assert reader.status(ids) == {ids[0]: JobState.RUNNING, ids[1]: JobState.RUNNING}
        assert reader.allocated_hosts(ids[0]) == ["sim-1", "sim-2"]
        LocalProvider(str(tmp_path)).cancel(ids[1])  # a third one cancels: SIGTERM to the simulator, by pid
        assert simulator.wait(10) == -15
        # The reader parsed the file before the cancel rewrote it; it must see the new one.
        assert reader.status(ids) == {ids[0]: JobState.ENDED, ids[1]: JobState.CANCELLED}
    finally:
        if simulator.poll() is None:
            simulator.kill()
            simulator.wait()
    with pytest.raises(ProviderError, match="no process"):
        LocalProvider(str(tmp_path)).adopt([("slot-c", "lease-c", ["sim-4"])], simulator.pid)
