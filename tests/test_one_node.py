"""One compromised node against a real service: it can act only for its own slot, as itself.

A real LocalSite (receiver, SQLite store, local provider with its
allocation check) runs two leases with real pilot processes: lease A on
local-node1, the attacker's node, and lease B on local-node2 and
local-node3. The attacker holds what root on local-node1 holds: its node
key (from the site's node-keys, as installed) and lease A's slot secret
(from its own pilot's environment). Each attack of issue 13 is sent with
those, over HTTP, and must be refused with the store unchanged; lease B
then ends normally, reported by its own pilots.
"""

from __future__ import annotations

import pytest
import requests
from requests.auth import HTTPDigestAuth

from workspace_common.protocol import (
    COMMANDS_PATH, MAX_MEMORY_MB, MAX_SEQ, NOTIFICATIONS_PATH, SIGNATURE_HEADER, sign, slot_key,
)
from service_adapter.lease import TERMINAL_STATES
from service_adapter.local_site import LocalSite
from service_adapter.vms import parse_vm_request
from tests.support.pool import pool_pages
from tests.support.service import notification

ATTACKER = "local-node1"
SPEC = {"name": "vm1", "memory_mb": 8, "boot": {"kernel": {"path": "vmlinuz", "sha256": "0" * 64}}}


@pytest.fixture
def world(tmp_path, hugepages):
    """The site, lease A (the attacker's), lease B (two other nodes, one start-vm queued), the attacker."""
    site = LocalSite(str(tmp_path / "site"), grace_s=5, journal_dir=str(tmp_path / "journal"),
                     release_grace_s=5, status_interval_s=0.2, vm_overhead_mb=0,
                     pilot_sections={"libvirt": {"uri": ""}})
    try:
        mine = site.leases.reserve(nodes=1, memory_mb=32, duration_s=300)
        assert site.leases.wait(mine.id, {"ready"} | TERMINAL_STATES, timeout=30).state == "ready"
        theirs = site.leases.reserve(nodes=2, memory_mb=32, duration_s=300)
        ready = site.leases.wait(theirs.id, {"ready"} | TERMINAL_STATES, timeout=30)
        assert ready.state == "ready", ready.reason
        assert site.provider.hosts(mine.job_id) == [ATTACKER]
        assert ATTACKER not in site.provider.hosts(theirs.job_id)
        site.vms.start(theirs.id, [parse_vm_request(SPEC)])
        # Its pilot answers (vm-failed: these nodes host no VMs); after that nothing writes but the attacks.
        assert site.store.wait_for(lambda: all(c.outcome for c in site.store.commands(theirs.slot)), 30)
        yield site, mine, ready
    finally:
        site.close()


class Attacker:
    """Root on local-node1: its node key and its own slot's secret, nothing else."""

    def __init__(self, site, own_slot: str):
        self.site = site
        self.node_key = open(f"{site.node_key_dir}/{ATTACKER}.key", encoding="ascii").read().strip()
        self.own_slot = own_slot
        self.own_key = slot_key(self.node_key, own_slot, site.store.slot_secret(own_slot))
        self.session = requests.Session()
        self.session.auth = HTTPDigestAuth(ATTACKER, self.node_key)

    def notify(self, body: bytes, key: str | None = None) -> requests.Response:
        """POST ``body`` signed with ``key`` (default: the attacker's own slot key)."""
        return self.session.post(self.site.url + NOTIFICATIONS_PATH, data=body, timeout=10,
                                 headers={SIGNATURE_HEADER: sign(key or self.own_key, body)})

    def poll(self, slot: str, host: str) -> requests.Response:
        path = COMMANDS_PATH.format(slot=slot, host=host) + "?after=0&wait=0"
        return self.session.get(self.site.url + path, timeout=10)


def refused(site, send, status: int, result: str) -> dict:
    """Run ``send()``; its answer must be ``status``/``result`` and the store must not change."""
    before = site.store.snapshot()
    answer = send()
    assert answer.status_code == status, answer.text
    assert answer.json()["result"] == result, answer.text
    assert site.store.snapshot() == before
    return answer.json()


def test_one_node_cannot_read_or_steal_another_hosts_commands(world):
    site, mine, theirs = world
    attacker = Attacker(site, mine.slot)
    victim = theirs.pilots[0].host
    answer = refused(site, lambda: attacker.poll(theirs.slot, victim), 403, "forbidden")
    assert "commands" not in answer and "vm1" not in str(answer)
    # Under its own name in a slot it never reserved (nor was given): nothing either, and no heartbeat.
    refused(site, lambda: attacker.poll(theirs.slot, ATTACKER), 404, "unknown-slot")
    assert not [p for p in site.store.pilots(theirs.slot) if p.host == ATTACKER]


