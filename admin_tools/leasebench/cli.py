"""``lease-bench``: stand leases up and tear them down on a real LRM, phase by phase, beside an LRM-only job.

For each N it runs R rounds of two kinds, interleaved so drift hits both
alike: a do-nothing job submitted and cancelled the way a lease's pilot
job is (the baseline), and a lease of N nodes through the operator API
(reserve, optionally one VM per node, release). It prints a table of each
phase's median, min, max and interquartile range per N, and writes JSON
and a PNG when asked. The phases and how clocks are handled are in
``admin_tools/leasebench/phases.py`` and ``docs/lease-bench.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from workspace_common.protocol import format_time, utc_now
from workspace_common.cli import OneLineParser, WrappingFormatter, quiet_on_closed_pipe
from workspace_common.exitcodes import ExitCodeRow, ExitTable

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_SETUP = 3
EXIT_ROUND = 4
EXIT_NOT_CLEAN = 5

DEFAULT_NODES = (1, 2, 4, 8, 16)
NR_HUGEPAGES = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"

EXITS = ExitTable("lease-bench", (
    ExitCodeRow(0, "every round completed; the report is printed (and written)"),
    ExitCodeRow(2, "a bad command-line argument"),
    ExitCodeRow(3, "the bench cannot run here (bad --config, not root for the hugepages backend, no matplotlib for "
                   "--plot, the site would not start)"),
    ExitCodeRow(4, "a round failed (a lease that did not get ready or released, a baseline job that did not start or "
                   "stop in time); what was measured until then is still reported"),
    ExitCodeRow(5, "the node is not as it was: the hugepage pool differs from its size before the bench"),
))
EXIT_HELP = EXITS.help()

EPILOG = """phases (each round's phases are consecutive, so they add up to its total):
  stand-up   client -> dispatch -> pilot_start -> notification -> ready
             (request to submit, submit to the last pilot's process start, its start to
             reserved sent, sent to stored, stored to the lease ready)
  pilot      boot -> shrink -> report: the critical pilot's start split at the memory take
             (shrink is Nimbus's "dom0 shrink")
  vm         request -> delivery -> create -> report (with --vm test: one VM per node)
  tear-down  client -> stop_signal -> vm_destroy -> restore -> notification -> released
  LRM-only   a do-nothing job: submit to its payload's start on the last node; cancel to its
             SIGTERM

clocks: pilot moments are on each node's clock. --clocks auto (default) estimates each node's
offset NTP-style from its reserved notification and applies it only where it exceeds its own
uncertainty; always applies it; never trusts one shared clock.

""" + EXIT_HELP


def _positive_int(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 4096:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to 4096")
    return int(text)


def _pilot_option(text: str) -> tuple[str, str, str]:
    key, sep, value = text.partition("=")
    section, dot, name = key.partition(".")
    if not sep or not dot or not section or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not SECTION.KEY=VALUE")
    return section, name, value


def build_parser() -> argparse.ArgumentParser:
    """The command line (``--help`` lists the phases, the clock handling and the exit codes)."""
    parser = OneLineParser(
        prog="lease-bench",
        description="Stand leases up and tear them down on a real LRM, phase by phase, beside an LRM-only job.",
        epilog=EPILOG, formatter_class=WrappingFormatter,
    )
    parser.add_argument("--provider", choices=("local", "slurm", "pbs"), default="local",
                        help="the LRM (default local: one process per simulated node on this machine)")
    parser.add_argument("--config", metavar="FILE",
                        help="a service config whose [provider] section says how to submit (needed for slurm "
                             "and pbs; its store and receiver are NOT used: the bench runs its own)")
    parser.add_argument("--nodes", type=_positive_int, nargs="+", metavar="N",
                        help="node counts (default 1 2 4 8 16, those the cluster has)")
    parser.add_argument("--rounds", type=_positive_int, default=5, metavar="R",
                        help="measured rounds per N and kind (default 5), after one warm-up round")
    parser.add_argument("--memory", type=_positive_int, default=64, metavar="MB",
                        help="memory per node per lease (default 64)")
    parser.add_argument("--memory-backend", choices=("hugepages", "cgroup", "none"), default="hugepages",
                        help="how the pilots take the memory (default hugepages; cgroup needs --pilot-option "
                             "memory.cgroup=PATH)")
    parser.add_argument("--vm", choices=("none", "test"), default="none",
                        help="VMs per lease: none, or one per node on libvirt's test driver (default none)")
    parser.add_argument("--clocks", choices=("auto", "always", "never"), default="auto",
                        help="correct pilots' clock offsets: auto (when above their uncertainty), always, never")
    parser.add_argument("--pilot-option", type=_pilot_option, action="append", default=[], metavar="S.K=V",
                        help="an extra pilot config option, e.g. timing.walltime_margin=20 (repeatable)")
    parser.add_argument("--listen", default="127.0.0.1", metavar="HOST",
                        help="where the bench's receiver listens (default 127.0.0.1)")
    parser.add_argument("--contact", metavar="URL",
                        help="the URL pilots report to (default the receiver's own; give this host's name "
                             "when the nodes are other machines)")
    parser.add_argument("--workdir", metavar="DIR",
                        help="where the store, pilot config, journal and logs go (default a new temporary "
                             "directory, removed afterwards; on a cluster: one the nodes share)")
    parser.add_argument("--timeout", type=_positive_int, default=120, metavar="S",
                        help="how long one lease or job may take to start or end (default 120)")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="write the results as JSON to FILE (no FILE: to stdout, instead of the table)")
    parser.add_argument("--plot", metavar="FILE.png", help="draw each stage's phases against N as a PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    return parser


@quiet_on_closed_pipe
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lease-bench`` (its leases are released as ever when its reader goes away: exit 141); returns an exit code from :data:`EXIT_HELP`."""
    args = build_parser().parse_args(argv)
    from admin_tools.leasebench import report

    try:
        options = _options(args)
    except SetupError as exc:
        return _fail(EXIT_SETUP, str(exc))
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        return _fail(EXIT_SETUP, f"--plot {args.plot}: its directory does not exist")
    if args.json and args.json != "-" and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        return _fail(EXIT_SETUP, f"--json {args.json}: its directory does not exist")  # before the rounds, not after
    if args.plot:
        try:
            report.import_pyplot()
        except report.ReportError as exc:
            return _fail(EXIT_SETUP, str(exc))
    nodes = cluster_nodes(options)
    size = None if nodes is None else len(nodes)
    options = dataclasses.replace(options, cluster_nodes=tuple(nodes or ()))
    wanted = sorted(set(args.nodes or DEFAULT_NODES))
    counts = [n for n in wanted if size is None or n <= size]
    if len(counts) < len(wanted):
        skipped = ", ".join(str(n) for n in wanted if n not in counts)
        print(f"lease-bench: N = {skipped} skipped: the cluster has {size} node(s)", file=sys.stderr)
    if not counts:
        return _fail(EXIT_SETUP, "no node count fits the cluster")
    pool_before = _pool()
    command = "lease-bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    results, code = _measure(args, options, counts, command)
    if code == EXIT_SETUP:
        return code
    summary = report.summarize(results)
    if args.json:
        text = report.to_json(results, summary)
        if args.json == "-":
            sys.stdout.write(text)
        else:
            with open(args.json, "w", encoding="utf-8") as handle:
                handle.write(text)
    if args.json != "-":
        print(report.format_table(results, summary))
    if args.plot and results["rounds"]:
        try:
            report.plot_png(results, summary, args.plot)
        except report.ReportError as exc:
            return _fail(EXIT_SETUP, str(exc))
    if pool_before is not None and _pool() != pool_before:
        return _fail(EXIT_NOT_CLEAN, f"the hugepage pool is at {_pool()} pages, it was {pool_before} before the bench")
    return code


class SetupError(Exception):
    """The bench cannot run as asked; one line saying why."""


def _options(args):
    from admin_tools.leasebench.runner import BenchOptions

    settings = None
    if args.provider != "local":
        if not args.config:
            raise SetupError(f"--provider {args.provider} needs --config FILE (a service config: its [provider] section)")
        from service_adapter.config import ConfigError, load_config

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            raise SetupError(f"--config {args.config}: {exc}") from None
        settings = config.provider_settings()
        if settings.name != args.provider:
            raise SetupError(f"--config {args.config} names provider {settings.name}, not {args.provider}")
    if args.memory_backend == "hugepages" and (os.geteuid() != 0 or not os.access(NR_HUGEPAGES, os.W_OK)):
        raise SetupError("the hugepages backend needs root and a writable 2 MiB hugepage pool "
                         "(or pass --memory-backend none)")
    if args.vm == "test":
        try:
            import libvirt  # noqa: F401
        except ImportError:
            raise SetupError("--vm test needs libvirt-python (pip install libvirt-python)") from None
    return BenchOptions(
        provider=args.provider, settings=settings, memory_mb=args.memory, memory_backend=args.memory_backend,
        vm=args.vm, clocks=args.clocks, timeout_s=float(args.timeout), listen_host=args.listen,
        contact=args.contact, pilot_options=tuple(args.pilot_option),
    )


def cluster_nodes(options) -> list[str] | None:
    """The LRM's node names (sinfo, pbsnodes); None for the local provider or when it cannot tell."""
    if options.settings is None or options.settings.name == "local":
        return None
    env = {**os.environ, **(options.settings.env or {})}
    argv = ["sinfo", "-h", "-N", "-o", "%N"] if options.settings.name == "slurm" else ["pbsnodes", "-a"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    if options.settings.name == "slurm":
        return sorted(set(out.split())) or None
    return [line.strip() for line in out.splitlines() if line.strip() and not line[0].isspace()] or None


#: How many bare interpreter starts the median is taken over.
INTERPRETER_RUNS = 15


def interpreter_start_ms(runs: int = INTERPRETER_RUNS) -> float:
    """The median wall time of ``python -c pass`` with the pilots' interpreter (this one: the same venv, the
    same site start-up), from fork to exit: what the pilot's boot is read against."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _measure(args, options, counts: list[int], command: str) -> tuple[dict, int]:
    from admin_tools.leasebench import report
    from admin_tools.leasebench.phases import PHASE_HELP, STAGES
    from admin_tools.leasebench.runner import Bench

    results = {
        "bench": {
            "interpreter_start_ms": interpreter_start_ms(),
            "provider": args.provider, "vm": args.vm, "memory_backend": args.memory_backend,
            "rounds": args.rounds, "node_counts": counts, "memory_mb": args.memory, "clocks": args.clocks,
            "command": command,
            "started_at": format_time(utc_now()),
            "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                        "kernel": platform.release()},
        },
        "stages": {name: list(phases) for name, phases in STAGES.items()},
        "phase_help": PHASE_HELP,
        "rounds": [],
    }
    workdir = args.workdir or tempfile.mkdtemp(prefix="lease-bench-")
    os.makedirs(workdir, exist_ok=True)
    os.chmod(workdir, 0o755)  # munged, slurmd's users and the payloads must reach it
    try:
        bench = Bench(options, workdir)
    except Exception as exc:
        return results, _fail(EXIT_SETUP, f"the site did not start: {exc}")
    total = len(counts) * args.rounds * 2
    done = 0
    try:
        bench.baseline_round(counts[0])  # warm-up (untimed): caches, first imports, the LRM's first job
        bench.lease_round(counts[0])
        kinds = (("baseline", bench.baseline_round), ("lease", bench.lease_round))
        previous = "lease"  # the warm-up's last round
        for nodes in counts:
            for round_no in range(args.rounds):
                # Alternate the order (B L, L B, B L, ...): how the previous job ended can slow the next
                # job's start (on Slurm a job after a cancelled do-nothing job starts ~140 ms later), so each
                # kind follows each kind about as often. Each round records what came before it.
                for kind, measure in (kinds if round_no % 2 == 0 else kinds[::-1]):
                    stages = measure(nodes)
                    for name, stage in stages.items():
                        results["rounds"].append({"nodes": nodes, "round": round_no, "stage": name,
                                                  "total_ms": stage.total, "phases_ms": stage.phases,
                                                  "detail": {**stage.detail, "after": previous}})
                    previous = kind
                    done += 1
                    main_stage = stages.get("standup") or stages["baseline_standup"]
                    _progress(args, report.progress_line(done, total, f"N={nodes} {kind} round {round_no + 1}",
                                                         main_stage.total))
    except Exception as exc:  # RoundError, BaselineError, RecordError, ProviderError: one line, keep what we have
        _progress(args, None)
        print(f"lease-bench: round failed: {exc}", file=sys.stderr)
        return results, EXIT_ROUND
    finally:
        bench.close()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    _progress(args, None)
    return results, EXIT_OK


def _progress(args, line: str | None) -> None:
    if args.quiet:
        return
    if line is None:
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        return
    sys.stderr.write(("\r" + line) if sys.stderr.isatty() else line + "\n")
    sys.stderr.flush()


def _pool() -> int | None:
    try:
        with open(NR_HUGEPAGES, encoding="ascii") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return None


def _fail(code: int, message: str) -> int:
    print(f"lease-bench: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
