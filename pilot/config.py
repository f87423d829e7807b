"""The pilot's configuration: one INI file, checked whole at start.

Every option has a type and a default (``packaging/pilot.conf.example``
documents each). :func:`load_config` reports every problem at once, one line
each, as a :class:`ConfigError`; nothing on the node is touched before the
configuration is known to be good.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pilot.batchenv import DEFAULT_PATH as DEFAULT_BATCH_PATH, BatchClient
from workspace_common.ini import ConfigError, abs_path, boolean, choice, number, read_ini, read_sections, whole
from workspace_common.route import address_towards

if TYPE_CHECKING:
    from pilot.vm.overlay import DiskBudget

DEFAULT_PATH = "/etc/workspace-pilot/pilot.conf"


BACKENDS = ("hugepages", "cgroup", "xen", "xl", "none")
HUGEPAGE_SIZES_KB = {"2M": 2048, "1G": 1048576}


@dataclasses.dataclass(frozen=True)
class PilotConfig:
    """Every setting the pilot runs with (file values, then command-line overrides).

    ``packaging/pilot.conf.example`` documents each; the field names are the
    options' with their unit as a suffix.
    """

    # [service]
    contact: str | None = None
    node_key_file: str = "/etc/workspace-pilot/node.key"
    ca_file: str | None = None
    request_timeout_s: float = 5.0
    reserved_timeout_s: float = 30.0
    verify_tls: bool = True
    # [memory]
    backend: str = "hugepages"
    minmem_mb: int = 1024
    verify_timeout_s: float = 10.0
    boot_mb: int | str | None = None
    hugepage_size: str = "2M"
    cgroup: str | None = None
    xen_uri: str = "xen:///system"
    xl_command: str = "/usr/sbin/xl"
    xl_sudo: bool = False
    # [journal]
    journal_dir: str = "/var/lib/workspace-pilot"
    lock_timeout_s: float = 30.0
    # [timing]
    earlywaitratio: float = 0.5
    walltime_margin_s: float = 30.0
    lrm_query_timeout_s: float = 5.0
    # [batch]
    batch_path: str = DEFAULT_BATCH_PATH
    slurm_conf: str | None = None
    sge_root: str | None = None
    sge_cell: str = "default"
    sge_qmaster_port: int | None = None
    # [libvirt]
    libvirt_uri: str | None = None
    # [vms]
    image_dir: str = "/var/lib/workspace-pilot/images"
    console_dir: str = "/var/log/workspace-pilot/consoles"
    vm_overhead_mb: int = 64
    networks: tuple[str, ...] | None = None
    virt_type: str = "auto"
    shutdown_timeout_s: float = 30.0
    usage_interval_s: float = 30.0
    busy_cpu_percent: int = 10
    poll_wait_s: float = 30.0
    disk_budget_mb: int = 0
    disk_reserve_mb: int = 1024
    qemu_img: str = "/usr/bin/qemu-img"
    # [images]
    image_cache_dir: str = "/var/lib/workspace-pilot/image-cache"
    image_cache_mb: int = 20480
    image_mirror: str | None = None
    image_fetch_timeout_s: float = 30.0
    image_peers: bool = True
    peer_address: str | None = None
    peer_port: int = 0
    # [networks]
    net_address: str | None = None
    forwards: bool = True
    forward_address: str | None = None
    net_run_dir: str = "/run/workspace-pilot/net"
    # [vmjob]
    vmjob_images: str = "/etc/workspace-pilot/vmjob-images.conf"
    vmjob_run_dir: str = "/run/workspace-vmjob"
    vmjob_default_memory_mb: int = 1024
    vmjob_stop_timeout_s: float = 5.0
    vmjob_virtiofsd: str = "/usr/lib/qemu/virtiofsd"
    vmjob_output_limit_mb: int = 100
    vmjob_run_size_mb: int = 256
    # [logging]
    log_dir: str = "/var/log/workspace-pilot"
    log_level: str = "info"

    @property
    def tls_verify(self) -> bool | str:
        """What to check an https service's certificate against: ``ca_file``, else the system's CAs
        (False only with verify_tls = no)."""
        if not self.verify_tls:
            return False
        return self.ca_file or True

    @property
    def batch_client(self) -> BatchClient:
        """Where root finds the batch system's commands and what they read (``[batch]``; never the caller's)."""
        return BatchClient(self.batch_path, self.slurm_conf, self.sge_root, self.sge_cell, self.sge_qmaster_port)

    @property
    def disk_budget(self) -> "DiskBudget":
        """Where writable disks' overlays go and how much of the disk they may take (``[vms]``)."""
        from pilot.vm.overlay import DiskBudget
        from pilot.vm.vmfiles import vm_files_dir_of

        return DiskBudget(vm_files_dir_of(self.journal_dir), self.disk_budget_mb, self.disk_reserve_mb, self.qemu_img)

    def node_address(self) -> str | None:
        """Where the lease networks' overlay meets this node: ``[networks] address``, else the node's address on
        the way to the service; None when neither is a usable IPv4 address (no lease network can be built)."""
        from workspace_common.protocol.wire import ProtocolError, check_node_address

        address = self.net_address or address_towards(self.contact)
        try:
            return check_node_address("address", address)
        except ProtocolError:
            return None

    @property
    def hugepage_kb(self) -> int:
        """The configured hugepage size in kB."""
        return HUGEPAGE_SIZES_KB[self.hugepage_size]

    @property
    def vm_uri(self) -> str:
        """The libvirt URI of the leased VMs: configured, else the hypervisor the backend implies."""
        if self.libvirt_uri is not None:
            return self.libvirt_uri
        return "xen:///system" if self.backend in ("xen", "xl") else "qemu:///system"


