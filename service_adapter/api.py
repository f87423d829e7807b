"""The operators' HTTP API, served by the same aiohttp application as the pilots' receiver.

Its routes and what each answers: ``docs/reference/http-api.md``, made
from :data:`ROUTES` and the handlers' docstrings.

Every request is digest-authenticated (RFC 7616, SHA-256, ``qop=auth``)
against the operators' accounts, with their own realm and verifier: a
pilot's credentials do not work here, nor an operator's on the pilots'
endpoints. The authenticated operator owns the leases it reserves. Failed
logins are throttled per source address (:mod:`service_adapter.loginthrottle`:
429 with Retry-After once 10 failed, then one try every 2 s); the
middleware that does both is :mod:`service_adapter.apiauth`.

Errors are one JSON line, ``{"error": "..."}``: 400 bad JSON (not UTF-8,
NaN, nested deeper than 16, a lone surrogate) or values, 408 a body that
did not arrive within the request timeout ([service] request_timeout), 401
no or wrong credentials (with a fresh challenge), 404 unknown lease, VM or
path, 405 wrong method, 409 a VM request that cannot be carried out as the
lease stands (the lease is not ready or running, a VM name is in use, the
VMs do not fit its hosts, the VM has ended already; nothing is queued) or
an extension refused (by the batch system's policy or the partition's
limit, or the lease is ending; nothing changed), 413
body too large (4 KiB; 256 KiB for a VM start, which may hold many specs),
502 the batch system refused the job. The lease and VM managers' calls
block (reserve submits to the batch system, VM calls commit to the store),
so each runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re

from aiohttp import web

from service_adapter.apiauth import THROTTLE_KEY, api_auth
from service_adapter.apiparts import (  # noqa: F401 (MAX_API_BODY: the API's own limit, re-exported)
    MANAGER_KEY, MAX_API_BODY, OPERATORS_KEY, PREFIX, VMS_KEY, Refused, read_json, refusals, who,
)
from service_adapter.apireserve import MAX_DURATION_S, create_lease
from service_adapter.digest import DigestVerifier
from service_adapter.lease import LEASE_STATES, event_json, vm_json
from service_adapter.loginthrottle import LoginThrottle
from service_adapter.routetable import Route, add_routes
from service_adapter.vms import VmManager, VmRequestError, parse_vm_request
from workspace_common.errors import first_line
from workspace_common.protocol import MAX_VM_NAME_LEN

log = logging.getLogger(__name__)

#: A VM start may carry many specs (up to vms.MAX_VMS_PER_REQUEST), each with paths and digests.
MAX_VM_BODY = 256 * 1024
_LEASE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VM_NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_VM_NAME_LEN - 1}}}")

def _lease_id(request: web.Request) -> str:
    lease_id = request.match_info["lease_id"]
    if not _LEASE_ID_RE.fullmatch(lease_id):
        raise Refused(404, f"no lease {lease_id[:64]!r}")
    return lease_id


def _vm_name(request: web.Request, lease_id: str) -> str:
    name = request.match_info["name"]
    if not _VM_NAME_RE.fullmatch(name):
        raise Refused(404, f"lease {lease_id} has no VM named {name[:64]!r}")
    return name


@refusals
async def list_leases(request: web.Request) -> web.Response:
    """GET /api/v1/leases[?state=S[,S...]][&owner=O]: the leases, newest first as the manager orders them."""
    unknown = sorted(set(request.query) - {"state", "owner"})
    if unknown:
        raise Refused(400, f"unknown query parameter(s) {', '.join(unknown)}: use state and owner")
    states = [s for value in request.query.getall("state", []) for s in value.split(",") if s]
    known = tuple(LEASE_STATES)
    bad = [s for s in states if s not in known]
    if bad:
        raise Refused(400, f"unknown state {bad[0]!r}: one of {', '.join(known)}")
    owner = request.query.get("owner") or None
    manager = request.app[MANAGER_KEY]
    infos = await asyncio.to_thread(manager.list, states=states or None, owner=owner)
    asker = who(request)
    return web.json_response({"leases": [info.to_json(asker=asker) for info in infos]})


@refusals
async def show_lease(request: web.Request) -> web.Response:
    """GET /api/v1/leases/{id}: one lease."""
    lease_id = _lease_id(request)
    info = await asyncio.to_thread(request.app[MANAGER_KEY].get, lease_id)
    return web.json_response(info.to_json(asker=who(request)))


@refusals
async def release_lease(request: web.Request) -> web.Response:
    """POST /api/v1/leases/{id}/release: end the lease early (idempotent); 202 with the lease."""
    lease_id = _lease_id(request)
    if request.content_length:
        await read_json(request)  # tolerated (e.g. "{}"), but it must be small and JSON
    info = await asyncio.to_thread(request.app[MANAGER_KEY].release, lease_id)
    log.info("API: %s released lease %s (now %s)", who(request), lease_id, getattr(info, "state", "?"))
    return web.json_response(info.to_json(asker=who(request)), status=202)


@refusals
async def extend_lease(request: web.Request) -> web.Response:
    """POST /api/v1/leases/{id}/extend ``{"by_s": SECONDS}``: a longer lease if the batch system allows; 200."""
    lease_id = _lease_id(request)
    data = await read_json(request)
    unknown = sorted(set(data) - {"by_s"})
    if unknown:
        raise Refused(400, f'unknown field(s) {", ".join(unknown)}: give {{"by_s": SECONDS}}')
    by_s = data.get("by_s")
    if isinstance(by_s, bool) or not isinstance(by_s, (int, float)) or not 0 < by_s <= MAX_DURATION_S:
        raise Refused(400, f"'by_s' must be seconds, above 0 and at most {MAX_DURATION_S}, not "
                           f"{json.dumps(by_s)[:40]}")
    info = await asyncio.to_thread(request.app[MANAGER_KEY].extend, lease_id, float(by_s))
    log.info("API: %s extended lease %s by %g s (now %g s)", who(request), lease_id, by_s, info.duration_s)
    return web.json_response(info.to_json(asker=who(request)))


@refusals
async def lease_events(request: web.Request) -> web.Response:
    """GET /api/v1/leases/{id}/events[?after=N]: the lease's history, oldest first (only entries above N)."""
    lease_id = _lease_id(request)
    unknown = sorted(set(request.query) - {"after"})
    if unknown:
        raise Refused(400, f"unknown query parameter(s) {', '.join(unknown)}: use after")
    after_text = request.query.get("after", "0")
    if not after_text.isdigit() or len(after_text) > 18:
        raise Refused(400, f"'after' must be an event number (0 or more), not {after_text[:40]!r}")
    events = await asyncio.to_thread(request.app[MANAGER_KEY].history, lease_id, int(after_text))
    return web.json_response({"events": [event_json(event) for event in events]})


