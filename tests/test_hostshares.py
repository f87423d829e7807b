"""The arithmetic of a node's share and of a password guesser's hold, on a clock the test moves.

The real service's answers (429 with Retry-After, a guesser held while another address is served) are
tested against a real ``serve`` in ``tests/test_fair_share.py`` and ``tests/test_operator_door.py``; this
checks the bounds those rely on, exactly: how many requests a burst gets, how fast the bucket refills, that
requests in flight and downloads are counted and given back, and that memory stays bounded.
"""

from __future__ import annotations

import pytest

from service_adapter.hostshares import HostShares, retry_after_header
from service_adapter.loginthrottle import LoginThrottle


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_gets_the_bucket_then_the_rate_and_the_wait_says_when():
    clock = Clock()
    shares = HostShares(rate_per_s=20, burst=200, in_flight=10**6, downloads=2, clock=clock)
    admitted = [shares.admit("node1") for _ in range(250)]
    assert admitted.count(None) == 200
    assert admitted[200] == pytest.approx(1 / 20)  # one token comes back in 50 ms
    assert shares.limited["rate"] == 50
    clock.now += 1.0  # 20 tokens
    assert [shares.admit("node1") for _ in range(21)].count(None) == 20
    assert shares.admit("node2") is None  # another node's bucket is its own


def test_requests_in_flight_are_capped_and_given_back():
    shares = HostShares(rate_per_s=1000, burst=1000, in_flight=16, downloads=2, clock=Clock())
    assert [shares.admit("node1") for _ in range(16)] == [None] * 16
    assert shares.admit("node1") == 1.0 and shares.limited["in-flight"] == 1
    shares.release("node1")
    assert shares.admit("node1") is None


def test_downloads_are_capped_per_node_and_given_back():
    shares = HostShares(downloads=2, clock=Clock())
    assert [shares.start_download("node1") for _ in range(3)] == [True, True, False]
    assert shares.start_download("node2")
    shares.end_download("node1")
    assert shares.start_download("node1")


def test_quiet_nodes_are_forgotten_so_memory_stays_bounded():
    clock = Clock()
    shares = HostShares(rate_per_s=1, burst=2, clock=clock)
    for index in range(5000):
        assert shares.admit(f"node{index}") is None
        shares.release(f"node{index}")
        clock.now += 2.0  # every bucket is full again long before the next node comes
    assert len(shares._hosts) <= 4096


def test_retry_after_is_whole_seconds_at_least_one():
    assert retry_after_header(0.05) == {"Retry-After": "1"}
    assert retry_after_header(2.2) == {"Retry-After": "3"}


def test_a_guesser_gets_ten_failures_then_one_every_two_seconds_and_right_answers_cost_nothing():
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    for _ in range(10):
        assert throttle.wait("10.0.0.9") is None
        throttle.failed("10.0.0.9")
    assert throttle.wait("10.0.0.9") == pytest.approx(2.0)
    assert throttle.wait("10.0.0.8") is None  # another address
    clock.now += 2.0
    assert throttle.wait("10.0.0.9") is None
    throttle.failed("10.0.0.9")
    assert throttle.wait("10.0.0.9") == pytest.approx(2.0)
    # Over ten minutes at full speed: 10 + 300 guesses checked, not more.
    checked = 11
    for _ in range(6000):
        clock.now += 0.1
        if throttle.wait("10.0.0.9") is None:
            throttle.failed("10.0.0.9")
            checked += 1
    assert checked <= 10 + 1 + 300


def test_the_throttle_remembers_a_bounded_number_of_addresses():
    throttle = LoginThrottle(max_sources=100, clock=Clock())
    for index in range(1000):
        throttle.failed(f"10.0.{index // 256}.{index % 256}")
    assert len(throttle._sources) == 100


def test_many_busy_nodes_cost_a_few_sweeps_not_one_per_node():
    """10,000 nodes whose first requests are all in flight at once (a site's burst of `reserved`): none can be
    forgotten, and the table is swept a few times in all (each sweep waits for the table to double), not once
    for every node past 4096; once they are quiet, the next sweep forgets them."""
    clock = Clock()
    shares = HostShares(rate_per_s=1, burst=2, clock=clock)
    for index in range(10_000):
        assert shares.admit(f"node{index}") is None  # in flight: kept
    assert len(shares._hosts) == 10_000
    assert shares.sweeps == 2  # at 4096 and at 8192
    for index in range(10_000):
        shares.release(f"node{index}")
    clock.now += 10.0
    for index in range(10_000, 16_385):
        assert shares.admit(f"node{index}") is None
    assert shares.sweeps == 3 and len(shares._hosts) < 10_000  # the quiet ones went at 16,384
