"""``workspace-pilot``: the command the batch job runs on each node (as root)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
from urllib.parse import urlsplit

from pilot.exitcodes import MEANING, ExitCode

log = logging.getLogger("pilot")

_SLOT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")

EXIT_CODES_HELP = "exit codes:\n" + "\n".join(
    f"  {code.value:>2}  {code.name.lower().replace('_', '-')}: {MEANING[code]}" for code in ExitCode
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line and exits with ExitCode.USAGE."""

    def error(self, message: str):
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _slot(text: str) -> str:
    if not _SLOT_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a slot id (letters, digits, . _ -; at most 64)")
    return text


def _host(text: str) -> str:
    if not _HOST_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name")
    return text


MAX_ARGUMENT = 10**8  # seconds: about three years (longer waits overflow timeout types); MB: 100 TB


def _positive(kind, noun: str):
    """An argparse type: a ``kind`` (int or float) above 0 and at most MAX_ARGUMENT."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be above 0")
        if not value <= MAX_ARGUMENT:
            raise argparse.ArgumentTypeError(f"{text} is too large (at most {MAX_ARGUMENT})")
        return value

    return parse


def _contact(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL with a host")
    return text.rstrip("/")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface, with every option explained in ``--help``."""
    parser = _Parser(
        prog="workspace-pilot",
        description="Lease this node's memory to a workspace service for a while, then give it back.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    reserve = commands.add_parser(
        "reserve",
        help="reserve memory for a lease, report it, hold it, give it back",
        description=(
            "Take MB of memory from the host (the configured balloon backend), tell the service "
            "'reserved', hold until the duration ends or SIGTERM/SIGINT arrives, give the memory "
            "back and tell the service 'unreserved'. The memory is given back whether or not "
            "the service answers."
        ),
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    reserve.add_argument("--slot", required=True, type=_slot, help="the slot id the service gave this job")
    reserve.add_argument("--memory", required=True, type=_positive(int, "a whole number"), metavar="MB", help="memory to reserve, in MB")
    reserve.add_argument(
        "--duration", required=True, type=_positive(float, "a number"), metavar="SECONDS",
        help="how long to hold the reservation, counted from the pilot's start",
    )
    reserve.add_argument(
        "--grace", required=True, type=_positive(float, "a number"), metavar="SECONDS",
        help="the most time the pilot takes to restore the node and report, once it stops",
    )
    reserve.add_argument("--contact", type=_contact, metavar="URL", help="the service's base URL (overrides [service] contact)")
    reserve.add_argument(
        "--config", metavar="FILE",
        help="configuration file (default /etc/workspace-pilot/pilot.conf if it exists)",
    )
    reserve.add_argument("--host", type=_host, help="the host name to report (default: this node's short name)")
    reserve.add_argument("--quiet", action="store_true", help="print only warnings and errors on stderr")
    return parser


def _setup_logging(config, slot: str, host: str, quiet: bool) -> str:
    """Log to a per-slot file (the LRM may drop stdout) and to stderr; returns the file's path."""
    os.makedirs(config.log_dir, mode=0o755, exist_ok=True)
    path = os.path.join(config.log_dir, f"{slot}.{host}.log")
    fmt = logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(fmt)
    stderr_handler = logging.StreamHandler(sys.stderr)
    stderr_handler.setFormatter(fmt)
    stderr_handler.setLevel(logging.WARNING if quiet else logging.DEBUG)
    root = logging.getLogger()
    root.setLevel(config.log_level.upper())
    root.addHandler(file_handler)
    root.addHandler(stderr_handler)
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``workspace-pilot``; returns an :class:`ExitCode`."""
    args = build_parser().parse_args(argv)
    from pilot.config import ConfigError, load_config

    try:
        config = load_config(args.config, contact=args.contact)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"workspace-pilot: config error: {problem}", file=sys.stderr)
        return ExitCode.CONFIG
    host = args.host or socket.gethostname().split(".")[0]
    try:
        log_path = _setup_logging(config, args.slot, host, args.quiet)
    except OSError as exc:
        print(f"workspace-pilot: config error: log directory {config.log_dir}: {exc.strerror}", file=sys.stderr)
        return ExitCode.CONFIG
    return _reserve(args, config, host, log_path)


def _reserve(args, config, host: str, log_path: str) -> int:
    from pilot.backends import BackendError, make_backend
    from pilot.lifecycle import LeaseRequest, Pilot
    from pilot.notifier import Notifier

    log.info(
        "pilot %d for slot %s on %s: %d MB for %g s (grace %g s), contact %s, log %s",
        os.getpid(), args.slot, host, args.memory, args.duration, args.grace, config.contact, log_path,
    )
    try:
        backend = make_backend(config)
    except BackendError as exc:
        log.error("%s", exc)
        return ExitCode.CONFIG
    notifier = Notifier(
        config.contact, config.user, config.secret, config.realm, args.slot, host,
        request_timeout=config.request_timeout_s, verify_tls=config.verify_tls,
    )
    pilot = Pilot(
        LeaseRequest(args.slot, host, args.memory, args.duration, args.grace), config, backend, notifier
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda num, _frame: pilot.request_stop(signal.Signals(num).name))
    try:
        code = pilot.run()
    except Exception:
        log.exception("internal error")
        return ExitCode.INTERNAL
    log.info("pilot %d exits with %d (%s)", os.getpid(), code, code.name.lower())
    return code
