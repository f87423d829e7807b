"""The operators' client of the service's HTTP API (what ``workspace-lease reserve/list/vm ...`` use).

One ``requests.Session`` with digest auth (the service answers with a
SHA-256 challenge), a timeout on every request, and every failure turned
into a one-line :class:`ClientError` that carries the HTTP status (None when
the service could not be reached at all).

Its users run for long (the COBalD pool) or as a person's command; what
answers may be a proxy or not the service at all. So no answer is read
whole: a body goes through :mod:`workspace_common.bounded` with
:data:`MAX_ANSWER_BYTES`, and a 401 challenge's body within its own bound.
"""

from __future__ import annotations

import json

import requests
from requests.auth import HTTPDigestAuth
from urllib3.exceptions import HTTPError, ReadTimeoutError

from workspace_common.bounded import IDENTITY, AnswerTooLong, BoundedChallenge, read_at_most
from workspace_common.errors import failure_words

API = "/api/v1"
#: The most of one answer that is read. The largest the API gives are a lease list and a lease's events, a few
#: hundred bytes a row: 64 MiB holds over 100,000 of them, and bounds what a proxy or rogue server can make us hold.
MAX_ANSWER_BYTES = 64 * 1024 * 1024


class _DigestAuth(BoundedChallenge, HTTPDigestAuth):
    """HTTP digest auth whose challenge body costs at most a bounded read."""


