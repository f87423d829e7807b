"""``workspace-vmjob``: run a batch job's command inside a VM of its own (docs/vmjobs.md).

Run by the job as its user; the wrapper re-runs itself through one sudo
rule (``sudo -n``), since VMs, the node's memory and its journal are root's.
What the user can choose stays the user's: the command runs in the guest,
the job's directory is shared by a daemon running as the user, the script is
read as the user before sudo, the cores and memory are bounded by what the
batch system gave the job on this node.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time

from workspace_common.cli import OneLineParser, WrappingFormatter, positive
from pilot.vmjob.exitcodes import EXITS, VmJobExit

PROG = "workspace-vmjob"
log = logging.getLogger("pilot.vmjob")

EXIT_CODES_HELP = EXITS.help()


def build_parser() -> argparse.ArgumentParser:
    """The command line, every option explained in ``--help``."""
    parser = OneLineParser(
        prog=PROG,
        description=(
            "Run a batch job's command inside a fresh VM of an image the site approved, on the node the "
            "batch system chose, with the job's cores and memory; the command's output and exit status "
            "come back to the batch system. Run it inside the job as its user: it goes through one sudo "
            "rule for the root part (see docs/vmjobs.md)."
        ),
        epilog=EXIT_CODES_HELP, formatter_class=WrappingFormatter,
    )
    from workspace_common import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser)
    run = commands.add_parser(
        "run", help="run COMMAND (or a script) in a VM of IMAGE; exit with its status",
        description=(
            "Start a VM of IMAGE, run COMMAND in it in the job's working directory (shared into the VM "
            "with virtiofs), copy its stdout and stderr to this command's as they come, destroy the VM "
            "and exit with the command's status. SIGTERM (scancel, qdel, the walltime) gives the guest "
            "[vmjob] stop_timeout seconds to power off, then destroys the VM. Every change to the node "
            "is journalled first; a wrapper killed outright is cleaned up by 'workspace-vmjob epilog', "
            "the next pilot or workspace-killall."
        ),
        epilog=EXIT_CODES_HELP, formatter_class=WrappingFormatter,
    )
    run.add_argument("--image", required=True, metavar="NAME",
                     help="the image to boot, by its name on the node's list ('workspace-vmjob images')")
    run.add_argument("--memory", type=positive(int, "a whole number"), metavar="MB",
                     help="the VM's memory (default: what the batch job has on this node, else [vmjob] "
                          "default_memory); at most that")
    run.add_argument("--cpus", type=positive(int, "a whole number"), metavar="N",
                     help="the VM's cores (default: the job's cores on this node; 1 outside a batch job); at most that")
    run.add_argument("--workdir", metavar="DIR",
                     help="the directory shared with the guest as its working directory (default: the current one)")
    run.add_argument("--script", metavar="FILE",
                     help="run this script in the guest instead of COMMAND ('-': read it from stdin); it is "
                          "read as the calling user")
    run.add_argument("--config", metavar="FILE",
                     help="configuration file (default /etc/workspace-pilot/pilot.conf); refused through sudo")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                     help="the command and its arguments, run by the guest's shell in the working directory")
    images = commands.add_parser(
        "images", help="list the images VM jobs may ask for on this node",
        description="List the images on this node's list ([vmjob] images), with their files. Changes nothing.",
        formatter_class=WrappingFormatter,
    )
    images.add_argument("--config", metavar="FILE", help="configuration file (default /etc/workspace-pilot/pilot.conf)")
    epilog = commands.add_parser(
        "epilog", help="after a batch job: clean up what its VM jobs left on this node (root)",
        description=(
            "Undo what a batch job's VM jobs left on this node: a wrapper still running gets SIGTERM (then "
            "SIGKILL), then the job's journal entries are undone (VMs destroyed by tag, run directories "
            "removed, memory given back). Run as root by the batch system's epilog "
            "(packaging/slurm/epilog). Exits 0 when the node is clean, 118 when something could not be undone "
            "(the batch system should then drain the node)."
        ),
        epilog=EXIT_CODES_HELP, formatter_class=WrappingFormatter,
    )
    epilog.add_argument("--job", metavar="ID", help="the batch job's id (default: $SLURM_JOB_ID, else $PBS_JOBID)")
    epilog.add_argument("--config", metavar="FILE", help="configuration file (default /etc/workspace-pilot/pilot.conf)")
    return parser


def _fail(code: VmJobExit, message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``workspace-vmjob``; the command's status or a :class:`VmJobExit`."""
    started = time.monotonic()
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse's own usage errors exit 2, a code a command could use too: the wrapper's is USAGE.
        return VmJobExit.USAGE if exc.code not in (0, None) else 0
    if args.command == "images":
        return _images(args)
    if args.command == "epilog":
        return _epilog(args)
    return _run(args, argv, started)


