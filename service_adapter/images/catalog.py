"""The site's image catalogue: subscribed lists, approvals, the service's image store, and the rule for VM starts.

The HEPiX rule: a VM runs only from an image that is both endorsed (on an
unexpired list signed by a key in ``[images] endorser_keys``) and approved
by the site (and not revoked since). Approving an image fetches it into the
service's image store (``[images] store_dir``, one file per sha256), from
which the pilots fetch it; revoking it, or its leaving every list, removes
it from there. Every refusal is one line and changes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Callable

from workspace_common.protocol import ImageFile, VmSpec
from service_adapter.images import imagelist
from service_adapter.images.imagelist import ImageListError
from service_adapter.images.transfer import TransferError, check_source, download, read_source, stored_path
from service_adapter.store import Store
from service_adapter.store import images as image_ops
from service_adapter.store.images import ImageRefused, ImageRow, ListRow
from service_adapter.store.vms import VmRequestError

log = logging.getLogger(__name__)

__all__ = ["ImageCatalog", "ImageRefused", "image_json", "list_json"]


@dataclasses.dataclass(frozen=True)
class RefreshResult:
    """What one list's refresh did: ``ok`` with the issue now stored, or the one-line reason it was refused."""

    identifier: str
    ok: bool
    version: int
    message: str


