"""Hosting a slot's VMs (pilot.vm.host) on libvirt's real test driver (test:///default, no daemon).

The test driver keeps its domains in this process, shared by the
connections open in it; the tests of two slots therefore share one
connection, as two pilots share one libvirtd.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from workspace_common.protocol import ImageFile, VmSpec
from pilot.vm.check import VmPolicy
from pilot.vm.features import LeaseEnd
from pilot.vm.host import VmHost, VmOutcome, VmTeardownError
from pilot.vm.overlay import DiskBudget, virtual_size
from pilot.vm.vmfiles import vm_file
from pilot.vm.tag import VmTag, read_tag, set_tag

libvirt = pytest.importorskip("libvirt")

SLOT_A = "aaaaaaaa-1111-4000-8000-000000000001"
SLOT_B = "bbbbbbbb-2222-4000-8000-000000000002"
DISK = b"a tiny disk image\n" * 100
URI = "test:///default"


@pytest.fixture
def conn():
    """One test-driver connection; every domain a test leaves is destroyed afterwards."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    connection = libvirt.open(URI)
    before = {d.name() for d in connection.listAllDomains(0)}
    yield connection
    for domain in connection.listAllDomains(0):
        if domain.name() not in before and domain.isActive():
            domain.destroy()
    connection.close()


@pytest.fixture
def policy(tmp_path):
    os.chmod(tmp_path, 0o755)
    images = tmp_path / "images"
    images.mkdir(mode=0o755)
    (images / "disk.raw").write_bytes(DISK)
    return VmPolicy(str(images), str(tmp_path / "consoles"), overhead_mb=64, networks=("default",), hugepage_kb=2048,
                    disks=DiskBudget(str(tmp_path / "vm-files"), reserve_mb=0))


def spec(name="vm1", memory_mb=256, **kwargs) -> VmSpec:
    kwargs.setdefault("disk", ImageFile("disk.raw", hashlib.sha256(DISK).hexdigest()))
    return VmSpec(name, memory_mb, **kwargs)


def make_host(conn, policy, slot=SLOT_A, reserved_mb=1024, **kwargs) -> VmHost:
    return VmHost(lambda: conn, slot=slot, lease="lease-1", pilot_pid=4242, policy=policy,
                  reserved_mb=reserved_mb, uri=URI, **kwargs)


def names(conn) -> set[str]:
    return {d.name() for d in conn.listAllDomains(0) if d.isActive()}


def untagged(conn, name):
    xml = f"<domain type='test'><name>{name}</name><memory>65536</memory><os><type>hvm</type></os></domain>"
    return conn.createXML(xml, 0)


# -- start ---------------------------------------------------------------------------------------


