"""The command line of ``workspace-lease``: every command, option and argument type, with --help that explains."""

from __future__ import annotations

import argparse
import re

from workspace_common.cli import OneLineParser, WrappingFormatter, http_url, positive
from service_adapter.cli.common import DEMO_EXITS, EXIT_CODES_HELP
from service_adapter.cli.images import add_image_commands

def start_time(text: str) -> str:
    """An argparse type: ``+SECONDS`` or an ISO 8601 date and time (local unless it has Z or an offset), as the
    API's RFC 3339 UTC string."""
    import datetime

    text = text.strip()
    now = datetime.datetime.now(datetime.timezone.utc)
    try:
        if text.startswith("+"):
            when = now + datetime.timedelta(seconds=float(text[1:]))
        else:
            when = datetime.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
            when = when.astimezone(datetime.timezone.utc)  # a naive time is the local time
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"{text[:60]!r} is not +SECONDS or a date and time such as 2026-12-24T18:00 (or ...Z)") from None
    if when <= now:
        raise argparse.ArgumentTypeError(f"{text[:60]} is not in the future")
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
    group.add_argument("--url", type=http_url, metavar="URL",
                       help="the service's base URL (default [client] url, else this host's [service] listener)")
    group.add_argument("--user", metavar="USER", help="operator account (default [client] user)")
    group.add_argument("--secret-file", metavar="FILE",
                       help="file holding the operator's digest secret, mode 0600 "
                            "(default $WORKSPACE_LEASE_SECRET_FILE, else [client] secret_file)")
    group.add_argument("--timeout", type=positive(float), metavar="SECONDS",
                       help="per request (default [client] timeout, 60)"
                            + ("; with --wait also the longest wait (default 600)" if timeout_waits else ""))
    common.add_argument("--json", action="store_true", help="print exactly the API's JSON answer instead of text")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``workspace-lease``."""
    parser = OneLineParser(
        prog="workspace-lease",
        description=(
            "Lease batch nodes' memory to virtual machines through pilot jobs. 'serve' runs the service; "
            "reserve, release, extend, list, show, events, usage and vm (start, stop, suspend, resume, list a "
            "lease's VMs) talk to it over HTTP "
            "(digest-authenticated as an operator); 'demo' runs one lease on this machine."
        ),
        epilog=EXIT_CODES_HELP,
        formatter_class=WrappingFormatter,
    )
    from workspace_common import __version__

    parser.add_argument("--version", action="version", version=f"workspace-lease {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser)
    common = _client_options()

    def sub(name: str, help_text: str, description: str, parents=(common,)) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=help_text, description=description, parents=list(parents), epilog=EXIT_CODES_HELP,
            formatter_class=WrappingFormatter,
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
    reserve.add_argument("--nodes", required=True, type=positive(int, "a whole number"), help="how many nodes")
    reserve.add_argument("--memory", required=True, type=positive(int, "a whole number"), metavar="MB",
                         help="memory per node, in MB")
    reserve.add_argument("--duration", required=True, type=positive(float), metavar="SECONDS",
                         help="how long the lease lasts once its pilots start")
    reserve.add_argument("--image", dest="images", action="append", type=_listed_image, metavar="IMAGE[:VERSION]",
                         help="an image (by its image list identifier) the lease's VMs will use: each host fetches "
                              "it into its cache as soon as it has reserved, so a VM start does not wait for the "
                              "download; it must be approved here (exit 8 otherwise). Repeatable")
    reserve.add_argument("--start-at", type=start_time, metavar="TIME",
                         help="start the lease later: +SECONDS from now, or a date and time (2026-12-24T18:00, "
                              "local time unless it ends in Z or an offset such as +01:00). The pilot job is "
                              "submitted now with the batch system's begin time, so it plans the nodes in "
                              "advance; the lease is 'scheduled' until then, and a release cancels it cleanly")
    reserve.add_argument("--release-when-idle", type=positive(float), metavar="SECONDS",
                         help="give the nodes back once no VM has been on the lease for SECONDS (counted from "
                              "when it is ready or its last VM ended): a site without a controller such as "
                              "COBalD gets idle nodes back by itself")
    reserve.add_argument("--exclude-node", dest="exclude_nodes", action="append", metavar="NODE",
                         help="a node the batch system must not give the lease's job (one whose VMs keep failing); "
                              "Slurm and Grid Engine only. Repeatable")
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

    extend = sub(
        "extend", "make a lease longer",
        "Ask for a lease to last SECONDS longer. The service first asks the batch system for the pilot job's "
        "longer time limit (its policy decides, and the partition's or queue's limit: beyond it the extension "
        "is refused, exit 8, and nothing changes); only then does it tell each pilot, which moves its own "
        "deadline. Prints the lease with its new duration and end.",
    )
    extend.add_argument("lease", type=_lease_id, metavar="LEASE", help="the lease id")
    extend.add_argument("--by", required=True, type=positive(float), metavar="SECONDS", help="how much longer")

    events = sub(
        "events", "a lease's history: its states, its before-end event, its extensions",
        "Print a lease's events, oldest first, one per line: number, time, kind (created, state, ending, "
        "extended) and what happened. 'ending' is the before-end event, recorded [pilots] warn_before seconds "
        "before the lease's end (or at a release), when the pilots warn their VMs.",
    )
    events.add_argument("lease", type=_lease_id, metavar="LEASE", help="the lease id")
    events.add_argument("--after", type=positive(int, "a whole number", zero=True), default=0, metavar="N",
                        help="only the events numbered above N (what an earlier call printed last)")
    events.add_argument("--follow", action="store_true",
                        help="keep printing new events until the lease has ended: exit 0 released or expired, "
                             "1 failed or missing; at most --timeout (exit 7)")

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
    add_image_commands(commands, _client_options(timeout_waits=False), EXIT_CODES_HELP, WrappingFormatter)

    site_key = commands.add_parser(
        "site-key", help="make the site key that every node's key derives from (once, on the service's host)",
        description=(
            "Write a new random site key to FILE (mode 0600; an existing file is never replaced). The service "
            "reads it from [pilots] site_key_file; each node's key is derived from it (see node-key). Keep it "
            "as secret as the service's store: with it anyone can act as any node."
        ),
        epilog=EXIT_CODES_HELP, formatter_class=WrappingFormatter,
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
        epilog=EXIT_CODES_HELP, formatter_class=WrappingFormatter,
    )
    node_key.add_argument("host", type=_host_name, metavar="HOST",
                          help="the node's name as its pilots report it (Slurm's node name, else its short host name)")
    node_key.add_argument("--config", metavar="FILE",
                          help="the service's config file (default /etc/workspace-pilot/service.conf)")
    node_key.add_argument("--site-key-file", metavar="FILE", help="read the site key from FILE instead")
    node_key.add_argument("--output", metavar="FILE", help="write the key to FILE (created 0600) instead of printing it")

    demo = commands.add_parser(
        "demo",
        help="run one lease on this machine through the local provider (needs root); --vm boots a VM in it",
        description=(
            "Start the notification receiver on 127.0.0.1, lease NODES simulated nodes (one local "
            "pilot process each) with real 2 MiB hugepage reservations, print every step with its "
            "time, and show that the hugepage pool ends where it started. With --vm the lease is one node, "
            "this machine: the site approves a real cloud image (Debian 12 with cloud-init, built by "
            "scripts/build-cloud-image.sh) through its signed-list catalogue, the pilot boots a VM of it on a "
            "lease network, the demo logs in with ssh, shows what the guest says and how to log in, and "
            "checks that the VM and its network are gone at the end. Without libvirt/QEMU or the image it "
            "says what to install and runs the memory-only lease."
        ),
        epilog=DEMO_EXITS.help(), formatter_class=WrappingFormatter,
    )
    demo.add_argument("--nodes", type=positive(int), help="simulated nodes (default 2; with --vm 1, the only choice)")
    demo.add_argument("--memory", type=positive(int), metavar="MB",
                      help="MB per node (default 64; with --vm 576: a 512 MB VM and the site's 64 MB overhead)")
    demo.add_argument("--duration", type=positive(float), metavar="SECONDS",
                      help="lease length (default 20; with --vm 300: time to boot under emulation and log in)")
    demo.add_argument("--grace", type=positive(float), default=10, metavar="SECONDS",
                      help="the pilots' time to restore and report once stopped (default 10)")
    demo.add_argument("--release-after", type=positive(float), metavar="SECONDS",
                      help="release the lease early (SIGTERM to the pilots) after this long (with --vm: this "
                           "long after the guest answered); default: let the pilots end it at their own deadline")
    demo.add_argument("--vm", action="store_true", help="also boot a VM of the cloud image in the lease and log in")
    demo.add_argument("--vm-image", metavar="DIR", default=".cache/cloud-image",
                      help="the cloud image's directory: disk.qcow2, vmlinuz, initrd.img (default .cache/cloud-image, "
                           "where scripts/build-cloud-image.sh writes it in a clone)")
    demo.add_argument("--workdir", metavar="DIR", help="where the store, pilot config and logs go (default: a new temp dir)")
    demo.add_argument(
        "--journal-dir", metavar="DIR", default="/var/lib/workspace-pilot",
        help="the pilots' node journal (default /var/lib/workspace-pilot, as on a real node)",
    )
    demo.add_argument("--verbose", action="store_true", help="also print the service's own log")
    return parser


# -- vm: the leases' VMs --------------------------------------------------------------------------


_VM_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


def _listed_image(text: str) -> dict:
    from workspace_common.protocol import IMAGE_NAME_RE, IMAGE_VERSION_RE

    identifier, _, version = text.partition(":")
    if not IMAGE_NAME_RE.fullmatch(identifier) or (version and not IMAGE_VERSION_RE.fullmatch(version)):
        raise argparse.ArgumentTypeError(f"{text[:80]!r} is not IMAGE or IMAGE:VERSION (an image list's identifier)")
    return {"image": identifier, **({"version": version} if version else {})}


def _vm_name(text: str) -> str:
    if not _VM_NAME_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a VM name (a letter or digit, then letters, digits, . _ -; at most 64)"
        )
    return text


def _host_name(text: str) -> str:
    if not HOST_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name")
    return text


def _sha256(text: str) -> str:
    lowered = text.lower()
    if not re.fullmatch(r"[0-9a-f]{64}", lowered):
        raise argparse.ArgumentTypeError(f"{text[:80]!r} is not a sha256 (64 hex digits, as sha256sum prints)")
    return lowered


def _add_vm_commands(commands, common: argparse.ArgumentParser) -> None:
    vm = commands.add_parser(
        "vm", help="start, stop, suspend, resume and list a lease's virtual machines",
        description=(
            "The VMs of a ready lease: 'vm start' places them on the lease's hosts (each host's reserved "
            "memory respected, with the service's per-VM overhead) and queues their start to the pilots; "
            "'vm stop' queues a stop; 'vm suspend' and 'vm resume' pause a VM and let it run again; "
            "'vm list' shows them. The pilots report each outcome."
        ),
        epilog=EXIT_CODES_HELP, formatter_class=WrappingFormatter,
    )
    vms = vm.add_subparsers(dest="vm_command", metavar="VMCOMMAND", required=True, parser_class=OneLineParser)

    def sub(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        parser = vms.add_parser(name, help=help_text, description=description, parents=[common],
                                epilog=EXIT_CODES_HELP, formatter_class=WrappingFormatter)
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
                            'spec is {"name", "memory_mb", "vcpus", "disk": {"path", "sha256", "readonly"} or '
                            '{"image", "version", "readonly"}, '
                            '"boot": {"kernel": {"path", "sha256"}, "initrd": {...}, "cmdline"}, "network", '
                            '"console_log", "context": {"hostname", "ssh_authorized_keys", "user_data"}} plus an '
                            'optional "host". Not with the options below')
    one = start.add_argument_group("one VM from options (instead of --spec)")
    one.add_argument("--name", type=_vm_name, metavar="NAME",
                     help="the VM's name, unique among the lease's active VMs (required)")
    one.add_argument("--memory", type=positive(int, "a whole number"), metavar="MB",
                     help="the VM's memory in MB (required); the service adds its per-VM overhead when placing")
    one.add_argument("--vcpus", type=positive(int, "a whole number"), metavar="N", help="virtual CPUs (default 1)")
    one.add_argument("--image", metavar="PATH",
                     help="the disk image on the nodes (in the pilots' image directory); needs --image-sha256")
    one.add_argument("--image-sha256", type=_sha256, metavar="HEX", help="the image's sha256, as sha256sum prints it")
    one.add_argument("--image-name", metavar="IMAGE",
                     help="instead of --image: an image by its identifier on a subscribed image list; it must be "
                          "approved here (see 'workspace-lease image'); the pilots fetch it")
    one.add_argument("--image-version", metavar="VERSION",
                     help="which version of --image-name (default: the one approved version)")
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
    one.add_argument("--hostname", metavar="NAME",
                     help="give the VM a cloud-init seed (NoCloud) with this host name (default: its name when "
                          "--ssh-key or --user-data asks for a seed)")
    one.add_argument("--ssh-key", dest="ssh_keys", action="append", metavar="FILE",
                     help="an OpenSSH public key file whose keys go on the VM's seed (repeatable)")
    one.add_argument("--user-data", metavar="FILE", help="cloud-init user-data for the VM's seed (at most 32 KiB)")
    one.add_argument("--host", type=_host_name, metavar="HOST",
                     help="place the VM on this host of the lease (default: the host with the most room)")
    start.add_argument("--wait", type=positive(float), metavar="SECONDS",
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
    stop.add_argument("--wait", type=positive(float), metavar="SECONDS",
                      help="then wait up to SECONDS until it has stopped (exit 0), or the stop failed or the "
                           "VM was lost (exit 1); exit 7 if still stopping then")

    for action, doing in (("suspend", "pause"), ("resume", "let run again")):
        pause = sub(
            action, f"{doing} a VM of a lease",
            ("Queue a suspend of a running VM: its pilot pauses it (libvirt suspend): it keeps its memory on "
             "the node and uses no CPU until resumed. 'vm list' shows it paused." if action == "suspend" else
             "Queue a resume of a paused VM: it runs again where it stopped.")
            + " Refused (exit 8) if the VM is not " + ("running." if action == "suspend" else "paused."),
        )
        pause.add_argument("lease", type=_lease_id, metavar="LEASE", help="the lease id")
        pause.add_argument("name", type=_vm_name, metavar="NAME", help="the VM's name")
        pause.add_argument("--wait", type=positive(float), metavar="SECONDS",
                           help="then wait up to SECONDS until the pilot has done it (exit 0), or it failed "
                                "(exit 1); exit 7 if not done then")

    listing = sub("list", "list a lease's VMs",
                  "List a lease's VMs, oldest first (ended ones too): name, host, state, memory and why; where "
                  "the site gives VMs addresses, each VM's address and, to the lease's owner, where to log in "
                  "(LOGIN: the node's address and the port it forwards to the VM's SSH, or the VM's own).")
    listing.add_argument("lease", type=_lease_id, metavar="LEASE", help="the lease id")

    show = sub("show", "show one VM of a lease",
               "Show one VM: its node, state and why, size, times, its address, MAC and host name, and, to the "
               "lease's owner, how to log in to it.")
    show.add_argument("lease", type=_lease_id, metavar="LEASE", help="the lease id")
    show.add_argument("name", type=_vm_name, metavar="NAME", help="the VM's name")


