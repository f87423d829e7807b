"""lease-bench reports: the per-N summary, a text table, JSON, a PNG and progress lines.

Everything here reads the harness's JSON-ready ``results`` dict (``bench``,
``stages``, ``phase_help``, ``rounds``) and never measures anything itself.
matplotlib is optional: only :func:`plot_png` needs it, and imports it then.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable

# How each stage is named for people; a stage not listed here shows its key.
STAGE_TITLES = {
    "standup": "stand-up",
    "pilot": "stand-up, the pilot's own share (on the critical host)",
    "vm": "VM start",
    "teardown": "tear-down",
    "baseline_standup": "LRM-only stand-up",
    "baseline_teardown": "LRM-only tear-down",
}

# The plot's subplots, in this order, each with the baseline drawn over it (if any).
PLOTTED_STAGES = ("standup", "teardown", "vm")
PLOT_BASELINES = {"standup": "baseline_standup", "teardown": "baseline_teardown"}
BASELINE_LABEL = "LRM-only baseline"

STAT_COLUMNS = ("median", "min", "max", "iqr")
# One space plus six characters keeps 5 node counts under 160 columns and
# still leaves a blank between numbers when one is wider than 9999.9.
NUMBER_WIDTH = 7
MISSING = "-"

MATPLOTLIB_MISSING = "the plot needs matplotlib: pip install 'workspace-pilot[bench]'"


class ReportError(Exception):
    """A report cannot be made; the message is one line meant for the user."""


# --- summary -----------------------------------------------------------------


def stats_of(values: list[float]) -> dict:
    """Return n, median, min, max and iqr (p75 - p25, inclusive method) of non-empty ``values``."""
    return {
        "n": len(values),
        "median": float(statistics.median(values)),
        "min": float(min(values)),
        "max": float(max(values)),
        "iqr": interquartile_range(values),
    }


def interquartile_range(values: list[float]) -> float:
    """Return p75 - p25 by ``statistics.quantiles(..., method="inclusive")``; 0.0 for one value."""
    # quantiles() refuses a single data point on Python < 3.13; its spread is nil anyway.
    if len(values) < 2:
        return 0.0
    p25, _, p75 = statistics.quantiles(values, n=4, method="inclusive")
    return float(p75 - p25)


def summarize(results: dict) -> dict:
    """Summarize every (N, stage) in ``results["rounds"]``.

    Returns ``{str(N): {stage: {"total": stats, "phases": {phase: stats}}, "ratio": {...}}}``
    with N keys in numeric order, stages in ``results["stages"]`` order and
    phases in the stage's order (phases the stage does not list follow, in
    the order first seen). A phase missing from some rounds is summarized over
    the rounds that have it. ``"ratio"`` is present only when a ratio can be
    formed (see :func:`ratios_of`). Raises ReportError for malformed input.
    """
    stage_order = stages_of(results)
    grouped = rounds_by_nodes_and_stage(results, stage_order)
    summary: dict = {}
    for nodes in sorted(grouped):
        per_stage = {
            stage: summarize_stage(grouped[nodes][stage], stage_order[stage])
            for stage in stage_order
            if stage in grouped[nodes]
        }
        ratio = ratios_of(per_stage, results.get("bench", {}).get("interpreter_start_ms"))
        if ratio:
            per_stage["ratio"] = ratio
        summary[str(nodes)] = per_stage
    return summary


def stages_of(results: dict) -> dict[str, list[str]]:
    """Return ``results["stages"]`` (stage -> phase names, in order), or raise ReportError."""
    stages = results.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise ReportError("results have no 'stages' (stage -> phase names)")
    return {stage: list(phases) for stage, phases in stages.items()}


def rounds_by_nodes_and_stage(results: dict, stage_order: dict) -> dict[int, dict[str, list[dict]]]:
    """Group ``results["rounds"]`` as ``{N: {stage: [round, ...]}}``; raise ReportError on a bad round."""
    rounds = results.get("rounds")
    if not isinstance(rounds, list):
        raise ReportError("results have no 'rounds' list")
    grouped: dict[int, dict[str, list[dict]]] = {}
    for index, one in enumerate(rounds):
        try:
            nodes, stage = int(one["nodes"]), one["stage"]
        except (KeyError, TypeError, ValueError):
            raise ReportError(f"round #{index} lacks a usable 'nodes' or 'stage'") from None
        if stage not in stage_order:
            raise ReportError(f"round #{index} is for stage {stage!r}, which 'stages' does not list")
        grouped.setdefault(nodes, {}).setdefault(stage, []).append(one)
    return grouped


def summarize_stage(rounds: list[dict], phase_order: list[str]) -> dict:
    """Return ``{"total": stats, "phases": {phase: stats}}`` over one stage's rounds at one N."""
    totals = [float(one["total_ms"]) for one in rounds]
    phases = {}
    for phase in ordered_phases(rounds, phase_order):
        values = [float(one["phases_ms"][phase]) for one in rounds if phase in one.get("phases_ms", {})]
        phases[phase] = stats_of(values)
    return {"total": stats_of(totals), "phases": phases}


