"""The image catalogue's HTTP routes: the operators' (under /api/v1, digest as an operator) and the pilots' fetch.

Its routes and what each answers: ``docs/reference/http-api.md``, made
from :data:`PILOT_ROUTES`, :data:`OPERATOR_ROUTES` and the handlers'
docstrings.

Refusals: 404 unknown list or image, 409 the image or list cannot be used
as it stands (expired, untrusted key, several versions and none named),
422 a list that is badly signed, expired, malformed or signed by an
untrusted key, 502 the source or image could not be fetched. Each leaves
the catalogue as it was.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time

from aiohttp import web

from workspace_common.protocol import IMAGE_NAME_RE, IMAGE_VERSION_RE, IMAGES_PATH, ProtocolError, check_target
from service_adapter.apiparts import CATALOG_KEY, OPERATORS_KEY, PREFIX, Refused, read_json, refusals, who
from service_adapter.images.catalog import ImageCatalog, image_json, list_json
from service_adapter.images.swarm import SwarmBoard
from service_adapter.metrics import METRICS_KEY
from service_adapter.routetable import Route, add_routes

SWARMS_KEY = web.AppKey("image_swarms", SwarmBoard)
_ADDRESS_RE = re.compile(r"[A-Za-z0-9.:\[\]-]{1,80}:[0-9]{1,5}")
_MAX_SOURCE = 2048
_MAX_REASON = 500


def _catalog(request: web.Request) -> ImageCatalog:
    return request.app[CATALOG_KEY]


def _identifier(request: web.Request, what: str = "image") -> str:
    identifier = request.match_info["identifier"]
    if not IMAGE_NAME_RE.fullmatch(identifier):
        raise Refused(404, f"no {what} {identifier[:64]!r}")
    return identifier


def _decision(data: dict) -> tuple[str | None, str]:
    unknown = sorted(set(data) - {"version", "reason"})
    if unknown:
        raise Refused(400, f"unknown field(s) {', '.join(unknown)}: give version and reason (both optional)")
    version, reason = data.get("version"), data.get("reason", "")
    if version is not None and (not isinstance(version, str) or not IMAGE_VERSION_RE.fullmatch(version)):
        raise Refused(400, "'version' must be an image version as the list gives it")
    if not isinstance(reason, str) or len(reason) > _MAX_REASON or not reason.isprintable():
        raise Refused(400, f"'reason' must be printable text of at most {_MAX_REASON} characters")
    return version, reason


async def _body(request: web.Request) -> dict:
    return await read_json(request) if request.body_exists else {}


@refusals
async def list_lists(request: web.Request) -> web.Response:
    """GET /api/v1/image-lists: the subscribed lists."""
    rows = await asyncio.to_thread(_catalog(request).lists)
    now = time.time()
    return web.json_response({"lists": [list_json(row, now) for row in rows]})


@refusals
async def subscribe(request: web.Request) -> web.Response:
    """POST /api/v1/image-lists ``{"source": PATH_OR_URL}``: fetch, verify and subscribe; 201 with the list."""
    data = await read_json(request)
    unknown = sorted(set(data) - {"source"})
    source = data.get("source")
    if unknown or not isinstance(source, str) or not source or len(source) > _MAX_SOURCE or not source.isprintable():
        raise Refused(400, f"give {{\"source\": PATH_OR_URL}} (an absolute path, file:// or http(s):// URL, at most "
                           f"{_MAX_SOURCE} characters)")
    row = await asyncio.to_thread(_catalog(request).subscribe, source, who(request))
    return web.json_response(list_json(row, time.time()), status=201)


@refusals
async def refresh(request: web.Request) -> web.Response:
    """POST /api/v1/image-lists/refresh: fetch every list again (at .../{id}/refresh: that one); each result
    says how it went."""
    identifier = _identifier(request, "list") if "identifier" in request.match_info else None
    results = await asyncio.to_thread(_catalog(request).refresh, identifier)
    return web.json_response({"results": [
        {"list": r.identifier, "ok": r.ok, "version": r.version, "message": r.message} for r in results]})


@refusals
async def list_images(request: web.Request) -> web.Response:
    """GET /api/v1/images: every endorsed image with the site's decision."""
    catalog = _catalog(request)
    rows = await asyncio.to_thread(catalog.images)
    return web.json_response({"images": [image_json(row, catalog.stored(row.sha256)) for row in rows]})


