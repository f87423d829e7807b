"""Launchers: how a job script starts one pilot on every node of its job (after Parsl's parsl/launchers).

A batch script runs on the job's first node only; a launcher turns the
per-node command line into the one the script ``exec``\\ s so that exactly
one copy runs on each node. Each launcher is a callable
``launcher(argv, nodes) -> argv``; :func:`resolve_launcher` picks one by
name for a provider.
"""

from __future__ import annotations

import shlex
import shutil
from typing import Callable


class Launcher:
    """Wraps the per-node command so it runs once on each of ``nodes`` nodes; ``name`` is its config name."""

    name = ""

    def __call__(self, argv: list[str], nodes: int) -> list[str]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<launcher {self.name}>"


def _check_nodes(nodes: int) -> None:
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"a job needs a whole number of nodes above 0, not {nodes!r}")


class SingleLauncher(Launcher):
    """The command alone, for one-node jobs (the batch script already runs on that node)."""

    name = "single"

    def __call__(self, argv: list[str], nodes: int) -> list[str]:
        _check_nodes(nodes)
        if nodes != 1:
            raise ValueError(
                f"the 'single' launcher starts the pilot on the job's first node only; "
                f"a {nodes}-node job needs srun, pbsdsh or mpiexec"
            )
        return list(argv)


class SrunLauncher(Launcher):
    """``srun --nodes=N --ntasks=N --ntasks-per-node=1 --kill-on-bad-exit=0``: one task on each node.

    ``--nodes``/``--ntasks`` because srun otherwise inherits the job's task
    count: a PBS job's ``nodes=2:ppn=2`` becomes 4 Slurm tasks, and srun then
    ignores ``--ntasks-per-node=1`` (with a warning) and starts two pilots
    per node. ``--kill-on-bad-exit=0`` so that one node's pilot failing does
    not make Slurm kill the others (each must restore its own node and report).
    """

    name = "srun"

    def __call__(self, argv: list[str], nodes: int) -> list[str]:
        _check_nodes(nodes)
        return ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=0", *argv]


class PbsdshLauncher(Launcher):
    """``pbsdsh -u``: Torque/OpenPBS's task spawner, once per unique node of the job."""

    name = "pbsdsh"

    def __call__(self, argv: list[str], nodes: int) -> list[str]:
        _check_nodes(nodes)
        return ["pbsdsh", "-u", *argv]


class MpiexecLauncher(Launcher):
    """``mpiexec -n N -ppn 1`` (MPICH/Hydra spelling): N copies, one per node."""

    name = "mpiexec"

    def __call__(self, argv: list[str], nodes: int) -> list[str]:
        _check_nodes(nodes)
        return ["mpiexec", "-n", str(nodes), "-ppn", "1", *argv]


class QrshLauncher(Launcher):
    """Grid Engine: ``qrsh -inherit -V`` to each host of ``$PE_HOSTFILE`` (one slot per host), then ``wait``.

    Seen on Son of Grid Engine 8.1.9 (docs/gridengine.md): ``-V`` is what
    carries the script's exported variables (the slot's secret) to the
    remote task, never argv; qrsh joins its arguments and the remote side
    runs them through a shell, so the command goes as one shell-quoted
    string; with ``-notify`` a ``qdel`` sends SIGUSR2 to every task and to
    the qrsh clients, whose default action would end them and so the job
    before the remote pilots restore: the loop ignores SIGUSR1/SIGUSR2
    (inherited by the clients), waits for every pilot, and exits with the
    first non-zero status among them.
    """

    name = "qrsh"
    # The job ends with the first non-zero status of the pilots (a plain `wait` would always give 0).
    LOOP = ('trap "" USR1 USR2; pids=; for host in $(cut -d" " -f1 "$PE_HOSTFILE"); do '
            'qrsh -inherit -V -nostdin "$host" "$1" & pids="$pids $!"; done; '
            'status=0; for pid in $pids; do wait "$pid"; rc=$?; [ "$status" -ne 0 ] || status=$rc; done; '
            'exit "$status"')

    def __call__(self, argv: list[str], nodes: int) -> list[str]:
        _check_nodes(nodes)
        return ["sh", "-c", self.LOOP, "qrsh-launch", shlex.join(argv)]


#: The launchers by config name.
LAUNCHERS: dict[str, Launcher] = {
    launcher.name: launcher
    for launcher in (SingleLauncher(), SrunLauncher(), PbsdshLauncher(), MpiexecLauncher(), QrshLauncher())
}
#: Every name a template's ``launcher`` may hold ("auto" picks one per provider).
LAUNCHER_NAMES = ("auto", *LAUNCHERS)


def check_launcher_name(name: str) -> str:
    """``name`` if it names a launcher or "auto"; else ValueError listing the known ones."""
    if name not in LAUNCHER_NAMES:
        raise ValueError(f"unknown launcher {name!r}: use one of {', '.join(LAUNCHER_NAMES)}")
    return name


def resolve_launcher(name: str, provider_name: str, which: Callable[[str], str | None] = shutil.which) -> Launcher:
    """The launcher ``name`` stands for with ``provider_name``'s batch system.

    "auto": slurm -> srun; sge -> qrsh; pbs -> pbsdsh if ``pbsdsh`` is on PATH, else srun
    if ``srun`` is (a Slurm-backed qsub: SchedMD's slurm-wlm-torque has no
    pbsdsh, and its jobs are Slurm jobs), else single. ``which`` looks on the
    service's host, which is assumed to have the nodes' commands. The local
    provider starts its pilots itself: no launcher applies (ValueError).
    """
    check_launcher_name(name)
    if provider_name == "local":
        raise ValueError("the local provider starts one process per node itself; launchers apply to pbs, sge and slurm")
    if name != "auto":
        return LAUNCHERS[name]
    if provider_name == "slurm":
        return LAUNCHERS["srun"]
    if provider_name == "sge":
        return LAUNCHERS["qrsh"]
    if provider_name == "pbs":
        if which("pbsdsh"):
            return LAUNCHERS["pbsdsh"]
        if which("srun"):
            return LAUNCHERS["srun"]
        return LAUNCHERS["single"]
    raise ValueError(f"no launcher is known for provider {provider_name!r}")
