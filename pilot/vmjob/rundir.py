"""A VM job's run directory: the control files the guest and the host exchange, and the shares' sockets.

Layout, below ``[vmjob] run_dir`` (root's, 0711: the job's user may pass
through to its own control directory, but not list the others)::

    <slot>.lock        root 0600: held (flock) by the one run of the slot
    <slot>/            root 0711, a tmpfs of its own of ``[vmjob] run_size`` MB
        sock/          root 0700: the virtiofs sockets, bound by root, so
                       QEMU connects to nothing the user could swap
        console.log    root: the guest's serial console (virtlogd rotates it)
        control/       the job's user, 0700: shared with the guest as "control"

Each slot's directory is a tmpfs of a fixed size (nosuid, nodev): what the
job or its guest writes there (its stdout and stderr, its console) fills
that and nothing else, never the ``/run`` that sudo, libvirt and systemd
need. Removing the directory unmounts it (lazily, should a daemon still
hold a file).

The guest contract (docs/vmjobs.md): the guest mounts the virtiofs tags
``control`` and ``workdir``, writes ``control/started``, executes
``/control/command`` (a file starting with ``#!``) in the workdir with its stdout and stderr going to
``control/stdout`` and ``control/stderr``, writes its exit status to
``control/status`` (under another name, then renamed), and powers off or
reboots. Everything in ``control/`` but ``command`` is the guest's word,
read by root here only through :func:`open_guest_file`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import stat

from pilot.vm.cleanup import VmCleanupError
from pilot.vm.guestuser import let_through

SHARE_TAGS = ("control", "workdir")
#: The most of a status file that is read: "255\n" and a little slack.
MAX_STATUS_BYTES = 16


def job_domain_name(slot: str) -> str:
    """The libvirt domain name of the VM of the VM job whose slot is ``slot``."""
    return f"wp-{slot}"


class RunDirError(Exception):
    """The run directory cannot be made or used; one line."""


class SlotBusy(RunDirError):
    """Another run of the same slot (the same job on this node) holds it."""


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The paths of one slot's run directory (see the module's layout)."""

    base: str
    slot: str
    size_mb: int | None = None  # the slot's own tmpfs; None: a plain directory (tests without root)

    @property
    def path(self) -> str:
        """The slot's directory."""
        return os.path.join(self.base, self.slot)

    @property
    def console(self) -> str:
        """The guest's console log (in the slot's tmpfs: capped with it, removed with it)."""
        return os.path.join(self.path, "console.log")

    @property
    def control(self) -> str:
        """The control directory (shared with the guest as ``control``)."""
        return os.path.join(self.path, "control")

    def socket(self, tag: str) -> str:
        """The virtiofs socket of share ``tag``."""
        return os.path.join(self.path, "sock", f"{tag}.sock")

    def open_sockets_to(self, user, tags) -> None:
        """Let the guest user (:class:`pilot.vm.guestuser.GuestUser`; None or root: nothing changes) connect to the
        shares' sockets of ``tags``: ``sock/`` searchable by its group, each socket ``root:<gid> 0660``."""
        if user is None or user.root:
            return
        let_through(os.path.join(self.path, "sock"), user)
        for tag in tags:
            path = self.socket(tag)
            os.chown(path, 0, user.gid, follow_symlinks=False)
            os.chmod(path, 0o660)

    def lock(self) -> int:
        """Hold the slot's lock for as long as the returned descriptor stays open; :class:`SlotBusy` if held."""
        _base_dir(self.base)
        fd = os.open(os.path.join(self.base, f"{self.slot}.lock"),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SlotBusy(f"slot {self.slot} already runs a VM on this node (one VM per job and node)") from None
        return fd

    def unlock(self, fd: int, *, remove: bool) -> None:
        """Let go of the slot's lock; ``remove`` its file too (only for a slot no other run can share: a
        second run that opened the file before the unlink would hold a lock no third run sees)."""
        if remove:
            try:
                os.unlink(os.path.join(self.base, f"{self.slot}.lock"))
            except FileNotFoundError:
                pass
        os.close(fd)

    def make(self, command: bytes, uid: int, gid: int) -> None:
        """Make the directories, write ``command``, then hand ``control/`` to the job's user (``uid``, ``gid``).

        The command is written while the directory is still root's, so
        nothing the user does can redirect the write. Raises RunDirError.
        """
        _base_dir(self.base)
        try:
            remove_run_dir(self.path)  # a dead run's leftovers (its journal entry is undone before this)
            os.mkdir(self.path, 0o711)
            if self.size_mb:
                _mount_tmpfs(self.path, self.size_mb)
            os.chmod(self.path, 0o711)  # whatever the umask
            os.mkdir(os.path.join(self.path, "sock"), 0o700)
            os.mkdir(self.control, 0o700)
            fd = os.open(os.path.join(self.control, "command"),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o700)
            with os.fdopen(fd, "wb") as handle:
                handle.write(command)
                os.fchmod(handle.fileno(), 0o700)  # executable for the guest, whatever the umask
            os.chown(os.path.join(self.control, "command"), uid, gid)
            os.chown(self.control, uid, gid)
        except (OSError, VmCleanupError) as exc:
            raise RunDirError(f"run directory {self.path}: {getattr(exc, 'strerror', None) or exc}") from None


def _base_dir(base: str) -> None:
    try:
        os.makedirs(base, mode=0o711, exist_ok=True)
        info = os.lstat(base)
    except OSError as exc:
        raise RunDirError(f"run directory {base}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise RunDirError(f"run directory {base} must be a directory of uid {os.geteuid()}, "
                          "not writable by group or others")


def open_guest_file(path: str, uid: int, *, writable: bool = False) -> int | None:
    """A descriptor of the guest-written file ``path`` (read-only, or read-write for ``writable``), or None
    while it does not exist.

    Refused (RunDirError) unless it is a regular file that ``uid`` owns: the
    user (or the guest, through virtiofsd running as the user) could have
    put a symlink, a FIFO or a hard link to someone else's file there, and
    root would copy what it reads into the job's output. (In a slot's tmpfs
    a hard link can only be to a file of that tmpfs.)
    """
    mode = os.O_RDWR if writable else os.O_RDONLY
    try:
        fd = os.open(path, mode | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RunDirError(f"{path}: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != uid:
        os.close(fd)
        raise RunDirError(f"{path} is not a regular file of uid {uid}; ignored")
    return fd


def read_status(path: str, uid: int) -> int | None:
    """The guest's exit status from ``control/status`` (0-255), None while there is none; RunDirError if it is
    not a whole number from 0 to 255."""
    fd = open_guest_file(path, uid)
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as handle:
        raw = handle.read(MAX_STATUS_BYTES)
    text = raw.decode("ascii", "replace").strip()
    if not text.isdigit() or not 0 <= int(text) <= 255:
        raise RunDirError(f"{path}: {text[:12]!r} is not an exit status from 0 to 255")
    return int(text)


def remove_run_dir(path: str) -> None:
    """Remove a run directory and everything in it (gone already is fine); VmCleanupError if it cannot.

    ``shutil.rmtree`` works through directory descriptors, so a symlink the
    user planted in ``control/`` is removed, never followed. A slot's tmpfs
    is detached first (its contents go with it).
    """
    if os.path.ismount(path):
        _unmount(path)
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise VmCleanupError(f"cannot remove the VM job's run directory {path}: {exc.strerror}") from None


# mount(2) and umount2(2) flags (linux/mount.h)
_MS_NOSUID, _MS_NODEV, _MNT_DETACH = 2, 4, 2
# fallocate(2) modes (linux/falloc.h)
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes

        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    return _LIBC


def _mount_tmpfs(path: str, size_mb: int) -> None:
    """Mount a tmpfs of ``size_mb`` MB (root's, 0711, nosuid, nodev) on the directory ``path``; OSError if not."""
    import ctypes

    options = f"size={size_mb}m,mode=0711,uid=0,gid=0".encode()
    if _libc().mount(b"workspace-vmjob", os.fsencode(path), b"tmpfs", _MS_NOSUID | _MS_NODEV, options) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"cannot mount its tmpfs: {os.strerror(errno)}")


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the storage of ``length`` bytes at ``offset`` of the file ``fd`` (its size stays): False where the
    filesystem cannot (then the bytes stay)."""
    return _libc().fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, offset, length) == 0


def _unmount(path: str) -> None:
    """Detach the mount on ``path`` (its files go once nothing holds them); VmCleanupError if it cannot."""
    import ctypes

    if _libc().umount2(os.fsencode(path), _MNT_DETACH) != 0:
        errno = ctypes.get_errno()
        raise VmCleanupError(f"cannot unmount the VM job's run directory {path}: {os.strerror(errno)}")
