"""RefusalLog: how many lines a flood of refused requests may write (a clock moved by hand, a real logger)."""

from __future__ import annotations

import logging

from service_adapter.refusals import RefusalLog


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines_of(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "test.refused"]


def test_one_line_per_peer_per_interval_then_a_summary_of_the_rest(caplog):
    clock = Clock()
    refusals = RefusalLog(logging.getLogger("test.refused"), interval_s=60, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.refused"):
        for _ in range(1000):
            refusals.refused("127.0.0.21", "bad digest %s", "x")
        refusals.refused("127.0.0.22", "junk")
        assert lines_of(caplog) == ["refused 127.0.0.21: bad digest x", "refused 127.0.0.22: junk"]
        clock.now += 60
        refusals.refused("127.0.0.21", "bad digest %s", "y")
    assert lines_of(caplog)[2:] == [
        "999 more refused request(s) from 1 peer(s) were not logged (at most one line per peer per 60 s)",
        "refused 127.0.0.21: bad digest y",
    ]


def test_many_peers_share_one_budget_and_memory_stays_bounded(caplog):
    clock = Clock()
    refusals = RefusalLog(logging.getLogger("test.refused"), interval_s=60, max_lines=100, max_peers=500,
                          clock=clock)
    with caplog.at_level(logging.INFO, logger="test.refused"):
        for index in range(5000):
            refusals.refused(f"127.0.{index // 256}.{index % 256}", "junk")
    assert len(lines_of(caplog)) == 100
    assert len(refusals._last) <= 500


def test_a_peer_name_cannot_forge_a_line(caplog):
    refusals = RefusalLog(logging.getLogger("test.refused"), clock=Clock())
    with caplog.at_level(logging.INFO, logger="test.refused"):
        refusals.refused("a\nb", "junk")
    assert lines_of(caplog) == ["refused a\\nb: junk"]
