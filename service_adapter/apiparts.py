"""What the operators' API's route modules share (:mod:`service_adapter.api`, :mod:`service_adapter.apireserve`,
:mod:`service_adapter.images.routes`).

The prefix and the application's keys, the JSON body reader with its cap
and timeout, :class:`Refused` and the :func:`refusals` wrapper that turns
it and the managers' errors into one-line JSON answers, and :func:`who`
asked. Neither route module imports the other.
"""

from __future__ import annotations

import logging

from aiohttp import web

from service_adapter.connections import BodyTimeout, read_within
from service_adapter.digest import Account, DigestVerifier
from service_adapter.images.catalog import ImageCatalog
from service_adapter.lease import ExtensionRefused, LeaseError, UnknownLease
from service_adapter.store.images import ImageRefused
from service_adapter.vms import VmManager, VmRequestError
from workspace_common.errors import first_line
from workspace_common.protocol import ProtocolError, load_json

log = logging.getLogger("service_adapter.api")

PREFIX = "/api/v1"
MAX_API_BODY = 4096

MANAGER_KEY = web.AppKey("lease_manager", object)
VMS_KEY = web.AppKey("vm_manager", VmManager)
OPERATORS_KEY = web.AppKey("operator_verifier", DigestVerifier)
CATALOG_KEY = web.AppKey("image_catalog", ImageCatalog)
# Request key of the authenticated operator's Account (a typed key where aiohttp has them: 3.14 warns otherwise).
OPERATOR_KEY = web.RequestKey("operator", Account) if hasattr(web, "RequestKey") else "operator"


def json_error(status: int, message: str, headers=None) -> web.Response:
    """An error answer: ``{"error": message}`` with ``status``."""
    return web.json_response({"error": message}, status=status, headers=headers)


async def read_json(request: web.Request, limit: int = MAX_API_BODY) -> dict:
    """The request's JSON object (at most ``limit`` bytes), or an HTTP error response raised as an exception.

    The body is read from the stream with this route's own cap, not with
    ``request.read()``: that one is capped by the app's ``client_max_size``
    (the pilots' 64 KiB, see :func:`service_adapter.receiver.make_app`),
    which a VM start may need to exceed and every other route stays far below.
    """
    if request.content_length is not None and request.content_length > limit:
        raise Refused(413, f"body over {limit} bytes")
    async def read() -> bytearray:
        body = bytearray()
        while True:
            chunk = await request.content.read(limit + 1 - len(body))
            if not chunk:
                return body
            body += chunk
            if len(body) > limit:
                raise Refused(413, f"body over {limit} bytes")

    try:
        body = await read_within(request, read())
    except BodyTimeout as exc:
        raise Refused(408, str(exc)) from None
    try:
        data = load_json(bytes(body), "the body")
    except ProtocolError as exc:
        raise Refused(400, str(exc)) from None
    if not isinstance(data, dict):
        raise Refused(400, "the body must be a JSON object")
    return data


class Refused(Exception):
    """A request refused by a handler: answered ``status`` with ``{"error": message}`` by :func:`refusals`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def refusals(handler):
    """Turn :class:`Refused` and the managers' errors (lease, VM, image) into one-line JSON answers."""

    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except Refused as exc:
            return json_error(exc.status, exc.message)
        except UnknownLease as exc:
            lease_id = exc.args[0] if exc.args else "?"
            return json_error(404, f"no lease {lease_id!r}")
        except ImageRefused as exc:
            log.info("API: %s %s by %s: %s", request.method, request.path, who(request), exc)
            return json_error(exc.status if exc.status != 500 else 503, first_line(exc))
        except VmRequestError as exc:
            if exc.status == 409:
                log.info("API: %s %s by %s: %s", request.method, request.path, who(request), exc)
            return json_error(exc.status, first_line(exc))
        except ExtensionRefused as exc:
            log.info("API: %s %s by %s: %s", request.method, request.path, who(request), exc)
            return json_error(409, first_line(exc))
        except LeaseError as exc:
            log.warning("API: %s %s by %s: %s", request.method, request.path, who(request), exc)
            return json_error(502, f"the batch system refused: {first_line(exc)}")

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


def who(request: web.Request) -> str:
    """The authenticated operator's name ("?" before authentication)."""
    account: Account | None = request.get(OPERATOR_KEY)
    return account.user if account else "?"
