"""A real libvirtd (QEMU driver, TCG guests) for tests, and the tiny test guest it boots.

``LibvirtDaemon`` runs virtlogd and libvirtd as children of the caller, in
the foreground, with their pid files and logs under one work directory, and
stops them by the pids it started, never by name. libvirtd is one per
machine (``qemu:///system``): when one already answers, it is used and left
running. Test sessions side by side share a daemon through two flock files
(see ``LibvirtDaemon``), so one session never stops it under another.

The guest (``scripts/build-test-guest.sh``, in ``.cache/test-guest``) is a
Debian cloud kernel plus a busybox initramfs whose /init loads the virtio
balloon modules, prints ``GUEST_UP`` to ttyS0, then ``GUEST_ALIVE`` plus a
counter every 2 s. ``guest_xml`` renders a minimal domain for it: for the
tests of this infrastructure only; the product renders its own domains.

``scripts/bootstrap.sh --vm`` installs all of it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from tests.daemons import stop_in_order

URI = "qemu:///system"
GUEST_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "test-guest")
GUEST_UP = "workspace-pilot test guest up"
GUEST_ALIVE = "workspace-pilot test guest alive"
LEAK_PREFIXES = ("wp-", "wptest-")  # domains tests create; any left at stop() is a leak
HUGETLBFS = "/dev/hugepages"  # qemu.conf's hugetlbfs_mount: libvirtd's QEMU driver fails to load without it
VIRTLOGD_SOCKET = "/run/libvirt/virtlogd-sock"
START_LOCK = "/tmp/workspace-pilot-tests.libvirtd-start.lock"
USERS_LOCK = "/tmp/workspace-pilot-tests.libvirtd-users.lock"


class LibvirtDaemonError(RuntimeError):
    """libvirtd could not be started; the message holds its log's tail."""


