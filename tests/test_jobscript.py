"""Job scripts and launchers: the exact script text for Slurm and PBS, and every refusal.

No batch system is needed here: rendering is pure. One test runs a
rendered script with the real /bin/sh (launcher ``single``, no sudo) to
show the quoting survives a shell; tests/test_providers.py submits real
scripts to a real Slurm.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from workspace_common.protocol import PILOT_ENV
from service_adapter.providers.jobscript import (
    JobScriptError,
    JobTemplate,
    format_number,
    pilot_arguments,
    walltime_s,
)
from service_adapter.providers.lrmtime import format_walltime
from service_adapter.providers.pbsscript import PBS_SCRIPT, render_pbs
from service_adapter.providers.sgescript import render_sge
from service_adapter.providers.slurmscript import SLURM_SCRIPT, render_slurm
from service_adapter.providers.launchers import LAUNCHER_NAMES, LAUNCHERS, resolve_launcher
from service_adapter.providers import PilotJob

SLOT = "3f2a1b2c-5d6e-4f70-8a9b-0c1d2e3f4a5b"
LEASE = "lease-0001"
CONTACT = "http://127.0.0.1:8443"
CONFIG = "/etc/workspace-pilot/pilot.conf"
SLOT_SECRET = "5e" * 32
PRESERVE = "--preserve-env=" + ",".join(PILOT_ENV)
#: The line before the exec: the slot's secret goes to the pilots in the job's environment, never in argv.
EXPORT = f"WORKSPACE_PILOT_SLOT_SECRET={SLOT_SECRET}; export WORKSPACE_PILOT_SLOT_SECRET"
PILOT_WORDS = (
    f"/usr/bin/sudo -n {PRESERVE} /usr/bin/workspace-pilot reserve --slot {SLOT} --lease {LEASE} --memory 64 "
    f"--duration 20 --grace 5 --contact {CONTACT} --config {CONFIG}"
)


def job(**fields) -> PilotJob:
    values = dict(slot=SLOT, nodes=2, memory_mb=64, duration_s=20, grace_s=5, contact=CONTACT,
                  pilot_config=CONFIG, lease=LEASE, slot_secret=SLOT_SECRET)
    values.update(fields)
    return PilotJob(**values)


def lines(text: str) -> list[str]:
    assert text.endswith("\n")
    return text[:-1].split("\n")


# -- whole scripts, line by line ----------------------------------------------------------------------


def test_slurm_script_line_by_line():
    template = JobTemplate(queue="batch", account="physics", extra_directives=("--hold", "#SBATCH --exclusive"))
    assert lines(render_slurm(job(), template, "srun")) == [
        "#!/bin/sh",
        f"# workspace-pilot job: lease {LEASE}, slot {SLOT}",
        "#SBATCH --job-name=wp-3f2a1b2c",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --mem=64M",
        "#SBATCH --time=00:03:00",
        "#SBATCH --partition=batch",
        "#SBATCH --account=physics",
        f"#SBATCH --output=/var/log/workspace-pilot/jobs/{SLOT}.out",
        "#SBATCH --hold",
        "#SBATCH --exclusive",
        EXPORT,
        f"exec srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=0 {PILOT_WORDS}",
    ]


def test_pbs_script_line_by_line():
    template = JobTemplate(cores_per_node=4, queue="batch", account="physics", extra_directives=("-m abe", "#PBS -r n"))
    assert lines(render_pbs(job(), template, "pbsdsh")) == [
        "#!/bin/sh",
        f"# workspace-pilot job: lease {LEASE}, slot {SLOT}",
        "#PBS -N wp-3f2a1b2c",
        "#PBS -l nodes=2:ppn=4",
        "#PBS -l walltime=00:03:00",
        "#PBS -l mem=64mb",
        "#PBS -q batch",
        "#PBS -A physics",
        "#PBS -j oe",
        f"#PBS -o /var/log/workspace-pilot/jobs/{SLOT}.out",
        "#PBS -m abe",
        "#PBS -r n",
        EXPORT,
        f"exec pbsdsh -u {PILOT_WORDS}",
    ]


def test_minimal_scripts_leave_out_queue_account_and_lease():
    template = JobTemplate(sudo="", output_dir="/srv/jobs", job_name_prefix="pilot")
    single = job(nodes=1, lease="")
    words = (f"/usr/bin/workspace-pilot reserve --slot {SLOT} --memory 64 --duration 20 --grace 5 "
             f"--contact {CONTACT} --config {CONFIG}")
    assert lines(render_slurm(single, template, "single")) == [
        "#!/bin/sh",
        f"# workspace-pilot job: lease -, slot {SLOT}",
        "#SBATCH --job-name=pilot-3f2a1b2c",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --mem=64M",
        "#SBATCH --time=00:03:00",
        f"#SBATCH --output=/srv/jobs/{SLOT}.out",
        EXPORT,
        f"exec {words}",
    ]
    assert lines(render_pbs(single, template, "single")) == [
        "#!/bin/sh",
        f"# workspace-pilot job: lease -, slot {SLOT}",
        "#PBS -N pilot-3f2a1b2c",
        "#PBS -l nodes=1:ppn=1",
        "#PBS -l walltime=00:03:00",
        "#PBS -l mem=64mb",
        "#PBS -j oe",
        f"#PBS -o /srv/jobs/{SLOT}.out",
        EXPORT,
        f"exec {words}",
    ]


@pytest.mark.parametrize("render", [render_slurm, render_pbs], ids=["slurm", "pbs"])
@pytest.mark.parametrize("launcher, nodes, words", [
    ("single", 1, ""),
    ("srun", 3, "srun --nodes=3 --ntasks=3 --ntasks-per-node=1 --kill-on-bad-exit=0 "),
    ("pbsdsh", 3, "pbsdsh -u "),
    ("mpiexec", 3, "mpiexec -n 3 -ppn 1 "),
])
def test_each_launcher_makes_the_last_line(render, launcher, nodes, words):
    by_name = lines(render(job(nodes=nodes), JobTemplate(), launcher))
    by_object = lines(render(job(nodes=nodes), JobTemplate(), LAUNCHERS[launcher]))
    assert by_name == by_object
    assert by_name[-2:] == [EXPORT, f"exec {words}{PILOT_WORDS}"]
    assert sum(line.startswith("exec ") for line in by_name) == 1


@pytest.mark.parametrize("render", [render_slurm, render_pbs], ids=["slurm", "pbs"])
def test_single_launcher_refuses_a_multi_node_job(render):
    with pytest.raises(JobScriptError, match="'single' launcher starts the pilot on the job's first node only"):
        render(job(nodes=2), JobTemplate(), "single")


# -- walltime and memory ---------------------------------------------------------------------------


@pytest.mark.parametrize("duration, padding, expected", [
    (20, 120, "00:03:00"),      # 140 s -> 3 minutes
    (60, 0, "00:01:00"),        # exactly one minute stays one
    (61, 0, "00:02:00"),        # one second over rounds up
    (0.5, 0, "00:01:00"),       # never below one minute
    (3600, 120, "01:02:00"),
    (180 + 3e-14, 0, "00:03:00"),  # float noise does not add a minute
    (360000, 0, "100:00:00"),   # hours past 99
])
def test_walltime_is_duration_plus_padding_rounded_up_to_minutes(duration, padding, expected):
    template = JobTemplate(walltime_padding_s=padding)
    pilot_job = job(duration_s=duration)
    assert format_walltime(walltime_s(pilot_job, template)) == expected
    assert f"#SBATCH --time={expected}" in lines(render_slurm(pilot_job, template, "srun"))
    assert f"#PBS -l walltime={expected}" in lines(render_pbs(pilot_job, template, "pbsdsh"))


@pytest.mark.parametrize("setting, slurm_line, pbs_line", [
    (None, "#SBATCH --mem=64M", "#PBS -l mem=64mb"),   # the lease's memory
    (0, None, None),                                   # no memory directive at all
    (2048, "#SBATCH --mem=2048M", "#PBS -l mem=2048mb"),
])
def test_memory_per_node(setting, slurm_line, pbs_line):
    template = JobTemplate(memory_per_node_mb=setting)
    slurm = [line for line in lines(render_slurm(job(), template, "srun")) if line.startswith("#SBATCH --mem")]
    pbs = [line for line in lines(render_pbs(job(), template, "pbsdsh")) if line.startswith("#PBS -l mem")]
    assert slurm == ([slurm_line] if slurm_line else [])
    assert pbs == ([pbs_line] if pbs_line else [])


def test_numbers_are_written_as_the_pilot_reads_them_back():
    assert [format_number(v) for v in (20, 20.0, 20.5, 1e7, 0)] == ["20", "20", "20.5", "10000000", "0"]


# -- quoting ---------------------------------------------------------------------------------------------


def test_contact_and_config_with_spaces_and_shell_characters_are_quoted():
    contact = "http://127.0.0.1:8443/pilot it's $(id)"
    config = "/etc/work space/pilot $HOME.conf"
    text = render_slurm(job(contact=contact, pilot_config=config), JobTemplate(), "srun")
    last = lines(text)[-1]
    assert "--contact 'http://127.0.0.1:8443/pilot it'\"'\"'s $(id)'" in last
    assert "--config '/etc/work space/pilot $HOME.conf'" in last
    assert shlex.split(last)[-4:] == ["--contact", contact, "--config", config]


def test_a_rendered_script_runs_under_sh_with_the_exact_arguments(tmp_path):
    # A stand-in for workspace-pilot: it writes the arguments it received, one per line.
    stand_in = tmp_path / "stand-in-pilot"
    stand_in.write_text(
        f"#!{sys.executable}\nimport sys\nopen(sys.argv[0] + '.args', 'w').write('\\n'.join(sys.argv[1:]))\n"
    )
    stand_in.chmod(0o755)
    contact = "http://127.0.0.1:8443/a b;$(touch /tmp/should-not-exist)"
    config = f"{tmp_path}/my config's dir/pilot.conf"
    template = JobTemplate(sudo="", pilot_command=str(stand_in))
    script = tmp_path / "job.sh"
    pilot_job = job(nodes=1, contact=contact, pilot_config=config, duration_s=20.5)
    script.write_text(render_pbs(pilot_job, template, "single"))
    subprocess.run(["/bin/sh", str(script)], check=True, timeout=30)
    assert not os.path.exists("/tmp/should-not-exist")
    assert (tmp_path / "stand-in-pilot.args").read_text().split("\n") == [
        "reserve", "--slot", SLOT, "--lease", LEASE, "--memory", "64", "--duration", "20.5", "--grace", "5",
        "--contact", contact, "--config", config,
    ]


@pytest.mark.parametrize("secret", ["", "5E" * 32, "5e" * 31, "5e" * 31 + "; rm -rf /"])
def test_a_slot_secret_that_is_not_64_hex_digits_never_reaches_a_script(secret):
    with pytest.raises(JobScriptError, match="slot secret must be 64 lowercase hex digits"):
        render_slurm(job(slot_secret=secret), JobTemplate(), "srun")


def test_the_slot_secret_is_in_the_environment_never_in_the_pilots_argv():
    script = lines(render_slurm(job(), JobTemplate(), "srun"))
    assert [line for line in script if SLOT_SECRET in line] == [EXPORT]
    assert "WORKSPACE_PILOT_SLOT_SECRET" in script[-1]  # only its name: sudo must keep it


def test_contact_and_config_are_left_out_when_empty():
    last = lines(render_slurm(job(contact="", pilot_config=""), JobTemplate(sudo=""), "srun"))[-1]
    assert last.endswith(
        f"/usr/bin/workspace-pilot reserve --slot {SLOT} --lease {LEASE} --memory 64 --duration 20 --grace 5"
    )


# -- extra directives that fight a typed field --------------------------------------------------------

SLURM_CONFLICTS = [
    ("--time=10", "sets the walltime, which conflicts with walltime_padding_s"),
    ("-t 10", "sets the walltime, which conflicts with walltime_padding_s"),
    ("#SBATCH -t10", "sets the walltime, which conflicts with walltime_padding_s"),
    ("--ti=10", "sets the walltime, which conflicts with walltime_padding_s"),   # getopt abbreviation
    ("--hold -t 5", "sets the walltime, which conflicts with walltime_padding_s"),  # two options, one line
    ("-N 3", "sets the node count, which conflicts with the lease's nodes"),
    ("--nodes=2-4", "sets the node count, which conflicts with the lease's nodes"),
    ("-n 4", "sets the task count, which conflicts with the one-pilot-per-node layout"),
    ("--ntasks-per-node=2", "sets the task count, which conflicts with the one-pilot-per-node layout"),
    ("-c 4", "sets the cores, which conflicts with cores_per_node"),
    ("--cpus-per-task=4", "sets the cores, which conflicts with cores_per_node"),
    ("--mem=1G", "sets the memory, which conflicts with memory_per_node_mb"),
    ("--mem-per-cpu=100", "sets the memory, which conflicts with memory_per_node_mb"),
    ("-J other", "sets the job name, which conflicts with job_name_prefix"),
    ("--job-name=other", "sets the job name, which conflicts with job_name_prefix"),
    ("-o /tmp/x.out", "sets the job's output, which conflicts with output_dir"),
    ("--output=/tmp/x.out", "sets the job's output, which conflicts with output_dir"),
    ("-e /tmp/x.err", "sets the job's output, which conflicts with output_dir"),
    ("#SBATCH --error=/tmp/x.err", "sets the job's output, which conflicts with output_dir"),
    ("#PBS -l walltime=01:00:00", "is a #PBS line (pbs); a slurm job script takes #SBATCH lines"),
    ("#BSUB -W 10", "is neither a #SBATCH line nor bare options"),
    ("hold", "does not start with an option"),
    ("--comment='unbalanced", "cannot be read"),
]

PBS_CONFLICTS = [
    ("-l walltime=01:00:00", "sets the walltime, which conflicts with walltime_padding_s"),
    ("#PBS -l walltime=01:00:00", "sets the walltime, which conflicts with walltime_padding_s"),
    ("-lwalltime=10:00", "sets the walltime, which conflicts with walltime_padding_s"),
    ("-l nodes=3:ppn=2", "sets the node count, which conflicts with the lease's nodes"),
    ("-l select=2:ncpus=4", "sets the node count, which conflicts with the lease's nodes"),
    ("-l procs=4", "sets the node count, which conflicts with the lease's nodes"),
    ("-l ncpus=4", "sets the cores, which conflicts with cores_per_node"),
    ("-l mem=1gb", "sets the memory, which conflicts with memory_per_node_mb"),
    ("-l pmem=100mb", "sets the memory, which conflicts with memory_per_node_mb"),
    ("-l file=10gb,walltime=1:00:00", "sets the walltime, which conflicts with walltime_padding_s"),
    ("-N other", "sets the job name, which conflicts with job_name_prefix"),  # -N is the name in PBS
    ("-o /tmp/x.out", "sets the job's output, which conflicts with output_dir"),
    ("-e /tmp/x.err", "sets the job's output, which conflicts with output_dir"),
    ("-j n", "sets the job's output, which conflicts with output_dir"),
    ("-k oe", "sets the job's output, which conflicts with output_dir"),
    ("#SBATCH --hold", "is a #SBATCH line (slurm); a pbs job script takes #PBS lines"),
    ("--time=10", "holds a long (Slurm) option; PBS directives take -x options"),
]


@pytest.mark.parametrize("extra, message", SLURM_CONFLICTS)
def test_slurm_refuses_a_conflicting_extra_directive(extra, message, tmp_path):
    template = JobTemplate(extra_directives=(extra,), output_dir=str(tmp_path / "jobs"))
    with pytest.raises(JobScriptError) as raised:
        render_slurm(job(), template, "srun")
    assert str(raised.value).startswith(f"extra directive {extra!r} {message}")
    assert "\n" not in str(raised.value)
    with pytest.raises(JobScriptError):
        template.check(SLURM_SCRIPT)  # what providers call when they are built
    assert not (tmp_path / "jobs").exists()


@pytest.mark.parametrize("extra, message", PBS_CONFLICTS)
def test_pbs_refuses_a_conflicting_extra_directive(extra, message):
    template = JobTemplate(extra_directives=(extra,))
    with pytest.raises(JobScriptError) as raised:
        render_pbs(job(), template, "pbsdsh")
    assert str(raised.value).startswith(f"extra directive {extra!r} {message}")
    with pytest.raises(JobScriptError):
        template.check(PBS_SCRIPT)


def test_conflict_messages_name_the_values_the_script_sets():
    template = JobTemplate(extra_directives=("--output=/tmp/x",), output_dir="/srv/jobs")
    with pytest.raises(JobScriptError, match=f"the output always goes to /srv/jobs/{SLOT}.out$"):
        render_slurm(job(), template, "srun")
    with pytest.raises(JobScriptError, match="the script names the job wp-3f2a1b2c$"):
        render_pbs(job(), JobTemplate(extra_directives=("-N mine",)), "pbsdsh")


@pytest.mark.parametrize("lrm, render, extra", [
    ("slurm", render_slurm, "--partition=other"),
    ("slurm", render_slurm, "-p other"),
    ("pbs", render_pbs, "-q other"),
])
def test_queue_in_extras_is_refused_only_when_the_template_sets_one(lrm, render, extra):
    with pytest.raises(JobScriptError, match="conflicts with queue: leave queue empty"):
        render(job(), JobTemplate(queue="batch", extra_directives=(extra,)), "srun")
    assert lines(render(job(), JobTemplate(extra_directives=(extra,)), "srun"))[-3].endswith(extra)


@pytest.mark.parametrize("lrm, render, extra", [
    ("slurm", render_slurm, "--account=other"),
    ("slurm", render_slurm, "-A other"),
    ("pbs", render_pbs, "-A other"),
])
def test_account_in_extras_is_refused_only_when_the_template_sets_one(lrm, render, extra):
    with pytest.raises(JobScriptError, match="conflicts with account: leave account empty"):
        render(job(), JobTemplate(account="physics", extra_directives=(extra,)), "srun")
    assert lines(render(job(), JobTemplate(extra_directives=(extra,)), "srun"))[-3].endswith(extra)


def test_memory_in_extras_is_allowed_with_memory_per_node_zero():
    slurm_template = JobTemplate(memory_per_node_mb=0, extra_directives=("--mem-per-cpu=100",))
    pbs_template = JobTemplate(memory_per_node_mb=0, extra_directives=("-l pmem=100mb",))
    slurm = lines(render_slurm(job(), slurm_template, "srun"))
    pbs = lines(render_pbs(job(), pbs_template, "srun"))
    assert slurm[-3] == "#SBATCH --mem-per-cpu=100" and not any("--mem=" in line for line in slurm)
    assert pbs[-3] == "#PBS -l pmem=100mb" and not any("mem=64" in line for line in pbs)


def test_harmless_extras_pass_with_their_prefix_added():
    template = JobTemplate(extra_directives=("--mem-bind=local", "--time-min=5", "--nodelist=node1", "--exclusive"))
    assert lines(render_slurm(job(), template, "srun"))[-6:-2] == [
        "#SBATCH --mem-bind=local", "#SBATCH --time-min=5", "#SBATCH --nodelist=node1", "#SBATCH --exclusive",
    ]


# -- bad templates and jobs --------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("cores_per_node", 0, "cores_per_node must be a whole number"),
    ("cores_per_node", True, "cores_per_node must be a whole number"),
    ("cores_per_node", "2", "cores_per_node must be a whole number"),
    ("memory_per_node_mb", -1, "memory_per_node_mb must be None"),
    ("memory_per_node_mb", 1.5, "memory_per_node_mb must be None"),
    ("walltime_padding_s", -1, "walltime_padding_s must be a number of seconds"),
    ("walltime_padding_s", float("nan"), "walltime_padding_s must be a number of seconds"),
    ("walltime_padding_s", float("inf"), "walltime_padding_s must be a number of seconds"),
    ("queue", "two words", "queue must be one word"),
    ("account", "a;b", "account must be one word"),
    ("job_name_prefix", "1wp", "job_name_prefix must start with a letter"),
    ("job_name_prefix", "w" * 17, "job_name_prefix must start with a letter"),
    ("output_dir", "jobs", "output_dir must be an absolute path"),
    ("output_dir", "/var/log/my jobs", "must not hold whitespace"),
    ("output_dir", "/var/log/%j", "must not hold whitespace, '%'"),
    ("extra_directives", "--hold", "extra_directives must be a sequence of lines"),
    ("extra_directives", ("--hold\n--exclusive",), "holds a newline or NUL"),
    ("extra_directives", ("--hold\x00",), "holds a newline or NUL"),
    ("extra_directives", ("  ",), "an extra directive is empty"),
    ("extra_directives", (5,), "is not text"),
    ("sudo", "sudo", "sudo must be an absolute path"),
    ("pilot_command", "workspace-pilot", "pilot_command must be an absolute path"),
    ("pilot_command", "", "pilot_command must be an absolute path"),
    ("launcher", "ssh", "unknown launcher 'ssh': use one of auto, single, srun, pbsdsh, mpiexec"),
])
def test_bad_template_values_are_refused_with_one_line(field, value, message):
    with pytest.raises(ValueError) as raised:
        JobTemplate(**{field: value})
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_template_keeps_extra_directives_as_a_stripped_tuple():
    template = JobTemplate(extra_directives=["  --hold  ", "--exclusive"])
    assert template.extra_directives == ("--hold", "--exclusive")
    assert JobTemplate(memory_per_node_mb=0).memory_per_node_mb == 0


@pytest.mark.parametrize("fields, message", [
    ({"slot": "../../etc/passwd"}, "is not a valid slot name"),
    ({"slot": "a\nb"}, "is not a valid slot name"),
    ({"lease": "lease one"}, "is not a valid lease name"),
    ({"nodes": 0}, "a job needs a whole number of nodes above 0"),
    ({"memory_mb": 0}, "memory_mb must be a whole number of MB above 0"),
    ({"duration_s": 0}, "duration_s must be a number of seconds above 0"),
    ({"grace_s": -1}, "grace_s must be a number of seconds from 0"),
    ({"pilot_config": "pilot.conf"}, "must be an absolute path on the nodes"),
    ({"contact": "http://x\n#SBATCH --time=1"}, "is not a URL"),
    ({"begin_at": float("nan")}, "begin_at must be a time in epoch seconds"),
    ({"begin_at": -5}, "begin_at must be a time in epoch seconds"),
    ({"warn_before_s": -1}, "warn_before_s must be a number of seconds from 0"),
])
def test_bad_jobs_are_refused(fields, message):
    for render in (render_slurm, render_pbs):
        with pytest.raises(JobScriptError, match=message):
            render(job(**fields), JobTemplate(), "srun")


# -- launchers ------------------------------------------------------------------------------------------


def test_launchers_wrap_the_per_node_command():
    argv = ["/usr/bin/workspace-pilot", "reserve"]
    assert LAUNCHERS["single"](argv, 1) == argv
    assert LAUNCHERS["srun"](argv, 4) == [
        "srun", "--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--kill-on-bad-exit=0", *argv]
    assert LAUNCHERS["pbsdsh"](argv, 4) == ["pbsdsh", "-u", *argv]
    assert LAUNCHERS["mpiexec"](argv, 4) == ["mpiexec", "-n", "4", "-ppn", "1", *argv]
    with pytest.raises(ValueError, match="a 2-node job needs srun, pbsdsh or mpiexec"):
        LAUNCHERS["single"](argv, 2)
    with pytest.raises(ValueError, match="whole number of nodes above 0"):
        LAUNCHERS["srun"](argv, 0)


@pytest.mark.parametrize("provider, on_path, expected", [
    ("slurm", set(), "srun"),
    ("slurm", {"pbsdsh"}, "srun"),
    ("pbs", {"pbsdsh", "srun"}, "pbsdsh"),
    ("pbs", {"srun"}, "srun"),       # a Slurm-backed qsub (SchedMD's wrappers have no pbsdsh)
    ("pbs", set(), "single"),
])
def test_auto_launcher_per_provider(provider, on_path, expected):
    which = lambda name: f"/usr/bin/{name}" if name in on_path else None  # noqa: E731
    assert resolve_launcher("auto", provider, which).name == expected


def test_named_launchers_resolve_to_themselves_and_unknown_names_are_refused():
    for name in LAUNCHER_NAMES[1:]:
        assert resolve_launcher(name, "pbs", lambda _: None) is LAUNCHERS[name]
    with pytest.raises(ValueError, match="unknown launcher 'ssh': use one of auto, single, srun, pbsdsh, mpiexec"):
        resolve_launcher("ssh", "slurm")
    with pytest.raises(ValueError, match="the local provider starts one process per node itself"):
        resolve_launcher("auto", "local")


def test_auto_launcher_on_this_machine_is_srun_for_pbs_when_there_is_no_pbsdsh():
    # The real PATH: SchedMD's slurm-wlm-torque gives qsub but no pbsdsh.
    if not os.path.exists("/usr/bin/srun") or os.path.exists("/usr/bin/pbsdsh"):
        pytest.skip("needs srun and no pbsdsh")
    assert resolve_launcher("auto", "pbs").name == "srun"


# -- Grid Engine ------------------------------------------------------------------------------------------


def test_sge_script_line_by_line():

    template = JobTemplate(queue="batch.q", account="physics", parallel_environment="one-per-host",
                           extra_directives=("-P physics", "#$ -l arch=lx-amd64"))
    script = lines(render_sge(job(), template, "qrsh"))
    assert script[:-2] == [
        "#!/bin/sh",
        f"# workspace-pilot job: lease {LEASE}, slot {SLOT}",
        "#$ -S /bin/sh",
        "#$ -N wp-3f2a1b2c",
        "#$ -pe one-per-host 2",
        "#$ -l h_rt=00:03:00",
        "#$ -notify",
        "#$ -l mem_free=64M",  # a request the scheduler matches, never h_vmem: a limit on the pilot itself
        "#$ -q batch.q",
        "#$ -A physics",
        "#$ -j y",
        f"#$ -o /var/log/workspace-pilot/jobs/{SLOT}.out",
        "#$ -P physics",
        "#$ -l arch=lx-amd64",
    ]
    assert script[-2] == EXPORT
    launch = shlex.split(script[-1])
    assert launch[:2] == ["exec", "sh"] and launch[4] == "qrsh-launch"
    assert 'qrsh -inherit -V -nostdin "$host" "$1"' in launch[3] and 'trap "" USR1 USR2' in launch[3]
    assert shlex.split(launch[5]) == shlex.split(PILOT_WORDS)  # the pilot's line, as one quoted string


@pytest.mark.parametrize("directive, conflict", [
    ("#$ -l h_rt=1:00:00", "conflicts with walltime_padding_s"),
    ("-pe mpi 4", "conflicts with the lease's nodes"),
    ("-l h_vmem=4G", "conflicts with memory_per_node_mb"),
    ("-o /elsewhere", "conflicts with output_dir"),
    ("#SBATCH --exclusive", "is a #SBATCH line (slurm); a sge job script takes #$ lines"),
    ("--exclusive", "holds a long (Slurm) option; SGE directives take -x options"),
])
def test_sge_extra_directives_that_fight_a_typed_field_are_refused(directive, conflict):

    with pytest.raises(JobScriptError, match=re.escape(conflict)):
        render_sge(job(), JobTemplate(extra_directives=(directive,)), "qrsh")


# -- a begin time and the VMs' warning ------------------------------------------------------------------


def test_a_begin_time_is_each_batch_systems_own_form_in_local_time_rounded_up(local_tz):
    begin = 1_800_000_000.25  # 2027-01-15T08:00:00.25Z: 03:00:01 in UTC-5, rounded up to the second
    assert "#SBATCH --begin=2027-01-15T03:00:01" in lines(render_slurm(job(begin_at=begin), JobTemplate(), "srun"))
    assert "#PBS -a 202701150300.01" in lines(render_pbs(job(begin_at=begin), JobTemplate(), "pbsdsh"))
    schedmd = render_pbs(job(begin_at=begin), JobTemplate(), "srun", slurm_backed=True)
    assert "#PBS -a 2027-01-15T03:00:01" in lines(schedmd)  # sbatch reads it, as --begin
    assert "#$ -a 202701150300.01" in lines(render_sge(job(begin_at=begin), JobTemplate(), "qrsh"))
    for render, launcher in ((render_slurm, "srun"), (render_pbs, "pbsdsh"), (render_sge, "qrsh")):
        assert not any(word in render(job(), JobTemplate(), launcher) for word in ("--begin", " -a "))


def test_the_warning_time_reaches_the_pilots_argv_only_when_set():
    assert pilot_arguments(job(warn_before_s=60))[-2:] == ["--warn-before", "60"]
    assert "--warn-before" not in pilot_arguments(job())



# -- a job kept off nodes (a pool's black-holed nodes) ---------------------------------------------------------


def test_a_job_kept_off_nodes_says_so_to_slurm_and_grid_engine_and_a_pbs_script_refuses_it():
    kept_off = job(exclude_nodes=("node1", "node3"))
    assert "#SBATCH --exclude=node1,node3" in lines(render_slurm(kept_off, JobTemplate(), "srun"))
    assert "#$ -l h=!node1&!node3" in lines(render_sge(kept_off, JobTemplate(), "qrsh"))
    with pytest.raises(JobScriptError, match="cannot be kept off named nodes"):
        render_pbs(kept_off, JobTemplate(), "pbsdsh")
    assert not any("exclude" in line or "h=" in line for line in lines(render_slurm(job(), JobTemplate(), "srun")))
    assert not any("h=!" in line for line in lines(render_sge(job(), JobTemplate(), "qrsh")))


@pytest.mark.parametrize("render, launcher, extra", [
    (render_slurm, "srun", "--exclude=node9"),
    (render_slurm, "srun", "-x node9"),
    (render_slurm, "srun", "--nodelist=node2"),
    (render_sge, "qrsh", "-l h=sgenode1"),
    (render_sge, "qrsh", "-l arch=lx-amd64,hostname=sgenode2"),
])
def test_a_sites_own_choice_of_nodes_conflicts_only_with_a_job_kept_off_nodes(render, launcher, extra):
    with pytest.raises(JobScriptError, match="conflicts with the lease's exclude_nodes: the script keeps the job "
                                             "off node1"):
        render(job(exclude_nodes=("node1",)), JobTemplate(extra_directives=(extra,)), launcher)
    assert extra in lines(render(job(), JobTemplate(extra_directives=(extra,)), launcher))[-3]


@pytest.mark.parametrize("bad", [
    ("node1,node2",), ("!node1",), ("node 1",), ("",), ("-x",), ("a" * 129,), ("node1\n#SBATCH --uid=0",),
    ["node1"], tuple(f"n{i}" for i in range(65)), (5,),
])
def test_a_node_name_a_directive_would_read_as_more_is_refused_before_any_script(bad):
    with pytest.raises(JobScriptError, match="exclude_nodes must be at most 64 node names"):
        render_slurm(job(exclude_nodes=bad), JobTemplate(), "srun")