# -- run -----------------------------------------------------------------------------------------


def _command_file(args) -> bytes | None:
    """The file the guest executes: the script, or COMMAND as one shell line; None if neither was given."""
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if args.script is not None:
        if command:
            return None
        if args.script == "-":
            text = sys.stdin.buffer.read()
        else:
            with open(args.script, "rb") as handle:
                text = handle.read()
        return text if text.startswith(b"#!") else b"#!/bin/sh\n" + text
    if not command:
        return None
    return b"#!/bin/sh\n" + shlex.join(command).encode() + b"\n"


def _through_sudo(argv: list[str], command: bytes) -> int:
    """Re-run this command as root through the sudo rule, the command file on stdin (read as the user)."""
    self_path = shutil.which(sys.argv[0]) or sys.argv[0]
    carrier = tempfile.TemporaryFile()
    carrier.write(command)
    carrier.seek(0)
    os.dup2(carrier.fileno(), 0)
    passed = _without_script(argv)
    del passed[passed.index("run")]  # the subcommand: no option before it takes a value
    # The script (or COMMAND) travels as a file on stdin: root never opens a path the user named.
    root_argv = ["sudo", "-n", os.path.abspath(self_path), "run", "--script", "-", *passed]
    try:
        os.execvp("sudo", root_argv)
    except OSError as exc:
        return _fail(VmJobExit.USAGE, f"cannot run sudo ({exc.strerror}); {PROG} needs root or its sudo rule")