@refusals
async def show_image(request: web.Request) -> web.Response:
    """GET /api/v1/images/{identifier}: the versions of one image."""
    identifier = _identifier(request)
    catalog = _catalog(request)
    rows = await asyncio.to_thread(catalog.images, identifier)
    if not rows:
        raise Refused(404, f"image {identifier} is on no subscribed list")
    return web.json_response({"identifier": identifier,
                              "versions": [image_json(row, catalog.stored(row.sha256)) for row in rows]})


@refusals
async def approve(request: web.Request) -> web.Response:
    """POST /api/v1/images/{identifier}/approve: fetch the image into the store, then approve it."""
    identifier = _identifier(request)
    version, reason = _decision(await _body(request))
    catalog = _catalog(request)
    row = await asyncio.to_thread(catalog.approve, identifier, version, who(request), reason)
    return web.json_response(image_json(row, catalog.stored(row.sha256)))


@refusals
async def revoke(request: web.Request) -> web.Response:
    """POST /api/v1/images/{identifier}/revoke: no VM starts from it any more; it leaves the store."""
    identifier = _identifier(request)
    version, reason = _decision(await _body(request))
    catalog = _catalog(request)
    rows = await asyncio.to_thread(catalog.revoke, identifier, version, who(request), reason)
    return web.json_response({"images": [image_json(row, catalog.stored(row.sha256)) for row in rows]})


def _held(request: web.Request, what: str):
    """(the (slot, host)'s access, None) when the request authenticated as the host in its path and that host
    holds the slot; else (None, the refusal: 401, 400, 403 or 404, as for the command poll)."""
    from service_adapter.receiver import answer, authenticate, held_access

    auth, refusal = authenticate(request, what)
    if refusal is not None:
        return None, refusal
    slot, host = request.match_info["slot"], request.match_info["host"]
    try:
        check_target(slot, host)
    except ProtocolError as exc:
        return None, answer(400, "invalid", str(exc))
    if host != auth.account.user:
        return None, answer(403, "forbidden", f"authenticated as node {auth.account.user}: a node asks only for itself")
    access = held_access(request, slot, host)
    if access is None:
        return None, answer(404, "unknown-slot", "no held slot for this host")
    return access, None


async def fetch_image(request: web.Request) -> web.StreamResponse:
    """GET /pilot/v2/slots/{slot}/hosts/{host}/images/{sha256}: an approved image, to a pilot holding the slot.

    Authenticated as the commands are (the node's digest account, the host
    in the path its own, the slot held); one byte range (206) lets a pilot
    resume a broken download or take one chunk; a bad Range is 416 with the
    size (:mod:`service_adapter.images.download`). A node streams at most
    ``[service] host_downloads`` images at once: 429 with Retry-After over it.
    """
    from service_adapter.hostshares import SHARES_KEY, retry_after_header
    from service_adapter.images.download import send_file
    from service_adapter.receiver import answer

    _, refusal = _held(request, "image fetch")
    if refusal is not None:
        return refusal
    sha256 = request.match_info["sha256"]
    path = await asyncio.to_thread(_catalog(request).fetchable, sha256) if len(sha256) == 64 else None
    if path is None:
        return answer(404, "unknown-image", "no approved image with this content")
    host, shares = request.match_info["host"], request.app.get(SHARES_KEY)
    if shares is not None and not shares.start_download(host):
        return answer(429, "too-many", f"this node streams {shares.downloads} image(s) already: try again after "
                      "Retry-After seconds", headers=retry_after_header(1))
    metrics = request.app.get(METRICS_KEY)
    try:
        return await send_file(request, path, what=f"image {sha256[:12]} for {host}",
                               on_sent=metrics.image_bytes.inc if metrics is not None else None)
    finally:
        if shares is not None:
            shares.end_download(host)


async def approved_images(request: web.Request) -> web.Response:
    """GET /pilot/v2/slots/{slot}/hosts/{host}/images: ``{"sha256": [...]}``, the content of every approved,
    listed image, signed like a command answer: the node's cache keeps these and retires the rest."""
    access, refusal = _held(request, "image list")
    if refusal is not None:
        return refusal
    wanted = await asyncio.to_thread(_catalog(request).approved_sha256s)
    return _signed(request, access, json.dumps({"sha256": sorted(wanted)}, separators=(",", ":")).encode())


def _signed(request: web.Request, access, body: bytes) -> web.Response:
    """A JSON answer to a pilot, signed with its (slot, host) key as command answers are."""
    from workspace_common.protocol import SIGNATURE_HEADER, sign_commands
    from service_adapter.receiver import NODES_KEY

    host = request.match_info["host"]
    key = request.app[NODES_KEY].slot_key(host, request.match_info["slot"], access.secret)
    return web.Response(body=body, content_type="application/json",
                        headers={SIGNATURE_HEADER: sign_commands(key, request.raw_path, body)})


