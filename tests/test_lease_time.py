"""A lease's time on the embedded site (local provider, real pilots, real hugepages): a later start, an
extension, the before-end event.

tests/test_slurm_lease_time.py does the same through the real Slurm's begin times and time limits.
"""

from __future__ import annotations

import time

import pytest

from workspace_common.protocol import format_epoch, parse_time
from service_adapter.lease import TERMINAL_STATES, ExtensionRefused, InvalidLease
from service_adapter.providers.base import JobState
from tests.support.pool import pool_pages
from tests.support.localsites import local_site


@pytest.fixture
def make_site(tmp_path, hugepages):
    """``make_site(**options)``: a local site for the test (real pilots on real hugepages), closed afterwards, the
    pool then back where it was."""
    sites = []

    def make(**options):
        sites.append(local_site(tmp_path, **options))
        return sites[-1]

    yield make
    for site in sites:
        site.close()
    assert pool_pages() == hugepages


def release_and_end(site, lease_id: str) -> None:
    """Release the lease and see it end released."""
    site.leases.release(lease_id)
    assert site.leases.wait(lease_id, TERMINAL_STATES, timeout=30).state == "released"


def kinds(site, lease_id: str) -> list[tuple[str, str]]:
    """The lease's history as (kind, new state): transitions and events in the order they were recorded."""
    return [(e.kind, e.new_state) for e in site.leases.history(lease_id)]


def pilot_end(site, lease_id: str) -> float:
    (pilot,) = site.leases.get(lease_id).pilots
    return parse_time(pilot.expires_at).timestamp()


def test_a_lease_that_starts_later_is_scheduled_with_its_job_held_back_then_ready(make_site, hugepages):
    site = make_site()
    start_at = time.time() + 2
    made = site.leases.reserve(1, 16, 300, owner="alice", start_at=start_at)
    assert made.state == "scheduled" and made.start_at == start_at
    assert made.expires_at == pytest.approx(start_at + 300)
    assert site.provider.status([made.job_id]) == {made.job_id: JobState.PENDING}
    assert site.provider.pids(made.job_id) == []  # nothing runs before its begin time
    assert pool_pages() == hugepages
    ready = site.leases.wait(made.id, {"ready"} | TERMINAL_STATES, timeout=30)
    assert ready.state == "ready", ready.reason
    assert ready.ready_at >= start_at
    states = [state for kind, state in kinds(site, made.id)]
    assert states[:2] == ["scheduled", "pending"] and states[-1] == "ready"
    release_and_end(site, made.id)


def test_a_scheduled_lease_released_before_its_start_cancels_its_job_and_no_pilot_ever_runs(make_site):
    site = make_site()
    made = site.leases.reserve(2, 16, 300, start_at=time.time() + 60)
    site.leases.release(made.id)
    done = site.leases.wait(made.id, TERMINAL_STATES, timeout=30)
    assert done.state == "released", done.reason
    assert site.provider.status([made.job_id]) == {made.job_id: JobState.CANCELLED}
    assert site.provider.pids(made.job_id) == [] and done.pilots == []
    assert [state for _, state in kinds(site, made.id)] == ["scheduled", "releasing", "released"]


def test_a_start_in_the_past_or_too_far_ahead_is_refused_and_nothing_is_recorded(tmp_path):
    site = local_site(tmp_path)
    try:
        for start_at, words in ((time.time() - 1, "is not in the future"), (time.time() + 400 * 86400, "days ahead"),
                                (float("nan"), "must be a time")):
            with pytest.raises(InvalidLease, match=words):
                site.leases.reserve(1, 16, 60, start_at=start_at)
        assert site.leases.list() == []
    finally:
        site.close()


