"""The receiver's answers, and that every refusal leaves the store exactly as it was: on a SQLite file and on a
database of the session's PostgreSQL server."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from workspace_common.protocol import MAX_BODY_BYTES, MAX_MEMORY_MB, MAX_SEQ, MAX_SEQ_STEP, epoch_micros, format_time, sign, utc_now
from service_adapter.store import Store
from tests.support.service import notification


@pytest.fixture
def service(any_store_service):
    """This module's receiver runs on each store backend (SQLite, PostgreSQL)."""
    return any_store_service


@pytest.fixture
def slot(service):
    return service.add_slot(nodes=2)


@pytest.fixture
def session(service):
    return service.session()


def accepted(service, session, slot, seq=1, **fields):
    """POST a notification as its own host (``session`` is node1's) and expect 200."""
    body = notification(slot, seq=seq, **fields).to_json()
    if fields.get("host", "node1") != "node1":
        session = service.session(fields["host"])
    response = service.post(session, body)
    assert response.status_code == 200, response.text
    return body


def refused(service, session, body: bytes, status: int, signature: str | None = None) -> dict:
    """POST ``body``, expect ``status``, and check the store did not change."""
    before = service.store.snapshot()
    response = service.post(session, body, signature)
    assert response.status_code == status, response.text
    assert service.store.snapshot() == before
    return response.json()


def test_accepted_notification_is_stored_with_the_pilot_state(service, session, slot):
    expires = format_time(utc_now() + timedelta(minutes=5))
    body = accepted(service, session, slot, expires_at=expires)
    (pilot,) = service.store.pilots(slot)
    assert (pilot.host, pilot.state, pilot.last_seq, pilot.memory_mb, pilot.expires_at) == (
        "node1", "reserved", 1, 64, expires,
    )
    stored = service.store.snapshot()["notifications"]
    assert len(stored) == 1 and stored[0][6] == body


def test_exact_repeat_is_200_and_stored_once(service, session, slot):
    body = accepted(service, session, slot)
    before = service.store.snapshot()
    response = service.post(session, body)
    assert response.status_code == 200
    assert response.json()["result"] == "repeat"
    assert service.store.snapshot() == before


def test_seq_reused_with_another_body_is_409(service, session, slot):
    accepted(service, session, slot, seq=1)
    answer = refused(service, session, notification(slot, seq=1, state="unreserved").to_json(), 409)
    assert answer["result"] == "replay"


def test_seq_older_than_the_last_is_409(service, session, slot):
    accepted(service, session, slot, seq=5)
    refused(service, session, notification(slot, seq=3, state="unreserved").to_json(), 409)


def test_stale_sent_at_is_422(service, session, slot):
    old = format_time(utc_now() - timedelta(minutes=10))
    refused(service, session, notification(slot, sent_at=old).to_json(), 422)
    future = format_time(utc_now() + timedelta(minutes=10))
    refused(service, session, notification(slot, sent_at=future).to_json(), 422)


def test_body_over_64_kib_is_413(service, session, slot):
    body = json.dumps({"padding": "x" * (65 * 1024)}).encode()
    assert len(body) > MAX_BODY_BYTES
    refused(service, session, body, 413)


def test_wrong_signature_is_401(service, session, slot):
    body = notification(slot).to_json()
    refused(service, session, body, 401, signature=sign("0" * 64, body))
    refused(service, session, body, 401, signature="sha256=nothex")


def test_signature_of_another_body_is_401(service, session, slot):
    body = notification(slot).to_json()
    other = notification(slot, seq=2).to_json()
    refused(service, session, body, 401, signature=sign(service.sign_key(slot), other))


def test_unknown_slot_is_404(service, session):
    refused(service, session, notification("no-such-slot").to_json(), 404)


def test_host_beyond_the_slots_node_count_is_404(service, session, slot):
    accepted(service, session, slot, host="node1")
    accepted(service, session, slot, host="node2")
    refused(service, service.session("node3"), notification(slot, host="node3").to_json(), 404)


