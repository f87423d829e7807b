"""The commands the service queues for a pilot and the pilot pulls by long-poll (the VM spec they carry:
:mod:`.vmspec`).

Part of the wire protocol (:mod:`workspace_common.protocol`): standard library only.
"""

from __future__ import annotations

import dataclasses
import json

from workspace_common.protocol.network import NetState
from workspace_common.protocol.vmspec import ImageFile, VmSpec
from workspace_common.protocol.wire import (
    MAX_BODY_BYTES,
    MAX_COMMAND,
    MAX_HOST_LEN,
    MAX_SLOT_LEN,
    MAX_VM_NAME_LEN,
    ProtocolError,
    _HOST_RE,
    _SLOT_RE,
    _VM_NAME_RE,
    _check_int,
    _check_str,
    _no_unknown,
    load_json,
)
from workspace_common.protocol.keys import sign


# -- commands: the service's work for a pilot, pulled by long-poll --------------------------------

#: ``GET`` this (``?after=N&wait=S``) to receive commands; same digest account as notifications.
COMMANDS_PATH = "/pilot/v2/slots/{slot}/hosts/{host}/commands"
#: The longest long-poll a service holds open; a pilot asking for more gets at most this.
MAX_POLL_WAIT_S = 60
#: Command operations.
OPS = frozenset({"start-vm", "stop-vm", "suspend-vm", "resume-vm", "release", "prefetch", "extend", "network"})
#: The longest lease duration an ``extend`` may carry (seconds).
MAX_DURATION_S = 10**9
#: The most images one prefetch (and one lease) may name.
MAX_PREFETCH = 16
#: Notification states that report a command's outcome.
VM_STATES = frozenset({"vm-running", "vm-failed", "vm-stopped", "vm-paused"})
MAX_COMMANDS = 256
#: The most a poll answer may be: the pilot reads no more of one, the service never sends more.
MAX_COMMANDS_ANSWER_BYTES = MAX_BODY_BYTES * 4


#: ``GET`` this for an approved image's content (Range requests allowed); same digest account as the commands.
IMAGES_PATH = "/pilot/v2/slots/{slot}/hosts/{host}/images/{sha256}"


def image_path(slot: str, host: str, sha256: str) -> str:
    """The image endpoint's path for one (slot, host) and content."""
    return IMAGES_PATH.format(slot=slot, host=host, sha256=sha256)


def commands_path(slot: str, host: str) -> str:
    """The command endpoint's path for one (slot, host)."""
    return COMMANDS_PATH.format(slot=slot, host=host)


def check_target(slot: str, host: str) -> None:
    """Raise :class:`ProtocolError` unless ``slot`` and ``host`` are a valid slot id and host name."""
    _check_str("slot", slot, MAX_SLOT_LEN, _SLOT_RE)
    _check_str("host", host, MAX_HOST_LEN, _HOST_RE)


def sign_commands(key_ha1: str, target: str, body: bytes) -> str:
    """The signature header of a command answer: HMAC over the request target (path and query) and the body.

    The target is bound in so that a recorded answer cannot be replayed to
    another poll (another cursor, another slot or host).
    """
    return sign(key_ha1, target.encode() + b"\n" + body)




