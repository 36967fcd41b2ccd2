"""The study's report on hand-made results (`analysis.analyse`'s structure):
every section in order with its numbers, intervals and interval kinds; a
missing section is one 'not run' line; a reduced run says its verdicts are
not meaningful (markdown, console, figures) and a full run does not; no
re-run column; console lines fit 120 columns; figures are written only with
data, their error bars stop at 0 and their bars start at 0."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import figure_checks
from gqa_t5x.experiments import tables
from gqa_t5x.experiments.study import criteria as cr
from gqa_t5x.experiments.study import quickstart
from gqa_t5x.experiments.study import report as study_report
from gqa_t5x.experiments.study import report_figures
from gqa_t5x.experiments.study import statistics as st
from gqa_t5x.experiments.study.settings import StudySettings

pytestmark = pytest.mark.study

BANNER = "reduced run: checks the machinery, verdicts not meaningful"
NOTE = "(not meaningful: reduced run)"
SA, ART, ROUNDS = st.SEEDS_AND_ARTICLES, st.ARTICLES, st.ROUNDS


def _i(mean: float, low: float, high: float, kind: str = SA, p: float | None = None, n: int = 3) -> st.Interval:
    return st.Interval(mean, low, high, n, kind, 0.01, p)


def _j(*args, **kwargs) -> dict:
    return _i(*args, **kwargs).to_json()


def _config(variant: str, kv: int, method: str | None, alpha: float, loss: float, runs: int = 3, **extra) -> dict:
    kind = ART if runs == 1 else SA
    return {"variant": variant, "kv_heads": kv, "method": method, "alpha": alpha, "runs": runs,
            "wikipedia_loss": _j(loss, loss - 0.05, loss + 0.05, kind),
            "wikipedia_accuracy": _j(0.3, 0.28, 0.32, kind),
            "c4_loss": _j(loss + 0.2, loss + 0.1, loss + 0.3, kind), "c4_accuracy": _j(0.25, 0.23, 0.27, kind),
            **extra}


def _results(reduced: bool = False) -> dict:
    """A full study's results with every section filled (hand-made numbers)."""
    settings = StudySettings.reduced() if reduced else StudySettings()
    s = settings.to_json()
    claims = cr.apply_holm([
        cr.c1_conversion_methods(_i(0.0421, 0.0311, 0.0531, p=0.001), _i(0.2, 0.1, 0.3, p=0.002),
                                 where="MQA, alpha=0.05"),
        cr.c2_gqa_recovers(_i(0.3125, 0.2, 0.425, p=0.004), _i(0.8, 0.7, 0.9, p=0.001), _i(0.08, 0.05, 0.11, p=0.01),
                           _i(0.1, 0.06, 0.14, kind=st.JOINT), gqa="GQA-2", where="alpha=0.05"),
        cr.c3a_zero_shot(_i(0.5, 0.4, 0.6, kind=ART, p=0.0005), gqa="GQA-2"),
        cr.c3b_after_finetune(_i(-0.01, -0.05, 0.03, p=0.6), _i(0.2, 0.1, 0.3, p=0.01), gqa="GQA-2"),
        cr.c4_speed(_i(0.00123, 0.001, 0.00146, kind=ROUNDS, p=0.0001, n=7), 0.91, gqa="GQA-2",
                    where="in 512 / out 128"),
    ])
    beyond = cr.beyond([cr.MethodCell("align", "MQA", 0.0, _i(-0.0777, -0.09, -0.065, kind=ART, p=0.0002)),
                        cr.MethodCell("align", "MQA", 0.05, _i(-0.01, -0.03, 0.01, p=0.3)),
                        cr.MethodCell("align-keep", "MQA", 0.05, _i(-0.02, -0.04, 0.0, p=0.07))])
    configs = [_config("MHA", 16, None, 0.0, 3.0, runs=1), _config("MHA", 16, None, 0.05, 2.95),
               _config("MHA", 16, "fresh", 0.05, 2.97), _config("MHA", 16, "replay", 0.05, 2.99, runs=1),
               _config("MHA", 16, "replay-fresh", 0.05, 3.01, runs=1)]
    for variant, kv, gap in (("MQA", 1, 1.0), ("GQA-2", 2, 0.3)):
        configs += [_config(variant, kv, "mean", 0.0, 3 + gap, runs=1),
                    _config(variant, kv, "align", 0.0, 2.9 + gap, runs=1)]
        configs += [_config(variant, kv, m, a, 2.95 + gap / 4 - a) for m in ("mean", "align", "align-keep")
                    for a in (0.0125, 0.025, 0.05)]
    configs.append({"variant": "MQA", "kv_heads": 1, "method": "mean", "alpha": 0.0, "finetuned": "c4", "runs": 3,
                    "c4_loss": _j(3.6543, 3.6, 3.7)})
    timing_names = {"MHA": 16, "GQA-4": 4, "GQA-2": 2, "MQA": 1}
    return {
        "command": "gqa-t5x reproduce --output X", "reduced_run": reduced,
        "banner": BANNER if reduced else None,
        "machine": {"cpu": "Test CPU", "cores": 2, "memory_gib": 8, "jax": "0.0", "backend": "cpu"},
        "sessions": [{"wall_s": 600.0, "pretrain_seed": 100}], "wall_time_s": 600.0,
        "stage_wall_time_s": {"pretrain": 321.5, "uptrain": 123.4}, "settings": s, "seeds": [0, 1, 2],
        "data": {"vocab_size": 8064, "heldout": {"wikipedia": {"examples": 2048, "available": 9000, "articles": 311},
                                                 "c4": {"examples": 512, "available": 5000, "articles": 487}}},
        "pretraining": {"steps": 4000, "train_loss": [[1, 6.0], [2000, 3.5], [4000, 3.0]],
                        "curve": [{"step": x, "wikipedia_loss": l, "wikipedia_accuracy": 0.3, "c4_loss": l + 0.2,
                                   "c4_accuracy": 0.25} for x, l in ((400, 4.5), (2000, 3.4), (4000, 3.0))],
                        "flattening": {"early_drop_per_1k_steps": 0.6875, "final_drop_per_1k_steps": 0.2,
                                       "final_over_early": 0.29, "late_from_step": 2000, "late_share_of_drop": 0.27}},
        "configurations": configs, "claims": claims, "paper_through_criteria": cr.paper_claims(),
        "beyond_paper": beyond,
        "kept_optimizer_state": [{"method": "align", "variant": "MQA", "alpha": 0.05,
                                  "name": "loss(align, state kept) - loss(align, fresh state)",
                                  "interval": _j(-0.0234, -0.03, -0.017, p=0.003), "p_holm": 0.003,
                                  "verdict": "kept state better"}],
        "recipe_2x2": {"alpha": 0.05, "steps": 200, "recipes": ["fresh", "replay", "replay-fresh"],
                       "cells": [{"optimizer_state": st_, "data": d, "runs": r, "loss": _j(2.95 + k, 2.9 + k, 3 + k),
                                  "minus_loss_at_P": _j(-0.0567 + k, -0.07 + k, -0.04 + k, p=0.001),
                                  "minus_restored_continued": None if k == 0 else _j(k, k - 0.01, k + 0.01, p=0.02)}
                                 for st_, d, r, k in (("restored", "continued", 3, 0), ("fresh", "continued", 3, 0.02),
                                                      ("restored", "replayed", 1, 0.04),
                                                      ("fresh", "replayed", 1, 0.06))],
                       "continuation_improves": True,
                       "verdict": "the restored + continued recipe improves on the loss at P"},
        "uptraining_saving": [
            {"variant": "MQA", "method": "align", "target_alpha": 0.05, "target_loss": 3.0, "alpha": 0.008,
             "interval": [0.006, 0.01], "resamples_not_reaching": 0, "saving": 6.25},
            {"variant": "MQA", "method": "align-keep", "target_alpha": 0.05, "target_loss": 3.0, "alpha": 0.025,
             "interval": [0.004, 0.04], "resamples_not_reaching": 0, "saving": 2.0},
            {"variant": "GQA-2", "method": "align", "target_alpha": 0.05, "target_loss": 3.0, "alpha": None,
             "interval": None, "resamples_not_reaching": 2000, "saving": None}],
        "groups": [{"kv_heads": kv, "variant": v, "loss": _j(3 + g, 2.9 + g, 3.1 + g),
                    "gap_to_mha": None if v == "MHA" else _j(g, g - 0.05, g + 0.05, p=0.001)}
                   for kv, v, g in ((1, "MQA", 0.8), (2, "GQA-2", 0.0876), (4, "GQA-4", 0.05), (16, "MHA", 0.0))],
        "downstream": [],
        "timing": [{"input_length": 512, "output_length": 128,
                    "cache_bytes_per_sample": {n: {"self": 1000 * kv, "cross": 4000 * kv, "total": 5000 * kv}
                                               for n, kv in timing_names.items()},
                    "cache_to_weight_ratio": {n: 0.05 * kv for n, kv in timing_names.items()},
                    "time_per_sample": {n: _j(0.001 + 0.0002 * kv, 0.0009 + 0.0002 * kv, 0.0011 + 0.0002 * kv,
                                              ROUNDS, n=7) for n, kv in timing_names.items()}}],
        "timing_setup": {"batch": 16, "rounds": 7, "seed": 0, "variants": timing_names,
                         "config": {"emb_dim": 1024, "num_heads": 16, "head_dim": 64, "mlp_dim": 2816,
                                    "num_encoder_layers": 2, "num_decoder_layers": 2},
                         "decode_step_weight_bytes": {n: 10 ** 6 for n in timing_names}},
    }


