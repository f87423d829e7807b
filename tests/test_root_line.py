"""The root line on a node, tried as a hostile pilot service account would: through the real sudo, inside a
real Slurm job, with the real Slurm commands.

The account may run ``sudo -n --preserve-env=... workspace-pilot reserve ...`` (the shipped
packaging/workspace-pilot.sudoers, its rule enabled for ``nobody``) and sets whatever environment it likes.
Its weapons, all files of its own: a slurm.conf whose ``PluginDir`` is a directory of plug-ins that it
compiled (each writes ``plugin uid=N`` to a marker file when it is loaded), a ``PATH`` whose ``squeue``,
``qstat``, ``scontrol`` and ``sudo`` write ``path uid=N`` there, and Grid Engine locations of its own. The
same job first fires each weapon at an unprotected command as itself, so the marker proves that the
weapons work; then root must load none of them: the marker holds no ``uid=0`` line.

The module installs /etc/workspace-pilot/pilot.conf (which a sudo caller cannot replace) and the sudo rule,
and removes both; it is skipped where either was there before.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import stat
import subprocess
import tempfile
import time

import pytest

from workspace_common.protocol import PILOT_ENV
from tests.support.service import throwaway_node_keys
from tests.support.slurm_cluster import PILOT
from tests.support.system_node import SYSTEM_CONFIG, sudo_rule_and_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUDOERS = "/etc/sudoers.d/workspace-pilot-tests"
NOBODY, NOGROUP = 65534, 65534
SLURM_PLUGINS = "/usr/lib/x86_64-linux-gnu/slurm-wlm"
#: The batch system's config locations that the shipped sudoers no longer keep.
LOCATIONS = ("SLURM_CONF", "SGE_ROOT", "SGE_CELL", "SGE_QMASTER_PORT")

EVIL_PLUGIN = r"""
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
/* Loaded as a Slurm plug-in: say who loaded it. */
__attribute__((constructor)) static void loaded(void) {
    char line[64];
    int fd = open("%(marker)s", O_WRONLY | O_CREAT | O_APPEND, 0666);
    if (fd >= 0) {
        int n = snprintf(line, sizeof line, "plugin uid=%%d\n", (int)geteuid());
        if (write(fd, line, n) < 0) {}
        close(fd);
    }
}
"""

EVIL_COMMAND = """#!/bin/sh
echo "path uid=$(id -u) $0" >> {marker}
"""

HOSTILE_JOB = """#!/bin/sh
# The pilot service account's own job script, as a compromised service would write it.
E={evil}
KEEP={keep}
export WORKSPACE_PILOT_SLOT_SECRET={secret}
unset SLURM_JOB_END_TIME  # so the pilot must ask squeue
# The weapons work: fired at the account's own commands, each writes its marker line (uid 65534).
SLURM_CONF=$E/slurm.conf squeue -h -j "$SLURM_JOB_ID" >/dev/null 2>&1
PATH=$E/bin:$PATH squeue >/dev/null 2>&1
# Now at root, through the pilot's own start path.
export SLURM_CONF=$E/slurm.conf SGE_ROOT=$E/sge SGE_CELL=evil SGE_QMASTER_PORT=1 PATH=$E/bin:$PATH
/usr/bin/sudo -n --preserve-env=$KEEP,SLURM_CONF,SGE_ROOT,SGE_CELL,SGE_QMASTER_PORT {pilot} reserve --slot {slot} \\
    --memory 1 --duration 3600 --grace 5 2>{out}/kept.err
echo "kept $?" >> {out}/codes
/usr/bin/sudo -n --preserve-env=$KEEP {pilot} reserve --slot {slot} --memory 1 --duration 3600 --grace 5 2>{out}/pilot.err
echo "pilot $?" >> {out}/codes
SLURM_JOB_ID="$SLURM_JOB_ID --clusters=evil" /usr/bin/sudo -n --preserve-env=$KEEP {pilot} reserve --slot {slot} \\
    --memory 1 --duration 3600 --grace 5 2>{out}/badid.err
echo "badid $?" >> {out}/codes
"""


STOPPING_JOB = """#!/bin/sh
# The pilot service account's job, trying to stop its root pilot through sudo's relay of SIGTSTP.
export WORKSPACE_PILOT_SLOT_SECRET={secret}
/usr/bin/sudo -n --preserve-env={keep} {pilot} reserve --slot {slot} --memory 1 --duration 3600 --grace 5 \\
    2>{out}/pilot.err &
