"""The LRM-only baseline: a job that does nothing, submitted and cancelled the way a lease's pilot job is.

Its payload stands where the pilot stands in the job script (after the
launcher and sudo). It notes when it started and when it was told to stop
(SIGTERM), each as a file named after its pid in ``<stamps>/<slot>/``,
and does nothing else, so the baseline's stand-up and tear-down are the
LRM's own (and the launcher's) and a lease's extra time is the pilot's.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import time

from service_adapter.providers import ProviderSettings, make_provider
from service_adapter.providers.base import PilotJob, Provider
from service_adapter.providers.local import LocalProvider
from service_adapter.providers.jobscript import pilot_arguments

from admin_tools.leasebench.phases import BaselineRecord

PAYLOAD = """#!/bin/sh
# lease-bench's LRM-only baseline payload: note when it started and when it was told to stop; nothing else.
stamps={stamps}
slot=
while [ $# -gt 0 ]; do
    [ "$1" = --slot ] && slot=$2
    shift
done
[ -n "$slot" ] || {{ echo "baseline payload: no --slot argument" >&2; exit 2; }}
mark() {{
    [ -e "$stamps/$slot/$1.$$" ] || {{ date +%s.%N > "$stamps/$slot/.$1.$$" && mv "$stamps/$slot/.$1.$$" "$stamps/$slot/$1.$$"; }}
}}
# The sleep is killed with the payload: a child left behind would keep the job's step (and its node) busy.
trap 'mark stop; kill $sleeper 2>/dev/null; exit 0' TERM INT
mark start
sleep 86400 & sleeper=$!
wait $sleeper
mark stop  # the sleep got the signal first (sent to the whole process group): that was the stop
"""


class BaselineError(RuntimeError):
    """The baseline job did not start or stop on every node in time; the message says how far it got."""


class PayloadLocalProvider(LocalProvider):
    """The local provider, starting the baseline payload where it would start a pilot."""

    def __init__(self, output_dir: str, payload: str, **options):
        super().__init__(output_dir, **options)
        self.payload = payload

    def pilot_argv(self, job: PilotJob, host: str) -> list[str]:
        """The payload with the pilot's arguments (it reads only ``--slot``)."""
        return [self.payload, *pilot_arguments(job), "--host", host]


def write_payload(workdir: str) -> tuple[str, str]:
    """Write the payload script (mode 0755) and make its stamps directory; returns (script, stamps dir)."""
    stamps = os.path.join(workdir, "baseline-stamps")
    os.makedirs(stamps, mode=0o755, exist_ok=True)
    script = os.path.join(workdir, "baseline-payload.sh")
    with open(script, "w", encoding="ascii") as handle:
        handle.write(PAYLOAD.format(stamps=stamps))
    os.chmod(script, 0o755)
    return script, stamps


def baseline_provider(settings: ProviderSettings | None, payload: str, output_dir: str) -> Provider:
    """A provider like the lease's (``settings``; None: the local provider) whose jobs run ``payload``."""
    if settings is None or settings.name == "local":
        return PayloadLocalProvider(output_dir, payload, host_prefix="baseline-node")
    template = dataclasses.replace(settings.template, pilot_command=payload)
    return make_provider(dataclasses.replace(settings, template=template))


def _stamps(directory: str, kind: str) -> list[float]:
    found = []
    for path in glob.glob(os.path.join(directory, f"{kind}.*")):
        with open(path, encoding="ascii") as handle:
            found.append(float(handle.read()))
    return found


def _wait_for(directory: str, kind: str, count: int, until: float, what: str) -> list[float]:
    while True:
        found = _stamps(directory, kind)
        if len(found) >= count:
            return found
        if time.monotonic() > until:
            raise BaselineError(f"{what}: {len(found)} of {count} payloads noted their {kind} in time")
        time.sleep(0.002)  # the stamps carry their own times: polling adds nothing to what is measured


def run_baseline(provider: Provider, job: PilotJob, stamps: str, timeout_s: float) -> BaselineRecord:
    """Submit ``job`` (its payload must be the baseline's), wait for every node's start, cancel, wait for every
    node's stop, and wait for the job to leave the LRM. Raises :class:`BaselineError` past ``timeout_s``."""
    directory = os.path.join(stamps, job.slot)
    os.makedirs(directory, mode=0o755)
    until = time.monotonic() + timeout_s
    submit_started = time.time()
    job_id = provider.submit(job)
    submitted = time.time()
    try:
        started = _wait_for(directory, "start", job.nodes, until, f"baseline job {job_id}")
        cancel_started = time.time()
        provider.cancel(job_id)
        stopped = _wait_for(directory, "stop", job.nodes, until, f"baseline job {job_id}")
    except BaseException:
        provider.cancel(job_id, force=True)
        raise
    wait_job_gone(provider, job_id, until)
    return BaselineRecord(job.nodes, submit_started, submitted, started, cancel_started, stopped)


def wait_job_gone(provider: Provider, job_id: str, until: float) -> None:
    """Wait until the LRM says ``job_id`` finished (rounds must not overlap); BaselineError past ``until``."""
    while True:
        state = provider.status([job_id]).get(job_id)
        if state is not None and state.finished:
            return
        if time.monotonic() > until:
            raise BaselineError(f"job {job_id} still {state.name.lower() if state else 'unknown'} after its round")
        time.sleep(0.05)
