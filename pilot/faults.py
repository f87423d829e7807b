"""Fault-injection checkpoints, for the crash tests: inert unless an environment variable names one.

The tests kill a real pilot at named points of its work (after the journal
write and before the balloon, after the balloon and before ``reserved``,
while holding, in the middle of unreserve). With
``WORKSPACE_PILOT_TEST_PAUSE_AT=<name>`` the pilot stops at that point,
says so on stderr, and waits there until a signal arrives; then it goes
on as if the signal had come at exactly that point.
"""

from __future__ import annotations

import logging
import os
import sys

PAUSE_ENV = "WORKSPACE_PILOT_TEST_PAUSE_AT"
POINTS = ("journalled", "taken", "holding", "restoring", "restored")

log = logging.getLogger(__name__)


class Checkpoints:
    """Call with a point's name; pauses there if the environment asks for that point."""

    def __init__(self, resume, pause_at: str | None = None):
        """``resume``: the :class:`pilot.wakeup.Wakeup` that every stop request sets."""
        self.resume = resume
        self.pause_at = pause_at if pause_at is not None else os.environ.get(PAUSE_ENV)

    def __call__(self, name: str) -> None:
        if name != self.pause_at:
            return
        self.resume.clear()
        log.warning("test checkpoint %s: paused until a signal arrives", name)
        # Straight to stderr too, whatever the log level: the test waits for this line.
        print(f"workspace-pilot: paused at checkpoint {name}", file=sys.stderr, flush=True)
        while not self.resume.is_set():  # a wait may end early (another signal): only a stop request resumes
            self.resume.wait()