def test_invalid_notification_is_400(service, session, slot):
    answer = refused(service, session, b'{"version": 2}', 400)
    assert "missing field" in answer["detail"]


def test_unauthenticated_post_is_401(service, slot):
    import requests

    before = service.store.snapshot()
    response = requests.post(service.notifications_url, data=notification(slot).to_json(), timeout=10)
    assert response.status_code == 401
    assert service.store.snapshot() == before


def test_reserved_memory_above_the_slots_is_422_and_stores_nothing(service, session, slot):
    answer = refused(service, session, notification(slot, memory_mb=MAX_MEMORY_MB).to_json(), 422)
    assert answer["result"] == "out-of-bounds" and "memory_mb" in answer["detail"]
    accepted(service, session, slot, memory_mb=64)  # the slot's own size is fine


def test_a_seq_that_jumps_to_the_end_of_the_range_is_422(service, session, slot):
    accepted(service, session, slot, seq=1)
    # Accepted, it would make every later notification of this host a 409.
    answer = refused(service, session, notification(slot, seq=MAX_SEQ, state="heartbeat").to_json(), 422)
    assert answer["result"] == "out-of-bounds" and "seq" in answer["detail"]
    refused(service, session, notification(slot, seq=2 + MAX_SEQ_STEP, state="heartbeat").to_json(), 422)
    accepted(service, session, slot, seq=1 + MAX_SEQ_STEP, state="heartbeat")  # gaps up to the step are fine


def test_a_first_seq_far_beyond_the_step_is_422(service, session, slot):
    refused(service, session, notification(slot, seq=MAX_SEQ_STEP + 1).to_json(), 422)


def test_killed_may_count_in_microseconds_up_to_its_sent_at_as_kill_all_does(service, session, slot):
    accepted(service, session, slot, seq=1)
    sent_at = format_time(utc_now())
    late = notification(slot, seq=epoch_micros(sent_at) + 1, state="killed", memory_mb=0, sent_at=sent_at)
    refused(service, session, late.to_json(), 422)  # beyond its own clock
    accepted(service, session, slot, seq=epoch_micros(sent_at), state="killed", memory_mb=0, sent_at=sent_at)


def test_expires_at_beyond_the_lease_plus_the_skew_is_422(service, session, slot):
    # The Service fixture's lease lasts 60 s and the receiver allows 300 s of clock skew.
    far = format_time(utc_now() + timedelta(seconds=60 + 300 + 30))
    answer = refused(service, session, notification(slot, expires_at=far).to_json(), 422)
    assert answer["result"] == "out-of-bounds" and "expires_at" in answer["detail"]
    near = format_time(utc_now() + timedelta(seconds=60))
    accepted(service, session, slot, expires_at=near)
    refused(service, session, notification(slot, seq=2, state="unreserving", expires_at=far).to_json(), 422)


def test_seq_is_per_host(service, session, slot):
    accepted(service, session, slot, seq=1, host="node1")
    accepted(service, session, slot, seq=1, host="node2")
    assert {p.host for p in service.store.pilots(slot)} == {"node1", "node2"}


def test_reporting_states_do_not_change_the_pilot_state(service, session, slot):
    accepted(service, session, slot, seq=1)
    accepted(service, session, slot, seq=2, state="heartbeat")
    (pilot,) = service.store.pilots(slot)
    assert (pilot.state, pilot.last_seq) == ("reserved", 2)


def test_accepted_notifications_survive_a_restart(service, session, slot, tmp_path):
    accepted(service, session, slot, seq=1)
    accepted(service, session, slot, seq=2, state="unreserved")
    before = service.store.snapshot()
    service.close()
    reopened = Store(service.store.path)
    try:
        assert reopened.snapshot() == before
        assert reopened.pilots(slot)[0].state == "unreserved"
    finally:
        reopened.close()
    service.receiver.stop()  # already stopped; the fixture's close must stay harmless