@refusals
async def usage(request: web.Request) -> web.Response:
    """GET /api/v1/usage[?owner=O][&lease=ID]: node-seconds and MB-seconds used."""
    unknown = sorted(set(request.query) - {"owner", "lease"})
    if unknown:
        raise Refused(400, f"unknown query parameter(s) {', '.join(unknown)}: use owner and lease")
    owner = request.query.get("owner") or None
    lease_id = request.query.get("lease") or None
    used = await asyncio.to_thread(request.app[MANAGER_KEY].usage, lease_id=lease_id, owner=owner)
    body = used.to_json()
    if owner is not None:
        body.setdefault("owner", owner)
    if lease_id is not None:
        body.setdefault("lease", lease_id)
    return web.json_response(body)


# -- VMs -----------------------------------------------------------------------------------------


@refusals
async def start_vms(request: web.Request) -> web.Response:
    """POST /api/v1/leases/{id}/vms ``{"vms": [spec, ...]}``: place and queue the VMs' start; 202 with them."""
    lease_id = _lease_id(request)
    data = await read_json(request, MAX_VM_BODY)
    unknown = sorted(set(data) - {"vms"})
    if unknown:
        raise Refused(400, f'unknown field(s) {", ".join(unknown)}: give {{"vms": [VM spec, ...]}}')
    items = data.get("vms")
    if not isinstance(items, list) or not items:
        raise Refused(400, "'vms' must be a non-empty list of VM specs (each a JSON object)")
    wanted = []
    for index, item in enumerate(items):
        try:
            wanted.append(parse_vm_request(item))
        except VmRequestError as exc:
            name = item.get("name") if isinstance(item, dict) else None
            label = f"vms[{index}]" + (f" ({name})" if isinstance(name, str) and name.isprintable() else "")
            raise Refused(exc.status, f"{label[:100]}: {first_line(exc)}") from None
    vms, asker = request.app[VMS_KEY], who(request)

    def start() -> tuple[list, bool]:  # and whether the asker owns the lease: one hop to a thread, not two
        rows = vms.start(lease_id, wanted)
        lease = vms.store.get_lease(lease_id)
        return rows, lease is not None and lease.owner == asker

    started, owner = await asyncio.to_thread(start)
    log.info("API: %s started %d VM(s) on lease %s: %s", asker, len(started), lease_id,
             ", ".join(f"{vm.name}@{vm.host}" for vm in started))
    return web.json_response({"vms": [vm_json(vm, owner=owner) for vm in started]}, status=202,
                             headers={"Location": f"{PREFIX}/leases/{lease_id}/vms"})


async def _is_owner(request: web.Request, lease_id: str) -> bool:
    """Whether the asker owns the lease (only the owner is told how to reach its VMs)."""
    lease = await asyncio.to_thread(request.app[VMS_KEY].store.get_lease, lease_id)
    return lease is not None and lease.owner == who(request)


