"""The reference pages are what the code makes, and each command's --help shows the same exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from admin_tools.reference import PAGES, REFERENCE_DIR, exit_tables

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", sorted(PAGES))
def test_the_reference_page_is_what_the_code_makes(name):
    with open(os.path.join(REFERENCE_DIR, name), encoding="utf-8") as handle:
        written = handle.read()
    assert written == PAGES[name](), f"docs/reference/{name} is stale: run python -m admin_tools.reference --write"


HELP = {  # the command line whose --help shows each table
    "workspace-pilot": [sys.executable, "-m", "pilot", "--help"],
    "workspace-vmjob": [sys.executable, "-m", "pilot.vmjob", "run", "--help"],
    "workspace-lease": [sys.executable, "-m", "service_adapter", "--help"],
    "workspace-lease demo": [sys.executable, "-m", "service_adapter", "demo", "--help"],
    "workspace-killall": [sys.executable, "-m", "admin_tools.killall", "--help"],
    "workspace-node-status": [sys.executable, "-m", "admin_tools.nodestatus", "--help"],
    "lease-bench": [sys.executable, "-m", "admin_tools.leasebench.cli", "--help"],
}


@pytest.mark.parametrize("table", exit_tables(), ids=lambda table: table.command)
def test_each_commands_help_shows_its_exit_code_table(table):
    shown = subprocess.run(HELP[table.command], capture_output=True, text=True, timeout=60, cwd=TOP,
                           env={**os.environ, "COLUMNS": "100"})
    assert shown.returncode == 0, shown.stderr
    assert table.help() in shown.stdout
    assert len(table.rows) == len({row.code for row in table.rows})  # one meaning per code


def test_the_docs_index_links_every_page():
    docs = os.path.join(TOP, "docs")
    with open(os.path.join(docs, "README.md"), encoding="utf-8") as handle:
        index = handle.read()
    pages = [os.path.relpath(os.path.join(directory, name), docs)
             for directory, _, files in os.walk(docs) for name in files
             if name.endswith(".md") and os.path.join(directory, name) != os.path.join(docs, "README.md")]
    assert pages and [page for page in pages if f"]({page})" not in index] == []


def test_the_cli_reference_has_every_installed_command_and_subcommand():
    import configparser

    from admin_tools.reference import COMMANDS

    setup = configparser.ConfigParser()
    setup.read(os.path.join(TOP, "setup.cfg"))
    scripts = [line.split("=")[0].strip() for line in setup["options.entry_points"]["console_scripts"].splitlines()
               if line.strip()]
    assert sorted(scripts) == sorted(command for command, _ in COMMANDS)
    with open(os.path.join(REFERENCE_DIR, "cli.md"), encoding="utf-8") as handle:
        page = handle.read()
    shown = subprocess.run([sys.executable, "-m", "service_adapter", "vm", "start", "--help"], capture_output=True,
                           text=True, timeout=60, cwd=TOP, env={**os.environ, "COLUMNS": "100"})
    assert shown.returncode == 0 and f"```text\n{shown.stdout.rstrip()}\n```" in page  # as the command prints it


@pytest.mark.parametrize("example, schema_module", [("pilot.conf.example", "pilot.config"),
                                                    ("service.conf.example", "service_adapter.config")])
def test_the_config_reference_has_every_option_of_the_schema_with_a_meaning(example, schema_module):
    import importlib

    from admin_tools.reference import config_options

    schema = importlib.import_module(schema_module).SCHEMA
    found = config_options(os.path.join(TOP, "packaging", example), schema)
    assert {section: sorted(option for option, _, _ in options) for section, options in found.items()} == \
        {section: sorted(options) for section, options in schema.items() if options}
    assert [option for options in found.values() for option, _, meaning in options if len(meaning) < 10] == []


def test_every_relative_link_in_the_readme_and_docs_points_at_a_file_and_the_readme_stays_short():
    import re

    pages = [os.path.join(TOP, name) for name in ("README.md", "BENCHMARKS.md")] + [
        os.path.join(directory, name) for directory, _, files in os.walk(os.path.join(TOP, "docs"))
        for name in files if name.endswith(".md")]
    broken = []
    for page in pages:
        with open(page, encoding="utf-8") as handle:
            text = handle.read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            path = target.split("#")[0]
            if path and not re.match(r"[a-z]+:", path) and not os.path.exists(
                    os.path.join(os.path.dirname(page), path)):
                broken.append(f"{os.path.relpath(page, TOP)}: {target}")
    assert broken == []
    with open(os.path.join(TOP, "README.md"), encoding="utf-8") as handle:
        assert len(handle.read().splitlines()) < 250  # an entry; the manual is under docs/
