"""The image half of the store: subscribed image lists, the images they endorse, and the site's approvals.

A list's images are replaced whole when a newer issue of the list is
stored; the approvals are the site's own and outlive the lists (an
approval of an image that left every list simply no longer resolves).
:func:`resolve` is the rule every VM start goes through, run in the same
transaction that queues the start: the image must be on a subscribed,
unexpired list signed by a key the site still trusts, its version
approved and not revoked.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS image_lists (
    identifier    TEXT PRIMARY KEY,
    source        TEXT NOT NULL,
    endorser      TEXT NOT NULL,
    key_id        TEXT NOT NULL,
    key_name      TEXT NOT NULL,
    version       INTEGER NOT NULL,
    issued        REAL NOT NULL,
    expires       REAL NOT NULL,
    fetched_at    REAL NOT NULL,
    subscribed_by TEXT NOT NULL,
    subscribed_at REAL NOT NULL,
    last_error    TEXT
);
CREATE TABLE IF NOT EXISTS list_images (
    list_id     TEXT NOT NULL REFERENCES image_lists(identifier),
    identifier  TEXT NOT NULL,
    version     TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    size        INTEGER NOT NULL,
    urls        TEXT NOT NULL,
    title       TEXT NOT NULL,
    PRIMARY KEY (identifier, version)
);
CREATE INDEX IF NOT EXISTS list_images_by_sha256 ON list_images(sha256);
CREATE TABLE IF NOT EXISTS image_approvals (
    identifier  TEXT NOT NULL,
    version     TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    state       TEXT NOT NULL,
    by_user     TEXT NOT NULL,
    at          REAL NOT NULL,
    reason      TEXT NOT NULL,
    PRIMARY KEY (identifier, version)
);
CREATE TABLE IF NOT EXISTS lease_images (
    lease_id    TEXT NOT NULL REFERENCES leases(id),
    position    INTEGER NOT NULL,
    image       TEXT NOT NULL,
    PRIMARY KEY (lease_id, position)
);
"""


class ImageRefused(ValueError):
    """An image request that cannot be carried out; ``status`` is the HTTP status (409 unless said)."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class ListRow:
    """A subscribed list as stored: where it comes from, who signed it, its issue and validity."""

    identifier: str
    source: str
    endorser: str
    key_id: str
    key_name: str
    version: int
    issued: float
    expires: float
    fetched_at: float
    subscribed_by: str
    subscribed_at: float
    last_error: str | None


@dataclasses.dataclass(frozen=True)
class ImageRow:
    """An endorsed image with the site's decision on it (``approval`` None, ``approved`` or ``revoked``)."""

    list_id: str
    identifier: str
    version: str
    sha256: str
    size: int
    urls: tuple[str, ...]
    title: str
    approval: str | None = None
    approved_by: str | None = None
    approved_at: float | None = None
    reason: str = ""


_LIST_COLUMNS = ("identifier, source, endorser, key_id, key_name, version, issued, expires, fetched_at, "
                 "subscribed_by, subscribed_at, last_error")
#: An upsert's SET for a list stored again: every column from the new row (what INSERT OR REPLACE would do).
_REPLACED_LIST_COLUMNS = ", ".join(f"{name} = excluded.{name}" for name in _LIST_COLUMNS.split(", ")[1:])
_IMAGE_SELECT = (
    "SELECT i.list_id, i.identifier, i.version, i.sha256, i.size, i.urls, i.title, a.state, a.by_user, a.at, "
    "a.reason FROM list_images i LEFT JOIN image_approvals a "
    "ON a.identifier = i.identifier AND a.version = i.version AND a.sha256 = i.sha256"
)


def _image(row) -> ImageRow:
    return ImageRow(row[0], row[1], row[2], row[3], row[4], tuple(json.loads(row[5])), row[6], row[7], row[8],
                    row[9], row[10] or "")


# -- reads --------------------------------------------------------------------------------------


def lists(conn: sqlite3.Connection) -> list[ListRow]:
    """Every subscribed list, by identifier."""
    return [ListRow(*row) for row in conn.execute(f"SELECT {_LIST_COLUMNS} FROM image_lists ORDER BY identifier")]