S=$!
P=""
while [ -z "$P" ] && kill -0 $S 2>/dev/null; do P=$(pgrep -P $S -f workspace-pilot); done
# Until the interpreter has set its dispositions (the first lines of main: before any lock), a stop is harmless.
for i in $(seq 200); do
    ignored=$(awk '/^SigIgn/ {{print $2}}' /proc/$P/status 2>/dev/null)
    [ -n "$ignored" ] && [ $(( 0x$ignored & 0x80000 )) -ne 0 ] && break
    sleep 0.01
done
echo "ignored ${{ignored:-none}}" >> {out}/codes
for i in $(seq 40); do
    kill -TSTP $S 2>/dev/null
    sleep 0.02
    [ -r /proc/$P/stat ] && cut -d' ' -f3 /proc/$P/stat >> {out}/states
done
kill -CONT $S 2>/dev/null  # sudo itself stops on SIGTSTP; the pilot must not have
wait $S
echo "pilot $?" >> {out}/codes
"""


@pytest.fixture(scope="module")
def root_line_node(slurm_cluster):
    """pilot.conf and the shipped sudo rule (enabled for nobody, for this venv's pilot), for the module."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the hostile plug-in")
    shipped = pathlib.Path(REPO, "packaging", "workspace-pilot.sudoers").read_text(encoding="utf-8")
    rule = shipped.replace("/usr/bin/workspace-pilot", PILOT).replace("\n#pilot ALL=", "\nnobody ALL=")
    with sudo_rule_and_config(SUDOERS, rule):
        directory = tempfile.mkdtemp(prefix="workspace-root-line-")
        os.chmod(directory, 0o755)  # the account reaches its own directories below it
        try:
            key_file = throwaway_node_keys(pathlib.Path(directory))
            with open(SYSTEM_CONFIG, "w", encoding="utf-8") as handle:
                handle.write(
                    f"[service]\ncontact = http://127.0.0.1:1\nnode_key_file = {key_file}\nreserved_timeout = 1\n"
                    "[memory]\nbackend = none\n[libvirt]\nuri =\n"
                    f"[journal]\ndir = {directory}/journal\n[logging]\ndir = {directory}/logs\n"
                    f"[timing]\nwalltime_margin = 20\n[batch]\nslurm_conf = {slurm_cluster.conf}\n"
                )
            os.chmod(SYSTEM_CONFIG, 0o600)
            yield directory
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def arm(evil: str, real_slurm_conf: str) -> str:
    """The account's weapons under ``evil`` (its own directory); returns the marker's path."""
    marker = os.path.join(evil, "marker")
    plugins = os.path.join(evil, "plugins")
    os.makedirs(plugins)
    source = os.path.join(evil, "evil.c")
    with open(source, "w", encoding="ascii") as handle:
        handle.write(EVIL_PLUGIN % {"marker": marker})
    built = os.path.join(evil, "evil.so")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", built, source], check=True, capture_output=True)
    for name in os.listdir(SLURM_PLUGINS):  # every plug-in Slurm could load, by its own name
        if name.endswith(".so"):
            shutil.copy(built, os.path.join(plugins, name))
    with open(real_slurm_conf, encoding="utf-8") as handle:  # the real cluster (reachable), its plug-ins ours
        conf = re.sub(r"(?m)^PluginDir=.*$", "", handle.read())
    with open(os.path.join(evil, "slurm.conf"), "w", encoding="utf-8") as handle:
        handle.write(conf + f"\nPluginDir={plugins}\n")
    os.makedirs(os.path.join(evil, "bin"))
    for name in ("squeue", "qstat", "scontrol", "sudo", "xl"):
        path = os.path.join(evil, "bin", name)
        with open(path, "w", encoding="ascii") as handle:
            handle.write(EVIL_COMMAND.format(marker=marker))
        os.chmod(path, 0o755)
    os.makedirs(os.path.join(evil, "sge", "evil", "common"))
    for root, dirs, files in os.walk(evil):
        for name in (root, *(os.path.join(root, n) for n in dirs + files)):
            os.chown(name, NOBODY, NOGROUP)
    return marker


def hostile_job(cluster, node_dir: str, template: str, slot: str, **fields) -> tuple[str, str]:
    """Run ``template`` as nobody in a real Slurm job (10 minutes' walltime); (its job id, its output directory)
    once done."""
    out = tempfile.mkdtemp(prefix="out-", dir=node_dir)
    os.chown(out, NOBODY, NOGROUP)
    script = os.path.join(out, "job.sh")
    with open(script, "w", encoding="ascii") as handle:
        handle.write(template.format(keep=",".join(PILOT_ENV), secret="5e" * 32, pilot=PILOT, slot=slot, out=out,
                                     **fields))
    os.chmod(script, 0o755)
    submitted = cluster.run(["sbatch", "--parsable", "--uid=nobody", "--gid=nogroup", "-t", "10", "-N", "1",
                             "-D", out, "-o", os.path.join(out, "job.out"), script])
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    assert wait_done(cluster, job) == "COMPLETED"
    return job, out


def wait_done(cluster, job: str, timeout: float = 90) -> str:
    """The job's final state once it left the queue (polled: squeue has no way to wait)."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        shown = cluster.run(["scontrol", "show", "job", "-o", job]).stdout
        state = re.search(r"\bJobState=(\S+)", shown)
        if state and state.group(1) not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
            return state.group(1)
        time.sleep(0.5)
    cluster.run(["scancel", job])
    raise AssertionError(f"job {job} still runs after {timeout} s")


def test_a_hostile_service_account_makes_root_load_nothing_of_its_own(slurm_cluster, root_line_node):
    evil = tempfile.mkdtemp(prefix="evil-", dir=root_line_node)
    marker = arm(evil, slurm_cluster.conf)
    slot = "root-line-1"
    job, out = hostile_job(slurm_cluster, root_line_node, HOSTILE_JOB, slot, evil=evil)

    lines = pathlib.Path(marker).read_text(encoding="ascii").splitlines()
    # The weapons work: the account's own squeue loaded its plug-ins, and its PATH chose its squeue...
    assert f"plugin uid={NOBODY}" in lines
    assert any(line.startswith(f"path uid={NOBODY} ") for line in lines)
    # ...but root ran none of them.
    assert not [line for line in lines if "uid=0" in line], lines

    codes = dict(line.split() for line in pathlib.Path(out, "codes").read_text().splitlines())
    # Asking sudo to keep a config location is refused by sudo itself: the pilot never starts.
    assert codes["kept"] == "1"
    refused = pathlib.Path(out, "kept.err").read_text()
    assert "not allowed to set the following environment variables" in refused
    assert all(name in refused for name in LOCATIONS)
    # Without them the pilot runs, asks the real squeue with the configured slurm.conf, and gets the job's
    # real end; the service is unreachable, so it gives the slot back and says so.
    assert codes["pilot"] == "6", pathlib.Path(out, "pilot.err").read_text()
    logs = os.path.join(root_line_node, "logs")
    log_file = pathlib.Path(logs, next(name for name in os.listdir(logs) if name.startswith(slot)))
    log = log_file.read_text()
    assert re.search(r"deadline .* \(squeue\)", log), log
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o640  # the node's logs are not the node's users' to read
    # A job id that is not one stops the pilot with one line before anything changes.
    assert codes["badid"] == "2"
    bad = pathlib.Path(out, "badid.err").read_text().splitlines()
    assert bad == [f"workspace-pilot: usage error: $SLURM_JOB_ID is '{job} --clusters=evil', not a slurm job id "
                   "of the batch system's form; the pilot changes nothing"]


def test_the_caller_cannot_stop_its_root_pilot_with_job_control_signals(slurm_cluster, root_line_node):
    _, out = hostile_job(slurm_cluster, root_line_node, STOPPING_JOB, "root-line-2")
    codes = dict(line.split() for line in pathlib.Path(out, "codes").read_text().splitlines())
    # The pilot ignores SIGTSTP (bit 20 of its SigIgn) from its first lines on, before any lock...
    assert int(codes["ignored"], 16) & (1 << 19), codes
    # ...so while sudo relayed each SIGTSTP (and stopped itself), the pilot ran on, never T (stopped), to its end.
    states = pathlib.Path(out, "states").read_text().split()
    assert states and "T" not in states, states
    assert codes["pilot"] == "6", pathlib.Path(out, "pilot.err").read_text()
