"""The images a node's VM jobs may run: the site's approved list, one INI section per image name.

``[vmjob] images`` names the file (``packaging/vmjob-images.conf.example``
documents it). Each section is an image a job asks for by name::

    [debian12]
    kernel = debian12/vmlinuz             ; in [vms] image_dir, as for leased VMs
    kernel_sha256 = 64 hex digits
    initrd = debian12/initrd.img          ; optional
    initrd_sha256 = ...
    disk = debian12/root.qcow2            ; a disk, a kernel, or both
    disk_sha256 = ...
    disk_readonly = no                    ; else writes go to a throw-away overlay
    cmdline = console=ttyS0 root=/dev/vda1
    network = none                        ; user: a NIC behind QEMU's user-mode NAT (see below)

Only what is listed runs, and only with the content its sha256 names: the
VM check (:func:`pilot.vm.check.check_spec`) hashes each file before the VM
is made, as it does for a lease's VMs.

``network = user`` gives the image's VMs one NIC behind QEMU's user-mode
networking: the guest asks its DHCP (10.0.2.15), and reaches what the
job's own processes on the node reach (its connections leave as QEMU's,
the job's own VM process: the node's address, and the node's loopback as
10.0.2.2); nothing on the node changes and nothing reaches the guest from
outside. The default, ``none``, is no NIC.
"""

from __future__ import annotations

import dataclasses
import re

from workspace_common.protocol import ImageFile, VmSpec
from workspace_common.ini import ConfigError, boolean, read_ini

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_FILES = ("disk", "kernel", "initrd")
_OPTIONS = {f"{part}{suffix}" for part in _FILES for suffix in ("", "_sha256")} | {"disk_readonly", "cmdline",
                                                                                  "network"}
#: What an image's ``network`` may say.
NETWORKS = ("none", "user")


@dataclasses.dataclass(frozen=True)
class JobImage:
    """An approved image: its files (path in the image directory and sha256) and how to boot it."""

    name: str
    disk: ImageFile | None = None
    kernel: ImageFile | None = None
    initrd: ImageFile | None = None
    disk_readonly: bool = False
    cmdline: str | None = None
    network: str = "none"

    def spec(self, vm_name: str, *, memory_mb: int, vcpus: int, console_log: str | None) -> VmSpec:
        """The VM of a job of this image, as a spec the node's VM check takes."""
        return VmSpec(vm_name, memory_mb, vcpus, disk=self.disk, disk_readonly=self.disk_readonly,
                      kernel=self.kernel, initrd=self.initrd, cmdline=self.cmdline, console_log=console_log)


def load_catalog(path: str) -> dict[str, JobImage]:
    """Every image in the file at ``path``, by name; :class:`ConfigError` with one line per problem."""
    parser = read_ini(path)
    images, problems = {}, []
    for name in parser.sections():
        where = f"{path}: [{name}]"
        if not _NAME_RE.match(name):
            problems.append(f"{where}: not an image name (letters, digits, . _ -; at most 64)")
            continue
        options = dict(parser.items(name))
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            problems.append(f"{where}: unknown option {unknown[0]!r}: known are {', '.join(sorted(_OPTIONS))}")
            continue
        files, bad_file = {}, False
        for part in _FILES:
            path_text, digest = options.get(part, "").strip(), options.get(f"{part}_sha256", "").strip()
            if not path_text and not digest:
                continue
            if not path_text or not _SHA256_RE.match(digest):
                problems.append(f"{where}: {part} needs a path and {part}_sha256 (64 lowercase hex digits)")
                bad_file = True
                continue
            files[part] = ImageFile(path_text, digest)
        if bad_file:
            continue
        if "disk" not in files and "kernel" not in files:
            problems.append(f"{where}: needs a disk or a kernel (or both)")
            continue
        if "initrd" in files and "kernel" not in files:
            problems.append(f"{where}: an initrd needs a kernel")
            continue
        try:
            readonly = boolean(options.get("disk_readonly", "no"))
        except ValueError as exc:
            problems.append(f"{where}: disk_readonly: {exc}")
            continue
        cmdline = options.get("cmdline", "").strip() or None
        if cmdline is not None and "kernel" not in files:
            problems.append(f"{where}: a cmdline needs a kernel")
            continue
        network = options.get("network", "none").strip()
        if network not in NETWORKS:
            problems.append(f"{where}: network = {network!r}: must be one of {', '.join(NETWORKS)}")
            continue
        images[name] = JobImage(name, files.get("disk"), files.get("kernel"), files.get("initrd"), readonly, cmdline,
                                network)
    if problems:
        raise ConfigError(problems)
    return images