def ordered_phases(rounds: list[dict], phase_order: list[str]) -> list[str]:
    """Return the phases seen in ``rounds``: the listed ones in order, then unlisted ones as first seen."""
    seen: list[str] = []
    for one in rounds:
        seen.extend(phase for phase in one.get("phases_ms", {}) if phase not in seen)
    listed = [phase for phase in phase_order if phase in seen]
    return listed + [phase for phase in seen if phase not in phase_order]


def ratios_of(per_stage: dict, interpreter_start_ms: float | None = None) -> dict[str, float]:
    """Return the lease-vs-LRM-only ratios that one N's stages allow (medians; none over a zero), and the
    pilot's boot over a bare interpreter's start when that was measured."""
    ratio = {}
    boot = per_stage.get("pilot", {}).get("phases", {}).get("boot")
    if boot and interpreter_start_ms:
        ratio["boot_vs_interpreter"] = boot["median"] / interpreter_start_ms
    standup = per_stage.get("standup", {}).get("total")
    baseline_standup = per_stage.get("baseline_standup", {}).get("total")
    if standup and baseline_standup and baseline_standup["median"]:
        ratio["standup_vs_baseline"] = standup["median"] / baseline_standup["median"]
        # The LRM's dispatch of a pilot job and of the do-nothing job is the same path (sbatch, srun, sudo)
        # but swings by hundreds of ms with what ran before it; this one adds the lease's own phases
        # (sum of their medians) to the baseline's stand-up, so the dispatch's swings cancel out.
        own = [cell["median"] for name, cell in per_stage["standup"].get("phases", {}).items() if name != "dispatch"]
        ratio["standup_own_vs_baseline"] = (baseline_standup["median"] + sum(own)) / baseline_standup["median"]
    stop_signal = per_stage.get("teardown", {}).get("phases", {}).get("stop_signal")
    baseline_teardown = per_stage.get("baseline_teardown", {}).get("total")
    if stop_signal and baseline_teardown and baseline_teardown["median"]:
        ratio["teardown_stop_vs_baseline"] = stop_signal["median"] / baseline_teardown["median"]
    return ratio


# --- text table ----------------------------------------------------------------

RATIO_TEXT = {
    "standup_vs_baseline": "stand-up / baseline",
    "standup_own_vs_baseline": "(baseline + the lease's own phases) / baseline",
    "teardown_stop_vs_baseline": "stop signal / baseline cancel",
    "boot_vs_interpreter": "pilot boot / bare interpreter start",
}


def format_table(results: dict, summary: dict) -> str:
    """Return the summary as fixed-width text: a bench line, one block per stage with data, ratios.

    Each stage block has a row per phase and a ``total`` row; per N, the
    columns are median, min, max and iqr in ms, printed ``%.1f`` (``-`` where
    that N has no data), groups separated by ``|``. The text ends with a newline.
    """
    node_keys = list(summary)
    lines = [bench_line(results.get("bench", {}))]
    for stage in stages_of(results):
        if any(stage in summary[key] for key in node_keys):
            lines.append("")
            lines.extend(stage_block(stage, summary, node_keys))
    ratio_lines = ratio_block(summary)
    if ratio_lines:
        lines.append("")
        lines.extend(ratio_lines)
    return "\n".join(lines) + "\n"


