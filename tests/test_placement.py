"""Where a lease's VMs go (service_adapter/placement.py): pure, so tested on its own."""

from __future__ import annotations

import pytest

from service_adapter.placement import HostRoom, PlacementError, place


def rooms(**free_mb) -> list[HostRoom]:
    return [HostRoom(host, 1024, mb) for host, mb in free_mb.items()]


def test_vms_go_largest_first_to_the_host_with_the_most_room_left_ties_by_name():
    wanted = [("small", 100, None), ("big", 300, None), ("mid", 200, None), ("last", 100, None)]
    # big -> n2 (500 vs 400: n2 has 200 left); mid -> n1 (400 vs 200: 200 left); small -> n1 (200 each: the name
    # decides; 100 left); last -> n2 (200 vs 100).
    assert place(wanted, rooms(n1=400, n2=500)) == ["n1", "n2", "n1", "n2"]


def test_a_vm_that_names_its_host_goes_there_first_and_the_others_spread_around_it():
    wanted = [("a", 100, None), ("pinned", 300, "n1"), ("b", 100, None)]
    assert place(wanted, rooms(n1=400, n2=150)) == ["n2", "n1", "n1"]


def test_a_thousand_vms_over_ten_hosts_spread_evenly():
    hosts = {f"n{i:02d}": 10_000 for i in range(10)}
    chosen = place([(f"v{i}", 100, None) for i in range(1000)], rooms(**hosts))
    assert {host: chosen.count(host) for host in hosts} == dict.fromkeys(hosts, 100)


@pytest.mark.parametrize("wanted, message", [
    ([("a", 300, None), ("b", 300, None)], r"VM b needs 300 MB with overhead; no host has that free \(n1 100 MB, n2 "
                                          r"200 MB\)"),
    ([("a", 100, "n9")], r"VM a: host 'n9' is not a host of the lease"),
    ([("a", 500, "n1")], r"VM a needs 500 MB with overhead; n1 has 400 MB free"),
])
def test_what_does_not_fit_is_refused_naming_the_vm_and_the_room(wanted, message):
    with pytest.raises(PlacementError, match=message):
        place(wanted, rooms(n1=400, n2=200))
