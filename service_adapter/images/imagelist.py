"""Signed image lists: the format, the endorser's keys, signing and verifying (docs/images.md).

An endorser publishes an *envelope*: a JSON object whose ``signed`` member
is the list itself as a JSON text, ``signature`` the Ed25519 signature over
exactly that text's UTF-8 bytes (base64), and ``key`` the id of the key
that made it (the sha256 of the raw 32-byte public key, hex). Signing the
text rather than a re-encoding of it means no canonical JSON is needed:
what was signed is what is parsed.

:func:`verify_list` is the one way a list enters the service: the key
must be one of the trusted endorser keys, the signature must hold, the
list must be well formed and unexpired. Anything else raises
:class:`ImageListError` with one line that says why, and nothing changes.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hashlib
import json
import os
import re

# One definition of an image's name, version and largest size: the VM specs' (the wire protocol's).
from workspace_common.protocol import IMAGE_NAME_RE as NAME_RE, IMAGE_VERSION_RE as VERSION_RE, MAX_IMAGE_BYTES

FORMAT = "workspace-image-list/1"
#: The largest envelope read (about 30,000 entries of a few hundred bytes).
MAX_LIST_BYTES = 8 * 1024 * 1024
MAX_ENTRIES = 10_000
MAX_URLS = 8
MAX_TITLE = 200
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{64}")


class ImageListError(ValueError):
    """A list (or key) that cannot be used; ``str()`` is one line: what is wrong."""


@dataclasses.dataclass(frozen=True)
class ImageEntry:
    """One image a list endorses: identifier and version, its sha256 and size, where to fetch it."""

    identifier: str
    version: str
    sha256: str
    size: int
    urls: tuple[str, ...]
    title: str = ""

    def to_json(self) -> dict:
        """The entry as in the list."""
        out = {"identifier": self.identifier, "version": self.version, "sha256": self.sha256, "size": self.size,
               "urls": list(self.urls)}
        if self.title:
            out["title"] = self.title
        return out


@dataclasses.dataclass(frozen=True)
class ImageList:
    """A verified list: its identifier, endorser, version, validity and images, and the key that signed it."""

    identifier: str
    endorser: str
    version: int
    issued: float
    expires: float
    images: tuple[ImageEntry, ...]
    key_id: str
    key_name: str


# -- keys ---------------------------------------------------------------------------------------


def key_id(public_key) -> str:
    """The id of an Ed25519 public key: sha256 of its raw 32 bytes, hex."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_key(private_path: str, public_path: str) -> str:
    """Write a new Ed25519 key pair as PEM (private 0600, public 0644, neither may exist); returns its id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o644)
    except OSError:
        os.unlink(private_path)
        raise
    return key_id(private.public_key())


def _write_new(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def load_private_key(path: str):
    """An Ed25519 private key from a PEM file; ImageListError if it is not one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = _load_pem(path, lambda data: serialization.load_pem_private_key(data, password=None),
                    "an unencrypted PEM private key")
    if not isinstance(key, Ed25519PrivateKey):
        raise ImageListError(f"{path}: not an Ed25519 key (make one with `workspace-lease image keygen`)")
    return key


