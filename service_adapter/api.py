"""The operators' HTTP API, served by the same aiohttp application as the pilots' receiver.

=======  ===============================  ==========================================
method   path                             answer
=======  ===============================  ==========================================
POST     /api/v1/leases                   201, the new lease (JSON body: nodes,
                                          memory_mb, duration_s)
GET      /api/v1/leases[?state=&owner=]   200, ``{"leases": [...]}``
GET      /api/v1/leases/{id}              200, the lease
POST     /api/v1/leases/{id}/release      202, the lease (release under way)
GET      /api/v1/usage[?owner=&lease=]    200, ``{"node_seconds", "mb_seconds", "leases"}``
=======  ===============================  ==========================================

Every request is digest-authenticated (RFC 7616, SHA-256, ``qop=auth``)
against the operators' accounts, with their own realm and verifier: a
pilot's credentials do not work here, nor an operator's on the pilots'
endpoints. The authenticated operator owns the leases it reserves.

Errors are one JSON line, ``{"error": "..."}``: 400 bad JSON or values, 401
no or wrong credentials (with a fresh challenge), 404 unknown lease or path,
405 wrong method, 413 body too large, 502 the batch system refused the job.
The lease manager's calls block (reserve submits to the batch system), so
each runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re

from aiohttp import web

from service_adapter.digest import Account, DigestVerifier
from service_adapter.lease import LEASE_STATES, LeaseError, UnknownLease

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
MAX_API_BODY = 4096
MAX_NODES = 100_000
MAX_MEMORY_MB = 2**31 - 1
MAX_DURATION_S = 10**8
_LEASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

MANAGER_KEY = web.AppKey("lease_manager", object)
OPERATORS_KEY = web.AppKey("operator_verifier", DigestVerifier)
OPERATOR_KEY = "operator"  # request key: the authenticated operator's Account


def _error(status: int, message: str, headers=None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def _api_auth(request: web.Request, handler):
    """Digest-authenticate every request under /api/ against the operators' verifier."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    verifier = request.app[OPERATORS_KEY]
    header = request.headers.get("Authorization")
    auth = verifier.verify(request.method, request.raw_path, header)
    if not auth.ok:
        if header:
            log.warning("API: refused %s %s from %s: %s", request.method, request.path, request.remote, auth.reason)
        response = _error(401, f"authentication required: digest (SHA-256) as an operator of realm {verifier.realm}")
        for challenge in verifier.challenges(stale=auth.stale):
            response.headers.add("WWW-Authenticate", challenge)
        return response
    request[OPERATOR_KEY] = auth.account
    try:
        return await handler(request)
    except web.HTTPException as exc:
        # aiohttp's own 404/405 (unknown path, wrong method) as one JSON line too.
        if exc.status == 405:
            return _error(405, f"{request.method} is not allowed on {request.path}", headers=_allow(exc))
        if exc.status >= 400:
            return _error(exc.status, f"{exc.reason.lower()}: {request.path}")
        raise


def _allow(exc: web.HTTPException):
    allow = exc.headers.get("Allow") if exc.headers else None
    return {"Allow": allow} if allow else None


