"""``workspace-lease``: the service side's command."""

from __future__ import annotations

import argparse
import logging
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ENVIRONMENT = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be above 0")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``workspace-lease``."""
    parser = _Parser(
        prog="workspace-lease",
        description="Lease batch nodes' memory to virtual machines through pilot jobs.",
        epilog="exit codes: 0 success, 1 the lease failed, 2 bad arguments, 3 cannot run here",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    demo = commands.add_parser(
        "demo",
        help="run one lease on this machine through the local provider (needs root)",
        description=(
            "Start the notification receiver on 127.0.0.1, lease NODES simulated nodes (one local "
            "pilot process each) with real 2 MiB hugepage reservations, print every step with its "
            "time, and show that the hugepage pool ends where it started."
        ),
        epilog="exit codes: 0 success, 1 the lease failed, 2 bad arguments, 3 cannot run here (not root)",
    )
    demo.add_argument("--nodes", type=_positive(int), default=2, help="simulated nodes (default 2)")
    demo.add_argument("--memory", type=_positive(int), default=64, metavar="MB", help="MB per node (default 64)")
    demo.add_argument("--duration", type=_positive(float), default=20, metavar="SECONDS", help="lease length (default 20)")
    demo.add_argument("--grace", type=_positive(float), default=10, metavar="SECONDS",
                      help="the pilots' time to restore and report once stopped (default 10)")
    demo.add_argument("--release-after", type=_positive(float), metavar="SECONDS",
                      help="release the lease early (SIGTERM to the pilots) after this long; "
                           "default: let the pilots end it at their own deadline")
    demo.add_argument("--workdir", metavar="DIR", help="where the store, pilot config and logs go (default: a new temp dir)")
    demo.add_argument(
        "--journal-dir", metavar="DIR", default="/var/lib/workspace-pilot",
        help="the pilots' node journal (default /var/lib/workspace-pilot, as on a real node)",
    )
    demo.add_argument("--verbose", action="store_true", help="also print the service's own log")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``workspace-lease``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from service_adapter.demo import DemoError, run_demo

    try:
        return run_demo(
            args.nodes, args.memory, args.duration, args.grace, args.release_after, args.workdir,
            journal_dir=args.journal_dir,
        )
    except DemoError as exc:
        print(f"workspace-lease: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
