"""An image's chunk manifest: the sha256 of each fixed-size piece, so pieces from peers can be checked one by one.

Part of the wire protocol (standard library only). The service derives
the manifest from the image it holds (whose whole sha256 the signed list
gave) and answers it signed with the (slot, host) key, as it answers
commands; a pilot checks every chunk it receives, from a peer or the
service, against it before writing or serving it on, and the whole file
against the image's sha256 before it enters the cache. A manifest that
lied could only make a download fail, never let wrong bytes in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

from workspace_common.protocol.wire import ProtocolError

#: The pieces peers exchange: small enough to spread fast, large enough that hashing and HTTP stay cheap.
CHUNK_SIZE = 4 * 1024 * 1024
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
#: The most chunks a manifest may list (a 4 TiB image at 4 MiB).
MAX_CHUNKS = 1 << 20
#: The smallest chunk a manifest may have: with the image's size, it bounds the manifest's length.
MIN_CHUNK_SIZE = 1024 * 1024
#: The most members one swarm answer lists (a lease larger than this sees a random subset each time).
MAX_PEERS_SHOWN = 64


def manifest_bytes_bound(size: int) -> int:
    """The most bytes the manifest of an image of ``size`` bytes can have (chunks of MIN_CHUNK_SIZE or more)."""
    return min(-(-size // MIN_CHUNK_SIZE), MAX_CHUNKS) * 67 + 1024


def swarm_bytes_bound(count: int) -> int:
    """The most bytes a swarm answer about an image of ``count`` chunks can have: MAX_PEERS_SHOWN members, each
    with a host name, an address and a bitmap in base64, and a list of chunk indexes to seed."""
    return MAX_PEERS_SHOWN * (-(-count // 8) * 4 // 3 + 4 + 512) + count * 9 + 1024


@dataclasses.dataclass(frozen=True)
class ChunkManifest:
    """The image ``sha256`` of ``size`` bytes in chunks of ``chunk_size`` (the last may be shorter)."""

    sha256: str
    size: int
    chunk_size: int
    chunks: tuple[str, ...]

    def __post_init__(self) -> None:
        if not _SHA256_RE.fullmatch(self.sha256) or not all(_SHA256_RE.fullmatch(c) for c in self.chunks):
            raise ProtocolError("manifest: sha256s must be 64 lowercase hex digits")
        if self.chunk_size < MIN_CHUNK_SIZE:
            raise ProtocolError(f"manifest: chunks of {self.chunk_size} bytes, under the {MIN_CHUNK_SIZE} allowed")
        if self.size < 1 or len(self.chunks) != -(-self.size // self.chunk_size):
            raise ProtocolError("manifest: the chunk count does not match the size and chunk size")

    @property
    def count(self) -> int:
        """How many chunks."""
        return len(self.chunks)

    def span(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index``."""
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def holds(self, index: int, data: bytes) -> bool:
        """Whether ``data`` is chunk ``index``, byte for byte."""
        return len(data) == self.span(index)[1] and hashlib.sha256(data).hexdigest() == self.chunks[index]

    def to_json(self) -> bytes:
        """The wire body."""
        return json.dumps({"sha256": self.sha256, "size": self.size, "chunk_size": self.chunk_size,
                           "chunks": list(self.chunks)}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, body: bytes) -> "ChunkManifest":
        """Parse a manifest; ProtocolError if it is not one."""
        try:
            data = json.loads(body)
            manifest = cls(data["sha256"], int(data["size"]), int(data["chunk_size"]), tuple(data["chunks"]))
        except (ValueError, KeyError, TypeError):
            raise ProtocolError("manifest: not a chunk manifest") from None
        if manifest.count > MAX_CHUNKS:
            raise ProtocolError(f"manifest: more than {MAX_CHUNKS} chunks")
        return manifest


def manifest_of(path: str, sha256: str, chunk_size: int = CHUNK_SIZE) -> ChunkManifest:
    """The manifest of the file at ``path`` (read once; ValueError if its whole sha256 is not ``sha256``)."""
    whole, chunks, size = hashlib.sha256(), [], 0
    with open(path, "rb") as handle:
        while data := handle.read(chunk_size):
            whole.update(data)
            chunks.append(hashlib.sha256(data).hexdigest())
            size += len(data)
    if whole.hexdigest() != sha256:
        raise ValueError(f"{path} does not hold {sha256}")
    return ChunkManifest(sha256, size, chunk_size, tuple(chunks))


# -- peers: the nodes of one lease serve each other chunks ---------------------------------------------

#: ``GET http://<peer address>/chunks/{sha256}/{index}`` on a pilot's peer server.
PEER_CHUNK_PATH = "/chunks/{sha256}/{index}"
#: Headers of a peer request: who asks, when, and the proof that it holds the lease's slot secret.
PEER_HOST_HEADER, PEER_TIME_HEADER, PEER_AUTH_HEADER = "X-Peer-Host", "X-Peer-Time", "X-Peer-Auth"
#: How far a peer request's time may be from the server's clock.
PEER_SKEW_S = 120


def peer_key(slot_secret: str, slot: str) -> str:
    """The key the nodes of one slot prove membership with to each other: every node the slot's job runs on
    has the slot secret, no other node has; the service never needs this key."""
    import hmac

    message = b"workspace-pilot peer key v1\0" + slot.encode()
    return hmac.new(slot_secret.encode(), message, hashlib.sha256).hexdigest()


def peer_auth(key: str, path: str, host: str, at: int) -> str:
    """The ``X-Peer-Auth`` of a request for ``path`` by ``host`` at epoch second ``at``."""
    import hmac

    message = f"{path}\n{host}\n{at}".encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()