def get_list(conn: sqlite3.Connection, identifier: str) -> ListRow | None:
    """One subscribed list, or None."""
    row = conn.execute(f"SELECT {_LIST_COLUMNS} FROM image_lists WHERE identifier = ?", (identifier,)).fetchone()
    return ListRow(*row) if row else None


def images(conn: sqlite3.Connection, identifier: str | None = None) -> list[ImageRow]:
    """The endorsed images (of one identifier, or all) with their approval, by identifier and version."""
    where, args = (" WHERE i.identifier = ?", (identifier,)) if identifier else ("", ())
    return [_image(row) for row in conn.execute(f"{_IMAGE_SELECT}{where} ORDER BY i.identifier, i.version", args)]


def approved_sha256(conn: sqlite3.Connection, sha256: str) -> bool:
    """Whether some listed image with this content is approved (what a pilot may fetch)."""
    return conn.execute(
        "SELECT 1 FROM list_images i JOIN image_approvals a ON a.identifier = i.identifier AND "
        "a.version = i.version AND a.sha256 = i.sha256 WHERE i.sha256 = ? AND a.state = 'approved' LIMIT 1",
        (sha256,),
    ).fetchone() is not None


def wanted_sha256(conn: sqlite3.Connection) -> set[str]:
    """The content of every listed image that is approved (what the service's image store keeps)."""
    return {row[0] for row in conn.execute(
        "SELECT i.sha256 FROM list_images i JOIN image_approvals a ON a.identifier = i.identifier AND "
        "a.version = i.version AND a.sha256 = i.sha256 WHERE a.state = 'approved'"
    )}


# -- writes (on the store's writer) --------------------------------------------------------------


def store_list(conn: sqlite3.Connection, verified, source: str, by: str, now: float, *, new: bool) -> ListRow:
    """Store a verified list (:class:`service_adapter.images.imagelist.ImageList`), replacing its images.

    ``new``: a subscription, refused (409) if the list is already
    subscribed. A refresh is refused if the issue is older than the one
    stored (a replayed list could bring back a withdrawn image) or has the
    same version with other content. An identifier+version endorsed by
    another list is refused: a name must mean one image.
    """
    old = get_list(conn, verified.identifier)
    if new and old is not None:
        raise ImageRefused(f"list {verified.identifier} is subscribed already (from {old.source}): refresh it")
    if not new and old is None:
        raise ImageRefused(f"list {verified.identifier} is not subscribed", 404)
    if old is not None and verified.key_id != old.key_id:
        raise ImageRefused(f"list {verified.identifier} was subscribed signed by {old.key_name}'s key; this issue "
                           f"is signed by {verified.key_name}'s: unsubscribe and subscribe again to change keys")
    if old is not None and verified.version < old.version:
        raise ImageRefused(f"list {verified.identifier} issue {verified.version} is older than the stored issue "
                           f"{old.version}: refused (a replayed list)")
    entries = {(e.identifier, e.version): e for e in verified.images}
    if old is not None and verified.version == old.version:
        stored = {(row.identifier, row.version): row.sha256 for row in images(conn) if row.list_id == old.identifier}
        if stored != {key: e.sha256 for key, e in entries.items()}:
            raise ImageRefused(f"list {verified.identifier} issue {verified.version} differs from the stored issue "
                               "of the same version: refused (an endorser must raise the version)")
    for (identifier, version), entry in entries.items():
        owner = conn.execute("SELECT list_id FROM list_images WHERE identifier = ? AND version = ?",
                             (identifier, version)).fetchone()
        if owner is not None and owner[0] != verified.identifier:
            raise ImageRefused(f"image {identifier} {version} is endorsed by list {owner[0]} already: one name, "
                               "one image")
    conn.execute("DELETE FROM list_images WHERE list_id = ?", (verified.identifier,))
    conn.execute(
        f"INSERT INTO image_lists ({_LIST_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)"
        f" ON CONFLICT (identifier) DO UPDATE SET {_REPLACED_LIST_COLUMNS}",
        (verified.identifier, source, verified.endorser, verified.key_id, verified.key_name, verified.version,
         verified.issued, verified.expires, now, old.subscribed_by if old else by,
         old.subscribed_at if old else now),
    )
    conn.executemany(
        "INSERT INTO list_images VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(verified.identifier, e.identifier, e.version, e.sha256, e.size, json.dumps(list(e.urls)), e.title)
         for e in verified.images],
    )
    return get_list(conn, verified.identifier)


