"""Notifications, times and JSON limits: the core of the wire protocol (:mod:`workspace_common.protocol`).

A notification is one JSON object of at most :data:`MAX_BODY_BYTES` bytes,
POSTed to ``{service}/pilot/v2/notifications`` with HTTP Digest
authentication as the node's host name. The body is bound to the (slot,
host) by the ``X-Pilot-Signature`` header: ``sha256=<hex HMAC-SHA256(key,
body)>`` where the key is :func:`.keys.slot_key` (the node's key and the
slot's secret), as lowercase hex encoded as ASCII (:mod:`.keys`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import datetime, timezone

VERSION = 2
NOTIFICATIONS_PATH = "/pilot/v2/notifications"
SIGNATURE_HEADER = "X-Pilot-Signature"
SIGNATURE_PREFIX = "sha256="
MAX_BODY_BYTES = 64 * 1024

#: The batch job's environment the pilot reads on a node: the job's identity (its ids, its walltime, its
#: Slurm node name), each checked on the node against its batch system's form. Job scripts pass these
#: through sudo (``--preserve-env``) and ``workspace-pilot evaluate`` prints the matching ``env_keep``
#: line, so both sides name the same variables. The batch systems' own config locations (SLURM_CONF,
#: SGE_ROOT, SGE_CELL, SGE_QMASTER_PORT) are deliberately not here: they choose what the batch system's
#: commands load, so the pilot, as root, takes them from its root-owned config ([batch]) only.
BATCH_ENV = ("SLURM_JOB_ID", "SLURM_JOB_END_TIME", "SLURMD_NODENAME", "PBS_JOBID", "PBS_WALLTIME", "JOB_ID")
#: The job environment variable that carries a slot's secret to its pilots (never argv, never a file).
SLOT_SECRET_ENV = "WORKSPACE_PILOT_SLOT_SECRET"
#: What sudo must keep for the pilot: the batch variables and the slot's secret.
PILOT_ENV = BATCH_ENV + (SLOT_SECRET_ENV,)

#: Every state a notification may report.
STATES = frozenset(
    {
        "reserved",
        "earlyunreserving",
        "unreserving",
        "unreserved",
        "killed",
        "heartbeat",
        "vm-running",
        "vm-stopped",
        "vm-failed",
        "vm-paused",
        "vm-usage",
        "fetching",
        "extended",
        "error",
    }
)
#: The states that move a pilot through its lifecycle (the rest only report).
LIFECYCLE_STATES = frozenset(
    {"reserved", "earlyunreserving", "unreserving", "unreserved", "killed", "error"}
)

MAX_SLOT_LEN = 64
MAX_HOST_LEN = 253
MAX_MESSAGE_LEN = 4096
MAX_VM_NAME_LEN = 64
MAX_VMS = 256
MAX_SEQ = 2**63 - 1
#: How far past its last seq a (slot, host) may jump (gaps are allowed, a jump to the end of the range is not).
MAX_SEQ_STEP = 2**20
MAX_MEMORY_MB = 2**31 - 1
MAX_COMMAND = 2**63 - 1
MAX_TIMINGS = 32

_REQUIRED = ("version", "slot", "host", "state", "code", "seq", "sent_at", "memory_mb")
_OPTIONAL = ("expires_at", "vms", "command", "message", "timings", "address", "usage")
_USAGE_FIELDS = frozenset({"busy", "cpu"})
_SLOT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")
_VM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TIMING_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


class ProtocolError(ValueError):
    """A body that is not a valid v2 notification; ``str()`` says which field and why.

    ``status`` is the HTTP status the service answers with (400, or 413 for
    an oversized body).
    """

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def utc_now() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)


def format_time(moment: datetime) -> str:
    """Render an aware datetime as the protocol's timestamp: RFC 3339, UTC, microseconds, ``Z``."""
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_epoch(epoch: float) -> str:
    """Render epoch seconds as the protocol's timestamp (see :func:`format_time`)."""
    return format_time(datetime.fromtimestamp(epoch, timezone.utc))


def parse_time(text: str) -> datetime:
    """Parse a protocol timestamp; raises :class:`ValueError` for any other shape."""
    if not isinstance(text, str) or not _TIME_RE.match(text):
        raise ValueError(f"not a UTC RFC 3339 timestamp with microseconds: {text!r}")
    try:
        # The regex fixed the shape; fromisoformat is ~10x faster than strptime on the hot path.
        return datetime.fromisoformat(text[:-1] + "+00:00")
    except ValueError:
        raise ValueError(f"not a valid date and time: {text!r}") from None


def epoch_micros(text: str) -> int:
    """A protocol timestamp as whole microseconds since the epoch (exact; how kill-all's seq counts)."""
    delta = parse_time(text) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclasses.dataclass(frozen=True)
