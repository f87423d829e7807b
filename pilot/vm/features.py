"""HEPiX Machine/Job Features for a leased VM: what the guest's ``$MACHINEFEATURES`` and ``$JOBFEATURES`` hold.

Pilot frameworks that run inside the VMs (glideinWMS, PanDA, DIRAC, TARDIS
drones) read these files (HSF-TN-2016-02) to learn how long they may run
and drain themselves before the end, with no code of ours. For a leased VM
the "machine" is the VM and its "job" is the VM's life in the lease:

``machinefeatures``: ``total_cpu`` (its vCPUs), ``shutdowntime`` (when it
will be stopped, epoch seconds), ``grace_secs`` (how long a VM asked to shut
down has before it is destroyed). ``jobfeatures``: ``allocated_cpu``,
``shutdowntime_job``, ``grace_secs_job``, ``jobstart_secs`` (its start),
``wall_limit_secs`` and ``cpu_limit_secs`` (from its start to its shutdown
time, the latter times its vCPUs), ``mem_limit_bytes`` and ``max_rss_bytes``
(its memory), ``job_id`` (``SLOT.NAME``).

The seed carries them as the VM starts (:mod:`pilot.vm.seed`); the pilot sends
them again on the lease channel whenever the end moves (an extension, a
release, the batch system's stop), one ``mjf DIR KEY VALUE`` line each,
and the guest agent (``guestagent.sh``) writes them into the files.
"""

from __future__ import annotations

import dataclasses
import re

#: The directories the guest agent makes (the variables point at them); the only DIR a line may name.
MJF_DIRS = ("machinefeatures", "jobfeatures")
_KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
_VALUE_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


@dataclasses.dataclass(frozen=True)
class LeaseEnd:
    """When the VMs of a slot will be stopped (epoch seconds) and the seconds a guest asked to shut down has."""

    shutdown_at: float
    grace_s: float


def vm_features(*, slot: str, name: str, vcpus: int, memory_mb: int, started_at: float,
                end: LeaseEnd) -> dict[str, dict[str, str]]:
    """The VM's features: directory -> key -> value (whole seconds and bytes, as the note's readers expect)."""
    shutdown = int(end.shutdown_at)
    wall = max(shutdown - int(started_at), 0)
    grace = str(int(end.grace_s))
    memory = str(memory_mb * 1024 * 1024)
    return {
        "machinefeatures": {"total_cpu": str(vcpus), "shutdowntime": str(shutdown), "grace_secs": grace},
        "jobfeatures": {
            "allocated_cpu": str(vcpus), "shutdowntime_job": str(shutdown), "grace_secs_job": grace,
            "jobstart_secs": str(int(started_at)), "wall_limit_secs": str(wall), "cpu_limit_secs": str(wall * vcpus),
            "mem_limit_bytes": memory, "max_rss_bytes": memory, "job_id": f"{slot}.{name}",
        },
    }


def feature_lines(features: dict[str, dict[str, str]]) -> str:
    """The lease channel's (and the seed's ``features`` file's) lines for ``features``: ``mjf DIR KEY VALUE``."""
    lines = []
    for directory, values in features.items():
        for key, value in values.items():
            check_feature(directory, key, value)
            lines.append(f"mjf {directory} {key} {value}\n")
    return "".join(lines)


def check_feature(directory: str, key: str, value: str) -> None:
    """Raise ValueError unless the guest agent would take this line (it checks the same, in sh)."""
    if directory not in MJF_DIRS or not _KEY_RE.match(key) or not _VALUE_RE.match(value):
        raise ValueError(f"not a feature the guest agent takes: {directory} {key} {value!r}")
