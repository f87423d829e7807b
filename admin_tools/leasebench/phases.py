"""Split one measured lease (or baseline job) into consecutive phases: pure functions over timestamps.

A round's phases are consecutive intervals on one time line, each from one
recorded moment to the next, so they add up to the round's total exactly
(up to float rounding). The moments come from the client (this harness:
when it asked), the service (its store: submit, receipts, lease events)
and each pilot (the notifications' ``timings``, ``pilot/moments.py``).

Clocks. Pilot moments are on the pilot host's clock, the rest on the
service host's. Each pilot's offset is estimated NTP-style from its
``reserved``: sent at t1 (pilot), received at t2 (service), answered at t4
(pilot, sent later as ``reserved_answered``): offset = (t1 + t4) / 2 - t2,
uncertain by (t4 - t1) / 2. Under ``clocks="auto"`` an offset is applied
only when it is larger than its uncertainty (a real skew, not noise); on
one host (our tests) that leaves the shared clock alone. Phases that stay
on one clock (pilot start, VM create, restore) never depend on it, and a
stage's total is on the service's clock alone.

A process's start is known to the kernel's clock tick (10 ms) and rounded
down, so it can read as up to 10 ms before the submit that caused it:
dispatch is then 0 and the pilot start begins at the submit.
"""

from __future__ import annotations

import dataclasses

from workspace_common.protocol import parse_time

STAGES: dict[str, tuple[str, ...]] = {
    "standup": ("client", "dispatch", "pilot_start", "notification", "ready"),
    "pilot": ("boot", "shrink", "report"),
    "vm": ("request", "delivery", "create", "report"),
    "teardown": ("client", "stop_signal", "vm_destroy", "restore", "notification", "released"),
    "baseline_standup": ("dispatch",),
    "baseline_teardown": ("stop_signal",),
}

PHASE_HELP: dict[str, str] = {
    "standup.client": "the client's request until the LRM submit starts (HTTP API, digest, lease and slot committed)",
    "standup.dispatch": "the submit until the last pilot's process started (qsub/sbatch, queue, launcher, sudo)",
    "standup.pilot_start": "that pilot's process start until it sent reserved (see the pilot stage)",
    "standup.notification": "reserved sent until stored by the service",
    "standup.ready": "the last reserved stored until the lease is ready (the lease manager)",
    "pilot.boot": "process start until the memory is taken: interpreter, imports, config, journal, deadline",
    "pilot.shrink": "the memory taken from the host (node lock, journal, backend, read-back): Nimbus's dom0 shrink",
    "pilot.report": "memory taken until reserved was sent",
    "vm.request": "the client's start-vm request until the command is committed",
    "vm.delivery": "the command committed until the pilot's long-poll answer arrived",
    "vm.create": "the command on the node until the domain runs (spec checks, libvirt connect, createXML)",
    "vm.report": "the domain running until vm-running is stored",
    "teardown.client": "the client's release until the service recorded it",
    "teardown.stop_signal": "the release recorded until the pilot was told (release command or SIGTERM, first)",
    "teardown.vm_destroy": "told until the slot's VMs are gone (the early-unreserve wait for stop-vm included)",
    "teardown.restore": "VMs gone until the node has its memory back: Nimbus's restore",
    "teardown.notification": "memory restored until unreserved is stored",
    "teardown.released": "the last unreserved stored until the lease is released (the lease manager)",
    "baseline_standup.dispatch": "the submit of a do-nothing job until its payload ran on the last node",
    "baseline_teardown.stop_signal": "the cancel of that job until its payload got SIGTERM on the last node",
}

CLOCK_MODES = ("auto", "always", "never")


class RecordError(ValueError):
    """A round's record lacks a moment it needs (a pilot that sent no timings); the message names it."""


@dataclasses.dataclass
class LeaseRecord:
    """What one lease round left behind, as epoch seconds (client and service on the service host's clock)."""

    nodes: int
    requested_at: float
    submit_started_at: float
    submitted_at: float
    ready_at: float
    release_asked_at: float
    release_recorded_at: float
    released_at: float
    notifications: list[tuple[str, str, float, dict]]
    """(host, state, received_at, body) as the store holds them."""
    vm_asked_at: float | None = None
    commands: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    """(host, created_at) of each start-vm command."""
    cancel_requested_at: float | None = None