class Notification:
    """One pilot notification; constructing one validates every field.

    Instances are immutable and always valid: a bad value raises
    :class:`ProtocolError` naming the field.
    """

    slot: str
    host: str
    state: str
    seq: int
    sent_at: str
    memory_mb: int
    code: int = 0
    expires_at: str | None = None
    vms: tuple[str, ...] | None = None
    command: int | None = None
    message: str | None = None
    timings: dict[str, str] | None = None
    """Named moments on the pilot's clock (``pilot.moments``) for ``lease-bench``; never acted on."""
    address: str | None = None
    """The node's own IPv4 address (``reserved`` only): where its lease networks' overlay and forwards meet it."""
    usage: dict[str, dict] | None = None
    """``vm-usage`` only: VM name -> ``{"busy": bool, "cpu": percent of its vCPUs or null}`` (pilot.vm.usage)."""
    version: int = VERSION

    def __post_init__(self) -> None:
        _check_int("version", self.version, VERSION, VERSION)
        _check_str("slot", self.slot, MAX_SLOT_LEN, _SLOT_RE)
        _check_str("host", self.host, MAX_HOST_LEN, _HOST_RE)
        if not isinstance(self.state, str) or self.state not in STATES:
            raise ProtocolError(f"state: {self.state!r} is not one of {sorted(STATES)}")
        _check_int("code", self.code, -(2**31), 2**31 - 1)
        _check_int("seq", self.seq, 1, MAX_SEQ)
        _check_time("sent_at", self.sent_at)
        _check_int("memory_mb", self.memory_mb, 0, MAX_MEMORY_MB)
        if self.expires_at is not None:
            _check_time("expires_at", self.expires_at)
        if self.vms is not None:
            if not isinstance(self.vms, (list, tuple)):
                raise ProtocolError("vms: must be a list of VM names")
            if len(self.vms) > MAX_VMS:
                raise ProtocolError(f"vms: more than {MAX_VMS} names")
            for name in self.vms:
                _check_str("vms[]", name, MAX_VM_NAME_LEN, _VM_NAME_RE)
            object.__setattr__(self, "vms", tuple(self.vms))
        if self.command is not None:
            _check_int("command", self.command, 1, MAX_COMMAND)
        if self.message is not None:
            _check_str("message", self.message, MAX_MESSAGE_LEN, None)
        if self.timings is not None:
            if not isinstance(self.timings, dict):
                raise ProtocolError("timings: must be an object of moment names to timestamps")
            if len(self.timings) > MAX_TIMINGS:
                raise ProtocolError(f"timings: more than {MAX_TIMINGS} moments")
            for name, value in self.timings.items():
                _check_str("timings name", name, 48, _TIMING_NAME_RE)
                _check_time(f"timings.{name}", value)
            object.__setattr__(self, "timings", dict(self.timings))
        if self.address is not None:
            if self.state != "reserved":
                raise ProtocolError("address: only a reserved notification says the node's address")
            check_node_address("address", self.address)
        if (self.usage is not None) != (self.state == "vm-usage"):
            raise ProtocolError("usage: a vm-usage notification, and only one, says how its VMs are used")
        if self.usage is not None:
            object.__setattr__(self, "usage", _checked_usage(self.usage))

    def to_dict(self) -> dict:
        """The notification as a JSON-ready dict; optional fields that are unset are left out."""
        out = {name: getattr(self, name) for name in _REQUIRED}
        for name in _OPTIONAL:
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if name == "vms" else dict(value) if name in ("timings", "usage") else value
        return out

    def to_json(self) -> bytes:
        """The wire body: compact UTF-8 JSON; raises :class:`ProtocolError` if over the size cap."""
        body = json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()
        if len(body) > MAX_BODY_BYTES:
            raise ProtocolError(f"body is {len(body)} bytes, over {MAX_BODY_BYTES}", status=413)
        return body

    @classmethod
    def from_json(cls, body: bytes) -> "Notification":
        """Parse and strictly validate a wire body.

        Rejects (with :class:`ProtocolError`) bodies over the cap, bodies that
        are not UTF-8 JSON objects, missing or unknown fields, wrong types,
        unknown states and over-long strings.
        """
        if len(body) > MAX_BODY_BYTES:
            raise ProtocolError(f"body is {len(body)} bytes, over {MAX_BODY_BYTES}", status=413)
        data = load_json(body, "body")
        if not isinstance(data, dict):
            raise ProtocolError("body must be a JSON object")
        missing = [name for name in _REQUIRED if name not in data]
        if missing:
            raise ProtocolError(f"missing field(s): {', '.join(missing)}")
        unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise ProtocolError(f"unknown field(s): {', '.join(unknown)}")
        if data.get("vms") is not None and not isinstance(data["vms"], list):
            raise ProtocolError("vms: must be a list of VM names")
        return cls(**data)


