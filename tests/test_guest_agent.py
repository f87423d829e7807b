"""The guest agent (pilot/vm/guestagent.sh) as a guest runs it, under dash and under busybox's sh.

Its lease channel here is a pseudo-terminal in raw mode: the agent opens the
terminal's device as it opens the virtio port in a guest, and the test, on
the other side, stands where the pilot's socket is (what the pilot writes,
what it reads). The Machine/Job Features go to a temporary directory
(``WORKSPACE_PILOT_MJF``), the login variables to a temporary ``/etc``.
"""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import time
import tty

import pytest

from pilot.vm.features import LeaseEnd, feature_lines, vm_features

AGENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pilot", "vm", "guestagent.sh")
SHELLS = {"dash": ["dash"], "busybox": ["busybox", "sh"]}
START = vm_features(slot="lease-1", name="web", vcpus=2, memory_mb=512, started_at=1_800_000_000,
                    end=LeaseEnd(1_800_003_600, 30))


class Agent:
    """A running agent and the pilot's end of its channel."""

    def __init__(self, command: list[str], root):
        self.root = root
        self.run = root / "run"
        self.etc = root / "etc"
        (self.etc / "profile.d").mkdir(parents=True)
        (self.etc / "environment").write_text("LANG=C.UTF-8\n")
        features = root / "features"
        features.write_text(feature_lines(START))
        self.master, self.slave = pty.openpty()
        # No echo, no line editing: bytes through as a virtio port passes them. The test keeps the device open
        # as a port is always there (with no opener at all, the terminal's other side reads an error).
        tty.setraw(self.slave)
        env = {"PATH": os.environ["PATH"], "WORKSPACE_PILOT_PORT": os.ttyname(self.slave),
               "WORKSPACE_PILOT_MJF": str(self.run), "WORKSPACE_PILOT_USAGE": str(self.run / "wp" / "usage"),
               "WORKSPACE_PILOT_ETC": str(self.etc)}
        self.proc = subprocess.Popen(command + [AGENT, str(features)], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.heard = b""

    def said(self, line: str, timeout: float = 20.0) -> bool:
        """Wait until the agent has written ``line`` on its channel (the lines before it are kept)."""
        deadline = time.monotonic() + timeout
        wanted = line.encode() + b"\n"
        while wanted not in self.heard:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.master], [], [], left)[0]:
                return False
            self.heard += os.read(self.master, 4096)
        return True

    def tell(self, text: str) -> None:
        os.write(self.master, text.encode())

    def feature(self, directory: str, key: str) -> str | None:
        path = self.run / directory / key
        return path.read_text() if path.exists() else None

    def wait_feature(self, directory: str, key: str, value: str, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.feature(directory, key) == value + "\n":
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture(params=sorted(SHELLS))
def agent(request, tmp_path):
    command = SHELLS[request.param]
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} is not installed")
    running = Agent(command, tmp_path)
    yield running
    running.stop()


def test_the_agent_writes_the_features_the_vm_started_with_sets_the_variables_and_says_hello(agent):
    assert agent.said("hello"), agent.proc.stderr.peek() if agent.proc.poll() is not None else agent.heard
    for directory, values in START.items():
        for key, value in values.items():
            assert agent.feature(directory, key) == value + "\n", (directory, key)
    assert agent.feature("machinefeatures", "shutdowntime") == "1800003600\n"
    assert agent.feature("jobfeatures", "wall_limit_secs") == "3600\n"
    profile = (agent.etc / "profile.d" / "workspace-pilot-mjf.sh").read_text()
    assert profile == f"export MACHINEFEATURES={agent.run}/machinefeatures JOBFEATURES={agent.run}/jobfeatures\n"
    assert (agent.etc / "environment").read_text() == (
        f"LANG=C.UTF-8\nMACHINEFEATURES={agent.run}/machinefeatures\nJOBFEATURES={agent.run}/jobfeatures\n")


def test_the_pilots_lines_move_the_shutdown_time_and_nothing_else_gets_written(agent):
    assert agent.said("hello")
    before = sorted(str(p.relative_to(agent.root)) for p in agent.root.rglob("*"))
    # What a confused or hostile sender might write: other directories, paths, globs, commands, long words.
    agent.tell("mjf ../.. passwd x\n"
               "mjf jobfeatures ../../escape 1\n"
               "mjf jobfeatures shutdowntime_job ../1\n"
               "mjf jobfeatures shutdowntime_job *\n"
               "mjf jobfeatures shutdowntime_job 1 2\n"
               "mjf jobfeatures Shutdowntime_job 1\n"
               f"mjf jobfeatures {'k' * 49} 1\n"
               "mjf etc passwd x\n"
               "touch /tmp/owned\n"
               "ending 2026-12-06T17:00:00.000000Z 20 release\n")
    agent.tell(feature_lines({"machinefeatures": {"shutdowntime": "1800001800"},
                              "jobfeatures": {"shutdowntime_job": "1800001800", "wall_limit_secs": "1800"}}))
    assert agent.wait_feature("jobfeatures", "wall_limit_secs", "1800")
    assert agent.feature("machinefeatures", "shutdowntime") == "1800001800\n"
    assert agent.feature("jobfeatures", "shutdowntime_job") == "1800001800\n"
    after = sorted(str(p.relative_to(agent.root)) for p in agent.root.rglob("*"))
    assert after == sorted(before + ["run/wp/lease-channel"])  # values changed; else only what it was told is kept
    assert not os.path.exists("/tmp/owned")
    # Lines that are not features are kept for the guest's programs, as they came (the port has one opener).
    told = (agent.run / "wp" / "lease-channel").read_text().splitlines()
    assert told == ["touch /tmp/owned", "ending 2026-12-06T17:00:00.000000Z 20 release"]


def test_a_workloads_word_reaches_the_pilot_when_it_changes(agent):
    assert agent.said("hello")
    usage = agent.run / "wp" / "usage"
    usage.write_text("busy\n")
    assert agent.said("usage busy")
    usage.write_text("idle")  # no newline: still a word
    assert agent.said("usage idle")
    agent.heard = b""
    usage.write_text("busy; reboot\n")  # not a word the agent knows: nothing is said
    usage.write_text("busy\n")
    assert agent.said("usage busy")
    assert agent.heard.count(b"usage") == 1
