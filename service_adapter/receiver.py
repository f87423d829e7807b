"""The HTTP endpoints of the pilots: ``POST /pilot/v2/notifications`` and the command long-poll.

Checks run cheapest-first and each refusal changes nothing: digest (401)
-> size (413) -> JSON and fields (400) -> the host is the node that
authenticated (403) -> the slot is known (404) -> the body signature with
that (slot, host)'s key (401) -> clock skew (422) -> on a host's first
report, the batch system gave that host to the slot's job (403; 503 while
it cannot say) -> claims, slot and seq, decided by the store (422, 404,
409). A notification is answered 200 only after the store has committed it.

``GET /pilot/v2/slots/{slot}/hosts/{host}/commands?after=N&wait=S``
answers at once with the commands above ``N`` for that pilot, or holds the
request up to ``S`` seconds (at most ``MAX_POLL_WAIT_S``) until one is
queued (:mod:`service_adapter.commandboard` wakes it, and answers every
waiting poll at once when the receiver shuts down). 401 without a valid
digest, 400 for a malformed query, 403 for another host's commands, 404
when the slot or host is unknown, the host has not reserved, has ended its
hold or was given up as lost, or the lease has ended: the pilot then gives
the node back. The answer carries ``X-Pilot-Signature``, an HMAC over the
request target and the body with that (slot, host)'s key, which no other
node holds, so a pilot acts only on commands meant for it.

aiohttp serves it: one event loop handles many pilots' keep-alive
connections cheaply, and the blocking SQLite commit runs in the store's
writer thread, not on the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from datetime import timedelta

from aiohttp import web

from workspace_common.protocol import (
    COMMANDS_PATH,
    MAX_BODY_BYTES,
    MAX_COMMAND,
    MAX_POLL_WAIT_S,
    NOTIFICATIONS_PATH,
    SIGNATURE_HEADER,
    Notification,
    ProtocolError,
    check_target,
    parse_time,
    sign_commands,
    signature_matches,
    utc_now,
)
from service_adapter.allocation import Allocations
from service_adapter.commandboard import DEADLINE, CommandBoard
from service_adapter.connections import GUARD_KEY, BodyTimeout, ConnectionGuard, read_within, trust
from service_adapter.digest import DigestVerifier
from service_adapter.hostshares import SHARES_KEY, HostShares, admitted, retry_after_header
from service_adapter.metrics import METRICS_KEY
from service_adapter.routetable import Route, add_routes
from service_adapter.nodekeys import NodeAccounts
from service_adapter.refusals import REFUSALS
from service_adapter.serverthread import ReceiverThread  # noqa: F401 (re-exported: its home until it served any app)
from service_adapter.store import HOLD_ENDED, Store, Verdict
from service_adapter.storeaway import store_away_middleware

log = logging.getLogger(__name__)

STORE_KEY = web.AppKey("store", Store)
VERIFIER_KEY = web.AppKey("verifier", DigestVerifier)
SKEW_KEY = web.AppKey("max_skew", timedelta)
BOARD_KEY = web.AppKey("command_board", CommandBoard)
NODES_KEY = web.AppKey("nodes", NodeAccounts)
ALLOCATIONS_KEY = web.AppKey("allocations", object)
#: On a pilot endpoint's response: the ``result`` it told the pilot (typed where aiohttp has response keys).
RESULT_KEY = web.ResponseKey("result", str) if hasattr(web, "ResponseKey") else "result"
_AFTER_RE = re.compile(r"[0-9]{1,19}")
_WAIT_RE = re.compile(r"[0-9]{1,6}(?:\.[0-9]{1,6})?")
#: The query as the pilot writes it (undecoded): read without building the request's query mapping, which was
#: a twentieth of a parked poll's renewal. Anything else takes the full checks.
_PILOT_QUERY_RE = re.compile(f"after=({_AFTER_RE.pattern})&wait=({_WAIT_RE.pattern})")
#: The most commands one poll answer carries (the rest come with the next poll).
POLL_BATCH = 64


def answer(status: int, result: str, detail: str = "", headers=None) -> web.Response:
    """A pilot endpoint's JSON answer: ``{"result": result[, "detail": detail]}`` with ``status``."""
    body = {"result": result}
    if detail:
        body["detail"] = detail
    response = web.json_response(body, status=status, headers=headers)
    response[RESULT_KEY] = result  # for the metrics: what the pilot was told, without parsing the body
    return response


