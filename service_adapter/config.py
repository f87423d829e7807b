"""The service's configuration: one INI file for ``workspace-lease`` (serve and the operator commands).

Every option has a type and a default (``packaging/service.conf.example``
documents each; :mod:`service_adapter.configschema` holds the options'
parsers). :func:`load_config` reports every problem at once, one line
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
import os
import re

from service_adapter import networks as _networks
from service_adapter.configschema import RETIRED, SCHEMA, is_wildcard, listen_parts, url_host
from service_adapter.digest import Account
from service_adapter.nodekeys import NodeAccounts
from service_adapter.providers import SCRIPT_DIALECTS
from service_adapter.providers.jobscript import JobTemplate
from service_adapter.secretfiles import read_accounts_file, read_site_key
from workspace_common.errors import first_line
from workspace_common.ini import ConfigError, read_ini, read_sections

__all__ = ["DEFAULT_PATH", "SCHEMA", "SECRET_FILE_ENV", "ConfigError", "ServiceConfig", "listen_parts", "load_config"]

DEFAULT_PATH = "/etc/workspace-pilot/service.conf"
SECRET_FILE_ENV = "WORKSPACE_LEASE_SECRET_FILE"


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
    reuse_port: bool = False
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
        return f"{self.scheme}://{url_host(self.listen_host)}:{self.port}"

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
        if is_wildcard(host):
            host = "::1" if ":" in host else "127.0.0.1"
        return f"{self.scheme}://{url_host(host)}:{port}"

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


def _cross_checks(path: str, values: dict) -> list[str]:
    """Problems that only the combination of options shows."""
    problems = []
    host = values.get("listen_host", ServiceConfig.listen_host)
    if is_wildcard(host) and not values.get("contact"):
        problems.append(
            f"{path}: [service] contact: needed when listen_host = {host} (the pilots cannot reach a "
            "wildcard address): set the URL the nodes reach this service at"
        )
    if values.get("tls_key_file") and not values.get("tls_cert_file"):
        problems.append(f"{path}: [service] tls_key_file: needs tls_cert_file (the certificate it belongs to)")
    if values.get("reuse_port"):
        from service_adapter.store.postgres import is_url as is_store_url  # the store package only when asked

        if not is_store_url(str(values.get("store", ""))):
            problems.append(f"{path}: [service] reuse_port: needs a postgresql:// store (several receivers "
                            "share one database; a SQLite file has one service)")
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
