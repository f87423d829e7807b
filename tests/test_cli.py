"""Bad input to the commands: one clear line, a distinct exit code, nothing changed on the node."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pilot.exitcodes import ExitCode
from workspace_common.protocol import SLOT_SECRET_ENV
from tests.support.pilots import pilot_config
from tests.support.pool import pool_pages
from tests.support.service import throwaway_node_keys

GOOD_ARGS = ["--slot", "s1", "--memory", "64", "--duration", "10", "--grace", "2"]
#: As the slot's job would set it.
JOB_ENV = {SLOT_SECRET_ENV: "5e" * 32}


def run(*argv: str, module: str = "pilot", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=60,
        env=dict(os.environ, **(JOB_ENV if env is None else env)),
    )


def with_arg(name: str, value: str) -> list[str]:
    args = list(GOOD_ARGS)
    args[args.index(name) + 1] = value
    return args


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "required"),
        (["reserve"], "required"),
        (["reserve", *with_arg("--memory", "-5")], "--memory: -5 must be above 0"),
        (["reserve", *with_arg("--memory", "lots")], "'lots' is not a whole number"),
        (["reserve", *with_arg("--duration", "0")], "--duration"),
        (["reserve", *with_arg("--grace", "nan")], "--grace"),
        (["reserve", *with_arg("--duration", "inf")], "--duration: inf is too large"),
        (["reserve", *with_arg("--slot", "../../etc")], "not a slot id"),
        (["reserve", *GOOD_ARGS, "--host", "bad host"], "not a host name"),
        (["reserve", *GOOD_ARGS, "--contact", "ftp://x"], "not an http:// or https:// URL"),
        (["reserve", *GOOD_ARGS, "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, needle):
    result = run(*argv)
    assert result.returncode == ExitCode.USAGE
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_help_explains_the_exit_codes():
    result = run("reserve", "--help")
    assert result.returncode == 0
    for code in ExitCode:
        assert f"{code.value:>2}  {code.name.lower().replace('_', '-')}" in result.stdout


@pytest.mark.parametrize("command", [
    ["-m", "pilot", "--help"], ["-m", "pilot", "reserve", "--help"], ["-m", "pilot", "evaluate", "--help"],
    ["-m", "admin_tools.killall", "--help"], ["-m", "admin_tools.nodestatus", "--help"],
    ["-c", "from admin_tools.leasebench.cli import main; main()", "--help"],
    ["-m", "service_adapter", "--help"], ["-m", "service_adapter", "vm", "start", "--help"],
    ["-m", "service_adapter", "image", "approve", "--help"],
    ["-m", "pilot.vmjob", "--help"], ["-m", "pilot.vmjob", "run", "--help"], ["-m", "pilot.vmjob", "epilog", "--help"],
], ids=lambda command: " ".join(command[1:]).split(";")[-1].strip())
def test_help_fits_a_100_column_terminal(command):
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, COLUMNS="100"))
    assert result.returncode == 0 and "usage:" in result.stdout
    too_long = [line for line in result.stdout.splitlines() if len(line) > 100]
    assert not too_long


def reference_table(title: str) -> dict[int, str]:
    """docs/reference/exit-codes.md's table under ``title``: code -> its last column, without markup."""
    page = (Path(__file__).parent.parent / "docs" / "reference" / "exit-codes.md").read_text(encoding="utf-8")
    rows = {}
    for line in page[page.index(title):].splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0].isdigit():  # not the header, its rule, a range or the blank line before them
            rows[int(cells[0])] = cells[-1].replace("`", "")
    return rows