def load_public_key(path: str):
    """An Ed25519 public key from a PEM file; ImageListError if it is not one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = _load_pem(path, serialization.load_pem_public_key, "a PEM public key")
    if not isinstance(key, Ed25519PublicKey):
        raise ImageListError(f"{path}: not an Ed25519 public key")
    return key


def _load_pem(path: str, load, kind: str):
    try:
        with open(path, "rb") as handle:
            return load(handle.read())
    except OSError as exc:
        raise ImageListError(f"{path}: cannot read: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ImageListError(f"{path}: not {kind} ({_first(exc)})") from None


@dataclasses.dataclass(frozen=True)
class TrustedKey:
    """An endorser key the site trusts: its name (the file's name without ``.pem``), id and key."""

    name: str
    key_id: str
    key: object = dataclasses.field(repr=False, compare=False)


def load_trusted_keys(directory: str) -> dict[str, TrustedKey]:
    """The trusted endorser keys by id: every ``NAME.pem`` in ``directory`` (none if it does not exist).

    A file that is not an Ed25519 public key raises ImageListError: a
    site that put a key there meant to trust it, and must hear that it
    is not in force.
    """
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ImageListError(f"endorser key directory {directory}: {exc.strerror}") from None
    keys: dict[str, TrustedKey] = {}
    for name in names:
        if not name.endswith(".pem") or name.startswith("."):
            continue
        key = load_public_key(os.path.join(directory, name))
        trusted = TrustedKey(name[:-4], key_id(key), key)
        keys[trusted.key_id] = trusted
    return keys


# -- signing and verifying -----------------------------------------------------------------------


def sign_list(payload: dict, private_key) -> bytes:
    """The envelope of ``payload`` (checked first with :func:`parse_payload`) signed with ``private_key``."""
    text = json.dumps(payload, indent=1, sort_keys=False)
    parse_payload(text, now=None)  # an endorser cannot sign what no subscriber would accept
    signature = private_key.sign(text.encode())
    envelope = {"signed": text, "signature": base64.b64encode(signature).decode(),
                "key": key_id(private_key.public_key())}
    return json.dumps(envelope, indent=1).encode() + b"\n"


def verify_list(raw: bytes, trusted: dict[str, TrustedKey], *, now: float) -> ImageList:
    """The list an envelope carries, if a trusted key signed it, it is well formed and unexpired at ``now``.

    Raises :class:`ImageListError` (one line) otherwise. The signature is
    checked before the list is parsed: nothing an untrusted party wrote is
    interpreted.
    """
    from cryptography.exceptions import InvalidSignature

    if len(raw) > MAX_LIST_BYTES:
        raise ImageListError(f"the list is over {MAX_LIST_BYTES} bytes")
    try:
        envelope = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ImageListError(f"not a signed image list: not JSON ({_first(exc)})") from None
    if not isinstance(envelope, dict) or set(envelope) != {"signed", "signature", "key"}:
        raise ImageListError('not a signed image list: expected {"signed", "signature", "key"}')
    text, signature, kid = envelope["signed"], envelope["signature"], envelope["key"]
    if not isinstance(text, str) or not isinstance(signature, str) or not isinstance(kid, str):
        raise ImageListError("not a signed image list: signed, signature and key must be strings")
    if not _KEY_ID_RE.fullmatch(kid):
        raise ImageListError("not a signed image list: key must be a key id (64 hex digits)")
    endorser = trusted.get(kid)
    if endorser is None:
        raise ImageListError(f"signed by key {kid[:16]}..., which is not a trusted endorser key here")
    try:
        endorser.key.verify(base64.b64decode(signature, validate=True), text.encode())
    except (binascii.Error, ValueError):
        raise ImageListError("the signature is not base64") from None
    except InvalidSignature:
        raise ImageListError(f"bad signature: the list was not signed by {endorser.name}'s key, or was changed "
                             "after signing") from None
    parsed = parse_payload(text, now=now)
    return dataclasses.replace(parsed, key_id=kid, key_name=endorser.name)


def parse_payload(text: str, *, now: float | None) -> ImageList:
    """Check a list's JSON text (the signed part); ImageListError names the first problem.

    ``now`` None skips the expiry check (when signing a list ahead of time).
    """
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ImageListError(f"the list is not JSON ({_first(exc)})") from None
    if not isinstance(data, dict):
        raise ImageListError("the list must be a JSON object")
    known = {"format", "identifier", "endorser", "version", "issued", "expires", "images"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ImageListError(f"the list has unknown field(s) {', '.join(unknown)[:200]}")
    if data.get("format") != FORMAT:
        raise ImageListError(f"format must be {FORMAT!r}, not {str(data.get('format'))[:60]!r}")
    identifier = _name(data.get("identifier"), "identifier", NAME_RE)
    endorser = data.get("endorser")
    if not isinstance(endorser, str) or not endorser or len(endorser) > MAX_TITLE or not endorser.isprintable():
        raise ImageListError(f"endorser must be a printable name of at most {MAX_TITLE} characters")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= 2**53:
        raise ImageListError("version must be a whole number from 1, grown by every new issue of the list")
    issued = _time(data.get("issued"), "issued")
    expires = _time(data.get("expires"), "expires")
    if expires <= issued:
        raise ImageListError("expires must be after issued")
    if now is not None and expires <= now:
        raise ImageListError(f"the list expired at {data['expires']}: ask its endorser for a new issue")
    items = data.get("images")
    if not isinstance(items, list) or len(items) > MAX_ENTRIES:
        raise ImageListError(f"images must be a list of at most {MAX_ENTRIES} images")
    entries, seen = [], set()
    for index, item in enumerate(items):
        entry = _entry(item, f"images[{index}]")
        key = (entry.identifier, entry.version)
        if key in seen:
            raise ImageListError(f"images[{index}]: {entry.identifier} {entry.version} is listed twice")
        seen.add(key)
        entries.append(entry)
    return ImageList(identifier, endorser, version, issued, expires, tuple(entries), key_id="", key_name="")


def _entry(item, where: str) -> ImageEntry:
    if not isinstance(item, dict):
        raise ImageListError(f"{where}: must be an object")
    unknown = sorted(set(item) - {"identifier", "version", "sha256", "size", "urls", "title"})
    if unknown:
        raise ImageListError(f"{where}: unknown field(s) {', '.join(unknown)[:200]}")
    identifier = _name(item.get("identifier"), f"{where}.identifier", NAME_RE)
    version = _name(item.get("version"), f"{where}.version", VERSION_RE)
    digest = item.get("sha256")
    if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
        raise ImageListError(f"{where}.sha256: must be 64 lowercase hex digits")
    size = item.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_BYTES:
        raise ImageListError(f"{where}.size: must be the image's size in bytes, from 1 to {MAX_IMAGE_BYTES}")
    urls = item.get("urls")
    if not isinstance(urls, list) or not 1 <= len(urls) <= MAX_URLS:
        raise ImageListError(f"{where}.urls: must be a list of 1 to {MAX_URLS} URLs")
    for url in urls:
        if not isinstance(url, str) or len(url) > 2048 or not re.match(r"(https?|file)://\S+$", url):
            raise ImageListError(f"{where}.urls: {str(url)[:80]!r} is not an http(s):// or file:// URL")
    title = item.get("title", "")
    if not isinstance(title, str) or len(title) > MAX_TITLE or not title.isprintable():
        raise ImageListError(f"{where}.title: must be printable text of at most {MAX_TITLE} characters")
    return ImageEntry(identifier, version, digest, size, tuple(urls), title)


def _name(value, where: str, pattern: re.Pattern) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ImageListError(f"{where}: must be 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                             "or digit")
    return value


def _time(value, where: str) -> float:
    if not isinstance(value, str):
        raise ImageListError(f"{where}: must be a UTC time such as 2027-01-31T00:00:00Z")
    try:
        moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ImageListError(f"{where}: {value[:40]!r} is not a time such as 2027-01-31T00:00:00Z") from None
    if moment.tzinfo is None:
        raise ImageListError(f"{where}: {value[:40]!r} has no time zone: end it with Z (UTC)")
    return moment.timestamp()


def _first(exc: BaseException) -> str:
    text = str(exc).splitlines()
    return text[0][:200] if text else type(exc).__name__
