"""The pilot's first notification over http.client (pilot.firstshot), against the real receiver."""

from __future__ import annotations

import json
import subprocess
import sys

from pilot.firstshot import FirstShot, FirstShotFailed
from pilot.notifier import Outcome
from workspace_common.protocol import NOTIFICATIONS_PATH, SIGNATURE_HEADER, sign
from tests.support.ports import free_port
from tests.support.service import notification
from tests.support.notifiers import make_notifier

# A fresh interpreter: a notifier sends two notifications and says, as each is answered,
# whether requests had been imported by then.
_CHILD = """
import json, sys
from pilot.credentials import PilotCredentials
from pilot.notifier import Notifier
url, slot, node_key, sign_key = sys.argv[1:5]
notifier = Notifier(url, PilotCredentials("node1", node_key, sign_key), slot, "node1")
seen = []
for state in ("reserved", "heartbeat"):
    delivery = notifier.notify(state, 64, deliver_within=20)
    delivery.add_done_callback(lambda d: seen.append((d.notification.state, d.outcome.value, "requests" in sys.modules)))
    delivery.wait(30)
notifier.close()
print(json.dumps(seen))
"""


def test_the_first_notification_is_answered_before_requests_is_loaded(service):
    slot = service.add_slot()
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, service.url, slot, service.node_key("node1"), service.sign_key(slot, "node1")],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert json.loads(out) == [["reserved", "delivered", False], ["heartbeat", "delivered", True]]
    assert [(seq, state) for _h, seq, state, _c in service.store.notifications(slot)] == [
        (1, "reserved"), (2, "heartbeat"),
    ]


def test_a_first_shot_answers_the_digest_challenge_and_is_stored(service):
    slot = service.add_slot()
    body = notification(slot).to_json()
    shot = FirstShot(service.url + NOTIFICATIONS_PATH, "node1", service.node_key("node1"))
    status, detail = shot.post(body, {SIGNATURE_HEADER: sign(service.sign_key(slot, "node1"), body)}, timeout=10)
    assert (status, detail) == (200, "")
    assert len(service.store.notifications(slot)) == 1


def test_a_bad_signature_is_a_final_refusal_with_the_services_detail(service):
    slot = service.add_slot()
    body = notification(slot).to_json()
    shot = FirstShot(service.url + NOTIFICATIONS_PATH, "node1", service.node_key("node1"))
    status, detail = shot.post(body, {SIGNATURE_HEADER: sign("0" * 64, body)}, timeout=10)  # not the slot's key
    assert status == 401 and "X-Pilot-Signature" in detail
    assert service.store.notifications(slot) == []


def test_a_wrong_node_key_is_refused_as_through_requests(service):
    slot = service.add_slot()
    notifier = make_notifier(service.url, None, slot)  # a made-up node key
    try:
        delivery = notifier.notify("reserved", 64, deliver_within=20)
        assert delivery.wait(30) is Outcome.REFUSED and delivery.status == 401
    finally:
        notifier.close()
    assert service.store.notifications(slot) == []


def test_no_answer_is_left_to_the_retries():
    shot = FirstShot(f"http://127.0.0.1:{free_port()}{NOTIFICATIONS_PATH}", "node1", "0" * 64)
    try:
        shot.post(b"{}", {}, timeout=5)
    except FirstShotFailed as exc:
        assert "ConnectionRefusedError" in str(exc)
    else:
        raise AssertionError("a closed port answered")


def test_no_first_shot_behind_a_proxy_that_requests_would_use():
    assert FirstShot.applies({})
    assert not FirstShot.applies({"https_proxy": "http://proxy.example:3128"})
    assert not FirstShot.applies({"HTTP_PROXY": "http://proxy.example:3128"})


def test_a_challenge_whose_body_never_ends_is_not_read_to_its_end():
    # A real socket server in the service's place: its 401 carries a well-formed challenge and then a chunked
    # body that never ends; on a new connection it accepts the authenticated request. The first shot reads a
    # bounded part of the endless body, hangs up, and sends its answer on a fresh connection.
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    seen = []  # (first request line, whether it carried an Authorization) per connection

    def serve():
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += conn.recv(65536)
                authorized = b"\r\nauthorization: digest" in head.lower()
                seen.append((head.split(b"\r\n", 1)[0].decode(), authorized))
                if authorized:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}")
                    continue
                conn.sendall(b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Digest realm="workspace-pilot", '
                             b'nonce="abc", algorithm=SHA-256, qop="auth"\r\nTransfer-Encoding: chunked\r\n\r\n')
                try:
                    while True:
                        conn.sendall(b"10000\r\n" + b"x" * 65536 + b"\r\n")
                except OSError:
                    pass  # the client hung up: what it should do

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        shot = FirstShot(f"http://127.0.0.1:{listener.getsockname()[1]}{NOTIFICATIONS_PATH}", "node1", "0" * 64)
        assert shot.post(b"{}", {}, timeout=10) == (200, "")
        server.join(10)
    finally:
        listener.close()
    assert not server.is_alive()  # the endless answer was hung up on, not read for ever
    assert [authorized for _line, authorized in seen] == [False, True]
