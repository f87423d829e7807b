"""``workspace-pilot evaluate``: check that this node is ready for pilots, change nothing, print the sudoers line.

Each check returns :class:`Check` lines (``ok``, ``warn`` or ``FAIL``); a
printer writes them, a summary, and the sudoers line to install as the very
last line (admins need it most when the privilege check fails).

Changing nothing is the point: evaluate only stats, lists and reads. It
creates no directory, lock, journal entry or log file, never writes a
balloon, opens libvirt read-only, and sends the service one unauthenticated
request, which the service refuses before it stores anything.

Path safety: the pilot runs as root through sudo, so every file it runs,
imports or trusts (the executable, the interpreter, the ``pilot`` package,
the configuration and node key, the journal and log directories) and every
directory above them must be owned by root and not writable by group or
others; otherwise whoever can write there can become root or make the next
pilot "undo" changes it never made. A world-writable directory with the
sticky bit (``/tmp``, ``/var/tmp``) FAILs too, as in OpenSSH's StrictModes:
the sticky bit stops others from replacing *existing* root-owned entries,
but anyone may create a missing one first (a journal or log directory the
first pilot would create), so the pilot's files do not belong below one.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import TextIO

from pilot.config import DEFAULT_PATH, ConfigError, load_config
from pilot.exitcodes import ExitCode
from pilot.batchenv import DEFAULT_PATH as SECURE_PATH
from workspace_common.protocol import PILOT_ENV
from pilot.evaluate.check import FAIL, OK, SUDOERS_FILE, SUDOERS_PATH_RE, WARN, Check, plural, valid_user
from pilot.evaluate.node import (
    check_backend, check_batch_user, check_config, check_contact, check_journal, check_libvirt, check_privilege,
)
from pilot.evaluate.vmjobs import check_vmjobs
from pilot.evaluate.paths import check_path, check_paths, resolve_chain

__all__ = ["Check", "FAIL", "OK", "WARN", "check_journal", "check_path", "check_privilege", "evaluate",
           "resolve_chain", "valid_user"]


def evaluate(config_path: str | None, contact: str | None, batch_user: str | None,
             out: TextIO | None = None) -> int:
    """Run every check, print them and the sudoers line on ``out`` (default stdout); return an ExitCode.

    OK when nothing FAILed (warnings allowed), NOT_READY when something did,
    CONFIG (each problem on its own stderr line, nothing else printed) when
    the configuration cannot be loaded. A missing node key or contact is not a
    config error here: the key is a FAIL line, the contact check is skipped.
    """
    out = sys.stdout if out is None else out
    try:
        config = load_config(config_path, require_service=False, contact=contact)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"workspace-pilot: config error: {problem}", file=sys.stderr)
        return ExitCode.CONFIG
    config_file = config_path or (DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None)
    executable = pilot_executable()
    user = batch_user if batch_user is not None else (os.environ.get("SUDO_USER") or "pilot")
    checks = [
        *check_privilege(executable, user),
        *check_config(config, config_file),
        *check_paths(config, config_file, executable),
        *check_backend(config),
        *check_journal(config),
        *check_libvirt(config),
        *check_vmjobs(config),
        *check_contact(config),
        *check_batch_user(user, batch_user is not None),
    ]
    return report(checks, executable, user, out)


def report(checks: list[Check], executable: str | None, batch_user: str, out: TextIO) -> int:
    """Print ``checks``, the summary, a blank line and the sudoers line (last); return the ExitCode."""
    for check in checks:
        print(check.line(), file=out)
    failed = sum(check.status == FAIL for check in checks)
    if failed:
        print(f"NOT READY: {failed} {plural(failed, 'check')} failed (see FAIL lines)", file=out)
    else:
        passed = sum(check.status == OK for check in checks)
        warned = sum(check.status == WARN for check in checks)
        print(f"ready: {passed} {plural(passed, 'check')} ok, {warned} {plural(warned, 'warning')}", file=out)
    print(file=out)
    line = sudoers_line(batch_user, executable)
    if line is None:
        print("# no sudoers line: fix the FAIL lines about the batch user or the executable first", file=out)
    else:
        print(f"# install with visudo -f {SUDOERS_FILE} (all three lines: the first fixes the PATH root runs with;", file=out)
        print("# the second lets the job's walltime and node name through sudo's env_reset, so the pilot can end", file=out)
        print("# before the batch system kills it, and nothing else of the caller's environment):", file=out)
        for rule in sudoers_rules(batch_user, executable):
            print(rule, file=out)
    out.flush()
    return ExitCode.NOT_READY if failed else ExitCode.OK


def sudoers_line(batch_user: str, executable: str | None) -> str | None:
    """The sudoers rule that lets ``batch_user`` run ``executable reserve ...`` as root; None if unsafe to write."""
    if not valid_user(batch_user) or executable is None or not SUDOERS_PATH_RE.fullmatch(executable):
        return None
    return f"{batch_user} ALL=(root) NOPASSWD: {executable} reserve *"


def sudoers_rules(batch_user: str, executable: str) -> list[str]:
    """The three lines of the sudoers file (packaging/workspace-pilot.sudoers holds them for /usr/bin, its rule
    commented out until the site names its account): the fixed PATH root runs with, the env_keep that lets
    the job's batch variables and the slot's secret through, and the rule."""
    return [f'Defaults!{executable} secure_path="{SECURE_PATH}"',
            f'Defaults!{executable} env_keep += "{" ".join(PILOT_ENV)}"', sudoers_line(batch_user, executable)]


def pilot_executable() -> str | None:
    """The absolute, symlink-free path of the ``workspace-pilot`` command that sudo should run; None if not found.

    The running script when this is it; else the one beside the interpreter
    (a virtualenv's ``bin``, or ``/usr/bin`` for a system install: the one that
    runs this very package, also under ``python -m pilot``); else ``$PATH``'s.
    """
    candidates = []
    if os.path.basename(sys.argv[0] or "") == "workspace-pilot":
        candidates.append(sys.argv[0])
    candidates.append(os.path.join(os.path.dirname(sys.executable), "workspace-pilot"))
    found = shutil.which("workspace-pilot")
    if found:
        candidates.append(found)
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.realpath(candidate)
    return None


