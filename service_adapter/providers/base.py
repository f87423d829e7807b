"""The interface every LRM provider implements (in the spirit of Parsl's ExecutionProvider)."""

from __future__ import annotations

import abc
import dataclasses
import enum


@dataclasses.dataclass(frozen=True)
class PilotJob:
    """One batch job whose payload is a pilot on each of ``nodes`` nodes, all for ``slot``."""

    slot: str
    nodes: int
    memory_mb: int
    duration_s: float
    grace_s: float
    contact: str
    pilot_config: str
    """Path of the pilot's configuration file on the nodes."""


class JobState(enum.Enum):
    """A job's state as the LRM reports it. UNKNOWN is never taken for finished."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"

    @property
    def finished(self) -> bool:
        """Whether the job has certainly ended."""
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


class Provider(abc.ABC):
    """Submits pilot jobs to an LRM, cancels them, and reports their states."""

    @abc.abstractmethod
    def submit(self, job: PilotJob) -> str:
        """Submit ``job``; returns the LRM's job id."""

    @abc.abstractmethod
    def cancel(self, job_id: str) -> None:
        """Ask the LRM to end the job (its pilots get SIGTERM and restore their nodes)."""

    @abc.abstractmethod
    def status(self, job_ids: list[str]) -> dict[str, JobState]:
        """The state of each job; UNKNOWN where the LRM could not say."""
