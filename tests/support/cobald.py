"""A real COBalD daemon (``python -m cobald.daemon``, its own process and YAML) driving a lease pool, for tests and
benchmarks; and the overlay's queue it is asked to serve: a Slurm partition whose jobs only wait."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support.libvirt_daemon import GUEST_DIR, guest_files
from tests.support.realvms import VM_MB
from tests.support.site import Site, stop_process
from tests.support.slurm_cluster import PILOT, SUDO


def slurm_vm_site(root, cluster, libvirt_uri: str) -> Site:
    """A service on the real Slurm whose pilots host QEMU guests (``libvirt_uri``) and report their use every 2 s."""
    return Site(root, nodes=tuple(cluster.nodes), provider={
        "name": "slurm", "env": f"SLURM_CONF={cluster.conf}", "pilot_command": PILOT, "sudo": SUDO,
        "output_dir": str(root / "jobs"), "walltime_padding": 120,
    }, pilot_sections={
        "libvirt": {"uri": libvirt_uri}, "batch": cluster.pilot_batch(),
        "vms": {"image_dir": GUEST_DIR, "console_dir": str(root / "consoles"), "poll_wait": 5,
                "shutdown_timeout": 2, "usage_interval": 2},
        "timing": {"walltime_margin": 20, "earlywaitratio": 0.3},
    })


def busy_guest_vm(busy_s: int) -> dict:
    """The test guest as a pool's VM spec: its agent says busy for ``busy_s`` seconds from its boot, then idle."""
    files = guest_files()
    return {"name": "worker", "memory_mb": VM_MB, "vcpus": 1,
            "boot": {"kernel": {"path": "vmlinuz", "sha256": files.kernel_sha256},
                     "initrd": {"path": "initrd.img", "sha256": files.initrd_sha256},
                     "cmdline": f"console=ttyS0 panic=-1 quiet wp_busy={busy_s}"},
            "console_log": "worker.log", "context": {}}


def pool_yaml(path: str, *, controller: dict, pool: dict, tag: bool = True) -> str:
    """Write COBalD's configuration: a ``LinearController`` (``controller``: its options) on a lease pool
    (``pool``: its options), named by the YAML tag the package registers, or by ``__type__``. JSON is YAML."""
    head = {"__type__": "cobald.controller.linear.LinearController", **controller}
    options = json.dumps(pool)
    name = "!WorkspaceLeases" if tag else None
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("pipeline:\n")
        handle.write(f"  - {json.dumps(head)}\n")
        if name:
            handle.write(f"  - {name} {options}\n")
        else:
            handle.write(f"  - {json.dumps({'__type__': 'service_adapter.burst.pool.LeasePool', **pool})}\n")
    return path


class CobaldDaemon:
    """``python -m cobald.daemon CONFIG`` with its log in ``log``; stopped by its pid."""

    def __init__(self, config: str, log: str, env: dict | None = None):
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cobald.daemon", config, "--log-level", "DEBUG"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env or dict(os.environ))

    def text(self) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def stop(self) -> int:
        return stop_process(self.process)


class OverlayQueue:
    """A Slurm partition whose jobs wait and never run (``State=DOWN``): the overlay batch system's queue that a
    pool's VMs serve. A VM "takes" a job by cancelling it here."""

    def __init__(self, cluster, name: str = "overlay"):
        self.cluster = cluster
        self.name = name
        cluster.run(["scontrol", "create", f"PartitionName={name}", f"Nodes={cluster.nodes[-1]}", "State=DOWN",
                     "MaxTime=INFINITE"], timeout=30).check_returncode()

    def submit(self, count: int) -> list[str]:
        ids = []
        for _ in range(count):
            result = self.cluster.run(["sbatch", "--parsable", "--partition", self.name, "--wrap", "true"])
            result.check_returncode()
            ids.append(result.stdout.strip().split(";")[0])
        return ids

    def pending(self) -> list[str]:
        result = self.cluster.run(["squeue", "--noheader", "--partition", self.name, "--states", "PENDING",
                                   "--format", "%i"])
        return result.stdout.split()

    def take(self) -> str | None:
        """Cancel one waiting job (a VM took it); its id, or None when none waits."""
        waiting = self.pending()
        if not waiting:
            return None
        self.cluster.cancel(waiting[0])
        return waiting[0]

    def close(self) -> None:
        for job in self.pending():
            self.cluster.cancel(job)
        self.cluster.run(["scontrol", "delete", f"PartitionName={self.name}"], timeout=30)
