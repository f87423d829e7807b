"""Whether a VM is busy or idle: the guest agent's word on the lease channel, else the VM's own CPU use.

The guest agent (``guestagent.sh``) says ``usage busy`` or ``usage idle``
when a workload in the guest says so, and again every 30 s; a word not
repeated for :data:`AGENT_WORD_TTL_S` is no longer believed (the agent
stopped, or the workload stopped saying). Without a word the VM is busy
while it uses at least ``busy_cpu_percent`` of its vCPUs, measured from
libvirt's CPU counter between two looks. ``hello`` from the agent asks for
the features again (it just started: a reboot, a restart).

The guest is not trusted: at most :data:`MAX_READ_BYTES` are read per look,
a line longer than :data:`MAX_LINE_BYTES` is dropped whole, and any line but
those three words is ignored.
"""

from __future__ import annotations

import dataclasses
import select
import socket

#: The agent repeats its word every 30 s: after three missed, the VM is judged by its CPU use again.
AGENT_WORD_TTL_S = 90.0
#: The most one look reads from a VM's lease channel (the rest waits for the next look).
MAX_READ_BYTES = 16 * 1024
#: A longer line is no agent's: dropped whole.
MAX_LINE_BYTES = 256
_WORDS = {b"usage busy": "busy", b"usage idle": "idle"}


@dataclasses.dataclass(frozen=True)
class VmUsage:
    """One look at a VM: ``busy``, its CPU use in percent of its vCPUs (None before a second look), and whose
    judgement it is: ``agent`` (the guest said so) or ``cpu``."""

    busy: bool
    cpu: int | None
    source: str


@dataclasses.dataclass
class GuestUsage:
    """What a VM's pilot knows of its use: the agent's last word and when (monotonic), the CPU counter's last
    reading, a line begun but not ended, and whether the agent asked for the features."""

    word: str | None = None
    word_at: float = 0.0
    cpu_ns: int | None = None
    cpu_at: float = 0.0
    partial: bytes = b""
    overlong: bool = False
    hello: bool = False

    def hear(self, data: bytes, now: float) -> None:
        """Take what the guest wrote since the last look."""
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if self.overlong:  # the end of a line that was already too long
                self.overlong = False
                continue
            line = line.strip()
            if line in _WORDS:
                self.word, self.word_at = _WORDS[line], now
            elif line == b"hello":
                self.hello = True
        if len(self.partial) > MAX_LINE_BYTES:
            self.partial, self.overlong = b"", True

    def cpu_percent(self, cpu_ns: int, vcpus: int, now: float) -> int | None:
        """The CPU used since the last reading, in percent of ``vcpus`` (None at the first, or a counter that went
        back: a new domain)."""
        last, last_at = self.cpu_ns, self.cpu_at
        self.cpu_ns, self.cpu_at = cpu_ns, now
        if last is None or cpu_ns < last or now <= last_at:
            return None
        share = (cpu_ns - last) / 1e9 / (now - last_at) / max(vcpus, 1)
        return max(0, min(100, round(share * 100)))

    def judge(self, cpu: int | None, busy_cpu_percent: int, now: float) -> VmUsage:
        """Busy or idle: the agent's word while it is fresh, else the CPU use (busy until a second look)."""
        if self.word is not None and now - self.word_at <= AGENT_WORD_TTL_S:
            return VmUsage(self.word == "busy", cpu, "agent")
        return VmUsage(cpu is None or cpu >= busy_cpu_percent, cpu, "cpu")


def drain(channel: socket.socket) -> tuple[bytes, bool]:
    """What the guest wrote on the channel, without waiting (at most :data:`MAX_READ_BYTES`), and whether the
    channel was closed (the VM is gone, or libvirt dropped the socket)."""
    # A socket with a timeout waits before it reads, whatever the flags: ask first whether there is anything.
    readable = select.poll()
    readable.register(channel, select.POLLIN)
    chunks, size = [], 0
    while size < MAX_READ_BYTES and readable.poll(0):
        try:
            data = channel.recv(MAX_READ_BYTES - size)
        except (BlockingIOError, InterruptedError, TimeoutError):
            break
        except OSError:
            return b"".join(chunks), True
        if not data:
            return b"".join(chunks), True
        chunks.append(data)
        size += len(data)
    return b"".join(chunks), False
