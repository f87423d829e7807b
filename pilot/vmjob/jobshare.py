"""A VM job's VM comes out of its batch job's share of the node, not beside it.

A job that could run its processes on all its cores and memory on the host
and a guest of the same size beside them would use its allocation twice.
So, where the batch system enforces the allocation:

- **CPUs**: the VM's vCPUs and QEMU's own threads are pinned to the CPUs
  the wrapper itself may run on. The wrapper runs inside the job, so the
  batch system's cpuset or affinity (Slurm's task/cgroup, task/affinity)
  confines it to the job's cores; its caller can narrow that, never widen
  it (and narrowing only slows its own guest).
- **Memory**: the VM's memory is taken from the host through the node's
  backend (hugepages, a cgroup, a balloon), outside the job's memory
  cgroup; the job's memory cgroup has its limit lowered by as much while
  the VM runs, so the job's own processes and its guest together stay
  within what the batch system gave it. The job's cgroup is the one the
  kernel names for the wrapper (``/proc/self/cgroup``, cgroup v1's memory
  controller: Slurm's ``.../job_<id>``), checked against the job id the
  batch system gave; the old limit is journalled before the change and put
  back after the VM (or by whoever undoes the entry). A job whose own
  processes already use more than the lower limit allows gets a refusal
  that says how much fits.

Where no memory limit is enforced (no job cgroup, or an unlimited one) the
job's processes were never bounded on the host and nothing is lowered.
"""

from __future__ import annotations

import errno
import os
import stat

MEMORY_ROOT = "/sys/fs/cgroup/memory"
#: cgroup v1 writes this (or more) for "no limit".
UNLIMITED = 1 << 62
_MB = 1024 * 1024


class JobShareError(Exception):
    """The VM does not fit in what the job has left, or the job's cgroup could not be changed; one line."""


def job_cpus() -> list[int]:
    """The CPUs this process (inside the job) may run on, ascending."""
    return sorted(os.sched_getaffinity(0))


def cpuset_text(cpus: list[int]) -> str:
    """``[0, 1, 2, 5]`` as libvirt's and the kernel's ``0-2,5``."""
    parts, start = [], None
    for index, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if index + 1 == len(cpus) or cpus[index + 1] != cpu + 1:
            parts.append(str(start) if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(parts)


def job_memory_cgroup(job_id: str, *, proc_cgroup: str = "/proc/self/cgroup",
                      root: str = MEMORY_ROOT) -> str | None:
    """The memory cgroup directory of job ``job_id`` that this process is in, or None (it is in none).

    Only a directory named ``job_<job_id>`` on the kernel's path for this
    process counts, and only if it is root's.
    """
    try:
        with open(proc_cgroup, encoding="ascii") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" not in controllers.split(","):
            continue
        parts = path.strip("/").split("/")
        if f"job_{job_id}" not in parts:
            return None
        directory = os.path.join(root, *parts[:parts.index(f"job_{job_id}") + 1])
        try:
            info = os.lstat(directory)
        except OSError:
            return None
        return directory if stat.S_ISDIR(info.st_mode) and info.st_uid == 0 else None
    return None


def read_limit(directory: str) -> int:
    """The cgroup's memory limit in bytes (:data:`UNLIMITED` or more: none)."""
    return _read_int(os.path.join(directory, "memory.limit_in_bytes"))


def lower_limit(directory: str, old_limit: int, by_mb: int) -> int:
    """Lower the cgroup's limit from ``old_limit`` by ``by_mb``; the new limit. :class:`JobShareError` if the
    job's processes use more than that leaves them (nothing is changed then)."""
    new = old_limit - by_mb * _MB
    usage = _usage(directory)
    if new <= usage:
        raise JobShareError(_no_room(old_limit, usage, by_mb))
    try:
        _write(directory, new)
    except OSError as exc:
        if exc.errno == errno.EBUSY:  # the kernel could not reclaim enough to get under it
            raise JobShareError(_no_room(old_limit, _usage(directory), by_mb)) from None
        raise JobShareError(f"cannot lower the job's memory limit in {directory}: {exc.strerror}") from None
    return new


def restore_limit(directory: str, limit: int) -> None:
    """Put the job's limit back; nothing to do once the job (and its cgroup) is gone."""
    try:
        _write(directory, limit)
    except FileNotFoundError:
        pass


def _no_room(limit: int, usage: int, by_mb: int) -> str:
    room = max((limit - usage) // _MB - 1, 0)
    return (f"memory: the job's processes use {usage // _MB} MB of its {limit // _MB} MB; a VM taking {by_mb} MB "
            f"does not fit beside them (at most {room} MB does, VM overhead included)")


def _usage(directory: str) -> int:
    return _read_int(os.path.join(directory, "memory.usage_in_bytes"))


def _read_int(path: str) -> int:
    with open(path, encoding="ascii") as handle:
        return int(handle.read())


def _write(directory: str, limit: int) -> None:
    fd = os.open(os.path.join(directory, "memory.limit_in_bytes"), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, str(limit).encode())
    finally:
        os.close(fd)
