"""``workspace-pilot``: the command the batch job runs on each node (as root)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import time

from pilot.exitcodes import EXITS, ExitCode
from workspace_common.cli import OneLineParser, WrappingFormatter, http_url, positive

log = logging.getLogger("pilot")

_SLOT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")

EXIT_CODES_HELP = EXITS.help()


def _slot(text: str) -> str:
    if not _SLOT_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a slot id (letters, digits, . _ -; at most 64)")
    return text


def _host(text: str) -> str:
    if not _HOST_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name")
    return text


def _add_logging_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--verbose", action="store_true", help="log debug lines too (console and log file)")
    group.add_argument("--quiet", action="store_true", help="print only warnings and errors on the console")
    parser.add_argument(
        "--stdout", action="store_true",
        help="print log lines on stdout instead of stderr (the log file gets them either way)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface, with every option explained in ``--help``."""
    parser = OneLineParser(
        prog="workspace-pilot",
        description=(
            "Lease this node's memory to a workspace service for a while, then give it back. "
            "Run by the batch job on each node, as root (through one sudo rule: see 'evaluate')."
        ),
        epilog=EXIT_CODES_HELP,
        formatter_class=WrappingFormatter,
    )
    from workspace_common import __version__

    parser.add_argument("--version", action="version", version=f"workspace-pilot {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser)
    reserve = commands.add_parser(
        "reserve",
        help="reserve memory for a lease, report it, hold it, give it back",
        description=(
            "Take MB of memory from the host (the configured balloon backend), tell the service "
            "'reserved', hold until the deadline (the duration, or the batch job's walltime less "
            "the safety margin and the grace, whichever comes first) or until SIGTERM/SIGINT, give "
            "the memory back and tell the service 'unreserved'. Every change to the node is written "
            "to the node journal first; changes of dead pilots found there are undone before this "
            "pilot reserves. The memory is given back whether or not the service answers."
        ),
        epilog=EXIT_CODES_HELP,
        formatter_class=WrappingFormatter,
    )
    reserve.add_argument("--slot", required=True, type=_slot, help="the slot id the service gave this job")
    reserve.add_argument(
        "--lease", type=_slot, metavar="ID",
        help="the lease this slot serves (written into every VM's tag, for people; optional)",
    )
    reserve.add_argument(
        "--memory", required=True, type=positive(int, "a whole number"), metavar="MB", help="memory to reserve, in MB",
    )
    reserve.add_argument(
        "--duration", required=True, type=positive(float, "a number"), metavar="SECONDS",
        help="how long to hold the reservation, counted from the pilot's start",
    )
    reserve.add_argument(
        "--grace", required=True, type=positive(float, "a number"), metavar="SECONDS",
        help="the most time the pilot takes to restore the node and report, once it stops",
    )
    reserve.add_argument(
        "--warn-before", type=positive(float, zero=True), default=0.0, metavar="SECONDS",
        help="warn this slot's VMs this long before the deadline, on their lease channel (default 0: no warning)",
    )
    reserve.add_argument("--contact", type=http_url, metavar="URL", help="the service's base URL (overrides [service] contact)")
    reserve.add_argument(
        "--config", metavar="FILE",
        help="configuration file (default /etc/workspace-pilot/pilot.conf if it exists)",
    )
    reserve.add_argument("--host", type=_host, help="the host name to report (default: $SLURMD_NODENAME in a Slurm job, else this node's short name)")
    _add_logging_options(reserve)

    evaluate = commands.add_parser(
        "evaluate",
        help="check that this node is ready for pilots and print the sudoers line; changes nothing",
        description=(
            "Check everything a pilot needs on this node: root (or the sudo rule), the configuration, "
            "that the paths are root-owned and not writable by group or others, the memory backend "
            "(reachable, memory readable), the journal directory, libvirt, what VM jobs need (when the node "
            "lists images for them), and the service contact if one is known. Print one line per check and the sudoers line to install. Changes nothing."
        ),
        epilog=EXIT_CODES_HELP,
        formatter_class=WrappingFormatter,
    )
    evaluate.add_argument(
        "--config", metavar="FILE",
        help="configuration file (default /etc/workspace-pilot/pilot.conf if it exists)",
    )
    evaluate.add_argument("--contact", type=http_url, metavar="URL", help="the service's base URL to check")
    evaluate.add_argument(
        "--batch-user", metavar="USER",
        help="the account the batch jobs run as, for the sudoers line (default: $SUDO_USER, else 'pilot')",
    )
    return parser


def _setup_logging(config, slot: str, host: str, args) -> str:
    """Log to a per-slot file (the LRM may drop stdout) and to the console; returns the file's path."""
    os.makedirs(config.log_dir, mode=0o755, exist_ok=True)
    path = os.path.join(config.log_dir, f"{slot}.{host}.log")
    fmt = logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    from pilot.nodelog import log_handler

    file_handler = log_handler(path)
    file_handler.setFormatter(fmt)
    console = logging.StreamHandler(sys.stdout if args.stdout else sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.WARNING if args.quiet else logging.DEBUG)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if args.verbose else config.log_level.upper())
    root.addHandler(file_handler)
    root.addHandler(console)
    return path


