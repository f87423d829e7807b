"""``workspace-lease image ...``: the site's image catalogue (through the API) and the endorser's two tools.

``keygen`` and ``sign`` run here, without the service: they are what an
endorser uses to publish a list. The others talk to the service.
"""

from __future__ import annotations

import argparse
import json
import os

from workspace_common.cli import OneLineParser
from service_adapter.cli.common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_UNTRUSTED, EXIT_USAGE, say

LOCAL_COMMANDS = ("keygen", "sign")


def add_image_commands(commands, common: argparse.ArgumentParser, epilog: str, formatter) -> None:
    """The ``image`` command and its subcommands."""
    image = commands.add_parser(
        "image", help="image lists, approvals and the endorser's tools",
        description=(
            "A VM may name its image by an image list's identifier instead of a path on the nodes. The service "
            "runs such a VM only if the image is on a subscribed list signed by a trusted endorser key "
            "([images] endorser_keys), the list has not expired, and the site approved that version (and "
            "did not revoke it). 'approve' fetches the image into the service's image store, from which the "
            "pilots fetch it. An endorser makes a key with 'keygen' and publishes lists made with 'sign'."
        ),
        epilog=epilog, formatter_class=formatter,
    )
    images = image.add_subparsers(dest="image_command", metavar="IMAGECOMMAND", required=True,
                                  parser_class=OneLineParser)

    def sub(name: str, help_text: str, description: str, parents=(common,)) -> argparse.ArgumentParser:
        parser = images.add_parser(name, help=help_text, description=description, parents=list(parents),
                                   epilog=epilog, formatter_class=formatter)
        parser.set_defaults(parser=parser)
        return parser

    subscribe = sub("subscribe", "subscribe a signed image list",
                    "Fetch the signed image list at SOURCE (as the service reads it: an absolute path on the "
                    "service host, a file:// or an http(s):// URL), verify its signature against the trusted "
                    "endorser keys and its expiry, and store it. A bad or untrusted list changes nothing "
                    "(exit 9).")
    subscribe.add_argument("source", metavar="SOURCE", help="path or URL of the signed list")

    sub("list", "list the subscribed lists and their images",
        "List the subscribed image lists (issue, expiry, endorser key) and every image they endorse with "
        "the site's decision: endorsed (not approved), approved or revoked, and whether the service's image "
        "store holds it.")

    show = sub("show", "show the versions of one image", "Show every listed version of one image.")
    show.add_argument("identifier", metavar="IMAGE", help="the image's identifier on its list")

    for name, verb, what in (
        ("approve", "approve", "Approve one version of an endorsed image for VMs at this site. The service "
         "first fetches it into its image store and checks its size and sha256 against the list; a failed "
         "fetch approves nothing (exit 1)."),
        ("revoke", "revoke", "Revoke one version (or, without --version, every listed version) of an image: no "
         "VM starts from it any more, and it leaves the service's image store. VMs already running keep "
         "running."),
    ):
        decide = sub(name, f"{verb} an image", what)
        decide.add_argument("identifier", metavar="IMAGE", help="the image's identifier on its list")
        decide.add_argument("--version", metavar="VERSION",
                            help="which version (needed for approve when the list has several)")
        decide.add_argument("--reason", metavar="TEXT", default="", help="why, kept with the decision")

    refresh = sub("refresh", "fetch the subscribed lists again",
                  "Fetch every subscribed list (or one) again from its source. A newer, valid issue replaces the "
                  "stored one (images that left the list can no longer start VMs); a refused issue (bad "
                  "signature, expired, older than the stored one) leaves the stored one and is reported (exit 9 "
                  "if any was refused).")
    refresh.add_argument("list", nargs="?", metavar="LIST", help="only this list (default: all)")

    keygen = sub("keygen", "make an endorser's Ed25519 key pair (local)",
                 "Write a new Ed25519 key pair for signing image lists: the private key (mode 0600) stays "
                 "with the endorser, the public key goes into each subscribing site's [images] endorser_keys "
                 "directory as NAME.pem. Neither file may exist. Prints the key's id.", parents=())
    keygen.add_argument("--private", required=True, metavar="FILE", help="where to write the private key")
    keygen.add_argument("--public", required=True, metavar="FILE", help="where to write the public key")

    sign = sub("sign", "sign an image list (local)",
               "Check an image list (JSON, the format in docs/images.md) and write it signed with an "
               "endorser's private key, ready to publish.", parents=())
    sign.add_argument("list_file", metavar="LIST.json", help="the list to sign")
    sign.add_argument("--key", required=True, metavar="FILE", help="the endorser's private key (from keygen)")
    sign.add_argument("--output", required=True, metavar="FILE", help="where to write the signed list")


