"""``workspace-lease``: the service (``serve``) and its operator commands, each a real process.

The service runs as ``python -m service_adapter serve`` with the ``local``
provider (pilot processes standing for nodes, reserving real hugepages), a
SQLite store and its log under the test's directory, on a free loopback port.
The operator commands run as real processes too, and ``curl --digest`` and
``requests`` check the API and the realms from outside.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time

import pytest
import requests
from requests.auth import HTTPDigestAuth

from workspace_common.protocol import NOTIFICATIONS_PATH, SIGNATURE_HEADER, sign
from tests.support.pool import pool_pages
from tests.support.ports import free_port
from tests.support.site import CLI, OPERATOR, OPERATOR_REALM, OPERATOR_SECRET, PILOT_REALM, Site, private, reserve_then_kill_serve, serving, site, start_serve, stop_process


@dataclasses.dataclass(frozen=True)
class Tls:
    """A CA made for the test, and a certificate it signed for 127.0.0.1 (with its key)."""

    ca: str
    cert: str
    key: str

    @classmethod
    def make(cls, directory) -> "Tls":
        """Make them with the openssl command line (EC P-256: fast), valid for one day."""
        d = str(directory)

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        openssl("req", "-x509", *ec, "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem", "-days", "1",
                "-subj", "/CN=workspace-pilot test CA")
        openssl("req", *ec, "-keyout", f"{d}/service.key", "-out", f"{d}/service.csr", "-subj", "/CN=127.0.0.1")
        with open(f"{d}/san.ext", "w", encoding="ascii") as handle:
            handle.write("subjectAltName=IP:127.0.0.1\n")
        openssl("x509", "-req", "-in", f"{d}/service.csr", "-CA", f"{d}/ca.pem", "-CAkey", f"{d}/ca.key",
                "-CAcreateserial", "-out", f"{d}/service.pem", "-days", "1", "-extfile", f"{d}/san.ext")
        os.chmod(f"{d}/service.key", 0o600)
        return cls(f"{d}/ca.pem", f"{d}/service.pem", f"{d}/service.key")


@pytest.fixture(scope="module")
def idle(tmp_path_factory):
    """One service with no lease, shared by the tests that only talk to it."""
    site = Site(tmp_path_factory.mktemp("idle"))
    with serving(site):
        yield site


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# -- a whole lease through the commands -------------------------------------------------------------


def test_reserve_list_show_release_usage(site, hugepages):
    start_pages = hugepages
    with serving(site):
        t0 = time.monotonic()
        reserved = site.cli("reserve", "--nodes", "2", "--memory", "32", "--duration", "30", "--json", "--wait")
        assert reserved.returncode == 0, reserved.stderr
        lease = json.loads(reserved.stdout)
        lease_id = lease["id"]
        assert lease["state"] == "ready"
        assert (lease["nodes"], lease["memory_mb"], lease["owner"]) == (2, 32, OPERATOR)
        assert pool_pages() == start_pages + 2 * 16  # two local "nodes" x 32 MB of 2 MiB pages
        ready_s = time.monotonic() - t0

        listed = site.cli("list")
        assert listed.returncode == 0, listed.stderr
        header, *rows = listed.stdout.splitlines()
        assert header.split()[:3] == ["LEASE", "STATE", "OWNER"]
        assert [row.split()[:3] for row in rows] == [[lease_id, "ready", OPERATOR]]
        listed_json = site.cli("list", "--json", "--state", "ready,pending", "--owner", OPERATOR)
        assert [entry["id"] for entry in json.loads(listed_json.stdout)["leases"]] == [lease_id]
        assert json.loads(site.cli("list", "--json", "--state", "released").stdout) == {"leases": []}

        shown = site.cli("show", lease_id)
        assert shown.returncode == 0, shown.stderr
        assert "id" in shown.stdout and lease_id in shown.stdout and "ready" in shown.stdout

        released = site.cli("release", lease_id, "--wait", "--json")
        assert released.returncode == 0, released.stderr
        assert json.loads(released.stdout)["state"] == "released"
        assert pool_pages() == start_pages

        shown_json = json.loads(site.cli("show", lease_id, "--json").stdout)
        api = site.api("GET", f"/leases/{lease_id}")
        assert api.status_code == 200
        assert shown_json == api.json()  # --json prints exactly the API's answer
        assert json.loads(site.cli("list", "--json").stdout) == site.api("GET", "/leases").json()

        again = site.cli("release", lease_id, "--json")  # releasing an ended lease is no error
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["state"] == "released"

        usage = site.cli("usage", "--json", "--owner", OPERATOR)
        assert usage.returncode == 0, usage.stderr
        used = json.loads(usage.stdout)
        assert used == site.api("GET", f"/usage?owner={OPERATOR}").json()
        assert used["node_seconds"] > 0 and used["mb_seconds"] >= 32 * used["node_seconds"] * 0.99
        assert used["leases"] == 1
        assert json.loads(site.cli("usage", "--json", "--owner", "bob").stdout)["node_seconds"] == 0
        text = site.cli("usage")
        assert text.returncode == 0 and "node-seconds" in one_line(text.stdout)
    log = site.log_file.read_text()
    assert lease_id in log and "released" in log
    print(f"ready after {ready_s:.2f} s")


def test_service_restart_keeps_the_lease(site, hugepages):
    """SIGKILL the service while a lease is ready; a new serve on the same store still knows and ends it."""
    start_pages = hugepages
    lease_id = reserve_then_kill_serve(site, start_pages)
    assert pool_pages() == start_pages + 32  # the pilots outlive the service

    down = site.cli("show", lease_id)
    assert down.returncode == 4, down.stderr

    with serving(site):
        shown = site.cli("show", lease_id, "--json")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["state"] == "ready"
        released = site.cli("release", lease_id, "--wait", "--json")
        assert released.returncode == 0, released.stderr + released.stdout
        assert json.loads(released.stdout)["state"] == "released"
        # "released", not "expired": the new service cancelled the job the old one submitted,
        # it did not run out at the pilots' own 30 s deadline.
        assert pool_pages() == start_pages
        assert site.pilot_pids() == []


def test_sigterm_stops_serve_cleanly_and_the_store_survives(site):
    process = start_serve(site)
    assert stop_process(process) == 0
    assert "stopping (signal)" in site.log_file.read_text()
    with serving(site):
        listed = site.cli("list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == {"leases": []}


# -- errors: one line and a distinct exit code --------------------------------------------------------


def test_wrong_secret_is_refused_with_exit_5(idle, tmp_path):
    wrong = private(tmp_path / "wrong.secret", "not-the-secret\n")
    result = idle.cli("list", "--secret-file", wrong)
    assert result.returncode == 5
    line = one_line(result.stderr)
    assert line.startswith("workspace-lease: GET ") and " 401 " in line
    # The environment variable is the secret file too (below the command line, above the config file).
    assert idle.cli("list", env={"WORKSPACE_LEASE_SECRET_FILE": wrong}).returncode == 5
    unknown_user = idle.cli("list", "--user", "mallory")
    assert unknown_user.returncode == 5


def test_unreachable_service_is_exit_4(site):
    result = site.cli("list", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 4
    assert "cannot reach the service at" in one_line(result.stderr)


def test_unknown_lease_is_exit_6(idle):
    result = idle.cli("show", "no-such-lease")
    assert result.returncode == 6
    assert "404" in one_line(result.stderr)
    assert idle.cli("release", "no-such-lease").returncode == 6
    assert idle.cli("vm", "list", "no-such-lease").returncode == 6
    assert idle.cli("vm", "stop", "no-such-lease", "vm1").returncode == 6
    started = idle.cli("vm", "start", "no-such-lease", "--name", "vm1", "--memory", "64",
                       "--kernel", "/img/vmlinuz", "--kernel-sha256", "0" * 64)
    assert started.returncode == 6
    assert "404 no lease 'no-such-lease'" in one_line(started.stderr)


@pytest.mark.parametrize("args", [
    ("reserve", "--nodes", "0", "--memory", "32", "--duration", "30"),
    ("reserve", "--nodes", "two", "--memory", "32", "--duration", "30"),
    ("reserve", "--memory", "32", "--duration", "30"),
    ("show",),
    ("frobnicate",),
    ("list", "--url", "localhost:8780"),
    ("vm",),
    ("vm", "start"),
    ("vm", "start", "lease-1"),
    ("vm", "start", "lease-1", "--name", "vm1", "--memory", "64", "--image", "/img/guest.qcow2"),
    ("vm", "start", "lease-1", "--spec", "/nonexistent/vms.json"),
    ("vm", "stop", "lease-1"),
    ("vm", "stop", "lease-1", "bad/name"),
    ("vm", "list"),
])
def test_bad_arguments_are_exit_2(site, args):
    result = site.cli(*args, config=False)
    assert result.returncode == 2
    assert "(see --help)" in one_line(result.stderr)


def test_missing_credentials_and_bad_secret_file_mode_are_exit_3(site, tmp_path):
    no_user = site.cli("list", "--url", site.url, config=False)
    assert no_user.returncode == 3
    assert "no operator user" in no_user.stderr
    loose = tmp_path / "loose.secret"
    loose.write_text("x\n")
    os.chmod(loose, 0o644)
    result = site.cli("list", "--secret-file", str(loose))
    assert result.returncode == 3
    assert one_line(result.stderr) == (
        f"workspace-lease: config error: secret file {loose}: mode 0644 lets group or others at it: chmod 600 {loose}"
    )


def test_serve_with_a_bad_config_is_exit_3_one_line_per_problem(site, tmp_path):
    bad = tmp_path / "bad.conf"
    bad.write_text("[service]\nport = http\n[pilots]\ngrace = soon\n")
    result = subprocess.run([*CLI, "serve", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 2
    assert lines[0].startswith(f"workspace-lease: config error: {bad}: [service] port = 'http': ")
    assert lines[1].startswith(f"workspace-lease: config error: {bad}: [pilots] grace = 'soon': ")


def test_serve_on_a_busy_port_is_exit_3(idle, tmp_path):
    other = Site(tmp_path)
    text = open(other.config).read().replace(f"port = {other.port}", f"port = {idle.port}")
    with open(other.config, "w") as handle:
        handle.write(text)
    result = subprocess.run([*CLI, "serve", "--config", other.config], capture_output=True, text=True, timeout=30)
    assert result.returncode == 3
    assert f"cannot listen on 127.0.0.1:{idle.port}" in one_line(result.stderr)


def test_bad_requests_get_400_with_one_line(idle):
    for body in (b"not json", b"[1]", b'{"nodes": 1}', b'{"nodes": true, "memory_mb": 1, "duration_s": 1}',
                 b'{"nodes": 1, "memory_mb": 1, "duration_s": 0}', b'{"nodes": 1, "memory_mb": 1, "duration_s": 1, "x": 1}'):
        response = idle.api("POST", "/leases", data=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, body
        assert set(response.json()) == {"error"} and "\n" not in response.json()["error"]
    assert idle.api("GET", "/leases?state=sleeping").status_code == 400
    too_big = idle.api("POST", "/leases", data=b" " * 5000, headers={"Content-Type": "application/json"})
    assert too_big.status_code == 413
    assert idle.api("GET", "/nothing-here").status_code == 404
    no_spec = idle.api("POST", "/leases/no-such-lease/vms", json={"vms": [{"name": "vm1"}]})
    assert no_spec.status_code == 400 and "vm.memory_mb" in no_spec.json()["error"]
    assert idle.api("POST", "/leases/no-such-lease/vms", json={"vms": [{
        "name": "vm1", "memory_mb": 64, "boot": {"kernel": {"path": "/k", "sha256": "0" * 64}}}]}).status_code == 404
    assert idle.api("DELETE", "/leases").status_code == 405


# -- the two realms: neither side's credentials work on the other's endpoints --------------------


def test_pilot_credentials_are_refused_by_the_api(idle):
    response = idle.api("GET", "/leases", user="node1", secret=idle.nodes.node_key("node1"))
    assert response.status_code == 401
    assert f'realm="{OPERATOR_REALM}"' in response.headers["WWW-Authenticate"]
    assert idle.api("GET", "/leases").status_code == 200
    assert requests.get(f"{idle.url}/api/v1/leases", timeout=10).status_code == 401  # no credentials at all


def test_operator_credentials_are_refused_by_the_notification_endpoint(idle):
    body = b'{"version": 2}'
    for user, secret in ((OPERATOR, OPERATOR_SECRET), ("node1", idle.nodes.node_key("node1"))):
        response = requests.post(
            idle.url + NOTIFICATIONS_PATH, data=body, auth=HTTPDigestAuth(user, secret),
            headers={SIGNATURE_HEADER: sign("0" * 64, body)}, timeout=10,
        )
        if user == OPERATOR:
            assert response.status_code == 401
            assert f'realm="{PILOT_REALM}"' in response.headers["WWW-Authenticate"]
        else:
            assert response.status_code == 400  # authenticated; only then is the body found wanting


def test_curl_digest_sha256_against_the_api(idle, tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (scripts/bootstrap.sh installs it)")

    def curl(secret: str, *extra: str) -> tuple[int, str]:
        out = tmp_path / "out.json"
        result = subprocess.run(
            ["curl", "--silent", "--show-error", "--digest", "--user", f"{OPERATOR}:{secret}",
             "--output", str(out), "--write-out", "%{http_code}", *extra],
            capture_output=True, text=True, timeout=30, check=True,
        )
        return int(result.stdout), out.read_text()

    status, body = curl(OPERATOR_SECRET, f"{idle.url}/api/v1/leases?owner={OPERATOR}")
    assert (status, json.loads(body)) == (200, {"leases": []})
    status, body = curl(OPERATOR_SECRET, f"{idle.url}/api/v1/usage")
    assert status == 200 and json.loads(body)["leases"] == 0
    status, _ = curl("wrong", f"{idle.url}/api/v1/leases")
    assert status == 401
    status, body = curl(
        OPERATOR_SECRET, "--header", "Content-Type: application/json", "--data-binary", '{"nodes": 0}',
        f"{idle.url}/api/v1/leases",
    )
    assert status == 400 and "nodes" in json.loads(body)["error"]


@pytest.mark.parametrize("args", [("list",), ("usage", "--json"), ("--help",)])
def test_a_closed_output_pipe_ends_the_cli_quietly(idle, args):
    """``workspace-lease list | head``: the reader is gone before the first line; no traceback, exit 141 (or 0)."""
    process = subprocess.Popen([*CLI, *args, "--config", idle.config], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    _, err = process.communicate(timeout=60)
    assert err == b""
    assert process.returncode in (0, 141)


def test_help_explains_commands_and_exit_codes():
    result = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for word in ("serve", "reserve", "release", "list", "show", "usage", "vm", "demo"):
        assert word in result.stdout
    for code in range(9):
        assert f"\n  {code}  " in result.stdout
    assert "409" in result.stdout


def test_vm_help_explains_every_option():
    result = subprocess.run([*CLI, "vm", "start", "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for option in ("--spec", "--name", "--memory", "--vcpus", "--image", "--image-sha256", "--readonly", "--kernel",
                   "--kernel-sha256", "--initrd", "--initrd-sha256", "--cmdline", "--network", "--console-log",
                   "--host", "--wait", "--json"):
        assert f"  {option} " in result.stdout, option
    assert "\n  8  " in result.stdout
    stop = subprocess.run([*CLI, "vm", "stop", "--help"], capture_output=True, text=True, timeout=30)
    assert stop.returncode == 0 and "--force" in stop.stdout and "--wait SECONDS" in stop.stdout


# -- keys: site-key and node-key ---------------------------------------------------------------------


def test_site_key_and_node_key_make_the_keys_a_node_installs(tmp_path):
    from workspace_common.protocol import node_key

    site_key_file = tmp_path / "site.key"
    made = subprocess.run([*CLI, "site-key", "--output", str(site_key_file)], capture_output=True, text=True,
                          timeout=60)
    assert made.returncode == 0, made.stderr
    assert oct(site_key_file.stat().st_mode & 0o777) == "0o600"
    site_key = site_key_file.read_text().strip()
    again = subprocess.run([*CLI, "site-key", "--output", str(site_key_file)], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 8 and "a site key is never replaced" in again.stderr
    assert site_key_file.read_text().strip() == site_key  # untouched

    printed = subprocess.run([*CLI, "node-key", "node7", "--site-key-file", str(site_key_file)],
                             capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip() == node_key(site_key, "node7")
    node_key_file = tmp_path / "node7.key"
    written = subprocess.run([*CLI, "node-key", "node7", "--site-key-file", str(site_key_file),
                              "--output", str(node_key_file)], capture_output=True, text=True, timeout=60)
    assert written.returncode == 0, written.stderr
    assert node_key_file.read_text().strip() == node_key(site_key, "node7")
    assert oct(node_key_file.stat().st_mode & 0o777) == "0o600"


def test_node_key_refuses_a_site_key_others_can_read_and_a_bad_host_in_one_line(tmp_path):
    loose = tmp_path / "site.key"
    loose.write_text("5" * 64 + "\n")
    os.chmod(loose, 0o644)
    result = subprocess.run([*CLI, "node-key", "node7", "--site-key-file", str(loose)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 3 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "mode 0644 lets group or others at it" in line
    bad = subprocess.run([*CLI, "node-key", "no;de", "--site-key-file", str(loose)], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


# -- https ---------------------------------------------------------------------------------------------


def test_an_https_service_leases_end_to_end_with_the_pilots_checking_its_ca(tmp_path, hugepages):
    tls = Tls.make(tmp_path)
    site = Site(tmp_path, tls=tls)
    with serving(site):
        reserved = site.cli("reserve", "--nodes", "2", "--memory", "32", "--duration", "60", "--json", "--wait")
        assert reserved.returncode == 0, reserved.stderr
        lease = json.loads(reserved.stdout)
        assert lease["state"] == "ready"  # both pilots reached the service over https, checking its certificate
        assert pool_pages() == hugepages + 2 * 16
        # Without the site's CA a client cannot talk to it; plain http is no way round.
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{site.url}/api/v1/leases", timeout=10)
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{site.port}/api/v1/leases", timeout=10)
        released = site.cli("release", lease["id"], "--wait", "--json")
        assert released.returncode == 0, released.stderr
        assert json.loads(released.stdout)["state"] == "released"
    assert pool_pages() == hugepages


def test_a_pilot_that_does_not_trust_the_services_certificate_gives_the_memory_back(tmp_path, hugepages):
    tls = Tls.make(tmp_path)
    site = Site(tmp_path, tls=tls)
    other = tmp_path / "other"
    other.mkdir()
    stranger = Tls.make(other)  # a CA that did not sign the service's certificate
    text = open(site.pilot_config, encoding="utf-8").read().replace(f"ca_file = {tls.ca}", f"ca_file = {stranger.ca}")
    with open(site.pilot_config, "w", encoding="utf-8") as handle:
        handle.write(text)
    with serving(site):
        reserved = site.cli("reserve", "--nodes", "1", "--memory", "32", "--duration", "60", "--json")
        assert reserved.returncode == 0, reserved.stderr
        lease_id = json.loads(reserved.stdout)["id"]
        log = site.root / "logs"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("CERTIFICATE_VERIFY_FAILED" in p.read_text()
                                                      for p in log.glob("*.log")):
            time.sleep(0.1)
        assert any("CERTIFICATE_VERIFY_FAILED" in p.read_text() for p in log.glob("*.log"))
        assert site.api("GET", f"/leases/{lease_id}").json()["state"] in ("pending", "failed", "missing")
    assert pool_pages() == hugepages
