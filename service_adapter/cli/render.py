"""Text for people: a lease, its pilots and VMs, tables of leases and VMs, usage."""

from __future__ import annotations

import datetime
import json

from service_adapter.safetext import printable

# -- text output --------------------------------------------------------------------------------


def reason_suffix(lease: dict) -> str:
    for key in ("reason", "error", "message"):
        if lease.get(key):
            return f": {lease[key]}"
    return ""


def _when(value) -> str:
    """A time for people: epoch seconds or an RFC 3339 string, shown as UTC to the second."""
    if value is None or value == "":
        return "-"
    if isinstance(value, (int, float)):
        return datetime.datetime.fromtimestamp(value, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    text = str(value)
    return text[:19].replace("T", " ") + "Z" if len(text) >= 19 and text.endswith("Z") else text


def _seconds(value) -> str:
    if value is None:
        return "-"
    try:
        return f"{float(value):g}s"
    except (TypeError, ValueError):
        return str(value)


def lease_table(leases: list[dict]) -> str:
    if not leases:
        return "no leases"
    header = ("LEASE", "STATE", "OWNER", "NODES", "MB/NODE", "DURATION", "CREATED")
    rows = [
        (
            str(lease.get("id", "?")), str(lease.get("state", "?")), str(lease.get("owner", "-")),
            str(lease.get("nodes", "-")), str(lease.get("memory_mb", "-")), _seconds(lease.get("duration_s")),
            _when(lease.get("created_at")),
        )
        for lease in leases
    ]
    rows = [tuple(printable(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]
    )


def event_line(event: dict) -> str:
    """One event of a lease's history: ``SEQ  TIME  KIND  OLD -> NEW  REASON`` (only the state for the others)."""
    kind = str(event.get("kind", "?"))
    if kind in ("created", "state"):
        states = f"{event.get('old_state') or '-'} -> {event.get('new_state')}"
    else:
        states = str(event.get("new_state"))
    return printable(f"{event.get('seq', '?'):>6}  {_when(event.get('at'))}  {kind:<8}  {states}  "
                     f"{event.get('reason', '')}")


def login_text(login) -> str:
    """Where to SSH to: ``HOST:PORT``, ``[V6]:PORT``, or ``-``."""
    if not isinstance(login, dict) or not login.get("host"):
        return "-"
    host = str(login["host"])
    return f"[{host}]:{login.get('port')}" if ":" in host else f"{host}:{login.get('port')}"


def vm_table(vms: list[dict]) -> str:
    if not vms:
        return "no VMs"
    addressed = any(vm.get("ip") for vm in vms)
    header = ("VM", "HOST", "STATE", "MB", "USE") + (("ADDRESS", "LOGIN") if addressed else ()) + ("REASON",)
    rows = [
        (str(vm.get("name", "?")), str(vm.get("host", "-")), str(vm.get("state", "?")), str(vm.get("memory_mb", "-")),
         usage_word(vm.get("usage")))
        + ((str(vm.get("ip") or "-"), login_text(vm.get("login"))) if addressed else ())
        + (str(vm.get("reason") or "-"),)
        for vm in vms
    ]
    rows = [tuple(printable(cell) for cell in row) for row in rows]  # a pilot wrote the reason
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]
    )


def usage_word(usage) -> str:
    """A VM's use in a word: ``busy 87%``, ``idle 2%``, ``idle`` (no CPU reading yet) or ``-`` (not heard)."""
    if not isinstance(usage, dict) or not isinstance(usage.get("busy"), bool):
        return "-"
    word = "busy" if usage["busy"] else "idle"
    cpu = usage.get("cpu")
    return f"{word} {cpu}%" if isinstance(cpu, int) and not isinstance(cpu, bool) else word


def vm_text(vm: dict) -> str:
    """One VM for people: a line each for its node, state, size, times, address and login."""
    lines = [f"VM {vm.get('name', '?')} on {vm.get('host', '?')}: {vm.get('state', '?')}{reason_suffix(vm)}",
             f"  memory   {vm.get('memory_mb', '-')} MB, {vm.get('vcpus', '-')} vCPU",
             f"  started  {_when(vm.get('started_at'))}   stopped {_when(vm.get('stopped_at'))}"]
    usage = vm.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("busy"), bool):
        lines.append(f"  use      {usage_word(usage)} since {_when(usage.get('since'))}")
    if vm.get("ip"):
        lines.append(f"  address  {vm['ip']} ({vm.get('hostname') or '-'}, MAC {vm.get('mac') or '-'})")
    login = vm.get("login")
    if isinstance(login, dict) and login.get("host"):
        lines.append(f"  login    ssh -p {login.get('port')} USER@{login['host']}")
    return "\n".join(printable(line) for line in lines)  # a pilot wrote the reason


_SHOWN_FIRST = (
    "id", "state", "reason", "owner", "nodes", "memory_mb", "duration_s", "slot", "job_id",
    "created_at", "start_at", "ready_at", "release_requested_at", "expires_at", "ended_at", "updated_at",
)


def _is_time(key: str, value) -> bool:
    return key.endswith("_at") and (isinstance(value, (int, float)) or (isinstance(value, str) and value.endswith("Z")))


def usage_text(usage: dict) -> str:
    node_s = float(usage.get("node_seconds", 0))
    mb_s = float(usage.get("mb_seconds", 0))
    return f"{node_s:.1f} node-seconds, {mb_s:.0f} MB-seconds"


def _pilot_text(pilot: dict) -> str:
    words = [str(pilot.get("host", "?")), str(pilot.get("state", "?"))]
    if pilot.get("code"):
        words.append(f"code {pilot['code']}")
    if "memory_mb" in pilot:
        words.append(f"{pilot['memory_mb']} MB")
    if pilot.get("reserved_at"):
        words.append(f"reserved {_when(pilot['reserved_at'])}")
    if pilot.get("updated_at"):
        words.append(f"last heard {_when(pilot['updated_at'])}")
    rest = {k: v for k, v in pilot.items()
            if k not in ("host", "state", "code", "memory_mb", "reserved_at", "updated_at", "expires_at", "seq")}
    words += [f"{k} {v}" for k, v in rest.items()]
    return "  ".join(printable(word) for word in words)  # pilots wrote some of these


def lease_text(lease: dict) -> str:
    """One lease as ``key  value`` lines, its pilots (one line each) below."""
    keys = [k for k in _SHOWN_FIRST if k in lease] + sorted(
        k for k in lease if k not in _SHOWN_FIRST and k not in ("pilots", "terminal")
    )
    width = max((len(k) for k in keys), default=0)
    lines = []
    for key in keys:
        value = lease[key]
        if key == "usage" and isinstance(value, dict):
            shown = usage_text(value)
        elif _is_time(key, value):
            shown = _when(value)
        elif value is None or value == "":
            shown = "-"
        elif isinstance(value, (list, dict)):
            shown = json.dumps(value)
        else:
            shown = str(value)
        lines.append(f"{printable(key).ljust(width)}  {printable(shown)}")
    pilots = lease.get("pilots")
    if isinstance(pilots, list):
        lines.append("pilots" + ("" if pilots else "  none reported yet"))
        lines += ["  " + (_pilot_text(p) if isinstance(p, dict) else json.dumps(p)) for p in pilots]
    return "\n".join(lines)