def test_one_node_cannot_reserve_for_invented_hosts_or_other_slots(world):
    site, mine, theirs = world
    attacker = Attacker(site, mine.slot)
    invented = notification(theirs.slot, host="invented-node", memory_mb=MAX_MEMORY_MB).to_json()
    refused(site, lambda: attacker.notify(invented), 403, "forbidden")
    # As itself, in lease B's slot: it has no key for that slot.
    as_itself = notification(theirs.slot, host=ATTACKER, memory_mb=32).to_json()
    refused(site, lambda: attacker.notify(as_itself), 401, "unauthorized")
    # Even with lease B's secret leaked: the batch system did not give local-node1 to B's job.
    leaked = slot_key(attacker.node_key, theirs.slot, site.store.slot_secret(theirs.slot))
    answer = refused(site, lambda: attacker.notify(as_itself, key=leaked), 403, "not-allocated")
    assert ATTACKER in answer["detail"]
    assert site.leases.get(theirs.id).state == "ready"


def test_one_node_cannot_end_another_hold_or_inflate_usage(world):
    site, mine, theirs = world
    attacker = Attacker(site, mine.slot)
    victim = theirs.pilots[0].host
    unreserved = notification(theirs.slot, seq=50, state="unreserved", host=victim, memory_mb=0).to_json()
    refused(site, lambda: attacker.notify(unreserved), 403, "forbidden")
    # Its own slot: a hold claimed far beyond the lease's memory is refused before any usage is counted.
    inflated = notification(mine.slot, seq=50, state="reserved", host=ATTACKER, memory_mb=MAX_MEMORY_MB).to_json()
    refused(site, lambda: attacker.notify(inflated), 422, "out-of-bounds")
    assert site.store.usage_rows() == []


def test_one_node_cannot_block_another_hosts_notifications_with_a_huge_seq(world):
    site, mine, theirs = world
    attacker = Attacker(site, mine.slot)
    victim = theirs.pilots[0].host
    heartbeat = notification(theirs.slot, seq=MAX_SEQ, state="heartbeat", host=victim).to_json()
    refused(site, lambda: attacker.notify(heartbeat), 403, "forbidden")
    # Nor its own slot's (which would only hurt itself, but the service refuses the jump all the same).
    own = notification(mine.slot, seq=MAX_SEQ, state="heartbeat", host=ATTACKER).to_json()
    refused(site, lambda: attacker.notify(own), 422, "out-of-bounds")


def test_one_node_cannot_fail_a_lease_it_does_not_hold(world):
    site, mine, theirs = world
    attacker = Attacker(site, mine.slot)
    victim = theirs.pilots[0].host
    as_victim = notification(theirs.slot, seq=50, state="error", host=victim, code=5, message="gone").to_json()
    refused(site, lambda: attacker.notify(as_victim), 403, "forbidden")
    as_itself = notification(theirs.slot, seq=1, state="error", host=ATTACKER, code=5, message="gone").to_json()
    refused(site, lambda: attacker.notify(as_itself), 401, "unauthorized")


def test_after_every_attack_the_victims_lease_ends_as_its_own_pilots_say(world, hugepages):
    site, mine, theirs = world
    attacker = Attacker(site, mine.slot)
    victim = theirs.pilots[0].host
    for body in (
        notification(theirs.slot, host="invented-node", memory_mb=MAX_MEMORY_MB).to_json(),
        notification(theirs.slot, seq=MAX_SEQ, state="heartbeat", host=victim).to_json(),
        notification(theirs.slot, seq=50, state="error", host=victim, code=5).to_json(),
    ):
        assert attacker.notify(body).status_code == 403
    assert site.leases.release(theirs.id).state == "releasing"
    done = site.leases.wait(theirs.id, TERMINAL_STATES, timeout=30)
    assert done.state == "released", done.reason
    for pilot in done.pilots:
        assert pilot.state == "unreserved"
    assert site.provider.wait(theirs.job_id, timeout=15) == [0, 0]
    assert site.leases.get(mine.id).state == "ready"  # the attacker's own lease is untouched too
    assert pool_pages() == hugepages + 16  # lease A's 32 MB still held, B's given back
