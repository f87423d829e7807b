"""``workspace-lease``: the service side's command.

``serve`` runs the service; ``reserve``, ``release``, ``list``, ``show``,
``usage`` and ``vm start|stop|list`` are the operators' client of its HTTP
API; ``demo`` runs one lease on this machine through the embedded local site.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import sys
import textwrap
import time

from service_adapter.safetext import printable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_UNREACHABLE = 4
EXIT_REFUSED = 5
EXIT_NOT_FOUND = 6
EXIT_TIMEOUT = 7
EXIT_CONFLICT = 8
EXIT_ENVIRONMENT = EXIT_CONFIG  # the demo's "cannot run here" (kept for its callers)

EXIT_CODES = {
    EXIT_OK: "success (for --wait: the lease or VM reached the state waited for)",
    EXIT_FAILED: "the lease failed, or ended failed or missing; or the batch system refused the job; "
                 "or (vm --wait) a VM failed, was lost or did not stop",
    EXIT_USAGE: "bad arguments or VM spec (or a request the service found invalid)",
    EXIT_CONFIG: "bad or unreadable configuration, secret or accounts file; or cannot run here",
    EXIT_UNREACHABLE: "the service could not be reached (or did not answer in time)",
    EXIT_REFUSED: "the service refused the credentials (401/403)",
    EXIT_NOT_FOUND: "no such lease, or no such VM (404)",
    EXIT_TIMEOUT: "--wait gave up (after --timeout; vm: after its --wait SECONDS); the lease or VM goes on",
    EXIT_CONFLICT: "the service refused the VM request as the lease stands (409): the lease is not ready, "
                   "a VM name is in use, the VMs do not fit, or the VM has ended already; nothing was queued",
}
EXIT_CODES_HELP = "exit codes:\n" + "\n".join(
    textwrap.fill(text, width=79, initial_indent=f"  {code}  ", subsequent_indent="     ")
    for code, text in EXIT_CODES.items()
)

UP_STATES = ("ready", "running")
END_STATES = ("released", "expired", "failed", "missing")
FAILED_STATES = ("failed", "missing")


class _Formatter(argparse.HelpFormatter):
    """Wraps descriptions, keeps the exit-code table's lines as written."""

    def _fill_text(self, text, width, indent):
        if text.startswith("exit codes:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _positive(kind, noun: str = "a number"):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be above 0")
        if not value <= 10**8:
            raise argparse.ArgumentTypeError(f"{text} is too large (at most 100000000)")
        return value

    return parse