@refusals
async def list_vms(request: web.Request) -> web.Response:
    """GET /api/v1/leases/{id}/vms: the lease's VMs (ended ones too), oldest first."""
    lease_id = _lease_id(request)
    if request.query:
        raise Refused(400, f"unknown query parameter(s) {', '.join(sorted(set(request.query)))}: none is taken")
    found = await asyncio.to_thread(request.app[VMS_KEY].list, lease_id)
    owner = await _is_owner(request, lease_id)
    return web.json_response({"vms": [vm_json(vm, owner=owner) for vm in found]})


@refusals
async def show_vm(request: web.Request) -> web.Response:
    """GET /api/v1/leases/{id}/vms/{name}: one VM."""
    lease_id = _lease_id(request)
    name = _vm_name(request, lease_id)
    vm = await asyncio.to_thread(request.app[VMS_KEY].get, lease_id, name)
    return web.json_response(vm_json(vm, owner=await _is_owner(request, lease_id)))


@refusals
async def stop_vm(request: web.Request) -> web.Response:
    """POST /api/v1/leases/{id}/vms/{name}/stop [``{"force": true}``]: queue the VM's stop; 202 with it."""
    lease_id = _lease_id(request)
    name = _vm_name(request, lease_id)
    force = False
    if request.body_exists:  # an empty body is a graceful stop
        data = await read_json(request)
        unknown = sorted(set(data) - {"force"})
        if unknown:
            raise Refused(400, f'unknown field(s) {", ".join(unknown)}: the only one is "force" (true or false)')
        force = data.get("force", False)
        if not isinstance(force, bool):
            raise Refused(400, f"'force' must be true or false, not {json.dumps(force)[:40]}")
    vm = await asyncio.to_thread(request.app[VMS_KEY].stop, lease_id, name, force=force)
    log.info("API: %s stopped VM %s of lease %s%s (now %s)", who(request), name, lease_id,
             " (forced)" if force else "", vm.state)
    return web.json_response(vm_json(vm, owner=await _is_owner(request, lease_id)), status=202)


@refusals
async def pause_vm(request: web.Request) -> web.Response:
    """POST /api/v1/leases/{id}/vms/{name}/suspend: queue the VM's suspend (at .../resume: its resume); 202
    with the VM."""
    lease_id = _lease_id(request)
    name = _vm_name(request, lease_id)
    if request.content_length:
        await read_json(request)  # tolerated (e.g. "{}"), but it must be small and JSON
    resume = request.path.endswith("/resume")
    vms = request.app[VMS_KEY]
    vm = await asyncio.to_thread(vms.resume if resume else vms.suspend, lease_id, name)
    log.info("API: %s %s VM %s of lease %s", who(request), "resumed" if resume else "suspended", name, lease_id)
    return web.json_response(vm_json(vm, owner=await _is_owner(request, lease_id)), status=202)


#: The operators' API (each request digest-authenticated as an operator by :func:`api_auth`).
ROUTES = (
    Route("POST", f"{PREFIX}/leases", create_lease),
    Route("GET", f"{PREFIX}/leases", list_leases),
    Route("GET", PREFIX + "/leases/{lease_id}", show_lease),
    Route("POST", PREFIX + "/leases/{lease_id}/release", release_lease),
    Route("POST", PREFIX + "/leases/{lease_id}/extend", extend_lease),
    Route("GET", PREFIX + "/leases/{lease_id}/events", lease_events),
    Route("POST", PREFIX + "/leases/{lease_id}/vms", start_vms),
    Route("GET", PREFIX + "/leases/{lease_id}/vms", list_vms),
    Route("GET", PREFIX + "/leases/{lease_id}/vms/{name}", show_vm),
    Route("POST", PREFIX + "/leases/{lease_id}/vms/{name}/stop", stop_vm),
    Route("POST", PREFIX + "/leases/{lease_id}/vms/{name}/suspend", pause_vm),
    Route("POST", PREFIX + "/leases/{lease_id}/vms/{name}/resume", pause_vm),
    Route("GET", f"{PREFIX}/usage", usage),
)


def add_api(app: web.Application, manager, verifier: DigestVerifier, vms: VmManager | None = None, *,
            throttle: LoginThrottle | None = None) -> web.Application:
    """Add the operator API to ``app`` (built by :func:`service_adapter.receiver.make_app`).

    ``verifier`` holds the operators' accounts; its realm must differ from
    the pilots' verifier's, so neither side's credentials work for the other.
    ``vms`` starts and stops the leases' VMs; None makes one over the lease
    manager's store with the default 64 MB overhead per VM. ``throttle``
    holds back failed logins per source address (one with the defaults if None).
    """
    from service_adapter.receiver import VERIFIER_KEY

    pilots = app.get(VERIFIER_KEY)
    if pilots is not None and pilots.realm == verifier.realm:
        raise ValueError("the operators' realm must differ from the pilots' realm")
    app[MANAGER_KEY] = manager
    app[OPERATORS_KEY] = verifier
    app[THROTTLE_KEY] = throttle if throttle is not None else LoginThrottle()
    app[VMS_KEY] = vms if vms is not None else VmManager(manager.store, overhead_mb=64)
    app.middlewares.append(api_auth)
    add_routes(app, ROUTES)
    return app
