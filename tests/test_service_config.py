"""The service's configuration file: defaults, one line per problem, secrets' modes, the example."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re

import pytest

from workspace_common.protocol import digest_ha1, node_key
from service_adapter.config import (
    DEFAULT_PATH,
    SCHEMA,
    ConfigError,
    ServiceConfig,
    load_config,
)
from service_adapter.secretfiles import read_accounts_file

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "packaging", "service.conf.example")


def write(tmp_path, text: str, name: str = "service.conf") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def private(tmp_path, name: str, text: str, mode: int = 0o600) -> str:
    path = tmp_path / name
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def ha1_line(user: str, secret: str, realm: str = "workspace-lease") -> str:
    return f"{user}:{realm}:{hashlib.sha256(f'{user}:{realm}:{secret}'.encode()).hexdigest()}\n"


SITE_KEY = "5" * 64


def serve_files(tmp_path, *, secret_mode=0o600, accounts_mode=0o600, accounts=None) -> str:
    """A config whose [pilots] site_key_file and [operators] accounts_file exist (for serve=True)."""
    secret = private(tmp_path, "site.key", SITE_KEY + "\n", secret_mode)
    accounts_file = private(
        tmp_path, "operators.htdigest", accounts if accounts is not None else ha1_line("alice", "a-secret"),
        accounts_mode,
    )
    return f"[pilots]\nsite_key_file = {secret}\n[operators]\naccounts_file = {accounts_file}\n"


# -- defaults -------------------------------------------------------------------------------------


def test_an_empty_file_gives_every_default(tmp_path):
    config = load_config(write(tmp_path, ""))
    assert config == ServiceConfig()
    assert config.pilot_contact == "http://127.0.0.1:8780"
    assert config.service_url == "http://127.0.0.1:8780"
    assert (config.realm, config.operator_realm) == ("workspace-pilot", "workspace-lease")
    assert config.store == "/var/lib/workspace-pilot-service/service.sqlite"


def test_a_missing_default_file_is_no_error_but_a_missing_named_file_is(tmp_path):
    if os.path.exists(DEFAULT_PATH):
        pytest.skip(f"{DEFAULT_PATH} exists on this machine")
    assert load_config(None) == ServiceConfig()
    missing = str(tmp_path / "nope.conf")
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert caught.value.problems == [f"{missing}: cannot read: No such file or directory"]


def test_the_provider_defaults_are_the_providers_own():
    """[provider] unset gives exactly ProviderSettings() and JobTemplate() (helper modules' defaults)."""
    from service_adapter.providers.jobscript import JobTemplate
    from service_adapter.providers import ProviderSettings

    assert ServiceConfig().job_template() == JobTemplate()
    assert ServiceConfig().provider_settings() == ProviderSettings()


def test_contact_and_client_url_follow_the_listener(tmp_path):
    config = load_config(write(tmp_path, "[service]\nlisten_host = ::1\nport = 9000\n"))
    assert config.pilot_contact == "http://[::1]:9000"
    config = load_config(write(tmp_path, "[service]\nlisten_host = 0.0.0.0\ncontact = https://svc.example:8780/\n"))
    assert config.pilot_contact == "https://svc.example:8780"
    assert config.service_url == "http://127.0.0.1:8780"  # the operators on this host use loopback
    config = load_config(write(tmp_path, "[client]\nurl = http://lease-service.invalid:8780\n"))
    assert config.service_url == "http://lease-service.invalid:8780"


def test_multi_line_values_keep_lines_that_start_with_a_hash(tmp_path):
    text = (
        "[provider]\n"
        "# a comment, at the start of a line\n"
        "name = slurm\n"
        "extra_directives =\n"
        "    #SBATCH --exclusive\n"
        "    #SBATCH --constraint=kvm\n"
        "env =\n"
        "    SLURM_CONF=/etc/slurm/slurm.conf\n"
        "    TZ=UTC\n"
        "memory_per_node =\n"
    )
    config = load_config(write(tmp_path, text))
    assert config.provider == "slurm"
    assert config.extra_directives == ("#SBATCH --exclusive", "#SBATCH --constraint=kvm")
    assert config.env == (("SLURM_CONF", "/etc/slurm/slurm.conf"), ("TZ", "UTC"))
    assert config.memory_per_node_mb is None
    assert load_config(write(tmp_path, "[provider]\nmemory_per_node = 0\n")).memory_per_node_mb == 0


def test_lost_after_and_the_vm_overhead_are_read(tmp_path):
    assert (ServiceConfig().lost_after_s, ServiceConfig().vm_overhead_mb) == (120.0, 64)
    config = load_config(write(tmp_path, "[pilots]\nlost_after = 45.5\n[vms]\noverhead_mb = 0\n"))
    assert (config.lost_after_s, config.vm_overhead_mb) == (45.5, 0)
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "[vms]\noverhead_mb = 64M\n"))
    assert caught.value.problems == [
        f"{tmp_path / 'service.conf'}: [vms] overhead_mb = '64M': must be a whole number of MB, 0 or more "
        f"(at most {2**31 - 1})"
    ]


