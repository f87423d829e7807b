"""The interface every LRM provider implements (in the spirit of Parsl's ExecutionProvider).

A provider knows how to hand a :class:`PilotJob` to one batch system and
how to ask that system about it; it keeps no lease state of its own (the
store does), so a restarted service can ask about jobs an earlier process
submitted.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import logging
import re

log = logging.getLogger(__name__)


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
    lease: str = ""
    """The lease this job serves (for job names and logs only)."""
    slot_secret: str = dataclasses.field(default="", repr=False)
    """The slot's secret, handed to the pilots in the job's environment (never on a command line)."""
    begin_at: float | None = None
    """When the batch system may start the job at the earliest (epoch seconds); None: as soon as it can."""
    warn_before_s: float = 0.0
    """How long before their deadline the pilots warn their VMs (0: no warning)."""
    exclude_nodes: tuple[str, ...] = ()
    """Nodes the batch system must not give this job (a pool's black-holed nodes); host names only."""


class JobState(enum.Enum):
    """A job's state as the LRM reports it. UNKNOWN is never taken for finished.

    ``GONE`` is a job the LRM no longer knows at all (purged from its
    memory, no accounting record): it is not running, but nothing says how
    it ended; ``ENDED`` is a job the LRM says has ended without saying how
    (Torque's ``C`` without an exit status). Both are told apart from the
    ways a job that ran is reported to end.
    """

    PENDING = "pending"
    HELD = "held"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    ENDED = "ended"
    GONE = "gone"
    UNKNOWN = "unknown"

    @property
    def finished(self) -> bool:
        """Whether the job has certainly stopped running (UNKNOWN is not)."""
        return self in _FINISHED

    @property
    def queued(self) -> bool:
        """Whether the job waits to start (pending or held)."""
        return self in (JobState.PENDING, JobState.HELD)


_FINISHED = frozenset({
    JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT, JobState.ENDED, JobState.GONE,
})


def split_job_ids(job_ids: list[str], valid: "re.Pattern[str]", lrm: str) -> tuple[dict[str, JobState], list[str]]:
    """Ids the LRM could know (each once, in order), and GONE for those that are no job id of ``lrm`` at all.

    Such an id is never handed to the LRM's commands, where it could read as an option.
    """
    states: dict[str, JobState] = {}
    asked: list[str] = []
    for job_id in job_ids:
        if not valid.fullmatch(str(job_id)):
            log.warning("%r is not a %s job id: reporting it gone", job_id, lrm)
            states[job_id] = JobState.GONE
        elif job_id not in asked:
            asked.append(job_id)
    return states, asked


class ProviderError(Exception):
    """The LRM refused or failed an action (submit, cancel); the message is one line for an operator."""


class Provider(abc.ABC):
    """Submits pilot jobs to an LRM, cancels them, and reports their states."""

    #: The name a service config uses for this provider (``[provider] name``).
    name: str = ""
    #: Whether a job can be kept off named nodes (:attr:`PilotJob.exclude_nodes`); a provider that cannot
    #: never receives such a job (the lease manager refuses the lease first).
    excludes_nodes: bool = False

    @abc.abstractmethod
    def submit(self, job: PilotJob) -> str:
        """Submit ``job``; returns the LRM's job id. Raises :class:`ProviderError` if the LRM refuses."""

    @abc.abstractmethod
    def cancel(self, job_id: str, force: bool = False) -> None:
        """Ask the LRM to end the job (its pilots get SIGTERM and restore their nodes).

        The default is the gentle way, which gives every pilot its SIGTERM and
        the LRM's kill delay to restore; ``force`` is the LRM's outright
        cancel, for a job the gentle way has not ended after the release grace.
        Cancelling a job that has already ended is not an error.
        Raises :class:`ProviderError` when the LRM could not be asked.
        """

    @abc.abstractmethod
    def status(self, job_ids: list[str]) -> dict[str, JobState]:
        """The state of each job; UNKNOWN where the LRM could not say. Never raises for a failed query."""

    @abc.abstractmethod
    def allocated_hosts(self, job_id: str) -> list[str] | None:
        """The hosts the LRM gave the job (its pilots may report only as these), or None while it
        cannot say (the job has not started, the query failed). Never raises for a failed query."""

    def extend(self, job_id: str, duration_s: float) -> None:
        """Give the job the time limit a lease of ``duration_s`` needs (never shorter than it has).

        Raises :class:`ProviderError` with the batch system's reason (its
        policy, the partition's or queue's limit) when it cannot; the job is
        then as it was. This default says the provider cannot extend at all.
        """
        raise ProviderError(f"the {self.name or type(self).__name__} provider cannot change a job's time limit")

    def close(self) -> None:
        """Release what the provider holds (the local provider ends its pilots); others do nothing."""