def note_refresh_failure(conn: sqlite3.Connection, identifier: str, message: str) -> None:
    """Keep why the last refresh of a list was refused (the stored issue stays as it was)."""
    conn.execute("UPDATE image_lists SET last_error = ? WHERE identifier = ?", (message[:500], identifier))


def set_approval(conn: sqlite3.Connection, image: ImageRow, state: str, by: str, reason: str, now: float) -> None:
    """Approve or revoke one endorsed image (identifier, version, sha256)."""
    conn.execute(
        "INSERT INTO image_approvals (identifier, version, sha256, state, by_user, at, reason)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (identifier, version) DO UPDATE SET sha256 = excluded.sha256,"
        " state = excluded.state, by_user = excluded.by_user, at = excluded.at, reason = excluded.reason",
        (image.identifier, image.version, image.sha256, state, by, now, reason),
    )


def set_lease_images(conn: sqlite3.Connection, lease_id: str, images: list[dict]) -> None:
    """Record the images (resolved, as the pilots get them) a lease's hosts prefetch once they have reserved."""
    conn.executemany("INSERT INTO lease_images VALUES (?, ?, ?)",
                     [(lease_id, i, json.dumps(image, separators=(",", ":"))) for i, image in enumerate(images)])


def lease_images(conn: sqlite3.Connection, lease_id: str) -> list[dict]:
    """The images a lease's hosts prefetch, in the order asked."""
    return [json.loads(text) for (text,) in conn.execute(
        "SELECT image FROM lease_images WHERE lease_id = ? ORDER BY position", (lease_id,))]


# -- the rule of every VM start ---------------------------------------------------------------------


def check_list(conn: sqlite3.Connection, row: ImageRow, *, now: float, trusted_key_ids) -> None:
    """ImageRefused (409) unless the list that endorses ``row`` is signed by a key still trusted and unexpired."""
    listed = get_list(conn, row.list_id)
    if listed.key_id not in trusted_key_ids:
        raise ImageRefused(f"image {row.identifier} {row.version}: its list {listed.identifier} is signed by "
                           f"{listed.key_name}'s key, which is no longer trusted here")
    if listed.expires <= now:
        raise ImageRefused(f"image {row.identifier} {row.version}: its list {listed.identifier} has expired: "
                           f"refresh it (`workspace-lease image refresh {listed.identifier}`)")


def resolve(conn: sqlite3.Connection, identifier: str, version: str | None, *, now: float,
            trusted_key_ids: frozenset[str]) -> ImageRow:
    """The image a VM spec names, if the site may run it; ImageRefused (409) says why not.

    ``version`` None means the one approved version (refused if there are
    several: the spec must then say which).
    """
    found = images(conn, identifier)
    if not found:
        raise ImageRefused(f"image {identifier} is on no subscribed image list")
    if version is not None:
        found = [row for row in found if row.version == version]
        if not found:
            raise ImageRefused(f"image {identifier} has no version {version} on its list "
                               f"(`workspace-lease image show {identifier}` lists them)")
    else:
        approved = [row for row in found if row.approval == "approved"]
        if len(approved) > 1:
            raise ImageRefused(f"image {identifier} has {len(approved)} approved versions "
                               f"({', '.join(r.version for r in approved)}): say which with \"version\"")
        found = approved or found[-1:]
    row = found[0]
    check_list(conn, row, now=now, trusted_key_ids=trusted_key_ids)
    if row.approval == "revoked":
        raise ImageRefused(f"image {identifier} {row.version} is revoked by {row.approved_by}"
                           + (f": {row.reason}" if row.reason else ""))
    if row.approval != "approved":
        raise ImageRefused(f"image {identifier} {row.version} is endorsed but not approved by this site "
                           f"(`workspace-lease image approve {identifier} --version {row.version}`)")
    return row