class ImageCatalog:
    """The site's endorsed and approved images over the store; ``keys_dir`` holds the trusted endorser keys."""

    def __init__(self, store: Store, *, keys_dir: str, store_dir: str, timeout_s: float = 60.0,
                 ca_file: str | None = None, clock: Callable[[], float] = time.time):
        self.store = store
        self.keys_dir = keys_dir
        self.store_dir = store_dir
        self.timeout_s = timeout_s
        self.ca_file = ca_file
        self.clock = clock
        self._manifests: dict = {}

    # -- lists ----------------------------------------------------------------------------------

    def trusted(self) -> dict[str, imagelist.TrustedKey]:
        """The endorser keys in force now (read afresh: adding or removing a key file needs no restart)."""
        try:
            return imagelist.load_trusted_keys(self.keys_dir)
        except ImageListError as exc:
            raise ImageRefused(f"[images] endorser_keys: {exc}", 500) from None

    def subscribe(self, source: str, by: str) -> ListRow:
        """Fetch, verify and store the list at ``source``; ImageRefused: 422 a bad list, 502 unreachable, 409 known."""
        verified = self._fetch_list(source)
        row = self.store.submit(
            lambda conn: image_ops.store_list(conn, verified, source, by, self.clock(), new=True)).result()
        log.info("images: %s subscribed list %s issue %d from %s (%d images, signed by %s)", by, row.identifier,
                 row.version, source, len(verified.images), row.key_name)
        return row

    def refresh(self, identifier: str | None = None) -> list[RefreshResult]:
        """Fetch every subscribed list (or one) again; a refused issue leaves the stored one and is noted."""
        rows = self.lists()
        if identifier is not None:
            rows = [row for row in rows if row.identifier == identifier]
            if not rows:
                raise ImageRefused(f"list {identifier} is not subscribed", 404)
        results = []
        for row in rows:
            try:
                verified = self._fetch_list(row.source)
                if verified.identifier != row.identifier:
                    raise ImageRefused(f"{row.source} now holds list {verified.identifier}, not {row.identifier}",
                                       422)
                stored = self.store.submit(lambda conn, v=verified, r=row: image_ops.store_list(
                    conn, v, r.source, r.subscribed_by, self.clock(), new=False)).result()
                results.append(RefreshResult(row.identifier, True, stored.version,
                                             f"issue {stored.version}, expires {_utc(stored.expires)}"))
            except ImageRefused as exc:
                message = str(exc)
                self.store.submit(lambda conn, r=row, m=message: image_ops.note_refresh_failure(
                    conn, r.identifier, m)).result()
                log.warning("images: refresh of list %s refused: %s", row.identifier, message)
                results.append(RefreshResult(row.identifier, False, row.version, message))
        self.retire()
        return results

    def _fetch_list(self, source: str):
        try:
            check_source(source)
            raw = read_source(source, timeout_s=self.timeout_s, ca_file=self.ca_file)
        except TransferError as exc:
            raise ImageRefused(str(exc), 502) from None
        try:
            return imagelist.verify_list(raw, self.trusted(), now=self.clock())
        except ImageListError as exc:
            raise ImageRefused(f"{source}: {exc}", 422) from None

    def lists(self) -> list[ListRow]:
        """The subscribed lists."""
        return self.store.read(image_ops.lists)

    # -- images ---------------------------------------------------------------------------------

    def images(self, identifier: str | None = None) -> list[ImageRow]:
        """The endorsed images (all, or the versions of one identifier) with the site's decisions."""
        return self.store.read(lambda conn: image_ops.images(conn, identifier))

    def stored(self, sha256: str) -> bool:
        """Whether the service's image store holds this content."""
        return os.path.exists(stored_path(self.store_dir, sha256))

    def approve(self, identifier: str, version: str | None, by: str, reason: str = "") -> ImageRow:
        """Approve one endorsed version for this site, fetching it into the image store first.

        ImageRefused: 404 not endorsed, 409 several versions and none
        named, or its list expired or no longer trusted; 502 the fetch
        failed (nothing is approved then).
        """
        row = self._one(identifier, version)
        trusted, now = frozenset(self.trusted()), self.clock()
        self.store.read(lambda conn: image_ops.check_list(conn, row, now=now, trusted_key_ids=trusted))
        try:
            download(row.urls, row.sha256, row.size, self.store_dir, timeout_s=self.timeout_s, ca_file=self.ca_file)
        except TransferError as exc:
            raise ImageRefused(f"image {identifier} {row.version} could not be fetched: {exc}", 502) from None
        self.store.submit(lambda conn: image_ops.set_approval(conn, row, "approved", by, reason, self.clock())).result()
        log.info("images: %s approved %s %s (sha256 %s, %d bytes)", by, identifier, row.version, row.sha256, row.size)
        return self._one(identifier, row.version)

    def revoke(self, identifier: str, version: str | None, by: str, reason: str = "") -> list[ImageRow]:
        """Revoke one version (or every listed version) of an image; no VM starts from it any more."""
        rows = self.images(identifier)
        if version is not None:
            rows = [row for row in rows if row.version == version]
        if not rows:
            raise ImageRefused(f"image {identifier}{' ' + version if version else ''} is on no subscribed list", 404)
        now = self.clock()

        def write(conn):
            for row in rows:
                image_ops.set_approval(conn, row, "revoked", by, reason, now)

        self.store.submit(write).result()
        log.warning("images: %s revoked %s %s%s", by, identifier, ", ".join(r.version for r in rows),
                    f": {reason}" if reason else "")
        self.retire()
        return self.images(identifier) if version is None else [self._one(identifier, version)]

    def retire(self) -> list[str]:
        """Remove from the image store every file no approved, listed image has; their sha256s."""
        wanted = self.approved_sha256s()
        try:
            names = os.listdir(self.store_dir)
        except FileNotFoundError:
            return []
        gone = []
        for name in names:
            if len(name) == 64 and name not in wanted:
                os.unlink(os.path.join(self.store_dir, name))
                gone.append(name)
                self._manifests.pop(name, None)
            elif name.endswith(".chunks") and name[:64] not in wanted:
                os.unlink(os.path.join(self.store_dir, name))
        if gone:
            log.info("images: retired %d image(s) from the store: %s", len(gone), ", ".join(gone))
        return gone

    def approved_sha256s(self) -> set[str]:
        """The content of every approved, listed image (what nodes keep in their caches)."""
        return self.store.read(image_ops.wanted_sha256)

    def manifest(self, sha256: str):
        """The chunk manifest of a fetchable image (:class:`workspace_common.protocol.chunks.ChunkManifest`), or None.

        Worked out on first use by reading the image once, then kept beside
        it (``<sha256>.chunks``) and in memory.
        """
        from workspace_common.protocol.chunks import ChunkManifest, manifest_of

        path = self.fetchable(sha256)
        if path is None:
            return None
        cached = self._manifests.get(sha256)
        if cached is not None:
            return cached
        try:
            with open(path + ".chunks", "rb") as handle:
                manifest = ChunkManifest.from_json(handle.read())
        except (OSError, ValueError):
            manifest = manifest_of(path, sha256)
            temp = f"{path}.chunks.tmp-{os.getpid()}-{threading.get_ident()}"
            with open(temp, "wb") as handle:
                handle.write(manifest.to_json())
            os.replace(temp, path + ".chunks")
        self._manifests[sha256] = manifest
        return manifest

    def fetchable(self, sha256: str) -> str | None:
        """The stored file a pilot may fetch for this content (approved, listed, present), else None."""
        if not self.store.read(lambda conn: image_ops.approved_sha256(conn, sha256)):
            return None
        path = stored_path(self.store_dir, sha256)
        return path if os.path.exists(path) else None

    def _one(self, identifier: str, version: str | None) -> ImageRow:
        rows = self.images(identifier)
        if not rows:
            raise ImageRefused(f"image {identifier} is on no subscribed list", 404)
        if version is None:
            if len(rows) > 1:
                raise ImageRefused(f"image {identifier} has versions {', '.join(r.version for r in rows)}: "
                                   "name one with --version")
            return rows[0]
        for row in rows:
            if row.version == version:
                return row
        raise ImageRefused(f"image {identifier} has no version {version} (listed: "
                           f"{', '.join(r.version for r in rows)})", 404)

    # -- the rule of every VM start -----------------------------------------------------------------

    def resolver(self) -> Callable[[object, VmSpec], VmSpec]:
        """``resolve(conn, spec)`` for :meth:`Store.start_vms`: the spec with each named image's content, or
        VmRequestError (409) saying why that image may not run here."""
        trusted = frozenset(self.trusted())
        now = self.clock()

        def resolve(conn, spec: VmSpec) -> VmSpec:
            changes = {}
            for field in ("disk", "kernel", "initrd"):
                wanted: ImageFile | None = getattr(spec, field)
                if wanted is None or not wanted.named:
                    continue
                try:
                    changes[field] = self._resolve_one(conn, wanted, now, trusted)
                except ImageRefused as exc:
                    raise VmRequestError(f"VM {spec.name}: {field}: {exc}", exc.status) from None
            return dataclasses.replace(spec, **changes) if changes else spec

        return resolve

    def resolve_images(self, wanted: list[ImageFile]) -> list[ImageFile]:
        """The images a lease asks to prefetch, resolved by the same rule as a VM start; ImageRefused (409)."""
        trusted = frozenset(self.trusted())
        now = self.clock()
        resolved = []
        for index, image in enumerate(wanted):
            try:
                resolved.append(self.store.read(lambda conn, i=image: self._resolve_one(conn, i, now, trusted)))
            except ImageRefused as exc:
                raise ImageRefused(f"images[{index}]: {exc}", exc.status) from None
        return resolved

    def _resolve_one(self, conn, wanted: ImageFile, now: float, trusted: frozenset[str]) -> ImageFile:
        row = image_ops.resolve(conn, wanted.image, wanted.version, now=now, trusted_key_ids=trusted)
        if wanted.sha256 is not None and wanted.sha256 != row.sha256:
            raise ImageRefused(f"image {row.identifier} {row.version} has sha256 {row.sha256}, not the "
                               f"{wanted.sha256} asked for")
        if not self.stored(row.sha256):
            raise ImageRefused(f"image {row.identifier} {row.version} is not in the service's image store: "
                               "approve it again to fetch it")
        return ImageFile(None, row.sha256, row.identifier, row.version, row.size)


def list_json(row: ListRow, now: float) -> dict:
    """A subscribed list as the API shows it."""
    return {
        "identifier": row.identifier, "source": row.source, "endorser": row.endorser, "key": row.key_name,
        "key_id": row.key_id, "version": row.version, "issued": _utc(row.issued), "expires": _utc(row.expires),
        "expired": row.expires <= now, "fetched_at": _utc(row.fetched_at), "subscribed_by": row.subscribed_by,
        "last_error": row.last_error,
    }


def image_json(row: ImageRow, stored: bool) -> dict:
    """An endorsed image as the API shows it; ``state`` is approved, revoked or endorsed (not yet approved)."""
    return {
        "identifier": row.identifier, "version": row.version, "list": row.list_id, "sha256": row.sha256,
        "size": row.size, "title": row.title, "urls": list(row.urls), "state": row.approval or "endorsed",
        "decided_by": row.approved_by, "decided_at": _utc(row.approved_at) if row.approved_at else None,
        "reason": row.reason, "stored": stored,
    }


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