def _without_script(argv: list[str]) -> list[str]:
    """``argv`` up to its COMMAND, without --script (and its value)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--":
            break
        if arg == "--script":
            skip = True
            continue
        if arg.startswith("--script="):
            continue
        out.append(arg)
    return out


def _caller() -> tuple[int, int]:
    """Who asked: sudo's caller (SUDO_UID/GID, which sudo sets) or this process's user."""
    if os.environ.get("SUDO_UID", "").isdigit() and os.environ.get("SUDO_GID", "").isdigit():
        return int(os.environ["SUDO_UID"]), int(os.environ["SUDO_GID"])
    return os.getuid(), os.getgid()


def _run(args, argv: list[str], started: float) -> int:
    try:
        command = _command_file(args)
    except OSError as exc:
        return _fail(VmJobExit.USAGE, f"--script {args.script}: {exc.strerror}")
    if command is None:
        return _fail(VmJobExit.USAGE, "give a COMMAND after '--', or --script FILE, not both (see --help)")
    if os.geteuid() != 0:
        return _through_sudo(argv, command)
    uid, gid = _caller()
    from pilot.config import DEFAULT_PATH

    if uid != 0 and args.config not in (None, DEFAULT_PATH):
        # The user must not choose what root reads as its configuration (the image list, the directories).
        return _fail(VmJobExit.USAGE, f"--config is refused through sudo; {PROG} reads {DEFAULT_PATH}")
    if uid != 0 and args.script not in (None, "-"):
        return _fail(VmJobExit.USAGE, "--script FILE is read as the user, before sudo: run it as yourself")
    loaded = _load_config_and_images(args.config)
    if isinstance(loaded, int):
        return loaded
    config, catalog = loaded
    image = catalog.get(args.image)
    if image is None:
        known = ", ".join(sorted(catalog)) or "none"
        return _fail(VmJobExit.IMAGE, f"image {args.image!r} is not on this node's list (known: {known})")
    sizing = _size(args, config, uid)
    if isinstance(sizing, int):
        return sizing
    slot, host, memory_mb, cpus, job_id, kill_wait_s = sizing
    workdir = os.path.abspath(args.workdir or os.getcwd())
    if not os.path.isdir(workdir):
        return _fail(VmJobExit.USAGE, f"working directory {workdir}: not a directory")
    from pilot.vmjob.runner import JobRequest

    request = JobRequest(slot, host, image, command, workdir, uid, gid, memory_mb, cpus, job_id, kill_wait_s)
    return _run_job(config, request, started)


def _load_config(path):
    from pilot.config import load_node_tool_config

    config = load_node_tool_config(PROG, path)
    return VmJobExit.CONFIG if config is None else config


def _load_config_and_images(path):
    """(the node's configuration, its image list), or CONFIG after one line per problem."""
    from workspace_common.ini import ConfigError
    from pilot.vmjob.catalog import load_catalog

    config = _load_config(path)
    if isinstance(config, int):
        return config
    try:
        return config, load_catalog(config.vmjob_images)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{PROG}: image list: {problem}", file=sys.stderr)
        return VmJobExit.CONFIG


def _size(args, config, uid: int):
    """(slot, host, memory MB, cores, job id or None, Slurm's KillWait or None) from the batch job's allocation,
    or an exit code after one line."""
    from pilot.vmjob.allocation import AllocationError, SlurmAllocations

    from pilot.batchenv import JobVariableError, job_variables

    try:
        job = job_variables(os.environ)  # only the job's identity comes from the caller, checked
    except JobVariableError as exc:
        return _fail(VmJobExit.USAGE, str(exc))
    allocations = SlurmAllocations(config.batch_client, timeout_s=config.lrm_query_timeout_s)
    in_slurm = "SLURM_JOB_ID" in job
    try:
        node = allocations.local_node(job.get("SLURMD_NODENAME")) if in_slurm else None
        job_id = allocations.job_of(os.getpid()) if allocations.scontrol else None
        allocation = allocations.allocation(job_id, node) if job_id else None
    except AllocationError as exc:
        return _fail(VmJobExit.ALLOCATION, str(exc))
    if allocation is None and in_slurm:
        return _fail(VmJobExit.ALLOCATION, "$SLURM_JOB_ID is set, but this node's slurmd knows no job of this process")
    if allocation is None:
        if uid != 0:
            return _fail(VmJobExit.ALLOCATION, "not inside a batch job: run it in a job's script (or as root)")
        host = os.uname().nodename.split(".")[0]
        return f"vmjob{os.getpid()}", host, args.memory or config.vmjob_default_memory_mb, args.cpus or 1, None, None
    if uid not in (0, allocation.uid):
        return _fail(VmJobExit.ALLOCATION, f"job {allocation.job_id} belongs to uid {allocation.uid}, not to you")
    memory_cap = allocation.memory_mb or config.vmjob_default_memory_mb
    memory = args.memory or memory_cap
    if memory > memory_cap:
        said = (f"job {allocation.job_id} has {memory_cap} MB on {allocation.node}" if allocation.memory_mb else
                f"job {allocation.job_id} asked for no memory: at most [vmjob] default_memory, {memory_cap} MB")
        return _fail(VmJobExit.ALLOCATION, f"--memory {memory}: {said}")
    cpus = args.cpus or allocation.cpus
    if cpus > allocation.cpus:
        return _fail(VmJobExit.ALLOCATION,
                     f"--cpus {cpus}: job {allocation.job_id} has {allocation.cpus} on {allocation.node}")
    slot = f"job{allocation.job_id}.{allocation.node}"[:64]
    try:
        kill_wait_s = allocations.kill_wait_s()
    except AllocationError:
        kill_wait_s = None  # the guest then gets the whole stop_timeout
    return slot, allocation.node, memory, cpus, allocation.job_id, kill_wait_s


def _setup_logging(config, slot: str) -> str:
    """Log to ``<log_dir>/vmjob-<slot>.log`` (kept after the job), warnings also on stderr."""
    os.makedirs(config.log_dir, mode=0o755, exist_ok=True)
    path = os.path.join(config.log_dir, f"vmjob-{slot}.log")
    from pilot.nodelog import log_handler

    handler = log_handler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.setLevel(config.log_level.upper())
    root.addHandler(handler)
    return path


def _run_job(config, request, started: float) -> int:
    from pilot.node.backends import BackendError, backend_from_config
    from pilot.node.journal import Journal, JournalError
    from pilot.vmjob.runner import JobFailed, VmJob

    try:
        backend = backend_from_config(config)
    except BackendError as exc:
        return _fail(VmJobExit.CONFIG, f"[memory] backend = {config.backend}: {exc}")
    journal = Journal(config.journal_dir, config.lock_timeout_s)
    try:
        journal.prepare()
    except JournalError as exc:
        return _fail(VmJobExit.JOURNAL, f"{exc}; nothing changed")
    try:
        log_path = _setup_logging(config, request.slot)
    except OSError as exc:
        return _fail(VmJobExit.CONFIG, f"log directory {config.log_dir}: {exc.strerror}")
    from pilot.wakeup import Wakeup, ignore_job_control, wake_on_signals

    # Not a threading.Event: a handler that runs while the main loop is inside the Event's wait would wait for
    # the lock that wait holds, for ever, with the VM and its memory held (seen: a wrapper hung in a futex).
    stop = Wakeup()
    received: list[int] = []
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def on_signal(signum, _frame):
        for other in stops:
            # Once is enough; a storm of them (its caller's, relayed by sudo) would nest handlers without end.
            signal.signal(other, signal.SIG_IGN)
        received.append(signum)
        stop.set()

    for signum in stops:
        signal.signal(signum, on_signal)
    wake_on_signals()

    ignore_job_control()  # the caller's SIGTSTP, relayed by sudo, must not stop root holding the node
    log.info("VM job %s: image %s, %d MB, %d cores, workdir %s, uid %d; log %s", request.slot,
             request.image.name, request.memory_mb, request.cpus, request.workdir, request.uid, log_path)
    job = VmJob(config, journal, backend, request, stop=stop, started=started)
    try:
        status = job.run()
    except JobFailed as exc:
        log.error("%s", exc)
        if received and exc.code != VmJobExit.RESTORE_FAILED:
            # Whatever phase the signal cut short, the job was stopped, and the node is as it was.
            print(f"{PROG}: stopped by {signal.Signals(received[0]).name}: no VM left, the node restored",
                  file=sys.stderr)
            return 128 + received[0]
        return _fail(exc.code, str(exc))
    except Exception:
        log.exception("internal error")
        return _fail(VmJobExit.INTERNAL, f"internal error; see {log_path}")
    finally:
        backend.close()
    log.info("VM job %s: the command exited with %d", request.slot, status)
    return status


# -- images, epilog ------------------------------------------------------------------------------


def _images(args) -> int:
    loaded = _load_config_and_images(args.config)
    if isinstance(loaded, int):
        return loaded
    _config, catalog = loaded
    for name, image in sorted(catalog.items()):
        files = ", ".join(f"{part} {f.path}" for part, f in (("disk", image.disk), ("kernel", image.kernel),
                                                              ("initrd", image.initrd)) if f is not None)
        print(f"{name}: {files}")
    return 0


def _epilog(args) -> int:
    if os.geteuid() != 0 or _caller()[0] != 0:
        return _fail(VmJobExit.USAGE, "epilog is for root (the batch system's epilog), not through sudo")
    job = args.job or os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID")
    if not job or not job.replace(".", "").replace("-", "").isalnum():
        return _fail(VmJobExit.USAGE, "no job id: pass --job ID (or run it with $SLURM_JOB_ID set)")
    job = job.split(".")[0]  # PBS: 123.server
    config = _load_config(args.config)
    if isinstance(config, int):
        return config
    from pilot.vmjob.epilog import clean_job

    problems = clean_job(config, job, out=sys.stdout)
    for problem in problems:
        print(f"{PROG}: {problem}", file=sys.stderr)
    return VmJobExit.RESTORE_FAILED if problems else 0