async def _read_json(request: web.Request) -> dict:
    """The request's JSON object, or an HTTP error response raised as an exception."""
    if request.content_length is not None and request.content_length > MAX_API_BODY:
        raise _Refused(413, f"body over {MAX_API_BODY} bytes")
    try:
        body = await request.read()  # the app caps what is read (make_app's client_max_size)
    except web.HTTPRequestEntityTooLarge:
        raise _Refused(413, f"body over {MAX_API_BODY} bytes") from None
    if len(body) > MAX_API_BODY:
        raise _Refused(413, f"body over {MAX_API_BODY} bytes")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Refused(400, f"the body is not JSON: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise _Refused(400, "the body must be a JSON object")
    return data


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _int_field(data: dict, name: str, high: int) -> int:
    value = data.get(name)
    if value is None:
        raise _Refused(400, f"'{name}' is missing: a whole number from 1 to {high}")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise _Refused(400, f"'{name}' must be a whole number from 1 to {high}, not {json.dumps(value)[:40]}")
    return value


def _duration_field(data: dict) -> float:
    value = data.get("duration_s")
    if value is None:
        raise _Refused(400, f"'duration_s' is missing: seconds, above 0 and at most {MAX_DURATION_S}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_DURATION_S:
        raise _Refused(
            400, f"'duration_s' must be seconds, above 0 and at most {MAX_DURATION_S}, not {json.dumps(value)[:40]}"
        )
    return float(value)


def _lease_id(request: web.Request) -> str:
    lease_id = request.match_info["lease_id"]
    if not _LEASE_ID_RE.match(lease_id):
        raise _Refused(404, f"no lease {lease_id[:64]!r}")
    return lease_id


def _refusals(handler):
    """Turn :class:`_Refused` and the manager's errors into one-line JSON answers."""

    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except _Refused as exc:
            return _error(exc.status, exc.message)
        except UnknownLease as exc:
            lease_id = exc.args[0] if exc.args else "?"
            return _error(404, f"no lease {lease_id!r}")
        except LeaseError as exc:
            log.warning("API: %s %s by %s: %s", request.method, request.path, _who(request), exc)
            return _error(502, f"the batch system refused: {_one_line(exc)}")

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _who(request: web.Request) -> str:
    account: Account | None = request.get(OPERATOR_KEY)
    return account.user if account else "?"


@_refusals
async def create_lease(request: web.Request) -> web.Response:
    """POST /api/v1/leases: reserve nodes x memory_mb for duration_s; 201 with the lease."""
    data = await _read_json(request)
    unknown = sorted(set(data) - {"nodes", "memory_mb", "duration_s"})
    if unknown:
        raise _Refused(400, f"unknown field(s) {', '.join(unknown)}: give nodes, memory_mb and duration_s")
    nodes = _int_field(data, "nodes", MAX_NODES)
    memory_mb = _int_field(data, "memory_mb", MAX_MEMORY_MB)
    duration_s = _duration_field(data)
    manager = request.app[MANAGER_KEY]
    owner = _who(request)
    try:
        info = await asyncio.to_thread(manager.reserve, nodes, memory_mb, duration_s, owner=owner)
    except ValueError as exc:
        raise _Refused(400, _one_line(exc)) from None
    log.info("API: %s reserved lease %s: %d x %d MB for %g s", owner, info.id, nodes, memory_mb, duration_s)
    body = info.to_json()
    return web.json_response(body, status=201, headers={"Location": f"{PREFIX}/leases/{info.id}"})


@_refusals
async def list_leases(request: web.Request) -> web.Response:
    """GET /api/v1/leases[?state=S[,S...]][&owner=O]: the leases, newest first as the manager orders them."""
    unknown = sorted(set(request.query) - {"state", "owner"})
    if unknown:
        raise _Refused(400, f"unknown query parameter(s) {', '.join(unknown)}: use state and owner")
    states = [s for value in request.query.getall("state", []) for s in value.split(",") if s]
    known = tuple(LEASE_STATES)
    bad = [s for s in states if s not in known]
    if bad:
        raise _Refused(400, f"unknown state {bad[0]!r}: one of {', '.join(known)}")
    owner = request.query.get("owner") or None
    manager = request.app[MANAGER_KEY]
    infos = await asyncio.to_thread(manager.list, states=states or None, owner=owner)
    return web.json_response({"leases": [info.to_json() for info in infos]})


@_refusals
async def show_lease(request: web.Request) -> web.Response:
    """GET /api/v1/leases/{id}: one lease."""
    lease_id = _lease_id(request)
    info = await asyncio.to_thread(request.app[MANAGER_KEY].get, lease_id)
    return web.json_response(info.to_json())


@_refusals
async def release_lease(request: web.Request) -> web.Response:
    """POST /api/v1/leases/{id}/release: end the lease early (idempotent); 202 with the lease."""
    lease_id = _lease_id(request)
    if request.content_length:
        await _read_json(request)  # tolerated (e.g. "{}"), but it must be small and JSON
    info = await asyncio.to_thread(request.app[MANAGER_KEY].release, lease_id)
    log.info("API: %s released lease %s (now %s)", _who(request), lease_id, getattr(info, "state", "?"))
    return web.json_response(info.to_json(), status=202)


@_refusals
async def usage(request: web.Request) -> web.Response:
    """GET /api/v1/usage[?owner=O][&lease=ID]: node-seconds and MB-seconds used."""
    unknown = sorted(set(request.query) - {"owner", "lease"})
    if unknown:
        raise _Refused(400, f"unknown query parameter(s) {', '.join(unknown)}: use owner and lease")
    owner = request.query.get("owner") or None
    lease_id = request.query.get("lease") or None
    used = await asyncio.to_thread(request.app[MANAGER_KEY].usage, lease_id=lease_id, owner=owner)
    body = used.to_json()
    if owner is not None:
        body.setdefault("owner", owner)
    if lease_id is not None:
        body.setdefault("lease", lease_id)
    return web.json_response(body)


def add_api(app: web.Application, manager, verifier: DigestVerifier) -> web.Application:
    """Add the operator API to ``app`` (built by :func:`service_adapter.receiver.make_app`).

    ``verifier`` holds the operators' accounts; its realm must differ from
    the pilots' verifier's, so neither side's credentials work for the other.
    """
    from service_adapter.receiver import VERIFIER_KEY

    pilots = app.get(VERIFIER_KEY)
    if pilots is not None and pilots.realm == verifier.realm:
        raise ValueError("the operators' realm must differ from the pilots' realm")
    app[MANAGER_KEY] = manager
    app[OPERATORS_KEY] = verifier
    app.middlewares.append(_api_auth)
    app.router.add_post(f"{PREFIX}/leases", create_lease)
    app.router.add_get(f"{PREFIX}/leases", list_leases)
    app.router.add_get(PREFIX + "/leases/{lease_id}", show_lease)
    app.router.add_post(PREFIX + "/leases/{lease_id}/release", release_lease)
    app.router.add_get(f"{PREFIX}/usage", usage)
    return app
