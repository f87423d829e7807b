"""How much work waits for the pool's nodes: the pending jobs of the overlay's queue, in nodes.

A pool may be told where its work waits (COBalD's YAML, ``waiting:``):

- ``{slurm_partition: NAME}``: the pending jobs of a Slurm partition
  (``squeue --partition NAME --states PENDING``), with ``slurm_conf`` for
  another cluster's slurm.conf and ``jobs_per_node`` (default 1);
- ``{command: [ARGV...]}``: a program of the site's that prints one number,
  the nodes' worth of work waiting.

Without one, no work waits and the pool grows only as its VMs keep busy
(COBalD's own way). A source that cannot answer gives None: the pool then
keeps the last number it had.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess

log = logging.getLogger(__name__)

#: The longest a source's command may take (it runs on the pool's own thread).
COMMAND_TIMEOUT_S = 20.0
#: The most output read from a source's command.
MAX_OUTPUT_BYTES = 1024 * 1024


class WaitingWork:
    """A source of waiting work (see the module's docstring); :meth:`nodes` asks it now."""

    def __init__(self, argv: list[str], *, env: dict | None = None, per_node: float = 1.0, counts_lines: bool = False,
                 what: str = ""):
        self.argv = argv
        self.env = env
        self.per_node = per_node
        self.counts_lines = counts_lines
        self.what = what or " ".join(argv)

    def nodes(self) -> float | None:
        """The nodes' worth of work waiting now; None if the source did not answer (logged)."""
        try:
            result = subprocess.run(self.argv, capture_output=True, timeout=COMMAND_TIMEOUT_S, env=self.env,
                                    stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("waiting work: %s did not answer: %s", self.what, exc)
            return None
        out = result.stdout[:MAX_OUTPUT_BYTES].decode("utf-8", "replace")
        if result.returncode != 0:
            log.warning("waiting work: %s failed (%d): %s", self.what, result.returncode,
                        result.stderr.decode("utf-8", "replace").strip()[:300])
            return None
        if self.counts_lines:
            return len([line for line in out.splitlines() if line.strip()]) / self.per_node
        try:
            value = float(out.strip())
        except ValueError:
            log.warning("waiting work: %s printed %r, not a number", self.what, out.strip()[:80])
            return None
        return value if math.isfinite(value) and value >= 0 else None


def waiting_from(config: dict | None) -> WaitingWork | None:
    """The source COBalD's YAML names (``waiting:``); None for none. ValueError naming what is wrong."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError("waiting must be a mapping: {slurm_partition: NAME} or {command: [ARGV...]}")
    per_node = config.get("jobs_per_node", 1)
    if not isinstance(per_node, (int, float)) or isinstance(per_node, bool) or not per_node > 0:
        raise ValueError(f"waiting.jobs_per_node must be a number above 0, got {per_node!r}")
    unknown = sorted(set(config) - {"slurm_partition", "slurm_conf", "command", "jobs_per_node"})
    if unknown:
        raise ValueError(f"waiting: unknown option(s) {', '.join(unknown)}")
    if ("slurm_partition" in config) == ("command" in config):
        raise ValueError("waiting: give slurm_partition or command, one of them")
    if "command" in config:
        argv = config["command"]
        if not isinstance(argv, list) or not argv or not all(isinstance(word, str) for word in argv):
            raise ValueError("waiting.command must be a list of words (the program and its arguments)")
        return WaitingWork(argv, per_node=float(per_node))
    partition = config["slurm_partition"]
    if not isinstance(partition, str) or not partition or partition.startswith("-") or "," in partition:
        raise ValueError(f"waiting.slurm_partition must be one partition's name, got {partition!r}")
    squeue = shutil.which("squeue")
    if squeue is None:
        raise ValueError("waiting.slurm_partition: squeue is not on this PATH")
    env = dict(os.environ)
    if config.get("slurm_conf"):
        env["SLURM_CONF"] = str(config["slurm_conf"])
    argv = [squeue, "--noheader", "--partition", partition, "--states", "PENDING", "--format", "%i"]
    return WaitingWork(argv, env=env, per_node=float(per_node), counts_lines=True,
                       what=f"squeue (partition {partition})")
