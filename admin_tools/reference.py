"""Reference pages made from the code, so they cannot drift: ``python -m admin_tools.reference [--write]``.

``exit-codes``: every command's exit-code table (each command's
:class:`workspace_common.exitcodes.ExitTable`, the one its ``--help``
shows). ``pilot-config`` and ``service-config``: every option of the two
configuration files with its default and meaning, read from the shipped
examples (``packaging/*.conf.example``, whose every option and default the
config tests check against the code's schema). ``cli``: every command's
and subcommand's ``--help``, from their argparse parsers. ``http-api``:
every route the service serves, from the route tables that register them
(:mod:`service_adapter.routetable`) and their handlers' docstrings.
Without ``--write`` the pages are printed; with it they are written
under ``docs/reference/``. ``tests/test_reference.py`` checks that the
files are what this makes.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_DIR = os.path.join(TOP, "docs", "reference")
MADE_BY = "<!-- Made by `python -m admin_tools.reference --write` from the code; do not edit by hand. -->"


def exit_tables():
    """Every command's exit-code table, in the order the page lists them."""
    from admin_tools.killall import EXITS as KILLALL
    from admin_tools.leasebench.cli import EXITS as LEASE_BENCH
    from admin_tools.nodestatus import EXITS as NODE_STATUS
    from pilot.exitcodes import EXITS as PILOT
    from pilot.vmjob.exitcodes import EXITS as VMJOB
    from service_adapter.cli.common import DEMO_EXITS, EXITS as LEASE

    return (PILOT, VMJOB, LEASE, DEMO_EXITS, KILLALL, NODE_STATUS, LEASE_BENCH)


def exit_codes_page() -> str:
    """``docs/reference/exit-codes.md``."""
    parts = [MADE_BY, "", "# Exit codes", "",
             "Each command's exit statuses, as its `--help` shows them. A batch system's job record keeps the "
             "pilot's; scripts can tell each ending apart by its number.", ""]
    for table in exit_tables():
        parts += [table.markdown()]
    return "\n".join(parts)


_OPTION_RE = re.compile(r"^#?([a-z_]+) =(?: (.*))?$")


def config_options(example_path: str, schema: dict) -> dict[str, list[tuple[str, str, str]]]:
    """Section -> [(option, the example's value, the comment block right above it)] of an example file."""
    sections: dict[str, list[tuple[str, str, str]]] = {}
    section, comment, shared = None, [], ""
    with open(example_path, encoding="utf-8") as handle:
        for raw in handle:
            line = raw.rstrip("\n")
            if line.startswith("[") and line.endswith("]"):
                section, comment, shared = line[1:-1], [], ""
                continue
            match = _OPTION_RE.match(line)
            if section and match and match.group(1) in schema.get(section, {}):
                # Options written one under the other share the comment above the first.
                shared = " ".join(comment) or shared
                sections.setdefault(section, []).append((match.group(1), match.group(2) or "", shared))
                comment = []
            elif line.startswith("#"):
                comment, shared = comment + [line.lstrip("#").strip()], ""
            else:
                comment, shared = [], ""
    return sections


def config_page(title: str, file_name: str, example: str, schema: dict) -> str:
    """A configuration file's reference: per section, each option, its default and what it means."""
    parts = [MADE_BY, "", f"# {title}", "",
             f"Every option of `{file_name}`, as the shipped example `packaging/{os.path.basename(example)}` "
             "documents it (the config tests check that it names every option of the code's schema, each with "
             "the code's default). An unknown section or option is an error.", ""]
    for section, options in config_options(example, schema).items():
        parts += [f"## [{section}]", "", "| option | default (or example) | meaning |", "|---|---|---|"]
        for option, value, meaning in options:
            shown, said = value.replace("|", "\\|") or "(empty)", meaning.replace("|", "\\|")
            parts.append(f"| `{option}` | `{shown}` | {said} |")
        parts.append("")
    return "\n".join(parts)


def pilot_config_page() -> str:
    """``docs/reference/pilot-config.md``."""
    from pilot.config import SCHEMA

    return config_page("Pilot configuration", "/etc/workspace-pilot/pilot.conf",
                       os.path.join(TOP, "packaging", "pilot.conf.example"), SCHEMA)


def service_config_page() -> str:
    """``docs/reference/service-config.md``."""
    from service_adapter.config import SCHEMA

    return config_page("Service configuration", "/etc/workspace-pilot/service.conf",
                       os.path.join(TOP, "packaging", "service.conf.example"), SCHEMA)


