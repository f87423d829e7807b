"""The notifier: ordered seqs, retries until the service answers, and a close that stops at once."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from pilot.notifier import Outcome
from service_adapter.receiver import ReceiverThread, make_app
from tests.support.ports import free_port
from tests.support.notifiers import make_notifier


def test_notifications_arrive_in_order_with_increasing_seq(service):
    slot = service.add_slot()
    notifier = make_notifier(service.url, service, slot)
    try:
        deliveries = [notifier.notify(s, 64, deliver_within=10) for s in ("reserved", "heartbeat", "unreserved")]
        assert [d.wait(15) for d in deliveries] == [Outcome.DELIVERED] * 3
    finally:
        notifier.close()
    assert [(seq, state) for _h, seq, state, _c in service.store.notifications(slot)] == [
        (1, "reserved"), (2, "heartbeat"), (3, "unreserved"),
    ]


def test_retries_until_the_service_comes_up(service):
    slot = service.add_slot()
    port = free_port()
    notifier = make_notifier(f"http://127.0.0.1:{port}", service, slot)
    late = ReceiverThread(make_app(service.store, service.verifier), port=port)
    try:
        delivery = notifier.notify("reserved", 64, deliver_within=60)
        late.start()  # the first tries were refused connections; a later one gets through
        assert delivery.wait(60) is Outcome.DELIVERED
    finally:
        notifier.close()
        late.stop()
    assert len(service.store.notifications(slot)) == 1


def test_refusal_is_final_and_not_retried(service):
    notifier = make_notifier(service.url, service, "unknown-slot")
    try:
        delivery = notifier.notify("reserved", 64, deliver_within=60)
        assert delivery.wait(30) is Outcome.REFUSED
        assert delivery.status == 404
    finally:
        notifier.close()


def test_an_answer_that_is_not_ours_is_a_refusal_not_a_dead_sender():
    from aiohttp import web

    async def proxy_error(request):
        return web.json_response(["not", "our", "format"], status=403)

    app = web.Application()
    app.router.add_post("/pilot/v2/notifications", proxy_error)
    proxy = ReceiverThread(app)
    notifier = make_notifier(proxy.start(), None, "slot-x")
    try:
        first = notifier.notify("reserved", 64, deliver_within=30)
        assert first.wait(30) is Outcome.REFUSED and first.status == 403
        second = notifier.notify("unreserved", 0, deliver_within=30)
        assert second.wait(30) is Outcome.REFUSED  # the sender thread is still alive
    finally:
        notifier.close()
        proxy.stop()


def test_a_429_with_retry_after_is_waited_out_before_the_next_try():
    """A node over its share is told 429 with Retry-After: its pilot asks again only after that wait."""
    from aiohttp import web

    arrivals: list[float] = []

    async def busy_then_accepting(request):
        arrivals.append(time.monotonic())
        if len(arrivals) <= 3:
            return web.json_response({"result": "too-many"}, status=429, headers={"Retry-After": "1"})
        return web.json_response({"result": "accepted"})

    app = web.Application()
    app.router.add_post("/pilot/v2/notifications", busy_then_accepting)
    server = ReceiverThread(app)
    notifier = make_notifier(server.start(), None, "slot-x")
    try:
        delivery = notifier.notify("reserved", 64, deliver_within=60)
        assert delivery.wait(30) is Outcome.DELIVERED
    finally:
        notifier.close()
        server.stop()
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    assert len(gaps) == 3 and min(gaps) >= 0.99, gaps  # each try waited the second it was asked to


def test_close_stops_retries_at_once():
    notifier = make_notifier(f"http://127.0.0.1:{free_port()}", None, "slot-x")
    pending = notifier.notify("reserved", 64, deliver_within=3600)
    queued = notifier.notify("unreserved", 0, deliver_within=3600)
    notifier.close()
    # Both end now rather than after an hour of retries; the wait only bounds a broken close.
    assert pending.wait(10) is Outcome.UNDELIVERED
    assert queued.wait(10) is Outcome.UNDELIVERED
    assert notifier.notify("heartbeat", 0, deliver_within=10).outcome is Outcome.UNDELIVERED


def test_deadline_ends_the_retries():
    notifier = make_notifier(f"http://127.0.0.1:{free_port()}", None, "slot-x")
    try:
        delivery = notifier.notify("reserved", 64, deliver_within=0.5)
        assert delivery.wait(30) is Outcome.UNDELIVERED
        assert "Connection" in delivery.detail
    finally:
        notifier.close()


def test_a_service_silent_since_before_the_cutoff_gets_one_try_not_the_whole_deadline():
    notifier = make_notifier(f"http://127.0.0.1:{free_port()}", None, "slot-x")
    try:
        earlier = notifier.notify("heartbeat", 0, deliver_within=0.2)  # nothing listens: no answer
        assert earlier.wait(30) is Outcome.UNDELIVERED
        notifier.give_up_if_silent_before(time.monotonic())  # the lease ends now
        last = notifier.notify("unreserved", 0, deliver_within=3600)
        # Ends after its first refused connection, not after an hour of retries.
        assert last.wait(30) is Outcome.UNDELIVERED
        assert "Connection refused" in last.detail and "not trying again" in last.detail, last.detail
    finally:
        notifier.close()


def test_a_service_that_answered_before_the_cutoff_gets_every_retry_through_a_restart(service):
    slot = service.add_slot()
    notifier = make_notifier(service.url, service, slot)
    refused = threading.Event()
    seen_unanswered = notifier.reach.unanswered
    notifier.reach.unanswered = lambda: (seen_unanswered(), refused.set())  # a probe: when an attempt failed
    again = None
    try:
        assert notifier.notify("reserved", 64, deliver_within=30).wait(30) is Outcome.DELIVERED
        port = service.receiver.port
        service.receiver.stop()  # a restart begins after the lease's end did
        notifier.give_up_if_silent_before(time.monotonic())
        last = notifier.notify("unreserved", 0, deliver_within=60)
        assert refused.wait(30)
        again = ReceiverThread(make_app(service.store, service.verifier), port=port)
        again.start()
        assert last.wait(60) is Outcome.DELIVERED
    finally:
        notifier.close()
        if again is not None:
            again.stop()
    assert [state for _h, _seq, state, _c in service.store.notifications(slot)] == ["reserved", "unreserved"]


def test_pilot_start_imports_nothing_heavy():
    # The pilot's own start is on the lease's critical path: no aiohttp, no sqlite, no service code.
    code = (
        "import sys, pilot.cli, pilot.lifecycle, pilot.notifier;"
        "heavy = [m for m in ('aiohttp', 'sqlite3', 'service_adapter', 'libvirt') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_an_answer_to_a_request_sent_before_a_failure_does_not_end_the_silence_the_failure_began():
    # The notifier and the poller record from their own threads: a keep-alive connection of a closing service may
    # answer a report sent before the poller's refused connection, and be recorded after it.
    from pilot.reach import ServiceReach

    now = [100.0]
    reach = ServiceReach(clock=lambda: now[0])
    reach.unanswered()  # the poller: refused at 100
    reach.answered(sent_at=99.5)  # the notifier's report, sent before, answered, recorded later
    assert reach.silent_before(100.0)
    reach.answered(sent_at=100.2)  # a request sent after the failure got an answer: the service is there
    assert reach.silent_since is None
    now[0] = 101.0
    reach.unanswered()
    reach.answered()  # no sending time: an answer now
    assert reach.silent_since is None
