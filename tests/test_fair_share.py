"""One node's credentials against a real ``workspace-lease serve`` under a 1024 open-file limit: its share, no more.

A real service (the ``local`` provider, its real pilots holding real
hugepages) leases four nodes. Each attack is made with one node's own
digest key, from its own loopback address, over raw sockets and
``requests``: hundreds of parked command polls, downloads that never read,
a burst of requests. Meanwhile the tests check what the others depend on:
the operator's command and another node's requests are answered (their
time is reported by ``bench/bench_fair_share.py``, not asserted here),
and the attacker gets 429 with Retry-After, never a reset.
"""

from __future__ import annotations

import os
import re
import socket
import time

import pytest
import requests

from workspace_common.protocol import commands_path, image_path
from tests.support.rawhttp import HANG_S, connect, log_text, open_file_limit, status_of
from tests.support.site import Site
from tests.support.rawhttp import IMAGE_BYTES, leased_with_an_image, node_auth, node_header

#: The service's request timeout here, which is also its send timeout.
TIMEOUT_S = 2


def read_head(sock: socket.socket, timeout: float = HANG_S) -> bytes | None:
    """The head of the answer on ``sock`` (None if none came within ``timeout``, b"" if it was closed)."""
    sock.settimeout(timeout)
    head = b""
    try:
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                return head
            head += chunk
    except socket.timeout:
        return None
    return head


@pytest.fixture(scope="module")
def attacked(tmp_path_factory, hugepages_module):
    """A serve under ``prlimit --nofile=1024``, an approved image, and a 4-node lease held by real pilots."""
    with leased_with_an_image(Site(tmp_path_factory.mktemp("fair"), request_timeout=TIMEOUT_S)) as site:
        yield site


def operator_answers(site: Site) -> None:
    """The operator's command works now."""
    listed = site.cli("list", timeout=HANG_S)
    assert listed.returncode == 0, listed.stderr


def good_pilot_answers(site: Site) -> None:
    """Another node's poll (wait 0) is answered 200 now."""
    host = site.hosts[1]
    url = site.url + commands_path(site.slot, host) + "?after=0&wait=0"
    answer = requests.get(url, auth=node_auth(site, host), timeout=HANG_S)
    assert answer.status_code == 200, answer.text


def open_descriptors(pid: int) -> list[str]:
    """Where each open descriptor of process ``pid`` points."""
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            pass
    return found


def logged(site: Site, pattern: str, count: int, start: int = 0) -> str:
    """The service's log from byte ``start`` once ``pattern`` is in it ``count`` times (it is written when the
    service's next write meets the closed connection); fails if it is there more often, or not within HANG_S."""
    deadline = time.monotonic() + HANG_S
    while len(re.findall(pattern, log_text(site)[start:])) < count and time.monotonic() < deadline:
        time.sleep(0.05)  # another process's log: nothing to wait on
    text = log_text(site)[start:]
    assert len(re.findall(pattern, text)) == count, text
    return text


def image_open(site: Site) -> bool:
    """Whether the service has the site's image file open now."""
    return any(site.sha256 in target for target in open_descriptors(site.pid))


def send_queue(server_port: int, client_port: int) -> int | None:
    """Bytes the service's end of the connection from loopback port ``client_port`` holds unsent or unacknowledged
    (``/proc/net/tcp``: local 127.0.0.1:server_port, state 01, tx_queue); None once it is no longer established."""
    local = f"0100007F:{server_port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as handle:
        for line in handle.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[2].endswith(f":{client_port:04X}") and fields[3] == "01":
                return int(fields[4].split(":")[0], 16)
    return None


def established(server_port: int, client_port: int) -> bool:
    """Whether the service's TCP connection from loopback port ``client_port`` is still established."""
    return send_queue(server_port, client_port) is not None


def test_a_nodes_300_parked_polls_leave_it_one_and_the_others_are_served(attacked):
    site, host = attacked, attacked.hosts[0]
    path = commands_path(site.slot, host) + "?after=0&wait=60"
    polls = []
    with open_file_limit(4096):
        # Credentials first, then the polls in one burst: what the node's share holds, not how fast this test is.
        requests_ = [f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {node_header(site, host, path)}\r\n\r\n"
                     .encode() for _ in range(300)]
        try:
            for request in requests_:
                polls.append(connect(site, "127.0.0.21"))
                polls[-1].sendall(request)
            operator_answers(site)
            good_pilot_answers(site)
            # Every poll but one is answered at once: ended by a newer one (200, no commands) or refused as over
            # the node's share (429 with Retry-After); none is reset.
            heads = [read_head(sock, timeout=3) for sock in polls]
        finally:
            for sock in polls:
                sock.close()
    # At most one waits: the node's real pilot polls its slot too, and its newer poll may have ended the last.
    assert heads.count(None) <= 1, "more than one of the node's polls waits"
    answered = [head for head in heads if head is not None]
    statuses = [status_of(head) for head in answered]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) > 0 and statuses.count(200) > 0
    for head in answered:
        if status_of(head) == 429:
            assert re.search(rb"\r\nRetry-After: [1-9][0-9]*\r\n", head), head
    assert "connection reset" not in log_text(site).lower()


