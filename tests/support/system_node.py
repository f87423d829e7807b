"""A node's own system files for a test module: /etc/workspace-pilot/pilot.conf and a sudo rule.

A sudo caller cannot replace pilot.conf (``--config`` is refused through sudo), so tests that run the pilot
or ``workspace-vmjob`` through the real sudo install it where the node keeps it, with a sudoers file, and
remove both afterwards. A node that has either already is not touched: the test module is skipped.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

SYSTEM_CONFIG = "/etc/workspace-pilot/pilot.conf"


@contextlib.contextmanager
def sudo_rule_and_config(sudoers: str, rule: str):
    """The sudoers file ``sudoers`` holding ``rule`` (0440, checked with visudo) and the directory of
    :data:`SYSTEM_CONFIG`, for the ``with`` block, which writes the config itself; both files (and the
    directory, if this made it) are removed afterwards."""
    if os.path.lexists(SYSTEM_CONFIG) or os.path.lexists(sudoers):
        pytest.skip(f"{SYSTEM_CONFIG} or {sudoers} exists already: not replacing a node's own")
    made_etc = not os.path.isdir(os.path.dirname(SYSTEM_CONFIG))
    try:
        os.makedirs(os.path.dirname(SYSTEM_CONFIG), exist_ok=True)
        with open(sudoers, "w", encoding="ascii") as handle:
            handle.write(rule)
        os.chmod(sudoers, 0o440)
        checked = subprocess.run(["visudo", "-c", "-f", sudoers], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        yield
    finally:
        for path in (sudoers, SYSTEM_CONFIG):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if made_etc:
            os.rmdir(os.path.dirname(SYSTEM_CONFIG))