def test_the_reference_and_the_help_say_the_same_of_each_exit_code():
    from pilot.exitcodes import MEANING
    from service_adapter.cli.common import EXIT_CODES

    assert reference_table("## `workspace-pilot`") == {code.value: MEANING[code] for code in ExitCode}
    assert reference_table("## `workspace-lease`") == EXIT_CODES
    from pilot.vmjob.exitcodes import MEANING as VMJOB_MEANING, VmJobExit

    assert reference_table("## `workspace-vmjob`") == {c.value: VMJOB_MEANING[c] for c in VmJobExit}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[service]\nrequest_timeout = soon\n", "request_timeout = 'soon'"),
        ("[service]\n[nodes]\nx = 1\n", "unknown section [nodes]"),
        ("[service]\npasword = y\n", "unknown option 'pasword'"),
        ("[service]\nsecret = x\n", "[service] secret is gone: one shared pilot secret let any node act"),
        ("[memory]\nbackend = balloon\n", "backend = 'balloon': must be one of hugepages, cgroup"),
        ("[logging]\ndir = relative/path\n", "must be an absolute path"),
        ("this is not ini\n", "not a valid INI file"),
        ("[service]\nnode_key_file = node.key\n", "node_key_file = 'node.key': must be an absolute path"),
        ("[service]\nnode_key_file = /nonexistent/node.key\n", "node key /nonexistent/node.key: No such file"),
    ],
)
def test_bad_config_exits_3_and_changes_nothing(tmp_path, text, needle):
    config = tmp_path / "pilot.conf"
    config.write_text(text)
    before = pool_pages()
    result = run("reserve", *GOOD_ARGS, "--contact", "http://127.0.0.1:1", "--config", str(config))
    assert result.returncode == ExitCode.CONFIG
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("workspace-pilot: config error: ") for line in lines)
    assert any(needle in line for line in lines), result.stderr
    assert pool_pages() == before


def test_every_config_problem_is_listed(tmp_path):
    config = tmp_path / "pilot.conf"
    config.write_text("[service]\nrequest_timeout = -1\n[journal]\nlock_timeout = x\n")
    result = run("reserve", *GOOD_ARGS, "--config", str(config), "--contact", "http://127.0.0.1:1")
    assert result.returncode == ExitCode.CONFIG
    assert len(result.stderr.strip().splitlines()) == 2


def test_missing_config_file_exits_3(tmp_path):
    result = run("reserve", *GOOD_ARGS, "--config", str(tmp_path / "absent.conf"))
    assert result.returncode == ExitCode.CONFIG
    assert "cannot read" in result.stderr


@pytest.mark.parametrize("how", ["group-writable", "under a file", "someone else's"])
def test_unusable_journal_directory_is_one_line_exit_11_and_changes_nothing(tmp_path, hugepages, how):
    journal = tmp_path / "journal"
    if how == "group-writable":
        journal.mkdir(mode=0o700)
        os.chmod(journal, 0o770)
    elif how == "under a file":
        (tmp_path / "file").write_text("")
        journal = tmp_path / "file" / "journal"
    else:
        journal.mkdir(mode=0o700)
        os.chown(journal, 65534, 65534)
    config = pilot_config(tmp_path, "http://127.0.0.1:1", throwaway_node_keys(tmp_path), sections={"journal": {"dir": journal}})
    result = run("reserve", *GOOD_ARGS, "--config", config, "--grace", "1")
    assert result.returncode == ExitCode.JOURNAL
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("workspace-pilot: journal error:"), result.stderr
    assert str(journal) in lines[0]
    assert pool_pages() == hugepages
    assert not (tmp_path / "logs").exists()  # it stopped before anything else


def test_unwritable_log_directory_exits_3(tmp_path):
    config = tmp_path / "pilot.conf"
    (tmp_path / "file").write_text("")
    config.write_text(
        f"[service]\nnode_key_file = {throwaway_node_keys(tmp_path)}\n"
        f"[logging]\ndir = {tmp_path / 'file' / 'logs'}\n[journal]\ndir = {tmp_path / 'journal'}\n"
    )
    result = run("reserve", *GOOD_ARGS, "--config", str(config), "--contact", "http://127.0.0.1:1",
                 "--host", "node1")
    assert result.returncode == ExitCode.CONFIG
    assert "log directory" in result.stderr


def test_lease_command_refuses_bad_arguments_with_one_line():
    result = run("demo", "--nodes", "0", module="service_adapter")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--nodes" in lines[0]


