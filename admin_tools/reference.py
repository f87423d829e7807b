"""Reference pages made from the code, so they cannot drift: ``python -m admin_tools.reference [--write]``.

``exit-codes``: every command's exit-code table (each command's
:class:`workspace_common.exitcodes.ExitTable`, the one its ``--help``
shows). Without ``--write`` the pages are printed; with it they are written
under ``docs/reference/``. ``tests/test_reference.py`` checks that the
files are what this makes.
"""

from __future__ import annotations

import argparse
import os
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


#: File name -> what makes it.
PAGES = {"exit-codes.md": exit_codes_page}


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