# section -> option -> (field name, parser)
_positive_float = number(0, 10**8, "must be a number above 0 (and at most 100000000)", above_low=True)
_non_negative_float = number(0, 10**8, "must be a number, 0 or more (and at most 100000000)")
_ratio = number(0, 1, "must be a number from 0 to 1")
_mb = whole(0, 10**8, "must be a whole number of MB, 0 or more")
_poll_wait = number(1, 60, "must be a number of seconds from 1 to 60 (the service holds a poll at most 60 s)")


#: What a VM job's run directory holds besides the guest's stdout and stderr: its console log, which virtlogd
#: keeps to 4 files of 2 MiB, and the control files.
RUN_DIR_OVERHEAD_MB = 9
MIN_RUN_SIZE_MB = RUN_DIR_OVERHEAD_MB + 2


def _boot_mb(text: str) -> int | str:
    return "max" if text == "max" else _mb(text)


def _cgroup_path(text: str) -> str:
    path = abs_path(text)
    normal = os.path.normpath(path)
    if not normal.startswith("/sys/fs/cgroup/") or normal.count("/") < 5:
        raise ValueError("must be a cgroup directory below /sys/fs/cgroup/<hierarchy>/")
    return normal


def _libvirt_uri(text: str) -> str:
    if text and "://" not in text:
        raise ValueError("must be a libvirt URI such as qemu:///system, or empty for no libvirt")
    return text


def _ip_address(text: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError("must be this node's IP address that the lease's other nodes reach") from None


def _mirror_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError("must be an http:// or https:// URL under which images are found by sha256")
    return text.rstrip("/")


def _url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return text.rstrip("/")


def _search_path(text: str) -> str:
    directories = text.split(":")
    if not text or any(not part.startswith("/") for part in directories):
        raise ValueError("must be absolute directories separated by ':' (root-owned, where the batch system's "
                         "commands are)")
    return ":".join(os.path.normpath(part) for part in directories)


def _cell(text: str) -> str:
    if not text or not all(c.isalnum() or c in "._-" for c in text) or text[0] == "." or len(text) > 64:
        raise ValueError("must be a Grid Engine cell name (letters, digits, . _ -)")
    return text


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.replace(",", " ").split() if part.strip())
    for name in names:
        if not name[0].isalnum() or not all(c.isalnum() or c in "._-" for c in name) or len(name) > 64:
            raise ValueError(f"{name!r} is not a libvirt network name (letters, digits, . _ -)")
    return names


