"""`gqa-t5x bench`'s reports from recorded results: the console table fits 120
columns, the markdown keeps every column, the plot's y axis turns
logarithmic where the times span decades and labels the totals."""

from __future__ import annotations

import copy
import json

import pytest

import figure_checks
from gqa_t5x.experiments import tables
from gqa_t5x.experiments.bench import report
from paths import REPO

# Benchmarks recorded on the 2-core CPU (docs/bench_decode.md): realistic rows.
RECORDED = ["bench_decode_large.json", "bench_decode_xxl.json", "bench_decode_large_out128_512.json",
            "bench_decode_large_partitioned.json"]


def _recorded(name: str = RECORDED[0]) -> dict:
    return json.loads((REPO / "docs" / name).read_text())


@pytest.mark.parametrize("name", RECORDED)
def test_console_table_of_a_recorded_benchmark_fits_120_columns(name):
    results = _recorded(name)
    text = report.format_table(results)
    assert max(len(line) for line in text.splitlines()) <= tables.CONSOLE_WIDTH
    header = text.splitlines()[0]
    for title in ("variant", "kv", "total s", "step %roof", "HF / ours"):
        assert title in header
    variants = {row["variant"] for row in results["rows"]} | ({"HF T5 (MHA)"} if results["huggingface"] else set())
    assert all(any(line.strip().startswith(v) for line in text.splitlines()) for v in variants)


def test_the_markdown_table_keeps_every_column():
    results = _recorded()
    lines = report.format_table(results, markdown=True).splitlines()
    assert lines[0] == "| " + " | ".join(title for _, title, _ in report._COLUMNS) + " |"
    assert len(lines) == 2 + len(results["rows"]) + len(results["huggingface"])


def test_console_table_with_long_labels_wraps_into_blocks_that_name_the_rows():
    results = _recorded()
    for row in results["rows"]:
        row["variant"] = f"{row['variant']} with a much longer label than usual, say a sweep point's name"
    text = report.format_table(results)
    assert max(len(line) for line in text.splitlines()) <= tables.CONSOLE_WIDTH
    blocks = text.split("\n\n")
    assert len(blocks) >= 2 and all(block.lstrip().startswith("variant") for block in blocks)


def _plotted(results: dict, monkeypatch) -> list:
    captured = figure_checks.capture(monkeypatch)
    report.plot(results, "unused.png")
    (fig,) = captured
    return fig.axes


def test_plot_uses_a_log_axis_where_huggingface_is_decades_slower(monkeypatch):
    results = _recorded()
    slow = copy.deepcopy(results)
    for hf in slow["huggingface"]:
        hf["time_per_sample_s"] = 100 * max(r["time_per_sample_s"] for r in slow["rows"])
    time_axis, relative_axis = _plotted(slow, monkeypatch)
    assert time_axis.get_yscale() == "log" and "log scale" in time_axis.get_ylabel()
    assert relative_axis.get_yscale() == "linear"  # ratios to MHA stay within 2x
    totals = [f"{r['time_per_sample_s']:.3g}" for r in slow["rows"]]
    assert set(totals) <= set(figure_checks.texts(time_axis))  # the totals are labelled
    figure_checks.close([time_axis.figure])


def test_plot_stays_linear_from_zero_where_the_times_are_close(monkeypatch):
    time_axis, _ = _plotted(_recorded(), monkeypatch)  # ours 0.57-0.72 s, HuggingFace 1.06 s
    assert time_axis.get_yscale() == "linear" and time_axis.get_ylim()[0] == 0
    figure_checks.close([time_axis.figure])