def test_serve_builds_the_vm_manager_with_the_configured_overhead(tmp_path):
    from service_adapter.api import VMS_KEY
    from service_adapter.server import build

    text = serve_files(tmp_path).replace("[pilots]\n", "[pilots]\nlost_after = 30\n") + (
        f"[service]\nstore = {tmp_path / 'service.sqlite'}\n[provider]\nstate_dir = {tmp_path / 'local'}\n"
        "[vms]\noverhead_mb = 128\n"
    )
    store, provider, manager, app, operator_app = build(load_config(write(tmp_path, text), serve=True))
    assert operator_app is None  # [operators] listen unset: the API shares the pilots' listener
    try:
        assert app[VMS_KEY].overhead_mb == 128
        assert manager.lost_after_s == 30
    finally:
        provider.close()
        store.close()


def test_the_http_reference_lists_every_route_serve_answers_and_no_other(tmp_path):
    """docs/reference/http-api.md comes from the route tables; here the real serve's two applications are read."""
    from admin_tools.reference import route_groups
    from service_adapter.server import build

    text = serve_files(tmp_path).replace("[operators]\n", "[operators]\nlisten = 127.0.0.1:8781\n") + (
        f"[service]\nstore = {tmp_path / 'service.sqlite'}\n[provider]\nstate_dir = {tmp_path / 'local'}\n"
        "[metrics]\nlisten = api\n"
    )
    store, provider, manager, app, operator_app = build(load_config(write(tmp_path, text), serve=True))
    try:
        served = {(route.method, route.resource.canonical) for each in (app, operator_app)
                  for route in each.router.routes() if route.method != "HEAD"}
    finally:
        provider.close()
        store.close()
    listed = [(route.method, route.path) for _, _, routes in route_groups() for route in routes]
    assert len(listed) == len(set(listed)) and set(listed) == served
    assert [path for _, _, routes in route_groups() for method, path, handler in routes if not handler.__doc__] == []


# -- one line per problem -------------------------------------------------------------------------