def test_an_extension_moves_the_pilots_deadline_and_the_lease_end(make_site):
    site = make_site()
    made = site.leases.reserve(1, 16, 30)
    ready = site.leases.wait(made.id, {"ready"} | TERMINAL_STATES, timeout=30)
    assert ready.state == "ready", ready.reason
    before = pilot_end(site, made.id)
    assert ready.expires_at == pytest.approx(before)  # the lease ends when its pilot does

    longer = site.leases.extend(made.id, 45)
    assert longer.duration_s == 75 and longer.expires_at == pytest.approx(before + 45)
    assert site.store.wait_for(lambda: kinds(site, made.id).count(("extended", "ready")) == 2, 15)
    events = [e for e in site.leases.history(made.id) if e.kind == "extended"]
    assert "extended by 45 s to 75 s" in events[0].reason
    assert events[1].reason.startswith(f"{ready.pilots[0].host} holds until ")  # the pilot's own word
    # The pilot counts from its own start: 75 s from there, exactly 45 s past where it was.
    assert pilot_end(site, made.id) == pytest.approx(before + 45, abs=1e-5)
    (command,) = [c for c in site.store.commands(ready.slot) if c.op == "extend"]
    assert command.outcome == "extended" and command.code == 0

    release_and_end(site, made.id)


def test_a_lease_extended_while_its_job_waits_tells_its_pilot_when_it_reserves(make_site):
    site = make_site()
    made = site.leases.reserve(1, 16, 20, start_at=time.time() + 2)
    assert site.leases.extend(made.id, 40).duration_s == 60  # the job has not started: no pilot to tell
    ready = site.leases.wait(made.id, {"ready"} | TERMINAL_STATES, timeout=30)
    assert ready.state == "ready", ready.reason
    assert site.store.wait_for(lambda: kinds(site, made.id).count(("extended", "ready")) == 1, 15)
    assert ("extended", "scheduled") in kinds(site, made.id)
    (pilot,) = site.leases.get(made.id).pilots
    # Its --duration said 20 s; the extend it got with its reserved made that 60 s from its start.
    assert pilot_end(site, made.id) - pilot.reserved_at == pytest.approx(60, abs=2)
    release_and_end(site, made.id)


def test_an_extension_of_a_lease_that_is_ending_or_ended_is_refused_and_changes_nothing(make_site):
    site = make_site()
    made = site.leases.reserve(1, 16, 300)
    assert site.leases.wait(made.id, {"ready"} | TERMINAL_STATES, timeout=30).state == "ready"
    site.leases.release(made.id)
    with pytest.raises(ExtensionRefused, match="cannot be extended: it is releasing"):
        site.leases.extend(made.id, 60)
    done = site.leases.wait(made.id, TERMINAL_STATES, timeout=30)
    with pytest.raises(ExtensionRefused, match="cannot be extended: it is released"):
        site.leases.extend(made.id, 60)
    with pytest.raises(InvalidLease, match="by_s must be a number of seconds above 0"):
        site.leases.extend(made.id, 0)
    after = site.leases.get(made.id)
    assert (after.duration_s, after.expires_at) == (300, done.expires_at)
    assert "extended" not in [kind for kind, _ in kinds(site, made.id)]
    assert [c for c in site.store.commands(made.slot) if c.op == "extend"] == []


def test_the_before_end_event_comes_after_ready_and_before_the_pilots_deadline(make_site):
    site = make_site(warn_before_s=2)
    made = site.leases.reserve(1, 16, 4)
    done = site.leases.wait(made.id, TERMINAL_STATES, timeout=30)
    assert done.state == "expired", done.reason
    history = kinds(site, made.id)
    assert history[history.index(("state", "ready")) + 1] == ("ending", "ready")
    assert history[-2:] == [("state", "releasing"), ("state", "expired")]
    assert history.count(("ending", "ready")) == 1
    (ending,) = [e for e in site.leases.history(made.id) if e.kind == "ending"]
    assert f"at its deadline, {format_epoch(done.expires_at)}" in ending.reason


def test_a_release_is_the_before_end_event_when_it_comes_first(make_site):
    site = make_site(warn_before_s=2)
    made = site.leases.reserve(1, 16, 300)
    assert site.leases.wait(made.id, {"ready"} | TERMINAL_STATES, timeout=30).state == "ready"
    release_and_end(site, made.id)
    history = kinds(site, made.id)
    assert history[-3:] == [("ending", "ready"), ("state", "releasing"), ("state", "released")]
    (ending,) = [e for e in site.leases.history(made.id) if e.kind == "ending"]
    assert "release requested" in ending.reason
