"""The service's configuration: one INI file for ``workspace-lease`` (serve and the operator commands).

Every option has a type and a default (``packaging/service.conf.example``
documents each). :func:`load_config` reports every problem at once, one line
each (``FILE: [section] option: what is wrong, what to do``), as a
:class:`ConfigError`.

Only ``serve`` reads the secrets the file points at (the pilots' secret and
the operators' digest accounts), so an operator's ``workspace-lease list``
on the service host does not need to read them. Both must be files that
only their owner can read.

Comments start with ``#`` or ``;`` at the very beginning of a line; an
indented line continues the option above it, so a multi-line value such as
``extra_directives`` may hold lines that start with ``#`` (``#SBATCH ...``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from urllib.parse import urlsplit

from workspace_common.errors import first_line
from workspace_common.ini import ConfigError, abs_path, boolean, choice, number, read_ini, read_sections, whole
from service_adapter.digest import Account
from service_adapter.secretfiles import read_accounts_file, read_site_key, user_name as _user
from service_adapter.providers.launchers import LAUNCHER_NAMES
from service_adapter.nodekeys import NodeAccounts
from service_adapter import networks as _networks
from service_adapter.providers import PROVIDER_NAMES, QSTAT_HISTORY, SCRIPT_DIALECTS
from service_adapter.providers.jobscript import JobTemplate

DEFAULT_PATH = "/etc/workspace-pilot/service.conf"
SECRET_FILE_ENV = "WORKSPACE_LEASE_SECRET_FILE"
LOG_LEVELS = ("debug", "info", "warning", "error")


_TEMPLATE = JobTemplate()


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """Every setting of the service and of its operator commands.

    ``packaging/service.conf.example`` documents each; field names are the
    options' (prefixed where two sections share a name) with their unit as
    a suffix. ``site_key`` and ``operators`` are filled only when the
    file was loaded for ``serve``.
    """

    # [service]
    listen_host: str = "127.0.0.1"
    port: int = 8780
    contact: str | None = None
    realm: str = "workspace-pilot"
    store: str = "/var/lib/workspace-pilot-service/service.sqlite"
    log_file: str = "/var/log/workspace-lease/service.log"
    log_level: str = "info"
    max_skew_s: float = 300.0
    max_connections: int = 0
    request_timeout_s: float = 30.0
    host_rate: float = 20.0
    host_burst: int = 200
    host_requests: int = 16
    host_downloads: int = 2
    retention_s: float = 30 * 86400.0
    host_store_mb: int = 16
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # [pilots]
    site_key_file: str = "/etc/workspace-pilot/site.key"
    pilot_config: str = "/etc/workspace-pilot/pilot.conf"
    grace_s: float = 10.0
    queue_timeout_s: float = 300.0
    release_grace_s: float = 30.0
    status_interval_s: float = 2.0
    lost_after_s: float = 120.0
    warn_before_s: float = 60.0
    # [vms]
    vm_overhead_mb: int = 64
    # [networks]
    net_mode: str = "none"
    lease_range: object = _networks.NetworkPlan.lease_range
    lease_prefix: int = 24
    vxlan_port: int = 4789
    vni_base: int = 100000
    site_network: object = None
    site_gateway: object = None
    site_pool: tuple = ()
    site_bridge: str | None = None
    net_domain: str = "vm.internal"
    forward_ports: tuple[int, int] | None = (20000, 20999)
    # [metrics]
    metrics_listen: str = "api"
    # [images]
    endorser_keys: str = "/etc/workspace-pilot/endorsers"
    image_store_dir: str = "/var/lib/workspace-pilot-service/images"
    image_fetch_timeout_s: float = 60.0
    image_ca_file: str | None = None
    # [provider]
    provider: str = "local"
    command_timeout_s: float = 30.0
    use_pbs_python: bool = False
    qstat_history: str = "auto"
    env: tuple[tuple[str, str], ...] = ()
    state_dir: str = "/var/lib/workspace-pilot-service/local"
    # the job template's fields, with its defaults (one place for them: JobTemplate)
    cores_per_node: int = _TEMPLATE.cores_per_node
    memory_per_node_mb: int | None = _TEMPLATE.memory_per_node_mb
    walltime_padding_s: float = _TEMPLATE.walltime_padding_s
    queue: str = _TEMPLATE.queue
    account: str = _TEMPLATE.account
    job_name_prefix: str = _TEMPLATE.job_name_prefix
    output_dir: str = _TEMPLATE.output_dir
    extra_directives: tuple[str, ...] = _TEMPLATE.extra_directives
    sudo: str = _TEMPLATE.sudo
    pilot_command: str = _TEMPLATE.pilot_command
    launcher: str = _TEMPLATE.launcher
    parallel_environment: str = _TEMPLATE.parallel_environment
    # [operators]
    accounts_file: str = "/etc/workspace-pilot/operators.htdigest"
    operator_realm: str = "workspace-lease"
    operator_listen: str | None = None
    # [client]
    client_url: str | None = None
    client_user: str | None = None
    client_secret_file: str | None = None
    client_timeout_s: float = 60.0
    client_ca_file: str | None = None
    # read for serve only
    site_key: str | None = dataclasses.field(default=None, repr=False, compare=False)
    operators: tuple[Account, ...] = dataclasses.field(default=(), repr=False, compare=False)

    @property
    def scheme(self) -> str:
        """``https`` when the service has a certificate ([service] tls_cert_file), else ``http``."""
        return "https" if self.tls_cert_file else "http"

    @property
    def listen_url(self) -> str:
        """``http(s)://listen_host:port`` (IPv6 addresses in brackets)."""
        return f"{self.scheme}://{_url_host(self.listen_host)}:{self.port}"

    def ssl_context(self):
        """The server's TLS context (None without a certificate); ValueError says what is wrong."""
        if not self.tls_cert_file:
            return None
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"[service] tls_cert_file {self.tls_cert_file} / tls_key_file {self.tls_key_file}: "
                f"{getattr(exc, 'strerror', None) or getattr(exc, 'reason', None) or exc}"
            ) from None
        return context

    @property
    def pilot_contact(self) -> str:
        """The URL the pilots notify: ``contact``, else the listening address."""
        return self.contact or self.listen_url

    @property
    def service_url(self) -> str:
        """Where the operator commands reach the service: ``[client] url``, else this host's operators' listener
        (``[operators] listen``, or the service's own when that is unset)."""
        if self.client_url:
            return self.client_url
        host, port = self.listen_host, self.port
        if self.operator_listen:
            host, port = listen_parts(self.operator_listen)
        if _is_wildcard(host):
            host = "::1" if ":" in host else "127.0.0.1"
        return f"{self.scheme}://{_url_host(host)}:{port}"

    def job_template(self):
        """The :class:`~service_adapter.providers.jobscript.JobTemplate` of ``[provider]`` (raises ValueError if invalid)."""
        return JobTemplate(**{field.name: getattr(self, field.name) for field in dataclasses.fields(JobTemplate)})

    def provider_settings(self):
        """The :class:`~service_adapter.providers.ProviderSettings` of ``[provider]`` (raises ValueError if invalid)."""
        from service_adapter.providers import ProviderSettings

        return ProviderSettings(
            name=self.provider, template=self.job_template(), command_timeout_s=self.command_timeout_s,
            use_pbs_python=self.use_pbs_python, qstat_history=self.qstat_history,
            env=dict(self.env) if self.env else None, state_dir=self.state_dir,
        )

    def network_plan(self) -> _networks.NetworkPlan:
        """The [networks] section as the store allocates from it."""
        return _networks.NetworkPlan(
            self.net_mode, self.lease_range, self.lease_prefix, self.vxlan_port, self.vni_base, self.site_network,
            self.site_gateway, self.site_pool, self.site_bridge, self.net_domain, self.forward_ports)

    def operator_accounts(self) -> dict[str, Account]:
        """The operators' accounts by user name (serve only)."""
        return {account.user: account for account in self.operators}

    def node_accounts(self) -> NodeAccounts:
        """The pilots' digest accounts, one per node, derived from the site key (serve only)."""
        if self.site_key is None:
            raise RuntimeError("the site key was not loaded (load_config(..., serve=True))")
        return NodeAccounts(self.site_key, self.realm)


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
        "store": ("store", abs_path),
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


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