def _missing(results: dict) -> dict:
    """The same results with every optional section not run."""
    out = copy.deepcopy(results)
    out.update(data=None, pretraining={"steps": 0, "curve": [], "train_loss": []}, configurations=[], claims=[],
               paper_through_criteria=[], beyond_paper=[], kept_optimizer_state=[], recipe_2x2=None,
               uptraining_saving=[], groups=[], downstream=[], timing=[], timing_setup=None, sessions=[],
               stage_wall_time_s={})
    return out


def _section(text: str, heading: str) -> str:
    return text.split(f"\n## {heading}\n")[1].split("\n## ")[0]


# ------------------------------------------------------------- markdown
def test_a_full_report_has_every_section_in_order_with_numbers_intervals_and_kinds():
    text = study_report.markdown(_results(), "reproduction")
    positions = [text.index(f"\n## {h}\n") for h in study_report.SECTIONS]
    assert positions == sorted(positions) and text.startswith("# Reproducing GQA's findings at small scale")
    assert "Holm-adjusted over the primaries of C1, C2, C3a, C3b and C4" in text.split("## Verdicts")[0]
    verdicts = _section(text, "Verdicts")
    c2 = next(row for row in verdicts.splitlines() if row.startswith("| C2 |"))
    assert "**reproduced**" in c2 and "0.3125 [0.2, 0.425] (seeds+articles)" in c2 and "Table 1" in c2
    assert "| B-align | align beats mean pooling. | **mixed** |" not in verdicts  # one better, none worse
    assert "| B-align | align beats mean pooling. | **better** |" in verdicts
    assert "1.00 by construction" in verdicts and "varies" in verdicts
    assert _section(text, "The paper through our criteria").count("**reproduced**") == 4
    run = _section(text, "Run")
    assert "gqa-t5x reproduce --output X" in run and "pretrain 321.5, uptrain 123.4" in run and "[0, 1, 2]" in run
    design = _section(text, "Design")
    assert "wikipedia: 2048 examples from 311 articles; c4: 512 examples from 487 articles" in design
    assert "8 query heads per kv head" in design and "restores the pre-training optimizer state" in design
    assert "WMT En-De is not run" in design and "BLEU 0.002 / 0.0006 / 0.0" in design
    assert "random weights in T5-Large's attention shape" in design
    assert "(ratio 0.29)" in _section(text, "Pre-training") and "27.0% of the drop" in _section(text, "Pre-training")
    recipe = _section(text, "The uptraining recipe (2x2)")
    assert "-0.0567 [-0.07, -0.04] (seeds+articles), p 0.001" in recipe and "**Verdict:** the restored" in recipe
    detail = _section(text, "Claims in detail")
    assert all(f"### {c}: " in detail for c in ("C1", "C2", "C3a", "C3b", "C4"))
    assert "| primary | loss(first) - loss(mean) [MQA, alpha=0.05] | > 0 | 0.0421 [0.0311, 0.0531] |" in detail
    assert "| supporting | gap(MQA) = loss(MQA) - loss(MHA) [alpha=0.05] |" in detail
    table = _section(text, "Conversion ablation and the alpha curve")
    assert "| MQA | align-keep | 0.05 | 3 |" in table and "| MHA | replay-fresh | 0.05 | 1 |" in table
    assert "| MQA | mean, fine-tuned on C4 | 0 | 3 | - | - | 3.654 [3.6, 3.7] |" in table
    assert "| 2 | GQA-2 | 3.088 [2.988, 3.188] (seeds+articles) | 0.0876 [0.0376, 0.1376] (seeds+articles) |" in table
    for name in ("methods", "alpha", "groups"):
        assert f"(reproduction/{name}.png)" in table
    beyond = _section(text, "Beyond the paper")
    assert "| B-align | MQA | 0 | -0.0777 [-0.09, -0.065] | articles | 0.0002 |" in beyond
    kept = "| align | MQA | 0.05 | -0.0234 [-0.03, -0.017] | seeds+articles | 0.003 | 0.003 | kept state better |"
    assert kept in beyond
    assert "| MQA | align | 0.008 | [0.006, 0.01] | 0 of 2000 | 6.25x |" in beyond
    assert "align (MQA) saves 6.25x [5.00, 8.33]: consistent with the 5-12x less uptraining" in beyond
    assert "align-keep (MQA) saves 2.00x [1.25, 12.50]: the interval is too wide" in beyond
    assert "align (GQA-2) does not reach mean pooling's loss at alpha 0.05" in beyond
    timing = _section(text, "Time per sample (C4)")
    assert "| GQA-2 | 2 | 0.0014 [0.0013, 0.0015] (rounds) | 2000 / 8000 / 10000 | 1000000 | 0.1 |" in timing
    assert "(reproduction/timing.png)" in timing
    assert "Tiny CPU models" in _section(text, "Scope and limits")