class ClientError(Exception):
    """A request that did not succeed; ``status`` is the HTTP status, None if the service was unreachable."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message


class LeaseClient:
    """Calls the operator API at ``url`` as ``user`` (digest secret ``secret``)."""

    def __init__(self, url: str, user: str, secret: str, *, timeout_s: float = 60.0,
                 verify_tls: bool | str = True):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()
        self.session.auth = _DigestAuth(user, secret)
        self.session.verify = verify_tls
        self.session.headers["Accept"] = "application/json"
        self.session.headers["User-Agent"] = "workspace-lease"
        self.session.headers.update(IDENTITY)

    def close(self) -> None:
        """Close the session's connections."""
        self.session.close()

    def __enter__(self) -> "LeaseClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the API ---------------------------------------------------------------

    def reserve(self, nodes: int, memory_mb: int, duration_s: float, images: list[dict] | None = None,
                start_at: str | None = None, release_when_idle_s: float | None = None,
                exclude_nodes: list[str] | None = None) -> dict:
        """POST /leases: the new lease (``images``: listed images its hosts prefetch, ``{"image", "version"}``;
        ``start_at``: an RFC 3339 time it starts at, else at once; ``release_when_idle_s``: released after that
        long without a VM; ``exclude_nodes``: nodes the batch system must not give it)."""
        body = {"nodes": nodes, "memory_mb": memory_mb, "duration_s": duration_s}
        if images:
            body["images"] = list(images)
        if start_at:
            body["start_at"] = start_at
        if release_when_idle_s is not None:
            body["release_when_idle_s"] = release_when_idle_s
        if exclude_nodes:
            body["exclude_nodes"] = list(exclude_nodes)
        return self._call("POST", "/leases", json=body)

    def check(self, nodes: int, memory_mb: int, duration_s: float, *, vm: dict | None = None,
              images: list[dict] | None = None, release_when_idle_s: float | None = None,
              exclude_nodes: list[str] | None = None) -> dict:
        """POST /leases as a dry run: whether the service would take this lease (and start ``vm`` on each of its
        nodes); ClientError with the service's reason if not. Nothing is recorded."""
        body: dict = {"nodes": nodes, "memory_mb": memory_mb, "duration_s": duration_s, "dry_run": True}
        if vm is not None:
            body["vm"] = vm
        if images:
            body["images"] = list(images)
        if release_when_idle_s is not None:
            body["release_when_idle_s"] = release_when_idle_s
        if exclude_nodes:
            body["exclude_nodes"] = list(exclude_nodes)
        return self._call("POST", "/leases", json=body)

    def extend(self, lease_id: str, by_s: float) -> dict:
        """POST /leases/{id}/extend: the lease, ``by_s`` seconds longer (409 when refused)."""
        return self._call("POST", f"/leases/{_quote(lease_id)}/extend", json={"by_s": by_s})

    def events(self, lease_id: str, after: int = 0) -> dict:
        """GET /leases/{id}/events: ``{"events": [...]}``, the lease's history numbered above ``after``."""
        return self._call("GET", f"/leases/{_quote(lease_id)}/events", params={"after": str(after)} if after else {})

    def release(self, lease_id: str) -> dict:
        """POST /leases/{id}/release: the lease, being released."""
        return self._call("POST", f"/leases/{_quote(lease_id)}/release")

    def show(self, lease_id: str) -> dict:
        """GET /leases/{id}: the lease."""
        return self._call("GET", f"/leases/{_quote(lease_id)}")

    def list(self, states: list[str] | None = None, owner: str | None = None) -> dict:
        """GET /leases: ``{"leases": [...]}``."""
        params = {}
        if states:
            params["state"] = ",".join(states)
        if owner:
            params["owner"] = owner
        return self._call("GET", "/leases", params=params)

    def usage(self, owner: str | None = None, lease_id: str | None = None) -> dict:
        """GET /usage: node-seconds and MB-seconds."""
        params = {}
        if owner:
            params["owner"] = owner
        if lease_id:
            params["lease"] = lease_id
        return self._call("GET", "/usage", params=params)

    def start_vms(self, lease_id: str, specs: list[dict]) -> dict:
        """POST /leases/{id}/vms: ``{"vms": [...]}``, the VMs queued to start (each spec may name a ``host``)."""
        return self._call("POST", f"/leases/{_quote(lease_id)}/vms", json={"vms": list(specs)})

    def list_vms(self, lease_id: str) -> dict:
        """GET /leases/{id}/vms: ``{"vms": [...]}``, the lease's VMs, oldest first."""
        return self._call("GET", f"/leases/{_quote(lease_id)}/vms")

    def show_vm(self, lease_id: str, name: str) -> dict:
        """GET /leases/{id}/vms/{name}: the VM."""
        return self._call("GET", f"/leases/{_quote(lease_id)}/vms/{_quote(name)}")

    def stop_vm(self, lease_id: str, name: str, force: bool = False) -> dict:
        """POST /leases/{id}/vms/{name}/stop: the VM, being stopped (at once with ``force``)."""
        return self._call("POST", f"/leases/{_quote(lease_id)}/vms/{_quote(name)}/stop", json={"force": bool(force)})

    def pause_vm(self, lease_id: str, name: str, resume: bool = False) -> dict:
        """POST /leases/{id}/vms/{name}/suspend (or /resume): the VM, its suspend (resume) queued."""
        action = "resume" if resume else "suspend"
        return self._call("POST", f"/leases/{_quote(lease_id)}/vms/{_quote(name)}/{action}")

    # -- images ----------------------------------------------------------------

    def image_lists(self) -> dict:
        """GET /image-lists: ``{"lists": [...]}``, the subscribed image lists."""
        return self._call("GET", "/image-lists")

    def subscribe(self, source: str) -> dict:
        """POST /image-lists: subscribe the signed list at ``source`` (a path or URL the service reads)."""
        return self._call("POST", "/image-lists", json={"source": source})

    def refresh_lists(self, identifier: str | None = None) -> dict:
        """POST /image-lists[/{id}]/refresh: ``{"results": [...]}``, one per list fetched again."""
        path = f"/image-lists/{_quote(identifier)}/refresh" if identifier else "/image-lists/refresh"
        return self._call("POST", path)

    def images(self) -> dict:
        """GET /images: ``{"images": [...]}``, every endorsed image with the site's decision."""
        return self._call("GET", "/images")

    def show_image(self, identifier: str) -> dict:
        """GET /images/{identifier}: ``{"identifier", "versions": [...]}``."""
        return self._call("GET", f"/images/{_quote(identifier)}")

    def decide_image(self, identifier: str, decision: str, version: str | None = None, reason: str = "") -> dict:
        """POST /images/{identifier}/approve or /revoke (``decision``), optionally one version, with a reason."""
        body = {k: v for k, v in (("version", version), ("reason", reason)) if v}
        return self._call("POST", f"/images/{_quote(identifier)}/{decision}", json=body)

    # -- plumbing --------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs) -> dict:
        target = f"{self.url}{API}{path}"
        try:
            # verify given per request: requests lets $REQUESTS_CA_BUNDLE override a session's CA file.
            response = self.session.request(method, target, timeout=self.timeout_s, verify=self.session.verify,
                                            stream=True, **kwargs)
            content = read_at_most(response, MAX_ANSWER_BYTES)
        except AnswerTooLong as exc:
            raise ClientError(f"{target}: {exc}: is --url the workspace-lease service?") from None
        except (requests.exceptions.Timeout, ReadTimeoutError):
            raise ClientError(f"{self.url}: no answer within {self.timeout_s:g} s") from None
        except requests.exceptions.SSLError as exc:
            raise ClientError(f"{self.url}: TLS failed: {_first_line(exc)}") from None
        except requests.exceptions.ConnectionError as exc:
            raise ClientError(f"cannot reach the service at {self.url}: {failure_words(exc)}") from None
        except requests.exceptions.RequestException as exc:
            raise ClientError(f"{self.url}: {_first_line(exc)}") from None
        except (HTTPError, OSError) as exc:  # the body's transfer broke (urllib3's own errors, not requests')
            raise ClientError(f"{self.url}: the answer broke off: {failure_words(exc)}") from None
        try:
            body = json.loads(content)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            # Whatever answered is not this API (a proxy, another server): the service was not reached.
            raise ClientError(
                f"{target}: answered {response.status_code} {response.reason or ''}".rstrip()
                + " without the service's JSON: is --url the workspace-lease service?"
            )
        if response.ok:
            return body
        detail = body.get("error") or body.get("detail") or response.reason or "error"
        if response.status_code == 401:
            detail = "the service refused this user and secret (HTTP digest)"
        elif response.status_code == 429 and response.headers.get("Retry-After", "").isdigit():
            detail = f"{_first_line(detail)} ({response.headers['Retry-After']} s)"
        raise ClientError(f"{method} {target}: {response.status_code} {_first_line(detail)}", response.status_code)


def _quote(part: str) -> str:
    from urllib.parse import quote

    return quote(part, safe="")


def _first_line(value) -> str:
    text = str(value).strip()
    return text.splitlines()[0] if text else ""
