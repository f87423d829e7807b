"""Which batch job a VM job runs in, and the cores and memory that job has on this node.

Asked of the batch system, never taken from the environment: the wrapper
runs as root through sudo, and the job's user sets its own environment.
Slurm's ``scontrol pidinfo PID`` asks the node's slurmd which job the
process belongs to (the wrapper's own pid: it runs inside the job's
process tree), and ``scontrol show job -d -o`` gives that job's owner,
state and, per node, its cores and memory. ``SLURMD_NODENAME`` from the
environment only picks which of the job's own nodes this is (several
slurmd share one host in tests; on a real site the job has one node here).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess

from pilot.batchenv import BatchClient

JOB_RE = re.compile(r"Slurm JobId=(\d+)")
_FIELD_RE = re.compile(r"(?:^|\s)([A-Za-z/:_]+)=(\S*)")
_DETAIL_RE = re.compile(r"Nodes=(\S+) CPU_IDs=(\S+) Mem=(\d+)")
_KILL_WAIT_RE = re.compile(r"^KillWait\s*=\s*(\d+) sec", re.MULTILINE)
_MEMORY_RE = re.compile(r"^(\d+)([KMGT]?)$")
_UNITS_MB = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024, "": 1}


class AllocationError(Exception):
    """The job's allocation cannot be found or does not allow what was asked; one line."""


@dataclasses.dataclass(frozen=True)
class JobAllocation:
    """A batch job's share of this node: its ``job_id``, owner ``uid``, ``node`` name, ``cpus`` and ``memory_mb``.

    ``memory_mb`` is None when the batch system does not say (a job with no
    memory request on a cluster that does not track memory).
    """

    job_id: str
    uid: int
    node: str
    cpus: int
    memory_mb: int | None


def memory_mb(text: str) -> int | None:
    """Slurm's ``300M`` / ``2G`` / ``0`` as whole MB; None for 0 or something unreadable."""
    match = _MEMORY_RE.match(text)
    if not match:
        return None
    value = int(int(match.group(1)) * _UNITS_MB[match.group(2)])
    return value or None


def count_cpu_ids(text: str) -> int:
    """How many CPUs ``0-1,4,6-7`` names; ValueError for anything else."""
    count = 0
    for part in text.split(","):
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if last < first:
            raise ValueError(f"bad CPU range {part!r}")
        count += last - first + 1
    return count


def parse_job(line: str, node: str, expand) -> JobAllocation:
    """The allocation on ``node`` from one line of ``scontrol show job -d -o``.

    ``expand(hostlist)`` turns ``node[1-2]`` into names. Raises
    AllocationError when the job does not run, or not on ``node``.
    """
    head, _, details = line.partition("   Nodes=")
    fields = dict(_FIELD_RE.findall(head))
    job_id = fields.get("JobId", "?")
    if fields.get("JobState") != "RUNNING":
        raise AllocationError(f"job {job_id} is {fields.get('JobState', 'in no known state')}, not RUNNING")
    owner = re.match(r"^.*\((\d+)\)$", fields.get("UserId", ""))
    if owner is None:
        raise AllocationError(f"job {job_id}: no owner in scontrol's answer")
    per_node = dict(_FIELD_RE.findall(details))
    for hosts, cpu_ids, mem in _DETAIL_RE.findall(line):
        if node in expand(hosts):
            cpus = count_cpu_ids(cpu_ids)
            memory = memory_mb(f"{mem}M")
            if memory is None and "MinMemoryNode" in per_node:
                memory = memory_mb(per_node["MinMemoryNode"])
            if memory is None and "MinMemoryCPU" in per_node:
                per_cpu = memory_mb(per_node["MinMemoryCPU"])
                memory = per_cpu * cpus if per_cpu else None
            return JobAllocation(job_id, int(owner.group(1)), node, cpus, memory)
    raise AllocationError(f"job {job_id} has no cores on node {node}")


class SlurmAllocations:
    """Finds a process's job through ``scontrol``, found and run as ``client`` says (pilot.conf's ``[batch]``)."""

    def __init__(self, client: BatchClient | None = None, *, timeout_s: float = 10.0):
        self.client = client or BatchClient()
        self.scontrol = self.client.which("scontrol")
        self.env = self.client.environment()
        self.timeout_s = timeout_s

    def local_node(self, name: str | None) -> str | None:
        """``name`` if it is a Slurm node whose slurmd runs on this host, else None.

        Where several slurmd share a host, scontrol asks the one named by
        SLURMD_NODENAME; a name from the user's environment is used only
        after this check, so it can only pick among this host's own nodes.
        """
        if not name:
            return None
        result = self._run("show", "node", "-o", name)
        hostname = os.uname().nodename.split(".")[0]
        fields = dict(_FIELD_RE.findall(result.stdout))
        if result.returncode == 0 and fields.get("NodeName") == name and \
                fields.get("NodeHostName", "").split(".")[0] == hostname:
            self.env["SLURMD_NODENAME"] = name
            return name
        return None

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        if self.scontrol is None:
            raise AllocationError(f"scontrol not found in [batch] path {self.client.path}: this node has no Slurm "
                                  "client")
        try:
            return subprocess.run([self.scontrol, *args], capture_output=True, text=True, env=self.env,
                                  timeout=self.timeout_s, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise AllocationError(f"{self.scontrol} not found: this node has no Slurm client") from None
        except subprocess.TimeoutExpired:
            raise AllocationError(f"{self.scontrol} {args[0]} did not answer in {self.timeout_s:g} s") from None

    def job_of(self, pid: int) -> str | None:
        """The id of the Slurm job process ``pid`` belongs to, or None if it is in none."""
        result = self._run("pidinfo", str(pid))
        match = JOB_RE.search(result.stdout)
        return match.group(1) if result.returncode == 0 and match else None

    def expand(self, hostlist: str) -> list[str]:
        """Slurm's host list expression as names."""
        if "[" not in hostlist:
            return hostlist.split(",")
        result = self._run("show", "hostnames", hostlist)
        if result.returncode != 0:
            raise AllocationError(f"scontrol cannot expand {hostlist!r}: {result.stderr.strip()[:200]}")
        return result.stdout.split()

    def kill_wait_s(self) -> float | None:
        """Slurm's KillWait: how long after its SIGTERM the job's processes get SIGKILL; None if it does not say."""
        result = self._run("show", "config")
        match = _KILL_WAIT_RE.search(result.stdout) if result.returncode == 0 else None
        return float(match.group(1)) if match else None

    def allocation(self, job_id: str, node_hint: str | None) -> JobAllocation:
        """The job's allocation on this node (``node_hint`` when it is one of the job's nodes, else the job's
        only node, else this host's short name)."""
        result = self._run("show", "job", "-d", "-o", job_id)
        if result.returncode != 0 or not result.stdout.startswith(f"JobId={job_id} "):
            raise AllocationError(f"scontrol show job {job_id}: {result.stderr.strip()[:200] or 'no answer'}")
        line = result.stdout.strip()
        fields = dict(_FIELD_RE.findall(line.partition("   Nodes=")[0]))
        nodes = self.expand(fields.get("NodeList", ""))
        hostname = os.uname().nodename.split(".")[0]
        if node_hint in nodes:
            node = node_hint
        elif len(nodes) == 1:
            node = nodes[0]
        elif hostname in nodes:
            node = hostname
        else:
            raise AllocationError(f"job {job_id} runs on {fields.get('NodeList')}: cannot tell which is this host")
        return parse_job(line, node, self.expand)