@dataclasses.dataclass
class BaselineRecord:
    """One do-nothing job: submit and cancel as the harness called them, its payloads' stamps per node."""

    nodes: int
    submit_started_at: float
    submitted_at: float
    started: list[float]
    cancel_started_at: float
    stopped: list[float]


@dataclasses.dataclass
class Stage:
    """One stage of one round: its phases (ms, in order), their total (ms) and what else was seen."""

    phases: dict[str, float]
    total: float
    detail: dict


def parse(text: str) -> float:
    """A protocol timestamp as epoch seconds."""
    return parse_time(text).timestamp()


def _ms(seconds: float) -> float:
    return seconds * 1000.0


def _stage(name: str, points: list[float], detail: dict) -> Stage:
    """Phases from consecutive moments: phase i runs from points[i] to points[i + 1]."""
    phases = {phase: _ms(b - a) for phase, a, b in zip(STAGES[name], points, points[1:])}
    return Stage(phases, _ms(points[-1] - points[0]), detail)


class _Host:
    """One host's notifications of a lease: first body of each state, its receipt, its moments."""

    def __init__(self, name: str):
        self.name = name
        self.first: dict[str, tuple[float, dict]] = {}
        self.vm_running: list[tuple[float, dict]] = []

    def add(self, state: str, received_at: float, body: dict) -> None:
        self.first.setdefault(state, (received_at, body))
        if state == "vm-running":
            self.vm_running.append((received_at, body))

    def received(self, state: str) -> float:
        return self.first[state][0]

    def moment(self, state: str, name: str) -> float:
        try:
            return parse(self.first[state][1]["timings"][name])
        except KeyError:
            raise RecordError(f"host {self.name}: its {state!r} notification has no moment {name!r}") from None

    def sent(self, state: str) -> float:
        return parse(self.first[state][1]["sent_at"])


def clock_offset(host: _Host) -> tuple[float, float] | None:
    """(offset of the pilot's clock from the service's, its uncertainty), seconds; None without the moments."""
    try:
        t1, t2 = host.sent("reserved"), host.received("reserved")
        t4 = host.moment("unreserved", "reserved_answered")
    except (KeyError, RecordError):
        return None
    return (t1 + t4) / 2 - t2, max((t4 - t1) / 2, 0.0)


