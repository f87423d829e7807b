"""Whom the hypervisor runs guests as, and what of the node's files that user is let near.

libvirt says it in its capabilities: the DAC security model's base label
per domain type, ``+uid:+gid`` (``qemu.conf``'s ``user`` and ``group``).
Where that is not root, QEMU opens each VM's files as that user, and a
guest that escapes QEMU is that user. It is let near exactly this:

- **through** (search, not list) the directories on the way to a VM's
  files: the journal directory, its ``seeds/`` and ``vm-files/``, the image
  cache (``root:<gid> 0710``);
- **read** the images a VM boots from or backs its disk with, in the cache
  (``root:<gid> 0440``); never write them. The domain XML marks those
  disks ``relabel='no'``, so libvirt does not hand them to the user either;
- **own** the VM's own files (its overlay, its seed, its copies of the
  kernel and initrd: libvirt hands boot files to the user while the guest
  runs, so the guest gets copies, never the cached originals).

Site image directories (``[vms] image_dir``) are the site's: their images
must be readable by the group (``workspace-pilot evaluate`` says so).
Where guests run as root nothing here changes a mode; where libvirt has no
DAC model (Xen, the test driver) there is no such user.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import stat
import xml.etree.ElementTree as ET


@dataclasses.dataclass(frozen=True)
class GuestUser:
    """The ``uid`` and ``gid`` QEMU runs a node's guests as."""

    uid: int
    gid: int

    @property
    def root(self) -> bool:
        """Whether guests run as root (then nothing needs opening to them)."""
        return self.uid == 0


def dac_labels(capabilities: str) -> list[tuple[str, str]]:
    """(domain type, ``+uid:+gid``) of libvirt's DAC model, from its capabilities XML; [] when it has none.

    Raises ``xml.etree.ElementTree.ParseError`` for text that is not XML.
    """
    labels = []
    for model in ET.fromstring(capabilities).findall("host/secmodel"):
        if model.findtext("model") == "dac":
            labels += [(label.get("type", ""), (label.text or "").strip()) for label in model.findall("baselabel")]
    return labels


def guest_user(capabilities: str, virt_type: str) -> GuestUser | None:
    """Whom libvirt runs ``virt_type`` guests as; None where it has no DAC model (or says nothing readable)."""
    try:
        labels = dac_labels(capabilities)
    except ET.ParseError:
        return None
    chosen = [label for kind, label in labels if kind == virt_type] or [label for _, label in labels]
    if not chosen:
        return None
    try:
        uid, gid = (int(part.lstrip("+")) for part in chosen[0].split(":", 1))
    except ValueError:
        return None
    return GuestUser(uid, gid)


def reach_problem(path: str, user: GuestUser | None, *, write: bool = False) -> str | None:
    """Why ``user`` cannot open ``path`` (a directory on the way it may not search, the file it may not read or
    write), as words for the site; None when it can, or when guests run as root or have no user."""
    if user is None or user.root:
        return None
    groups = _groups(user)
    problem = _search_problem(os.path.dirname(path), user, groups)
    if problem is not None:
        return problem
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    want = 0o6 if write else 0o4
    if not _allowed(info, user.uid, groups, want):
        verb = "write" if write else "read"
        return f"{path} is {_describe(info)}: the guests' user (uid {user.uid}) cannot {verb} it"
    return None


def search_problem(directory: str, user: GuestUser | None) -> str | None:
    """Why ``user`` cannot search its way into ``directory`` (itself included); None when it can or is root."""
    if user is None or user.root:
        return None
    return _search_problem(directory, user, _groups(user))


def _search_problem(directory: str, user: GuestUser, groups: set[int]) -> str | None:
    parts = os.path.abspath(directory).split(os.sep)
    for depth in range(1, len(parts) + 1):
        step = os.sep.join(parts[:depth]) or os.sep
        try:
            info = os.stat(step)
        except OSError as exc:
            return f"{step}: {exc.strerror}"
        if not _allowed(info, user.uid, groups, 0o1):
            return f"{step} is {_describe(info)}: the guests' user (uid {user.uid}) cannot search it"
    return None


def _groups(user: GuestUser) -> set[int]:
    try:
        return set(os.getgrouplist(pwd.getpwuid(user.uid).pw_name, user.gid))
    except KeyError:  # a uid with no name: its label's group only
        return {user.gid}


def _allowed(info: os.stat_result, uid: int, groups: set[int], bits: int) -> bool:
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid == uid:
        return (mode >> 6) & bits == bits
    if info.st_gid in groups:
        return (mode >> 3) & bits == bits
    return mode & bits == bits


def _describe(info: os.stat_result) -> str:
    owner, group = info.st_uid, info.st_gid
    try:
        owner = pwd.getpwuid(owner).pw_name
    except KeyError:
        pass
    try:
        group = grp.getgrgid(group).gr_name
    except KeyError:
        pass
    return f"{owner}:{group} {stat.S_IMODE(info.st_mode):04o}"


def let_through(directory: str, user: GuestUser | None) -> None:
    """Let ``user``'s group search (not list) root's ``directory``: ``root:<gid> 0710``; nothing for root."""
    if user is None or user.root:
        return
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0:
        raise OSError(f"{directory} is not a directory of root's")
    if info.st_gid != user.gid:
        os.chown(directory, 0, user.gid, follow_symlinks=False)
    if stat.S_IMODE(info.st_mode) & 0o077 != 0o010:
        os.chmod(directory, (stat.S_IMODE(info.st_mode) & 0o700) | 0o010)


def let_read(path: str, user: GuestUser | None) -> None:
    """Let ``user``'s group read root's file ``path`` and nobody write it: ``root:<gid> 0440``; nothing for root."""
    if user is None or user.root:
        return
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != 0:
            raise OSError(f"{path} is not a file of root's")
        if info.st_gid != user.gid:
            os.fchown(fd, 0, user.gid)
        if stat.S_IMODE(info.st_mode) != 0o440:
            os.fchmod(fd, 0o440)
    finally:
        os.close(fd)


def give(path: str, user: GuestUser | None, *, writable: bool) -> None:
    """Hand a VM's own file to ``user`` (``uid:gid``, 0600 when ``writable`` else 0400); nothing for root."""
    if user is None or user.root:
        return
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        os.fchmod(fd, 0o600 if writable else 0o400)
        os.fchown(fd, user.uid, user.gid)
    finally:
        os.close(fd)