# -- loading ----------------------------------------------------------------------------------


def load_config(path: str | None = None, *, serve: bool = False, **overrides) -> ServiceConfig:
    """Read ``path`` (or the default file if it exists), apply non-None ``overrides``, validate.

    ``path=None`` means :data:`DEFAULT_PATH`, whose absence is not an error
    (every option has a default, and the operator commands take theirs from
    the command line). ``serve=True`` also reads the pilots' secret and the
    operators' accounts file and checks the provider settings. Raises
    :class:`ConfigError` listing every problem found.
    """
    problems: list[str] = []
    values: dict[str, object] = {}
    explicit = path is not None
    path = path or DEFAULT_PATH
    if explicit or os.path.exists(path):
        # Comments only at the start of a line: an indented "#SBATCH ..." is part of a value.
        read_sections(read_ini(path, line_comments_only=True), path, SCHEMA, RETIRED, values, problems)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if not problems:
        problems.extend(_cross_checks(path, values))
    config = None
    if not problems:
        config = ServiceConfig(**values)
        if serve:
            config = _load_serve_parts(path, config, problems)
    if problems:
        raise ConfigError(problems)
    return config


#: Options of earlier versions, with what replaced them (an old file gets this line, not "unknown option").
RETIRED = {
    ("pilots", option): "one shared pilot secret let any node act for every lease; the service now derives "
    "each node's key from a site key: set site_key_file (make it with `workspace-lease site-key --output FILE`)"
    for option in ("user", "secret_file")
}


