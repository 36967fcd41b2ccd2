"""The study's report on hand-made scores and on the committed full study:
a reduced run says its verdicts are not meaningful (markdown, JSON, console,
figures) and a full run does not; console lines fit 120 columns; figures
have no error bar below 0, no empty panel and no bars on a truncated axis."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import figure_checks
import study_evals  # tests/study_evals.py
from gqa_t5x.experiments import tables
from gqa_t5x.experiments.study import analysis, quickstart
from gqa_t5x.experiments.study import report as study_report
from gqa_t5x.experiments.study.settings import StudySettings
from paths import REPO

pytestmark = pytest.mark.study

BANNER = "reduced run: checks the machinery, verdicts not meaningful"
NOTE = "(not meaningful: reduced run)"


def _conversion_scores(out: Path, settings: StudySettings, seeds) -> None:
    """Every evaluation a conversion-only study reads: mean < first < random, GQA near MHA."""
    (_, n), = settings.heldout_examples
    mha = 3.0 + 0.1 * np.sin(np.arange(n))
    ev = out / "evals"
    study_evals.write_config(ev, settings, 8, None, 0.0, seeds, mha)
    for kv, gap in ((1, 1.0), (2, 0.2)):
        for method, extra in (("mean", 0.0), ("first", 0.3), ("lsq", -0.5), ("align", 0.1)):
            if method in settings.methods_for(kv):
                study_evals.write_config(ev, settings, kv, method, 0.0, seeds, mha + gap + extra)
        if "random" in settings.methods_for(kv):
            study_evals.write_config(ev, settings, kv, "random", 0.0, seeds,
                                     [mha + gap + 1.0 + 0.1 * s for s in seeds])


def _report(tmp_path: Path, settings: StudySettings, monkeypatch) -> tuple[dict, str, list]:
    seeds = quickstart.DEFAULT_SEEDS
    _conversion_scores(tmp_path / "study", settings, seeds)
    results = analysis.analyse(tmp_path / "study", settings, seeds, command="gqa-t5x quickstart", sessions=[])
    saved = figure_checks.capture(monkeypatch)
    files = study_report.write_report(results, tmp_path / "report")
    return json.loads(files["json"].read_text()), files["markdown"].read_text(), saved


@pytest.mark.parametrize("settings,reduced", [
    (StudySettings.reduced(), True), (quickstart.reduced_settings(), True),
    (StudySettings(), False), (StudySettings.quickstart(), False),
])
def test_the_reduced_settings_and_only_they_are_machinery_checks(settings, reduced):
    assert settings.is_reduced is reduced


def test_a_reduced_report_says_its_verdicts_are_not_meaningful(tmp_path, monkeypatch):
    results, text, saved = _report(tmp_path, quickstart.reduced_settings(), monkeypatch)
    assert results["reduced_run"] is True and results["banner"] == BANNER
    # Markdown: the banner under the title and above the verdicts; every verdict qualified.
    lines = text.splitlines()
    assert BANNER in lines[2] and f"> **{BANNER}.**" in text.split("## Verdicts")[1].split("| id |")[0]
    verdicts = text.split("## Verdicts")[1].split("\n## ")[0].splitlines()
    claims = [row for row in verdicts if row.startswith("| C") and "**not run**" not in row]
    assert len(claims) == 2 and all(f"{NOTE}** | - (reduced run) |" in row for row in claims)  # C1, C3
    beyond = [row for row in verdicts if row.startswith("| B-")]
    assert len(beyond) == 1 and NOTE in beyond[0]  # lsq (the reduced quickstart has no align)
    differences = text.split("## Every tested difference")[1].split("\n## ")[0].splitlines()
    tested = [row for row in differences if row.startswith("| C") and "| not run |" not in row]
    assert tested and all(row.endswith(f"{NOTE} | - |") for row in tested)
    assert "Not estimated: the verdicts of a reduced run are not meaningful" in text
    assert "**reproduced**" not in text  # no bare verdict
    # Console: the banner first, then each verdict with the note, within 120 columns.
    console = study_report.summary_lines(results)
    assert console[0] == f"*** {BANNER} ***"
    assert "C1: reproduced (not meaningful: reduced run) - " in "\n".join(console)
    assert max(len(line) for line in console) <= tables.CONSOLE_WIDTH
    # Figures: the banner across the top of each.
    assert saved and all(fig._suptitle is not None and fig._suptitle.get_text() == BANNER for fig in saved)
    figure_checks.close(saved)


def test_a_full_report_has_no_banner(tmp_path, monkeypatch):
    results, text, saved = _report(tmp_path, StudySettings.quickstart(), monkeypatch)
    assert results["reduced_run"] is False and results["banner"] is None
    assert "reduced run" not in text and "not meaningful" not in text
    assert "| C1 | Mean pooling" in text and "**reproduced**" in text
    console = study_report.summary_lines(results)
    assert console[0].startswith("C1: reproduced - ") and not any("meaningful" in line for line in console)
    assert all(fig._suptitle is None for fig in saved)
    for fig in saved:
        assert not any(figure_checks.truncated_bars(ax) for ax in fig.axes)
    figure_checks.close(saved)


def test_console_verdicts_wrap_within_the_width_keeping_the_verdict_first():
    results = {"reduced_run": True, "beyond_paper": [], "claims": [
        {"id": "C3", "verdict": "not reproduced", "claim": "GQA is usable without uptraining " * 6}]}
    lines = study_report.summary_lines(results, width=80)
    assert lines[0] == f"*** {BANNER} ***"
    assert lines[1].startswith("C3: not reproduced (not meaningful: reduced run) - GQA")
    assert len(lines) > 2 and all(len(line) <= 80 for line in lines)
    assert all(line.startswith("    ") for line in lines[2:])


# ------------------------------------------------------------- figures
def _timing_results(settings: StudySettings, times: dict[str, list[float]]) -> dict:
    n_in, n_out = settings.timing_shapes[0]
    timing = {"batch": 2, "rounds": len(times["MHA"]),
              "shapes": [{"input_length": n_in, "output_length": n_out, "time_per_sample": times}]}
    _, table = analysis.timing_claim(timing, settings)
    return {"settings": settings.to_json(), "timing": table, "reduced_run": settings.is_reduced}


def test_timing_error_bars_of_two_noisy_rounds_stop_at_zero(monkeypatch):
    settings = StudySettings.reduced()  # 2 timing rounds: t's quantile is 12.7
    results = _timing_results(settings, {"MHA": [0.001, 0.009], "GQA-2": [0.002, 0.006], "MQA": [0.004, 0.005]})
    lows = [i["low"] for i in results["timing"][0]["time_per_sample"].values()]
    assert min(lows) < 0  # the intervals themselves reach below 0 s ...
    saved = figure_checks.capture(monkeypatch)
    study_report.plot_timing(results, Path("unused.png"))
    ours = saved[0].axes[0]
    ends = figure_checks.error_bar_ends(ours)
    assert len(ends) == 6 and min(ends) == 0.0  # ... the bars drawn do not
    highs = sorted(i["high"] for i in results["timing"][0]["time_per_sample"].values())
    assert sorted(ends)[-3:] == pytest.approx(highs)  # the upper ends are the intervals' own
    figure_checks.close(saved)


def _bleu_results(per_seed: list[float]) -> dict:
    return {"settings": StudySettings.reduced().to_json(), "reduced_run": True, "downstream": [
        {"variant": "MQA", "alpha": 0.05, "bleu_per_seed": per_seed, "bleu": None,
         "wmt_loss_per_seed": [], "wmt_loss": None}]}


def test_bleu_of_one_fine_tuned_seed_is_drawn_as_that_seeds_point(monkeypatch):
    saved = figure_checks.capture(monkeypatch)
    study_report.plot_bleu(_bleu_results([0.37]), Path("unused.png"))
    ours, ref = saved[0].axes
    points = [line for line in ours.get_lines() if len(line.get_xdata())]
    assert [list(p.get_ydata()) for p in points] == [[0.37]] and "0.37" in figure_checks.texts(ours)
    assert "28.4" in figure_checks.texts(ref) and not figure_checks.truncated_bars(ref)
    figure_checks.close(saved)


def test_bleu_without_a_fine_tuned_model_says_so(monkeypatch):
    saved = figure_checks.capture(monkeypatch)
    study_report.plot_bleu(_bleu_results([]), Path("unused.png"))
    assert figure_checks.texts(saved[0].axes[0]) == ["no fine-tuned model was scored"]
    figure_checks.close(saved)


def test_figures_of_the_committed_study_are_honest(tmp_path, monkeypatch):
    """docs/reproduction.json (the full study): no banner, no bar on a truncated
    axis, no error bar below 0, the two timed shapes (23x apart) on a log axis."""
    results = json.loads((REPO / "docs" / "reproduction.json").read_text())
    saved = figure_checks.capture(monkeypatch)
    files = study_report.write_report(results, tmp_path)
    assert "reduced run" not in files["markdown"].read_text()
    by_name = dict(zip(["pretraining", "methods", "alpha", "timing", "bleu"], saved))
    for name, fig in by_name.items():
        for ax in fig.axes:
            assert not figure_checks.truncated_bars(ax), name
            assert min(figure_checks.error_bar_ends(ax), default=0.0) >= 0, name
            assert figure_checks.texts(ax), name  # values labelled (or 'no data')
    assert by_name["timing"].axes[0].get_yscale() == "log"
    assert figure_checks.error_bar_ends(by_name["bleu"].axes[0])  # the panel is not empty
    figure_checks.close(saved)