#: (command, the module:function that builds its parser), in the order the CLI page lists them.
COMMANDS = (
    ("workspace-pilot", "pilot.cli:build_parser"),
    ("workspace-vmjob", "pilot.vmjob.cli:build_parser"),
    ("workspace-lease", "service_adapter.cli.parser:build_parser"),
    ("workspace-killall", "admin_tools.killall:build_parser"),
    ("workspace-node-status", "admin_tools.nodestatus:build_parser"),
    ("lease-bench", "admin_tools.leasebench.cli:build_parser"),
)

#: Columns the CLI page's help texts are wrapped to (argparse reads $COLUMNS).
HELP_COLUMNS = "100"


def _subparsers(parser: argparse.ArgumentParser):
    """(name, parser) of each subcommand of ``parser``, in the order they were added."""
    for action in parser._actions:  # argparse keeps no public list of subparsers
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _helps(parser: argparse.ArgumentParser):
    """(prog, help text) of ``parser`` and each of its subcommands, depth first."""
    yield parser.prog, parser.format_help()
    for _, sub in _subparsers(parser):
        yield from _helps(sub)


def cli_page() -> str:
    """``docs/reference/cli.md``: each command's and subcommand's ``--help``, wrapped at 100 columns."""
    import importlib

    parts = [MADE_BY, "", "# Commands", "",
             "Every command and subcommand with its `--help`, as the installed command prints it "
             "(at 100 columns). Exit codes: [exit-codes.md](exit-codes.md).", ""]
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        for command, target in COMMANDS:
            module, function = target.split(":")
            helps = list(_helps(getattr(importlib.import_module(module), function)()))
            parts += [f"## {command}", ""]
            if len(helps) > 1:
                parts += ["Subcommands: " + ", ".join(f"`{prog}`" for prog, _ in helps[1:]), ""]
            for prog, text in helps:
                if prog != command:
                    parts += [f"### {prog}", ""]
                parts += ["```text", text.rstrip(), "```", ""]
    finally:
        if before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = before
    return "\n".join(parts)


def route_groups():
    """(title, the module whose text introduces it, its routes) of every route table the service registers."""
    from service_adapter import api, metrics, receiver
    from service_adapter.images import routes as images

    return (("Pilots: notifications and commands", receiver, receiver.ROUTES),
            ("Pilots: images", None, images.PILOT_ROUTES),
            ("Operators and users: leases and VMs", api, api.ROUTES),
            ("Operators: the image catalogue", images, images.OPERATOR_ROUTES),
            ("Metrics", None, metrics.ROUTES))


def _markdown(rst: str) -> str:
    """A docstring's reStructuredText roles and literals as Markdown code."""
    text = re.sub(r":(?:mod|func|class|data|meth):`~?([^`]+)`", r"`\1`", rst)
    return text.replace("``", "`")


def http_api_page() -> str:
    """``docs/reference/http-api.md``: every route, grouped by who calls it, with what its handler says."""
    from service_adapter.routetable import summary

    parts = [MADE_BY, "", "# HTTP API", "",
             "Every route `workspace-lease serve` answers, from the tables that register them. Pilots "
             "authenticate as their node (digest, the pilots' realm), people as operators or users (digest, "
             "the operators' realm; on `[operators] listen` when set). The wire format: "
             "[protocol.md](../protocol.md).", ""]
    for title, module, routes in route_groups():
        parts += [f"## {title}", ""]
        if module is not None:
            # The module's text past its title, but not its pointer to this page.
            text = [part for part in module.__doc__.split("\n\n")[1:] if "http-api.md" not in part]
            parts += [_markdown("\n\n".join(text).strip()), ""]
        parts += ["| method | path | what it does |", "|---|---|---|"]
        for route in routes:
            said = _markdown(summary(route)).replace("|", "\\|")
            parts.append(f"| {route.method} | `{route.path}` | {said} |")
        parts.append("")
    return "\n".join(parts)


#: File name -> what makes it.
PAGES = {"exit-codes.md": exit_codes_page, "pilot-config.md": pilot_config_page,
         "service-config.md": service_config_page, "cli.md": cli_page, "http-api.md": http_api_page}


def main(argv: list[str] | None = None) -> int:
    """Print the reference pages, or write them (``--write``)."""
    parser = argparse.ArgumentParser(prog="python -m admin_tools.reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write the pages under {REFERENCE_DIR}")
    args = parser.parse_args(argv)
    for name, make in PAGES.items():
        text = make()
        if args.write:
            os.makedirs(REFERENCE_DIR, exist_ok=True)
            with open(os.path.join(REFERENCE_DIR, name), "w", encoding="utf-8") as handle:
                handle.write(text)
        else:
            sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
