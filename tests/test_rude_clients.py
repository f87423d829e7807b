"""Slow, rude and hostile clients against a real ``workspace-lease serve``: a bounded cost, a 4xx, and the others served.

Each test runs the service as a real process (the ``local`` provider, a
SQLite store and its log under the test's directory) and attacks it from
raw sockets and ``requests`` on loopback addresses (127.0.0.x, so that
each attack is its own peer): half-sent and trickled requests, a flood of
idle connections under a 1024 open-file limit, deeply nested JSON, lone
surrogates, junk headers by the hundred, and text made to forge log
lines. Then it checks what an admin depends on: the service still answers
a real operator and a real pilot, the store is unchanged, and the log
holds a few readable lines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import stat
import subprocess
import time

import pytest
import requests
from requests.auth import HTTPDigestAuth

from workspace_common.protocol import NOTIFICATIONS_PATH, SIGNATURE_HEADER, sign
from tests.support.site import OPERATOR, OPERATOR_REALM, OPERATOR_SECRET, PILOT_REALM, Site, serving
from tests.support.rawhttp import HANG_S, authorization, connect, log_text, open_file_limit, session, status_of

PILOT_USER = "node1"  # a node's digest account is its host name
#: A body signature of no one's: the bodies these tests send are refused before their signature counts.
PILOT_KEY = "0" * 64


def closed_by_server(sock: socket.socket, timeout: float = HANG_S) -> bytes | None:
    """Read until the server closes ``sock``; what it sent then, or None if it was still open after ``timeout``."""
    sock.settimeout(timeout)
    received = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk
    except ConnectionResetError:
        return received
    except socket.timeout:
        return None


def store_rows(site: Site) -> dict[str, list]:
    """Every row of every table of the service's store (read beside the running service, WAL)."""
    conn = sqlite3.connect(f"file:{site.store}?mode=ro", uri=True)
    try:
        tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {table: sorted(map(repr, conn.execute(f"SELECT * FROM {table}"))) for table in tables}
    finally:
        conn.close()


def log_lines_after(site: Site, mark: int) -> list[str]:
    """The log's lines after byte ``mark``."""
    with open(site.log_file, "rb") as handle:
        handle.seek(mark)
        return handle.read().decode(errors="replace").splitlines()


@pytest.fixture(scope="module")
def rude(tmp_path_factory):
    """One idle service (request timeout 2 s) for the tests that only attack it; started with umask 000."""
    site = Site(tmp_path_factory.mktemp("rude"), request_timeout=2)
    with serving(site, umask=0):
        yield site


def test_store_and_log_are_private_whatever_the_umask(rude):
    requests.get(rude.url + "/api/v1/leases", auth=HTTPDigestAuth(OPERATOR, OPERATOR_SECRET), timeout=10)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in rude.root.iterdir()
             if path.name.startswith(("service.sqlite", "service.log"))}
    assert modes == {"service.sqlite": 0o600, "service.sqlite-wal": 0o600, "service.sqlite-shm": 0o600,
                     "service.log": 0o640}


def test_half_sent_silent_and_trickled_requests_are_closed(rude):
    half = connect(rude)
    half.sendall(b"POST " + NOTIFICATIONS_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Le")
    silent = connect(rude)
    answered = connect(rude)  # kept alive after its answer, then quiet
    answered.sendall(b"GET /api/v1/leases HTTP/1.1\r\nHost: x\r\n\r\n")
    trickle = connect(rude)
    trickle.settimeout(0.2)
    sent, trickle_closed = 0, False
    head = b"GET /api/v1/leases HTTP/1.1\r\nHost: " + b"x" * 200 + b"\r\n\r\n"
    deadline = time.monotonic() + HANG_S
    while not trickle_closed and sent < len(head) and time.monotonic() < deadline:
        try:
            trickle.send(head[sent:sent + 1])  # one byte every 0.2 s: never a whole head within 2 s
            sent += 1
            trickle_closed = trickle.recv(1) == b""
        except socket.timeout:
            pass
        except (BrokenPipeError, ConnectionResetError):
            trickle_closed = True
    assert trickle_closed, f"a head trickled at 5 bytes/s was still open after {sent} bytes"
    assert closed_by_server(half) == b""  # closed without an answer
    assert closed_by_server(silent) == b""
    assert status_of(closed_by_server(answered)) == 401  # answered, then closed when quiet
    # Meanwhile everyone else is served.
    ok = requests.get(rude.url + "/api/v1/leases", auth=HTTPDigestAuth(OPERATOR, OPERATOR_SECRET), timeout=10)
    assert ok.status_code == 200


@pytest.mark.parametrize("target", ["api", "notification"])
def test_a_body_that_stops_coming_is_408_and_changes_nothing(rude, target):
    if target == "api":
        path = "/api/v1/leases"
        header = authorization(rude, "POST", path, user=OPERATOR, secret=OPERATOR_SECRET, realm=OPERATOR_REALM)
        extra = b""
    else:
        path = NOTIFICATIONS_PATH
        header = authorization(rude, "POST", path, user=PILOT_USER, secret=rude.nodes.node_key(PILOT_USER),
                               realm=PILOT_REALM)
        extra = f"{SIGNATURE_HEADER}: {sign(PILOT_KEY, b'x' * 100)}\r\n".encode()
    before = store_rows(rude)
    sock = connect(rude)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
                 f"Authorization: {header}\r\n".encode() + extra + b"\r\n" + b'{"nodes": 1')
    answer = closed_by_server(sock)
    assert answer is not None, "the service waited on for the rest of the body"
    assert status_of(answer) == 408
    assert b"did not arrive within 2 s" in answer
    assert store_rows(rude) == before


