"""The embedded site's hypervisor: the libvirtd (QEMU driver) answering ``qemu:///system``, started if none does.

A real node runs libvirtd as a system service. The demo (and the tests)
run on machines where it may be installed but not running (no systemd in a
container): :class:`LocalLibvirtd` then starts virtlogd and libvirtd as its
own children, with their pid files and logs in a directory of the caller,
waits until libvirtd answers, and stops them by the pids it started (never
by name). A libvirtd that already answers is used and left alone.

They run under a subreaper (Debian's ``tini -s``) where one is installed:
QEMU daemonizes, so a guest's process is orphaned to the nearest subreaper,
else to PID 1, and libvirtd waits for a process it stopped to be gone. Where
PID 1 reaps late (a container's init here), every destroyed guest cost about
1.5 s and every libvirtd start 7 s (its QEMU capability probes); under tini
0.2 s and 0.1 s. Without tini the daemons run as before, only slower to stop.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

from service_adapter.children import stop_in_order

URI = "qemu:///system"
#: What a QEMU guest through libvirt needs on this machine.
COMMANDS = ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64")
#: How to get them: this project's bootstrap, or Debian's packages by name.
INSTALL_HINT = ("./scripts/bootstrap.sh --vm, or the Debian packages libvirt-daemon libvirt-daemon-driver-qemu "
                "libvirt-clients qemu-system-x86 qemu-utils (and tini)")
#: The subreaper the daemons run under when it is installed (see the module's docstring).
REAPER = "tini"
#: qemu.conf's hugetlbfs_mount: libvirtd's QEMU driver does not load without it.
HUGETLBFS = "/dev/hugepages"
VIRTLOGD_SOCKET = "/run/libvirt/virtlogd-sock"
#: Only where the commands are installed, never where the caller's PATH says: root runs them.
SYSTEM_DIRS = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class HypervisorError(RuntimeError):
    """libvirtd could not be started or did not answer; the message holds its log's tail."""


def missing_commands() -> list[str]:
    """The programs a libvirt QEMU guest needs that are not installed in the system's directories."""
    return [name for name in COMMANDS if shutil.which(name, path=SYSTEM_DIRS) is None]


def answers(uri: str = URI) -> bool:
    """True if a libvirtd answers ``virsh -c uri version`` right now."""
    try:
        result = subprocess.run([system_command("virsh"), "-c", uri, "version"], capture_output=True, timeout=10,
                                env=system_env())
    except (subprocess.TimeoutExpired, OSError):
        return False
    return result.returncode == 0


def system_command(name: str) -> str:
    """``name`` found in the system's directories (never where the caller's PATH points); the bare name if absent."""
    return shutil.which(name, path=SYSTEM_DIRS) or name


def reaper_argv() -> list[str]:
    """What to start a daemon under so that the processes it orphans are reaped at once: ``[tini, -s, --]``, or
    nothing where tini is not installed in the system's directories."""
    path = shutil.which(REAPER, path=SYSTEM_DIRS)
    return [path, "-s", "--"] if path else []


def system_env() -> dict[str, str]:
    """The environment root's commands here run with: built, not inherited (no caller's LD_PRELOAD, no PATH)."""
    return {"PATH": SYSTEM_DIRS, "LANG": "C.UTF-8"}


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
        return True


def _mounted(mountpoint: str) -> bool:
    with open("/proc/self/mounts", encoding="utf-8") as handle:
        return any(line.split()[1] == mountpoint for line in handle)


def tail(path: str, lines: int = 30) -> str:
    """The last ``lines`` lines of a log, or why there are none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError as error:
        return f"(no log: {error})"


class LocalLibvirtd:
    """libvirtd for ``qemu:///system``: the running one, or virtlogd and libvirtd started under ``workdir``.

    ``start()`` returns once libvirtd answers; ``owned`` then says whether
    this object started it. ``stop()`` (safe to call twice) stops an owned
    libvirtd, then virtlogd, by pid (SIGTERM, SIGKILL after ``timeout``) and
    unmounts the hugetlbfs it mounted; a daemon it did not start is left running.
    """

    uri = URI

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.libvirtd_log = os.path.join(self.workdir, "libvirtd.log")
        self.virtlogd_log = os.path.join(self.workdir, "virtlogd.log")
        self.owned = False
        self.processes: dict[str, subprocess.Popen] = {}
        self._mounted_hugetlbfs = False
        self._made_hugetlbfs_dir = False

    def start(self, timeout: float = 60.0) -> "LocalLibvirtd":
        """Use the running libvirtd, or start one; HypervisorError when it cannot run here."""
        missing = missing_commands()
        if missing:
            raise HypervisorError(f"not installed: {', '.join(missing)} (install with {INSTALL_HINT})")
        if answers(self.uri):
            return self
        self.owned = True
        try:
            self._start_daemons(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_daemons(self, timeout: float) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        if not _mounted(HUGETLBFS):
            if not os.path.isdir(HUGETLBFS):
                os.makedirs(HUGETLBFS)
                self._made_hugetlbfs_dir = True
            result = subprocess.run([system_command("mount"), "-t", "hugetlbfs", "none", HUGETLBFS],
                                    capture_output=True, text=True, env=system_env())
            if result.returncode != 0:
                raise HypervisorError(f"mounting hugetlbfs at {HUGETLBFS} failed: {result.stderr.strip()}")
            self._mounted_hugetlbfs = True
        if not _listening(VIRTLOGD_SOCKET):  # else a virtlogd is running: libvirtd will use it
            self._spawn("virtlogd", self.virtlogd_log)
        self._spawn("libvirtd", self.libvirtd_log)
        deadline = time.monotonic() + timeout
        delay = 0.05
        while not answers(self.uri):
            for name, process in self.processes.items():
                if process.poll() is not None:
                    log = self.libvirtd_log if name == "libvirtd" else self.virtlogd_log
                    raise HypervisorError(f"{name} exited with {process.returncode}; the end of {log}:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise HypervisorError(f"libvirtd not answering after {timeout:g} s; the end of {self.libvirtd_log}:\n"
                                      f"{tail(self.libvirtd_log)}")
            time.sleep(delay)  # libvirtd has no readiness signal but its socket answering
            delay = min(delay * 2, 0.5)

    def _spawn(self, name: str, log_path: str) -> None:
        argv = [*reaper_argv(), system_command(name), "--pid-file", self._pid_file(name)]
        with open(log_path, "ab") as log:
            self.processes[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env=system_env(),
            )

    def _pid_file(self, name: str) -> str:
        return os.path.join(self.workdir, f"{name}.pid")

    def running(self, name: str) -> bool:
        """Whether the daemon ``name`` this object started still runs."""
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """Stop what this object started (libvirtd first: it talks to virtlogd while it shuts down)."""
        stop_in_order(self.processes, ["libvirtd", "virtlogd"], timeout,
                      pid_files={name: self._pid_file(name) for name in ("libvirtd", "virtlogd")})
        if self._mounted_hugetlbfs:
            subprocess.run([system_command("umount"), HUGETLBFS], check=False, capture_output=True, env=system_env())
            self._mounted_hugetlbfs = False
        if self._made_hugetlbfs_dir:
            try:
                os.rmdir(HUGETLBFS)
            except OSError:
                pass
            self._made_hugetlbfs_dir = False


def wait_for_line(path: str, text: str, timeout: float) -> bool:
    """Poll the file at ``path`` until it holds ``text``; False if ``timeout`` s pass first.

    A console file has no change notification that works for QEMU's writes
    everywhere, so this polls, backing off from 20 ms to 250 ms.
    """
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                if text in handle.read():
                    return True
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.25)