def authenticate(request: web.Request, what: str):
    """(the digest result, None) for a pilot that authenticated (its connection is then trusted) and is within
    its node's share (:mod:`service_adapter.hostshares`), else (the result, the refusal): 401 with a fresh
    challenge (a wrong credential is logged as a refusal of ``what``), or 429 with Retry-After."""
    verifier = request.app[VERIFIER_KEY]
    auth = verifier.verify(request.method, request.raw_path, request.headers.get("Authorization"))
    if not auth.ok:
        if request.headers.get("Authorization"):
            REFUSALS.refused(request.remote, "%s: %s", what, auth.reason)
        return auth, _unauthorized(verifier, auth.reason, stale=auth.stale)
    trust(request)
    wait = admitted(request, auth.account.user)
    if wait is not None:
        REFUSALS.refused(request.remote, "%s of node %s: over its share, 429", what, auth.account.user)
        return auth, answer(429, "too-many", "this node is over its share of the service: try again after "
                            "Retry-After seconds", headers=retry_after_header(wait))
    return auth, None


def _unauthorized(verifier: DigestVerifier, detail: str, stale: bool = False) -> web.Response:
    response = answer(401, "unauthorized", detail)
    for challenge in verifier.challenges(stale=stale):
        response.headers.add("WWW-Authenticate", challenge)
    return response


async def handle_notification(request: web.Request) -> web.Response:
    """POST /pilot/v2/notifications: a pilot's signed, timestamped report; 200 once the store committed it.

    The checks and their refusals are the module's text's; the answer is
    counted in the service's metrics (when it keeps them).
    """
    started = time.monotonic()
    response = await receive_notification(request)
    metrics = request.app.get(METRICS_KEY)
    if metrics is not None:
        result = response.get(RESULT_KEY, str(response.status))
        if response.status == 401 and not request.headers.get("Authorization"):
            result = "challenge"  # a pilot's first request: asked for credentials, not refused
        metrics.notification(result, time.monotonic() - started)
    return response


async def receive_notification(request: web.Request) -> web.Response:
    """Verify, validate and store one notification; answer with the status codes of docs/protocol.md."""
    verifier = request.app[VERIFIER_KEY]
    auth, refusal = authenticate(request, "notification")
    if refusal is not None:
        return refusal
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return answer(413, "too-large", f"body over {MAX_BODY_BYTES} bytes")
    try:
        body = await read_within(request, request.read())
    except web.HTTPRequestEntityTooLarge:
        return answer(413, "too-large", f"body over {MAX_BODY_BYTES} bytes")
    except BodyTimeout as exc:
        REFUSALS.refused(request.remote, "notification: %s", exc)
        return answer(408, "timeout", str(exc))
    try:
        notification = Notification.from_json(body)
    except ProtocolError as exc:
        REFUSALS.refused(request.remote, "notification: %s", exc)
        return answer(exc.status, "invalid", str(exc))
    node = auth.account.user
    if notification.host != node:
        REFUSALS.refused(request.remote, "node %s sent a notification as host %s", node, notification.host)
        return answer(403, "forbidden", f"authenticated as node {node}: a node speaks only for itself")
    store = request.app[STORE_KEY]
    access = store.slot_access(notification.slot, node)
    if access is None:
        return answer(404, "unknown-slot")
    key = request.app[NODES_KEY].slot_key(node, notification.slot, access.secret)
    if not signature_matches(key, body, request.headers.get(SIGNATURE_HEADER)):
        REFUSALS.refused(request.remote, "notification of %s/%s: bad body signature", notification.slot, node)
        return _unauthorized(verifier, "missing or wrong " + SIGNATURE_HEADER + " (this slot's key on this node)")
    skew = abs(utc_now() - parse_time(notification.sent_at))
    if skew > request.app[SKEW_KEY]:
        REFUSALS.refused(
            request.remote, "%s/%s seq %d: sent_at off by %.1f s",
            notification.slot, notification.host, notification.seq, skew.total_seconds(),
        )
        return answer(422, "skew", f"sent_at is {skew.total_seconds():.1f} s off the service clock")
    if not access.host_known:
        refusal = await _check_allocation(request, notification.slot, node, access.job_id)
        if refusal is not None:
            return refusal
    verdict = await store.record_notification_on_loop(
        notification, body, auth.account.user, slack_s=request.app[SKEW_KEY].total_seconds(),
    )
    if verdict is Verdict.ACCEPTED:
        log.info(
            "%s/%s seq %d: %s (code %d)",
            notification.slot, notification.host, notification.seq, notification.state, notification.code,
        )
    elif verdict is not Verdict.REPEAT:
        REFUSALS.refused(
            request.remote, "%s/%s seq %d: %s",
            notification.slot, notification.host, notification.seq, verdict.name.lower(),
        )
    return answer(verdict.status, verdict.result, verdict.detail)