def test_start_runs_a_transient_domain_tagged_with_the_slot(conn, policy):
    host = make_host(conn, policy)
    outcome = host.start(spec(console_log="vm1.log", network="default"))
    assert outcome.ok and outcome.name == "vm1", outcome.reason
    domain = conn.lookupByName("wp-aaaaaaaa-vm1")
    assert domain.isActive() and not domain.isPersistent()
    assert read_tag(domain) == VmTag(SLOT_A, "lease-1", 4242)
    assert "<page size='2048' unit='KiB'/>" in domain.XMLDesc(0)  # the policy's hugepages back it
    assert [(i.name, i.domain_name, i.memory_mb, i.state) for i in host.vms()] == [
        ("vm1", "wp-aaaaaaaa-vm1", 256, "running")
    ]
    # Its writable disk is the pilot's overlay over the image, as big as the image; it goes with the VM.
    overlay = vm_file(policy.disks.directory, "wp-aaaaaaaa-vm1", "qcow2")
    assert f"<source file='{overlay}'" in domain.XMLDesc(0)
    assert virtual_size(overlay, "qcow2") == -(-len(DISK) // 512) * 512  # in whole sectors, as QEMU sees the image
    assert os.stat(overlay).st_mode & 0o777 == 0o600
    assert host.stop("vm1", force=True).ok
    assert not os.path.exists(overlay)


@pytest.mark.parametrize(
    "bad, reason",
    [
        (spec(memory_mb=2048), "memory: 2048 MB + 64 MB overhead would make 2112 MB of the 1024 MB reserved"),
        (dataclasses.replace(spec(), disk=ImageFile("disk.raw", "f" * 64)), "disk: disk.raw has sha256 "),
        (spec(network="corp-lan"), "network: 'corp-lan' is not allowed here (allowed: default)"),
        (spec(disk=ImageFile("/etc/passwd", "0" * 64)), "disk: /etc/passwd resolves to /etc/passwd, outside"),
        (spec(memory_mb=255), "memory: 255 MB is not a whole number of 2048 kB hugepages"),
    ],
    ids=["memory", "sha256", "network", "outside", "hugepages"],
)
def test_a_refused_spec_starts_nothing_and_says_why(conn, policy, bad, reason):
    host = make_host(conn, policy)
    before = names(conn)
    outcome = host.start(bad)
    assert not outcome.ok and outcome.reason.startswith(reason), outcome.reason
    assert names(conn) == before
    assert host.vms() == []


def test_the_slot_memory_counts_the_running_vms_with_their_overhead(conn, policy):
    host = make_host(conn, policy, reserved_mb=1024)
    assert host.start(spec("one", 512)).ok
    second = host.start(spec("two", 512))
    assert not second.ok
    assert second.reason == (
        "memory: 512 MB + 64 MB overhead would make 1152 MB of the 1024 MB reserved (in use 576 MB); at most 384 MB fits"
    )
    assert host.start(spec("two", 384)).ok
    assert host.stop("one", force=True).ok
    assert host.start(spec("three", 512)).ok  # what a stopped VM held is free again


def test_a_name_already_running_in_the_slot_is_refused(conn, policy):
    host = make_host(conn, policy)
    assert host.start(spec("vm1")).ok
    again = host.start(spec("vm1"))
    assert not again.ok and again.reason == "a VM named vm1 already runs in this slot; stop it first"
    assert len([n for n in names(conn) if n.startswith("wp-")]) == 1


def test_a_libvirt_error_is_a_refusal_with_libvirts_message(conn, policy):
    squatter = untagged(conn, "wp-aaaaaaaa-vm1")  # a domain already has the name
    host = make_host(conn, policy)
    outcome = host.start(spec("vm1"))
    assert not outcome.ok
    assert outcome.reason.startswith("libvirt refused the domain: ") and "already exists" in outcome.reason
    assert "\n" not in outcome.reason
    assert squatter.isActive() and read_tag(squatter) is None
    assert host.vms() == []


def test_concurrent_starts_never_overcommit_the_slot(conn, policy):
    host = make_host(conn, policy, reserved_mb=1280)  # room for four of (256 + 64)
    outcomes = []
    threads = [threading.Thread(target=lambda i=i: outcomes.append(host.start(spec(f"vm{i}", 256)))) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(o.ok for o in outcomes) == 4
    assert all(o.reason.startswith("memory: ") for o in outcomes if not o.ok)
    assert len([n for n in names(conn) if n.startswith("wp-aaaaaaaa-")]) == 4


# -- before_first_vm -----------------------------------------------------------------------------


def test_before_first_vm_is_called_once_before_the_first_domain_exists(conn, policy):
    calls = []

    def journal(uri):
        calls.append((uri, sorted(n for n in names(conn) if n.startswith("wp-"))))

    host = make_host(conn, policy, before_first_vm=journal)
    assert calls == []
    assert host.start(spec("one")).ok
    assert host.start(spec("two")).ok
    assert calls == [(URI, [])]


def test_a_failing_before_first_vm_creates_nothing(conn, policy):
    def broken(uri):
        raise OSError("journal disk full")

    host = make_host(conn, policy, before_first_vm=broken)
    before = names(conn)
    outcome = host.start(spec())
    assert not outcome.ok
    assert outcome.reason == "cannot record that VMs may exist on this node: journal disk full"
    assert names(conn) == before


# -- stop ----------------------------------------------------------------------------------------


def test_forced_stop_destroys_at_once(conn, policy):
    host = make_host(conn, policy)
    host.start(spec())
    outcome = host.stop("vm1", force=True)
    assert outcome.ok and outcome.reason == "destroyed"
    assert "wp-aaaaaaaa-vm1" not in names(conn)
    assert host.vms() == []


def test_graceful_stop_shuts_the_guest_down(conn, policy):
    host = make_host(conn, policy)
    host.start(spec())
    outcome = host.stop("vm1")  # the test driver's guest shuts down at once
    assert outcome.ok and outcome.reason.startswith("shut down in ")
    assert "wp-aaaaaaaa-vm1" not in names(conn)
    assert host.vms() == [] and host.gone() == []


def test_suspend_pauses_the_domain_resume_lets_it_run_and_a_repeat_is_harmless(conn, policy):
    host = make_host(conn, policy)
    assert host.start(spec("vm1")).ok
    domain = conn.lookupByName(host.domain_name("vm1"))
    paused = host.pause("vm1")
    assert paused.ok and paused.reason.startswith("suspended in")
    assert domain.info()[0] == libvirt.VIR_DOMAIN_PAUSED
    assert host.pause("vm1") == VmOutcome(True, "vm1", "already paused")
    assert [(vm.name, vm.state) for vm in host.vms()] == [("vm1", "running")]  # on the books: it holds memory
    resumed = host.pause("vm1", resume=True)
    assert resumed.ok and domain.info()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert host.pause("vm1", resume=True) == VmOutcome(True, "vm1", "already running")


def test_a_paused_vm_stops_gracefully_and_pause_touches_only_this_slot(conn, policy):
    mine, theirs = make_host(conn, policy), make_host(conn, policy, slot=SLOT_B)
    assert mine.start(spec("vm1")).ok and theirs.start(spec("vm1")).ok
    refused = mine.pause("nosuch")
    assert not refused.ok and "not a VM of this slot" in refused.reason
    assert mine.pause("vm1").ok
    assert conn.lookupByName(theirs.domain_name("vm1")).info()[0] == libvirt.VIR_DOMAIN_RUNNING
    stopped = mine.stop("vm1", timeout_s=5)  # (the test driver shuts down even a paused domain; QEMU's guest
    assert stopped.ok and stopped.reason.startswith("shut down in"), stopped.reason  # needs the resume first)


def test_stop_touches_only_this_slots_domains(conn, policy):
    host = make_host(conn, policy)
    other = untagged(conn, "wp-aaaaaaaa-theirs")
    set_tag(other, VmTag(SLOT_B, "lease-2", 99), flags=libvirt.VIR_DOMAIN_AFFECT_LIVE)
    bare = untagged(conn, "wp-aaaaaaaa-bare")
    for name, owner in (("theirs", f"belongs to slot {SLOT_B}"), ("bare", "has no pilot tag")):
        outcome = host.stop(name, force=True)
        assert not outcome.ok and outcome.reason == f"not a VM of this slot: domain wp-aaaaaaaa-{name} {owner}"
    assert other.isActive() and bare.isActive()
    missing = host.stop("nothing")
    assert not missing.ok and missing.reason == "not a VM of this slot: no domain wp-aaaaaaaa-nothing on this node"


# -- gone ----------------------------------------------------------------------------------------


def test_gone_reports_a_vm_that_ended_behind_the_hosts_back_once(conn, policy):
    host = make_host(conn, policy)
    host.start(spec("stays"))
    host.start(spec("ends"))
    conn.lookupByName("wp-aaaaaaaa-ends").destroy()
    assert [(i.name, i.state) for i in host.vms()] == [("ends", "gone"), ("stays", "running")]
    assert host.gone() == ["ends"]
    assert host.gone() == []
    assert [i.name for i in host.vms()] == ["stays"]
    assert host.start(spec("ends")).ok  # its name and memory are free again


# -- teardown ------------------------------------------------------------------------------------


def test_teardown_of_one_slot_leaves_the_other_slot_and_the_neighbour_running(conn, policy, caplog):
    host_a, host_b = make_host(conn, policy, slot=SLOT_A), make_host(conn, policy, slot=SLOT_B)
    assert host_a.start(spec("a1")).ok and host_a.start(spec("a2")).ok
    assert host_b.start(spec("b1")).ok
    neighbour = untagged(conn, "neighbour")
    # A domain of slot A that A's books do not know (left by a crashed pilot of the slot).
    leftover = untagged(conn, "wp-aaaaaaaa-old")
    set_tag(leftover, VmTag(SLOT_A, "lease-1", 1), flags=libvirt.VIR_DOMAIN_AFFECT_LIVE)

    with caplog.at_level(logging.INFO, logger="pilot.vm.host"):
        destroyed = host_a.teardown()

    assert sorted(destroyed) == ["a1", "a2", "old"]
    left = names(conn)
    assert not any(n.startswith("wp-aaaaaaaa-") for n in left)
    assert {"wp-bbbbbbbb-b1", "neighbour", "test"} <= left
    assert neighbour.isActive()
    assert [i.name for i in host_b.vms()] == ["b1"]
    assert any(r.getMessage().startswith("destroyed VM a1 (domain wp-aaaaaaaa-a1) in ") for r in caplog.records)
    refused = host_a.start(spec("late"))
    assert not refused.ok and refused.reason == "the slot is being torn down; no new VMs"


def test_teardown_without_any_vm_does_not_open_libvirt(policy):
    opened = []

    def connect():
        opened.append(True)
        raise AssertionError("teardown opened libvirt")

    host = VmHost(connect, slot=SLOT_A, lease="l", pilot_pid=1, policy=policy, reserved_mb=1024)
    assert host.teardown() == []
    assert opened == []
    host.close()


def test_teardown_of_a_journalled_slot_looks_for_its_vms(conn, policy):
    leftover = untagged(conn, "wp-aaaaaaaa-old")
    set_tag(leftover, VmTag(SLOT_A, "lease-1", 1), flags=libvirt.VIR_DOMAIN_AFFECT_LIVE)
    host = make_host(conn, policy, vms_journalled=True)
    assert host.teardown() == ["old"]
    assert "wp-aaaaaaaa-old" not in names(conn)


def test_teardown_after_a_failed_journal_hook_still_looks(conn, policy):
    def half_written(uri):
        raise OSError("fsync failed")

    host = make_host(conn, policy, before_first_vm=half_written)
    assert not host.start(spec()).ok
    stray = untagged(conn, "wp-aaaaaaaa-stray")
    set_tag(stray, VmTag(SLOT_A, "lease-1", 4242), flags=libvirt.VIR_DOMAIN_AFFECT_LIVE)
    assert host.teardown() == ["stray"]


def test_teardown_that_cannot_reach_libvirt_raises(policy):
    uri = "test:///nonexistent/node.xml"
    host = VmHost(lambda: libvirt.open(uri), slot=SLOT_A, lease="l", pilot_pid=1,
                  policy=policy, reserved_mb=1024, vms_journalled=True, uri=uri)
    with pytest.raises(VmTeardownError, match=f"^cannot list the VMs at {uri}: ") as failed:
        host.teardown()
    assert failed.value.destroyed == []


# -- import --------------------------------------------------------------------------------------


def test_importing_the_vm_modules_does_not_import_libvirt():
    code = (
        "import sys\n"
        "import pilot.vm.host, pilot.vm.check, pilot.vm.domainxml\n"
        "assert 'libvirt' not in sys.modules, 'libvirt imported at start'\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_read_tag_of_a_domain_that_vanished_is_none(conn):
    # teardown and kill-all list domains, then ask each: one may end in between.
    domain = untagged(conn, "short-lived")
    set_tag(domain, VmTag(SLOT_A, "lease-1", 1), flags=libvirt.VIR_DOMAIN_AFFECT_LIVE)
    domain.destroy()
    assert read_tag(domain) is None


def test_interrupt_refuses_new_starts_and_leaves_running_vms_to_teardown(conn, policy):
    host = make_host(conn, policy)
    assert host.start(spec("vm1")).ok
    host.interrupt()
    refused = host.start(spec("vm2"))
    assert not refused.ok and refused.reason == "the slot is being torn down; no new VMs"
    assert "wp-aaaaaaaa-vm1" in names(conn)
    assert host.teardown() == ["vm1"]


def test_a_vm_started_as_the_pilot_warns_is_told_once(conn, policy, monkeypatch):
    # libvirt's test driver makes no lease channel socket: each VM's channel here is one end of a real socket
    # pair, the other end standing for the guest's port.
    import socket

    from pilot.vm import leasechannel

    guests = {}

    def channel(domain):
        ours, guest = socket.socketpair()
        guests[domain.name()] = guest
        return ours

    monkeypatch.setattr(leasechannel, "open_channel", channel)
    line = "ending 2026-12-06T17:00:00.000000Z 290 deadline"
    warned = []  # the pilot sets its warning, then queues the broadcast: a VM starting in between reads it
    host = make_host(conn, policy, warning=lambda: warned[0] if warned else None)
    assert host.start(spec("early")).ok
    warned.append(line)
    assert host.start(spec("late")).ok  # told at its start
    assert host.warn("ending 2026-12-06T17:00:00.000000Z 289 deadline") == ["early", "late"]  # the broadcast
    assert host.warn("ending 2026-12-06T17:00:30.000000Z 300 release") == ["early", "late"]  # a new warning
    for name, guest in guests.items():
        guest.settimeout(5)
        told = guest.recv(4096).decode().splitlines()
        assert [words.split()[3] for words in told] == ["deadline", "release"], (name, told)


def test_overlays_are_made_only_within_the_nodes_disk_budget_and_leave_with_their_slot(conn, policy, tmp_path):
    """Two slots share one node budget; a disk whose overlay would not fit is refused with what is left."""
    big = tmp_path / "images" / "big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(big), "40M"], check=True)
    big_sha256 = hashlib.sha256(big.read_bytes()).hexdigest()
    big_spec = lambda name: spec(name, disk=ImageFile("big.qcow2", big_sha256))  # noqa: E731
    budget = dataclasses.replace(policy, disks=dataclasses.replace(policy.disks, budget_mb=100))
    a, b = make_host(conn, budget), make_host(conn, budget, slot=SLOT_B)
    assert a.start(big_spec("vm1")).ok and b.start(big_spec("vm1")).ok
    before = names(conn)
    refused = a.start(big_spec("vm2"))
    # 2 x (40 MiB + 10 KiB of tables + 1 MiB) = 82.02 MiB taken of 100: a third 41.01 MiB does not fit.
    assert not refused.ok and refused.reason == (
        "disk: its overlay may grow to 42 MB and the node's VM files to 83 MB of the 100 MB disk budget; "
        "at most 18 MB is left (ask for readonly: true, or a smaller disk)"), refused.reason
    assert names(conn) == before and sorted(os.listdir(policy.disks.directory)) == [
        ".budget.lock", "wp-aaaaaaaa-vm1.qcow2", "wp-bbbbbbbb-vm1.qcow2"]
    assert a.start(spec("small")).ok  # a tiny disk still fits; a read-only one takes nothing
    assert a.start(spec("ro", disk_readonly=True)).ok
    # The filesystem's free space counts too: a reserve larger than what is free refuses every overlay.
    free_mb = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize // 2**20
    tight = make_host(conn, dataclasses.replace(policy, disks=dataclasses.replace(policy.disks, reserve_mb=free_mb)),
                      slot="cccccccc-3333-4000-8000-000000000003")
    refused = tight.start(spec("vm1"))
    assert not refused.ok and "MB free, of which the node's overlays may still take" in refused.reason
    assert f"and {free_mb} MB stays free" in refused.reason
    assert sorted(a.teardown()) == ["ro", "small", "vm1"]
    assert sorted(os.listdir(policy.disks.directory)) == [".budget.lock", "wp-bbbbbbbb-vm1.qcow2"]
    b.teardown()
    assert os.listdir(policy.disks.directory) == [".budget.lock"]


def test_concurrent_starts_in_many_slots_never_overrun_the_disk_budget(conn, policy, tmp_path):
    """The budget's check and the overlay's creation are one step under the node's flock: eight slots starting
    a 40 MiB disk at once against 100 MB, two fit (2 x 41.01 MiB), never three."""
    big = tmp_path / "images" / "big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(big), "40M"], check=True)
    disk = ImageFile("big.qcow2", hashlib.sha256(big.read_bytes()).hexdigest())
    budget = dataclasses.replace(policy, disks=dataclasses.replace(policy.disks, budget_mb=100))
    hosts = [make_host(conn, budget, slot=f"{i:08x}-3333-4000-8000-00000000000{i}") for i in range(8)]
    outcomes: list[VmOutcome] = []
    start = threading.Barrier(len(hosts))

    def run(host):
        start.wait()
        outcomes.append(host.start(spec("vm1", disk=disk)))

    threads = [threading.Thread(target=run, args=(host,)) for host in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sum(outcome.ok for outcome in outcomes) == 2, [o.reason for o in outcomes]
    assert all("disk budget" in o.reason for o in outcomes if not o.ok)
    assert len([n for n in os.listdir(policy.disks.directory) if n.endswith(".qcow2")]) == 2
    for host in hosts:
        host.teardown()


# -- the guests' features and use, over their lease channels -----------------------------------------------------------------------------


@pytest.fixture
def guests(monkeypatch):
    """libvirt's test driver makes no lease channel socket: each VM's channel here is one end of a real socket
    pair, the other end standing for the guest's port."""
    from pilot.vm import leasechannel

    ends = {}

    def channel(domain):
        ours, guest = socket.socketpair()
        guest.settimeout(5)
        ends[domain.name()] = guest
        ours.settimeout(1.0)
        return ours

    monkeypatch.setattr(leasechannel, "open_channel", channel)
    yield ends
    for end in ends.values():
        end.close()


def read_lines(end: socket.socket, count: int) -> list[str]:
    data = b""
    while data.count(b"\n") < count:
        data += end.recv(4096)
    return data.decode().splitlines()


def test_a_vm_is_told_its_features_at_start_after_an_extension_and_on_hello(conn, policy, guests):
    end = [LeaseEnd(1_900_000_000, 30)]
    host = make_host(conn, policy, lease_end=lambda: end[0])
    assert host.start(spec("web", vcpus=2)).ok
    guest = guests[host.domain_name("web")]
    first = read_lines(guest, 12)
    assert "mjf jobfeatures shutdowntime_job 1900000000" in first and "mjf jobfeatures allocated_cpu 2" in first
    end[0] = LeaseEnd(1_900_003_600, 30)  # extended by an hour
    assert host.tell_features() == ["web"]
    assert "mjf machinefeatures shutdowntime 1900003600" in read_lines(guest, 12)
    guest.sendall(b"hello\n")  # the agent restarted (a reboot): it asks again
    host.usage(10)
    assert "mjf jobfeatures shutdowntime_job 1900003600" in read_lines(guest, 12)


def test_usage_is_the_agents_word_else_the_cpu_counter_and_a_gone_channel_is_reached_again(conn, policy,
                                                                                            guests):
    host = make_host(conn, policy, lease_end=lambda: LeaseEnd(1_900_000_000, 30))
    assert host.start(spec("web")).ok and host.start(spec("db")).ok
    first = host.usage(10)
    assert {name: (look.busy, look.cpu, look.source) for name, look in first.items()} == {
        "web": (True, None, "cpu"), "db": (True, None, "cpu")}  # one look: no CPU use yet, busy until known
    guests[host.domain_name("db")].sendall(b"usage idle\n")
    time.sleep(0.5)  # between two looks: the test driver's counter runs with the clock, a whole vCPU's worth
    second = host.usage(10)
    assert second["web"].busy and second["web"].source == "cpu" and second["web"].cpu > 50
    assert (second["db"].busy, second["db"].source) == (False, "agent")
    guests.pop(host.domain_name("db")).close()  # libvirt dropped the socket
    host.usage(10)  # this look finds it closed
    assert host.domain_name("db") not in guests
    host.usage(10)
    assert host.domain_name("db") in guests  # connected again at the next look, and told its features
    assert "mjf machinefeatures total_cpu 1" in read_lines(guests[host.domain_name("db")], 12)
    assert host.pause("web").ok
    assert (host.usage(10)["web"].busy, host.usage(10)["web"].cpu) == (False, 0)  # paused: idle, no CPU


def test_a_vm_without_a_lease_channel_is_judged_by_its_cpu_and_not_looked_for_again(conn, policy, monkeypatch):
    from pilot.vm import leasechannel

    asked = []

    def no_channel(domain):  # as a Xen guest's domain: no such device in its XML
        asked.append(domain.name())
        raise ValueError(f"domain {domain.name()} has no {leasechannel.LEASE_CHANNEL} channel with a socket")

    monkeypatch.setattr(leasechannel, "open_channel", no_channel)
    host = make_host(conn, policy, lease_end=lambda: LeaseEnd(1_900_000_000, 30))
    assert host.start(spec("web")).ok
    host.usage(10)
    time.sleep(0.5)  # between two looks: the test driver's counter runs with the clock
    look = host.usage(10)["web"]
    assert (look.busy, look.source) == (True, "cpu") and look.cpu > 50
    assert host.tell_features() == [] and host.warn("ending 2026-12-06T17:00:00.000000Z 20 release") == []
    assert asked == [host.domain_name("web")] * 2  # at its start, then once more at the first look: never again
