"""Busy or idle, and the Machine/Job Features: what the pilot makes of a guest's words and its CPU counter, and what
it tells the guest (through a VM host: tests/test_vmhost.py)."""

from __future__ import annotations

import socket

import pytest

from pilot.vm.features import LeaseEnd, check_feature, feature_lines, vm_features
from pilot.vm.usage import AGENT_WORD_TTL_S, MAX_LINE_BYTES, MAX_READ_BYTES, GuestUsage, drain


def test_features_count_from_the_vms_start_to_the_lease_end_in_whole_seconds_and_bytes():
    features = vm_features(slot="lease-1", name="web", vcpus=4, memory_mb=2048, started_at=1_800_000_000.7,
                           end=LeaseEnd(1_800_007_200.9, 30.0))
    assert features == {
        "machinefeatures": {"total_cpu": "4", "shutdowntime": "1800007200", "grace_secs": "30"},
        "jobfeatures": {"allocated_cpu": "4", "shutdowntime_job": "1800007200", "grace_secs_job": "30",
                        "jobstart_secs": "1800000000", "wall_limit_secs": "7200", "cpu_limit_secs": "28800",
                        "mem_limit_bytes": str(2048 * 2**20), "max_rss_bytes": str(2048 * 2**20),
                        "job_id": "lease-1.web"},
    }
    lines = feature_lines(features).splitlines()
    assert lines[1] == "mjf machinefeatures shutdowntime 1800007200" and len(lines) == 12


@pytest.mark.parametrize("directory, key, value", [
    ("etc", "passwd", "1"), ("jobfeatures", "../x", "1"), ("jobfeatures", "K", "1"), ("jobfeatures", "k", "a b"),
    ("jobfeatures", "k", "a/b"), ("jobfeatures", "k", ""), ("jobfeatures", "k", "x" * 129),
])
def test_a_feature_the_agent_would_drop_is_refused_before_it_is_sent(directory, key, value):
    with pytest.raises(ValueError, match="not a feature the guest agent takes"):
        check_feature(directory, key, value)


def test_the_agents_word_is_believed_until_it_goes_stale_then_the_cpu_decides():
    usage = GuestUsage()
    usage.hear(b"hello\nusage bu", 100.0)
    assert usage.hello and usage.word is None  # half a line waits for the rest
    usage.hear(b"sy\n", 101.0)
    assert usage.word == "busy"
    assert usage.judge(cpu=0, busy_cpu_percent=10, now=101.0 + AGENT_WORD_TTL_S).busy  # the guest says busy
    stale = usage.judge(cpu=0, busy_cpu_percent=10, now=101.5 + AGENT_WORD_TTL_S)
    assert (stale.busy, stale.source) == (False, "cpu")
    usage.hear(b"usage idle\n", 200.0)
    look = usage.judge(cpu=95, busy_cpu_percent=10, now=200.0)
    assert (look.busy, look.cpu, look.source) == (False, 95, "agent")


def test_a_guest_cannot_say_more_than_the_three_words_nor_grow_the_pilots_buffer():
    usage = GuestUsage()
    usage.hear(b"usage busy; rm -rf /\nUSAGE BUSY\nusage\n", 1.0)
    assert usage.word is None and not usage.hello
    usage.hear(b"x" * (MAX_LINE_BYTES + 1), 2.0)  # no end of line: dropped whole, and its end too
    assert usage.partial == b""
    usage.hear(b"x" * 10 + b"usage busy\n", 3.0)
    assert usage.word is None  # the end of the overlong line is not a word
    usage.hear(b"usage busy\n", 4.0)
    assert usage.word == "busy"


def test_cpu_use_is_the_counters_growth_over_the_time_between_looks_per_vcpu():
    usage = GuestUsage()
    assert usage.cpu_percent(10_000_000_000, 2, 100.0) is None  # a first reading says nothing yet
    assert usage.cpu_percent(11_000_000_000, 2, 101.0) == 50  # one CPU-second in one second, of two vCPUs
    assert usage.cpu_percent(11_050_000_000, 2, 102.0) == 2
    assert usage.cpu_percent(5_000_000_000, 2, 103.0) is None  # the counter went back: a new domain
    assert usage.judge(None, 10, 103.0).busy  # unmeasured: busy, so a starting VM is never taken for idle


def test_drain_reads_what_there_is_without_waiting_at_most_its_bound():
    ours, guest = socket.socketpair()
    ours.settimeout(1.0)  # as the pilot's channel: a socket with a timeout would wait before a plain read
    try:
        assert drain(ours) == (b"", False)
        guest.sendall(b"u" * (MAX_READ_BYTES + 100))
        data, closed = drain(ours)
        assert len(data) == MAX_READ_BYTES and not closed
        guest.close()
        data, closed = drain(ours)
        assert data == b"u" * 100 and closed
    finally:
        ours.close()


def test_the_vms_end_is_the_deadline_until_a_sooner_end_is_known_and_only_a_warning_gives_a_line():
    from pilot.vmend import VmEnd

    end = VmEnd(grace_s=30)
    assert end.end(None) is None and end.line() is None
    assert end.end(2_000.0) == LeaseEnd(2_000.0, 30)
    end.set(1_500.0, "release", line=False)  # a release where the site wants no warning line
    assert end.end(2_000.0) == LeaseEnd(1_500.0, 30) and end.line() is None and not end.warned
    end.set(1_500.0, "release", line=True)
    assert end.warned and end.line().startswith("ending 1970-01-01T00:25:00.000000Z 0 release")
    end.clear()  # extended: the deadline again
    assert end.end(2_600.0) == LeaseEnd(2_600.0, 30) and end.line() is None
