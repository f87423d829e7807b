"""The virtiofs daemons of a VM job's shares: started by root, running as the job's user.

libvirt would start virtiofsd as root, and virtiofsd creates files with the
uid the guest asks for: a guest (whose root the user may well have) could
then leave a root-owned setuid program in the job's directory. So the
daemon runs as the job's user, in a user namespace that maps that user to
root (``unshare --user --map-root-user``; virtiofsd's own sandbox needs
namespace root): whatever the guest asks, the host kernel checks the
user's rights, and files the guest's root writes belong to the user. The
guest's root is then the only guest uid with access to the shares
(docs/vmjobs.md). It runs without supplementary groups: virtiofsd drops
them at start, which a user namespace does not allow, so access through a
secondary group of the user's is not shared.

The listening socket is bound by root in a root-only directory and handed
to the daemon as a descriptor (``--fd``), so QEMU (root) connects to a path
the user cannot swap. Each daemon gets a parent-death signal: a wrapper
killed outright takes its daemons with it; a daemon also ends by itself when
its VM goes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess

from pilot.nodelog import open_log

UNSHARE = "/usr/bin/unshare"
_PR_SET_PDEATHSIG = 1
#: The most of a daemon's own messages kept in its log: it runs as the user, who could make it write
#: without end, and the log is root's, on the node's disk.
LOG_LIMIT = 64 * 1024


class ShareError(Exception):
    """A share's daemon could not be started; one line."""


def _die_with_parent() -> None:
    # Runs in the child after the uid change (which would clear it) and before exec.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class ShareDaemon:
    """One virtiofs daemon: the directory ``source`` shared as ``tag`` through the socket ``socket_path``."""

    def __init__(self, tag: str, source: str, socket_path: str, *, virtiofsd: str, uid: int, gid: int,
                 log_path: str):
        self.tag = tag
        self.source = source
        self.socket_path = socket_path
        self.virtiofsd = virtiofsd
        self.uid, self.gid = uid, gid
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._messages: int | None = None  # the read end of the daemon's stdout and stderr
        self._logged = 0

    def start(self) -> None:
        """Bind the socket and start the daemon (it then waits for QEMU); raises ShareError."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
            listener.bind(self.socket_path)
            listener.listen(1)
            argv = [UNSHARE, "--user", "--map-root-user", self.virtiofsd, f"--fd={listener.fileno()}",
                    "-o", f"source={self.source}", "-o", "cache=none", "-o", "sandbox=namespace"]
            # Its messages come through a pipe that drain() copies, bounded, into the root-owned log.
            self._messages, writer = os.pipe()
            os.set_blocking(self._messages, False)
            try:
                self.process = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=writer, stderr=writer, pass_fds=[listener.fileno()],
                    user=self.uid, group=self.gid, extra_groups=[], env={"PATH": "/usr/bin:/bin"},
                    preexec_fn=_die_with_parent, cwd="/",
                )
            finally:
                os.close(writer)
        except OSError as exc:
            raise ShareError(f"share {self.tag}: cannot start {self.virtiofsd}: {exc.strerror or exc}") from None
        except subprocess.SubprocessError as exc:
            raise ShareError(f"share {self.tag}: cannot start {self.virtiofsd}: {exc}") from None
        finally:
            listener.close()  # the daemon has its own copy

    def drain(self) -> None:
        """Copy what the daemon wrote since the last call into its log, up to :data:`LOG_LIMIT` in all."""
        while self._messages is not None:
            try:
                chunk = os.read(self._messages, 65536)
            except BlockingIOError:
                return
            if not chunk:
                os.close(self._messages)
                self._messages = None
                return
            keep = chunk[:max(LOG_LIMIT - self._logged, 0)]
            if keep:
                with os.fdopen(open_log(self.log_path), "ab") as log:
                    log.write(keep)
                self._logged += len(keep)

    def failed(self) -> str | None:
        """Why the daemon is no longer there (exit status), or None while it runs."""
        if self.process is None or self.process.poll() is None:
            return None
        return f"share {self.tag}: its virtiofsd exited with {self.process.returncode} (see {self.log_path})"

    def stop(self, timeout: float = 2.0) -> None:
        """End the daemon (it ends by itself once QEMU has gone); SIGKILL after ``timeout`` s."""
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.drain()
        if self._messages is not None:  # a child of the daemon may still hold the pipe: stop reading
            os.close(self._messages)
            self._messages = None