def bench_line(bench: dict) -> str:
    """Return one line naming the bench's provider, VM mode, rounds and node counts."""
    node_counts = ", ".join(str(n) for n in bench.get("node_counts", [])) or "?"
    interpreter = bench.get("interpreter_start_ms")
    return (
        f"lease-bench: provider {bench.get('provider', '?')}, vm {bench.get('vm', '?')}, "
        f"{bench.get('rounds', '?')} rounds, N = {node_counts}"
        + (f"; a bare interpreter starts in {interpreter:.1f} ms" if interpreter else "")
    )


def stage_block(stage: str, summary: dict, node_keys: list[str]) -> list[str]:
    """Return the heading, column headers and rows of one stage's table."""
    phases = phases_across_nodes(stage, summary, node_keys)
    label_width = max(len(name) for name in [*phases, "total", "phase"]) + 1
    group_width = NUMBER_WIDTH * len(STAT_COLUMNS)
    lines = [
        f"{STAGE_TITLES.get(stage, stage)} (median / min / max / iqr, ms; {rounds_text(stage, summary, node_keys)})",
        (" " * label_width + "".join(f"|{'N=' + key:^{group_width}}" for key in node_keys)).rstrip(),
        f"{'phase':<{label_width}}" + "".join("|" + column_headers() for _ in node_keys),
    ]
    for phase in phases:
        cells = [summary[key].get(stage, {}).get("phases", {}).get(phase) for key in node_keys]
        lines.append(table_row(phase, cells, label_width))
    totals = [summary[key].get(stage, {}).get("total") for key in node_keys]
    lines.append(table_row("total", totals, label_width))
    return lines


def phases_across_nodes(stage: str, summary: dict, node_keys: list[str]) -> list[str]:
    """Return the stage's phase names in summary order, merged over all N."""
    phases: list[str] = []
    for key in node_keys:
        for phase in summary[key].get(stage, {}).get("phases", {}):
            if phase not in phases:
                phases.append(phase)
    return phases


def rounds_text(stage: str, summary: dict, node_keys: list[str]) -> str:
    """Return "3 rounds" (or "2-3 rounds" when N differ) from the stage's total counts."""
    counts = [summary[key][stage]["total"]["n"] for key in node_keys if stage in summary[key]]
    low, high = min(counts), max(counts)
    span = str(low) if low == high else f"{low}-{high}"
    return f"{span} round" + ("" if high == 1 else "s")


def column_headers() -> str:
    """Return the four column names of one N group, aligned with the numbers."""
    return "".join(f"{name:>{NUMBER_WIDTH}}" for name in STAT_COLUMNS)


def table_row(label: str, cells: Iterable[dict | None], label_width: int) -> str:
    """Return one row: the label, then per N either the four stats or dashes."""
    return f"{label:<{label_width}}" + "".join("|" + stat_cells(stats) for stats in cells)


def stat_cells(stats: dict | None) -> str:
    """Return median, min, max, iqr as ``%.1f``, each after at least one blank."""
    if stats is None:
        return "".join(f"{MISSING:>{NUMBER_WIDTH}}" for _ in STAT_COLUMNS)
    return "".join(" " + f"{stats[name]:{NUMBER_WIDTH - 1}.1f}" for name in STAT_COLUMNS)


def ratio_block(summary: dict) -> list[str]:
    """Return the ``ratio`` section (one line per N that has a ratio), or no lines."""
    lines = []
    for key, per_stage in summary.items():
        ratio = per_stage.get("ratio", {})
        parts = [f"{text} = {ratio[name]:.2f}x" for name, text in RATIO_TEXT.items() if name in ratio]
        if parts:
            lines.append(f"  N={key}  " + "   ".join(parts))
    return ["ratio", *lines] if lines else []


# --- JSON ----------------------------------------------------------------------


def to_json(results: dict, summary: dict) -> str:
    """Return the results with ``"summary"`` added, as indented JSON ending in a newline."""
    return json.dumps({**results, "summary": summary}, indent=2, sort_keys=False) + "\n"