def _fail(kind: str, problems, code: ExitCode) -> ExitCode:
    for problem in problems:
        print(f"workspace-pilot: {kind}: {problem}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``workspace-pilot``; returns an :class:`ExitCode`."""
    started = time.time()
    args = build_parser().parse_args(argv)
    if args.command == "evaluate":
        from pilot.evaluate import evaluate

        return evaluate(args.config, args.contact, args.batch_user)

    from pilot.batchenv import JobVariableError, job_variables
    from pilot.node.backends import BackendError, backend_from_config
    from pilot.config import DEFAULT_PATH, ConfigError, load_config
    from pilot.credentials import CredentialError, pilot_credentials, take_slot_secret
    from pilot.node.journal import Journal, JournalError
    from pilot.wakeup import ignore_job_control

    ignore_job_control()  # before the node lock: the caller's SIGTSTP, relayed by sudo, must not stop root
    try:
        # First: out of the environment before anything (xl, squeue, sudo) could inherit it.
        slot_secret = take_slot_secret()
    except CredentialError as exc:
        return _fail("usage error", [str(exc)], ExitCode.USAGE)

    try:
        # The job's identity is all root takes from its caller's environment, each value checked (pilot/batchenv.py).
        job = job_variables(os.environ)
    except JobVariableError as exc:
        return _fail("usage error", [str(exc)], ExitCode.USAGE)

    if os.environ.get("SUDO_USER") and os.environ.get("SUDO_UID") != "0" and args.config not in (None, DEFAULT_PATH):
        # The batch user must not choose what root runs (xl_command) or where root writes (log dir).
        # Root going through sudo (jobs that already run as root) gains nothing, so it may choose.
        return _fail("usage error", [f"--config is refused through sudo; the pilot reads {DEFAULT_PATH}"], ExitCode.USAGE)

    try:
        config = load_config(args.config, contact=args.contact)
    except ConfigError as exc:
        return _fail("config error", exc.problems, ExitCode.CONFIG)
    try:
        backend = backend_from_config(config)
    except BackendError as exc:
        return _fail("config error", [f"[memory] backend = {config.backend}: {exc}"], ExitCode.CONFIG)
    journal = Journal(config.journal_dir, config.lock_timeout_s)
    try:
        journal.prepare()
    except JournalError as exc:
        return _fail("journal error", [f"{exc}; nothing changed"], ExitCode.JOURNAL)
    # Slurm's node name first: several slurmd on one host share its hostname but not this.
    host = args.host or job.get("SLURMD_NODENAME") or os.uname().nodename.split(".")[0]  # gethostname(), without socket
    if not _HOST_RE.match(host):
        return _fail("usage error", [f"host name {host!r} (from $SLURMD_NODENAME or the hostname) is not valid: pass --host"],
                     ExitCode.USAGE)
    try:
        credentials = pilot_credentials(config.node_key_file, host, args.slot, slot_secret)
    except CredentialError as exc:
        return _fail("config error", [f"[service] node_key_file: {exc}"], ExitCode.CONFIG)
    try:
        log_path = _setup_logging(config, args.slot, host, args)
    except OSError as exc:
        return _fail("config error", [f"log directory {config.log_dir}: {exc.strerror}"], ExitCode.CONFIG)
    return _reserve(args, config, backend, journal, host, log_path, started, credentials, job)


def _reserve(args, config, backend, journal, host: str, log_path: str, started: float, credentials,
             job: dict[str, str]) -> int:
    from pilot.deadline import compute_deadline, extended_deadline
    from pilot.vm.hosting import VmHosting
    from pilot.node.journal import Entry
    from pilot.lifecycle import LeaseRequest, Pilot
    from pilot.moments import process_started_at
    from pilot.node.memory import NodeMemory
    from pilot.recovery import replay_dead
    from pilot.notifier import Notifier
    from pilot.node.owner import Owner
    from pilot.wakeup import wake_on_signals

    log.info(
        "pilot %d for slot %s on %s: %d MB for %g s (grace %g s), backend %s, journal %s, contact %s, log %s",
        os.getpid(), args.slot, host, args.memory, args.duration, args.grace, backend.describe(),
        config.journal_dir, config.contact, log_path,
    )
    entry = Entry(args.slot, host, Owner.current(), contact=config.contact, sign_key=credentials.sign_key)
    memory = NodeMemory(
        journal, backend, entry, minmem_mb=config.minmem_mb, verify_timeout=config.verify_timeout_s,
        replay=replay_dead,
    )
    notifier = Notifier(
        config.contact, credentials, args.slot, host,
        request_timeout=config.request_timeout_s, verify_tls=config.tls_verify,
    )

    def deadline():
        return compute_deadline(
            started=started, duration_s=args.duration, grace_s=args.grace, margin_s=config.walltime_margin_s,
            env=job, query_timeout=config.lrm_query_timeout_s, client=config.batch_client,
        )

    def extend(duration_s, current):
        return extended_deadline(
            current, started=started, duration_s=duration_s, grace_s=args.grace, margin_s=config.walltime_margin_s,
            env=job, query_timeout=config.lrm_query_timeout_s, client=config.batch_client,
        )

    request = LeaseRequest(args.slot, host, args.memory, args.duration, args.grace)
    pilot = Pilot(
        request, memory, notifier, deadline,
        reserved_timeout_s=config.reserved_timeout_s, earlywaitratio=config.earlywaitratio,
        warn_before_s=args.warn_before, extend_deadline=extend, shutdown_grace_s=config.shutdown_timeout_s,
    )
    pilot.moments.mark("process_start", process_started_at() or started)
    pilot.hosting = VmHosting(config, notifier, memory, slot=args.slot, host=host, lease=args.lease or "",
                              on_stop=pilot.request_stop, peer_key=credentials.peer_key, on_extend=pilot.extend,
                              warning=pilot.warning_line, lease_end=pilot.lease_end)
    # SIGUSR2: Grid Engine's warning before a qdel's SIGKILL (-notify); the pilot restores as for SIGTERM.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        signal.signal(signum, lambda num, _frame: pilot.request_stop(signal.Signals(num).name, "signal"))
    # SIGUSR1: Grid Engine's warning before a suspend (SIGSTOP): nothing to do, but its default would kill us.
    signal.signal(signal.SIGUSR1, lambda _num, _frame: log.warning("SIGUSR1: the batch system is about to suspend this job"))
    wake_on_signals()  # a signal the kernel hands to another thread still wakes the main loop at once
    try:
        code = pilot.run()
    except Exception:
        log.exception("internal error")
        return ExitCode.INTERNAL
    finally:
        backend.close()
    log.info("pilot %d exits with %d (%s)", os.getpid(), code, code.name.lower())
    return code