async def _check_allocation(request: web.Request, slot: str, host: str, job_id: str | None) -> web.Response | None:
    """None if the batch system gave ``host`` to the slot's job; else the answer that refuses it."""
    allocations = request.app[ALLOCATIONS_KEY]
    if allocations is None:
        return None  # a receiver without a batch system (tests of the protocol alone)
    if job_id is None:
        return answer(503, "allocation-unknown", "the slot's job is not submitted yet: try again",
                       headers={"Retry-After": "1"})
    holds = await allocations.holds_on_loop(job_id, host)
    if holds is None:
        return answer(503, "allocation-unknown", f"the batch system cannot say yet which nodes job {job_id} has: "
                       "try again", headers={"Retry-After": "1"})
    if not holds:
        REFUSALS.refused(request.remote, "host %s is not in the allocation of job %s (slot %s)", host, job_id, slot)
        return answer(403, "not-allocated", f"the batch system did not give host {host} to this slot's job")
    return None


def _poll_query(request: web.Request) -> tuple[int, float]:
    """(after, wait) from the query; ProtocolError for anything else."""
    plain = _PILOT_QUERY_RE.fullmatch(request.raw_path.partition("?")[2])
    if plain is not None:
        return _poll_values(*plain.groups())
    unknown = sorted(set(request.query) - {"after", "wait"})
    if unknown:
        raise ProtocolError(f"unknown query parameter(s) {', '.join(unknown)}: use after and wait")
    if any(len(request.query.getall(key, [])) > 1 for key in ("after", "wait")):
        raise ProtocolError("after and wait may each be given once")
    # Plain ASCII digits only: int() and float() would also take "1_0", blanks and other scripts' digits.
    after_text, wait_text = request.query.get("after", "0"), request.query.get("wait", "0")
    if not _AFTER_RE.fullmatch(after_text) or not _WAIT_RE.fullmatch(wait_text):
        raise ProtocolError("after must be a whole number and wait a number of seconds")
    return _poll_values(after_text, wait_text)


def _poll_values(after_text: str, wait_text: str) -> tuple[int, float]:
    """(after, wait) from their checked digits; ProtocolError for an ``after`` out of range."""
    after, wait = int(after_text), float(wait_text)
    if not 0 <= after <= MAX_COMMAND:
        raise ProtocolError(f"after: {after} is outside 0..{MAX_COMMAND}")
    if not 0 <= wait < float("inf"):
        raise ProtocolError("wait: must be 0 or more seconds")
    return after, min(wait, MAX_POLL_WAIT_S)


def holds_now(view, access) -> bool:
    """Whether a poll's first read (:meth:`Store.poll_view`, the slot's access record) shows its host holding memory
    for the slot now: reserved, not ended, not lost, the lease going on. If not, the pilot channel answers 404."""
    return view is not None and access is not None and _holding(*view[0])


def _holding(reserved_at: float | None, state: str, lost_at: float | None, lease_ended: bool) -> bool:
    return not (lease_ended or reserved_at is None or state in HOLD_ENDED or lost_at is not None)


def held_access(request: web.Request, slot: str, host: str):
    """The (slot, host)'s access record if that host holds memory for the slot now (:func:`holds_now`); None
    otherwise (the endpoints of a holding pilot other than its poll: its images)."""
    store = request.app[STORE_KEY]
    found = store.pilot(slot, host)
    access = store.slot_access(slot, host)
    if found is None or access is None:
        return None
    pilot, lease_ended = found
    return access if _holding(pilot.reserved_at, pilot.state, pilot.lost_at, lease_ended) else None