async def _held_manifest(request: web.Request, what: str):
    """(access, the image's chunk manifest, None) for a pilot holding a slot and an approved image; else
    (None, None, the refusal)."""
    from service_adapter.receiver import answer

    access, refusal = _held(request, what)
    if refusal is not None:
        return None, None, refusal
    sha256 = request.match_info["sha256"]
    manifest = await asyncio.to_thread(_catalog(request).manifest, sha256) if len(sha256) == 64 else None
    if manifest is None:
        return None, None, answer(404, "unknown-image", "no approved image with this content")
    return access, manifest, None


async def image_manifest(request: web.Request) -> web.Response:
    """GET .../images/{sha256}/chunks: the image's chunk manifest, signed, for a pilot holding a slot."""
    access, manifest, refusal = await _held_manifest(request, "image manifest")
    if refusal is not None:
        return refusal
    return _signed(request, access, manifest.to_json())


async def image_swarm(request: web.Request) -> web.Response:
    """POST .../images/{sha256}/swarm ``{"address", "have"}``: announce what this node holds of the image; the
    answer (signed) lists the other nodes of its slot with what they hold, and the chunks to take from here."""
    from service_adapter.connections import BodyTimeout, read_within
    from service_adapter.receiver import answer

    access, manifest, refusal = await _held_manifest(request, "image swarm")
    if refusal is not None:
        return refusal
    sha256 = request.match_info["sha256"]
    limit = 1024 + 2 * manifest.count // 6
    if request.content_length is not None and request.content_length > limit:
        return answer(413, "too-large", f"body over {limit} bytes")
    try:
        body = await read_within(request, request.content.read(limit + 1))
    except BodyTimeout as exc:
        return answer(408, "timeout", str(exc))
    try:
        data = json.loads(body)
        address, have = data.get("address"), base64.b64decode(data.get("have", ""), validate=True)
        if address is not None and (not isinstance(address, str) or not _ADDRESS_RE.fullmatch(address)):
            raise ValueError("address must be HOST:PORT")
        if len(have) > (manifest.count + 7) // 8:
            raise ValueError("have has more chunks than the image")
    except (ValueError, AttributeError, TypeError, binascii.Error) as exc:
        return answer(400, "invalid", f"not a swarm announce: {str(exc)[:100]}")
    peers, seeds = request.app[SWARMS_KEY].announce(request.match_info["slot"], sha256, manifest.count,
                                                     request.match_info["host"], address, have)
    out = {"peers": [dict(p, have=base64.b64encode(p["have"]).decode()) for p in peers], "seed": seeds}
    return _signed(request, access, json.dumps(out, separators=(",", ":")).encode())


#: The pilots' image fetch (digest as the node, as the command poll; answers signed with the slot's key).
PILOT_ROUTES = (
    Route("GET", IMAGES_PATH.rsplit("/", 1)[0], approved_images),
    Route("GET", IMAGES_PATH, fetch_image),
    Route("GET", IMAGES_PATH + "/chunks", image_manifest),
    Route("POST", IMAGES_PATH + "/swarm", image_swarm),
)

#: The operators' image catalogue (under the operator API's authentication).
OPERATOR_ROUTES = (
    Route("GET", f"{PREFIX}/image-lists", list_lists),
    Route("POST", f"{PREFIX}/image-lists", subscribe),
    Route("POST", f"{PREFIX}/image-lists/refresh", refresh),
    Route("POST", PREFIX + "/image-lists/{identifier}/refresh", refresh),
    Route("GET", f"{PREFIX}/images", list_images),
    Route("GET", PREFIX + "/images/{identifier}", show_image),
    Route("POST", PREFIX + "/images/{identifier}/approve", approve),
    Route("POST", PREFIX + "/images/{identifier}/revoke", revoke),
)


def add_image_routes(app: web.Application, catalog: ImageCatalog, *, operators: bool = True,
                     pilots: bool = True) -> None:
    """Add the pilots' image routes (``pilots``) and the operators' (``operators``) to ``app``.

    The operators' routes rely on the API's authentication middleware:
    add the API (:func:`service_adapter.api.add_api`) first, or this
    raises rather than serve them unauthenticated.
    """
    app[CATALOG_KEY] = catalog
    if pilots:
        app[SWARMS_KEY] = SwarmBoard()
        add_routes(app, PILOT_ROUTES)
    if not operators:
        return
    if OPERATORS_KEY not in app:
        raise ValueError("add the operator API (add_api) before the image routes: its authentication guards them")
    add_routes(app, OPERATOR_ROUTES)
