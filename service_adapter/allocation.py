"""Which nodes the batch system gave a pilot job: the receiver accepts a host for a slot only if it is one.

A node's own credentials already keep it from speaking for another host;
this keeps it from joining a slot whose job does not run on it (a slot's
secret could leak, e.g. from a job's environment on a shared node). The
provider asks the LRM (Slurm's node list, ``qstat -f``'s exec hosts, the
local provider's simulated nodes); answers are cached per job, since a
running job keeps its nodes. The LRM is asked once per job, not per
pilot, and never on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading

log = logging.getLogger(__name__)


def short_name(host: str) -> str:
    """A host name without its domain, lower-cased (LRMs list nodes by short or full name)."""
    return host.split(".", 1)[0].lower()


class Allocations:
    """The hosts of each job, asked from ``provider.allocated_hosts(job_id)`` and remembered.

    :meth:`holds` answers True or False once the LRM has named the job's
    hosts, and None while it cannot (the job not started yet, the LRM
    query failed): the caller tells the pilot to try again.
    """

    def __init__(self, provider, *, cache_size: int = 4096):
        self.provider = provider
        self._known: collections.OrderedDict[str, frozenset[str]] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._asking: dict[str, threading.Lock] = {}  # job id -> held while the LRM is asked about it
        self._on_loop: dict[str, asyncio.Future] = {}  # job id -> the answer a worker thread is getting (loop only)

    def hosts(self, job_id: str) -> frozenset[str] | None:
        """The job's hosts as short names, or None while the LRM cannot say (blocks on the LRM).

        The nodes of one job report at about the same moment: the first asks the LRM, the
        others wait for its answer instead of asking again.
        """
        known = self.known_hosts(job_id)
        if known is not None:
            return known
        with self._lock:
            asking = self._asking.setdefault(job_id, threading.Lock())
        with asking:
            known = self.known_hosts(job_id)  # answered while this one waited
            if known is not None:
                return known
            try:
                listed = self.provider.allocated_hosts(job_id)
            except Exception:  # a provider bug must not become a 500: the pilot tries again
                log.exception("could not ask the LRM for the hosts of job %s", job_id)
                listed = None
            found = frozenset(short_name(host) for host in listed) if listed else None
            with self._lock:
                self._asking.pop(job_id, None)
                if found is not None:
                    self._known[job_id] = found
                    while len(self._known) > self._cache_size:
                        self._known.popitem(last=False)
        return found

    def known_hosts(self, job_id: str) -> frozenset[str] | None:
        """The job's hosts if the LRM has already named them, else None; never asks (safe on the event loop)."""
        with self._lock:
            known = self._known.get(job_id)
            if known is not None:
                self._known.move_to_end(job_id)
            return known

    def holds(self, job_id: str, host: str) -> bool | None:
        """Whether ``host`` is one of the job's hosts; None while the LRM cannot say."""
        found = self.hosts(job_id)
        return None if found is None else short_name(host) in found

    async def holds_on_loop(self, job_id: str, host: str) -> bool | None:
        """:meth:`holds` for the event loop: from memory if the LRM was asked, else from one worker thread per job
        however many of its nodes ask at once (the others await that answer on the loop, not in threads of
        their own, which would queue behind the pool's few workers)."""
        found = self.known_hosts(job_id)
        if found is None:
            pending = self._on_loop.get(job_id)
            if pending is None:
                pending = asyncio.get_running_loop().run_in_executor(None, self.hosts, job_id)
                self._on_loop[job_id] = pending
                pending.add_done_callback(lambda _done: self._on_loop.pop(job_id, None))
            found = await asyncio.shield(pending)  # one asker giving up does not cancel the others' answer
        return None if found is None else short_name(host) in found