def test_downloads_that_never_read_are_capped_per_node_cut_off_and_hold_no_file(attacked):
    site, host = attacked, attacked.hosts[2]
    path = image_path(site.slot, host, site.sha256)
    downloads = []
    with open_file_limit(4096):
        # Credentials first, then the downloads in one burst: all 40 ask within the send timeout (2 s).
        requests_ = [f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {node_header(site, host, path)}\r\n\r\n"
                     .encode() for _ in range(40)]
        try:
            for request in requests_:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read: the answer backs up
                sock.bind(("127.0.0.23", 0))
                sock.connect(("127.0.0.1", site.port))
                sock.sendall(request)
                downloads.append(sock)
            heads = [read_head(sock) for sock in downloads]
            statuses = [status_of(head) for head in heads]
            # Two are streaming, soon stalled: while the service still holds their connections, it holds no image
            # file for them (a read of a chunk opens and closes it; aiohttp's FileResponse kept it open throughout).
            streaming = [sock.getsockname()[1] for sock, status in zip(downloads, statuses) if status == 200]
            # Stalled: each stream's send queue full and still (a stream that still moves reads its next chunk,
            # and opens the file for that moment, so only both stalled says what a waiting download holds).
            queues, before = [send_queue(site.port, port) for port in streaming], None
            while queues != before or not all(queues):
                assert None not in queues, "a download was cut off before it stalled"
                time.sleep(0.05)  # another process's sockets: nothing to wait on
                queues, before = [send_queue(site.port, port) for port in streaming], queues
            assert not image_open(site), "a stalled download holds the image file open"
            operator_answers(site)
            good_pilot_answers(site)
            assert statuses.count(200) == 2, statuses  # [service] host_downloads
            assert statuses.count(429) == 38
            # The two that stream are cut off by the send timeout (they never read): one line each, and the
            # service's end of each connection is gone (read nothing here: a read would let a stream finish).
            logged(site, rf"image [0-9a-f]{{12}} for {host} to 127\.0\.0\.23: stopped after", 2)
            assert not [port for port in streaming if established(site.port, port)]
        finally:
            for sock in downloads:
                sock.close()
    text = log_text(site)
    assert "Traceback" not in text and "out of system resource" not in text


def test_a_burst_beyond_the_nodes_rate_is_429_with_retry_after_and_the_node_is_served_after_it(attacked):
    site, host = attacked, attacked.hosts[3]
    url = site.url + commands_path(site.slot, host) + "?after=0&wait=0"
    with requests.Session() as attacker:
        attacker.auth = node_auth(site, host)
        answers = [attacker.get(url, timeout=HANG_S) for _ in range(400)]
        statuses = [answer.status_code for answer in answers]
        assert set(statuses) <= {200, 429}, statuses
        limited = [answer for answer in answers if answer.status_code == 429]
        assert limited, "400 requests at full speed never met the node's rate"
        operator_answers(site)
        good_pilot_answers(site)
        wait = int(limited[-1].headers["Retry-After"])
        assert 1 <= wait <= 30
        time.sleep(wait)  # as the pilot does: the service asked for this much quiet
        assert attacker.get(url, timeout=HANG_S).status_code == 200


@pytest.mark.parametrize("header", ["bytes=999999999-", "bytes=abc", "bytes=0-1,5-6", "bytes=5-1", "lines=0-10"])
def test_a_bad_range_is_416_with_the_size_and_no_traceback(attacked, header):
    site, host = attacked, attacked.hosts[1]
    url = site.url + image_path(site.slot, host, site.sha256)
    answer = requests.get(url, auth=node_auth(site, host), headers={"Range": header}, timeout=HANG_S)
    assert answer.status_code == 416
    assert answer.headers["Content-Range"] == f"bytes */{IMAGE_BYTES}"
    assert answer.content == b""
    tail = requests.get(url, auth=node_auth(site, host), headers={"Range": "bytes=-5"}, timeout=HANG_S)
    assert tail.status_code == 206 and len(tail.content) == 5
    assert tail.headers["Content-Range"] == f"bytes {IMAGE_BYTES - 5}-{IMAGE_BYTES - 1}/{IMAGE_BYTES}"
    assert "Traceback" not in log_text(site)


def test_a_client_gone_mid_download_is_one_log_line(attacked):
    site, host = attacked, attacked.hosts[1]
    path = image_path(site.slot, host, site.sha256)
    before = len(log_text(site))
    sock = connect(site, "127.0.0.22")
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {node_header(site, host, path)}\r\n\r\n".encode())
    assert status_of(read_head(sock)) == 200
    sock.recv(65536)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close with a reset
    sock.close()
    operator_answers(site)
    text = logged(site, rf"image [0-9a-f]{{12}} for {host} to [0-9.]+: stopped after \d+ of \d+ bytes", 1, before)
    assert "Traceback" not in text
