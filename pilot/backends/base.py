"""The interface every balloon backend implements."""

from __future__ import annotations

import abc
import dataclasses


class BackendError(Exception):
    """A backend could not read, take or give back memory; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Taken:
    """What one pilot took from the host: enough to give exactly that back later.

    ``units`` is in the backend's own unit (hugepages: pages); ``memory_mb``
    is what the lease's VMs may use.
    """

    backend: str
    units: int
    memory_mb: int


class BalloonBackend(abc.ABC):
    """Takes memory from the host for a lease and gives it back.

    Callers hold the node lock around :meth:`take` and :meth:`give_back`.
    Both are relative to the current state, so several pilots on one node
    compose and may end in any order.
    """

    name: str

    @abc.abstractmethod
    def read_mb(self) -> int:
        """The memory this backend currently holds away from the host, in MB."""

    @abc.abstractmethod
    def take(self, memory_mb: int) -> Taken:
        """Take ``memory_mb`` from the host, verified; all or nothing.

        On failure nothing stays taken and :class:`BackendError` says why.
        """

    @abc.abstractmethod
    def give_back(self, taken: Taken) -> None:
        """Give back exactly what ``taken`` records, verified; raises BackendError if not."""
