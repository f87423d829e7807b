"""The service config file's schema: each section's options, the field each fills and the parser of its value.

Each parser raises ``ValueError("what is wrong, what to do")``;
:func:`service_adapter.config.load_config` turns that into one line naming
the file, section and option. ``packaging/service.conf.example`` documents
every option (and ``docs/reference/service-config.md`` is made from it).
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from service_adapter import networks as _networks
from service_adapter.providers import PROVIDER_NAMES, QSTAT_HISTORY
from service_adapter.providers.launchers import LAUNCHER_NAMES
from service_adapter.secretfiles import user_name as _user
from workspace_common.ini import abs_path, boolean, choice, number, whole

LOG_LEVELS = ("debug", "info", "warning", "error")


# -- value parsers: each raises ValueError("what is wrong, what to do") -------------------------

_MAX = 10**8


_positive_float = number(0, _MAX, f"must be a number of seconds above 0 (and at most {_MAX})", above_low=True)
_non_negative_float = number(0, _MAX, f"must be a number of seconds, 0 or more (and at most {_MAX})")


def _optional_mb(text: str) -> int | None:
    message = "must be a whole number of MB (0: no memory request), or empty for the lease's memory"
    if text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(message) from None
    if not 0 <= value <= 2**31 - 1:
        raise ValueError(message)
    return value


_mb = whole(0, 2**31 - 1, f"must be a whole number of MB, 0 or more (at most {2**31 - 1})")
_cores = whole(1, 100_000, "must be a whole number from 1 to 100000")
_port = whole(1, 65535, "must be a TCP port number from 1 to 65535")
_connections = whole(0, 10**7, "must be a whole number of connections, 0 for as many as the open-file limit allows")


_request_timeout = number(1, 60, "must be a number of seconds from 1 to 60")
_host_rate = number(0, 10**6, "must be a number of requests a second above 0", above_low=True)
_host_count = whole(1, 10**6, "must be a whole number from 1 to 1000000")
_retention = number(0, 100 * 365 * 86400, "must be a number of seconds, 0 or more (at most 100 years)")


def _url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must be the service's base URL (scheme, host, port), without a path")
    return text.rstrip("/")


def _host(text: str) -> str:
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", text):
        raise ValueError("must be an IP address or a host name to listen on (e.g. 127.0.0.1, 0.0.0.0)")
    return text


def _metrics_listen(text: str) -> str:
    """``api`` (with the operators' API, behind their digest), ``off``, or ``HOST:PORT``."""
    if text in ("api", "off"):
        return text
    return _listen_address(text, "must be api, off, or HOST:PORT of a separate listener (e.g. 127.0.0.1:9780)")


def _operator_listen(text: str) -> str:
    return _listen_address(text, "must be HOST:PORT of the operators' own listener (e.g. 127.0.0.1:8781)")


def listen_parts(text: str) -> tuple[str, int]:
    """(host, port) of a checked ``HOST:PORT`` option (an IPv6 host without its brackets)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _listen_address(text: str, message: str) -> str:
    """``HOST:PORT`` to listen on (an IPv6 host in brackets)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(message)
    _host(host.strip("[]"))
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} must be a number from 1 to 65535")
    return text


def _log_file(text: str) -> str:
    return text if text == "-" else abs_path(text)


def _store(text: str) -> str:
    """A SQLite file (an absolute path) or a PostgreSQL database (a postgresql:// URL)."""
    from service_adapter.store.postgres import is_url

    if is_url(text):
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018 (raises on a port that is not a number)
        except ValueError as exc:
            raise ValueError(f"is not a PostgreSQL URL: {exc}") from None
        if not parts.hostname and "host=" not in parts.query:
            raise ValueError("a PostgreSQL URL must name its server (postgresql://USER@HOST[:PORT]/DATABASE)")
        return text
    try:
        return abs_path(text)
    except ValueError:
        raise ValueError("must be an absolute path (a SQLite file) or a postgresql:// URL") from None


def _optional_abs_path(text: str) -> str:
    return text if text == "" else abs_path(text)


def _realm(text: str) -> str:
    if not text or '"' in text or "\\" in text:
        raise ValueError("must be non-empty and free of quotes and backslashes")
    return text


def _word(text: str) -> str:
    """A single word for the batch system (queue, account, prefix); empty allowed."""
    if text and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]*", text):
        raise ValueError("must be one word (letters, digits, _ . @ + -), or empty")
    return text


def _prefix(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,15}", text):
        raise ValueError("must start with a letter and hold at most 16 letters, digits, _ or -")
    return text


