"""The pilot <-> service wire protocol, version 2: the one definition both sides use.

Importable on its own: standard library only, no libvirt, no node access at
import; ``pilot`` and ``service_adapter`` both import it, and neither imports
the other. :mod:`.wire` holds the notifications, times and
JSON limits; :mod:`.keys` the keys and signatures; :mod:`.commands` the command channel;
:mod:`.vmspec` the VM spec it carries. ``docs/protocol.md`` describes it.

The names below are loaded from their module on first use (PEP 562): the
pilot's start path needs only :mod:`.wire`, and the command channel's
module (its dataclasses and patterns) costs a few milliseconds that sat
before the memory take.
"""

from __future__ import annotations

import importlib

#: Where each public name lives.
_HOMES = {
    "COMMANDS_PATH": "commands",
    "IMAGES_PATH": "commands",
    "IMAGE_NAME_RE": "vmspec",
    "IMAGE_VERSION_RE": "vmspec",
    "MAX_IMAGE_BYTES": "vmspec",
    "MAX_IMAGE_NAME_LEN": "vmspec",
    "MAX_PREFETCH": "commands",
    "MAX_PEERS": "vmspec",
    "image_path": "commands",
    "MAX_POLL_WAIT_S": "commands",
    "OPS": "commands",
    "VM_STATES": "commands",
    "MAX_VCPUS": "vmspec",
    "MAX_PATH_LEN": "vmspec",
    "MAX_CMDLINE_LEN": "vmspec",
    "MAX_NETWORK_LEN": "vmspec",
    "MAX_COMMANDS": "commands",
    "MAX_COMMANDS_ANSWER_BYTES": "commands",
    "commands_path": "commands",
    "check_target": "commands",
    "sign_commands": "commands",
    "ImageFile": "vmspec",
    "VmSpec": "vmspec",
    "VmContext": "vmspec",
    "NetState": "network",
    "Nic": "network",
    "mac_for": "network",
    "HOSTNAME_RE": "network",
    "Command": "commands",
    "parse_commands": "commands",
    "commands_body": "commands",
    "VERSION": "wire",
    "NOTIFICATIONS_PATH": "wire",
    "SIGNATURE_HEADER": "wire",
    "SIGNATURE_PREFIX": "wire",
    "MAX_BODY_BYTES": "wire",
    "BATCH_ENV": "wire",
    "SLOT_SECRET_ENV": "wire",
    "PILOT_ENV": "wire",
    "STATES": "wire",
    "LIFECYCLE_STATES": "wire",
    "MAX_SLOT_LEN": "wire",
    "MAX_HOST_LEN": "wire",
    "MAX_MESSAGE_LEN": "wire",
    "MAX_VM_NAME_LEN": "wire",
    "MAX_VMS": "wire",
    "MAX_SEQ": "wire",
    "MAX_SEQ_STEP": "wire",
    "MAX_MEMORY_MB": "wire",
    "MAX_COMMAND": "wire",
    "MAX_TIMINGS": "wire",
    "ProtocolError": "wire",
    "utc_now": "wire",
    "format_time": "wire",
    "format_epoch": "wire",
    "parse_time": "wire",
    "epoch_micros": "wire",
    "Notification": "wire",
    "MAX_JSON_DEPTH": "wire",
    "load_json": "wire",
    "digest_ha1": "keys",
    "is_key": "keys",
    "is_host": "keys",
    "node_key": "keys",
    "slot_key": "keys",
    "sign": "keys",
    "signature_matches": "keys",
}

__all__ = [
    "IMAGES_PATH",
    "IMAGE_NAME_RE",
    "IMAGE_VERSION_RE",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_NAME_LEN",
    "MAX_PREFETCH",
    "MAX_PEERS",
    "VmContext",
    "image_path",
    "BATCH_ENV",
    "COMMANDS_PATH",
    "Command",
    "ImageFile",
    "LIFECYCLE_STATES",
    "MAX_BODY_BYTES",
    "MAX_CMDLINE_LEN",
    "MAX_COMMAND",
    "MAX_COMMANDS",
    "MAX_COMMANDS_ANSWER_BYTES",
    "MAX_HOST_LEN",
    "MAX_JSON_DEPTH",
    "MAX_MEMORY_MB",
    "MAX_MESSAGE_LEN",
    "MAX_NETWORK_LEN",
    "MAX_PATH_LEN",
    "MAX_POLL_WAIT_S",
    "MAX_SEQ",
    "MAX_SEQ_STEP",
    "MAX_SLOT_LEN",
    "MAX_TIMINGS",
    "MAX_VCPUS",
    "MAX_VMS",
    "MAX_VM_NAME_LEN",
    "NOTIFICATIONS_PATH",
    "Notification",
    "OPS",
    "PILOT_ENV",
    "ProtocolError",
    "SIGNATURE_HEADER",
    "SIGNATURE_PREFIX",
    "SLOT_SECRET_ENV",
    "STATES",
    "VERSION",
    "VM_STATES",
    "VmSpec",
    "check_target",
    "commands_body",
    "commands_path",
    "digest_ha1",
    "epoch_micros",
    "format_epoch",
    "format_time",
    "is_host",
    "is_key",
    "load_json",
    "node_key",
    "parse_commands",
    "parse_time",
    "sign",
    "sign_commands",
    "signature_matches",
    "slot_key",
    "utc_now",
]


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
