"""The operators' API's reserve, ``POST /api/v1/leases``: its fields checked, then the lease manager's reserve
(or, with ``"dry_run": true``, its check and the VM manager's). Routed by :mod:`service_adapter.api`."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging

from aiohttp import web

from service_adapter.apiparts import CATALOG_KEY, MANAGER_KEY, PREFIX, VMS_KEY, Refused, read_json, refusals, who
from workspace_common.errors import first_line
from workspace_common.protocol import MAX_PREFETCH, ImageFile, ProtocolError

log = logging.getLogger("service_adapter.api")

MAX_NODES = 100_000
MAX_MEMORY_MB = 2**31 - 1
MAX_DURATION_S = 10**8


def _int_field(data: dict, name: str, high: int) -> int:
    value = data.get(name)
    if value is None:
        raise Refused(400, f"'{name}' is missing: a whole number from 1 to {high}")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise Refused(400, f"'{name}' must be a whole number from 1 to {high}, not {json.dumps(value)[:40]}")
    return value


def _duration_field(data: dict) -> float:
    value = data.get("duration_s")
    if value is None:
        raise Refused(400, f"'duration_s' is missing: seconds, above 0 and at most {MAX_DURATION_S}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_DURATION_S:
        raise Refused(
            400, f"'duration_s' must be seconds, above 0 and at most {MAX_DURATION_S}, not {json.dumps(value)[:40]}"
        )
    return float(value)


def _time_field(data: dict, name: str) -> float | None:
    """An optional RFC 3339 time (``2026-12-02T15:30:00Z``, with its offset) as epoch seconds."""
    value = data.get(name)
    if value is None:
        return None
    try:
        if not isinstance(value, str) or len(value) > 64:
            raise ValueError
        when = datetime.datetime.fromisoformat(value)
        if when.tzinfo is None:
            raise ValueError
        return when.timestamp()
    except (ValueError, OverflowError):
        raise Refused(400, f"'{name}' must be an RFC 3339 time with its offset (2026-12-02T15:30:00Z), "
                           f"not {json.dumps(value)[:60]}") from None


@refusals
async def create_lease(request: web.Request) -> web.Response:
    """POST /api/v1/leases: reserve nodes x memory_mb for duration_s (optionally images, start_at,
    release_when_idle_s, exclude_nodes); 201 with the lease; with ``"dry_run": true`` (and a vm): 200 if it
    would be taken, nothing recorded.

    ``images``: listed images the hosts prefetch; ``start_at``: an RFC 3339
    start; ``release_when_idle_s``: released after that long without a VM;
    ``exclude_nodes``: node names the batch system must not give the job.
    """
    data = await read_json(request)
    unknown = sorted(set(data) - {"nodes", "memory_mb", "duration_s", "images", "start_at", "release_when_idle_s",
                                  "exclude_nodes", "dry_run", "vm"})
    if unknown:
        raise Refused(400, f"unknown field(s) {', '.join(unknown)}: give nodes, memory_mb and duration_s "
                           "(and optionally images, start_at, release_when_idle_s, exclude_nodes; dry_run with a "
                           "vm to check)")
    nodes = _int_field(data, "nodes", MAX_NODES)
    memory_mb = _int_field(data, "memory_mb", MAX_MEMORY_MB)
    duration_s = _duration_field(data)
    start_at = _time_field(data, "start_at")
    images = await _lease_images(request, data.get("images"))
    exclude_nodes = data.get("exclude_nodes", [])  # checked by the manager (a list of node names)
    manager = request.app[MANAGER_KEY]
    owner = who(request)
    if data.get("dry_run") is True:  # what a reserve (and, with "vm", a VM on each node) would meet; nothing recorded
        try:
            manager.check(nodes, memory_mb, duration_s, owner=owner, start_at=start_at,
                          release_when_idle_s=data.get("release_when_idle_s"), exclude_nodes=exclude_nodes)
            if data.get("vm") is not None:
                await asyncio.to_thread(request.app[VMS_KEY].check, data["vm"], memory_mb)
        except ValueError as exc:  # InvalidLease; VmRequestError carries its own status
            raise Refused(getattr(exc, "status", 400), first_line(exc)) from None
        return web.json_response({"dry_run": True, "nodes": nodes, "memory_mb": memory_mb, "duration_s": duration_s})
    if "dry_run" in data or "vm" in data:
        raise Refused(400, "'vm' is checked only by a dry run: give \"dry_run\": true, or start VMs once the lease "
                           "is ready")
    try:
        info = await asyncio.to_thread(manager.reserve, nodes, memory_mb, duration_s, owner=owner, images=images,
                                       start_at=start_at, release_when_idle_s=data.get("release_when_idle_s"),
                                       exclude_nodes=exclude_nodes)
    except ValueError as exc:
        raise Refused(400, first_line(exc)) from None
    log.info("API: %s reserved lease %s: %d x %d MB for %g s", owner, info.id, nodes, memory_mb, duration_s)
    body = info.to_json()
    return web.json_response(body, status=201, headers={"Location": f"{PREFIX}/leases/{info.id}"})


async def _lease_images(request: web.Request, items) -> list[dict] | None:
    """A reserve's ``images``: listed images ({"image", "version"}) resolved by the catalogue (409 if one may not
    run here), as the hosts will be told to prefetch them; None when none are asked for."""
    if items is None:
        return None
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_PREFETCH:
        raise Refused(400, f"'images' must be a list of 1 to {MAX_PREFETCH} images, each {{\"image\", \"version\"}}")
    wanted = []
    for index, item in enumerate(items):
        try:
            image = ImageFile.from_dict(f"images[{index}]", item)
        except ProtocolError as exc:
            raise Refused(400, str(exc)) from None
        if not image.named:
            raise Refused(400, f"images[{index}]: name a listed image (\"image\"), not a path")
        wanted.append(image)

    catalog = request.app.get(CATALOG_KEY)
    if catalog is None:
        raise Refused(409, "this service has no image catalogue: a lease cannot name images")
    resolved = await asyncio.to_thread(catalog.resolve_images, wanted)
    return [image.to_dict() for image in resolved]