def test_there_is_no_re_run_column():
    text = study_report.markdown(_results(), "reproduction")
    header = next(line for line in text.splitlines() if line.startswith("| id | claim | verdict |"))
    assert "re-run" not in header and "same verdict" not in header
    assert not any(line.startswith("|") and "re-run" in line for line in text.splitlines())


def test_every_missing_section_is_one_not_run_line():
    text = study_report.markdown(_missing(_results()), "reproduction")
    for heading in ("Verdicts", "The paper through our criteria", "Pre-training", "The uptraining recipe (2x2)",
                    "Claims in detail", "Conversion ablation and the alpha curve", "Time per sample (C4)"):
        lines = [line for line in _section(text, heading).splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith("Not run in this study"), heading
    beyond = _section(text, "Beyond the paper")
    assert beyond.count("Not run in this study") == 3 and "Timing: not run" in _section(text, "Design")
    assert ".png" not in text


def test_downstream_rows_replace_the_wmt_sentence():
    results = _results()
    results["downstream"] = [{"variant": "GQA-2", "alpha": 0.05, "bleu_per_seed": [1.5, 2.5],
                              "bleu": _j(2.0, 1.0, 3.0, st.SEEDS), "wmt_loss_per_seed": [2.1, 2.3],
                              "wmt_loss": _j(2.2, 2.0, 2.4, st.SEEDS)}]
    design = _section(study_report.markdown(results, "r"), "Design")
    assert "WMT En-De is not run" not in design
    assert "| GQA-2 | 0.05 | 2 [1, 3] (seeds) | 1.5, 2.5 | 2.2 [2, 2.4] (seeds) |" in design


def test_the_quickstart_report_says_what_it_did_not_run():
    results = _missing(_results())
    results["settings"] = StudySettings.quickstart().to_json()
    text = study_report.markdown(results, "r")
    assert text.startswith("# GQA's conversion ablation at alpha = 0 (quickstart)")
    assert "No uptraining, fine-tuning or timing" in text and "What it does not show" in text


# ------------------------------------------------------------- reduced runs and the console
def test_a_reduced_report_says_its_verdicts_are_not_meaningful(tmp_path, monkeypatch):
    results = _results(reduced=True)
    text = study_report.markdown(results, "reproduction")
    assert BANNER in text.splitlines()[2] and f"> **{BANNER}.**" in _section(text, "Verdicts")
    rows = [row for row in _section(text, "Verdicts").splitlines() if row.startswith(("| C", "| B-"))]
    assert len(rows) == 7 and all(NOTE in row for row in rows)
    assert "**reproduced**" not in _section(text, "Verdicts")  # no bare verdict of ours
    console = study_report.summary_lines(results)
    assert console[0] == f"*** {BANNER} ***"
    assert f"C1: reproduced {NOTE} - " in "\n".join(console)
    saved = figure_checks.capture(monkeypatch)
    report_figures.write_figures(results, tmp_path)
    assert len(saved) == 5 and all(fig._suptitle.get_text() == BANNER for fig in saved)
    figure_checks.close(saved)


def test_a_full_report_has_no_banner():
    results = _results()
    text = study_report.markdown(results, "reproduction")
    assert "reduced run" not in text and "not meaningful" not in text
    console = study_report.summary_lines(results)
    assert console[0].startswith("C1: reproduced - Mean pooling")


def test_console_lists_each_verdict_with_its_primary_estimate_within_the_width():
    results = _results()
    console = study_report.summary_lines(results)
    joined = " ".join(line.strip() for line in console)
    for claim in results["claims"]:
        assert f"{claim['id']}: {claim['verdict']} - " in joined
    assert "0.3125 [0.2, 0.425] (seeds+articles), Holm p" in joined
    assert "0.00123 [0.001, 0.00146] (rounds)" in joined and "B-align: better - " in joined
    assert max(len(line) for line in console) <= tables.CONSOLE_WIDTH
    narrow = study_report.summary_lines(results, width=60)
    assert all(len(line) <= 60 for line in narrow) and narrow[1].startswith("    ")
    assert study_report.summary_lines(_missing(results)) == []


# ------------------------------------------------------------- files and figures
def test_write_report_writes_markdown_json_and_the_figures(tmp_path):
    results = _results()
    files = study_report.write_report(results, tmp_path / "report")
    assert set(files) == {"markdown", "json", "pretraining", "methods", "alpha", "groups", "timing"}
    assert json.loads(files["json"].read_text())["seeds"] == [0, 1, 2]
    assert "## Verdicts" in files["markdown"].read_text()
    for name in ("pretraining", "methods", "alpha", "groups", "timing"):
        assert files[name] == tmp_path / "report" / "reproduction" / f"{name}.png"
        assert files[name].read_bytes()[:4] == b"\x89PNG"


def test_write_report_skips_the_figures_without_data(tmp_path):
    files = study_report.write_report(_missing(_results()), tmp_path)
    assert set(files) == {"markdown", "json"}


def test_figures_are_honest(monkeypatch):
    """Values labelled, no bar on a truncated axis, no error bar below 0 for losses and times."""
    results = _results()
    saved = figure_checks.capture(monkeypatch)
    for name in report_figures.available(results):
        report_figures.PLOTS[name](results, Path("unused.png"))
    assert len(saved) == 5
    for fig in saved:
        for ax in fig.axes:
            assert not figure_checks.truncated_bars(ax)
            assert figure_checks.texts(ax)
    loss_ax, gap_ax = saved[3].axes  # groups: losses floored at 0, gaps not
    assert min(figure_checks.error_bar_ends(loss_ax)) > 0
    figure_checks.close(saved)


def test_timing_error_bars_of_two_noisy_rounds_stop_at_zero(monkeypatch):
    results = _results(reduced=True)
    results["timing"][0]["time_per_sample"] = {
        "MHA": _j(0.005, -0.02, 0.03, ROUNDS, n=2), "GQA-2": _j(0.004, -0.01, 0.018, ROUNDS, n=2),
        "MQA": _j(0.0045, 0.003, 0.006, ROUNDS, n=2)}
    saved = figure_checks.capture(monkeypatch)
    report_figures.plot_timing(results, Path("unused.png"))
    ours, cache, _ = saved[0].axes
    ends = figure_checks.error_bar_ends(ours)
    assert len(ends) == 6 and min(ends) == 0.0
    assert sorted(ends)[-3:] == pytest.approx([0.006, 0.018, 0.03])  # the upper ends are the intervals' own
    assert list(ours.get_xticks()) == [1, 2, 16] and not figure_checks.truncated_bars(cache)
    figure_checks.close(saved)


def test_bleu_of_one_fine_tuned_seed_is_drawn_as_that_seeds_point(monkeypatch):
    results = {"settings": StudySettings.reduced().to_json(), "reduced_run": True, "downstream": [
        {"variant": "MQA", "alpha": 0.05, "bleu_per_seed": [0.37], "bleu": None, "wmt_loss_per_seed": [],
         "wmt_loss": None}]}
    saved = figure_checks.capture(monkeypatch)
    report_figures.plot_bleu(results, Path("unused.png"))
    ours, ref = saved[0].axes
    points = [line for line in ours.get_lines() if len(line.get_xdata())]
    assert [list(p.get_ydata()) for p in points] == [[0.37]] and "0.37" in figure_checks.texts(ours)
    assert "28.4" in figure_checks.texts(ref) and not figure_checks.truncated_bars(ref)
    figure_checks.close(saved)


@pytest.mark.parametrize("settings,reduced", [
    (StudySettings.reduced(), True), (quickstart.reduced_settings(), True),
    (StudySettings(), False), (StudySettings.quickstart(), False),
])
def test_the_reduced_settings_and_only_they_are_machinery_checks(settings, reduced):
    assert settings.is_reduced is reduced