# -- local: the endorser's tools -------------------------------------------------------------------


def run_local(args) -> int:
    """``image keygen`` or ``image sign``: no service involved."""
    from service_adapter.images.imagelist import ImageListError, generate_key, load_private_key, sign_list

    if args.image_command == "keygen":
        try:
            kid = generate_key(args.private, args.public)
        except FileExistsError as exc:
            say(f"{exc.filename} exists already: give new file names (a key is never overwritten)")
            return EXIT_USAGE
        except OSError as exc:
            say(f"{exc.filename}: {exc.strerror}")
            return EXIT_CONFIG
        print(f"key {kid}: private {args.private}, public {args.public}")
        return EXIT_OK
    try:
        with open(args.list_file, "rb") as handle:
            payload = json.loads(handle.read())
    except OSError as exc:
        say(f"{args.list_file}: cannot read: {exc.strerror}")
        return EXIT_USAGE
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        say(f"{args.list_file}: not JSON: {str(exc).splitlines()[0]}")
        return EXIT_USAGE
    try:
        envelope = sign_list(payload, load_private_key(args.key))
    except ImageListError as exc:
        say(f"{args.list_file}: {exc}")
        return EXIT_USAGE
    temp = f"{args.output}.tmp-{os.getpid()}"
    try:
        with open(temp, "wb") as handle:
            handle.write(envelope)
        os.replace(temp, args.output)
    except OSError as exc:
        say(f"{args.output}: {exc.strerror}")
        return EXIT_CONFIG
    print(f"signed {args.list_file} -> {args.output}")
    return EXIT_OK


# -- through the service --------------------------------------------------------------------------------


def image_command(client, args) -> int:
    """The image subcommands that talk to the service."""
    command = args.image_command
    if command == "subscribe":
        body = client.subscribe(args.source)
        return _out(args, body, f"subscribed {_list_line(body)}")
    if command == "list":
        body = dict(client.image_lists(), **client.images())
        return _out(args, body, _lists_text(body["lists"]) + "\n\n" + _images_text(body["images"]))
    if command == "show":
        body = client.show_image(args.identifier)
        return _out(args, body, _images_text(body["versions"], urls=True))
    if command in ("approve", "revoke"):
        body = client.decide_image(args.identifier, command, args.version, args.reason)
        return _out(args, body, _images_text(body.get("images", [body])))
    body = client.refresh_lists(args.list)
    refused = [r for r in body["results"] if not r["ok"]]
    text = "\n".join(f"{r['list']}: {'ok, ' if r['ok'] else 'REFUSED: '}{r['message']}" for r in body["results"])
    code = _out(args, body, text or "no lists subscribed")
    if refused:
        say(f"{len(refused)} list(s) refused; the stored issues stay in force")
        return EXIT_UNTRUSTED if all("HTTP" not in r["message"] for r in refused) else EXIT_FAILED
    return code


def _out(args, body: dict, text: str) -> int:
    print(json.dumps(body, indent=2, sort_keys=True) if args.json else text)
    return EXIT_OK


def _list_line(row: dict) -> str:
    expired = " EXPIRED" if row.get("expired") else ""
    error = f" (last refresh refused: {row['last_error']})" if row.get("last_error") else ""
    return (f"{row['identifier']} issue {row['version']} by {row['endorser']} (key {row['key']}), expires "
            f"{row['expires']}{expired}, from {row['source']}{error}")


def _lists_text(rows: list[dict]) -> str:
    if not rows:
        return "no image lists subscribed"
    return "lists:\n" + "\n".join(f"  {_list_line(row)}" for row in rows)


def _images_text(rows: list[dict], urls: bool = False) -> str:
    if not rows:
        return "no images endorsed"
    header = ("IMAGE", "VERSION", "STATE", "SIZE", "STORED", "LIST", "SHA256")
    lines = [(r["identifier"], r["version"], r["state"], _size(r["size"]), "yes" if r["stored"] else "no",
              r["list"], r["sha256"][:16]) for r in rows]
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip() for line in [header, *lines]]
    for row in rows:
        if row.get("decided_by"):
            out.append(f"  {row['identifier']} {row['version']}: {row['state']} by {row['decided_by']} at "
                       f"{row['decided_at']}" + (f": {row['reason']}" if row.get("reason") else ""))
        if urls:
            out.append(f"  {row['identifier']} {row['version']}: sha256 {row['sha256']}, from "
                       + ", ".join(row["urls"]))
    return "\n".join(out)


def _size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)

