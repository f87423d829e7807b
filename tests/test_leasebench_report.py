"""lease-bench reports on synthetic results: summary statistics, table, JSON, PNG, progress."""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from admin_tools.leasebench.report import (
    ReportError,
    format_table,
    plot_png,
    progress_line,
    summarize,
    to_json,
)

STAGES = {
    "standup": ["client", "dispatch", "pilot_start", "notification", "ready"],
    "vm": ["request", "delivery", "create", "report", "running"],
    "teardown": ["client", "stop_signal", "vm_destroy", "restore", "notification", "released"],
    "baseline_standup": ["submit", "dispatch"],
    "baseline_teardown": ["cancel", "stop_signal"],
}
WITHOUT_VM = [stage for stage in STAGES if stage != "vm"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_results(
    node_counts=(1, 2), rounds=3, stages=WITHOUT_VM, seed=20261121, drop=None,
) -> dict:
    """Synthetic results; ``drop=(nodes, round, stage, phase)`` leaves that phase out of that round."""
    rng = random.Random(seed)
    entries = []
    for nodes in node_counts:
        for round_index in range(rounds):
            for stage in stages:
                phases = {phase: round(rng.uniform(0.5, 1500.0), 3) for phase in STAGES[stage]}
                if drop and drop[:3] == (nodes, round_index, stage):
                    del phases[drop[3]]
                entries.append({
                    "nodes": nodes, "round": round_index, "stage": stage,
                    "total_ms": sum(phases.values()), "phases_ms": phases, "detail": {"seed": seed},
                })
    return {
        "bench": {
            "provider": "local", "vm": "none", "rounds": rounds, "node_counts": list(node_counts),
            "memory_mb": 16, "command": "lease-bench", "started_at": "2026-11-21T10:00:00.000000Z",
            "machine": {},
        },
        "stages": STAGES,
        "phase_help": {"standup.client": "request to the LRM submit (API, store)"},
        "rounds": entries,
    }


def values_of(results: dict, nodes: int, stage: str, phase: str | None) -> list[float]:
    """The raw values of one phase (or the total, for None) at one N, straight from the rounds."""
    found = []
    for one in results["rounds"]:
        if one["nodes"] == nodes and one["stage"] == stage:
            if phase is None:
                found.append(one["total_ms"])
            elif phase in one["phases_ms"]:
                found.append(one["phases_ms"][phase])
    return found


def expected_stats(values: list[float]) -> dict:
    if len(values) > 1:
        p25, _, p75 = statistics.quantiles(values, n=4, method="inclusive")
        iqr = p75 - p25
    else:
        iqr = 0.0
    return {
        "n": len(values), "median": statistics.median(values),
        "min": min(values), "max": max(values), "iqr": iqr,
    }


def assert_stats(actual: dict, values: list[float]) -> None:
    expected = expected_stats(values)
    assert actual["n"] == expected["n"]
    for name in ("median", "min", "max", "iqr"):
        assert actual[name] == pytest.approx(expected[name])


# --- summarize -------------------------------------------------------------------


def test_summary_stats_match_statistics():
    results = make_results()
    summary = summarize(results)
    for nodes in (1, 2):
        for stage in WITHOUT_VM:
            stage_summary = summary[str(nodes)][stage]
            assert_stats(stage_summary["total"], values_of(results, nodes, stage, None))
            for phase in STAGES[stage]:
                assert_stats(stage_summary["phases"][phase], values_of(results, nodes, stage, phase))


def test_summary_orders_nodes_numerically_and_stages_and_phases_as_listed():
    summary = summarize(make_results(node_counts=(10, 2, 1), stages=list(reversed(WITHOUT_VM))))
    assert list(summary) == ["1", "2", "10"]
    for per_stage in summary.values():
        assert [key for key in per_stage if key != "ratio"] == WITHOUT_VM
        for stage in WITHOUT_VM:
            assert list(per_stage[stage]["phases"]) == STAGES[stage]


def test_summary_ratios_are_medians_over_baseline_medians():
    results = make_results()
    summary = summarize(results)
    for nodes in (1, 2):
        ratio = summary[str(nodes)]["ratio"]
        standup = statistics.median(values_of(results, nodes, "standup", None))
        baseline_standup = statistics.median(values_of(results, nodes, "baseline_standup", None))
        stop_signal = statistics.median(values_of(results, nodes, "teardown", "stop_signal"))
        baseline_teardown = statistics.median(values_of(results, nodes, "baseline_teardown", None))
        assert ratio["standup_vs_baseline"] == pytest.approx(standup / baseline_standup)
        assert ratio["teardown_stop_vs_baseline"] == pytest.approx(stop_signal / baseline_teardown)
        own = sum(statistics.median(values_of(results, nodes, "standup", phase))
                  for phase in STAGES["standup"] if phase != "dispatch")
        assert ratio["standup_own_vs_baseline"] == pytest.approx((baseline_standup + own) / baseline_standup)


def test_summary_without_baselines_has_no_ratio():
    summary = summarize(make_results(stages=["standup", "teardown"]))
    assert all("ratio" not in per_stage for per_stage in summary.values())


def test_summary_leaves_out_an_absent_stage():
    results = make_results()
    summary = summarize(results)
    assert all("vm" not in per_stage for per_stage in summary.values())


def test_summary_with_vm_covers_it():
    results = make_results(stages=list(STAGES))
    summary = summarize(results)
    for phase in STAGES["vm"]:
        assert_stats(summary["2"]["vm"]["phases"][phase], values_of(results, 2, "vm", phase))


def test_summary_counts_a_phase_missing_from_one_round_over_the_others():
    results = make_results(drop=(1, 1, "standup", "pilot_start"))
    summary = summarize(results)
    pilot_start = summary["1"]["standup"]["phases"]["pilot_start"]
    kept = values_of(results, 1, "standup", "pilot_start")
    assert len(kept) == 2
    assert_stats(pilot_start, kept)
    assert summary["1"]["standup"]["phases"]["ready"]["n"] == 3
    assert summary["1"]["standup"]["total"]["n"] == 3


def test_summary_single_round_has_zero_iqr():
    summary = summarize(make_results(rounds=1))
    assert summary["1"]["standup"]["total"]["n"] == 1
    assert summary["1"]["standup"]["total"]["iqr"] == 0.0


def test_summary_rejects_a_stage_that_stages_does_not_list():
    results = make_results()
    results["rounds"][0]["stage"] = "mystery"
    with pytest.raises(ReportError, match="mystery"):
        summarize(results)


# --- format_table ----------------------------------------------------------------


def table_sections(table: str) -> list[list[str]]:
    """Split the table into stage blocks: each a heading followed by its lines up to a blank."""
    blocks = [block.splitlines() for block in table.strip("\n").split("\n\n")]
    return [block for block in blocks if "(median / min / max / iqr" in block[0]]


def parse_block(block: list[str]) -> dict[str, dict[str, list[float | None]]]:
    """Return {N key: {row label: [median, min, max, iqr]}} from one stage block."""
    node_header, _, *rows = block[1:]
    node_keys = [cell.strip().removeprefix("N=") for cell in node_header.split("|")[1:]]
    parsed: dict = {key: {} for key in node_keys}
    for row in rows:
        label, *groups = row.split("|")
        for key, group in zip(node_keys, groups, strict=True):
            cells = group.split()
            assert len(cells) == 4
            parsed[key][label.strip()] = [None if cell == "-" else float(cell) for cell in cells]
    return parsed


def assert_row_matches(numbers: list[float | None], stats: dict | None) -> None:
    if stats is None:
        assert numbers == [None] * 4
        return
    for number, name in zip(numbers, ("median", "min", "max", "iqr")):
        assert number == float(f"{stats[name]:.1f}")
        assert abs(number - stats[name]) <= 0.05 + 1e-9


def assert_table_matches_summary(results: dict, summary: dict) -> None:
    table = format_table(results, summary)
    stages_with_data = [s for s in STAGES if any(s in per_stage for per_stage in summary.values())]
    sections = table_sections(table)
    assert len(sections) == len(stages_with_data)
    for stage, block in zip(stages_with_data, sections):
        parsed = parse_block(block)
        assert list(parsed) == list(summary)
        for key, rows in parsed.items():
            stage_summary = summary[key].get(stage)
            for label, numbers in rows.items():
                if stage_summary is None:
                    assert_row_matches(numbers, None)
                elif label == "total":
                    assert_row_matches(numbers, stage_summary["total"])
                else:
                    assert_row_matches(numbers, stage_summary["phases"].get(label))
            expected_labels = list(stage_summary["phases"]) + ["total"] if stage_summary else None
            if expected_labels:
                assert list(rows) == expected_labels


def test_table_numbers_are_the_summary_rounded():
    results = make_results()
    assert_table_matches_summary(results, summarize(results))


def test_table_with_vm_and_a_missing_phase():
    results = make_results(stages=list(STAGES), drop=(2, 0, "vm", "create"))
    assert_table_matches_summary(results, summarize(results))


def test_table_headings_and_bench_line():
    results = make_results()
    table = format_table(results, summarize(results))
    first = table.splitlines()[0]
    for word in ("local", "none", str(results["bench"]["rounds"])):
        assert word in first
    headings = [block[0] for block in table_sections(table)]
    assert headings[0].startswith("stand-up (")
    assert headings[1].startswith("tear-down (")
    assert all(f"{results['bench']['rounds']} rounds" in heading for heading in headings)
    assert "VM start" not in table


def test_table_ratio_section_matches_summary():
    results = make_results()
    summary = summarize(results)
    table = format_table(results, summary)
    ratio_lines = table.split("\nratio\n", 1)[1].splitlines()
    for key, line in zip(summary, ratio_lines, strict=True):
        assert line.split()[0] == f"N={key}"
        ratio = summary[key]["ratio"]
        assert f"stand-up / baseline = {ratio['standup_vs_baseline']:.2f}x" in line
        assert f"stop signal / baseline cancel = {ratio['teardown_stop_vs_baseline']:.2f}x" in line


def test_table_lines_stay_under_160_for_five_node_counts():
    results = make_results(node_counts=(1, 2, 4, 8, 16), stages=list(STAGES))
    table = format_table(results, summarize(results))
    assert max(len(line) for line in table.splitlines()) < 160


# --- to_json ---------------------------------------------------------------------


def test_to_json_round_trips_with_summary():
    results = make_results()
    summary = summarize(results)
    text = to_json(results, summary)
    assert text.endswith("\n")
    loaded = json.loads(text)
    assert loaded["summary"] == summary
    assert loaded["rounds"] == results["rounds"]
    assert loaded["bench"] == results["bench"]


# --- plot_png --------------------------------------------------------------------


@pytest.mark.parametrize("stages", [list(STAGES), WITHOUT_VM], ids=["with-vm", "without-vm"])
def test_plot_writes_a_png(tmp_path, stages):
    results = make_results(stages=stages)
    path = tmp_path / "bench.png"
    plot_png(results, summarize(results), str(path))
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_into_a_missing_directory_is_a_report_error(tmp_path):
    results = make_results()
    with pytest.raises(ReportError, match="does not exist"):
        plot_png(results, summarize(results), str(tmp_path / "absent" / "bench.png"))


def test_plot_save_failure_is_a_report_error(tmp_path):
    results = make_results()
    # A directory where the file should go makes savefig's open() fail.
    (tmp_path / "taken.png").mkdir()
    with pytest.raises(ReportError, match="cannot write"):
        plot_png(results, summarize(results), str(tmp_path / "taken.png"))


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    results = make_results()
    summary = summarize(results)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ReportError, match=r"workspace-pilot\[bench\]"):
        plot_png(results, summary, str(tmp_path / "bench.png"))


def test_module_imports_without_loading_matplotlib():
    code = (
        "import sys; import admin_tools.leasebench.report; "
        "sys.exit('matplotlib' in sys.modules)"
    )
    repo_root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=repo_root, timeout=60).returncode == 0


# --- progress_line ---------------------------------------------------------------


def test_progress_line_holds_counts_what_and_time():
    line = progress_line(3, 20, "N=2 lease round 2", 912.4)
    assert "3/20" in line
    assert "N=2 lease round 2" in line
    assert "912 ms" in line
    assert "\n" not in line and "\r" not in line


def test_progress_line_without_a_time():
    line = progress_line(1, 5, "N=1 baseline round 0", None)
    assert "1/5" in line and "N=1 baseline round 0" in line
    assert "ms" not in line
