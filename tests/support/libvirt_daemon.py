"""A real libvirtd (QEMU driver, TCG guests) for tests, and the tiny test guest it boots.

``LibvirtDaemon`` runs virtlogd and libvirtd as children of the caller
(the product's ``service_adapter.localvirt``, which the demo uses too), with
their pid files and logs under one work directory, and stops them by the pids
it started, never by name. libvirtd is one per
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
import sys
import warnings
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from service_adapter.localvirt import (  # noqa: F401 (re-exported for the tests)
    HypervisorError, LocalLibvirtd, missing_commands, wait_for_line,
)

URI = LocalLibvirtd.uri
GUEST_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), ".cache", "test-guest")
GUEST_UP = "workspace-pilot test guest up"
GUEST_ALIVE = "workspace-pilot test guest alive"
LEAK_PREFIXES = ("wp-", "wptest-")  # domains tests create; any left at stop() is a leak
START_LOCK = "/tmp/workspace-pilot-tests.libvirtd-start.lock"
USERS_LOCK = "/tmp/workspace-pilot-tests.libvirtd-users.lock"
LibvirtDaemonError = HypervisorError


class LibvirtDaemon:
    """libvirtd and virtlogd for a test session, under ``workdir`` (the product's :class:`LocalLibvirtd`, shared).

    ``start()`` returns once ``virsh -c qemu:///system version`` answers;
    ``owned`` then says whether we started the daemon (False: one was
    already running; it is used and never stopped). ``connect()`` opens a
    libvirt connection. ``stop()`` may be called twice; for an owned daemon
    it destroys leaked ``wp-``/``wptest-`` domains (with a warning), then
    stops libvirtd and virtlogd by pid.

    Sharing: every session holds a shared flock on ``USERS_LOCK`` while it
    uses the daemon; the owner's ``stop()`` waits for the exclusive lock,
    that is until the sessions that reused its daemon are done. Deciding to
    start or stop happens under ``START_LOCK``, so two sessions never start
    two daemons.
    """

    uri = URI

    def __init__(self, workdir: str):
        self.daemon = LocalLibvirtd(workdir)
        self.workdir = self.daemon.workdir
        self._users_lock = None

    @property
    def owned(self) -> bool:
        return self.daemon.owned

    def start(self, timeout: float = 60.0) -> "LibvirtDaemon":
        """Use the running libvirtd, or start virtlogd and libvirtd; return once libvirtd answers."""
        with open(START_LOCK, "a") as start_lock:
            fcntl.flock(start_lock, fcntl.LOCK_EX)
            self._users_lock = open(USERS_LOCK, "a")
            fcntl.flock(self._users_lock, fcntl.LOCK_SH)
            try:
                self.daemon.start(timeout)
            except BaseException:
                self._release()
                raise
        return self

    def connect(self):
        """A new read-write ``libvirt.virConnect`` to this daemon (the caller closes it)."""
        import libvirt

        return libvirt.open(self.uri)

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
            try:
                if self.daemon.running("libvirtd"):
                    self._destroy_leaked()
            finally:
                self.daemon.stop(timeout)
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