@dataclasses.dataclass(frozen=True)
class Command:
    """One command for a pilot: ``start-vm`` (with ``vm``), ``stop-vm`` (with ``name``, ``force``),
    ``suspend-vm`` and ``resume-vm`` (with ``name``), ``release``, ``prefetch`` (with ``images``: listed
    images, resolved, to have in the node's cache before a VM needs them), or ``extend`` (with
    ``duration_s``: the lease's whole duration now, after the batch system raised the job's time limit), or
    ``network`` (with ``net``: the lease network's new state, :class:`~workspace_common.protocol.network.NetState`).

    ``id`` grows with every command the service queues; a pilot polls for
    those after the last id it has seen and reports each outcome as a
    notification whose ``command`` is this id.
    """

    id: int
    op: str
    vm: VmSpec | None = None
    name: str | None = None
    force: bool = False
    images: tuple[ImageFile, ...] = ()
    duration_s: float | None = None
    net: NetState | None = None

    @classmethod
    def from_dict(cls, data) -> "Command":
        """Parse and validate one command object; raises :class:`ProtocolError`."""
        if not isinstance(data, dict):
            raise ProtocolError("command: must be an object")
        _check_int("command.id", data.get("id"), 1, MAX_COMMAND)
        op = data.get("op")
        if op not in OPS:
            raise ProtocolError(f"command.op: {op!r} is not one of {sorted(OPS)}")
        if op == "start-vm":
            _no_unknown("command", data, {"id", "op", "vm"})
            return cls(data["id"], op, vm=VmSpec.from_dict(data.get("vm")))
        if op == "stop-vm":
            _no_unknown("command", data, {"id", "op", "name", "force"})
            _check_str("command.name", data.get("name"), MAX_VM_NAME_LEN, _VM_NAME_RE)
            force = data.get("force", False)
            if not isinstance(force, bool):
                raise ProtocolError("command.force: must be true or false")
            return cls(data["id"], op, name=data["name"], force=force)
        if op in ("suspend-vm", "resume-vm"):
            _no_unknown("command", data, {"id", "op", "name"})
            _check_str("command.name", data.get("name"), MAX_VM_NAME_LEN, _VM_NAME_RE)
            return cls(data["id"], op, name=data["name"])
        if op == "extend":
            _no_unknown("command", data, {"id", "op", "duration_s"})
            duration = data.get("duration_s")
            if (isinstance(duration, bool) or not isinstance(duration, (int, float))
                    or not 0 < duration <= MAX_DURATION_S or duration != duration):
                raise ProtocolError(f"command.duration_s: must be seconds above 0 and at most {MAX_DURATION_S}")
            return cls(data["id"], op, duration_s=float(duration))
        if op == "network":
            _no_unknown("command", data, {"id", "op", "net"})
            return cls(data["id"], op, net=NetState.from_dict("command.net", data.get("net")))
        if op == "prefetch":
            _no_unknown("command", data, {"id", "op", "images"})
            items = data.get("images")
            if not isinstance(items, list) or not 1 <= len(items) <= MAX_PREFETCH:
                raise ProtocolError(f"command.images: must be a list of 1 to {MAX_PREFETCH} images")
            images = tuple(ImageFile.from_dict(f"command.images[{i}]", item) for i, item in enumerate(items))
            if not all(image.named and image.resolved for image in images):
                raise ProtocolError("command.images: each must be a listed image with its sha256 and size")
            return cls(data["id"], op, images=images)
        _no_unknown("command", data, {"id", "op"})
        return cls(data["id"], op)

    def to_dict(self) -> dict:
        """The JSON object."""
        out: dict = {"id": self.id, "op": self.op}
        if self.op == "start-vm":
            out["vm"] = self.vm.to_dict()
        elif self.op == "stop-vm":
            out["name"] = self.name
            out["force"] = self.force
        elif self.op in ("suspend-vm", "resume-vm"):
            out["name"] = self.name
        elif self.op == "prefetch":
            out["images"] = [image.to_dict() for image in self.images]
        elif self.op == "extend":
            out["duration_s"] = self.duration_s
        elif self.op == "network":
            out["net"] = self.net.to_dict()
        return out

    @property
    def vm_name(self) -> str | None:
        """The VM this command is about (None for ``release``, ``prefetch``, ``extend`` and ``network``)."""
        return self.vm.name if self.vm is not None else self.name


def parse_commands(body: bytes) -> list[Command]:
    """The commands of a poll answer (``{"commands": [...]}``), in id order; raises :class:`ProtocolError`."""
    if len(body) > MAX_COMMANDS_ANSWER_BYTES:
        raise ProtocolError(f"command answer is {len(body)} bytes, over {MAX_COMMANDS_ANSWER_BYTES}", status=413)
    data = load_json(body, "command answer")
    if not isinstance(data, dict) or not isinstance(data.get("commands"), list):
        raise ProtocolError('command answer must be {"commands": [...]}')
    if len(data["commands"]) > MAX_COMMANDS:
        raise ProtocolError(f"command answer has more than {MAX_COMMANDS} commands")
    commands = [Command.from_dict(item) for item in data["commands"]]
    return sorted(commands, key=lambda c: c.id)


def commands_body(commands: list[Command]) -> bytes:
    """A poll answer's body for ``commands``."""
    return json.dumps({"commands": [c.to_dict() for c in commands]}, separators=(",", ":")).encode()