def lease_stages(record: LeaseRecord, clocks: str = "auto") -> dict[str, Stage]:
    """The stand-up, pilot, VM (when VMs were asked for) and tear-down stages of one lease round.

    Each stage follows its critical host: the one whose report came last
    (it decided when the stage ended). Raises :class:`RecordError` when a
    moment is missing.
    """
    if clocks not in CLOCK_MODES:
        raise ValueError(f"clocks must be one of {', '.join(CLOCK_MODES)}, not {clocks!r}")
    hosts: dict[str, _Host] = {}
    for name, state, received_at, body in record.notifications:
        hosts.setdefault(name, _Host(name)).add(state, received_at, body)
    reserved = [h for h in hosts.values() if "reserved" in h.first]
    ended = [h for h in hosts.values() if "unreserved" in h.first]
    if len(reserved) < record.nodes or len(ended) < record.nodes:
        raise RecordError(f"{len(reserved)} hosts reserved and {len(ended)} unreserved, of {record.nodes}")
    offsets = {}
    for host in hosts.values():
        found = clock_offset(host)
        use = found is not None and (clocks == "always" or (clocks == "auto" and abs(found[0]) > found[1]))
        offsets[host.name] = (found, found[0] if use else 0.0)

    def on_service(host: _Host, pilot_time: float) -> float:
        return pilot_time - offsets[host.name][1]

    def process_start(host: _Host) -> float:
        # Rounded down to the tick, a start can read as before its submit: it then counts from the submit.
        return max(on_service(host, host.moment("reserved", "process_start")), record.submit_started_at)

    stages = {}
    up = max(reserved, key=lambda h: h.received("reserved"))
    started = process_start(up)
    sent = on_service(up, up.sent("reserved"))
    stages["standup"] = _stage("standup", [
        record.requested_at, record.submit_started_at, started, sent, up.received("reserved"), record.ready_at,
    ], {
        "critical_host": up.name, "submit_ms": _ms(record.submitted_at - record.submit_started_at),
        "clock_offsets_ms": {name: None if found is None else {"offset": _ms(found[0]), "uncertainty": _ms(found[1]),
                                                               "applied": _ms(applied)}
                             for name, (found, applied) in sorted(offsets.items())},
        "per_host_ms": {h.name: _standup_of(h, on_service, process_start(h), record.submit_started_at)
                        for h in sorted(reserved, key=lambda h: h.name)},
    })
    take, taken = up.moment("reserved", "memory_take"), up.moment("reserved", "memory_taken")
    stages["pilot"] = _stage("pilot", [started, on_service(up, take), on_service(up, taken), sent],
                             {"critical_host": up.name})
    if record.vm_asked_at is not None:
        stages["vm"] = _vm_stage(record, hosts, on_service)
    down = max(ended, key=lambda h: h.received("unreserved"))
    timings = down.first["unreserved"][1].get("timings", {})
    causes = sorted(n for n in timings if n.startswith("stop_"))
    if not causes:
        raise RecordError(f"host {down.name}: its 'unreserved' names no stop moment")
    first_cause = min(causes, key=lambda n: parse(timings[n]))
    stages["teardown"] = _stage("teardown", [
        record.release_asked_at, record.release_recorded_at,
        on_service(down, down.moment("unreserved", first_cause)),
        on_service(down, down.moment("unreserved", "vms_destroyed")),
        on_service(down, down.moment("unreserved", "memory_restored")),
        down.received("unreserved"), record.released_at,
    ], {
        "critical_host": down.name, "stopped_by": first_cause[len("stop_"):],
        "cancel_requested_ms": None if record.cancel_requested_at is None
        else _ms(record.cancel_requested_at - record.release_recorded_at),
        "restore_ms_per_host": {h.name: _ms(h.moment("unreserved", "memory_restored")
                                            - h.moment("unreserved", "vms_destroyed")) for h in ended},
    })
    return stages


def _standup_of(host: _Host, on_service, start: float, submit_started_at: float) -> dict:
    return {
        "dispatch": _ms(start - submit_started_at),
        "pilot_start": _ms(on_service(host, host.sent("reserved")) - start),
        "shrink": _ms(host.moment("reserved", "memory_taken") - host.moment("reserved", "memory_take")),
        "notification": _ms(host.received("reserved") - on_service(host, host.sent("reserved"))),
    }


def _vm_stage(record: LeaseRecord, hosts: dict[str, _Host], on_service) -> Stage:
    running = [(at, host, body) for host in hosts.values() for at, body in host.vm_running]
    if len(running) < len(record.commands) or not running:
        raise RecordError(f"{len(running)} VMs reported running, of {len(record.commands)} asked for")
    at, host, body = max(running, key=lambda item: item[0])
    created = {h: c for h, c in record.commands}
    if host.name not in created:
        raise RecordError(f"host {host.name} reported a VM the round did not ask for")
    moments = {name: on_service(host, parse(value)) for name, value in (body.get("timings") or {}).items()}
    for needed in ("command_seen", "domain_created"):
        if needed not in moments:
            raise RecordError(f"host {host.name}: its 'vm-running' has no moment {needed!r}")
    return _stage("vm", [record.vm_asked_at, created[host.name], moments["command_seen"], moments["domain_created"],
                         at], {"critical_host": host.name, "vms": len(running)})


def baseline_stages(record: BaselineRecord) -> dict[str, Stage]:
    """The LRM-only baseline's stand-up (submit to the last payload start) and tear-down (cancel to the last
    payload's SIGTERM)."""
    if len(record.started) < record.nodes or len(record.stopped) < record.nodes:
        raise RecordError(f"{len(record.started)} payloads started and {len(record.stopped)} stopped, "
                          f"of {record.nodes}")
    return {
        "baseline_standup": _stage("baseline_standup", [record.submit_started_at, max(record.started)],
                                   {"submit_ms": _ms(record.submitted_at - record.submit_started_at)}),
        "baseline_teardown": _stage("baseline_teardown", [record.cancel_started_at, max(record.stopped)], {}),
    }