def test_through_sudo_the_batch_user_cannot_choose_the_config(tmp_path):
    # A config of the caller's would let them pick what root runs ([memory] xl_command) and where it writes.
    config = pilot_config(tmp_path, "http://127.0.0.1:1", throwaway_node_keys(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "pilot", "reserve", *GOOD_ARGS, "--config", config],
        capture_output=True, text=True, env=dict(os.environ, SUDO_USER="alice", SUDO_UID="1000", **JOB_ENV),
    )
    assert result.returncode == ExitCode.USAGE
    assert result.stderr.strip().splitlines() == [
        "workspace-pilot: usage error: --config is refused through sudo; the pilot reads /etc/workspace-pilot/pilot.conf"
    ]
    assert not (tmp_path / "journal").exists()


@pytest.mark.parametrize("flags, console, debug", [((), "stderr", False), (("--stdout",), "stdout", False),
                                                   (("--stdout", "--verbose"), "stdout", True)])
def test_log_lines_go_where_asked_and_always_to_the_slot_log(tmp_path, hugepages, flags, console, debug):
    # Nothing listens at the contact: the pilot reserves, cannot report, gives back and exits 6.
    config = pilot_config(tmp_path, "http://127.0.0.1:1", throwaway_node_keys(tmp_path), reserved_timeout_s=0.3)
    result = run("reserve", *GOOD_ARGS, "--config", config, "--host", "node1", *flags)
    assert result.returncode == ExitCode.SERVICE_UNREACHABLE
    shown, other = (result.stdout, result.stderr) if console == "stdout" else (result.stderr, result.stdout)
    assert "state reserving -> reserved" not in shown and "state begin -> reserving" in shown
    assert other == ""
    assert (" DEBUG " in shown) is debug
    slot_log = (tmp_path / "logs" / "s1.node1.log").read_text()
    assert "took 64 MB from the host" in slot_log and "gave 64 MB back" in slot_log
    assert pool_pages() == hugepages


def test_without_the_slot_secret_in_its_environment_the_pilot_is_one_line_exit_2(tmp_path):
    config = pilot_config(tmp_path, "http://127.0.0.1:1", throwaway_node_keys(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != SLOT_SECRET_ENV}
    result = run("reserve", *GOOD_ARGS, "--config", config, "--host", "node1", env=env)
    assert result.returncode == ExitCode.USAGE
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("workspace-pilot: usage error: no slot secret: $WORKSPACE_PILOT_SLOT_SECRET is not set")
    assert not (tmp_path / "journal").exists()


@pytest.mark.parametrize("problem, needle", [
    ("open to others", "is open to group or others (mode 0644): chmod 600 it"),
    ("not a key", "does not hold 64 lowercase hex digits"),
    ("someone else's", "belongs to uid 65534"),
    ("absent", "No such file or directory (make it on the service's host with: workspace-lease node-key HOST)"),
])
def test_an_unusable_node_key_is_one_line_exit_3_and_changes_nothing(tmp_path, hugepages, problem, needle):
    keys = throwaway_node_keys(tmp_path)
    key_file = keys.replace("{host}", "node1")
    if problem == "open to others":
        os.chmod(key_file, 0o644)
    elif problem == "not a key":
        with open(key_file, "w", encoding="ascii") as handle:
            handle.write("change-me\n")
    elif problem == "someone else's":
        os.chown(key_file, 65534, 65534)
    else:
        os.unlink(key_file)
    config = pilot_config(tmp_path, "http://127.0.0.1:1", keys)
    result = run("reserve", *GOOD_ARGS, "--config", config, "--host", "node1")
    assert result.returncode == ExitCode.CONFIG
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"workspace-pilot: config error: [service] node_key_file: node key {key_file}")
    assert needle in line, line
    assert pool_pages() == hugepages
    assert not (tmp_path / "logs").exists()


def test_what_the_pilot_starts_after_reading_the_slot_secret_does_not_inherit_it():
    """The pilot takes the secret out of its environment first: a child (xl, squeue, sudo) never sees it."""
    code = ("import subprocess; from pilot.credentials import take_slot_secret; secret = take_slot_secret(); "
            "child = subprocess.run(['env'], capture_output=True, text=True).stdout; "
            "print(len(secret), 'WORKSPACE_PILOT_SLOT_SECRET' in child)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, **JOB_ENV))
    assert result.stdout.split() == ["64", "False"], result.stderr
