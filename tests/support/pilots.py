"""Real pilot processes for tests: their config, their start (paused at a fault checkpoint if asked), their output."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import pytest

from service_adapter.local_site import write_pilot_config
from tests.support.service import SLOT_SECRETS
from workspace_common.protocol import SLOT_SECRET_ENV

def pilot_config(tmp_path, contact: str, node_key_file: str, **options) -> str:
    """Write a pilot config under ``tmp_path`` (its own journal and log dirs); returns its path."""
    path = str(tmp_path / "pilot.conf")
    write_pilot_config(
        path, contact=contact, node_key_file=node_key_file,
        log_dir=str(tmp_path / "logs"), journal_dir=str(tmp_path / "journal"), **options,
    )
    return path



def start_pilot(config: str, slot: str, *, memory: int = 64, duration: float = 30, grace: float = 5,
                host: str = "node1", extra: tuple = (), pause_at: str | None = None,
                slot_secret: str | None = None) -> subprocess.Popen:
    """Start ``workspace-pilot reserve`` as a real process (paused at a fault checkpoint if asked).

    Its environment carries the slot's secret, as the slot's job would: ``slot_secret``, else the one
    a test Service gave the slot (a made-up one for a slot no Service knows).
    """
    argv = [
        sys.executable, "-m", "pilot", "reserve", "--slot", slot, "--memory", str(memory),
        "--duration", str(duration), "--grace", str(grace), "--config", config, "--host", host, *extra,
    ]
    env = dict(os.environ)
    env[SLOT_SECRET_ENV] = slot_secret or SLOT_SECRETS.get(slot) or "0" * 64
    if pause_at:
        env["WORKSPACE_PILOT_TEST_PAUSE_AT"] = pause_at
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)



@contextlib.contextmanager
def killed_after(process: subprocess.Popen):
    """``process`` for the ``with`` block; killed by its pid afterwards if it still runs."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()



def running_pilot(config: str, slot: str, **options):
    """A pilot process for the ``with`` block; killed by its pid afterwards if it still runs."""
    return killed_after(start_pilot(config, slot, **options))



def read_until(process: subprocess.Popen, needle: str, timeout: float = 15.0) -> str:
    """Read a process's output until a line holds ``needle``; returns what was read.

    Waits on the pipe itself (select), so there is no polling; fails the test
    if the process ends or ``timeout`` passes first.
    """
    import selectors

    fd = process.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while needle.encode() not in seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                pytest.fail(f"no {needle!r} within {timeout} s; output so far:\n{seen.decode(errors='replace')}")
            chunk = os.read(fd, 65536)
            if not chunk:
                pytest.fail(f"process ended before {needle!r}; output:\n{seen.decode(errors='replace')}")
            seen += chunk
    return seen.decode(errors="replace")



def journal_files(tmp_path) -> list[str]:
    """The entries in the test's journal directory (``tmp_path/journal``)."""
    directory = tmp_path / "journal"
    return sorted(p.name for p in directory.glob("*.json")) if directory.exists() else []
