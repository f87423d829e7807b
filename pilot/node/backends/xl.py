"""The ``xl`` backend: the lease's memory is ballooned out of Domain-0 with Xen's ``xl`` command.

For Xen hosts without libvirt. Only two commands are used: ``xl list 0``
to read and ``xl mem-set 0 <N>m`` to write.
"""

from __future__ import annotations

import subprocess

from pilot.batchenv import DEFAULT_PATH

from pilot.node.backends.base import BackendError, BalloonBackend

DEFAULT_COMMAND = "/usr/sbin/xl"
#: sudo for xl_sudo = yes: an absolute path, never looked up on the caller's PATH.
SUDO = "/usr/bin/sudo"

#: Seconds one xl call may take before it counts as hung.
TIMEOUT_S = 30

#: How far (MB) a read may land from the target and still count as reached:
#: xl prints whole MB, rounded down, of a balloon that settles within a page or so.
TOLERANCE_MB = 1


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


class XlBackend(BalloonBackend):
    """Domain-0's memory through ``xl``; the level is dom0's memory in MB.

    With ``sudo`` the commands run as ``sudo -n <command> ...`` (never
    prompting). :meth:`write` returns once xl has set the target; dom0
    balloons to it afterwards.
    """

    name = "xl"
    unit = "MB"

    def __init__(self, command: str = DEFAULT_COMMAND, sudo: bool = False):
        if not isinstance(command, str) or not command:
            raise BackendError(f"xl: {command!r} is not a command; set [memory] xl_command (e.g. {DEFAULT_COMMAND})")
        self.command = command
        self.sudo = bool(sudo)

    def params(self) -> dict:
        """The xl command and whether it runs through sudo."""
        return {"command": self.command, "sudo": self.sudo}

    def _run(self, *args: str) -> str:
        """xl's stdout for ``args``; BackendError when it cannot run, hangs or fails."""
        argv = ([SUDO, "-n"] if self.sudo else []) + [self.command, *args]
        shown = " ".join(argv)
        try:
            # A fixed environment: root's xl (or sudo) never sees what its caller's environment chose.
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
                env={"PATH": DEFAULT_PATH, "LC_ALL": "C"},
            )
        except FileNotFoundError:
            missing = "sudo" if self.sudo else self.command
            raise BackendError(f"xl: {missing} not found; install Xen's xl toolstack or fix [memory] xl_command") from None
        except PermissionError:
            raise BackendError(f"xl: cannot run {argv[0]}: permission denied; check [memory] xl_command") from None
        except OSError as exc:
            raise BackendError(f"xl: cannot run `{shown}`: {exc.strerror or exc}") from None
        except subprocess.TimeoutExpired:
            raise BackendError(f"xl: `{shown}` did not finish within {TIMEOUT_S} s; is the Xen toolstack responsive?") from None
        if done.returncode != 0:
            why = _last_line(done.stderr)
            hint = ""
            if self.sudo and why.startswith("sudo:"):
                hint = "; install the sudoers line that `workspace-pilot evaluate` prints"
            raise BackendError(f"xl: `{shown}` failed (exit {done.returncode}): {why}{hint}")
        return done.stdout

    def read(self) -> int:
        """Domain-0's memory in MB, from the Mem column of ``xl list 0``."""
        out = self._run("list", "0")
        lines = [line.split() for line in out.splitlines() if line.strip()]
        if lines and lines[0][:3] == ["Name", "ID", "Mem"]:
            for fields in lines[1:]:
                # Counted from the right (Name, ID, Mem, VCPUs, State, Time(s)): a name may hold spaces.
                if len(fields) >= 6 and fields[-5] == "0" and fields[-4].isdigit():
                    return int(fields[-4])
        first = " ".join(out.split())[:80] or "nothing"
        raise BackendError(f"xl: no Domain-0 line with its Mem in the output of `{self.command} list 0` (got: {first})")

    def write(self, level: int) -> None:
        """``xl mem-set 0 <level>m``; BackendError when xl refuses (Domain-0 then keeps its memory)."""
        if not isinstance(level, int) or isinstance(level, bool) or level <= 0:
            raise BackendError(f"xl: {level!r} is not a memory size in MB; nothing changed")
        self._run("mem-set", "0", f"{level}m")

    def units_for(self, memory_mb: int) -> int:
        """``memory_mb`` (the unit is MB)."""
        return memory_mb

    def mb_of(self, units: int) -> int:
        """``units`` (the unit is MB)."""
        return units

    def level_after_take(self, level: int, units: int) -> int:
        """Taking memory shrinks Domain-0."""
        return level - units

    def level_after_give(self, level: int, units: int) -> int:
        """Giving back grows Domain-0."""
        return level + units

    def host_mb(self, level: int) -> int:
        """Domain-0's memory in MB."""
        return level

    def boot_level(self, boot_mb: int | str) -> int:
        """Domain-0's boot memory (``dom0_mem``) in MB."""
        if isinstance(boot_mb, int) and not isinstance(boot_mb, bool) and boot_mb > 0:
            return boot_mb
        raise BackendError(f"xl: boot_mb must be Domain-0's boot memory (dom0_mem) in MB, not {boot_mb!r}")

    def reached(self, level: int, target: int) -> bool:
        """Within :data:`TOLERANCE_MB` of ``target``."""
        return abs(level - target) <= TOLERANCE_MB

