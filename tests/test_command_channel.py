"""The command channel: the service's long-poll endpoint and the pilot's CommandPoller, over real HTTP.

The service is the real aiohttp receiver on 127.0.0.1 (its own event-loop
thread) with a real SQLite store on disk; clients are real ``requests``
sessions with digest auth, and ``curl --digest``. Commands are queued the
way the service queues them (``Store.start_vms`` / ``stop_vm`` /
``request_release``), from the test's thread while a poll is held open.

The heartbeat clock (``CommandBoard(clock=...)``) is a hand-moved clock, so
"silent for" is told without sleeping. Where a poll must be parked before a
command is queued, the test waits for the board to count the poll as open and
then sends one more request through the same event loop: its answer proves
the poll's handler has reached its wait (the handler does not yield between
counting the poll and waiting).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
import uuid

import pytest
import requests
from aiohttp import web

from pilot.poller import CommandPoller
from workspace_common.protocol import COMMANDS_PATH, SIGNATURE_HEADER, Command, commands_body, commands_path, parse_commands, sign_commands
from service_adapter.commandboard import DEADLINE, CommandBoard
from service_adapter.receiver import POLL_BATCH, ReceiverThread, commands_answer
from service_adapter.store import commands as command_ops
from tests.support.channels import PollThread, WOKEN_WITHIN_S, channel, vm_spec, wait_until


# -- refusals -------------------------------------------------------------------------------------


def test_without_or_with_a_wrong_digest_the_poll_is_401_with_a_challenge(channel):
    lease_id, slot = channel.lease()
    channel.start(lease_id, "vm1")
    bare = requests.get(channel.url + commands_path(slot, "node1") + "?after=0&wait=0", timeout=20)
    assert bare.status_code == 401
    assert bare.headers["WWW-Authenticate"].startswith("Digest ")
    assert SIGNATURE_HEADER not in bare.headers and "commands" not in bare.json()
    wrong = channel.poll(slot, "node1", session=channel.session(key="0" * 64))
    assert wrong.status_code == 401
    assert SIGNATURE_HEADER not in wrong.headers and "commands" not in wrong.json()
    channel.clock.now += 30.0
    assert channel.board.silent_for((slot, "node1")) == 30.0  # a refused poll is no heartbeat


@pytest.mark.parametrize("query", [
    "after=-1&wait=0", "after=x&wait=0", "after=1.5", "after=&wait=0", "wait=-1", "wait=soon", "wait=nan",
    "wait=inf", f"after={2**63}", f"after={2**63}&wait=0", "after=0&wait=0&cursor=3", "since=0",
    "after=1&wait=1e3",
])
def test_a_malformed_query_is_400(channel, query):
    _assert_400(channel, query)


# Accepted today: _poll_query parses with int()/float(), which take "1_0", surrounding blanks and non-ASCII
# digits, and request.query.get() quietly takes the first of two values.
LENIENT = "BUG: _poll_query accepts this malformed query with 200 (int()/float() leniency, repeated keys)"


@pytest.mark.parametrize("query", [
    "after=1_0&wait=0", "after=%201&wait=0", "after=%D9%A3&wait=0", "after=0&wait=0_0",
    "after=5&after=0&wait=0", "after=0&wait=0&wait=30",
])
def test_a_lenient_malformed_query_is_400(channel, query):
    _assert_400(channel, query)


def _assert_400(channel, query):
    _, slot = channel.lease()
    response = channel.poll(slot, "node1", query)
    assert response.status_code == 400, (query, response.text)
    assert response.json()["result"] == "invalid"
    assert SIGNATURE_HEADER not in response.headers


@pytest.mark.parametrize("slot, host", [
    ("bad%20slot", "node1"), ("-slot", "node1"), ("slot%0A", "node1"), ("x" * 65, "node1"),
    ("SLOT", "node_1"), ("SLOT", "node1-"), ("SLOT", "n%C3%B6de"),
])
def test_bad_characters_in_the_slot_or_host_are_400(channel, slot, host):
    _, real = channel.lease()
    slot = real if slot == "SLOT" else slot
    response = channel.session().get(
        channel.url + COMMANDS_PATH.format(slot=slot, host=host) + "?after=0&wait=0", timeout=20)
    assert response.status_code == 400, (slot, host, response.text)
    assert response.json()["result"] == "invalid"


def test_an_unknown_slot_or_a_host_that_never_reserved_is_404(channel):
    _, slot = channel.lease(hosts=("node1",), nodes=3)
    assert channel.poll(str(uuid.uuid4()), "node1").status_code == 404  # no such slot
    assert channel.poll(slot, "node9").status_code == 404  # this host never reported
    channel.notify(slot, "node2", "heartbeat")  # reported, but never reserved
    channel.notify(slot, "node3", "error", code=3, message="the balloon did not move")
    for host in ("node2", "node3"):
        response = channel.poll(slot, host)
        assert response.status_code == 404, (host, response.text)
        assert response.json()["result"] == "unknown-slot"
    assert channel.commands(channel.poll(slot, "node1")) == []  # the one that reserved is served


def test_a_host_is_404_once_it_sent_unreserved_or_killed(channel):
    lease_id, slot = channel.lease(hosts=("node1", "node2"))
    channel.start(lease_id, "vm1", "node1")
    assert len(channel.commands(channel.poll(slot, "node1"))) == 1
    channel.notify(slot, "node1", "earlyunreserving")
    assert channel.poll(slot, "node1").status_code == 200  # still holding: it must hear its stop-vm commands
    channel.notify(slot, "node1", "unreserved", memory_mb=0)
    assert channel.poll(slot, "node1").status_code == 404
    channel.notify(slot, "node2", "killed", memory_mb=0)
    assert channel.poll(slot, "node2").status_code == 404


def test_a_lost_host_is_404(channel):
    lease_id, slot = channel.lease(hosts=("node1", "node2"))
    channel.start(lease_id, "vm1", "node1")
    assert channel.store.mark_lost(slot, "node1", now=time.time(), why="silent")
    response = channel.poll(slot, "node1")
    assert response.status_code == 404 and response.json()["result"] == "unknown-slot"
    assert channel.poll(slot, "node2").status_code == 200


def test_every_host_is_404_after_the_lease_ended(channel):
    lease_id, slot = channel.lease(hosts=("node1", "node2"))
    channel.start(lease_id, "vm1", "node1")
    assert channel.store.transition_lease(lease_id, "ready", "expired", "walltime", now=time.time(), ended=True)
    for host in ("node1", "node2"):
        response = channel.poll(slot, host)
        assert response.status_code == 404, response.text


# -- answers ----------------------------------------------------------------------------------------


def test_nothing_queued_is_an_empty_list_after_the_wait(channel):
    _, slot = channel.lease()
    response = channel.poll(slot, "node1", "after=0&wait=0.5")
    assert channel.commands(response) == []
    assert response.json() == {"commands": []}
    assert response.headers["Content-Type"].startswith("application/json")


def test_a_long_poll_is_answered_by_a_command_queued_while_it_waits(channel):
    lease_id, slot = channel.lease()
    poll = PollThread(channel, slot, "node1", "after=0&wait=30")
    poll.start()
    channel.wait_parked(slot, "node1")
    assert poll.is_alive()  # nothing to say yet: it is held
    cid = channel.start(lease_id, "vm1")  # from this thread, while the poll waits on the receiver's loop
    (command,) = channel.commands(poll.result(WOKEN_WITHIN_S))
    assert command == {"id": cid, "op": "start-vm", "vm": vm_spec("vm1").to_dict()}
    assert Command.from_dict(command).vm == vm_spec("vm1")


def test_a_command_committed_between_the_polls_read_and_its_wait_still_wakes_it(channel, monkeypatch):
    lease_id, slot = channel.lease()
    read = channel.store.poll_view
    queued = []

    def read_then_commit(*args, **kwargs):
        found = read(*args, **kwargs)  # no command yet
        if not queued:  # the commit lands after the read, before the poll waits (on the receiver's loop)
            queued.append(channel.start(lease_id, "vm1"))
        return found

    monkeypatch.setattr(channel.store, "poll_view", read_then_commit)
    response = channel.poll(slot, "node1", "after=0&wait=30")
    # A missed wake would answer [] at the 30 s deadline; the wake makes it read again and hand the command on.
    assert [command["id"] for command in channel.commands(response)] == queued


def test_a_stop_and_a_release_also_wake_a_waiting_poll(channel):
    lease_id, slot = channel.lease()
    first = channel.start(lease_id, "vm1")
    poll = PollThread(channel, slot, "node1", f"after={first}&wait=30")
    poll.start()
    channel.wait_parked(slot, "node1")
    stop = channel.stop(lease_id, "vm1", force=True)
    woken = channel.commands(poll.result(WOKEN_WITHIN_S))
    assert woken == [{"id": stop, "op": "stop-vm", "name": "vm1", "force": True}]
    poll = PollThread(channel, slot, "node1", f"after={stop}&wait=30")
    poll.start()
    channel.wait_parked(slot, "node1")
    assert channel.store.request_release(lease_id, time.time())
    (release,) = channel.commands(poll.result(WOKEN_WITHIN_S))
    assert release["op"] == "release" and release["id"] > stop and set(release) == {"id", "op"}


def test_after_returns_only_later_commands_in_id_order(channel):
    lease_id, slot = channel.lease()
    ids = [channel.start(lease_id, f"vm{i}") for i in range(3)]
    assert ids == sorted(ids)
    assert [c["id"] for c in channel.commands(channel.poll(slot, "node1", "after=0&wait=0"))] == ids
    assert [c["id"] for c in channel.commands(channel.poll(slot, "node1", f"after={ids[0]}&wait=0"))] == ids[1:]
    assert channel.commands(channel.poll(slot, "node1", f"after={ids[-1]}&wait=0")) == []
    assert channel.commands(channel.poll(slot, "node1", "after=0&wait=1000"))[0]["id"] == ids[0]  # a big wait is capped
    assert [c["id"] for c in channel.commands(channel.poll(slot, "node1"))] == ids  # no query: after=0, wait=0


def test_an_answer_carries_at_most_one_batch_and_the_rest_comes_with_the_next_poll(channel):
    lease_id, slot = channel.lease()
    count = POLL_BATCH + 6
    channel.store.start_vms(lease_id, [(vm_spec(f"vm{i}", 1), None) for i in range(count)], overhead_mb=0,
                            now=time.time())
    first = channel.commands(channel.poll(slot, "node1", "after=0&wait=0"))
    assert len(first) == POLL_BATCH
    rest = channel.commands(channel.poll(slot, "node1", f"after={first[-1]['id']}&wait=0"))
    assert len(rest) == 6
    ids = [c["id"] for c in first + rest]
    assert ids == sorted(ids) and len(set(ids)) == count
    assert [c["vm"]["name"] for c in first + rest] == [f"vm{i}" for i in range(count)]


def test_commands_of_another_host_or_slot_are_not_returned(channel):
    lease_a, slot_a = channel.lease(hosts=("node1", "node2"))
    lease_b, slot_b = channel.lease(hosts=("node1",))
    on_node2 = channel.start(lease_a, "vm-a2", "node2")
    other_slot = channel.start(lease_b, "vm-b1", "node1")
    assert channel.commands(channel.poll(slot_a, "node1", "after=0&wait=0.5")) == []
    assert [c["id"] for c in channel.commands(channel.poll(slot_a, "node2"))] == [on_node2]
    assert [c["id"] for c in channel.commands(channel.poll(slot_b, "node1"))] == [other_slot]
    # And a waiting poll is not woken into an answer by another host's command.
    poll = PollThread(channel, slot_a, "node1", "after=0&wait=1")
    poll.start()
    channel.wait_parked(slot_a, "node1")
    channel.start(lease_a, "vm-a2b", "node2")
    channel.start(lease_b, "vm-b1b", "node1")
    assert channel.commands(poll.result()) == []
    mine = channel.start(lease_a, "vm-a1", "node1")
    assert [c["id"] for c in channel.commands(channel.poll(slot_a, "node1"))] == [mine]


def test_the_answer_is_signed_over_the_request_target_and_the_body(channel):
    lease_id, slot = channel.lease()
    cid = channel.start(lease_id, "vm1")
    response = channel.poll(slot, "node1", "after=0&wait=0")
    target = commands_path(slot, "node1") + "?after=0&wait=0"
    key = channel.key(slot, "node1")
    assert response.headers[SIGNATURE_HEADER] == sign_commands(key, target, response.content)
    assert [c.id for c in parse_commands(response.content)] == [cid]
    # Bound to the target: the same body asked for with another cursor, slot or host does not verify.
    for other in (commands_path(slot, "node1") + "?after=1&wait=0", commands_path(slot, "node2") + "?after=0&wait=0",
                  commands_path(str(uuid.uuid4()), "node1") + "?after=0&wait=0"):
        assert response.headers[SIGNATURE_HEADER] != sign_commands(key, other, response.content)
    assert response.headers[SIGNATURE_HEADER] != sign_commands("0" * 64, target, response.content)
    # An empty answer is signed as well.
    empty = channel.poll(slot, "node1", f"after={cid}&wait=0")
    assert empty.headers[SIGNATURE_HEADER] == sign_commands(key, empty.target, empty.content)


def test_curl_digest_polls_and_gets_signed_json(channel, tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (scripts/bootstrap.sh installs it)")
    lease_id, slot = channel.lease()
    cid = channel.start(lease_id, "vm1")
    target = commands_path(slot, "node1") + "?after=0&wait=0.5"

    def curl(password: str) -> tuple[int, bytes, str]:
        body, headers = tmp_path / "body", tmp_path / "headers"
        result = subprocess.run(
            ["curl", "--silent", "--show-error", "--digest", "--user", f"node1:{password}",
             "--output", str(body), "--dump-header", str(headers), "--write-out", "%{http_code}",
             channel.url + target],
            capture_output=True, text=True, timeout=60, check=True,
        )
        return int(result.stdout), body.read_bytes(), headers.read_text()

    status, body, headers = curl(channel.nodes.node_key("node1"))
    assert status == 200
    assert json.loads(body) == {"commands": [{"id": cid, "op": "start-vm", "vm": vm_spec("vm1").to_dict()}]}
    signatures = [line.split(":", 1)[1].strip() for line in headers.splitlines()
                  if line.lower().startswith(SIGNATURE_HEADER.lower() + ":")]
    assert signatures == [sign_commands(channel.key(slot, "node1"), target, body)]
    status, body, _ = curl("not-the-secret")
    assert status == 401 and "commands" not in json.loads(body)


def test_a_poll_answer_spliced_from_stored_bodies_is_what_encoding_each_with_its_id_gives():
    stored = [(7, "start-vm", '{"op":"start-vm","vm":{"name":"a","memory_mb":16}}', 1.0),
              (8, "release", '{"op":"release"}', 2.0),
              (9, "odd", '{ "op" : "odd", "x": [1, 2] }', 3.0),  # not as queue_command writes: encoded again
              (10, "empty", "{}", 4.0),  # nothing to splice after
              (11, "blank", "{ }", 5.0)]
    answer = commands_answer(stored)
    assert json.loads(answer) == {"commands": [dict(json.loads(text), id=cid) for cid, _, text, _ in stored]}
    assert json.loads(commands_answer([])) == {"commands": []}


def test_a_command_body_with_an_id_of_its_own_is_refused_and_nothing_is_queued(channel):
    _lease_id, slot = channel.lease()
    with pytest.raises(ValueError, match="no 'id'"):
        channel.store.submit(lambda conn: command_ops.queue_command(
            conn, slot, "node1", {"op": "release", "id": 1}, time.time(), lambda *_: None)).result()
    assert channel.store.commands(slot) == []


# -- heartbeat --------------------------------------------------------------------------------------


def test_silent_for_is_zero_while_a_poll_is_open_and_grows_after(channel):
    lease_id, slot = channel.lease()
    target = (slot, "node1")
    channel.clock.now += 40.0
    assert channel.board.silent_for(target) == 40.0  # never heard: counted from the board's start
    assert channel.board.silent_for(target, since=channel.clock.now - 10.0) == 10.0
    poll = PollThread(channel, slot, "node1", "after=0&wait=30")
    poll.start()
    channel.wait_parked(slot, "node1")
    channel.clock.now += 500.0
    assert channel.board.silent_for(target) == 0.0  # open: alive however long it waits
    closed_at = channel.clock.now
    channel.start(lease_id, "vm1")
    assert len(channel.commands(poll.result(WOKEN_WITHIN_S))) == 1
    assert channel.board.silent_for(target) == 0.0  # heard just now (the clock has not moved)
    channel.clock.now = closed_at + 25.0
    assert channel.board.silent_for(target) == 25.0
    channel.clock.now = closed_at + 90.0
    assert channel.board.silent_for(target) == 90.0
    assert channel.commands(channel.poll(slot, "node1", "after=999&wait=0")) == []
    assert channel.board.silent_for(target) == 0.0  # a short poll is heard as well
    assert channel.board.silent_for((slot, "node2")) > 0  # another host's poll says nothing about this one


def test_silent_over_names_the_hosts_silent_for_longer_than_the_limit_as_silent_for_counts(channel):
    _lease_id, slot = channel.lease(hosts=("node1", "node2"))
    start = channel.clock.now
    assert channel.commands(channel.poll(slot, "node1", "after=999&wait=0")) == []  # heard at start
    poll = PollThread(channel, slot, "node2", "after=0&wait=30")
    poll.start()
    channel.wait_parked(slot, "node2")  # open all along: never silent
    channel.clock.now = start + 100.0
    candidates = [((slot, "node1"), None), ((slot, "node2"), None), ((slot, "node3"), start + 70.0),
                  ((slot, "node4"), None)]
    assert channel.board.silent_over(50.0, candidates) == [((slot, "node1"), 100.0), ((slot, "node4"), 100.0)]
    assert channel.board.silent_over(20.0, candidates)[1] == ((slot, "node3"), 30.0)  # counted from its since
    assert [channel.board.silent_for(target, since) for target, since in candidates] == [100.0, 0.0, 30.0, 100.0]
    assert channel.board.silent_over(100.0, candidates) == []  # longer than, not as long as
    assert channel.commands(channel.poll(slot, "node2", "after=999&wait=0")) == []  # a newer poll ends the open one
    assert channel.commands(poll.result(WOKEN_WITHIN_S)) == []


# -- the pilot's CommandPoller ----------------------------------------------------------------------


class Recorder:
    """What a CommandPoller handed on (on_commands) and whether it gave the slot up (on_gone)."""

    def __init__(self):
        self.batches: list[list[Command]] = []
        self.gone: list[str] = []
        self.polls_when_gone: list[int] = []
        self.poller: CommandPoller | None = None
        self.lock = threading.Lock()

    def on_commands(self, commands: list[Command]) -> None:
        with self.lock:
            self.batches.append(list(commands))

    def on_gone(self, reason: str) -> None:
        with self.lock:
            self.gone.append(reason)
            self.polls_when_gone.append(self.poller.polls)

    @property
    def ids(self) -> list[int]:
        with self.lock:
            return [c.id for batch in self.batches for c in batch]


def make_poller(channel_or_url, key: str, slot: str, host: str, recorder: Recorder, wait_s: float = 0.5,
                session: requests.Session | None = None) -> CommandPoller:
    url = channel_or_url if isinstance(channel_or_url, str) else channel_or_url.url
    if session is None:
        session = channel_or_url.session(host) if not isinstance(channel_or_url, str) else requests.Session()
    recorder.poller = CommandPoller(session, url, key, slot, host, on_commands=recorder.on_commands,
                                    on_gone=recorder.on_gone, wait_s=wait_s, request_timeout_s=5.0)
    return recorder.poller


def finish(poller: CommandPoller) -> None:
    """Stop the poller and wait for its thread (a poll on the wire ends within its wait)."""
    poller.stop()
    poller._thread.join(poller.wait_s + poller.request_timeout_s + 5)
    assert not poller._thread.is_alive()


class StandIn:
    """A tiny aiohttp server of the test's own on 127.0.0.1 that answers every command poll with ``answer(request)``.

    ``answer`` gives (body, signature or None). It stands for a service (or
    something in between) that the pilot must not trust blindly.
    """

    def __init__(self, answer):
        self.answer = answer
        self.targets: list[str] = []
        app = web.Application()
        app.router.add_get(COMMANDS_PATH, self._handle)
        self.thread = ReceiverThread(app)
        self.url = self.thread.start()

    async def _handle(self, request: web.Request) -> web.Response:
        import asyncio

        self.targets.append(request.raw_path)
        body, signature = self.answer(request)
        await asyncio.sleep(0.02)  # a little like a wait, so the poller does not spin
        headers = {SIGNATURE_HEADER: signature} if signature is not None else {}
        return web.Response(body=body, content_type="application/json", headers=headers)

    def close(self) -> None:
        self.thread.stop()


def test_the_poller_hands_on_each_queued_command_once_in_id_order(channel):
    lease_id, slot = channel.lease(hosts=("node1", "node2"))
    before = channel.start(lease_id, "vm0", "node1")  # queued before the pilot polls at all
    recorder = Recorder()
    poller = make_poller(channel, channel.key(slot, "node1"), slot, "node1", recorder)
    poller.start()
    try:
        wait_until(lambda: recorder.ids == [before], "the first command to reach the poller")
        queued = [before]
        queued.append(channel.start(lease_id, "vm1", "node1"))
        channel.start(lease_id, "vm-other", "node2")  # not this host's
        queued.append(channel.stop(lease_id, "vm0"))
        queued.append(channel.start(lease_id, "vm2", "node1"))
        wait_until(lambda: len(recorder.ids) >= len(queued), "every queued command to reach the poller")
        polls = poller.polls
        wait_until(lambda: poller.polls >= polls + 3, "three more polls")
        assert recorder.ids == queued  # in id order, each once, none of node2's
        assert poller.cursor == queued[-1]
        ops = [c.op for batch in recorder.batches for c in batch]
        assert ops == ["start-vm", "start-vm", "stop-vm", "start-vm"]
        assert recorder.gone == []
    finally:
        finish(poller)


def test_a_repeated_answer_hands_on_nothing_twice():
    queued: list[Command] = [Command(2, "release"), Command(1, "stop-vm", name="vm1")]
    key = "a" * 64

    def answer(request):  # every poll gets every command so far, whatever its cursor, correctly signed
        body = commands_body(queued)
        return body, sign_commands(key, request.raw_path, body)

    stand_in = StandIn(answer)
    recorder = Recorder()
    poller = make_poller(stand_in.url, key, "slot-1", "node1", recorder)
    poller.start()
    try:
        wait_until(lambda: poller.polls >= 4, "four polls")
        assert recorder.ids == [1, 2]  # sorted, and once although every answer repeated them
        assert len(recorder.batches) == 1
        assert poller.cursor == 2
        assert stand_in.targets[0] == commands_path("slot-1", "node1") + "?after=0&wait=0.5"
        assert stand_in.targets[-1] == commands_path("slot-1", "node1") + "?after=2&wait=0.5"
        queued.append(Command(3, "stop-vm", name="vm2", force=True))
        wait_until(lambda: len(recorder.ids) == 3, "the third command")
        polls = poller.polls
        wait_until(lambda: poller.polls >= polls + 3, "three more polls")
        assert recorder.ids == [1, 2, 3] and recorder.batches[-1] == [Command(3, "stop-vm", name="vm2", force=True)]
    finally:
        finish(poller)
        stand_in.close()


@pytest.mark.parametrize("how", ["wrong key", "missing", "another target", "another body", "not hex"])
def test_an_answer_with_a_wrong_signature_is_ignored(how):
    key = "b" * 64
    body = commands_body([Command(1, "release"), Command(2, "stop-vm", name="vm1", force=True)])

    def answer(request):
        if how == "wrong key":
            return body, sign_commands("c" * 64, request.raw_path, body)
        if how == "missing":
            return body, None
        if how == "another target":  # a recorded answer for another host, replayed
            return body, sign_commands(key, commands_path("slot-1", "node2") + "?after=0&wait=0.5", body)
        if how == "another body":
            return body, sign_commands(key, request.raw_path, commands_body([]))
        return body, "sha256=" + "z" * 64

    stand_in = StandIn(answer)
    recorder = Recorder()
    poller = make_poller(stand_in.url, key, "slot-1", "node1", recorder)
    poller.start()
    try:
        wait_until(lambda: poller.polls >= 4, "four polls", timeout=30)  # it backs off, and keeps polling
        assert recorder.batches == [] and recorder.gone == []
        assert poller.cursor == 0
        assert all(t.endswith("?after=0&wait=0.5") for t in stand_in.targets)
        assert poller.running
    finally:
        finish(poller)
        stand_in.close()


def test_the_poller_calls_on_gone_once_on_404_and_stops(channel):
    lease_id, slot = channel.lease(hosts=("node1",))
    recorder = Recorder()
    poller = make_poller(channel, channel.key(slot, "node1"), slot, "node1", recorder)
    poller.start()
    try:
        cid = channel.start(lease_id, "vm1")
        wait_until(lambda: recorder.ids == [cid], "the command to reach the poller")
        channel.notify(slot, "node1", "unreserved", memory_mb=0)  # its hold ended: the next poll is 404
        wait_until(lambda: recorder.gone, "on_gone")
        poller._thread.join(10)
        assert not poller._thread.is_alive() and not poller.running
        assert len(recorder.gone) == 1 and "404" in recorder.gone[0]
        assert recorder.ids == [cid]
        assert recorder.polls_when_gone == [poller.polls]  # the 404 was its last poll
    finally:
        finish(poller)


def test_the_poller_of_a_host_the_service_does_not_hold_gives_up_at_the_first_poll(channel):
    _, slot = channel.lease(hosts=("node1",), nodes=2)
    recorder = Recorder()
    poller = make_poller(channel, channel.key(slot, "node2"), slot, "node2", recorder)
    poller.start()
    poller._thread.join(20)
    assert not poller._thread.is_alive()
    assert poller.polls == 1 and len(recorder.gone) == 1 and recorder.batches == []


def test_a_poller_with_the_wrong_secret_keeps_trying_and_hands_on_nothing(channel):
    lease_id, slot = channel.lease()
    channel.start(lease_id, "vm1")
    recorder = Recorder()
    poller = make_poller(channel, channel.key(slot, "node1"), slot, "node1", recorder, session=channel.session(key="0" * 64))
    poller.start()
    try:
        wait_until(lambda: poller.polls >= 3, "three polls", timeout=30)
        assert recorder.batches == [] and recorder.gone == []  # 401 is not 404: the pilot does not give up
    finally:
        finish(poller)


def test_a_poll_answered_429_waits_its_retry_after_before_the_next():
    """A node over its share: the service says 429 with Retry-After, and the pilot's poller keeps that quiet."""
    key = "a" * 64
    arrivals: list[float] = []

    async def busy_then_serving(request: web.Request) -> web.Response:
        arrivals.append(time.monotonic())
        if len(arrivals) <= 3:
            return web.json_response({"result": "too-many"}, status=429, headers={"Retry-After": "1"})
        body = commands_body([])
        return web.Response(body=body, content_type="application/json",
                            headers={SIGNATURE_HEADER: sign_commands(key, request.raw_path, body)})

    app = web.Application()
    app.router.add_get(COMMANDS_PATH, busy_then_serving)
    server = ReceiverThread(app)
    recorder = Recorder()
    poller = make_poller(server.start(), key, "slot-1", "node1", recorder)
    poller.start()
    try:
        wait_until(lambda: poller.polls >= 4, "a poll answered 200 after three 429s")
    finally:
        finish(poller)
        server.stop()
    gaps = [later - earlier for earlier, later in zip(arrivals[:4], arrivals[1:4])]
    assert min(gaps) >= 0.99, gaps  # each waited the second it was asked to (its own backoff is 0.1 s)


def test_the_board_ends_a_wait_at_its_deadline_unless_it_was_forgotten():
    board = CommandBoard()

    async def waits():
        loop = asyncio.get_running_loop()
        board.attach(loop)
        ended, forgotten, done_first = loop.create_future(), loop.create_future(), loop.create_future()
        when = loop.time() + 0.1
        steps = {board.end_at(when, ended), board.end_at(when, forgotten), board.end_at(when, done_first)}
        assert len(steps) == 1  # one step, one timer for the three
        board.forget_end(steps.pop(), forgotten)
        done_first.set_result("woken")  # a commit came first
        assert await ended is DEADLINE
        assert loop.time() >= when - 0.001  # never before its deadline (asyncio's clock resolution aside)
        await asyncio.sleep(0)
        return forgotten.done(), done_first.result()

    assert asyncio.run(asyncio.wait_for(waits(), 10)) == (False, "woken")