SCHEMA = {
    "service": {
        "contact": ("contact", _url),
        "node_key_file": ("node_key_file", abs_path),
        "ca_file": ("ca_file", abs_path),
        "request_timeout": ("request_timeout_s", _positive_float),
        "reserved_timeout": ("reserved_timeout_s", _positive_float),
        "verify_tls": ("verify_tls", boolean),
    },
    "memory": {
        "backend": ("backend", choice(*BACKENDS)),
        "minmem": ("minmem_mb", _mb),
        "verify_timeout": ("verify_timeout_s", _positive_float),
        "boot_mb": ("boot_mb", _boot_mb),
        "hugepage_size": ("hugepage_size", choice(*HUGEPAGE_SIZES_KB)),
        "cgroup": ("cgroup", _cgroup_path),
        "xen_uri": ("xen_uri", _libvirt_uri),
        "xl_command": ("xl_command", abs_path),
        "xl_sudo": ("xl_sudo", boolean),
    },
    "journal": {
        "dir": ("journal_dir", abs_path),
        "lock_timeout": ("lock_timeout_s", _positive_float),
    },
    "timing": {
        "earlywaitratio": ("earlywaitratio", _ratio),
        "walltime_margin": ("walltime_margin_s", _non_negative_float),
        "lrm_query_timeout": ("lrm_query_timeout_s", _positive_float),
    },
    "batch": {
        "path": ("batch_path", _search_path),
        "slurm_conf": ("slurm_conf", abs_path),
        "sge_root": ("sge_root", abs_path),
        "sge_cell": ("sge_cell", _cell),
        "sge_qmaster_port": ("sge_qmaster_port", whole(1, 65535, "must be a TCP port number from 1 to 65535")),
    },
    "libvirt": {
        "uri": ("libvirt_uri", _libvirt_uri),
    },
    "vms": {
        "image_dir": ("image_dir", abs_path),
        "console_dir": ("console_dir", abs_path),
        "overhead_mb": ("vm_overhead_mb", _mb),
        "networks": ("networks", _names),
        "virt_type": ("virt_type", choice("auto", "kvm", "qemu", "xen")),
        "shutdown_timeout": ("shutdown_timeout_s", _positive_float),
        "usage_interval": ("usage_interval_s", _positive_float),
        "busy_cpu": ("busy_cpu_percent", whole(0, 100, "must be a whole percentage from 0 to 100")),
        "poll_wait": ("poll_wait_s", _poll_wait),
        "disk_budget": ("disk_budget_mb", _mb),
        "disk_reserve": ("disk_reserve_mb", _mb),
        "qemu_img": ("qemu_img", abs_path),
    },
    "images": {
        "cache_dir": ("image_cache_dir", abs_path),
        "cache_size": ("image_cache_mb", _mb),
        "mirror": ("image_mirror", _mirror_url),
        "fetch_timeout": ("image_fetch_timeout_s", _positive_float),
        "peers": ("image_peers", boolean),
        "peer_address": ("peer_address", _ip_address),
        "peer_port": ("peer_port", whole(0, 65535, "must be a TCP port number, or 0 for any free port")),
    },
    "networks": {
        "address": ("net_address", _ip_address),
        "forwards": ("forwards", boolean),
        "forward_address": ("forward_address", _ip_address),
        "run_dir": ("net_run_dir", abs_path),
    },
    "vmjob": {
        "images": ("vmjob_images", abs_path),
        "run_dir": ("vmjob_run_dir", abs_path),
        "default_memory": ("vmjob_default_memory_mb", whole(1, 10**8, "must be a whole number of MB above 0")),
        "stop_timeout": ("vmjob_stop_timeout_s", _non_negative_float),
        "virtiofsd": ("vmjob_virtiofsd", abs_path),
        "output_limit": ("vmjob_output_limit_mb", whole(1, 10**8, "must be a whole number of MB above 0")),
        "run_size": ("vmjob_run_size_mb", whole(MIN_RUN_SIZE_MB, 10**6,
                                                f"must be a whole number of MB, {MIN_RUN_SIZE_MB} or more")),
    },
    "logging": {
        "dir": ("log_dir", abs_path),
        "level": ("log_level", choice("debug", "info", "warning", "error")),
    },
}