def _url(text: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL with a host")
    return text.rstrip("/")


def _lease_id(text: str) -> str:
    if not text or len(text) > 64 or "/" in text or not text[0].isalnum():
        raise argparse.ArgumentTypeError(f"{text!r} is not a lease id")
    return text


def _client_options(timeout_waits: bool = True) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("service and credentials (override [client] of the config file)")
    group.add_argument("--config", metavar="FILE",
                       help="service config file to read [client] from "
                            "(default /etc/workspace-pilot/service.conf if it exists)")
    group.add_argument("--url", type=_url, metavar="URL",
                       help="the service's base URL (default [client] url, else this host's [service] listener)")
    group.add_argument("--user", metavar="USER", help="operator account (default [client] user)")
    group.add_argument("--secret-file", metavar="FILE",
                       help="file holding the operator's digest secret, mode 0600 "
                            "(default $WORKSPACE_LEASE_SECRET_FILE, else [client] secret_file)")
    group.add_argument("--timeout", type=_positive(float), metavar="SECONDS",
                       help="per request (default [client] timeout, 60)"
                            + ("; with --wait also the longest wait (default 600)" if timeout_waits else ""))
    common.add_argument("--json", action="store_true", help="print exactly the API's JSON answer instead of text")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``workspace-lease``."""
    parser = _Parser(
        prog="workspace-lease",
        description=(
            "Lease batch nodes' memory to virtual machines through pilot jobs. 'serve' runs the service; "
            "reserve, release, list, show, usage and vm (start, stop, list a lease's VMs) talk to it over HTTP "
            "(digest-authenticated as an operator); 'demo' runs one lease on this machine."
        ),
        epilog=EXIT_CODES_HELP,
        formatter_class=_Formatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    common = _client_options()

    def sub(name: str, help_text: str, description: str, parents=(common,)) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=help_text, description=description, parents=list(parents), epilog=EXIT_CODES_HELP,
            formatter_class=_Formatter,
        )

    serve = sub(
        "serve", "run the service (pilots' notifications and the operators' API) until SIGTERM",
        "Run the workspace service: one HTTP listener ([service] listen_host, port) for the pilots' "
        "notifications and the operators' API, the lease manager (submits pilot jobs through [provider], "
        "watches them, ends leases), and the SQLite store. Logs go to [service] log_file. SIGTERM or SIGINT "
        "stops it cleanly; leases and their pilot jobs keep running and a restarted service picks them up.",
        parents=(),
    )
    serve.add_argument("--config", metavar="FILE",
                       help="the service's config file (default /etc/workspace-pilot/service.conf)")

    reserve = sub(
        "reserve", "lease NODES nodes with MB each for SECONDS",
        "Ask the service for a lease: NODES nodes, MB of memory on each, for SECONDS. The service submits "
        "one pilot job to the batch system; the lease is 'ready' once every node's pilot has reserved its "
        "memory. Prints the lease (its id is what release and show take).",
    )
    reserve.add_argument("--nodes", required=True, type=_positive(int, "a whole number"), help="how many nodes")
    reserve.add_argument("--memory", required=True, type=_positive(int, "a whole number"), metavar="MB",
                         help="memory per node, in MB")
    reserve.add_argument("--duration", required=True, type=_positive(float), metavar="SECONDS",
                         help="how long the lease lasts once its pilots start")
    reserve.add_argument("--wait", action="store_true",
                         help="block until the lease is ready (exit 0) or has ended (exit 1), "
                              "at most --timeout (exit 7)")

    release = sub(
        "release", "end a lease early",
        "Release a lease: the service cancels its pilot job (the pilots give the memory back and report). "
        "Releasing a lease that has already ended is not an error.",
    )
    release.add_argument("lease", type=_lease_id, metavar="LEASE", help="the lease id")
    release.add_argument("--wait", action="store_true",
                         help="block until the lease has ended: released or expired (exit 0), "
                              "failed or missing (exit 1)")

    listing = sub("list", "list leases", "List leases, optionally only some states or one owner's.")
    listing.add_argument("--state", action="append", metavar="STATE",
                         help="only leases in this state (repeatable, or comma-separated)")
    listing.add_argument("--owner", metavar="OPERATOR", help="only this operator's leases")

    show = sub("show", "show one lease", "Show one lease with its state and its pilots.")
    show.add_argument("lease", type=_lease_id, metavar="LEASE", help="the lease id")

    usage = sub("usage", "node-seconds and MB-seconds used",
                "Show how much has been leased: node-seconds and MB-seconds of the holds that have ended.")
    usage.add_argument("--owner", metavar="OPERATOR", help="only this operator's leases (default: all)")
    usage.add_argument("--lease", type=_lease_id, metavar="LEASE", help="only this lease")

    _add_vm_commands(commands, _client_options(timeout_waits=False))

    site_key = commands.add_parser(
        "site-key", help="make the site key that every node's key derives from (once, on the service's host)",
        description=(
            "Write a new random site key to FILE (mode 0600; an existing file is never replaced). The service "
            "reads it from [pilots] site_key_file; each node's key is derived from it (see node-key). Keep it "
            "as secret as the service's store: with it anyone can act as any node."
        ),
        epilog=EXIT_CODES_HELP, formatter_class=_Formatter,
    )
    site_key.add_argument("--output", required=True, metavar="FILE", help="the file to create")

    node_key = commands.add_parser(
        "node-key", help="print (or write) one node's key, to install on that node as root",
        description=(
            "Derive HOST's key from the site key ([pilots] site_key_file of the service config) and print it, "
            "or write it to --output (mode 0600). Install it on HOST as its pilots' [service] node_key_file "
            "(default /etc/workspace-pilot/node.key, root-owned, mode 0600), for example with "
            "\"workspace-lease node-key node7 | ssh root@node7 'umask 077; cat > /etc/workspace-pilot/node.key'\". "
            "A node's key lets it speak only as HOST, and only for slots whose job the batch system gave it."
        ),
        epilog=EXIT_CODES_HELP, formatter_class=_Formatter,
    )
    node_key.add_argument("host", type=_host_name, metavar="HOST",
                          help="the node's name as its pilots report it (Slurm's node name, else its short host name)")
    node_key.add_argument("--config", metavar="FILE",
                          help="the service's config file (default /etc/workspace-pilot/service.conf)")
    node_key.add_argument("--site-key-file", metavar="FILE", help="read the site key from FILE instead")
    node_key.add_argument("--output", metavar="FILE", help="write the key to FILE (created 0600) instead of printing it")

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


# -- vm: the leases' VMs --------------------------------------------------------------------------

#: Which option sets which field of a VM spec (to name the option in a refusal).
_VM_OPTIONS = {
    "vm.name": "--name", "vm.memory_mb": "--memory", "vm.vcpus": "--vcpus",
    "vm.disk.path": "--image", "vm.disk.sha256": "--image-sha256", "vm.disk.readonly": "--readonly",
    "vm.disk": "--image", "vm.boot.kernel.path": "--kernel", "vm.boot.kernel.sha256": "--kernel-sha256",
    "vm.boot.kernel": "--kernel", "vm.boot.initrd.path": "--initrd", "vm.boot.initrd.sha256": "--initrd-sha256",
    "vm.boot.initrd": "--initrd", "vm.boot.cmdline": "--cmdline", "vm.network": "--network",
    "vm.console_log": "--console-log", "vm": "the VM",
}
_SPEC_OPTIONS = ("name", "memory", "vcpus", "image", "image_sha256", "readonly", "kernel", "kernel_sha256",
                 "initrd", "initrd_sha256", "cmdline", "network", "console_log", "host")
_VM_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
VM_ENDED = ("stopped", "failed", "lost")
STOP_FAILED = "stop failed"  # how the service's reason starts when a pilot reported that a stop-vm failed


def _vm_name(text: str) -> str:
    if not _VM_NAME_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a VM name (a letter or digit, then letters, digits, . _ -; at most 64)"
        )
    return text


def _host_name(text: str) -> str:
    if not _HOST_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name")
    return text


def _sha256(text: str) -> str:
    lowered = text.lower()
    if not re.fullmatch(r"[0-9a-f]{64}", lowered):
        raise argparse.ArgumentTypeError(f"{text[:80]!r} is not a sha256 (64 hex digits, as sha256sum prints)")
    return lowered


def _add_vm_commands(commands, common: argparse.ArgumentParser) -> None:
    vm = commands.add_parser(
        "vm", help="start, stop and list a lease's virtual machines",
        description=(
            "The VMs of a ready lease: 'vm start' places them on the lease's hosts (each host's reserved "
            "memory respected, with the service's per-VM overhead) and queues their start to the pilots; "
            "'vm stop' queues a stop; 'vm list' shows them. The pilots report each outcome."
        ),
        epilog=EXIT_CODES_HELP, formatter_class=_Formatter,
    )
    vms = vm.add_subparsers(dest="vm_command", metavar="VMCOMMAND", required=True, parser_class=_Parser)

    def sub(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        parser = vms.add_parser(name, help=help_text, description=description, parents=[common],
                                epilog=EXIT_CODES_HELP, formatter_class=_Formatter)
        parser.set_defaults(parser=parser)
        return parser

    start = sub(
        "start", "start VMs on a lease",
        "Start one VM described by the options below, or the VMs of a spec file, on a lease that is ready "
        "or running. The request is checked here first (nothing is sent if it is malformed), then by the "
        "service: all of them are queued, or none (exit 8 if they do not fit, a name is in use, or the "
        "lease is not ready). Each pilot checks its VM again (image directory and sha256, memory) before "
        "it starts it. Prints the VMs queued, with the host each was placed on.",
    )
    start.add_argument("lease", type=_lease_id, metavar="LEASE", help="the lease id")
    start.add_argument("--spec", metavar="FILE",
                       help='a JSON file (- for stdin) holding {"vms": [spec, ...]} or one spec object; each '
                            'spec is {"name", "memory_mb", "vcpus", "disk": {"path", "sha256", "readonly"}, '
                            '"boot": {"kernel": {"path", "sha256"}, "initrd": {...}, "cmdline"}, "network", '
                            '"console_log"} plus an optional "host". Not with the options below')
    one = start.add_argument_group("one VM from options (instead of --spec)")
    one.add_argument("--name", type=_vm_name, metavar="NAME",
                     help="the VM's name, unique among the lease's active VMs (required)")
    one.add_argument("--memory", type=_positive(int, "a whole number"), metavar="MB",
                     help="the VM's memory in MB (required); the service adds its per-VM overhead when placing")
    one.add_argument("--vcpus", type=_positive(int, "a whole number"), metavar="N", help="virtual CPUs (default 1)")
    one.add_argument("--image", metavar="PATH",
                     help="the disk image on the nodes (in the pilots' image directory); needs --image-sha256")
    one.add_argument("--image-sha256", type=_sha256, metavar="HEX", help="the image's sha256, as sha256sum prints it")
    one.add_argument("--readonly", action="store_true",
                     help="attach the image read-only (default: writes go to a throw-away overlay)")
    one.add_argument("--kernel", metavar="PATH",
                     help="boot this kernel directly (with or without --image); needs --kernel-sha256")
    one.add_argument("--kernel-sha256", type=_sha256, metavar="HEX", help="the kernel's sha256")
    one.add_argument("--initrd", metavar="PATH", help="the initrd for --kernel; needs --initrd-sha256")
    one.add_argument("--initrd-sha256", type=_sha256, metavar="HEX", help="the initrd's sha256")
    one.add_argument("--cmdline", metavar="TEXT", help="the kernel command line for --kernel")
    one.add_argument("--network", metavar="NAME", help="attach one NIC to this libvirt network (default: no NIC)")
    one.add_argument("--console-log", metavar="FILE",
                     help="a file name for the serial console's output, in the pilots' console directory")
    one.add_argument("--host", type=_host_name, metavar="HOST",
                     help="place the VM on this host of the lease (default: the host with the most room)")
    start.add_argument("--wait", type=_positive(float), metavar="SECONDS",
                       help="then wait up to SECONDS until every VM runs (exit 0) or one has failed or "
                            "was lost (exit 1); exit 7 if still starting then")

    stop = sub(
        "stop", "stop a VM of a lease",
        "Queue a stop of one VM: graceful (an ACPI shutdown, then destroyed after the pilot's wait), or at "
        "once with --force. Stopping a VM that has ended is refused (exit 8).",
    )
    stop.add_argument("lease", type=_lease_id, metavar="LEASE", help="the lease id")
    stop.add_argument("name", type=_vm_name, metavar="NAME", help="the VM's name")
    stop.add_argument("--force", action="store_true", help="destroy it at once instead of shutting it down")
    stop.add_argument("--wait", type=_positive(float), metavar="SECONDS",
                      help="then wait up to SECONDS until it has stopped (exit 0), or the stop failed or the "
                           "VM was lost (exit 1); exit 7 if still stopping then")

    listing = sub("list", "list a lease's VMs",
                  "List a lease's VMs, oldest first (ended ones too): name, host, state, memory and why.")
    listing.add_argument("lease", type=_lease_id, metavar="LEASE", help="the lease id")


class _BadSpec(Exception):
    """A VM request that is malformed as given; nothing is sent."""


def _vm_request(args) -> list[dict]:
    """The VM specs (each with its optional "host") that ``vm start`` sends; _BadSpec says what is wrong."""
    from service_adapter.vms import MAX_VMS_PER_REQUEST, VmRequestError, parse_vm_request

    given = [f"--{name.replace('_', '-')}" for name in _SPEC_OPTIONS if getattr(args, name) not in (None, False)]
    if args.spec is not None:
        if given:
            raise _BadSpec(f"--spec and {', '.join(given)} exclude each other: give the VMs in the file, or one VM "
                           "with the options")
        items, where = _read_spec_file(args.spec), args.spec
    else:
        items, where = [_spec_from_options(args)], None
    if len(items) > MAX_VMS_PER_REQUEST:
        raise _BadSpec(f"{where}: {len(items)} VMs, at most {MAX_VMS_PER_REQUEST} per request: split the file")
    specs, names = [], set()
    for index, item in enumerate(items):
        try:
            spec, host = parse_vm_request(item)
        except VmRequestError as exc:
            message = str(exc).splitlines()[0] if str(exc) else "invalid"
            if where is None:
                raise _BadSpec(_name_option(message)) from None
            name = item.get("name") if isinstance(item, dict) else None
            label = f"vms[{index}]" + (f" ({name})" if isinstance(name, str) and name.isprintable() else "")
            raise _BadSpec(f"{where}: {label[:100]}: {message}") from None
        if host is not None and not _HOST_RE.fullmatch(host):
            raise _BadSpec(f"{where}: vms[{index}] ({spec.name}): host {host[:80]!r} is not a host name")
        if spec.name in names:
            raise _BadSpec(f"{where}: VM name {spec.name} is given twice: names must differ")
        names.add(spec.name)
        specs.append(dict(spec.to_dict(), **({"host": host} if host is not None else {})))
    return specs


def _name_option(message: str) -> str:
    """A spec refusal for a VM given by options: name the option, not the JSON field."""
    for field in sorted(_VM_OPTIONS, key=len, reverse=True):
        if message.startswith(field + ":"):
            return f"{_VM_OPTIONS[field]}{message[len(field):]}"
    return message


def _read_spec_file(path: str) -> list:
    from service_adapter.api import MAX_VM_BODY

    try:
        if path == "-":
            raw = sys.stdin.buffer.read(MAX_VM_BODY + 1)
        else:
            with open(path, "rb") as handle:
                raw = handle.read(MAX_VM_BODY + 1)
    except OSError as exc:
        raise _BadSpec(f"--spec {path}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_VM_BODY:
        raise _BadSpec(f"--spec {path}: over {MAX_VM_BODY} bytes, the most one request may carry: split the file")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _BadSpec(f"--spec {path}: not JSON: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict) and "vms" in data:
        extra = sorted(set(data) - {"vms"})
        if extra:
            raise _BadSpec(f'--spec {path}: unknown field(s) {", ".join(map(str, extra))} beside "vms"')
        if not isinstance(data["vms"], list) or not data["vms"]:
            raise _BadSpec(f'--spec {path}: "vms" must be a non-empty list of VM specs')
        return data["vms"]
    if isinstance(data, dict):
        return [data]
    raise _BadSpec(f'--spec {path}: must hold {{"vms": [spec, ...]}} or one spec object')


def _spec_from_options(args) -> dict:
    def both(path_option: str, path, digest_option: str, digest) -> None:
        if (path is None) != (digest is None):
            missing = digest_option if digest is None else path_option
            present = path_option if digest is None else digest_option
            raise _BadSpec(f"{present} needs {missing}")

    if args.name is None or args.memory is None:
        missing = " and ".join(o for o, v in (("--name", args.name), ("--memory", args.memory)) if v is None)
        raise _BadSpec(f"{missing} missing: give --spec FILE, or --name and --memory with --image or --kernel")
    both("--image", args.image, "--image-sha256", args.image_sha256)
    both("--kernel", args.kernel, "--kernel-sha256", args.kernel_sha256)
    both("--initrd", args.initrd, "--initrd-sha256", args.initrd_sha256)
    if args.readonly and args.image is None:
        raise _BadSpec("--readonly needs --image")
    for option, value in (("--initrd", args.initrd), ("--cmdline", args.cmdline)):
        if value is not None and args.kernel is None:
            raise _BadSpec(f"{option} needs --kernel (direct boot)")
    if args.image is None and args.kernel is None:
        raise _BadSpec("the VM needs --image (with --image-sha256) or --kernel (with --kernel-sha256), or both")
    spec: dict = {"name": args.name, "memory_mb": args.memory}
    if args.vcpus is not None:
        spec["vcpus"] = args.vcpus
    if args.image is not None:
        spec["disk"] = {"path": args.image, "sha256": args.image_sha256}
        if args.readonly:
            spec["disk"]["readonly"] = True
    if args.kernel is not None:
        boot: dict = {"kernel": {"path": args.kernel, "sha256": args.kernel_sha256}}
        if args.initrd is not None:
            boot["initrd"] = {"path": args.initrd, "sha256": args.initrd_sha256}
        if args.cmdline is not None:
            boot["cmdline"] = args.cmdline
        spec["boot"] = boot
    if args.network is not None:
        spec["network"] = args.network
    if args.console_log is not None:
        spec["console_log"] = args.console_log
    if args.host is not None:
        spec["host"] = args.host
    return spec


def _say(text: str) -> None:
    print(f"workspace-lease: {printable(text)}", file=sys.stderr)  # may quote what a pilot or the service wrote


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``workspace-lease``."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "site-key":
        return _site_key(args)
    if args.command == "node-key":
        return _node_key(args)
    if args.command == "vm" and args.vm_command == "start":
        try:
            args.vm_specs = _vm_request(args)  # checked before anything is read or sent
        except _BadSpec as exc:
            args.parser.error(str(exc))
    return _client_command(args)


# -- demo -------------------------------------------------------------------------------------


def _demo(args) -> int:
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
        _say(str(exc))
        return EXIT_ENVIRONMENT


# -- serve ------------------------------------------------------------------------------------


def _serve(args) -> int:
    from service_adapter.config import DEFAULT_PATH, ConfigError, load_config
    from service_adapter.server import ServeError, serve

    path = args.config or DEFAULT_PATH
    try:
        config = load_config(path, serve=True)
    except ConfigError as exc:
        for problem in exc.problems:
            _say(f"config error: {problem}")
        return EXIT_CONFIG
    try:
        return serve(config)
    except ServeError as exc:
        _say(f"cannot serve: {path}: {exc}")
        return EXIT_CONFIG


# -- keys -------------------------------------------------------------------------------------


def _write_key(path: str, key: str, exists: str, done: str) -> int:
    """Create ``path`` (0600, never replacing a file) holding ``key``; say ``exists`` or ``done``."""
    from service_adapter.nodekeys import write_key_file

    try:
        write_key_file(path, key)
    except FileExistsError:
        _say(f"{path} exists: {exists}")
        return EXIT_CONFLICT
    except OSError as exc:
        _say(f"cannot write {path}: {exc.strerror}")
        return EXIT_FAILED
    _say(done)
    return EXIT_OK


def _site_key(args) -> int:
    from service_adapter.nodekeys import new_site_key

    return _write_key(
        args.output, new_site_key(), "a site key is never replaced (every node's key derives from it)",
        f"wrote a new site key to {args.output} (mode 0600); set [pilots] site_key_file = {args.output}",
    )


def _node_key(args) -> int:
    from service_adapter.config import DEFAULT_PATH, ConfigError, load_config, read_site_key
    from service_adapter.nodekeys import NodeAccounts

    path = args.site_key_file
    if path is None:
        try:
            path = load_config(args.config or DEFAULT_PATH).site_key_file
        except ConfigError as exc:
            for problem in exc.problems:
                _say(f"config error: {problem}")
            return EXIT_CONFIG
    try:
        key = NodeAccounts(read_site_key(path), "unused").node_key(args.host)
    except ValueError as exc:
        _say(f"config error: site key {path}: {exc}")
        return EXIT_CONFIG
    if args.output is None:
        print(key)
        return EXIT_OK
    return _write_key(args.output, key, f"remove it first to write {args.host}'s key there",
                      f"wrote {args.host}'s node key to {args.output} (mode 0600)")


# -- the operator commands --------------------------------------------------------------------


class _Exit(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _client_command(args) -> int:
    from service_adapter.client import ClientError, LeaseClient

    try:
        url, user, secret, timeout_s, verify = _client_settings(args)
    except _Exit as exc:
        return exc.code
    client = LeaseClient(url, user, secret, timeout_s=timeout_s, verify_tls=verify)
    try:
        return _COMMANDS[args.command](client, args)
    except ClientError as exc:
        _say(exc.message)
        return _exit_for_status(exc.status)
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_FAILED
    finally:
        client.close()


def _exit_for_status(status: int | None) -> int:
    if status is None:
        return EXIT_UNREACHABLE
    if status in (401, 403):
        return EXIT_REFUSED
    if status == 404:
        return EXIT_NOT_FOUND
    if status == 409:
        return EXIT_CONFLICT
    if status in (400, 405, 413, 422):
        return EXIT_USAGE
    return EXIT_FAILED


def _client_settings(args) -> tuple[str, str, str, float, bool | str]:
    """URL, user, secret, request timeout and TLS check ([client] ca_file, else the system's CAs):
    command line, then environment, then [client]."""
    from service_adapter.config import SECRET_FILE_ENV, ConfigError, load_config, read_secret_file

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            _say(f"config error: {problem}")
        raise _Exit(EXIT_CONFIG) from None
    url = args.url or config.service_url
    user = args.user or config.client_user
    secret_file = args.secret_file or os.environ.get(SECRET_FILE_ENV) or config.client_secret_file
    problems = []
    if not user:
        problems.append("no operator user: pass --user or set [client] user in the config file")
    if not secret_file:
        problems.append(
            f"no secret file: pass --secret-file, set ${SECRET_FILE_ENV}, "
            "or set [client] secret_file in the config file"
        )
    secret = None
    if secret_file:
        try:
            secret = read_secret_file(os.path.abspath(secret_file))
        except ValueError as exc:
            problems.append(f"secret file {secret_file}: {exc}")
    if problems:
        for problem in problems:
            _say(f"config error: {problem}")
        raise _Exit(EXIT_CONFIG)
    return url, user, secret, args.timeout or config.client_timeout_s, config.client_ca_file or True


def _print_json(body: dict) -> None:
    print(json.dumps(body, indent=2, sort_keys=True))


def _wait_for(client, lease_id: str, done_states: tuple[str, ...], timeout_s: float) -> dict:
    """Poll ``show`` (short backoff) until the lease is in ``done_states`` or has ended; raises _Exit on timeout."""
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        lease = client.show(lease_id)
        state = lease.get("state")
        if state in done_states or state in END_STATES:
            return lease
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _say(f"lease {lease_id} is still {state} after {timeout_s:g} s; it goes on (see 'show {lease_id}')")
            raise _Exit(EXIT_TIMEOUT)
        time.sleep(min(delay, remaining))
        delay = min(delay * 1.5, 1.0)


def _wait_timeout(args) -> float:
    return args.timeout or 600.0


def _cmd_reserve(client, args) -> int:
    lease = client.reserve(args.nodes, args.memory, args.duration)
    if args.wait:
        try:
            lease = _wait_for(client, lease["id"], UP_STATES, _wait_timeout(args))
        except _Exit as exc:
            return exc.code
    if args.json:
        _print_json(lease)
    else:
        print(_lease_text(lease))
    if args.wait and lease.get("state") not in UP_STATES:
        _say(f"lease {lease['id']} ended {lease.get('state')} before it was ready" + _reason_suffix(lease))
        return EXIT_FAILED
    return EXIT_OK


def _cmd_release(client, args) -> int:
    lease = client.release(args.lease)
    if args.wait:
        try:
            lease = _wait_for(client, args.lease, END_STATES, _wait_timeout(args))
        except _Exit as exc:
            return exc.code
    if args.json:
        _print_json(lease)
    else:
        print(_lease_text(lease))
    if lease.get("state") in FAILED_STATES:
        _say(f"lease {args.lease} ended {lease.get('state')}" + _reason_suffix(lease))
        return EXIT_FAILED
    return EXIT_OK


def _cmd_list(client, args) -> int:
    states = [s for value in (args.state or []) for s in value.split(",") if s]
    body = client.list(states=states, owner=args.owner)
    if args.json:
        _print_json(body)
    else:
        print(_lease_table(body.get("leases", [])))
    return EXIT_OK


def _cmd_show(client, args) -> int:
    lease = client.show(args.lease)
    if args.json:
        _print_json(lease)
    else:
        print(_lease_text(lease))
    return EXIT_OK


def _cmd_usage(client, args) -> int:
    body = client.usage(owner=args.owner, lease_id=args.lease)
    if args.json:
        _print_json(body)
        return EXIT_OK
    whose = f"operator {args.owner}" if args.owner else "all operators"
    if args.lease:
        whose = f"lease {args.lease}"
    node_s = float(body.get("node_seconds", 0))
    mb_s = float(body.get("mb_seconds", 0))
    print(
        f"{whose}: {body.get('leases', 0)} lease(s), {node_s:.1f} node-seconds ({node_s / 3600:.3f} node-hours), "
        f"{mb_s:.0f} MB-seconds ({mb_s / 3600 / 1024:.3f} GB-hours)"
    )
    return EXIT_OK


def _cmd_vm(client, args) -> int:
    return _VM_COMMANDS[args.vm_command](client, args)


def _cmd_vm_start(client, args) -> int:
    body = client.start_vms(args.lease, args.vm_specs)
    if args.wait:
        names = [vm.get("name") for vm in body.get("vms", [])]
        try:
            body = {"vms": _wait_for_vms(client, args.lease, names, _started, args.wait, "starting")}
        except _Exit as exc:
            return exc.code
    if args.json:
        _print_json(body)
    else:
        print(_vm_table(body.get("vms", [])))
    if args.wait:
        failed = [vm for vm in body["vms"] if vm.get("state") != "running"]
        if failed:
            _say("; ".join(f"VM {vm.get('name')} {vm.get('state')}" + _reason_suffix(vm) for vm in failed))
            return EXIT_FAILED
    return EXIT_OK


def _cmd_vm_stop(client, args) -> int:
    vm = client.stop_vm(args.lease, args.name, force=args.force)
    if args.wait:
        try:
            (vm,) = _wait_for_vms(client, args.lease, [args.name], _stopped, args.wait, "stopping")
        except _Exit as exc:
            return exc.code
    if args.json:
        _print_json(vm)
    else:
        print(_vm_table([vm]))
    if args.wait and vm.get("state") != "stopped":
        _say(f"VM {args.name} of lease {args.lease} is {vm.get('state')}" + _reason_suffix(vm))
        return EXIT_FAILED
    return EXIT_OK


def _cmd_vm_list(client, args) -> int:
    body = client.list_vms(args.lease)
    if args.json:
        _print_json(body)
    else:
        print(_vm_table(body.get("vms", [])))
    return EXIT_OK


def _started(vm: dict) -> bool:
    return vm.get("state") == "running" or vm.get("state") in VM_ENDED


def _stopped(vm: dict) -> bool:
    state = vm.get("state")
    return state in VM_ENDED or (state == "running" and str(vm.get("reason", "")).startswith(STOP_FAILED))


def _wait_for_vms(client, lease_id: str, names: list[str], done, timeout_s: float, doing: str) -> list[dict]:
    """Poll the API (short backoff, at most every 0.5 s) until ``done(vm)`` for each VM; raises _Exit on timeout.

    The operators' API has no long-poll: a remote client has nothing better to wait on.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        if len(names) == 1:
            found = {names[0]: client.show_vm(lease_id, names[0])}
        else:
            found = {vm.get("name"): vm for vm in client.list_vms(lease_id).get("vms", [])}
        vms = [found.get(name, {"name": name, "state": "unknown"}) for name in names]
        waiting = [vm["name"] for vm in vms if not done(vm)]
        if not waiting:
            return vms
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _say(f"VM(s) {', '.join(waiting)} of lease {lease_id} still {doing} after {timeout_s:g} s; "
                 f"they go on (see 'vm list {lease_id}')")
            raise _Exit(EXIT_TIMEOUT)
        time.sleep(min(delay, remaining))
        delay = min(delay * 1.5, 0.5)


_VM_COMMANDS = {"start": _cmd_vm_start, "stop": _cmd_vm_stop, "list": _cmd_vm_list}

_COMMANDS = {
    "reserve": _cmd_reserve, "release": _cmd_release, "list": _cmd_list, "show": _cmd_show, "usage": _cmd_usage,
    "vm": _cmd_vm,
}


# -- text output --------------------------------------------------------------------------------


def _reason_suffix(lease: dict) -> str:
    for key in ("reason", "error", "message"):
        if lease.get(key):
            return f": {lease[key]}"
    return ""


def _when(value) -> str:
    """A time for people: epoch seconds or an RFC 3339 string, shown as UTC to the second."""
    if value is None or value == "":
        return "-"
    if isinstance(value, (int, float)):
        return datetime.datetime.fromtimestamp(value, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    text = str(value)
    return text[:19].replace("T", " ") + "Z" if len(text) >= 19 and text.endswith("Z") else text


def _seconds(value) -> str:
    if value is None:
        return "-"
    try:
        return f"{float(value):g}s"
    except (TypeError, ValueError):
        return str(value)


def _lease_table(leases: list[dict]) -> str:
    if not leases:
        return "no leases"
    header = ("LEASE", "STATE", "OWNER", "NODES", "MB/NODE", "DURATION", "CREATED")
    rows = [
        (
            str(lease.get("id", "?")), str(lease.get("state", "?")), str(lease.get("owner", "-")),
            str(lease.get("nodes", "-")), str(lease.get("memory_mb", "-")), _seconds(lease.get("duration_s")),
            _when(lease.get("created_at")),
        )
        for lease in leases
    ]
    rows = [tuple(printable(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]
    )


def _vm_table(vms: list[dict]) -> str:
    if not vms:
        return "no VMs"
    header = ("VM", "HOST", "STATE", "MB", "REASON")
    rows = [
        (str(vm.get("name", "?")), str(vm.get("host", "-")), str(vm.get("state", "?")),
         str(vm.get("memory_mb", "-")), str(vm.get("reason") or "-"))
        for vm in vms
    ]
    rows = [tuple(printable(cell) for cell in row) for row in rows]  # a pilot wrote the reason
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]
    )


_SHOWN_FIRST = (
    "id", "state", "reason", "owner", "nodes", "memory_mb", "duration_s", "slot", "job_id",
    "created_at", "ready_at", "release_requested_at", "expires_at", "ended_at", "updated_at",
)


def _is_time(key: str, value) -> bool:
    return key.endswith("_at") and (isinstance(value, (int, float)) or (isinstance(value, str) and value.endswith("Z")))


def _usage_text(usage: dict) -> str:
    node_s = float(usage.get("node_seconds", 0))
    mb_s = float(usage.get("mb_seconds", 0))
    return f"{node_s:.1f} node-seconds, {mb_s:.0f} MB-seconds"


def _pilot_text(pilot: dict) -> str:
    words = [str(pilot.get("host", "?")), str(pilot.get("state", "?"))]
    if pilot.get("code"):
        words.append(f"code {pilot['code']}")
    if "memory_mb" in pilot:
        words.append(f"{pilot['memory_mb']} MB")
    if pilot.get("reserved_at"):
        words.append(f"reserved {_when(pilot['reserved_at'])}")
    if pilot.get("updated_at"):
        words.append(f"last heard {_when(pilot['updated_at'])}")
    rest = {k: v for k, v in pilot.items()
            if k not in ("host", "state", "code", "memory_mb", "reserved_at", "updated_at", "expires_at", "seq")}
    words += [f"{k} {v}" for k, v in rest.items()]
    return "  ".join(printable(word) for word in words)  # pilots wrote some of these


def _lease_text(lease: dict) -> str:
    """One lease as ``key  value`` lines, its pilots (one line each) below."""
    keys = [k for k in _SHOWN_FIRST if k in lease] + sorted(
        k for k in lease if k not in _SHOWN_FIRST and k not in ("pilots", "terminal")
    )
    width = max((len(k) for k in keys), default=0)
    lines = []
    for key in keys:
        value = lease[key]
        if key == "usage" and isinstance(value, dict):
            shown = _usage_text(value)
        elif _is_time(key, value):
            shown = _when(value)
        elif value is None or value == "":
            shown = "-"
        elif isinstance(value, (list, dict)):
            shown = json.dumps(value)
        else:
            shown = str(value)
        lines.append(f"{printable(key).ljust(width)}  {printable(shown)}")
    pilots = lease.get("pilots")
    if isinstance(pilots, list):
        lines.append("pilots" + ("" if pilots else "  none reported yet"))
        lines += ["  " + (_pilot_text(p) if isinstance(p, dict) else json.dumps(p)) for p in pilots]
    return "\n".join(lines)
