"""What a slot's VM host tells and keeps of each VM: outcomes, the VMs it lists, and its books' entries."""

from __future__ import annotations

import dataclasses
import os

from pilot.vm.cleanup import VmCleanupError
from pilot.vm.usage import GuestUsage
from workspace_common.protocol import VmSpec


@dataclasses.dataclass(frozen=True)
class VmOutcome:
    """What became of a start or a stop: ``ok``, the VM's ``name``, and ``reason``.

    ``reason`` is one line: why it was refused, or, when ``ok``, how it went
    (e.g. "shut down in 0.4 s").
    """

    ok: bool
    name: str
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class VmInfo:
    """A VM this host started: its name, its domain's name, its memory, and ``state`` "running" or "gone"."""

    name: str
    domain_name: str
    memory_mb: int
    state: str


class VmTeardownError(VmCleanupError):
    """Teardown could not destroy everything of this slot; ``destroyed`` lists what it did destroy."""

    def __init__(self, message: str, destroyed: list[str]):
        super().__init__(message)
        self.destroyed = destroyed


@dataclasses.dataclass
class BookedVm:
    """A VM on the host's books: its spec, its domain, the image holds and lease channel it keeps while it runs."""

    spec: VmSpec
    domain_name: str
    domain: object
    holds: tuple[int, ...] = ()  # shared locks on the cached images it uses (eviction skips those)
    channel: object = None  # the connected socket of its lease channel (from its start, when libvirt gave one)
    told: tuple[str, ...] | None = None  # the warning it was given (its end and why), so it is given once
    started_at: float = 0.0  # epoch seconds: its features count its wall limit from here
    no_channel: bool = False  # its domain has no lease channel (a Xen guest): never looked for again
    usage: GuestUsage = dataclasses.field(default_factory=GuestUsage)  # what its agent said, its CPU counter

    def let_go(self) -> None:
        """Release the VM's hold on its cached images and its lease channel (it no longer runs)."""
        holds, self.holds = self.holds, ()
        for fd in holds:
            os.close(fd)
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.close()