#: Options of earlier versions, with what replaced them (an old file gets this line, not "unknown option").
RETIRED = {
    ("service", option): "one shared pilot secret let any node act for every lease; each node now has its "
    "own key: set node_key_file (make the key with `workspace-lease node-key HOST` on the service's host)"
    for option in ("user", "secret", "secret_file", "realm")
}
RETIRED[("vmjob", "slurm_conf")] = ("moved to [batch] slurm_conf, which every batch-system command the pilot and "
                                    "workspace-vmjob run as root reads")


def load_config(path: str | None, *, require_service: bool = True, **overrides) -> PilotConfig:
    """Read ``path`` (or the default file if it exists), apply non-None ``overrides``, validate.

    ``path=None`` means the default path, and its absence is not an error.
    ``require_service=False`` (kill-all, evaluate) accepts a file without a
    contact. The node key is read later, once the host name is known
    (:mod:`pilot.credentials`).
    Raises :class:`ConfigError` listing every problem found.
    """
    problems: list[str] = []
    values: dict[str, object] = {}
    explicit = path is not None
    path = path or DEFAULT_PATH
    if explicit or os.path.exists(path):
        read_sections(read_ini(path), path, SCHEMA, RETIRED, values, problems)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("contact") is None and not problems and require_service:
        problems.append("no service contact: pass --contact URL or set [service] contact")
    if not problems:
        problems.extend(_cross_checks(path, values))
    if problems:
        raise ConfigError(problems)
    return PilotConfig(**values)


def _cross_checks(path: str, values: dict) -> list[str]:
    """Problems that only the combination of options shows."""
    problems = []
    backend = values.get("backend", PilotConfig.backend)
    if backend == "cgroup" and not values.get("cgroup"):
        problems.append(f"{path}: [memory] backend = cgroup needs 'cgroup' (the host cgroup's directory)")
    if values.get("boot_mb") == "max" and backend != "cgroup":
        problems.append(f"{path}: [memory] boot_mb = max only means something for backend = cgroup")
    output_mb = values.get("vmjob_output_limit_mb", PilotConfig.vmjob_output_limit_mb)
    run_mb = values.get("vmjob_run_size_mb", PilotConfig.vmjob_run_size_mb)
    if 2 * output_mb + RUN_DIR_OVERHEAD_MB > run_mb:
        problems.append(f"{path}: [vmjob] output_limit = {output_mb} MB does not fit twice (stdout and stderr), "
                        f"with {RUN_DIR_OVERHEAD_MB} MB for the console, in run_size = {run_mb} MB: lower it to "
                        f"{(run_mb - RUN_DIR_OVERHEAD_MB) // 2} or raise run_size")
    return problems


def load_node_tool_config(prog: str, path: str | None) -> PilotConfig | None:
    """The node tools' (kill-all, node status) way in: :func:`load_config` without a required
    contact; None after printing each problem as one ``PROG: config error: ...`` line on stderr."""
    import sys

    try:
        return load_config(path, require_service=False)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{prog}: config error: {problem}", file=sys.stderr)
        return None
