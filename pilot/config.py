"""The pilot's configuration: one INI file, checked whole at start.

Every option has a type and a default (``packaging/pilot.conf.example``
documents each). :func:`load_config` reports every problem at once, one line
each, as a :class:`ConfigError`; nothing on the node is touched before the
configuration is known to be good.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
from urllib.parse import urlsplit

DEFAULT_PATH = "/etc/workspace-pilot/pilot.conf"


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


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
    # [libvirt]
    libvirt_uri: str | None = None
    # [vms]
    image_dir: str = "/var/lib/workspace-pilot/images"
    console_dir: str = "/var/log/workspace-pilot/consoles"
    vm_overhead_mb: int = 64
    networks: tuple[str, ...] | None = None
    virt_type: str = "auto"
    shutdown_timeout_s: float = 30.0
    poll_wait_s: float = 30.0
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
def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value <= 10**8:
        raise ValueError("must be a number above 0 (and at most 100000000)")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 10**8:
        raise ValueError("must be a number, 0 or more (and at most 100000000)")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise ValueError("must be a number from 0 to 1")
    return value


def _mb(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("must be a whole number of MB") from None
    if not 0 <= value <= 10**8:
        raise ValueError("must be a whole number of MB, 0 or more")
    return value


def _boot_mb(text: str) -> int | str:
    return "max" if text == "max" else _mb(text)


def _cgroup_path(text: str) -> str:
    path = _abs_path(text)
    normal = os.path.normpath(path)
    if not normal.startswith("/sys/fs/cgroup/") or normal.count("/") < 5:
        raise ValueError("must be a cgroup directory below /sys/fs/cgroup/<hierarchy>/")
    return normal


def _libvirt_uri(text: str) -> str:
    if text and "://" not in text:
        raise ValueError("must be a libvirt URI such as qemu:///system, or empty for no libvirt")
    return text


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError("must be yes or no")


def _url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return text.rstrip("/")


def _abs_path(text: str) -> str:
    if not os.path.isabs(text):
        raise ValueError("must be an absolute path")
    return text


def _choice(*allowed: str):
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return text

    return parse


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.replace(",", " ").split() if part.strip())
    for name in names:
        if not name[0].isalnum() or not all(c.isalnum() or c in "._-" for c in name) or len(name) > 64:
            raise ValueError(f"{name!r} is not a libvirt network name (letters, digits, . _ -)")
    return names


def _poll_wait(text: str) -> float:
    value = float(text)
    if not 1 <= value <= 60:
        raise ValueError("must be a number of seconds from 1 to 60 (the service holds a poll at most 60 s)")
    return value


SCHEMA = {
    "service": {
        "contact": ("contact", _url),
        "node_key_file": ("node_key_file", _abs_path),
        "ca_file": ("ca_file", _abs_path),
        "request_timeout": ("request_timeout_s", _positive_float),
        "reserved_timeout": ("reserved_timeout_s", _positive_float),
        "verify_tls": ("verify_tls", _bool),
    },
    "memory": {
        "backend": ("backend", _choice(*BACKENDS)),
        "minmem": ("minmem_mb", _mb),
        "verify_timeout": ("verify_timeout_s", _positive_float),
        "boot_mb": ("boot_mb", _boot_mb),
        "hugepage_size": ("hugepage_size", _choice(*HUGEPAGE_SIZES_KB)),
        "cgroup": ("cgroup", _cgroup_path),
        "xen_uri": ("xen_uri", _libvirt_uri),
        "xl_command": ("xl_command", _abs_path),
        "xl_sudo": ("xl_sudo", _bool),
    },
    "journal": {
        "dir": ("journal_dir", _abs_path),
        "lock_timeout": ("lock_timeout_s", _positive_float),
    },
    "timing": {
        "earlywaitratio": ("earlywaitratio", _ratio),
        "walltime_margin": ("walltime_margin_s", _non_negative_float),
        "lrm_query_timeout": ("lrm_query_timeout_s", _positive_float),
    },
    "libvirt": {
        "uri": ("libvirt_uri", _libvirt_uri),
    },
    "vms": {
        "image_dir": ("image_dir", _abs_path),
        "console_dir": ("console_dir", _abs_path),
        "overhead_mb": ("vm_overhead_mb", _mb),
        "networks": ("networks", _names),
        "virt_type": ("virt_type", _choice("auto", "kvm", "qemu", "xen")),
        "shutdown_timeout": ("shutdown_timeout_s", _positive_float),
        "poll_wait": ("poll_wait_s", _poll_wait),
    },
    "logging": {
        "dir": ("log_dir", _abs_path),
        "level": ("log_level", _choice("debug", "info", "warning", "error")),
    },
}


#: Options of earlier versions, with what replaced them (an old file gets this line, not "unknown option").
RETIRED = {
    ("service", option): "one shared pilot secret let any node act for every lease; each node now has its "
    "own key: set node_key_file (make the key with `workspace-lease node-key HOST` on the service's host)"
    for option in ("user", "secret", "secret_file", "realm")
}


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
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(path, encoding="utf-8") as handle:
                parser.read_file(handle)
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
        except configparser.Error as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError([f"{path}: not a valid INI file: {first}"]) from None
        _read_sections(parser, path, values, problems)
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
    return problems


def _read_sections(parser, path: str, values: dict, problems: list[str]) -> None:
    for section in parser.sections():
        options = SCHEMA.get(section)
        if options is None:
            problems.append(f"{path}: unknown section [{section}]; known: {', '.join(SCHEMA)}")
            continue
        for option, text in parser.items(section):
            if (section, option) in RETIRED:
                problems.append(f"{path}: [{section}] {option} is gone: {RETIRED[section, option]}")
                continue
            if option not in options:
                problems.append(f"{path}: [{section}] unknown option '{option}'")
                continue
            field, parse = options[option]
            try:
                value = parse(text.strip())
            except ValueError as exc:
                problems.append(f"{path}: [{section}] {option} = {text!r}: {exc}")
                continue
            values[field] = value