DEEP = b"[" * 2000 + b"]" * 2000


def notification_body(**fields) -> bytes:
    body = {"version": 2, "slot": "slot-1", "host": "node1", "state": "reserved", "code": 0, "seq": 1,
            "sent_at": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()), "memory_mb": 64}
    body.update(fields)
    return json.dumps(body).encode()  # ensure_ascii: a lone surrogate goes out as \ud800, which is valid JSON


@pytest.mark.parametrize("body, expected", [
    (DEEP, "nested deeper than 16"),
    (b'{"a":' * 40 + b"1" + b"}" * 40, "nested deeper than 16"),
    (notification_body(message="\ud800"), "lone surrogate"),
    (notification_body(message="ok", timings={"\udfff": "2026-01-01T00:00:00.000000Z"}), "lone surrogate"),
    (b'{"seq": NaN}', "NaN is not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_bad_json_in_a_notification_is_400_and_changes_nothing(rude, body, expected):
    pilot = session(user=PILOT_USER, secret=rude.nodes.node_key(PILOT_USER))
    before = store_rows(rude)
    answer = pilot.post(rude.url + NOTIFICATIONS_PATH, data=body, timeout=10,
                        headers={SIGNATURE_HEADER: sign(PILOT_KEY, body)})
    assert answer.status_code == 400, answer.text
    assert expected in answer.json()["detail"]
    assert store_rows(rude) == before


@pytest.mark.parametrize("path", [
    "/api/v1/leases", "/api/v1/leases/lease-1/vms", "/api/v1/leases/lease-1/release",
    "/api/v1/leases/lease-1/vms/vm1/stop",
])
@pytest.mark.parametrize("body, expected", [
    (DEEP, "nested deeper than 16"),
    (b'{"nodes": "\\ud800"}', "lone surrogate"),
    (b'{"\\udbff": 1}', "lone surrogate"),
])
def test_bad_json_on_the_operator_api_is_400_and_changes_nothing(rude, path, body, expected):
    operator = session(user=OPERATOR, secret=OPERATOR_SECRET)
    before = store_rows(rude)
    answer = operator.post(rude.url + path, data=body, timeout=10, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert expected in answer.json()["error"]
    assert store_rows(rude) == before


def test_refusals_are_one_line_per_peer_and_pilot_text_cannot_forge_a_line(rude):
    mark = rude.log_file.stat().st_size
    junk_header = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"\x01" * 8000 + b"\r\n\r\n"
    for _ in range(300):
        sock = connect(rude, "127.0.0.2")
        sock.sendall(junk_header)
        assert status_of(closed_by_server(sock)) == 400
    wrong = session("127.0.0.3", OPERATOR, "not-the-secret")
    statuses = [wrong.get(rude.url + "/api/v1/leases", timeout=10).status_code for _ in range(100)]
    assert statuses[0] == 401 and set(statuses) == {401, 429}  # refused, then held back (failed logins)
    forged = b'{"version": 2, "x\\n2026-12-01 00:00:00,000 INFO [1] service_adapter.server: \\u001b[2Jall good": 1}'
    pilot = session("127.0.0.4", PILOT_USER, rude.nodes.node_key(PILOT_USER))
    for _ in range(100):
        answer = pilot.post(rude.url + NOTIFICATIONS_PATH, data=forged, timeout=10,
                            headers={SIGNATURE_HEADER: sign(PILOT_KEY, forged)})
        assert answer.status_code == 400
    lines = log_lines_after(rude, mark)
    refused = [line for line in lines if "service_adapter.refused" in line]
    assert len(refused) == 3, lines  # one per peer: 500 refusals in all
    assert "refused 127.0.0.2: malformed HTTP request (BadHttpMessage" in refused[0]
    assert "refused 127.0.0.3: API GET /api/v1/leases:" in refused[1]
    assert "refused 127.0.0.4: notification: missing field(s)" in refused[2]
    assert not any("Traceback" in line or "Error handling request" in line for line in lines)
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", line) for line in lines), lines
    assert all(line.isprintable() for line in lines)
    assert sum(len(line) + 1 for line in lines) < 4096  # 500 refusals: a few lines, not 16 MB of tracebacks


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate is installed by scripts/bootstrap.sh")
def test_the_shipped_logrotate_file_rotates_the_log_and_serve_writes_a_new_one(rude, tmp_path):
    shipped = open(os.path.join(os.path.dirname(__file__), "..", "packaging", "workspace-lease.logrotate")).read()
    assert "/var/log/workspace-lease/service.log {" in shipped
    config = tmp_path / "logrotate.conf"
    config.write_text(shipped.replace("/var/log/workspace-lease/service.log", str(rude.log_file)))
    before = log_text(rude)
    subprocess.run(["logrotate", "--force", "--state", str(tmp_path / "state"), str(config)], check=True,
                   capture_output=True, timeout=60)
    rotated = rude.root / "service.log.1"
    assert rotated.read_text(errors="replace") == before
    assert not rude.log_file.exists()
    sock = connect(rude, "127.0.0.5")  # a new peer: its refusal is logged
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    assert status_of(closed_by_server(sock)) == 400
    deadline = time.monotonic() + HANG_S
    while not rude.log_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "refused 127.0.0.5: malformed HTTP request" in log_text(rude)
    assert stat.S_IMODE(rude.log_file.stat().st_mode) == 0o640
    assert rotated.read_text(errors="replace") == before  # nothing more went to the moved file


def test_serve_raises_its_soft_open_file_limit_to_the_hard_one(tmp_path):
    site = Site(tmp_path)
    with serving(site, wrapper=("prlimit", "--nofile=256:4096")) as process:
        limits = open(f"/proc/{process.pid}/limits").read()
    soft, hard = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits).groups()
    assert (soft, hard) == ("4096", "4096")


def authenticated_get(site: Site, sock: socket.socket) -> int:
    """GET /api/v1/leases as the operator on the kept-alive ``sock``; the answer's status."""
    header = authorization(site, "GET", "/api/v1/leases", user=OPERATOR, secret=OPERATOR_SECRET,
                           realm=OPERATOR_REALM)
    sock.sendall(f"GET /api/v1/leases HTTP/1.1\r\nHost: x\r\nAuthorization: {header}\r\n\r\n".encode())
    sock.settimeout(HANG_S)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(65536)
        assert chunk, "the service closed the connection"
        head += chunk
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    body = head.split(b"\r\n\r\n", 1)[1]
    while len(body) < length:
        body += sock.recv(65536)
    return status_of(head)


def test_1100_idle_connections_under_a_1024_file_limit_do_not_lock_out_an_operator_or_a_pilot(tmp_path, hugepages):
    site = Site(tmp_path)
    flood: list[socket.socket] = []
    with open_file_limit(4096), serving(site, wrapper=("prlimit", "--nofile=1024:1024")):
        try:
            # An operator's kept-alive connection, authenticated before the flood: it must survive it.
            early = connect(site)
            assert authenticated_get(site, early) == 200
            for index in range(1100):
                sock = connect(site, "127.0.0.6")
                if index % 2:
                    sock.sendall(b"GET /api/v1/leases HTTP/1.1\r\nHost: x\r\n")  # a head begun, never ended
                flood.append(sock)
            assert authenticated_get(site, early) == 200  # the same connection: not closed to make room
            early.close()
            # An operator's command and a real pilot's lease (the pilot notifies through the flood).
            listed = site.cli("list")
            assert listed.returncode == 0, listed.stderr
            reserved = site.cli("reserve", "--nodes", "1", "--memory", "32", "--duration", "30", "--json", "--wait")
            assert reserved.returncode == 0, reserved.stderr
            lease = json.loads(reserved.stdout)
            assert lease["state"] == "ready"
            released = site.cli("release", lease["id"], "--wait")
            assert released.returncode == 0, released.stderr
        finally:
            for sock in flood:
                sock.close()
    text = log_text(site)
    cap = int(re.search(r"holding at most (\d+) connections", text).group(1))
    assert cap < 1024
    assert "out of system resource" not in text and "Too many open files" not in text
    assert "closed 100 quiet connection(s) to make room" in text
    assert len(text) < 64 * 1024, "the log grew like a flood"
