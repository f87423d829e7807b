"""The sge provider and the qrsh launcher against a real multi-host Grid Engine (tests/support/sge_cluster.py).

The payload is a stand-in for workspace-pilot (named as such): run through
the real ``sudo -n --preserve-env=...`` that the job script writes, it records
its host, whether the slot's secret reached it, and waits; a ``qdel`` (with
``-notify``) gives it SIGUSR2, which it notes before it exits, as the pilot
must. Each test deletes what it submitted, by id.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time

import pytest

from workspace_common.protocol import SLOT_SECRET_ENV
from service_adapter.providers import JobState, PilotJob, ProviderSettings, make_provider
from service_adapter.providers.jobscript import JobTemplate
from tests.support.jobs import wait_state

SUDO = "/usr/bin/sudo"
STAND_IN = '''#!{python}
"""A stand-in for workspace-pilot (tests only): records its host and the slot's secret, then {behaviour}."""
import json, os, signal, socket, sys, time

path = os.path.join({records!r}, f"{{socket.gethostname()}}.{{os.getpid()}}.json")

def on_usr2(signum, frame):
    open(path + ".usr2", "w").close()
    os._exit(0)

signal.signal(signal.SIGUSR2, on_usr2)
record = {{"host": socket.gethostname(), "argv": sys.argv[1:], "secret": os.environ.get({secret_env!r})}}
with open(path + ".tmp", "w") as handle:
    json.dump(record, handle)
os.rename(path + ".tmp", path)
if {exit_code!r} is None:
    time.sleep(120)
sys.exit({exit_code!r} or 0)
'''


@pytest.fixture
def site(sge_cluster):
    """(a provider on the cluster whose job scripts run a stand-in, its records directory, submitted ids)."""
    work = tempfile.mkdtemp(prefix="sge-provider-")  # below /tmp: the execution hosts' jobs write here
    os.chmod(work, 0o755)
    submitted: list[str] = []

    def provider_for(exit_code=None):
        records = os.path.join(work, "records")
        os.makedirs(records, exist_ok=True)
        stand_in = os.path.join(work, f"stand-in-{exit_code}")
        with open(stand_in, "w", encoding="utf-8") as handle:
            handle.write(STAND_IN.format(python=sys.executable, records=records, secret_env=SLOT_SECRET_ENV,
                                         exit_code=exit_code,
                                         behaviour="sleeps until SIGUSR2" if exit_code is None else f"exits {exit_code}"))
        os.chmod(stand_in, 0o755)
        template = JobTemplate(pilot_command=stand_in, sudo=SUDO, output_dir=os.path.join(work, "jobs"),
                               parallel_environment="workspace-pilot")
        env = {"PATH": f"{sge_cluster.command_dir()}:{os.environ['PATH']}"}
        return make_provider(ProviderSettings(name="sge", template=template, env=env, command_timeout_s=20)), records

    yield provider_for, submitted
    for job_id in submitted:
        sge_cluster.run(["qdel", "-f", job_id])


def job(slot: str, nodes: int) -> PilotJob:
    return PilotJob(slot=slot, lease="l1", nodes=nodes, memory_mb=64, duration_s=60, grace_s=5,
                    contact="http://127.0.0.1:1", pilot_config="", slot_secret="5e" * 32)


def records_of(records: str, count: int, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(names := sorted(n for n in os.listdir(records) if n.endswith(".json"))) < count:
        assert time.monotonic() < deadline, f"{len(names)} stand-ins started, expected {count}"
        time.sleep(0.05)  # a payload starting on a host signals nobody
    return [json.load(open(os.path.join(records, name))) for name in names]


def test_a_two_node_job_runs_one_pilot_on_each_host_then_qdel_warns_them(site):
    provider_for, submitted = site
    provider, records = provider_for()
    job_id = provider.submit(job("slot-a", 2))
    submitted.append(job_id)
    found = records_of(records, 2)
    assert sorted(r["host"] for r in found) == ["sgenode1", "sgenode2"]
    assert all(r["secret"] == "5e" * 32 for r in found)  # through qrsh -V and sudo, never argv
    assert all("5e" * 32 not in " ".join(r["argv"]) for r in found)
    assert all(r["argv"][:3] == ["reserve", "--slot", "slot-a"] for r in found)
    assert wait_state(provider, job_id, {JobState.RUNNING}, timeout=30) is JobState.RUNNING
    assert sorted(provider.allocated_hosts(job_id)) == ["sgenode1", "sgenode2"]
    provider.cancel(job_id)
    deadline = time.monotonic() + 30
    while len([n for n in os.listdir(records) if n.endswith(".usr2")]) < 2:
        assert time.monotonic() < deadline, "not every stand-in got the -notify warning"
        time.sleep(0.05)
    assert wait_state(provider, job_id, {JobState.COMPLETED, JobState.FAILED, JobState.GONE}, timeout=30) is not JobState.RUNNING
    provider.cancel(job_id)  # a job that has ended: not an error


@pytest.mark.parametrize("exit_code, expected", [(0, JobState.COMPLETED), (3, JobState.FAILED)])
def test_a_job_is_reported_by_its_pilots_exit(site, sge_cluster, exit_code, expected):
    provider_for, submitted = site
    provider, _ = provider_for(exit_code)
    job_id = provider.submit(job(f"slot-x{exit_code}", 2))
    submitted.append(job_id)
    assert wait_state(provider, job_id, {JobState.COMPLETED, JobState.FAILED}, timeout=30) is expected
    # The job script's own record (the last) carries the pilots' status itself, not just "non-zero".
    statuses = re.findall(r"^exit_status\s+(\d+)", sge_cluster.run(["qacct", "-j", job_id]).stdout, re.M)
    assert statuses[-1] == str(exit_code)


def test_an_id_grid_engine_never_had_is_gone_and_not_an_id_is_refused(site):
    provider_for, _ = site
    provider, _ = provider_for()
    assert provider.status(["999999", "x1"]) == {"999999": JobState.GONE, "x1": JobState.GONE}
    provider.cancel("999999")
