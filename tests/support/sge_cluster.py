"""A real multi-host Son of Grid Engine on one machine, for the tests (docs/gridengine.md has the why).

Debian's gridengine packages cannot be installed beside slurm-wlm-torque
(both ship /usr/bin/qsub), so scripts/unpack-gridengine.sh unpacks them into
.cache/gridengine/root and every Grid Engine process here runs in a mount
namespace where that tree lies over /usr (a read-only overlayfs; its
binaries look for plug-ins in /usr/lib/gridengine) and a hosts file of the
cluster's own lies over /etc/hosts. Each host has its network namespace
(``<prefix>0`` the qmaster's, with a bridge; ``<prefix>N`` execution host
``sgenodeN``, a veth on the bridge) and its UTS namespace with its own name,
so ``sge_execd`` runs once per host on its standard port and Grid Engine's
strict host-name checks see real, distinct hosts. Traffic stays inside
these namespaces, but for one veth whose other end is in this machine's
namespace (``service_host``), where a test's service listens for the pilots. Commands (qsub, qstat, ...) run in the qmaster's
namespaces: :meth:`SgeCluster.run`, or the wrappers of :meth:`command_dir`.

Every daemon is started and stopped by the pid this module got for it
(``ip netns exec``, ``unshare``, ``nsenter`` and the scripts all exec, so the
pid is the daemon's); the namespaces are deleted by name at the end.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import time

from service_adapter.children import stop_in_order

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRIDENGINE = os.path.join(REPO, ".cache", "gridengine", "root")
BIN = "/usr/lib/gridengine"  # where the binaries are, inside the namespaces (and where they look for plug-ins)
QMASTER_PORT = 6444
EXECD_PORT = 6445
MASTER = "sgemaster"


class SgeError(RuntimeError):
    """The cluster could not be set up or did not answer."""


def missing() -> list[str]:
    """What this machine lacks to run the cluster (empty when it can)."""
    lacking = []
    if os.geteuid() != 0:
        lacking.append("root")
    if not os.path.isfile(os.path.join(GRIDENGINE, "usr/lib/gridengine/sge_qmaster")):
        lacking.append(".cache/gridengine (scripts/bootstrap.sh --sge)")
    for command in ("ip", "unshare", "nsenter"):
        if shutil.which(command) is None:
            lacking.append(command)
    return lacking


_NAMESPACES_SH = """#!/bin/sh
# namespaces.sh HOSTNAME COMMAND...: in fresh mount and UTS namespaces, the unpacked Grid Engine over /usr and
# the cluster's hosts file over /etc/hosts, then COMMAND as host HOSTNAME.
set -e
hostname "$1"
shift
mount -t overlay overlay -o lowerdir={gridengine}/usr:/usr /usr
mount --bind {hosts} /etc/hosts
exec "$@"
"""

_QUEUE = """qname all.q
hostlist {hosts}
seq_no 0
load_thresholds NONE
suspend_thresholds NONE
nsuspend 1
suspend_interval 00:05:00
priority 0
min_cpu_interval 00:05:00
processors UNDEFINED
qtype BATCH INTERACTIVE
ckpt_list NONE
pe_list workspace-pilot
rerun FALSE
slots {slots}
tmpdir /tmp
shell /bin/sh
prolog NONE
epilog NONE
shell_start_mode unix_behavior
starter_method NONE
suspend_method NONE
resume_method NONE
terminate_method NONE
notify 00:00:05
owner_list NONE
user_lists NONE
xuser_lists NONE
subordinate_list NONE
complex_values NONE
projects NONE
xprojects NONE
calendar NONE
initial_state default
s_rt INFINITY
h_rt INFINITY
s_cpu INFINITY
h_cpu INFINITY
s_fsize INFINITY
h_fsize INFINITY
s_data INFINITY
h_data INFINITY
s_stack INFINITY
h_stack INFINITY
s_core INFINITY
h_core INFINITY
s_rss INFINITY
h_rss INFINITY
s_vmem INFINITY
h_vmem INFINITY
"""

#: One slot per host: a pilot job of N nodes asks for ``-pe workspace-pilot N``.
_PE = """pe_name workspace-pilot
slots 9999
user_lists NONE
xuser_lists NONE
start_proc_args NONE
stop_proc_args NONE
allocation_rule 1
control_slaves TRUE
job_is_first_task FALSE
urgency_slots min
accounting_summary FALSE
qsort_args NONE
"""

_EXEC_HOST = """hostname {host}
load_scaling NONE
complex_values NONE
user_lists NONE
xuser_lists NONE
projects NONE
xprojects NONE
usage_scaling NONE
report_variables NONE
"""


class SgeCluster:
    """A qmaster and ``nodes`` execution hosts (``sgenode1``..) under ``workdir``, each host in its namespaces.

    ``start()`` returns once every execution host reports load; ``stop()``
    ends the daemons by pid and deletes the namespaces (it may be called twice).
    """

    def __init__(self, workdir: str, nodes: int = 2, slots: int = 2):
        self.workdir = os.path.abspath(workdir)
        self.nodes = [f"sgenode{i}" for i in range(1, nodes + 1)]
        self.slots = slots
        self.prefix = "wpsge" + secrets.token_hex(3)  # two clusters (two test runs) never share a namespace
        # The hosts' network; the test's own end of it (service_host) is in this machine's namespace, so two
        # clusters at once must not share it.
        self.subnet = f"10.{secrets.randbelow(50) + 200}.{secrets.randbelow(250)}"
        self.root = os.path.join(self.workdir, "sge-root")  # SGE_ROOT
        self.hosts_file = os.path.join(self.workdir, "hosts")
        self.namespaces_sh = os.path.join(self.workdir, "namespaces.sh")
        self.processes: dict[str, subprocess.Popen] = {}
        self.netns: list[str] = []

    # -- environment ---------------------------------------------------------------------

    @property
    def service_host(self) -> str:
        """The address a test's service listens on for the hosts: this machine's end of a veth on their bridge."""
        return f"{self.subnet}.254"

    def provider_env(self) -> dict[str, str]:
        """What a provider adds to its commands' environment to drive this cluster (its command wrappers first)."""
        return {"PATH": f"{self.command_dir()}:{os.environ.get('PATH', '/usr/bin:/bin')}"}

    def pilot_batch(self) -> dict[str, object]:
        """The pilot config's [batch] options for this cluster (root's qstat, run on an execution host, reads
        this SGE_ROOT and cell and asks the qmaster on this port)."""
        return {"sge_root": self.root, "sge_cell": "default", "sge_qmaster_port": QMASTER_PORT}

    def cancel(self, job_id: str) -> None:
        """Delete a job of this cluster (a test's teardown)."""
        self.run(["qdel", "-f", job_id])

    def wait_empty(self, timeout: float = 30) -> bool:
        """Wait until the qmaster holds no job; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.run(["qstat", "-u", "*"], timeout=10)
            if result.returncode == 0 and not result.stdout.strip():
                return True
            time.sleep(0.2)  # qstat has no way to wait
        return False

    def env(self) -> dict[str, str]:
        """Grid Engine's environment for the cluster's commands."""
        return {"SGE_ROOT": self.root, "SGE_CELL": "default", "SGE_QMASTER_PORT": str(QMASTER_PORT),
                "SGE_EXECD_PORT": str(EXECD_PORT), "PATH": f"{BIN}:/usr/bin:/bin:/usr/sbin:/sbin"}

    def _enter(self) -> list[str]:
        """The argv prefix that runs a command in the qmaster's namespaces (as a client on its host)."""
        master = self.processes.get("qmaster")
        if master is None or master.poll() is not None:
            raise SgeError("the qmaster is not running")
        environment = [f"{k}={v}" for k, v in self.env().items()]
        return ["nsenter", "-t", str(master.pid), "-m", "-n", "-u", "--", "env", *environment]

    def run(self, argv: list[str], timeout: float = 30, **options) -> subprocess.CompletedProcess:
        """Run a Grid Engine command (qsub, qstat, qconf, ...) as a client on the qmaster's host."""
        return subprocess.run([*self._enter(), *argv], capture_output=True, text=True, timeout=timeout, **options)

    def command_dir(self) -> str:
        """A directory of ``qsub``, ``qdel``, ``qstat``, ``qacct``, ``qconf`` and ``qalter`` scripts that run the
        real ones in this cluster (for a provider configured with its commands' directory)."""
        directory = os.path.join(self.workdir, "bin")
        os.makedirs(directory, exist_ok=True)
        for name in ("qsub", "qdel", "qstat", "qacct", "qconf", "qalter", "qhost"):
            path = os.path.join(directory, name)
            with open(path, "w", encoding="ascii") as handle:
                handle.write(f"#!/bin/sh\nexec {shlex.join(self._enter())} {BIN}/{name} \"$@\"\n")
            os.chmod(path, 0o755)
        return directory

    # -- set-up --------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> "SgeCluster":
        """Namespaces, spool, qmaster, configuration, execution daemons; returns once all hosts report."""
        lacking = missing()
        if lacking:
            raise SgeError(f"cannot run Grid Engine here: missing {', '.join(lacking)}")
        try:
            self._network()
            self._layout()
            self._in_master(["sh", "-c", self._spool_init()], check=True)
            self._start_qmaster(timeout)
            self._configure()
            for index, node in enumerate(self.nodes, 1):
                self._start_execd(index, node)
            self._wait(self._all_hosts_report, timeout, "execution hosts reporting load")
        except BaseException:
            self.stop()
            raise
        return self

    def _ip(self, *args: str) -> None:
        result = subprocess.run(["ip", *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise SgeError(f"ip {' '.join(args)}: {result.stderr.strip()}")

    def _network(self) -> None:
        master_ns = f"{self.prefix}0"
        self._ip("netns", "add", master_ns)
        self.netns.append(master_ns)
        self._ip("-n", master_ns, "link", "set", "lo", "up")
        self._ip("-n", master_ns, "link", "add", "br0", "type", "bridge")
        self._ip("-n", master_ns, "addr", "add", f"{self.subnet}.1/24", "dev", "br0")
        self._ip("-n", master_ns, "link", "set", "br0", "up")
        # This machine's end: a test's service listens on it (deleting the namespace deletes the pair).
        self._ip("link", "add", f"{self.prefix}h", "type", "veth", "peer", "name", "svc", "netns", master_ns)
        self._ip("-n", master_ns, "link", "set", "svc", "master", "br0", "up")
        self._ip("addr", "add", f"{self.service_host}/24", "dev", f"{self.prefix}h")
        self._ip("link", "set", f"{self.prefix}h", "up")
        for index in range(1, len(self.nodes) + 1):
            node_ns = f"{self.prefix}{index}"
            self._ip("netns", "add", node_ns)
            self.netns.append(node_ns)
            self._ip("-n", master_ns, "link", "add", f"v{index}", "type", "veth", "peer", "name", "eth0",
                     "netns", node_ns)
            self._ip("-n", master_ns, "link", "set", f"v{index}", "master", "br0", "up")
            self._ip("-n", node_ns, "addr", "add", f"{self.subnet}.{10 + index}/24", "dev", "eth0")
            self._ip("-n", node_ns, "link", "set", "eth0", "up")
            self._ip("-n", node_ns, "link", "set", "lo", "up")

    def _layout(self) -> None:
        with open(self.hosts_file, "w", encoding="ascii") as handle:
            handle.write(f"127.0.0.1 localhost\n{self.subnet}.1 {MASTER}\n")
            handle.writelines(f"{self.subnet}.{10 + i} {node}\n" for i, node in enumerate(self.nodes, 1))
        with open(self.namespaces_sh, "w", encoding="ascii") as handle:
            handle.write(_NAMESPACES_SH.format(gridengine=GRIDENGINE, hosts=self.hosts_file))
        os.chmod(self.namespaces_sh, 0o755)
        root = self.root
        for sub in ("bin", "lib", "utilbin"):
            os.makedirs(os.path.join(root, sub))
            os.symlink(BIN, os.path.join(root, sub, "lx-amd64"))
        os.symlink("/usr/share/gridengine/util", os.path.join(root, "util"))
        common = os.path.join(root, "default", "common")
        os.makedirs(common)
        for sub in ("spool/qmaster/job_scripts", "spool/spooldb", "spool/execd"):
            os.makedirs(os.path.join(root, sub))
        with open(os.path.join(common, "bootstrap"), "w", encoding="ascii") as handle:
            handle.write(
                "Version: 6.2\nadmin_user root\ndefault_domain none\nignore_fqdn true\n"
                f"spooling_method berkeleydb\nspooling_lib libspoolb\nspooling_params {root}/spool/spooldb\n"
                f"binary_path {BIN}\nqmaster_spool_dir {root}/spool/qmaster\nsecurity_mode none\n"
                "listener_threads 2\nworker_threads 2\nscheduler_threads 1\n"
            )
        for name, text in (("act_qmaster", MASTER), ("cluster_name", self.prefix)):
            with open(os.path.join(common, name), "w", encoding="ascii") as handle:
                handle.write(text + "\n")
        with open(os.path.join(GRIDENGINE, "usr/share/gridengine/default-configuration"), encoding="ascii") as src:
            configuration = src.read()
        configuration = configuration.replace("/var/spool/gridengine", f"{root}/spool")
        for option, value in (("min_uid", "0"), ("min_gid", "0"), ("load_report_time", "00:00:02"),
                              ("max_unheard", "00:00:30"), ("reschedule_unknown", "00:00:00"),
                              # qacct reads the accounting file: written within a second of a job's end.
                              ("reporting_params", "accounting=true reporting=false flush_time=00:00:01 "
                                                   "joblog=false sharelog=00:00:00 accounting_flush_time=00:00:00")):
            configuration = _set_option(configuration, option, value)
        with open(os.path.join(root, "configuration"), "w", encoding="ascii") as handle:
            handle.write(configuration)

    def _spool_init(self) -> str:
        """The shell commands that make a fresh spool (as the Debian package's init_cluster does)."""
        resources = "/usr/share/gridengine/util/resources"
        steps = [
            f"{BIN}/spoolinit berkeleydb libspoolb {self.root}/spool/spooldb init",
            f"{BIN}/spooldefaults configuration {self.root}/configuration",
            f"{BIN}/spooldefaults complexes {resources}/centry",
            f"{BIN}/spooldefaults usersets {resources}/usersets",
            f"{BIN}/spooldefaults managers root",
            f"{BIN}/spooldefaults adminhosts {MASTER}",
        ]
        return "set -e; " + "; ".join(steps)

    def _namespaced(self, netns: str, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", netns, "unshare", "--mount", "--uts", "--propagation", "private",
                self.namespaces_sh, host, "env", *[f"{k}={v}" for k, v in self.env().items()], *argv]

    def _in_master(self, argv: list[str], check: bool = False) -> subprocess.CompletedProcess:
        """Run ``argv`` once in fresh namespaces on the master's network (before the qmaster runs)."""
        result = subprocess.run(self._namespaced(f"{self.prefix}0", MASTER, argv), capture_output=True, text=True,
                                timeout=60)
        if check and result.returncode != 0:
            raise SgeError(f"{argv}: {result.stdout.strip()} {result.stderr.strip()}")
        return result

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(os.path.join(self.workdir, f"{name}.out"), "ab")
        with log:
            self.processes[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                                    stderr=subprocess.STDOUT, start_new_session=True)

    def _start_qmaster(self, timeout: float) -> None:
        # SGE_ND: no daemonizing, so the pid Popen has is the qmaster's.
        self._spawn("qmaster", self._namespaced(f"{self.prefix}0", MASTER, ["SGE_ND=1", f"{BIN}/sge_qmaster"]))
        self._wait(lambda: self.run(["qconf", "-sh"], timeout=10).returncode == 0, timeout, "the qmaster")

    def _configure(self) -> None:
        def load(option: str, text: str, name: str) -> None:
            path = os.path.join(self.workdir, name)
            with open(path, "w", encoding="ascii") as handle:
                handle.write(text)
            result = self.run(["qconf", option, path])
            if result.returncode != 0:
                raise SgeError(f"qconf {option} {name}: {result.stdout.strip()} {result.stderr.strip()}")

        scheduler = self.run(["qconf", "-ssconf"]).stdout
        for option, value in (("schedule_interval", "0:0:1"), ("flush_submit_sec", "1"), ("flush_finish_sec", "1")):
            scheduler = _set_option(scheduler, option, value)
        load("-Msconf", scheduler, "scheduler")
        for host in (MASTER, *self.nodes):
            if host != MASTER:
                load("-Ae", _EXEC_HOST.format(host=host), host)
            result = self.run(["qconf", "-as", host])
            if result.returncode != 0:
                raise SgeError(f"qconf -as {host}: {result.stderr.strip()}")
        load("-Ap", _PE, "workspace-pilot")
        load("-Aq", _QUEUE.format(hosts=" ".join(self.nodes), slots=self.slots), "all.q")

    def _start_execd(self, index: int, node: str) -> None:
        master = self.processes["qmaster"].pid
        environment = [f"{k}={v}" for k, v in self.env().items()]
        # The qmaster's mount namespace (the overlay, the hosts file), the host's own network, its own name.
        argv = ["nsenter", "-t", str(master), "-m", f"--net=/run/netns/{self.prefix}{index}", "--",
                "unshare", "--uts", "--", "sh", "-c", f'hostname {node} && exec "$@"', "sh",
                "env", *environment, "SGE_ND=1", f"{BIN}/sge_execd"]
        self._spawn(f"execd-{node}", argv)

    def _all_hosts_report(self) -> bool:
        result = self.run(["qhost"], timeout=10)
        if result.returncode != 0:
            return False
        loads = {line.split()[0]: line.split()[6] for line in result.stdout.splitlines()[3:] if line.strip()}
        return all(loads.get(node, "-") != "-" for node in self.nodes)

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.05
        while not condition():
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise SgeError(f"{name} exited with {process.returncode}; see {self.workdir}/{name}.out")
            if time.monotonic() > deadline:
                raise SgeError(f"{what}: not ready after {timeout:g} s; see {self.workdir}")
            time.sleep(delay)  # the daemons have no readiness signal
            delay = min(delay * 2, 0.5)

    # -- tear-down -----------------------------------------------------------------------

    def stop(self, timeout: float = 20.0) -> None:
        """Delete what still runs, stop each daemon by its pid (SIGTERM, then SIGKILL), delete the namespaces."""
        master = self.processes.get("qmaster")
        if master is not None and master.poll() is None:
            self.run(["qdel", "-f", "-u", "*"], timeout=20)
        order = [n for n in self.processes if n.startswith("execd")] + ["qmaster"]
        stop_in_order(self.processes, order, timeout)
        for netns in reversed(self.netns):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        self.netns.clear()


def _set_option(text: str, option: str, value: str) -> str:
    """Grid Engine's ``name value`` configuration text with ``option`` set to ``value``."""
    lines = [f"{option} {value}" if line.split()[:1] == [option] else line for line in text.splitlines()]
    return "\n".join(lines) + "\n"
