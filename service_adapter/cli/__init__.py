"""``workspace-lease``: the service side's command.

``serve`` runs the service; ``reserve``, ``release``, ``extend``, ``list``,
``show``, ``events``, ``usage``, ``vm start|stop|suspend|resume|list`` and
``image ...`` are the operators' client
of its HTTP API (``image keygen|sign`` are the endorser's local tools); ``demo`` runs one lease on this machine through the embedded local site.
The parts: :mod:`.parser` (the command line), :mod:`.vmspec` (VM requests),
:mod:`.commands` (the API client commands), :mod:`.local` (serve, demo,
keys), :mod:`.render` (text output), :mod:`.common` (exit codes).
"""

from __future__ import annotations

from workspace_common.cli import quiet_on_closed_pipe
from service_adapter.cli.commands import client_command
from service_adapter.cli.images import LOCAL_COMMANDS, run_local
from service_adapter.cli.local import make_site_key, print_node_key, run_demo, run_serve
from service_adapter.cli.parser import build_parser
from service_adapter.cli.vmspec import BadSpec, vm_request

__all__ = ["build_parser", "main"]

@quiet_on_closed_pipe
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``workspace-lease``; a closed output pipe ends it quietly with exit 141."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return run_demo(args)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "site-key":
        return make_site_key(args)
    if args.command == "node-key":
        return print_node_key(args)
    if args.command == "image" and args.image_command in LOCAL_COMMANDS:
        return run_local(args)
    if args.command == "vm" and args.vm_command == "start":
        try:
            args.vm_specs = vm_request(args)  # checked before anything is read or sent
        except BadSpec as exc:
            args.parser.error(str(exc))
    return client_command(args)

