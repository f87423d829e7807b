"""Several receivers on one PostgreSQL store: what one takes, the others know; one lease manager acts.

The in-process half puts two real receivers (aiohttp on their own loopback ports, each with its own
``Store``, board and digest verifier, one site key) on one database of the session's real PostgreSQL
server: a command queued through one wakes a poll parked on the other; the same notification sent to both
at once is stored once; a request replayed to the other receiver is refused; a pilot that polls one is
heard by the other's board. The process half runs two real ``workspace-lease serve`` on one port
(SO_REUSEPORT) with real pilots on the local provider: a lease goes through either, and when the one whose
lease manager leads is SIGKILLed, the other's takes over and ends it.
"""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import requests

from service_adapter.pollnews import PollNews
from workspace_common.protocol import NOTIFICATIONS_PATH, SIGNATURE_HEADER, sign

from tests.support.channels import WOKEN_WITHIN_S, Channel, PollThread, vm_spec, wait_until
from tests.support.pool import pool_pages
from tests.support.postgres import stored_seqs
from tests.support.service import notification
from tests.support.site import Site, end_pilots, start_serve, stop_process


@pytest.fixture
def two(tmp_path, postgres_server):
    """Two receivers of one site on one PostgreSQL database: (first, second)."""
    url = postgres_server.new_database()
    first = Channel(tmp_path / "a", url)
    second = Channel(tmp_path / "b", url, site_key=first.site_key)
    yield first, second
    second.close()
    first.close()


def test_a_command_queued_through_one_receiver_wakes_a_poll_parked_on_the_other(two):
    first, second = two
    lease_id, slot = first.lease()
    poll = PollThread(first, slot, "node1", "after=0&wait=30")
    poll.start()
    first.wait_parked(slot, "node1")
    cid = second.start(lease_id, "vm1")  # through the other receiver's store
    (command,) = first.commands(poll.result(WOKEN_WITHIN_S))
    assert command == {"id": cid, "op": "start-vm", "vm": vm_spec("vm1").to_dict()}
    # And the other way: a release recorded through the first wakes a poll parked on the second.
    poll = PollThread(second, slot, "node1", f"after={cid}&wait=30")
    poll.start()
    second.wait_parked(slot, "node1")
    assert first.store.request_release(lease_id, time.time())
    (release,) = second.commands(poll.result(WOKEN_WITHIN_S))
    assert release["op"] == "release" and release["id"] > cid


def _post(channel: Channel, body: bytes, key: str):
    return channel.session().post(channel.url + NOTIFICATIONS_PATH, data=body, timeout=20,
                                  headers={SIGNATURE_HEADER: sign(key, body)})


def test_the_same_notifications_sent_to_both_at_once_are_each_stored_once_in_order(two):
    """Each of 30 notifications goes to both receivers at the same moment: one takes it, the other answers it
    is a repeat (never a 5xx); the host's rows are 1..30, once each."""
    first, second = two
    _, slot = first.lease(ready=False, hosts=(), nodes=1)
    key = first.key(slot)
    for seq in range(1, 31):
        body = notification(slot, seq=seq, state="reserved" if seq == 1 else "heartbeat").to_json()
        answers: list = [None, None]
        gate = threading.Barrier(2)

        def send(index: int, channel: Channel) -> None:
            gate.wait(10)
            answers[index] = _post(channel, body, key)

        senders = [threading.Thread(target=send, args=(i, c)) for i, c in enumerate((first, second))]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(30)
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        assert sorted(a.json()["result"] for a in answers) == ["accepted", "repeat"], seq
    stored = first.store.notifications(slot)
    assert [(host, seq) for host, seq, _, _ in stored] == [("node1", seq) for seq in range(1, 31)]
    assert second.store.pilots(slot)[0].last_seq == 30


def test_a_request_replayed_to_the_other_receiver_is_refused_and_changes_nothing(two):
    """The digest nonce is the receiver's own: an eavesdropper's copy of a request (head and body) that the first
    took is refused by the second, and a notification's sequence is shared, so a fresh copy is a repeat."""
    first, second = two
    _, slot = first.lease(ready=False, hosts=(), nodes=1)
    key = first.key(slot)
    body = notification(slot, seq=1).to_json()
    taken = _post(first, body, key)
    assert taken.status_code == 200 and taken.json()["result"] == "accepted"
    sent = taken.request
    before = second.store.snapshot()
    replayed = requests.post(second.url + NOTIFICATIONS_PATH, data=sent.body, timeout=20,  # no auth of its own
                             headers={name: sent.headers[name] for name in ("Authorization", SIGNATURE_HEADER)})
    assert replayed.status_code == 401
    assert second.store.snapshot() == before
    again = _post(second, body, key)  # the same body, with the second's own nonce: a repeat, stored once
    assert again.status_code == 200 and again.json()["result"] == "repeat"
    assert len(first.store.notifications(slot)) == 1


