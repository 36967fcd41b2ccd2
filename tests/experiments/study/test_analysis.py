"""The study's analysis on synthetic evaluations: each claim's verdict follows
the numbers it is given, intervals are of the right kind, the report renders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gqa_t5x.experiments.study import analysis
from gqa_t5x.experiments.study import report as rreport
from gqa_t5x.experiments.study import statistics as st
from gqa_t5x.experiments.study.settings import StudySettings, eval_key, uptrain_run

pytestmark = pytest.mark.study

SEEDS = (0, 1, 2)
N = 200


def _settings() -> StudySettings:
    return StudySettings(pretrain_steps=400, curve_points=4, heldout_examples=(("wikipedia", N), ("c4", N)))


def _write_eval(root: Path, key: str, loss_per_token: float, rng: np.random.Generator) -> None:
    tokens = rng.integers(8, 16, size=N).astype(float)
    difficulty = rng.normal(0.0, 1.0, size=N)  # shared by every model: pairs the examples
    arrays = {}
    for name in ("wikipedia", "c4"):
        loss = (loss_per_token + 0.5 * difficulty + 0.01 * rng.normal(size=N)) * tokens
        arrays |= {f"{name}/loss": loss, f"{name}/correct": tokens * 0.3, f"{name}/tokens": tokens}
    np.savez(root / f"{key}.npz", **arrays)


def _study(tmp_path: Path, losses: dict[tuple[int, str | None, float], float], seed_noise: float = 0.002) -> Path:
    """Writes evaluations: losses[(kv, method, alpha)] is the mean loss per token."""
    settings = _settings()
    evals = tmp_path / "evals"
    evals.mkdir(parents=True)
    for (kv, method, alpha), loss in losses.items():
        seeds = [None] if alpha == 0 and method != "random" else SEEDS
        for i, seed in enumerate(seeds):
            rng = np.random.default_rng(0)  # the same difficulty for every model
            offset = 0.0 if seed is None else seed_noise * (i - 1)
            _write_eval(evals, eval_key(kv, 8, method, alpha, seed), loss + offset, rng)
    for step in (100, 200, 300, 400):
        _write_eval(evals, f"pretrain_{step}", 6.0 - step / 200 + (step / 400) ** 2, np.random.default_rng(0))
    markers = tmp_path / "markers"
    markers.mkdir()
    (markers / "pretrain.done.json").write_text(json.dumps({"train_loss": [[1, 7.0], [400, 4.0]], "wall_s": 1.0}))
    for kv, method in ((8, None), (2, "mean"), (1, "mean")):
        for seed in SEEDS:
            name = f"{uptrain_run(kv, 8, method, seed)}_a{settings.ablation_alpha:g}"
            (markers / f"finetune_{name}.done.json").write_text(json.dumps({"bleu": 1.0 + kv / 10 + seed / 100}))
            tokens = np.full(20, 10.0)
            np.savez(evals / f"wmt_{name}.npz", **{"wmt/loss": tokens * (5.0 - kv / 10), "wmt/correct": tokens / 2,
                                                   "wmt/tokens": tokens})
    times = {"MHA": [0.030, 0.031, 0.032], "GQA-2": [0.020, 0.021, 0.022], "MQA": [0.010, 0.0101, 0.0102]}
    (markers / "timing.done.json").write_text(json.dumps({"batch": 4, "rounds": 3, "shapes": [
        {"input_length": 64, "output_length": 16, "time_per_sample": times}]}))
    return tmp_path


def _paper_like() -> dict:
    """Losses with the paper's shape: mean < first < random; GQA near MHA; 5% closes most of MQA's gap."""
    up = 0.05
    losses = {(8, None, 0.0): 3.00}
    for a in (0.025, 0.05, 0.1):
        losses[(8, None, a)] = 2.99 - a
    for kv, base in ((1, 4.0), (2, 3.3)):
        for a in (0.0, 0.025, 0.05, 0.1):
            closed = 0.0 if a == 0 else 0.8
            losses[(kv, "mean", a)] = base - closed * (base - 3.0) + (0.05 if kv == 1 else 0.01)
        for method, extra in (("first", 0.2), ("random", 1.0), ("align", 0.0), ("lsq", -0.3)):
            losses[(kv, method, 0.0)] = losses[(kv, "mean", 0.0)] + extra
            losses[(kv, method, up)] = losses[(kv, "mean", up)] + extra / 4
    return losses


def test_paper_shaped_numbers_reproduce_c1_to_c4_and_lsq_is_called_better(tmp_path):
    out = _study(tmp_path, _paper_like())
    results = analysis.analyse(out, _settings(), SEEDS, command="gqa-t5x reproduce", sessions=[{"wall_s": 10.0}])
    verdicts = {c["id"]: c["verdict"] for c in results["claims"]}
    assert verdicts == {"C1": st.REPRODUCED, "C2": st.REPRODUCED, "C3": st.REPRODUCED, "C4": st.REPRODUCED}
    beyond = {b["id"]: b for b in results["beyond_paper"]}
    assert beyond["B-lsq"]["verdict"] == "better at alpha 0; better at alpha 0.05"
    assert beyond["B-align"]["verdict"] == "no difference resolved at alpha 0; no difference resolved at alpha 0.05"
    c3 = next(c for c in results["claims"] if c["id"] == "C3")
    assert c3["primary"][0]["interval"]["kind"] == st.EXAMPLES  # alpha 0, deterministic: over examples
    assert c3["primary"][2]["interval"]["kind"] == st.SEEDS
    assert results["pretraining"]["flattening"]["final_over_early"] < 0.5
    assert [r["bleu"]["n"] for r in results["downstream"]] == [3, 3, 3]
    c2_rows = {c["comparison"]: c for c in next(c for c in results["claims"] if c["id"] == "C2")["supporting"]}
    assert c2_rows["WMT loss(MQA) - loss(GQA-2) [fine-tuned]"]["verdict"] == st.REPRODUCED


def test_reversed_ordering_is_not_reproduced_and_ties_are_inconclusive(tmp_path):
    losses = _paper_like()
    for a in (0.0, 0.05):
        losses[(1, "first", a)] = losses[(1, "mean", a)] - 0.2  # first beats mean: the opposite of C1
        losses[(2, "mean", a)] = losses[(1, "mean", a)]  # GQA no better than MQA
    out = _study(tmp_path, losses, seed_noise=0.05)
    results = analysis.analyse(out, _settings(), SEEDS, command="x", sessions=[])
    verdicts = {c["id"]: c["verdict"] for c in results["claims"]}
    assert verdicts["C1"] == st.NOT_REPRODUCED
    c2 = next(c for c in results["claims"] if c["id"] == "C2")
    assert c2["primary"][0]["verdict"] == st.INCONCLUSIVE and verdicts["C2"] != st.REPRODUCED


def test_report_renders_every_claim_and_figure(tmp_path):
    out = _study(tmp_path / "study", _paper_like())
    results = analysis.analyse(out, _settings(), SEEDS, command="gqa-t5x reproduce --output X",
                               sessions=[{"wall_s": 60.0, "pretrain_seed": 100}])
    files = rreport.write_report(results, tmp_path / "report")
    text = files["markdown"].read_text()
    for claim_id in ("C1", "C2", "C3", "C4", "B-lsq", "B-align"):
        assert f"| {claim_id} |" in text
    assert "gqa-t5x reproduce --output X" in text and "**reproduced**" in text
    assert json.loads(files["json"].read_text())["seeds"] == list(SEEDS)
    for name in ("pretraining", "methods", "alpha", "timing", "bleu"):
        assert files[name].stat().st_size > 0


@pytest.mark.parametrize("changes,message", [
    (dict(gqa_kv_heads=3), r"num_heads=8 is not divisible by gqa_kv_heads=3; choose a divisor of 8"),
    (dict(methods=("first", "random")), "must include 'mean'"),
    (dict(ablation_alpha=0.2), "must be one of alphas"),
    (dict(pretrain_steps=410), "whole number of steps"),
])
def test_invalid_study_settings_are_rejected_naming_the_field(changes, message):
    import dataclasses

    with pytest.raises(ValueError, match=message):
        dataclasses.replace(StudySettings(), **changes).validate()


# ------------------------------------------------- hand-made evaluations, known answers
import study_evals  # noqa: E402  (tests/study_evals.py)

_SMALL = StudySettings(heldout_examples=(("wikipedia", 40), ("c4", 10)), bootstrap_resamples=400)


def _analysis(tmp_path: Path, settings: StudySettings = _SMALL, seeds=SEEDS) -> analysis.Analysis:
    return analysis.Analysis(tmp_path, settings, seeds)


def _varied(n: int) -> np.ndarray:
    """A loss per token that differs from example to example (3 +- 0.5)."""
    return 3.0 + 0.5 * np.sin(np.arange(n))


def test_evals_value_is_summed_loss_over_summed_tokens(tmp_path):
    evals = tmp_path / "evals"
    evals.mkdir()
    np.savez(evals / "k.npz", **{"wikipedia/loss": [1.0, 3.0, 6.0], "wikipedia/tokens": [2.0, 3.0, 5.0],
                                 "wikipedia/correct": [1.0, 1.0, 2.0]})
    e = analysis.Evals(evals)
    assert e.has("k") and not e.has("other")
    assert e.value("k", "wikipedia", "loss") == pytest.approx(10.0 / 10.0)  # not the mean of 1/2, 1, 6/5
    assert e.value("k", "wikipedia", "accuracy") == pytest.approx(4.0 / 10.0)
    num, den = e.sums("k", "wikipedia", "accuracy")
    np.testing.assert_array_equal(num, [1.0, 1.0, 2.0])
    np.testing.assert_array_equal(den, [2.0, 3.0, 5.0])


def test_keys_are_one_evaluation_for_deterministic_runs_and_one_per_seed_otherwise(tmp_path):
    a = _analysis(tmp_path)
    assert a.keys(8, None, 0.0) == ["mha_a0"]
    assert a.keys(1, "mean", 0.0) == ["g1_mean_a0"]
    assert a.keys(2, "lsq", 0.0) == ["g2_lsq_a0"]
    assert a.keys(1, "random", 0.0) == ["g1_random_a0_s0", "g1_random_a0_s1", "g1_random_a0_s2"]
    assert a.keys(2, "mean", 0.05) == ["g2_mean_a0.05_s0", "g2_mean_a0.05_s1", "g2_mean_a0.05_s2"]
    assert a.keys(8, None, 0.1) == ["mha_a0.1_s0", "mha_a0.1_s1", "mha_a0.1_s2"]


def test_a_deterministic_configuration_with_one_loss_everywhere_has_a_point_interval(tmp_path):
    study_evals.write_config(tmp_path / "evals", _SMALL, 1, "mean", 0.0, SEEDS, 2.5)
    cell = _analysis(tmp_path).cell(1, "mean", 0.0)
    assert (cell.mean, cell.low, cell.high) == pytest.approx((2.5, 2.5, 2.5))
    assert cell.kind == st.EXAMPLES and cell.n == 40
    c4 = _analysis(tmp_path).cell(1, "mean", 0.0, heldout="c4", metric="accuracy")
    assert (c4.mean, c4.n) == (pytest.approx(0.5), 10)


def test_a_deterministic_configurations_interval_is_about_the_ratio_estimators_normal_interval(tmp_path):
    n = 400
    settings = StudySettings(heldout_examples=(("wikipedia", n),), bootstrap_resamples=2000)
    loss = 3.0 + np.random.default_rng(7).gamma(2.0, 0.5, size=n)  # skewed per-example losses
    study_evals.write_config(tmp_path / "evals", settings, 1, "mean", 0.0, SEEDS, loss)
    cell = _analysis(tmp_path, settings).cell(1, "mean", 0.0)
    tokens = study_evals.tokens_for(n)
    ratio = (loss * tokens).sum() / tokens.sum()
    # Delta method: var(sum l / sum t) ~ sum (l_i t_i - R t_i)^2 / (sum t)^2.
    se = np.sqrt((((loss - ratio) * tokens) ** 2).sum() * n / (n - 1)) / tokens.sum()
    assert cell.mean == pytest.approx(ratio)
    assert cell.half_width == pytest.approx(1.96 * se, rel=0.15)
    assert cell.low < ratio < cell.high


def test_a_seeded_configurations_interval_is_students_t_over_the_seed_values(tmp_path):
    study_evals.write_config(tmp_path / "evals", _SMALL, 2, "mean", 0.05, SEEDS, [3.0, 3.2, 3.4])
    cell = _analysis(tmp_path).cell(2, "mean", 0.05)
    # mean 3.2, sd 0.2, half-width t_{0.975,2} 0.2 / sqrt(3) = 4.3026527 x 0.1154701 = 0.4968275.
    assert (cell.mean, cell.low, cell.high) == pytest.approx((3.2, 2.7031725, 3.6968275))
    assert (cell.kind, cell.n, cell.sd) == (st.SEEDS, 3, pytest.approx(0.2))


def test_a_configuration_missing_an_evaluation_is_not_run(tmp_path):
    study_evals.write(tmp_path / "evals", "g2_mean_a0.05_s0", _SMALL, 3.0)  # seeds 1 and 2 missing
    a = _analysis(tmp_path)
    assert a.cell(2, "mean", 0.05) is None and a.cell(1, "mean", 0.0) is None
    assert a.contrast([(1, 2, "mean", 0.05), (-1, 1, "mean", 0.05)]) is None
    row = analysis.comparison("x", None, 1)
    assert row["verdict"] == "not run" and row["same_verdict_probability"] is None


@pytest.mark.parametrize("shift,verdict", [(0.3, st.REPRODUCED), (0.0, st.INCONCLUSIVE), (-0.3, st.NOT_REPRODUCED)])
def test_a_difference_that_holds_on_every_example_is_a_point_interval_when_paired(tmp_path, shift, verdict):
    # first = mean + shift on every example, while examples differ by +-0.5: only a paired
    # bootstrap (the same examples on both sides) gives exactly `shift` on every resample.
    mean = _varied(40)
    study_evals.write_config(tmp_path / "evals", _SMALL, 1, "mean", 0.0, SEEDS, mean)
    study_evals.write_config(tmp_path / "evals", _SMALL, 1, "first", 0.0, SEEDS, mean + shift)
    diff = _analysis(tmp_path).contrast([(1, 1, "first", 0.0), (-1, 1, "mean", 0.0)])
    assert (diff.mean, diff.low, diff.high) == pytest.approx((shift, shift, shift), abs=1e-12)
    assert diff.kind == st.EXAMPLES
    row = analysis.comparison("loss(first) - loss(mean)", diff, 1)
    assert row["verdict"] == verdict and row["expected"] == "> 0"
    assert row["same_verdict_probability"] == 1.0  # examples: a re-run scores the same checkpoint


def test_a_contrast_with_seeded_terms_pairs_by_seed_and_holds_single_runs_constant(tmp_path):
    ev = tmp_path / "evals"
    study_evals.write_config(ev, _SMALL, 1, "mean", 0.05, SEEDS, [3.50, 3.54, 3.40])
    study_evals.write_config(ev, _SMALL, 1, "mean", 0.0, SEEDS, 5.0)
    study_evals.write_config(ev, _SMALL, 8, None, 0.05, SEEDS, [3.00, 3.02, 2.90])
    got = _analysis(tmp_path).contrast([(1, 1, "mean", 0.05), (-0.5, 1, "mean", 0.0), (-0.5, 8, None, 0.05)])
    # Per seed: 3.50 - (5 + 3.00) / 2 = -0.50, 3.54 - 4.01 = -0.47, 3.40 - 3.95 = -0.55.
    mean, low, high = study_evals.t_interval([-0.50, -0.47, -0.55])
    assert (got.mean, got.low, got.high) == pytest.approx((mean, low, high))
    assert mean == pytest.approx(-0.50666667) and got.kind == st.SEEDS and got.n == 3
    assert analysis.comparison("c", got, -1)["verdict"] == st.REPRODUCED  # high = -0.4074 < 0


@pytest.mark.parametrize("verdicts,probs,combined,probability", [
    ([st.REPRODUCED, st.REPRODUCED], [0.9, 0.8], st.REPRODUCED, 0.72),  # both must hold again
    ([st.REPRODUCED, st.NOT_REPRODUCED], [0.9, 0.6], st.NOT_REPRODUCED, 0.6),
    ([st.NOT_REPRODUCED, st.NOT_REPRODUCED], [0.7, 0.95], st.NOT_REPRODUCED, 0.95),
    ([st.REPRODUCED, st.INCONCLUSIVE, st.INCONCLUSIVE], [0.9, 0.5, 0.4], st.INCONCLUSIVE, 0.2),
])
def test_a_claims_verdict_and_rerun_probability_combine_its_primary_comparisons(verdicts, probs, combined, probability):
    primary = [{"verdict": v, "same_verdict_probability": p} for v, p in zip(verdicts, probs)]
    c = analysis.claim("C9", "s", "p", primary, [])
    assert c["verdict"] == combined and c["same_verdict_probability"] == pytest.approx(probability)
    not_run = analysis.claim("C9", "s", "p", primary + [{"verdict": "not run", "same_verdict_probability": None}], [])
    assert not_run["verdict"] == "not run" and not_run["same_verdict_probability"] is None


@pytest.mark.parametrize("order,verdict", [((3.0, 2.0, 1.0), st.REPRODUCED), ((1.0, 2.0, 3.0), st.NOT_REPRODUCED),
                                           ((2.0, 2.0, 2.0), st.INCONCLUSIVE)])
def test_timing_claim_pairs_rounds_and_follows_the_times(order, verdict):
    mha, gqa, mqa = order
    # Round-to-round load moves every variant alike (+0, +0.4, -0.2): pairing cancels it.
    load = np.array([0.0, 0.4, -0.2, 0.1])
    wiggle = np.array([0.01, -0.01, 0.02, 0.0])
    times = {"MHA": list(mha + load), "GQA-2": list(gqa + load + wiggle), "MQA": list(mqa + load)}
    timing = {"batch": 4, "rounds": 4, "shapes": [{"input_length": 64, "output_length": 16, "time_per_sample": times}]}
    c4, table = analysis.timing_claim(timing, _SMALL)
    assert c4["verdict"] == verdict
    first = c4["primary"][0]["interval"]
    mean, low, high = study_evals.t_interval(np.array(times["MHA"]) - np.array(times["GQA-2"]))
    assert (first["mean"], first["low"], first["high"]) == pytest.approx((mean, low, high))
    assert first["kind"] == st.ROUNDS
    # The per-variant table: a t interval over the 4 rounds of each.
    row = table[0]["time_per_sample"]["MHA"]
    assert (row["mean"], row["low"], row["high"]) == pytest.approx(study_evals.t_interval(times["MHA"]))
    assert analysis.timing_claim(None, _SMALL)[0]["verdict"] == "not run"


def _two_shape_timing(order):
    faster = {"MHA": [3.0, 3.1, 3.2], "GQA-2": [2.0, 2.1, 2.2], "MQA": [1.0, 1.1, 1.2]}  # the paper's ordering
    slower = {"MHA": [1.0, 1.1, 1.2], "GQA-2": [2.0, 2.1, 2.2], "MQA": [3.0, 3.1, 3.2]}  # reversed
    shapes = {(512, 128): faster, (64, 16): slower}
    return {"batch": 4, "rounds": 3, "shapes": [
        {"input_length": i, "output_length": o, "time_per_sample": shapes[(i, o)]} for i, o in order]}


def test_c4_is_decided_on_the_longest_timed_shape_listed_last_and_the_others_support():
    c4, table = analysis.timing_claim(_two_shape_timing([(64, 16), (512, 128)]), _SMALL)
    assert c4["verdict"] == st.REPRODUCED
    assert all("in 512 / out 128" in c["comparison"] for c in c4["primary"])
    assert [c["verdict"] for c in c4["supporting"]] == [st.NOT_REPRODUCED, st.NOT_REPRODUCED]
    assert [r["input_length"] for r in table] == [64, 512]


def test_c4_is_decided_on_the_longest_timed_shape_in_whatever_order_the_shapes_were_timed():
    c4, _ = analysis.timing_claim(_two_shape_timing([(512, 128), (64, 16)]), _SMALL)
    assert all("in 512 / out 128" in c["comparison"] for c in c4["primary"])
    assert c4["verdict"] == st.REPRODUCED