def _checked_usage(usage) -> dict[str, dict]:
    """A vm-usage notification's ``usage``, checked (ProtocolError naming what is wrong)."""
    if not isinstance(usage, dict) or not usage:
        raise ProtocolError("usage: must be an object of VM names to {busy, cpu}")
    if len(usage) > MAX_VMS:
        raise ProtocolError(f"usage: more than {MAX_VMS} VMs")
    checked = {}
    for name, look in usage.items():
        _check_str("usage name", name, MAX_VM_NAME_LEN, _VM_NAME_RE)
        if not isinstance(look, dict):
            raise ProtocolError(f"usage.{name}: must be an object with busy and cpu")
        _no_unknown(f"usage.{name}", look, _USAGE_FIELDS)
        if not isinstance(look.get("busy"), bool):
            raise ProtocolError(f"usage.{name}.busy: must be true or false")
        cpu = look.get("cpu")
        if cpu is not None:
            _check_int(f"usage.{name}.cpu", cpu, 0, 100)
        checked[name] = {"busy": look["busy"], "cpu": cpu}
    return checked


_IPV4_RE = re.compile(r"^(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})$")


def check_node_address(field: str, value) -> str:
    """``value`` if it is a node's unicast IPv4 address (where a lease network's overlay and forwards meet the
    node); ProtocolError naming ``field`` else. No ``ipaddress`` import: this is on the pilot's way to reserved."""
    match = _IPV4_RE.fullmatch(value) if isinstance(value, str) else None
    octets = [int(part) for part in match.groups()] if match else []
    if not octets or max(octets) > 255:
        raise ProtocolError(f"{field}: must be an IPv4 address")
    if octets[0] in (0, 127) or octets[0] >= 224:
        raise ProtocolError(f"{field}: {value} is not a node's unicast address")
    return value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


#: The deepest nesting a body may have (a VM start, the deepest we send, needs 5).
MAX_JSON_DEPTH = 16
_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def load_json(body: bytes, what: str = "body") -> object:
    """Parse ``body`` as strict UTF-8 JSON; :class:`ProtocolError` (400) for anything a parser should refuse.

    Refused: bytes that are not UTF-8, text that is not JSON, NaN and
    Infinity, nesting deeper than :data:`MAX_JSON_DEPTH` (``[`` x 2000
    used to reach Python's recursion limit), and strings or keys holding a
    lone surrogate (``"\\ud800"`` is JSON but no text: it cannot be
    stored, logged or sent on as UTF-8). Every message names ``what``.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ProtocolError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise ProtocolError(f"{what} is not JSON: {str(exc).splitlines()[0]}") from None
    surrogates = _SURROGATE_ESCAPE_RE.search(text) is not None  # the only way a lone one gets in
    stack = [(data, 1)]
    while stack:  # iterative: the check itself must not recurse
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ProtocolError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(value, dict):
                if surrogates:
                    for key in value:
                        _check_text(what, key)
                stack.extend((item, depth + 1) for item in value.values())
            else:
                stack.extend((item, depth + 1) for item in value)
        elif surrogates and isinstance(value, str):
            _check_text(what, value)
    return data


def _check_text(what: str, text: str) -> None:
    lone = _SURROGATE_RE.search(text)
    if lone:
        raise ProtocolError(f"{what} holds a lone surrogate (\\u{ord(lone.group()):04x}): not text")


def _check_int(field: str, value, low: int, high: int) -> None:
    # bool is an int subclass in Python; JSON true is not a number here.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{field}: must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise ProtocolError(f"{field}: {value} is outside {low}..{high}")


def _check_str(field: str, value, max_len: int, pattern: re.Pattern | None) -> None:
    if not isinstance(value, str):
        raise ProtocolError(f"{field}: must be a string, got {type(value).__name__}")
    if not value or len(value) > max_len:
        raise ProtocolError(f"{field}: length must be 1..{max_len}, got {len(value)}")
    if pattern is not None and not pattern.fullmatch(value):  # fullmatch: "$" alone lets a trailing \n through
        raise ProtocolError(f"{field}: {value!r} has characters that are not allowed")


def _no_unknown(field: str, data: dict, known: set | frozenset) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ProtocolError(f"{field}: unknown field(s) {', '.join(map(str, unknown))}")


def _check_time(field: str, value) -> None:
    try:
        parse_time(value)
    except ValueError as exc:
        raise ProtocolError(f"{field}: {exc}") from None