async def handle_commands(request: web.Request) -> web.Response:
    """GET .../commands?after=N&wait=S: the pilot's commands above N, signed; held up to S s until one is queued."""
    auth, refusal = authenticate(request, "command poll")
    if refusal is not None:
        return refusal
    slot, host = request.match_info["slot"], request.match_info["host"]
    try:
        check_target(slot, host)
        after, wait = _poll_query(request)
    except ProtocolError as exc:
        return answer(400, "invalid", str(exc))
    if host != auth.account.user:
        REFUSALS.refused(request.remote, "node %s polled the commands of host %s", auth.account.user, host)
        return answer(403, "forbidden", f"authenticated as node {auth.account.user}: a node polls only its own commands")
    store, board = request.app[STORE_KEY], request.app[BOARD_KEY]
    view = store.poll_view(slot, host, after, POLL_BATCH)  # the pilot and its commands: one statement
    access = store.slot_access(slot, host)
    if not holds_now(view, access):
        return answer(404, "unknown-slot", "no held slot for this host: give the node back")
    commands = view[1]
    target = (slot, host)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    token = board.poll_started(target)  # ends this target's older poll, if one waits
    try:
        while True:
            remaining = deadline - loop.time()
            if commands or remaining <= 0 or board.closing or not board.current(target, token):
                break
            # Registered after the read with no await between them: a commit since the read wakes this, for
            # the board delivers every wake on this loop (CommandBoard.wake), after this code yields.
            woken = board.register(target)
            try:
                # The board resolves the waiter at the deadline: a fifth of the loop's time with 10,000 parked
                # polls went into asyncio.wait's own bookkeeping (issue 17), and a timer each into its heap.
                step = board.end_at(deadline, woken)
                try:
                    if await woken is DEADLINE:
                        # No commit queued a command for it since the read (that would have woken it first):
                        # nothing to read again (a third of a parked poll's store reads).
                        break
                finally:
                    board.forget_end(step, woken)
            finally:
                board.unregister(target, woken)
            commands = store.pending_commands(slot, host, after, POLL_BATCH)
    finally:
        board.poll_ended(target, token)
    metrics = request.app.get(METRICS_KEY)
    if commands and metrics is not None:
        metrics.commands_handed([(op, queued_at) for _, op, _, queued_at in commands])
    body = commands_answer(commands)
    key = request.app[NODES_KEY].slot_key(host, slot, access.secret)
    signature = sign_commands(key, request.raw_path, body)
    return web.Response(body=body, content_type="application/json", headers={SIGNATURE_HEADER: signature})


def commands_answer(commands: list[tuple[int, str, str, float]]) -> bytes:
    """A poll's answer, ``{"commands": [{"id": N, ...the stored body...}, ...]}``, spliced from the stored
    bodies (compact JSON objects without an "id": :func:`service_adapter.store.commands.queue_command`)
    rather than parsed and encoded again."""
    if not commands:
        return _NO_COMMANDS
    parts = []
    for cid, _op, text, _queued_at in commands:
        if text.startswith('{"'):  # an object with a first key, as queue_command writes it
            parts.append(f'{{"id":{cid:d},{text[1:]}')
        else:  # not what queue_command writes: the slow, sure way
            parts.append(json.dumps(dict(json.loads(text), id=cid), separators=(",", ":")))
    return ('{"commands":[' + ",".join(parts) + "]}").encode()


_NO_COMMANDS = b'{"commands":[]}'

#: The pilots' endpoints (digest as the node; see the module's text for each check).
ROUTES = (
    Route("POST", NOTIFICATIONS_PATH, handle_notification),
    Route("GET", COMMANDS_PATH, handle_commands),
)


def make_app(store: Store, verifier: DigestVerifier, max_skew_s: float = 300.0,
             board: CommandBoard | None = None, guard: ConnectionGuard | None = None, *,
             allocations: Allocations | None = None, shares: HostShares | None = None) -> web.Application:
    """The receiver as an aiohttp application (bodies over the cap are refused while read).

    ``verifier`` holds the pilots' accounts, a :class:`NodeAccounts`: one per
    node, whose user name is the host it may speak for. ``allocations``
    checks a host against its slot's job the first time it reports; None
    only for a receiver with no batch system behind it (protocol tests).

    ``board`` (one is made if None) is where command polls wait; the store
    wakes it after each commit that queues commands. ``guard`` (one with
    the defaults if None) caps and times the connections; serve the app
    with :func:`service_adapter.connections.start_serving` for it to see them.
    ``shares`` (one with the defaults if None) is what each node may take
    of the service at once (:mod:`service_adapter.hostshares`).
    """
    guard = guard if guard is not None else ConnectionGuard()
    shares = shares if shares is not None else HostShares()
    app = web.Application(client_max_size=MAX_BODY_BYTES,
                          middlewares=[guard.middleware, shares.middleware, store_away_middleware(store)])
    app[GUARD_KEY] = guard
    app[SHARES_KEY] = shares
    app[STORE_KEY] = store
    app[VERIFIER_KEY] = verifier
    if not isinstance(verifier.accounts, NodeAccounts):
        raise TypeError("the pilots' verifier must hold NodeAccounts (one account per node)")
    app[NODES_KEY] = verifier.accounts
    app[ALLOCATIONS_KEY] = allocations
    app[SKEW_KEY] = timedelta(seconds=max_skew_s)
    board = board if board is not None else CommandBoard()
    app[BOARD_KEY] = board
    store.set_command_listener(board.wake)

    async def attach(app: web.Application) -> None:
        board.attach(asyncio.get_running_loop())

    async def release_polls(app: web.Application) -> None:
        board.close()  # answer the parked polls now: shutdown waits for every running handler

    app.on_startup.append(attach)
    app.on_shutdown.append(release_polls)
    add_routes(app, ROUTES)
    return app
