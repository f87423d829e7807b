"""Who may use the operators' HTTP API: digest (SHA-256) against the operators' accounts, failed logins held back.

:func:`api_auth` is the middleware :func:`service_adapter.api.add_api`
puts on the application: every request under ``/api/`` (and ``/metrics``)
must authenticate as an operator, with the operators' realm and verifier,
so a pilot's credentials never work here; failed logins are throttled per
source address (:mod:`service_adapter.loginthrottle`: 429 with
Retry-After). aiohttp's own 404 and 405 answers become one JSON line too.
"""

from __future__ import annotations

from aiohttp import web

from service_adapter.apiparts import OPERATOR_KEY, OPERATORS_KEY, json_error
from service_adapter.connections import trust
from service_adapter.hostshares import retry_after_header
from service_adapter.loginthrottle import LoginThrottle
from service_adapter.refusals import REFUSALS

THROTTLE_KEY = web.AppKey("login_throttle", LoginThrottle)


@web.middleware
async def api_auth(request: web.Request, handler):
    """Digest-authenticate every request under /api/ (and /metrics) against the operators' verifier."""
    if not (request.path.startswith("/api/") or request.path == "/metrics"):
        return await handler(request)
    verifier = request.app[OPERATORS_KEY]
    header = request.headers.get("Authorization")
    throttle = request.app[THROTTLE_KEY]
    if header:
        wait = throttle.wait(request.remote)
        if wait is not None:
            REFUSALS.refused(request.remote, "API %s %s: too many failed logins from this address, 429",
                             request.method, request.path)
            return json_error(429, "too many failed logins from this address: try again after Retry-After seconds",
                          headers=retry_after_header(wait))
    auth = verifier.verify(request.method, request.raw_path, header)
    if not auth.ok:
        if header:
            REFUSALS.refused(request.remote, "API %s %s: %s", request.method, request.path, auth.reason)
            if not auth.stale:
                throttle.failed(request.remote)
        response = json_error(401, f"authentication required: digest (SHA-256) as an operator of realm {verifier.realm}")
        for challenge in verifier.challenges(stale=auth.stale):
            response.headers.add("WWW-Authenticate", challenge)
        return response
    request[OPERATOR_KEY] = auth.account
    trust(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        # aiohttp's own 404/405 (unknown path, wrong method) as one JSON line too.
        if exc.status == 405:
            return json_error(405, f"{request.method} is not allowed on {request.path}", headers=_allow(exc))
        if exc.status >= 400:
            return json_error(exc.status, f"{exc.reason.lower()}: {request.path}")
        raise


def _allow(exc: web.HTTPException):
    allow = exc.headers.get("Allow") if exc.headers else None
    return {"Allow": allow} if allow else None
