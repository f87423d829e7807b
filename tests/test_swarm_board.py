"""The tracker's rules (service_adapter.images.swarm), on a clock the test moves.

The addresses are only what members announce (nothing connects to them here).
"""

from __future__ import annotations

from pilot.images.peers import bitmap
from service_adapter.images.swarm import MEMBER_TTL_S, SEED_IN_FLIGHT, SwarmBoard

SHA = "ab" * 32


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_chunk_nobody_holds_is_seeded_to_one_member_at_a_time():
    board = SwarmBoard(Clock())
    _, first = board.announce("slot", SHA, 8, "n1", "127.0.0.1:1001", bitmap(set(), 8))
    _, second = board.announce("slot", SHA, 8, "n2", "127.0.0.1:1002", bitmap(set(), 8))
    assert len(first) == len(second) == SEED_IN_FLIGHT and not set(first) & set(second)
    # n1 got its chunks: they are no longer anyone's to seed, and n1 gets new ones.
    _, again = board.announce("slot", SHA, 8, "n1", "127.0.0.1:1001", bitmap(set(first), 8))
    assert not set(again) & (set(first) | set(second))


def test_members_see_only_their_own_slot_and_a_silent_member_is_forgotten_with_its_seeds():
    clock = Clock()
    board = SwarmBoard(clock)
    _, seeds = board.announce("slot", SHA, 4, "n1", "127.0.0.1:1001", bitmap(set(), 4))
    board.announce("other-slot", SHA, 4, "x1", "127.0.0.1:1009", bitmap({0, 1, 2, 3}, 4))
    peers, own = board.announce("slot", SHA, 4, "n2", "127.0.0.1:1002", bitmap(set(), 4))
    assert [p["host"] for p in peers] == ["n1"]  # never a node of another lease
    assert set(own) == {0, 1, 2, 3} - set(seeds)
    clock.now += MEMBER_TTL_S + 1  # n1 falls silent, holding nothing
    peers, taken_over = board.announce("slot", SHA, 4, "n2", "127.0.0.1:1002", bitmap(set(own), 4))
    assert peers == [] and set(taken_over) == set(seeds)  # its chunks went to n2
