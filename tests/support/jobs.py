"""Waiting for a provider's job to reach a state."""

from __future__ import annotations

import time

import pytest

from service_adapter.providers import JobState


def wait_state(provider, job_id: str, states: set[JobState], timeout: float = 20.0) -> JobState:
    """Poll ``status()`` until the job is in one of ``states``; returns it (fails the test at the deadline).

    Polled every 100 ms: Slurm offers no way to wait for a job's state
    (sbatch -W itself polls, every 10 s).
    """
    deadline = time.monotonic() + timeout
    while True:
        state = provider.status([job_id])[job_id]
        if state in states:
            return state
        if time.monotonic() > deadline:
            expected = sorted(s.name for s in states)
            pytest.fail(f"job {job_id} is {state.name} after {timeout} s, expected one of {expected}")
        time.sleep(0.1)
