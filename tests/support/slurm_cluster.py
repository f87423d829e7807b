"""A real Slurm cluster of several nodes on this one machine, for tests and benchmarks.

munged, slurmctld and one slurmd per node run as children of the caller,
in the foreground, with everything (config, keys, sockets, spool, state,
logs) under one work directory and on free ports of 127.0.0.1: nothing in
/etc changes and a system Slurm, if any, is not touched. SchedMD's Torque
commands (``qsub``/``qdel``/``qstat`` from slurm-wlm-torque) drive the same
cluster: they call ``sbatch`` and friends, which read ``SLURM_CONF``.

Daemons are stopped by the pids this object started, never by name.
``scripts/bootstrap.sh --slurm`` installs the Debian packages.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

from service_adapter.allocation import Allocations
from service_adapter.commandboard import CommandBoard
from service_adapter.digest import DigestVerifier
from service_adapter.images.catalog import ImageCatalog
from service_adapter.images.routes import add_image_routes
from service_adapter.providers.jobscript import JobTemplate
from service_adapter.lease import LeaseManager
from service_adapter.local_site import write_pilot_config
from service_adapter.nodekeys import NodeAccounts, new_site_key, provision_node_key
from service_adapter.providers import ProviderSettings, make_provider
from service_adapter.receiver import ReceiverThread, make_app
from service_adapter.store import Store
from service_adapter.vms import VmManager
from service_adapter.children import stop_in_order
from tests.support.ports import free_ports

SPANK_PBS = "/usr/lib/x86_64-linux-gnu/slurm-wlm/spank_pbs.so"
DAEMONS = ("munged", "slurmctld", "slurmd")
PILOT = os.path.realpath(os.path.join(os.path.dirname(sys.executable), "workspace-pilot"))
SUDO = shutil.which("sudo") or "/usr/bin/sudo"
TERMINAL = {"released", "expired", "failed", "missing"}
REALM = "workspace-pilot"
WALLTIME_MARGIN_S = 20
#: The session cluster's partition with a time limit (MaxTime=5 minutes; tests/conftest.py makes it).
SHORT_PARTITION = "short"


class ClusterError(RuntimeError):
    """The cluster could not be started; the message says which part and where its log is."""


def missing_commands() -> list[str]:
    """The programs this cluster needs that are not installed."""
    needed = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "qsub", "qdel", "qstat")
    return [name for name in needed if shutil.which(name) is None]


class SlurmCluster:
    """``nodes`` Slurm nodes (``node1``..``nodeN``) with KillWait ``kill_wait`` under ``workdir``.

    ``extra_config``: more slurm.conf lines (a plugin's files, such as
    job_submit.lua, go in ``workdir``, the directory of slurm.conf).
    ``schedule_interval_s``: the main scheduler's ``sched_interval`` (None:
    Slurm's 60 s), which is how late a job whose begin time has passed may
    start (the backfill scheduler's passes do not start one, measured).

    ``start()`` returns once every node is idle; ``env()`` is the
    environment for the Slurm and Torque commands; ``stop()`` ends the
    daemons by pid (SIGTERM, then SIGKILL) and may be called twice.
    """

    def __init__(self, workdir: str, nodes: int = 4, kill_wait: int = 5, extra_config: tuple[str, ...] = (),
                 schedule_interval_s: int | None = None):
        self.workdir = os.path.abspath(workdir)
        self.extra_config = extra_config
        self.schedule_interval_s = schedule_interval_s
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.kill_wait = kill_wait
        self.conf = os.path.join(self.workdir, "slurm.conf")
        self.log_dir = os.path.join(self.workdir, "log")
        self.munge_socket = os.path.join(self.workdir, "munge", "munge.socket")
        self.processes: dict[str, subprocess.Popen] = {}

    #: Where a test's service listens so that this cluster's nodes reach it (they share the host's network).
    service_host = "127.0.0.1"

    def provider_env(self) -> dict:
        """What a provider adds to its commands' environment to drive this cluster."""
        return {"SLURM_CONF": self.conf}

    def cancel(self, job_id: str) -> None:
        """Cancel a job of this cluster (a test's teardown)."""
        self.run(["scancel", job_id])

    def pilot_batch(self) -> dict:
        """The pilot config's [batch] options for this cluster (root's Slurm commands read this slurm.conf)."""
        return {"slurm_conf": self.conf}

    def env(self, base: dict | None = None) -> dict:
        """An environment in which sbatch, squeue, qsub, ... talk to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = self.conf
        return env

    # -- set-up -------------------------------------------------------------------------

    def _write_config(self) -> None:
        host = socket.gethostname().split(".")[0]
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        cpus = os.cpu_count() or 1
        w = self.workdir
        lines = [
            "ClusterName=workspace-pilot-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0"
            + (f",sched_interval={self.schedule_interval_s}" if self.schedule_interval_s else ""),
            f"KillWait={self.kill_wait}",
            f"StateSaveLocation={w}/state",
            f"SlurmdSpoolDir={w}/spool/%n",
            f"SlurmctldPidFile={w}/slurmctld.pid",
            f"SlurmdPidFile={w}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.log_dir}/slurmctld.log",
            f"SlurmdLogFile={self.log_dir}/slurmd-%n.log",
            f"PlugStackConfig={w}/plugstack.conf",
            *self.extra_config,
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(
                f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} RealMemory=1000"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        with open(self.conf, "w", encoding="ascii") as handle:
            handle.write("\n".join(lines) + "\n")
        with open(os.path.join(w, "plugstack.conf"), "w", encoding="ascii") as handle:
            handle.write(f"required {SPANK_PBS}\n")

    def _start(self, name: str, argv: list[str], **options) -> None:
        log = open(os.path.join(self.log_dir, f"{name}.out"), "ab")
        with log:
            self.processes[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env(), start_new_session=True, **options,
            )

    def _start_munge(self) -> None:
        munge_dir = os.path.dirname(self.munge_socket)
        os.makedirs(munge_dir)
        os.chmod(munge_dir, 0o755)  # munged wants the socket directory searchable by all
        key = os.path.join(munge_dir, "munge.key")
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        for path in (munge_dir, key):
            shutil.chown(path, "munge", "munge")
        # munged refuses to run as root; Popen's user= execs it directly, so the pid is munged's.
        self._start("munged", [
            "munged", "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={munge_dir}/munged.pid", f"--seed-file={munge_dir}/munged.seed",
            f"--log-file={munge_dir}/munged.log",
        ], user="munge", group="munge")
        self._wait(lambda: os.path.exists(self.munge_socket), 10, "munged", f"{munge_dir}/munged.log")

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        """Write the config, start munged, slurmctld and each slurmd; return once all nodes are idle."""
        missing = missing_commands()
        if missing:
            raise ClusterError(f"not installed: {', '.join(missing)} (run scripts/bootstrap.sh --slurm)")
        for sub in ("state", "spool", "log"):
            os.makedirs(os.path.join(self.workdir, sub), exist_ok=True)
        for name in self.nodes:
            os.makedirs(os.path.join(self.workdir, "spool", name), exist_ok=True)
        self._write_config()
        try:
            self._start_munge()
            self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf])
            for name in self.nodes:
                self._start(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", self.conf])
            self._wait(self._all_idle, timeout, "slurmd", self.log_dir)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, condition, timeout: float, what: str, log: str) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.02
        while not condition():
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise ClusterError(f"{name} exited with {process.returncode}; see {self.log_dir}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{what} not ready after {timeout:g} s; see {log}")
            time.sleep(delay)  # polling a daemon that has no readiness signal
            delay = min(delay * 2, 0.25)

    def _all_idle(self) -> bool:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env(), capture_output=True, text=True)
        if result.returncode != 0:
            return False
        states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
        return all(states.get(name) == "idle" for name in self.nodes)

    # -- use ------------------------------------------------------------------------------

    def run(self, argv: list[str], timeout: float = 30, **options) -> subprocess.CompletedProcess:
        """Run a Slurm or Torque command against this cluster (text output, not checked)."""
        return subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=timeout, **options)

    def queue(self) -> list[str]:
        """The ids of every job slurmctld still knows (any state)."""
        result = self.run(["squeue", "-h", "-o", "%i", "--states=all"])
        return result.stdout.split()

    def wait_empty(self, timeout: float = 30, only: set[str] | None = None) -> bool:
        """Wait until no job (of ``only``, if given) is pending or running; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.run(["squeue", "-h", "-o", "%i"])
            left = set(result.stdout.split())
            if result.returncode == 0 and not (left if only is None else left & only):
                return True
            time.sleep(0.2)  # squeue has no way to wait
        return False

    # -- tear-down -----------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what still runs, then stop each daemon by the pid we started (SIGTERM, then SIGKILL)."""
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            # Every user's jobs (the VM job tests' run as nobody): a job still running when slurmd goes leaves its
            # slurmstepd behind for good, in the job's cgroups where there are any.
            jobs = self.run(["squeue", "-h", "-o", "%i"], timeout=10).stdout.split()
            if jobs:
                self.run(["scancel", "--full", *jobs], timeout=10)
                deadline = time.monotonic() + self.kill_wait + timeout
                while self.run(["squeue", "-h", "-o", "%i"], timeout=10).stdout.split() and \
                        time.monotonic() < deadline:
                    time.sleep(0.2)  # squeue is the only word on a job's end here
        # slurmd before slurmctld before munged: each needs the next one to shut down quietly.
        order = [n for n in self.processes if n.startswith("slurmd")] + ["slurmctld", "munged"]
        stop_in_order(self.processes, order, timeout)


class ServiceOnCluster:
    """Store, receiver, pilot account and config, a provider on the test cluster, and a running lease manager."""

    def __init__(self, workdir, cluster, provider: str, *, padding_s: float = 120, queue_timeout_s: float = 60,
                 extra_directives: tuple = (), grace_s: float = 5, store_path: str | None = None, contact=None,
                 pilot_sections: dict | None = None, lost_after_s: float = 60, vm_overhead_mb: int = 64,
                 launcher: str = "auto", queue: str = "", warn_before_s: float = 0.0):
        self.workdir = workdir
        self.cluster = cluster
        self.provider_name = provider
        self.padding_s = padding_s
        self.queue_timeout_s = queue_timeout_s
        self.extra_directives = extra_directives
        self.grace_s = grace_s
        # The site key, and each node's key installed as on real nodes (one directory here: the
        # cluster's nodes share this machine's disk, so the pilot config names <dir>/{host}.key).
        self.site_key = new_site_key()
        self.node_key_dir = os.path.join(workdir, "node-keys")
        for node in cluster.nodes:
            provision_node_key(self.node_key_dir, self.site_key, node)
        self.store_path = store_path or os.path.join(workdir, "service.sqlite")
        self.log_dir = os.path.join(workdir, "logs")
        self.journal_dir = os.path.join(workdir, "journal")
        self.pilot_config = os.path.join(workdir, "pilot.conf")
        # The pilots run as root: what their squeue/qstat read comes from their config, never the job's environment.
        self.pilot_sections = {"timing": {"walltime_margin": WALLTIME_MARGIN_S}, "batch": cluster.pilot_batch(),
                               **(pilot_sections or {})}
        self.lost_after_s = lost_after_s
        self.launcher = launcher
        self.queue = queue
        self.warn_before_s = warn_before_s
        self.vm_overhead_mb = vm_overhead_mb
        self.open(contact)

    def open(self, contact=None) -> None:
        """Start (or start again) the service side over the same store file: what a restart does."""
        self.nodes = NodeAccounts(self.site_key, REALM)
        self.store = Store(self.store_path)
        self.board = CommandBoard()
        self.provider = self.provider_for(PILOT)
        self.catalog = ImageCatalog(self.store, keys_dir=os.path.join(self.workdir, "endorsers"),
                                    store_dir=os.path.join(self.workdir, "image-store"))
        app = make_app(self.store, DigestVerifier(REALM, self.nodes), board=self.board,
                       allocations=Allocations(self.provider))
        add_image_routes(app, self.catalog, operators=False)  # the pilots' image fetch (no operator API here)
        self.receiver = ReceiverThread(app, host=self.cluster.service_host, port=getattr(self, "port", 0))
        self.url = self.receiver.start()
        self.port = self.receiver.port
        if not os.path.exists(self.pilot_config):
            write_pilot_config(
                self.pilot_config, contact=contact or self.url,
                node_key_file=os.path.join(self.node_key_dir, "{host}.key"),
                log_dir=self.log_dir, journal_dir=self.journal_dir,
                sections=self.pilot_sections,
            )
        self.manager = LeaseManager(
            self.store, self.provider, contact=contact or self.url, pilot_config=self.pilot_config,
            grace_s=self.grace_s, queue_timeout_s=self.queue_timeout_s, release_grace_s=15,
            status_interval_s=0.5, board=self.board, lost_after_s=self.lost_after_s,
            warn_before_s=self.warn_before_s,
        )
        self.vms = VmManager(self.store, overhead_mb=self.vm_overhead_mb, catalog=self.catalog)
        self.manager.start()

    def provider_for(self, pilot_command: str):
        """A provider of this site's kind on the cluster whose job scripts run ``pilot_command``."""
        template = JobTemplate(
            pilot_command=pilot_command, sudo=SUDO, output_dir=os.path.join(self.workdir, "jobs"),
            walltime_padding_s=self.padding_s, extra_directives=self.extra_directives, launcher=self.launcher,
            queue=self.queue,
        )
        return make_provider(ProviderSettings(
            name=self.provider_name, template=template, env=self.cluster.provider_env(), command_timeout_s=20,
        ))

    def close(self) -> None:
        """Stop the service side; the pilots and their jobs go on (as when the service dies)."""
        self.manager.stop()
        self.receiver.stop()
        self.store.close()

    def wait(self, lease, states, timeout: float):
        """The lease once it is in one of ``states``; AssertionError naming where it is after ``timeout``."""
        found = self.manager.wait(lease.id, set(states), timeout)
        current = self.manager.get(lease.id)
        assert found is not None, f"lease {lease.id} is {current.state} ({current.reason}), not {states}"
        return found

    def pilot_states(self, lease) -> dict[str, list[str]]:
        """Each host's notified states, in order."""
        seen: dict[str, list[str]] = {}
        for host, _seq, state, _code in self.store.notifications(lease.slot):
            seen.setdefault(host, []).append(state)
        return seen

    def pilot_log(self, lease, host: str) -> str:
        """The pilot's own log file of ``host`` for the lease."""
        with open(os.path.join(self.log_dir, f"{lease.slot}.{host}.log"), encoding="utf-8") as handle:
            return handle.read()


def close_sites(sites: list, cluster, *, only_theirs: bool = False) -> None:
    """A test's teardown: cancel every job of its sites' leases, close the sites, and see the queue empty
    (``only_theirs``: of their jobs, where another fixture's job may still wait)."""
    jobs = set()
    for site in sites:
        try:
            for lease in site.manager.list():
                if lease.job_id:
                    jobs.add(lease.job_id)
                    cluster.cancel(lease.job_id)
        finally:
            site.close()
    assert (cluster.wait_empty(30, only=jobs) if only_theirs else cluster.wait_empty(30)), "a job outlived its test"