def test_a_pilot_polling_one_receiver_is_heard_by_the_others_board(two):
    first, second = two
    _, slot = first.lease()
    target = (slot, "node1")
    second.clock.now += 100.0  # the second has not heard it for a while
    assert second.board.silent_for(target) == 100.0
    assert first.poll(slot, "node1").status_code == 200  # it polls the first
    news = PollNews(first.store, first.board, every_s=60)
    PollNews(second.store, second.board, every_s=60)  # the second listens
    assert news.announce_once(since=0) == 1
    wait_until(lambda: second.board.silent_for(target) == 0.0, "the second receiver to hear of the poll")


def test_the_other_receivers_lease_manager_is_woken_by_a_release_not_by_a_vm_start_or_a_poll(two):
    first, second = two
    lease_id, slot = first.lease()
    for action in (lambda: second.start(lease_id, "vm1"),
                   lambda: second.store.announce_polls([(slot, "node1")])):
        version, lease_version = first.store.version, first.store.lease_version
        action()
        wait_until(lambda: first.store.version > version, "the first receiver to hear of the commit")
        assert first.store.lease_version == lease_version
    lease_version = first.store.lease_version
    assert second.store.request_release(lease_id, time.time())
    wait_until(lambda: first.store.lease_version > lease_version, "the first receiver to hear of the release")


# -- two serve processes -------------------------------------------------------------------------


def _second_config(site: Site, log_file) -> str:
    """The site's config with its own log file: the second serve of the pair."""
    text = open(site.config).read().replace(f"log_file = {site.log_file}", f"log_file = {log_file}")
    path = str(site.root / "service-2.conf")
    with open(path, "w") as handle:
        handle.write(text)
    return path


def _leads(log_path) -> bool:
    try:
        return "lease manager: leading" in open(log_path).read()
    except FileNotFoundError:
        return False


def test_two_serves_share_a_port_and_when_the_leader_dies_the_other_ends_its_lease(
        tmp_path, hugepages, postgres_server):
    url = postgres_server.new_database()
    site = Site(tmp_path, store=url, reuse_port="yes")
    other_log = tmp_path / "service-2.log"
    other = Site.__new__(Site)
    other.__dict__.update(site.__dict__, config=_second_config(site, other_log), log_file=other_log)
    processes = {}
    try:
        processes["first"] = start_serve(site)
        processes["second"] = start_serve(other)
        wait_until(lambda: _leads(site.log_file) or _leads(other_log), "one lease manager to lead", timeout=30)
        assert [_leads(site.log_file), _leads(other_log)].count(True) == 1
        leader, follower = ("first", "second") if _leads(site.log_file) else ("second", "first")
        follower_log = other_log if follower == "second" else site.log_file

        reserved = site.cli("reserve", "--nodes", "2", "--memory", "32", "--duration", "60", "--json", "--wait")
        assert reserved.returncode == 0, reserved.stderr
        lease_id = json.loads(reserved.stdout)["id"]
        assert pool_pages() == hugepages + 32

        processes[leader].kill()  # by its pid: the leader's session ends with it
        processes[leader].wait()
        wait_until(lambda: _leads(follower_log), "the other lease manager to take the lead", timeout=30)
        released = site.cli("release", lease_id, "--wait", "--json")
        assert released.returncode == 0, released.stderr + released.stdout
        assert json.loads(released.stdout)["state"] == "released"
        assert pool_pages() == hugepages
        again = site.cli("reserve", "--nodes", "1", "--memory", "32", "--duration", "60", "--json", "--wait")
        assert again.returncode == 0, again.stderr
        second_id = json.loads(again.stdout)["id"]
        assert site.cli("release", second_id, "--wait").returncode == 0
        assert pool_pages() == hugepages
    finally:
        for process in processes.values():
            stop_process(process)
        end_pilots(site)
    logs = site.log_file.read_text() + other_log.read_text()
    assert not re.search(r"Traceback|store commit failed", logs), logs[-3000:]
    # Nothing the pilots sent was lost with the killed receiver: each host's notifications, 1 to its last.
    for host in ("local-node1", "local-node2"):
        seqs = stored_seqs(url, lease_id, host)
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 3, (host, seqs)
