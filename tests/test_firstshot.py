"""The pilot's first notification over http.client (pilot.firstshot), against the real receiver."""

from __future__ import annotations

import json
import subprocess
import sys

from pilot.firstshot import FirstShot, FirstShotFailed
from pilot.notifier import Outcome
from pilot.protocol import NOTIFICATIONS_PATH, SIGNATURE_HEADER, sign
from tests.conftest import free_port, notification
from tests.test_notifier import make_notifier

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
