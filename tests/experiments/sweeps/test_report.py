"""Aggregation of run results into Table 1 and the paper-style figures."""

from __future__ import annotations

import csv
import json

import pytest

from gqa_t5x.experiments import paper
from gqa_t5x.experiments.sweeps import report


def _write(run_dir, **fields):
    run_dir.mkdir(parents=True)
    base = {"name": run_dir.name, "model": "tiny", "num_heads": 4, "num_kv_heads": 4,
            "method": None, "alpha": None, "time_per_sample": 0.02, "scores": {}}
    base.update(fields)
    (run_dir / "results.json").write_text(json.dumps(base))
    return run_dir


def test_table_has_papers_columns_and_averages_available_scores(tmp_path):
    _write(tmp_path / "runs" / "mha", scores={"cnn_dailymail": 10.0, "wmt14_ende": 4.0}, time_per_sample=0.04)
    _write(tmp_path / "runs" / "mqa", num_kv_heads=1, method="mean", alpha=0.05,
           scores={"cnn_dailymail": 8.0, "wmt14_ende": 2.0, "triviaqa": 5.0}, time_per_sample=0.01)
    files = report.write_report([tmp_path / "runs"], tmp_path / "out")
    md = files["table_md"].read_text()
    assert md.splitlines()[0] == "| model | time | avg | CNN | arXiv | PubMed | MediaSum | MultiNews | WMT | TriviaQA |"
    assert "| mha | 0.0400 | 7.0 | 10.0 | - | - | - | - | 4.0 | - |" in md
    assert "| mqa | 0.0100 | 5.0 | 8.0 | - | - | - | - | 2.0 | 5.0 |" in md
    assert "| GQA-8-XXL (paper) | 0.28 | 47.1 | 43.5 | 45.4 | 47.7 | 36.3 | 47.2 | 28.4 | 81.6 |" in md
    with files["table_csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["mha", "mqa"]  # MHA first, then fewer kv heads
    assert float(rows[1]["avg"]) == pytest.approx(5.0)
    for key in ("quality_vs_time", "alpha", "methods", "time_vs_groups"):
        assert files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(files[key].read_bytes()) > 5000


def test_paper_reference_can_be_left_out(tmp_path):
    _write(tmp_path / "r", scores={"triviaqa": 1.0})
    files = report.write_report([tmp_path / "r"], tmp_path / "out", include_paper=False)
    assert "paper" not in files["table_md"].read_text()


def test_paper_per_task_numbers_reproduce_the_papers_average_column():
    # The paper prints MQA-XXL's average as 46.6 while its seven scores average
    # 46.76; every other row agrees to rounding. A transcription error in any
    # score would move an average by >= 0.014 per 0.1 and show up here.
    gaps = {name: report.average(e["scores"]) - e["avg"] for name, e in paper.TABLE1.items()}
    assert gaps["MQA-XXL"] == pytest.approx(0.157, abs=0.001)
    for name, gap in gaps.items():
        if name != "MQA-XXL":
            assert abs(gap) <= 0.06, (name, gap)


def test_missing_run_dir_and_unfinished_run_are_named(tmp_path):
    with pytest.raises(report.ReportError, match="does not exist"):
        report.find_results([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(report.ReportError, match="No results.json"):
        report.find_results([tmp_path / "empty"])


def test_malformed_results_are_named(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    with pytest.raises(report.ReportError, match="not valid JSON"):
        report.load_result(bad / "results.json")
    _write(tmp_path / "text", scores={"cnn_dailymail": "high"})
    with pytest.raises(report.ReportError, match="scores must be numbers"):
        report.load_result(tmp_path / "text" / "results.json")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "results.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(report.ReportError, match="lacks the field"):
        report.load_result(tmp_path / "partial" / "results.json")


def test_extra_tasks_get_their_own_columns_after_the_papers(tmp_path):
    _write(tmp_path / "q", scores={"docstring_summary": 21.5})
    files = report.write_report([tmp_path / "q"], tmp_path / "out")
    lines = files["table_md"].read_text().splitlines()
    assert lines[0].endswith("| TriviaQA | docstring_summary |")
    assert lines[2] == "| q | 0.0200 | 21.5 | - | - | - | - | - | - | - | 21.5 |"


def test_figures_label_values_start_bars_at_zero_use_log_where_times_span_decades_and_mark_empty_panels(
        tmp_path, monkeypatch):
    import figure_checks

    _write(tmp_path / "runs" / "mha", scores={"cnn_dailymail": 10.0}, time_per_sample=0.4)
    _write(tmp_path / "runs" / "mqa", num_kv_heads=1, method="mean", alpha=0.05,
           scores={"cnn_dailymail": 55.5}, time_per_sample=0.01)
    _write(tmp_path / "runs" / "gqa", num_kv_heads=2, method="mean", alpha=0.05,
           scores={"cnn_dailymail": 55.2}, time_per_sample=0.015)
    saved = figure_checks.capture(monkeypatch)
    report.write_report([tmp_path / "runs"], tmp_path / "out")
    quality, alpha, methods, groups = saved
    for fig in saved:
        assert not any(figure_checks.truncated_bars(ax) for ax in fig.axes)
    ours = methods.axes[0]
    assert ours.get_ylim()[0] == 0 and {"55.2", "55.5"} <= set(figure_checks.texts(ours))  # 0.3 apart, from 0
    assert groups.axes[0].get_yscale() == "log"  # 0.01 s to 0.4 s
    assert {"0.01", "0.015", "0.4"} <= set(figure_checks.texts(groups.axes[0]))
    assert any("55.5" in t for t in figure_checks.texts(alpha.axes[0]))
    assert any(t.startswith("mqa: 55.5, 0.01 s") for t in figure_checks.texts(quality.axes[0]))
    figure_checks.close(saved)
    # Runs without a conversion or a time: those panels say so instead of staying empty.
    _write(tmp_path / "only_mha" / "mha", scores={"cnn_dailymail": 10.0}, time_per_sample=None)
    saved = figure_checks.capture(monkeypatch)
    report.write_report([tmp_path / "only_mha"], tmp_path / "out2")
    quality, alpha, methods, groups = saved
    assert figure_checks.texts(methods.axes[0]) == ["no converted run"]
    assert figure_checks.texts(groups.axes[0]) == ["no run measured its time per sample"]
    assert figure_checks.texts(quality.axes[0]) == ["no run has both a score and a time"]
    assert figure_checks.texts(alpha.axes[0]) == ["no converted run with an alpha"]
    figure_checks.close(saved)


def test_table1_that_report_and_sweep_print_fits_120_columns(tmp_path):
    # Every paper task scored, plus the quickstart's extra task, under a sweep point's label.
    scores = {task: 43.21 for task in report.paper_task_columns()} | {"docstring_summary": 21.5}
    _write(tmp_path / "runs" / "g8", name="GQA-8 mean a=0.05", num_heads=64, num_kv_heads=8, method="mean",
           alpha=0.05, time_per_sample=0.0123, scores=scores)
    files = report.write_report([tmp_path / "runs"], tmp_path / "out")
    assert max(len(line) for line in files["table_md"].read_text().splitlines()) <= 120
