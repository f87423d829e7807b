"""The VM spec a ``start-vm`` command carries: its files (site-local or named on an image list), its size,
its network and what it learns at boot (its cloud-init context).

Part of the wire protocol (:mod:`workspace_common.protocol`): standard library only.
"""

from __future__ import annotations

import dataclasses
import re

from workspace_common.protocol.network import Nic
from workspace_common.protocol.wire import (
    MAX_HOST_LEN,
    MAX_MEMORY_MB,
    MAX_VM_NAME_LEN,
    ProtocolError,
    _HOST_RE,
    _VM_NAME_RE,
    _check_int,
    _check_str,
    _no_unknown,
)

MAX_VCPUS = 256
MAX_PATH_LEN = 4096
MAX_CMDLINE_LEN = 4096
MAX_NETWORK_LEN = 64
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
#: An image list's identifiers and versions (the lists' format, docs/images.md).
MAX_IMAGE_NAME_LEN = 64
IMAGE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
IMAGE_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
#: The largest image a list may name.
MAX_IMAGE_BYTES = 2**40
_NETWORK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: Bounds of a VM's contextualization (what goes on its cloud-init seed).
MAX_SSH_KEYS = 16
MAX_SSH_KEY_LEN = 8192
MAX_USER_DATA = 32 * 1024
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
#: The most peers a node is told of for one image.
MAX_PEERS = 256
_SSH_KEY_RE = re.compile(r"^(ssh-|ecdsa-|sk-)[A-Za-z0-9@._-]+ [A-Za-z0-9+/=]+( [ -~]*)?$")


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """A file a VM uses (disk image, kernel, initrd): a site-local file, or an image named on an image list.

    Site-local: ``path`` (in the node's image directory) and its expected
    ``sha256``. From a list: ``image`` (the list's identifier) and
    optionally ``version``; the service resolves the name against the
    subscribed lists and the site's approvals and sends the pilot the
    content it stands for (``sha256`` and ``size``), which the pilot takes
    from its image cache or fetches. Here only the shape is checked.
    """

    path: str | None
    sha256: str | None
    image: str | None = None
    version: str | None = None
    size: int | None = None

    @property
    def named(self) -> bool:
        """Whether this names a list's image (else it is a site-local path)."""
        return self.image is not None

    @property
    def resolved(self) -> bool:
        """Whether the content is known: a path's sha256, or a named image's sha256 and size."""
        return self.sha256 is not None and (self.image is None or self.size is not None)

    @property
    def label(self) -> str:
        """How a refusal names it: the path, or ``image NAME [VERSION]``."""
        if self.image is None:
            return self.path
        return f"image {self.image}" + (f" {self.version}" if self.version else "")

    @classmethod
    def from_dict(cls, field: str, data) -> "ImageFile":
        """Parse ``{"path", "sha256"}`` or ``{"image"[, "version", "sha256", "size"]}``; ProtocolError names ``field``."""
        if not isinstance(data, dict):
            raise ProtocolError(f"{field}: must be an object with path and sha256, or with image (and version)")
        if "image" in data:
            _no_unknown(field, data, {"image", "version", "sha256", "size"})
            _check_str(f"{field}.image", data["image"], MAX_IMAGE_NAME_LEN, IMAGE_NAME_RE)
            version, digest, size = data.get("version"), data.get("sha256"), data.get("size")
            if version is not None:
                _check_str(f"{field}.version", version, MAX_IMAGE_NAME_LEN, IMAGE_VERSION_RE)
            if digest is not None and (not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest)):
                raise ProtocolError(f"{field}.sha256: must be 64 lowercase hex digits")
            if size is not None:
                _check_int(f"{field}.size", size, 1, MAX_IMAGE_BYTES)
            return cls(None, digest, data["image"], version, size)
        _no_unknown(field, data, {"path", "sha256"})
        path, digest = data.get("path"), data.get("sha256")
        _check_str(f"{field}.path", path, MAX_PATH_LEN, None)
        if "\x00" in path or not path.isprintable():
            raise ProtocolError(f"{field}.path: has characters that are not allowed")
        if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
            raise ProtocolError(f"{field}.sha256: must be 64 lowercase hex digits")
        return cls(path, digest)

    def to_dict(self) -> dict:
        """The JSON object (only the fields that are set)."""
        if self.image is None:
            return {"path": self.path, "sha256": self.sha256}
        out: dict = {"image": self.image}
        for name in ("version", "sha256", "size"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


@dataclasses.dataclass(frozen=True)
class VmContext:
    """What a VM learns about itself at boot, through a cloud-init NoCloud seed (docs/images.md).

    ``hostname`` (default: the VM's name), the operator's
    ``ssh_authorized_keys``, ``user_data`` (cloud-init's, as given), and
    ``peers``: the lease's VMs (name and the node each runs on) when this
    one was queued, which the service fills in.
    """

    hostname: str | None = None
    ssh_authorized_keys: tuple[str, ...] = ()
    user_data: str | None = None
    peers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_dict(cls, data) -> "VmContext":
        """Parse and validate ``vm.context``; ProtocolError names the field."""
        if not isinstance(data, dict):
            raise ProtocolError("vm.context: must be an object")
        _no_unknown("vm.context", data, {"hostname", "ssh_authorized_keys", "user_data", "peers"})
        hostname = data.get("hostname")
        if hostname is not None:
            _check_str("vm.context.hostname", hostname, 63, _HOSTNAME_RE)
        keys = data.get("ssh_authorized_keys", [])
        if not isinstance(keys, list) or len(keys) > MAX_SSH_KEYS:
            raise ProtocolError(f"vm.context.ssh_authorized_keys: must be a list of at most {MAX_SSH_KEYS} keys")
        for key in keys:
            _check_str("vm.context.ssh_authorized_keys[]", key, MAX_SSH_KEY_LEN, _SSH_KEY_RE)
        user_data = data.get("user_data")
        if user_data is not None:
            if not isinstance(user_data, str) or len(user_data.encode()) > MAX_USER_DATA or "\x00" in user_data:
                raise ProtocolError(f"vm.context.user_data: must be text of at most {MAX_USER_DATA} bytes")
        peers = data.get("peers", [])
        if not isinstance(peers, list) or len(peers) > MAX_PEERS:
            raise ProtocolError(f"vm.context.peers: must be a list of at most {MAX_PEERS} VMs")
        parsed = []
        for peer in peers:
            if not isinstance(peer, dict) or set(peer) != {"name", "host"}:
                raise ProtocolError("vm.context.peers[]: must be {\"name\", \"host\"}")
            _check_str("vm.context.peers[].name", peer["name"], MAX_VM_NAME_LEN, _VM_NAME_RE)
            _check_str("vm.context.peers[].host", peer["host"], MAX_HOST_LEN, _HOST_RE)
            parsed.append((peer["name"], peer["host"]))
        return cls(hostname, tuple(keys), user_data, tuple(parsed))

    def to_dict(self) -> dict:
        """The JSON object (only the parts that are set)."""
        out: dict = {}
        if self.hostname is not None:
            out["hostname"] = self.hostname
        if self.ssh_authorized_keys:
            out["ssh_authorized_keys"] = list(self.ssh_authorized_keys)
        if self.user_data is not None:
            out["user_data"] = self.user_data
        if self.peers:
            out["peers"] = [{"name": name, "host": host} for name, host in self.peers]
        return out


@dataclasses.dataclass(frozen=True)
class VmSpec:
    """One VM as the service asks for it; :meth:`from_dict` validates the shape of every field.

    Boot from a ``disk`` image, or directly from a ``kernel`` (with an
    optional ``initrd`` and ``cmdline``), or both (a kernel whose root is
    on the disk). The disk is never written: ``disk_readonly`` attaches it
    read-only, else writes go to a throw-away overlay. ``network`` is None
    (no NIC) or a libvirt network's name; ``nic`` (never with ``network``)
    is the address and lease network the service allocated
    (:class:`~workspace_common.protocol.network.Nic`); ``console_log`` is None or a file
    name for the serial console's output (the pilot confines it to its
    console directory). ``context``, when set, gives the VM a cloud-init
    seed (:class:`VmContext`). Whether the node allows the paths, the network
    and the memory is the pilot's check, not this one's.
    """

    name: str
    memory_mb: int
    vcpus: int = 1
    disk: ImageFile | None = None
    disk_readonly: bool = False
    kernel: ImageFile | None = None
    initrd: ImageFile | None = None
    cmdline: str | None = None
    network: str | None = None
    console_log: str | None = None
    context: VmContext | None = None
    nic: Nic | None = None

    _FIELDS = frozenset({"name", "memory_mb", "vcpus", "disk", "boot", "network", "console_log", "context", "nic"})

    @classmethod
    def from_dict(cls, data) -> "VmSpec":
        """Parse and validate a VM spec object; raises :class:`ProtocolError` naming the field."""
        if not isinstance(data, dict):
            raise ProtocolError("vm: must be an object")
        _no_unknown("vm", data, cls._FIELDS)
        name = data.get("name")
        _check_str("vm.name", name, MAX_VM_NAME_LEN, _VM_NAME_RE)
        memory_mb = data.get("memory_mb")
        _check_int("vm.memory_mb", memory_mb, 1, MAX_MEMORY_MB)
        vcpus = data.get("vcpus", 1)
        _check_int("vm.vcpus", vcpus, 1, MAX_VCPUS)
        disk, readonly = None, False
        if data.get("disk") is not None:
            raw = data["disk"]
            if isinstance(raw, dict) and "readonly" in raw:
                readonly = raw["readonly"]
                if not isinstance(readonly, bool):
                    raise ProtocolError("vm.disk.readonly: must be true or false")
                raw = {k: v for k, v in raw.items() if k != "readonly"}
            disk = ImageFile.from_dict("vm.disk", raw)
        kernel = initrd = cmdline = None
        if data.get("boot") is not None:
            boot = data["boot"]
            if not isinstance(boot, dict):
                raise ProtocolError("vm.boot: must be an object with kernel, and optionally initrd and cmdline")
            _no_unknown("vm.boot", boot, {"kernel", "initrd", "cmdline"})
            if boot.get("kernel") is None:
                raise ProtocolError("vm.boot.kernel: missing (direct boot needs a kernel)")
            kernel = ImageFile.from_dict("vm.boot.kernel", boot["kernel"])
            if boot.get("initrd") is not None:
                initrd = ImageFile.from_dict("vm.boot.initrd", boot["initrd"])
            if boot.get("cmdline") is not None:
                cmdline = boot["cmdline"]
                _check_str("vm.boot.cmdline", cmdline, MAX_CMDLINE_LEN, None)
                if not cmdline.isprintable():
                    raise ProtocolError("vm.boot.cmdline: has characters that are not allowed")
        if disk is None and kernel is None:
            raise ProtocolError("vm: needs a disk image or a boot kernel (or both)")
        network = data.get("network")
        if network is not None:
            _check_str("vm.network", network, MAX_NETWORK_LEN, _NETWORK_RE)
        console_log = data.get("console_log")
        if console_log is not None:
            _check_str("vm.console_log", console_log, MAX_VM_NAME_LEN + 8, _VM_NAME_RE)
        context = VmContext.from_dict(data["context"]) if data.get("context") is not None else None
        nic = Nic.from_dict("vm.nic", data["nic"]) if data.get("nic") is not None else None
        if nic is not None and network is not None:
            raise ProtocolError("vm.nic: a VM joins either a libvirt network or its lease's network, not both")
        return cls(name, memory_mb, vcpus, disk, readonly, kernel, initrd, cmdline, network, console_log, context,
                   nic)

    def to_dict(self) -> dict:
        """The JSON object (the inverse of :meth:`from_dict`); unset optional parts are left out."""
        out: dict = {"name": self.name, "memory_mb": self.memory_mb, "vcpus": self.vcpus}
        if self.disk is not None:
            out["disk"] = dict(self.disk.to_dict(), **({"readonly": True} if self.disk_readonly else {}))
        if self.kernel is not None:
            boot: dict = {"kernel": self.kernel.to_dict()}
            if self.initrd is not None:
                boot["initrd"] = self.initrd.to_dict()
            if self.cmdline is not None:
                boot["cmdline"] = self.cmdline
            out["boot"] = boot
        if self.network is not None:
            out["network"] = self.network
        if self.console_log is not None:
            out["console_log"] = self.console_log
        if self.context is not None:
            out["context"] = self.context.to_dict()
        if self.nic is not None:
            out["nic"] = self.nic.to_dict()
        return out
