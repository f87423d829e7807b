"""The tracker of the nodes of one lease fetching one image: who has which chunks, and which the service seeds.

Each pilot fetching an image with peering on announces itself about twice
a second (its peer server's address and a bitmap of the chunks it holds,
verified) and gets back the other members of its own slot with their
bitmaps, and the chunks it may take from the service itself. The service
hands out each chunk nobody holds to one member at a time (at most
:data:`SEED_IN_FLIGHT` per member), so its uplink sends each chunk about
once and the members spread it among themselves: the time until the last
node is done grows with the chunks' spread, not with the number of nodes.

Nothing here is trusted for correctness: a member that lies about what it
holds costs the others a refused chunk (each is checked against the
manifest) and time. A member that stops announcing for :data:`MEMBER_TTL_S`
is dropped and its seed chunks handed to others. All state is in memory:
a restarted service starts every swarm afresh (the pilots' next announce
rebuilds it).
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time

from workspace_common.protocol.chunks import MAX_PEERS_SHOWN  # the pilot bounds its read of a swarm answer by it

#: Seconds a member stays without announcing.
MEMBER_TTL_S = 10.0
#: Seconds a seed chunk stays handed to one member before another may get it.
SEED_TTL_S = 30.0
#: Chunks one member may be fetching from the service at once.
SEED_IN_FLIGHT = 2


@dataclasses.dataclass
class _Member:
    address: str | None
    have: bytes
    seen: float


@dataclasses.dataclass
class _Swarm:
    count: int
    members: dict[str, _Member] = dataclasses.field(default_factory=dict)
    seeding: dict[int, tuple[str, float]] = dataclasses.field(default_factory=dict)
    order: list[int] = dataclasses.field(default_factory=list)


def has(bitmap: bytes, index: int) -> bool:
    """Whether chunk ``index`` is set in ``bitmap`` (bit ``index % 8`` of byte ``index // 8``)."""
    byte = index >> 3
    return byte < len(bitmap) and bool(bitmap[byte] & (1 << (index & 7)))


class SwarmBoard:
    """Every swarm of the service: one per (slot, image)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._swarms: dict[tuple[str, str], _Swarm] = {}
        self._lock = threading.Lock()

    def announce(self, slot: str, sha256: str, count: int, host: str, address: str | None,
                 have: bytes) -> tuple[list[dict], list[int]]:
        """Record ``host``'s state; (the other live members as ``{"host", "address", "have"}``, seed chunks)."""
        now = self.clock()
        with self._lock:
            swarm = self._swarms.get((slot, sha256))
            if swarm is None or swarm.count != count:
                swarm = self._swarms[(slot, sha256)] = _Swarm(count, order=random.sample(range(count), count))
            swarm.members[host] = _Member(address, have, now)
            for name in [n for n, m in swarm.members.items() if now - m.seen > MEMBER_TTL_S]:
                del swarm.members[name]
            peers = [{"host": name, "address": m.address, "have": m.have}
                     for name, m in swarm.members.items() if name != host and m.address]
            if len(peers) > MAX_PEERS_SHOWN:
                peers = random.sample(peers, MAX_PEERS_SHOWN)
            seeds = self._seed(swarm, host, have, now)
            self._forget_done(slot, sha256, swarm)
        return peers, seeds

    def _seed(self, swarm: _Swarm, host: str, have: bytes, now: float) -> list[int]:
        held = 0  # the union of every member's bitmap, as one integer (bit i: chunk i)
        for member in swarm.members.values():
            held |= int.from_bytes(member.have, "little")
        for index in list(swarm.seeding):
            who, at = swarm.seeding[index]
            if (held >> index) & 1 or who not in swarm.members or now - at > SEED_TTL_S:
                del swarm.seeding[index]
        mine = [i for i, (who, _) in swarm.seeding.items() if who == host]
        for index in swarm.order:
            if len(mine) >= SEED_IN_FLIGHT:
                break
            if not (held >> index) & 1 and index not in swarm.seeding:
                swarm.seeding[index] = (host, now)
                mine.append(index)
        return mine

    def _forget_done(self, slot: str, sha256: str, swarm: _Swarm) -> None:
        if not swarm.members:
            self._swarms.pop((slot, sha256), None)

    def size(self) -> int:
        """How many swarms are open (for tests and the service's figures)."""
        with self._lock:
            return len(self._swarms)