# --- plot ----------------------------------------------------------------------


def plot_png(results: dict, summary: dict, path: str) -> None:
    """Write one PNG at ``path``: per plotted stage with data, stacked phase medians per N.

    Subplots are stand-up, tear-down and VM start (those with data); the
    LRM-only baseline's median total is drawn over stand-up and tear-down.
    Raises ReportError if the directory of ``path`` does not exist, saving
    fails, there is nothing to plot, or matplotlib is not installed.
    """
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise ReportError(f"cannot write the plot: directory {directory} does not exist")
    stages = [stage for stage in PLOTTED_STAGES if any(stage in per_stage for per_stage in summary.values())]
    if not stages:
        raise ReportError("nothing to plot: no stand-up, tear-down or VM rounds in the summary")
    plt = import_pyplot()
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 4.5), squeeze=False)
    try:
        for ax, stage in zip(axes[0], stages):
            draw_stage(ax, stage, stages_of(results).get(stage, []), summary)
        fig.tight_layout()
        save_figure(fig, path)
    finally:
        plt.close(fig)


def import_pyplot():
    """Return matplotlib.pyplot on the non-interactive Agg backend, or raise ReportError."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError(MATPLOTLIB_MISSING) from None
    # Agg before pyplot: the bench runs on headless nodes, with no display.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_stage(ax, stage: str, phase_order: list[str], summary: dict) -> None:
    """Draw one stage's stacked median bars per N, plus its baseline line if it has one."""
    node_keys = list(summary)
    positions = list(range(len(node_keys)))
    phases = ordered_summary_phases(stage, phase_order, summary)
    bottoms = [0.0] * len(node_keys)
    for phase in phases:
        heights = [phase_median(summary[key], stage, phase) for key in node_keys]
        ax.bar(positions, heights, bottom=bottoms, label=phase)
        bottoms = [low + height for low, height in zip(bottoms, heights)]
    baseline = PLOT_BASELINES.get(stage)
    if baseline:
        draw_baseline(ax, baseline, summary, positions)
    ax.set_xticks(positions, [f"N={key}" for key in node_keys])
    ax.set_ylabel("ms")
    ax.set_title(STAGE_TITLES.get(stage, stage))
    # Reversed so the legend reads top-down like the stack, baseline last.
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize="small")


def ordered_summary_phases(stage: str, phase_order: list[str], summary: dict) -> list[str]:
    """Return the stage's phases found in the summary, listed order first (the stack's bottom-up order)."""
    found = phases_across_nodes(stage, summary, list(summary))
    return [phase for phase in phase_order if phase in found] + [p for p in found if p not in phase_order]


def phase_median(per_stage: dict, stage: str, phase: str) -> float:
    """Return one N's median for ``stage.phase``, or 0.0 when that N lacks it (an empty bar segment)."""
    stats = per_stage.get(stage, {}).get("phases", {}).get(phase)
    return stats["median"] if stats else 0.0


def draw_baseline(ax, baseline: str, summary: dict, positions: list[int]) -> None:
    """Draw the baseline stage's median totals as a black marker line over the N that have it."""
    points = [
        (position, per_stage[baseline]["total"]["median"])
        for position, per_stage in zip(positions, summary.values())
        if baseline in per_stage
    ]
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, color="black", marker="o", linestyle="-", label=BASELINE_LABEL)


def save_figure(fig, path: str) -> None:
    """Save ``fig`` as PNG at 100 dpi, turning an OSError into a one-line ReportError."""
    try:
        fig.savefig(path, dpi=100, format="png")
    except OSError as error:
        raise ReportError(f"cannot write the plot {path}: {error.strerror or error}") from None


# --- progress ------------------------------------------------------------------


def progress_line(done: int, total: int, what: str, last_ms: float | None) -> str:
    """Return e.g. ``[ 3/20] N=2 lease round 2: 912 ms`` (no newline; no time part when ``last_ms`` is None)."""
    counter = f"[{done:>{len(str(total))}}/{total}]"
    if last_ms is None:
        return f"{counter} {what}"
    return f"{counter} {what}: {last_ms:.0f} ms"