def missing_commands() -> list[str]:
    """The programs ``LibvirtDaemon`` and the guest need that are not installed."""
    return [name for name in ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64") if shutil.which(name) is None]


def _answers(uri: str = URI) -> bool:
    """True if a libvirtd answers ``virsh -c uri version`` right now."""
    try:
        result = subprocess.run(["virsh", "-c", uri, "version"], capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


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


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError as error:
        return f"(no log: {error})"


class LibvirtDaemon:
    """libvirtd and virtlogd for a test session, under ``workdir``.

    ``start()`` returns once ``virsh -c qemu:///system version`` answers;
    ``owned`` then says whether we started the daemon (False: one was
    already running; it is used and never stopped). ``connect()`` opens a
    libvirt connection. ``stop()`` may be called twice; for an owned daemon
    it destroys leaked ``wp-``/``wptest-`` domains (with a warning), stops
    libvirtd then virtlogd by pid (SIGTERM, SIGKILL after 15 s) and
    unmounts the hugetlbfs it mounted.

    Sharing: every session holds a shared flock on ``USERS_LOCK`` while it
    uses the daemon; the owner's ``stop()`` waits for the exclusive lock,
    that is until the sessions that reused its daemon are done. Deciding to
    start or stop happens under ``START_LOCK``, so two sessions never start
    two daemons.
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
        self._users_lock = None

    # -- start ---------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> "LibvirtDaemon":
        """Use the running libvirtd, or start virtlogd and libvirtd; return once libvirtd answers."""
        missing = missing_commands()
        if missing:
            raise LibvirtDaemonError(f"not installed: {', '.join(missing)} (run scripts/bootstrap.sh --vm)")
        with open(START_LOCK, "a") as start_lock:
            fcntl.flock(start_lock, fcntl.LOCK_EX)
            self._users_lock = open(USERS_LOCK, "a")
            fcntl.flock(self._users_lock, fcntl.LOCK_SH)
            if _answers(self.uri):
                return self
            self.owned = True
            try:
                self._start_daemons(timeout)
            except BaseException:
                self._stop_owned()
                raise
        return self

    def _start_daemons(self, timeout: float) -> None:
        if not _mounted(HUGETLBFS):
            if not os.path.isdir(HUGETLBFS):
                os.makedirs(HUGETLBFS)
                self._made_hugetlbfs_dir = True
            result = subprocess.run(["mount", "-t", "hugetlbfs", "none", HUGETLBFS], capture_output=True, text=True)
            if result.returncode != 0:
                raise LibvirtDaemonError(f"mounting hugetlbfs at {HUGETLBFS} failed: {result.stderr.strip()}")
            self._mounted_hugetlbfs = True
        if not _listening(VIRTLOGD_SOCKET):  # else a virtlogd is running: libvirtd will use it
            self._spawn("virtlogd", ["virtlogd", "--pid-file", os.path.join(self.workdir, "virtlogd.pid")],
                        self.virtlogd_log)
        self._spawn("libvirtd", ["libvirtd", "--pid-file", os.path.join(self.workdir, "libvirtd.pid")],
                    self.libvirtd_log)
        deadline = time.monotonic() + timeout
        delay = 0.05
        while not _answers(self.uri):
            for name, process in self.processes.items():
                if process.poll() is not None:
                    log = self.libvirtd_log if name == "libvirtd" else self.virtlogd_log
                    raise LibvirtDaemonError(
                        f"{name} exited with {process.returncode}; the end of {log}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise LibvirtDaemonError(
                    f"libvirtd not answering after {timeout:g} s; the end of {self.libvirtd_log}:\n"
                    f"{_tail(self.libvirtd_log)}")
            time.sleep(delay)  # libvirtd has no readiness signal but its socket answering
            delay = min(delay * 2, 0.5)

    def _spawn(self, name: str, argv: list[str], log_path: str) -> None:
        with open(log_path, "ab") as log:
            self.processes[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    # -- use -----------------------------------------------------------------------------

    def connect(self):
        """A new read-write ``libvirt.virConnect`` to this daemon (the caller closes it)."""
        import libvirt

        return libvirt.open(self.uri)

    # -- stop ----------------------------------------------------------------------------

    def stop(self, timeout: float = 15.0) -> None:
        """Leave the daemon (reused) or stop it once no other session uses it (owned)."""
        if self._users_lock is None:
            return
        if not self.owned:
            self._release()
            return
        with open(START_LOCK, "a") as start_lock:
            fcntl.flock(start_lock, fcntl.LOCK_EX)
            try:
                fcntl.flock(self._users_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print("libvirt_daemon: waiting for other test sessions that use this libvirtd", file=sys.stderr)
                fcntl.flock(self._users_lock, fcntl.LOCK_EX)
            self._stop_owned(timeout)

    def _stop_owned(self, timeout: float = 15.0) -> None:
        try:
            if self.processes.get("libvirtd") and self.processes["libvirtd"].poll() is None:
                self._destroy_leaked()
        finally:
            self._stop_processes(timeout)

    def _stop_processes(self, timeout: float) -> None:
        # libvirtd first: it talks to virtlogd while it shuts down.
        stop_in_order(self.processes, ["libvirtd", "virtlogd"], timeout)
        if self._mounted_hugetlbfs:
            subprocess.run(["umount", HUGETLBFS], check=False, capture_output=True)
            self._mounted_hugetlbfs = False
        if self._made_hugetlbfs_dir:
            try:
                os.rmdir(HUGETLBFS)
            except OSError:
                pass
            self._made_hugetlbfs_dir = False
        self._release()

    def _destroy_leaked(self) -> None:
        try:
            import libvirt

            conn = libvirt.open(self.uri)
        except Exception as error:  # noqa: BLE001 - stopping goes on without the clean-up
            print(f"libvirt_daemon: cannot look for leaked domains: {error}", file=sys.stderr)
            return
        try:
            for dom in conn.listAllDomains():
                name = dom.name()
                if not name.startswith(LEAK_PREFIXES):
                    continue
                message = f"a test leaked the domain {name!r}; destroying it"
                print(f"libvirt_daemon: {message}", file=sys.stderr)
                warnings.warn(message, stacklevel=1)
                try:
                    persistent = dom.isPersistent()  # asked first: a destroyed transient domain is gone
                    if dom.isActive():
                        dom.destroy()
                    if persistent:
                        dom.undefine()
                except libvirt.libvirtError as error:
                    print(f"libvirt_daemon: cleaning up {name!r} failed: {error}", file=sys.stderr)
        finally:
            conn.close()

    def _release(self) -> None:
        if self._users_lock is not None:
            self._users_lock.close()  # drops its flock
            self._users_lock = None


# -- the test guest ----------------------------------------------------------------------


@dataclass(frozen=True)
class GuestFiles:
    """The test guest's kernel and initramfs: absolute paths and sha256 hex digests."""

    kernel: str
    initrd: str
    kernel_sha256: str
    initrd_sha256: str


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def guest_files(directory: str = GUEST_DIR) -> GuestFiles:
    """``.cache/test-guest``'s vmlinuz and initrd.img, hashed now; FileNotFoundError if not built."""
    kernel = os.path.join(directory, "vmlinuz")
    initrd = os.path.join(directory, "initrd.img")
    for path in (kernel, initrd):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: run scripts/build-test-guest.sh")
    return GuestFiles(kernel, initrd, _sha256(kernel), _sha256(initrd))


#: Debian's QEMU ships the C virtiofsd here (qemu-system-common).
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


def guest_xml(name: str, console_path: str, memory_mb: int = 128, hugepages: bool = False,
              shares: dict[str, str] | None = None) -> str:
    """A transient TCG domain that boots the test guest with ``memory_mb`` MiB, its ttyS0 written to ``console_path``.

    Direct kernel boot, one vCPU, a virtio balloon, no disk and no network;
    a reboot or a guest panic ends the domain. ``hugepages`` backs its
    memory with the hugepage pool (which must have the pages free).
    ``shares`` maps virtiofs tags to host directories (``control`` and
    ``workdir`` make the guest run a job: scripts/build-test-guest.sh); the
    guest's memory is then shared with virtiofsd (memfd, or the hugepages).
    """
    files = guest_files()
    console = quoteattr(console_path)
    shared = "<access mode='shared'/>" if shares else ""
    if hugepages:
        backing = f"  <memoryBacking><hugepages/>{shared}</memoryBacking>\n"
    elif shares:
        backing = f"  <memoryBacking><source type='memfd'/>{shared}</memoryBacking>\n"
    else:
        backing = ""
    filesystems = "".join(
        "    <filesystem type='mount' accessmode='passthrough'><driver type='virtiofs'/>"
        f"<binary path={quoteattr(VIRTIOFSD)}/><source dir={quoteattr(directory)}/><target dir={quoteattr(tag)}/>"
        "</filesystem>\n"
        for tag, directory in (shares or {}).items()
    )
    return (
        "<domain type='qemu'>\n"
        f"  <name>{escape(name)}</name>\n"
        f"  <memory unit='MiB'>{int(memory_mb)}</memory>\n"
        f"  <currentMemory unit='MiB'>{int(memory_mb)}</currentMemory>\n"
        f"{backing}"
        "  <vcpu>1</vcpu>\n"
        "  <os>\n"
        "    <type arch='x86_64'>hvm</type>\n"
        f"    <kernel>{escape(files.kernel)}</kernel>\n"
        f"    <initrd>{escape(files.initrd)}</initrd>\n"
        "    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>\n"
        "  </os>\n"
        "  <on_poweroff>destroy</on_poweroff>\n"
        "  <on_reboot>destroy</on_reboot>\n"
        "  <on_crash>destroy</on_crash>\n"
        "  <devices>\n"
        f"{filesystems}"
        f"    <serial type='file'><source path={console}/><target port='0'/></serial>\n"
        f"    <console type='file'><source path={console}/><target type='serial' port='0'/></console>\n"
        "    <memballoon model='virtio'/>\n"
        "  </devices>\n"
        "</domain>\n"
    )


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