BAD_VALUES = [
    ("service", "port", "http", "must be a TCP port number from 1 to 65535"),
    ("service", "port", "70000", "must be a TCP port number from 1 to 65535"),
    ("service", "listen_host", "not a host!", "must be an IP address or a host name"),
    ("service", "contact", "ftp://x", "must be an http:// or https:// URL with a host"),
    ("service", "contact", "http://svc.example/pilot", "without a path"),
    ("service", "realm", 'a"b', "free of quotes and backslashes"),
    ("service", "store", "service.sqlite", "must be an absolute path (a SQLite file) or a postgresql:// URL"),
    ("service", "store", "postgresql:///leases", "a PostgreSQL URL must name its server"),
    ("service", "store", "postgresql://db:port/leases", "is not a PostgreSQL URL"),
    ("service", "reuse_port", "maybe", "must be yes or no"),
    ("service", "log_file", "service.log", "must be an absolute path"),
    ("service", "log_level", "loud", "must be one of debug, info, warning, error"),
    ("service", "max_skew", "-1", "must be a number of seconds above 0"),
    ("service", "tls_cert_file", "service.pem", "must be an absolute path"),
    ("service", "tls_key_file", "service.key", "must be an absolute path"),
    ("service", "max_connections", "-1", "must be a whole number of connections, 0 for as many as"),
    ("service", "max_connections", "many", "must be a whole number of connections"),
    ("service", "request_timeout", "0", "must be a number of seconds from 1 to 60"),
    ("service", "request_timeout", "120", "must be a number of seconds from 1 to 60"),
    ("service", "host_rate", "0", "must be a number of requests a second above 0"),
    ("service", "retention", "-1", "must be a number of seconds, 0 or more"),
    ("service", "host_store_mb", "lots", "must be a whole number of MB, 0 or more"),
    ("operators", "listen", "8781", "must be HOST:PORT of the operators' own listener"),
    ("operators", "listen", "127.0.0.1:0", "port '0' must be a number from 1 to 65535"),
    ("service", "host_burst", "0", "must be a whole number from 1 to 1000000"),
    ("service", "host_requests", "many", "must be a whole number from 1 to 1000000"),
    ("service", "host_downloads", "-1", "must be a whole number from 1 to 1000000"),
    ("pilots", "site_key_file", "site.key", "must be an absolute path"),
    ("pilots", "pilot_config", "pilot.conf", "must be an absolute path"),
    ("pilots", "grace", "soon", "must be a number of seconds above 0"),
    ("pilots", "queue_timeout", "0", "must be a number of seconds above 0"),
    ("pilots", "release_grace", "1e9", "at most 100000000"),
    ("pilots", "status_interval", "nan", "must be a number of seconds above 0"),
    ("pilots", "lost_after", "0", "must be a number of seconds above 0"),
    ("pilots", "warn_before", "-1", "must be a number of seconds, 0 or more"),
    ("vms", "overhead_mb", "-1", "must be a whole number of MB, 0 or more"),
    ("images", "endorser_keys", "endorsers", "must be an absolute path"),
    ("images", "store_dir", "images", "must be an absolute path"),
    ("images", "fetch_timeout", "0", "must be a number of seconds above 0"),
    ("images", "ca_file", "ca.pem", "must be an absolute path"),
    ("provider", "name", "lsf", "must be one of local, pbs, sge, slurm"),
    ("provider", "command_timeout", "0", "must be a number of seconds above 0"),
    ("provider", "use_pbs_python", "maybe", "must be yes or no"),
    ("provider", "qstat_history", "sometimes", "must be one of"),
    ("provider", "env", "SLURM_CONF", "is not KEY=VALUE"),
    ("provider", "state_dir", "local", "must be an absolute path"),
    ("provider", "cores_per_node", "0", "must be a whole number from 1 to 100000"),
    ("provider", "memory_per_node", "4G", "must be a whole number of MB (0: no memory request), or empty"),
    ("provider", "walltime_padding", "-5", "must be a number of seconds, 0 or more"),
    ("provider", "queue", "two words", "must be one word"),
    ("provider", "account", "a;b", "must be one word"),
    ("provider", "job_name_prefix", "1wp", "must start with a letter"),
    ("provider", "output_dir", "jobs", "must be an absolute path"),
    ("provider", "output_dir", "/var/log/job%s", "must not hold whitespace, '%', ':' or '#'"),
    ("provider", "sudo", "sudo", "must be an absolute path"),
    ("provider", "pilot_command", "workspace-pilot", "must be an absolute path"),
    ("provider", "launcher", "ssh", "must be one of"),
    ("provider", "parallel_environment", "two words", "must be one word"),
    ("provider", "extra_directives", "\n    #SBATCH --time=10", "conflicts with walltime_padding_s"),
    ("provider", "extra_directives", "\n    --exclusive\n    #PBS -l mem=1gb", "is a #PBS line (pbs)"),
    ("networks", "mode", "bridged", "must be one of none, private, site"),
    ("networks", "lease_range", "10.213.0.0", "give the prefix length too"),
    ("networks", "lease_range", "10.213.0.1/16", "is not an IPv4 network with its prefix"),
    ("networks", "lease_prefix", "31", "must be a prefix length from 8 to 30"),
    ("networks", "vxlan_port", "0", "must be a TCP port number"),
    ("networks", "vni_base", "0", "must be a VXLAN id from 1 to 16777215"),
    ("networks", "site_network", "192.0.2.0/33", "is not an IPv4 network"),
    ("networks", "site_gateway", "192.0.2", "is not an IPv4 address"),
    ("networks", "site_pool", "192.0.2.10-192.0.2.20, 192.0.2.15-192.0.2.30", "ranges overlap at 192.0.2.15"),
    ("networks", "site_bridge", "a-bridge-name-too-long", "is not an interface name"),
    ("networks", "domain", "vm_internal", "is not a DNS domain"),
    ("networks", "forward_ports", "22-80", "ports must run upward within 1024-65535"),
    ("metrics", "listen", "everywhere", "must be api, off, or HOST:PORT"),
    ("metrics", "listen", "127.0.0.1:99999", "must be a number from 1 to 65535"),
    ("metrics", "listen", "bad host:9780", "must be an IP address or a host name"),
    ("operators", "accounts_file", "operators", "must be an absolute path"),
    ("operators", "realm", "", "must be non-empty"),
    ("client", "url", "127.0.0.1:8780", "must be an http:// or https:// URL with a host"),
    ("client", "user", "", "must be a user name"),
    ("client", "secret_file", "~/.secret", "must be an absolute path"),
    ("client", "ca_file", "ca.pem", "must be an absolute path"),
    ("client", "timeout", "forever", "must be a number of seconds above 0"),
]