def _cross_checks(path: str, values: dict) -> list[str]:
    """Problems that only the combination of options shows."""
    problems = []
    host = values.get("listen_host", ServiceConfig.listen_host)
    if _is_wildcard(host) and not values.get("contact"):
        problems.append(
            f"{path}: [service] contact: needed when listen_host = {host} (the pilots cannot reach a "
            "wildcard address): set the URL the nodes reach this service at"
        )
    if values.get("tls_key_file") and not values.get("tls_cert_file"):
        problems.append(f"{path}: [service] tls_key_file: needs tls_cert_file (the certificate it belongs to)")
    if values.get("realm", ServiceConfig.realm) == values.get("operator_realm", ServiceConfig.operator_realm):
        problems.append(
            f"{path}: [operators] realm: must differ from [service] realm, so that pilot and operator "
            "credentials never work for each other"
        )
    plan = ServiceConfig(**values).network_plan()
    problems.extend(f"{path}: [networks] {option}: {why}" for option, why in plan.problems())
    problems.extend(_template_problems(path, values))
    return problems


def _template_problems(path: str, values: dict) -> list[str]:
    """The job template's own checks (extra directives that fight a typed field, or suit the other LRM)."""
    config = ServiceConfig(**values)
    try:
        template = config.job_template()
        if config.provider in SCRIPT_DIALECTS:
            template.check(SCRIPT_DIALECTS[config.provider])
    except ValueError as exc:
        message = first_line(exc)
        option = "extra_directives" if "extra directive" in message else None
        for name, (field, _) in SCHEMA["provider"].items():
            if option is None and re.match(rf"{field}\b", message):
                option = name
        if option is None:
            return [f"{path}: [provider] {message}"]
        field = SCHEMA["provider"][option][0]
        value = getattr(config, field)
        shown = "\n".join(value) if isinstance(value, tuple) else str(value)
        return [f"{path}: [provider] {option} = {shown!r}: {message}"]
    return []


def _load_serve_parts(path: str, config: ServiceConfig, problems: list[str]) -> ServiceConfig:
    """Read the secrets and check the provider settings; adds one line per problem."""
    site_key = None
    try:
        site_key = read_site_key(config.site_key_file)
    except ValueError as exc:
        problems.append(f"{path}: [pilots] site_key_file {config.site_key_file}: {exc}")
    accounts: tuple[Account, ...] = ()
    try:
        accounts = tuple(read_accounts_file(config.accounts_file, config.operator_realm).values())
    except ValueError as exc:
        problems.append(f"{path}: [operators] accounts_file {config.accounts_file}: {exc}")
    try:
        config.provider_settings()
    except ValueError as exc:
        problems.append(f"{path}: [provider] {first_line(exc)}")
    return dataclasses.replace(config, site_key=site_key, operators=accounts)