def _ipv4_address(text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 address") from None


def _lines(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _env(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for line in _lines(text):
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(
                f"{line!r} is not KEY=VALUE: give one variable per line, e.g. SLURM_CONF=/etc/slurm/slurm.conf"
            )
        pairs.append((key, value))
    return tuple(pairs)


# section -> option -> (field name, parser)
SCHEMA: dict[str, dict[str, tuple[str, object]]] = {
    "service": {
        "listen_host": ("listen_host", _host),
        "port": ("port", _port),
        "contact": ("contact", _url),
        "realm": ("realm", _realm),
        "store": ("store", _store),
        "reuse_port": ("reuse_port", boolean),
        "log_file": ("log_file", _log_file),
        "log_level": ("log_level", choice(*LOG_LEVELS)),
        "max_skew": ("max_skew_s", _positive_float),
        "max_connections": ("max_connections", _connections),
        "request_timeout": ("request_timeout_s", _request_timeout),
        "host_rate": ("host_rate", _host_rate),
        "host_burst": ("host_burst", _host_count),
        "host_requests": ("host_requests", _host_count),
        "host_downloads": ("host_downloads", _host_count),
        "retention": ("retention_s", _retention),
        "host_store_mb": ("host_store_mb", _mb),
        "tls_cert_file": ("tls_cert_file", abs_path),
        "tls_key_file": ("tls_key_file", abs_path),
    },
    "pilots": {
        "site_key_file": ("site_key_file", abs_path),
        "pilot_config": ("pilot_config", abs_path),
        "grace": ("grace_s", _positive_float),
        "queue_timeout": ("queue_timeout_s", _positive_float),
        "release_grace": ("release_grace_s", _positive_float),
        "status_interval": ("status_interval_s", _positive_float),
        "lost_after": ("lost_after_s", _positive_float),
        "warn_before": ("warn_before_s", _non_negative_float),
    },
    "vms": {
        "overhead_mb": ("vm_overhead_mb", _mb),
    },
    "networks": {
        "mode": ("net_mode", choice(*_networks.MODES)),
        "lease_range": ("lease_range", _networks.parse_network),
        "lease_prefix": ("lease_prefix", whole(8, 30, "must be a prefix length from 8 to 30")),
        "vxlan_port": ("vxlan_port", _port),
        "vni_base": ("vni_base", whole(1, 2**24 - 1, "must be a VXLAN id from 1 to 16777215")),
        "site_network": ("site_network", _networks.parse_network),
        "site_gateway": ("site_gateway", _ipv4_address),
        "site_pool": ("site_pool", _networks.parse_ranges),
        "site_bridge": ("site_bridge", _networks.check_bridge),
        "domain": ("net_domain", _networks.check_domain),
        "forward_ports": ("forward_ports", _networks.parse_ports),
    },
    "metrics": {
        "listen": ("metrics_listen", _metrics_listen),
    },
    "images": {
        "endorser_keys": ("endorser_keys", abs_path),
        "store_dir": ("image_store_dir", abs_path),
        "fetch_timeout": ("image_fetch_timeout_s", _positive_float),
        "ca_file": ("image_ca_file", abs_path),
    },
    "provider": {
        "name": ("provider", choice(*PROVIDER_NAMES)),
        "command_timeout": ("command_timeout_s", _positive_float),
        "use_pbs_python": ("use_pbs_python", boolean),
        "qstat_history": ("qstat_history", choice(*QSTAT_HISTORY)),
        "env": ("env", _env),
        "state_dir": ("state_dir", abs_path),
        "cores_per_node": ("cores_per_node", _cores),
        "memory_per_node": ("memory_per_node_mb", _optional_mb),
        "walltime_padding": ("walltime_padding_s", _non_negative_float),
        "queue": ("queue", _word),
        "account": ("account", _word),
        "job_name_prefix": ("job_name_prefix", _prefix),
        "output_dir": ("output_dir", abs_path),
        "extra_directives": ("extra_directives", _lines),
        "sudo": ("sudo", _optional_abs_path),
        "pilot_command": ("pilot_command", abs_path),
        "launcher": ("launcher", choice(*LAUNCHER_NAMES)),
        "parallel_environment": ("parallel_environment", _word),
    },
    "operators": {
        "accounts_file": ("accounts_file", abs_path),
        "realm": ("operator_realm", _realm),
        "listen": ("operator_listen", _operator_listen),
    },
    "client": {
        "url": ("client_url", _url),
        "user": ("client_user", _user),
        "secret_file": ("client_secret_file", abs_path),
        "timeout": ("client_timeout_s", _positive_float),
        "ca_file": ("client_ca_file", abs_path),
    },
}


def url_host(host: str) -> str:
    """``host`` as a URL writes it (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def is_wildcard(host: str) -> bool:
    """Whether ``host`` is the any-address (0.0.0.0 or ::), which no client can reach."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


#: Options of earlier versions, with what replaced them (an old file gets this line, not "unknown option").
RETIRED = {
    ("pilots", option): "one shared pilot secret let any node act for every lease; the service now derives "
    "each node's key from a site key: set site_key_file (make it with `workspace-lease site-key --output FILE`)"
    for option in ("user", "secret_file")
}