@pytest.mark.parametrize("section,option,value,expected", BAD_VALUES, ids=[f"{s}.{o}={v}" for s, o, v, _ in BAD_VALUES])
def test_each_bad_value_is_one_line_naming_file_section_and_option(tmp_path, section, option, value, expected):
    name = "name = slurm\n" if option == "extra_directives" else ""
    path = write(tmp_path, f"[{section}]\n{name}{option} = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert len(caught.value.problems) == 1, caught.value.problems
    line = caught.value.problems[0]
    assert line.startswith(f"{path}: [{section}] {option} = "), line
    assert expected in line
    assert "\n" not in line


def test_every_option_of_the_schema_has_a_bad_value_case():
    covered = {(section, option) for section, option, _, _ in BAD_VALUES}
    known = {(section, option) for section, options in SCHEMA.items() for option in options}
    assert known == covered


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(
        tmp_path,
        "[service]\nport = x\nlog_level = loud\n[pilots]\ngrace = -1\n[provider]\nname = lsf\ncolour = blue\n"
        "[nonsense]\na = b\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = caught.value.problems
    assert len(problems) == 6, problems
    assert problems[0].startswith(f"{path}: [service] port = 'x': ")
    assert problems[1].startswith(f"{path}: [service] log_level = 'loud': ")
    assert problems[2].startswith(f"{path}: [pilots] grace = '-1': ")
    assert problems[3].startswith(f"{path}: [provider] name = 'lsf': ")
    assert problems[4].startswith(f"{path}: [provider] unknown option 'colour': known are name, ")
    assert problems[5].startswith(f"{path}: unknown section [nonsense]: known are [service], [pilots]")


@pytest.mark.parametrize("text,expected", [
    ("mode = private\nlease_range = 10.0.0.0/8\nsite_network = 10.1.0.0/24\n",
     "[networks] lease_range: 10.0.0.0/8 overlaps site_network 10.1.0.0/24: a lease's VM could take a site address"),
    ("mode = private\nlease_range = 10.213.0.0/24\nlease_prefix = 16\n",
     "[networks] lease_prefix: 16 must be longer than lease_range's /24 and at most 29"),
    ("mode = private\nlease_range = 10.0.0.0/8\nlease_prefix = 29\nvni_base = 16000000\n",
     "[networks] vni_base: 16000000 + 2097152 subnets passes the VXLAN limit 16777215: lower it"),
    ("mode = site\nsite_network = 192.0.2.0/24\nsite_gateway = 192.0.2.1\nsite_bridge = br0\n",
     "[networks] site_pool: needed when mode = site"),
    ("mode = site\nsite_network = 192.0.2.0/24\nsite_gateway = 192.0.2.1\nsite_bridge = br0\n"
     "site_pool = 192.0.2.200-192.0.3.10\n", "[networks] site_pool: 192.0.2.200-192.0.3.10 is not inside site_network"),
    ("mode = site\nsite_network = 192.0.2.0/24\nsite_gateway = 192.0.2.1\nsite_bridge = br0\n"
     "site_pool = 192.0.2.1-192.0.2.10\n", "[networks] site_pool: 192.0.2.1-192.0.2.10 holds the gateway 192.0.2.1"),
    ("mode = site\nsite_network = 192.0.2.0/24\nsite_gateway = 192.0.3.1\nsite_bridge = br0\n"
     "site_pool = 192.0.2.10-192.0.2.20\n", "[networks] site_gateway: 192.0.3.1 is not a host address of site_network"),
])
def test_pools_that_overlap_or_do_not_fit_are_one_line_each(tmp_path, text, expected):
    path = write(tmp_path, "[networks]\n" + text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert len(caught.value.problems) == 1, caught.value.problems
    assert caught.value.problems[0].startswith(f"{path}: {expected}")


def test_the_networks_section_becomes_the_plan_the_store_allocates_from(tmp_path):
    path = write(tmp_path, "[networks]\nmode = site\nsite_network = 192.0.2.0/24\nsite_gateway = 192.0.2.1\n"
                           "site_bridge = br0\nsite_pool = 192.0.2.100-192.0.2.101, 192.0.2.50\nforward_ports =\n")
    plan = load_config(path).network_plan()
    assert [str(a) for a in plan.site_addresses()] == ["192.0.2.50", "192.0.2.100", "192.0.2.101"]
    assert plan.forward_ports is None and plan.problems() == []


def test_not_an_ini_file_is_one_line(tmp_path):
    path = write(tmp_path, "port = 8780\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}: not a valid INI file: File contains no section headers."]


def test_a_wildcard_listener_needs_a_contact(tmp_path):
    path = write(tmp_path, "[service]\nlisten_host = 0.0.0.0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path}: [service] contact: needed when listen_host = 0.0.0.0 (the pilots cannot reach a wildcard "
        "address): set the URL the nodes reach this service at"
    ]


def test_the_two_realms_must_differ(tmp_path):
    path = write(tmp_path, "[operators]\nrealm = workspace-pilot\n")
    with pytest.raises(ConfigError, match=r"\[operators\] realm: must differ from \[service\] realm"):
        load_config(path)


def test_a_shared_port_needs_a_shared_store(tmp_path):
    path = write(tmp_path, "[service]\nreuse_port = yes\n")
    with pytest.raises(ConfigError, match=r"\[service\] reuse_port: needs a postgresql:// store"):
        load_config(path)
    shared = load_config(write(tmp_path, "[service]\nreuse_port = yes\nstore = postgresql://wp@db/leases\n"))
    assert shared.reuse_port and shared.store == "postgresql://wp@db/leases"


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, "[client]\nurl = http://127.0.0.1:1\n")
    assert load_config(path, client_url="http://127.0.0.1:2").service_url == "http://127.0.0.1:2"


# -- the secrets serve reads ----------------------------------------------------------------------


def test_serve_reads_the_site_key_and_the_operators_accounts(tmp_path):
    accounts = "# operators\n\n" + ha1_line("alice", "a-secret") + ha1_line("bob", "b-secret")
    config = load_config(write(tmp_path, serve_files(tmp_path, accounts=accounts)), serve=True)
    assert config.site_key == SITE_KEY
    node1 = config.node_accounts().get("node1")
    assert node1.ha1_sha256 == digest_ha1("node1", "workspace-pilot", node_key(SITE_KEY, "node1"))
    operators = config.operator_accounts()
    assert sorted(operators) == ["alice", "bob"]
    assert operators["alice"].ha1_sha256 == digest_ha1("alice", "workspace-lease", "a-secret")
    assert SITE_KEY not in repr(config)


@pytest.mark.parametrize("option", ["user", "secret_file"])
def test_the_shared_pilot_secret_options_of_old_configs_are_one_line_saying_what_replaced_them(tmp_path, option):
    path = write(tmp_path, f"[pilots]\n{option} = /etc/workspace-pilot/pilots.secret\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (problem,) = caught.value.problems
    assert f"[pilots] {option} is gone" in problem and "site_key_file" in problem and "site-key" in problem


def test_a_site_key_file_that_holds_no_key_is_refused(tmp_path):
    text = serve_files(tmp_path)
    private(tmp_path, "site.key", "pilot-secret\n")
    with pytest.raises(ConfigError, match=r"site_key_file .*: does not hold a site key .*workspace-lease site-key"):
        load_config(write(tmp_path, text), serve=True)


def test_the_operator_commands_do_not_read_the_secrets(tmp_path):
    path = write(tmp_path, serve_files(tmp_path, secret_mode=0o000, accounts_mode=0o644))
    config = load_config(path)  # not for serve: the files are not opened
    assert config.site_key is None and config.operators == ()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644], ids=oct)
def test_a_secret_file_others_can_read_is_refused(tmp_path, mode):
    path = write(tmp_path, serve_files(tmp_path, secret_mode=mode))
    secret = tmp_path / "site.key"
    with pytest.raises(ConfigError) as caught:
        load_config(path, serve=True)
    assert caught.value.problems == [
        f"{path}: [pilots] site_key_file {secret}: mode {mode:04o} lets group or others at it: chmod 600 {secret}"
    ]


def test_an_accounts_file_others_can_read_is_refused(tmp_path):
    path = write(tmp_path, serve_files(tmp_path, accounts_mode=0o644))
    with pytest.raises(ConfigError, match=r"\[operators\] accounts_file .*: mode 0644 lets group or others at it"):
        load_config(path, serve=True)


def test_missing_secret_and_accounts_files_are_two_lines(tmp_path):
    path = write(
        tmp_path,
        f"[pilots]\nsite_key_file = {tmp_path}/none.key\n[operators]\naccounts_file = {tmp_path}/none.htdigest\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, serve=True)
    assert caught.value.problems == [
        f"{path}: [pilots] site_key_file {tmp_path}/none.key: No such file or directory: create it (mode 0600)",
        f"{path}: [operators] accounts_file {tmp_path}/none.htdigest: No such file or directory: create it (mode 0600)",
    ]


def test_an_empty_secret_is_refused(tmp_path):
    text = serve_files(tmp_path)
    private(tmp_path, "site.key", "\n")
    with pytest.raises(ConfigError, match=r"site_key_file .*: is empty: put the secret in it"):
        load_config(write(tmp_path, text), serve=True)


@pytest.mark.parametrize("line,expected", [
    ("alice:workspace-lease", "line 1: not user:realm:HA1"),
    ("alice:workspace-pilot:" + "0" * 64, "line 1: realm 'workspace-pilot' is not the operator realm"),
    ("alice:workspace-lease:" + "0" * 32, "line 1: HA1 must be 64 hex digits"),
    ("al ice:workspace-lease:" + "0" * 64, "line 1: user 'al ice' must be a user name"),
    ("", "holds no account"),
])
def test_bad_accounts_lines_are_named(tmp_path, line, expected):
    path = private(tmp_path, "ops", line + "\n")
    with pytest.raises(ValueError, match=re.escape(expected)):
        read_accounts_file(path, "workspace-lease")


def test_a_user_twice_in_the_accounts_file_is_refused(tmp_path):
    path = private(tmp_path, "ops", ha1_line("alice", "x") + ha1_line("alice", "y"))
    with pytest.raises(ValueError, match="line 2: user 'alice' appears twice"):
        read_accounts_file(path, "workspace-lease")


def test_serve_reports_file_problems_and_provider_problems_together(tmp_path):
    text = serve_files(tmp_path, secret_mode=0o644, accounts="")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, serve=True)
    assert [p.split(": ", 2)[1].split(" ")[0] for p in caught.value.problems] == ["[pilots]", "[operators]"]


# -- the example file -----------------------------------------------------------------------------


def example_values() -> dict[tuple[str, str], str]:
    """``(section, option) -> value`` of every ``#option = value`` line (and its ``#    ...`` continuations)."""
    found: dict[tuple[str, str], str] = {}
    section = None
    last = None
    for line in open(EXAMPLE, encoding="utf-8").read().splitlines():
        header = re.fullmatch(r"\[(\w+)\]", line)
        if header:
            section, last = header.group(1), None
            continue
        option = re.fullmatch(r"#?(\w+) =(?: (.*))?", line)
        if option:
            key = (section, option.group(1))
            assert key not in found, f"[{section}] {option.group(1)} is shown twice in the example"
            found[key] = option.group(2) or ""
            last = key
            continue
        continuation = re.fullmatch(r"#?    (\S.*)", line)
        if continuation and last is not None:
            found[last] += "\n" + continuation.group(1)
            continue
        last = None
    return found


def test_example_documents_every_option_in_its_section():
    assert set(example_values()) == {(s, o) for s, options in SCHEMA.items() for o in options}


def test_example_defaults_are_the_codes_defaults(tmp_path):
    """Every value the example shows as a default is what the code uses when the option is unset.

    Options whose default is None or empty ("no default") show an example
    value instead; that value must at least be valid.
    """
    defaults = {field.name: field.default for field in dataclasses.fields(ServiceConfig)}
    lines: dict[str, list[str]] = {}
    compared = []
    for (section, option), value in example_values().items():
        field, parse = SCHEMA[section][option]
        if defaults[field] in (None, ()):
            parse(value.strip())  # an example value, not a default: it must parse
            continue
        lines.setdefault(section, []).append(f"{option} = {value}")
        compared.append((section, option, field))
    assert len(compared) > 30
    text = "".join(f"[{section}]\n" + "\n".join(options) + "\n" for section, options in lines.items())
    config = load_config(write(tmp_path, text))
    for section, option, field in compared:
        assert getattr(config, field) == defaults[field], (
            f"[{section}] {option}: the example says {getattr(config, field)!r}, the code's default is "
            f"{defaults[field]!r}"
        )
    assert config == ServiceConfig()


def test_example_loads_as_shipped(tmp_path):
    """As shipped the file sets one option, on purpose: the operators' API apart from the pilots' port."""
    text = open(EXAMPLE, encoding="utf-8").read()
    config = load_config(write(tmp_path, text))
    assert config == dataclasses.replace(ServiceConfig(), operator_listen="127.0.0.1:8781")
    assert config.service_url == "http://127.0.0.1:8781"


def test_example_with_every_example_value_loads(tmp_path):
    """Uncommenting every line (defaults and examples alike) gives a valid file."""
    text = re.sub(r"(?m)^#(\w+ =|    )", r"\1", open(EXAMPLE, encoding="utf-8").read())
    config = load_config(write(tmp_path, text))
    assert config.extra_directives == ("#SBATCH --exclusive",)
    assert config.env == (("SLURM_CONF", "/etc/slurm/slurm.conf"),)
    assert config.contact == "https://workspace.example.org:8780"


def test_a_tls_key_without_its_certificate_is_one_line(tmp_path):
    path = write(tmp_path, "[service]\ntls_key_file = /etc/workspace-pilot/service.key\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}: [service] tls_key_file: needs tls_cert_file (the certificate it belongs to)"]


def test_with_a_certificate_the_urls_are_https(tmp_path):
    config = load_config(write(tmp_path, "[service]\ntls_cert_file = /etc/workspace-pilot/service.pem\n"))
    assert (config.listen_url, config.pilot_contact, config.service_url) == ("https://127.0.0.1:8780",) * 3
