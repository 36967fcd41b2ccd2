"""`gqa-t5x reproduce --reduced`: every stage runs, resumes, and the report is written.

The reduced settings check the machinery, not the findings (a 1+1-layer model
pre-trained for 40 steps says nothing about GQA)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gqa_t5x import checkpoints
from gqa_t5x import cli
from gqa_t5x.experiments.stages import latest_checkpoint
from gqa_t5x.errors import UsageError
from gqa_t5x.experiments.study import reproduction
from gqa_t5x.experiments.study import stages as study_stages
from gqa_t5x.experiments.study import data as reproduction_data
from gqa_t5x.experiments.study.settings import StudySettings, check_seeds, eval_key

# One worker builds the session's reduced study (about 2 minutes) for this module and test_planned.py.
pytestmark = [pytest.mark.study, pytest.mark.xdist_group("reduced_study")]


@pytest.mark.slow
def test_reduced_study_runs_every_stage_and_writes_the_report(reduced_study):
    out = reduced_study
    settings = StudySettings.reduced()
    markers = {p.name.removesuffix(".done.json") for p in (out / "markers").glob("*.done.json")}
    assert {"data", "cache", "pretrain", "calibrate", "timing", "convert_g1_lsq", "convert_g2_mean", "convert_g4_mean",
            "uptrain_mha_s1", "uptrain_mha-fresh_s1", "uptrain_mha-replay_s0", "uptrain_mha-replay-fresh_s0",
            "uptrain_g1_mean_s0", "uptrain_g1_lsq_s1", "uptrain_g1_lsq-keep_s0", "uptrain_g2_mean_s1",
            "uptrain_g4_mean_s0"} <= markers
    assert {"finetune_ft_mha_a0_s0", "finetune_ft_g1_mean_a0_s1"} <= markers  # the C4 fine-tunes
    assert not any(m.startswith("finetune_") and m.endswith("_a0.05") for m in markers)  # WMT is not run
    # Mean is uptrained to the largest alpha with a checkpoint at every alpha on the way.
    p = settings.pretrain_steps
    assert sorted(x.name for x in (out / "uptrain" / "g1_mean_s0").glob("checkpoint_*")) == [
        f"checkpoint_{p + 2}", f"checkpoint_{p + 4}"]
    for key in ("mha_a0", "g1_lsq_a0", "g1_lsq_a0.05_s1", "g1_lsq-keep_a0.025_s1", "g2_mean_a0.1_s1",
                "mha_a0.05_s0", "mha-replay_a0.05_s0", "pretrain_40", "ft_mha_a0_s0", "ft_g1_mean_a0_s1"):
        assert (out / "evals" / f"{key}.npz").exists(), key
    results = json.loads((out / "report" / "reproduction.json").read_text())
    assert [c["id"] for c in results["claims"]] == ["C1", "C2", "C3a", "C3b", "C4"]
    assert {b["id"] for b in results["beyond_paper"]} == {"B-lsq", "B-lsq-keep"}
    verdicts = {c["id"]: c["verdict"] for c in results["claims"]}
    assert verdicts["C1"] == "not run"  # the reduced settings leave out `first`
    assert all(v in ("reproduced", "not reproduced", "inconclusive") for k, v in verdicts.items() if k != "C1")
    assert results["seeds"] == [0, 1] and results["downstream"] == []
    assert [row["optimizer_state"] + "/" + row["data"] for row in results["recipe_2x2"]["cells"]] == [
        "restored/continued", "fresh/continued", "restored/replayed", "fresh/replayed"]
    text = (out / "report" / "reproduction.md").read_text()
    assert "gqa-t5x reproduce --output" in text and "--reduced" in text
    for name in ("pretraining", "methods", "alpha", "groups", "timing"):
        assert (out / "report" / "reproduction" / f"{name}.png").stat().st_size > 0


@pytest.mark.slow
def test_uptraining_continues_the_data_after_pretraining_with_its_own_rows_per_seed(reduced_study):
    out, s = reduced_study, StudySettings.reduced()
    rows = {}
    for name in ("mha_s0", "mha_s1", "g1_mean_s0", "g1_mean_s1", "mha-replay_s0"):
        marker = json.loads((out / "markers" / f"uptrain_{name}.done.json").read_text())
        rows[name] = marker["data_row"]
        # The trainer recorded the same row as where its data started (what a resume continues from).
        with checkpoints.open_checkpoint(latest_checkpoint(out / "uptrain" / name)) as reader:
            metadata = reader.metadata
        assert (metadata["data_start_step"], metadata["data_start_row"]) == (s.pretrain_steps, marker["data_row"])
    assert rows["mha_s0"] == rows["g1_mean_s0"] == s.pretrain_steps * s.batch_size  # right after pre-training's
    assert rows["mha_s1"] == rows["g1_mean_s1"] == rows["mha_s0"] + s.uptrain_rows  # seed 1: the next stretch
    assert rows["mha-replay_s0"] == 0


@pytest.mark.slow
def test_the_multi_head_continuation_keeps_improving_on_the_loss_at_p(reduced_study):
    from gqa_t5x.experiments.study import analysis

    evals = analysis.Evals(reduced_study / "evals")
    at_p = evals.value("mha_a0", "wikipedia", "loss")
    for seed in (0, 1):
        curve = [evals.value(f"mha_a{alpha:g}_s{seed}", "wikipedia", "loss") for alpha in (0.05, 0.1)]
        assert curve[0] <= at_p and curve[1] <= curve[0], (seed, at_p, curve)


@pytest.mark.slow
def test_heldout_examples_are_fixed_and_scores_pair_example_by_example(reduced_study):
    out = reduced_study
    data = reproduction_data.StudyData(out / "data")
    heldout = reproduction_data.load_arrays(data.heldout("wikipedia"))
    assert heldout["encoder_input_tokens"].shape == (32, 32)
    a = reproduction_data.load_arrays(out / "evals" / f"{eval_key(1, 8, 'mean', 0.0, None)}.npz")
    b = reproduction_data.load_arrays(out / "evals" / "mha_a0.npz")
    np.testing.assert_array_equal(a["wikipedia/tokens"], b["wikipedia/tokens"])  # the same examples
    assert a["wikipedia/tokens"].sum() == (heldout["decoder_target_tokens"] > 0).sum()


@pytest.mark.slow  # compile-heavy: full suite only (fast tier under 5 minutes)
def test_heldout_scores_equal_huggingface_per_example(monkeypatch):
    """`score_params`' loss, correct and token counts against HuggingFace's T5,
    in batches of 2 rows so the last batch is padded."""
    hf_reference = pytest.importorskip("hf_reference")
    from gqa_t5x.experiments import scoring
    from gqa_t5x.experiments.study import evaluation

    hf_model = hf_reference.make_hf_t5(vocab_size=40, d_model=16, num_heads=4, d_kv=4, d_ff=24,
                                       num_layers=1, num_decoder_layers=1, seed=5)
    config = hf_reference.our_config_for(hf_model)
    params = hf_reference.our_params_for(hf_model, config)
    rng = np.random.default_rng(6)
    enc = rng.integers(2, 40, size=(3, 7)).astype(np.int32)
    enc[0, 5:] = 0
    tgt = rng.integers(2, 40, size=(3, 5)).astype(np.int32)
    tgt[1, 2:] = 0
    decoder_inputs = np.concatenate([np.zeros((3, 1), np.int32), tgt[:, :-1]], axis=1)
    logits = hf_reference.hf_logits(hf_model, enc, decoder_inputs, tgt).astype(np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    real = tgt > 0
    monkeypatch.setattr(scoring, "_ROW_BATCH", 2)
    got = evaluation.score_params(config, params, {"encoder_input_tokens": enc, "decoder_target_tokens": tgt})
    assert all(v.dtype == np.float64 and v.shape == (3,) for v in got.values())
    np.testing.assert_allclose(got["loss"], -(np.take_along_axis(log_probs, tgt[..., None], -1)[..., 0] * real).sum(-1),
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(got["correct"], ((logits.argmax(-1) == tgt) & real).sum(-1))
    np.testing.assert_array_equal(got["tokens"], real.sum(-1))


@pytest.mark.slow
def test_rerun_resumes_without_training_and_other_settings_are_refused(reduced_study, shared_dir):
    out = reduced_study
    before = {p: p.stat().st_mtime for p in (out / "markers").glob("*.json")}
    logs: list[str] = []
    reproduction.run_study(out, settings=StudySettings.reduced(), seeds=(0, 1), shared_dir=shared_dir,
                           log=logs.append)
    assert not any(line.startswith("[uptrain]") or line.startswith("[finetune]") for line in logs)
    assert {p: p.stat().st_mtime for p in before} == before
    assert len(json.loads((out / "study.json").read_text())["sessions"]) == 2
    import dataclasses

    with pytest.raises(UsageError, match="other settings"):
        reproduction.run_study(out, settings=dataclasses.replace(StudySettings.reduced(), pretrain_steps=80),
                               seeds=(0, 1), shared_dir=shared_dir)


def test_seeds_must_be_distinct_and_exclude_the_pretraining_seed():
    assert check_seeds([3, 4, 5], 100) == (3, 4, 5)
    with pytest.raises(ValueError, match="at least 2 distinct"):
        check_seeds([1, 1], 100)
    with pytest.raises(ValueError, match="pre-training seed"):
        check_seeds([0, 100], 100)


def test_a_killed_session_has_recorded_its_wall_time_up_to_its_last_finished_stage(tmp_path, monkeypatch):
    import time

    seen = {}

    def stages_killed_after_one(out, settings, seeds, pretrain_seed, shared, corpus, log, on_mark):
        time.sleep(0.05)
        on_mark()  # a stage finished
        # What a SIGKILL here would leave (no `finally` runs then):
        seen.update(json.loads((out / "study.json").read_text())["sessions"][-1])
        raise RuntimeError("killed")

    monkeypatch.setattr(study_stages, "run_stages", stages_killed_after_one)
    for folder in ("data/c4", "data/wmt_ende", "data/wikipedia_en"):  # what the study checks before writing
        (tmp_path / folder).mkdir(parents=True)
    with pytest.raises(RuntimeError, match="killed"):
        reproduction.run_study(tmp_path / "study", settings=StudySettings.reduced(), seeds=(0, 1),
                               shared_dir=tmp_path, log=lambda line: None)
    assert seen["wall_s"] >= 0.05 and seen["seeds"] == [0, 1]
    assert len(json.loads((tmp_path / "study" / "study.json").read_text())["sessions"]) == 1


# ------------------------------- the study's analysis on hand-made scores (no training)
import math  # noqa: E402

from scipy import stats  # noqa: E402,F401  (imported here, so that no test pays for its first import)

import study_evals  # noqa: E402  (tests/study_evals.py)
from gqa_t5x.experiments.study import analysis  # noqa: E402

_SEEDS = (0, 1)
_H = StudySettings.reduced().num_heads  # 16 query heads; GQA-2
# Loss per token of each configuration of the reduced study (per seed where seeded):
# GQA-2 sits between MQA and MHA, uptraining closes most of MQA's gap, lsq beats mean by 1.
_PAPER = {
    (_H, None, 0.0): 3.0, (2, "mean", 0.0): 3.4, (1, "mean", 0.0): 5.0,
    (_H, None, 0.05): [3.00, 3.02], (2, "mean", 0.05): [3.05, 3.078], (1, "mean", 0.05): [3.50, 3.54],
    (_H, None, 0.1): [2.95, 2.97], (2, "mean", 0.1): [3.00, 3.02], (1, "mean", 0.1): [3.20, 3.24],
    (1, "lsq", 0.0): 4.0, (1, "lsq", 0.05): [2.50, 2.54],
}
# The alpha-0 models fine-tuned on C4 (claim C3b), per seed.
_PAPER_FT = {_H: [3.50, 3.52], 2: [3.60, 3.62], 1: [4.00, 4.03]}
_PAPER_TIMES = {"MHA": [3.0, 3.2], "GQA-2": [1.2, 1.3], "MQA": [1.0, 1.05]}
_T1 = study_evals.T975[1]  # t_{0.975, 1} = 12.7062047: two seeds (or timing rounds)


def _p_t1(t: float) -> float:
    """Two-sided p of a t statistic with 1 degree of freedom (Cauchy): (2 / pi) atan(1 / |t|)."""
    return 2 / math.pi * math.atan(1 / abs(t))


def _reversed_scores() -> tuple[dict, dict]:
    """MQA and GQA-2 swapped (uptrained, zero-shot and fine-tuned), lsq worse than mean by 1."""
    out = dict(_PAPER)
    for alpha in (0.0, 0.05, 0.1):
        out[(1, "mean", alpha)], out[(2, "mean", alpha)] = _PAPER[(2, "mean", alpha)], _PAPER[(1, "mean", alpha)]
    out[(1, "lsq", 0.0)] = out[(1, "mean", 0.0)] + 1.0
    out[(1, "lsq", 0.05)] = [v + 1.0 for v in out[(1, "mean", 0.05)]]
    return out, {_H: _PAPER_FT[_H], 2: _PAPER_FT[1], 1: _PAPER_FT[2]}


def _tied_scores() -> tuple[dict, dict]:
    """Every model scores the same, at every alpha, fine-tuned or not."""
    return {key: (3.0 if key[2] == 0 else [3.0, 3.0]) for key in _PAPER}, {kv: [3.0, 3.0] for kv in _PAPER_FT}


def _write_study(out, scores: dict, finetuned: dict, times: dict):
    settings = StudySettings.reduced()
    study_evals.write_study(out, settings, _SEEDS, scores, finetuned=finetuned, times=times)
    return settings


def _interval(row: dict) -> tuple[float, float, float]:
    i = row["interval"]
    return i["mean"], i["low"], i["high"]


def _claims(results: dict) -> dict[str, dict]:
    return {c["id"]: c for c in results["claims"]}


@pytest.fixture
def _no_jax(monkeypatch):
    """`machine.describe` imports JAX (seconds, the first time): not what these tests are about."""
    monkeypatch.setattr(analysis.machine_info, "describe", lambda: {"platform": "test"})


def test_reduced_study_analysis_of_paper_shaped_scores_reproduces_c2_c3a_c3b_c4_with_hand_intervals(tmp_path, _no_jax):
    settings = _write_study(tmp_path, _PAPER, _PAPER_FT, _PAPER_TIMES)
    results = analysis.analyse(tmp_path, settings, _SEEDS, command="x", sessions=[])
    claims = _claims(results)
    assert {k: c["verdict"] for k, c in claims.items()} == {
        "C1": "not run", "C2": "reproduced", "C3a": "reproduced", "C3b": "reproduced", "C4": "reproduced"}
    assert "first/random not in this study" in claims["C1"]["primary"]["name"]  # no `first` in reduced
    c2 = claims["C2"]["primary"]
    # D = 0.5 gap(MQA) - gap(GQA-2) at alpha 0.05 per seed: 0.5 (3.50 - 3.00) - (3.05 - 3.00) = 0.20,
    # 0.5 (3.54 - 3.02) - (3.078 - 3.02) = 0.202 -> 0.201 +- t1 x 0.0014142 / sqrt(2) = 0.201 +- 0.0127062;
    # t = 0.201 / 0.001 = 201, p = (2 / pi) atan(1 / 201) = 0.0031672.
    assert _interval(c2) == pytest.approx((0.201, 0.201 - 0.0127062, 0.201 + 0.0127062), abs=1e-6)
    assert c2["interval"]["kind"] == "t over seeds + bootstrap over articles" and c2["expected"] == "> 0"
    assert c2["p_value"] == pytest.approx(_p_t1(201), rel=1e-5)
    # C3a, alpha 0 (one run each, the same loss on every example): the point 0.5 (5.0 - 3.0) - (3.4 - 3.0) = 0.6,
    # every one of 200 resamples above 0: p = 2 / 201.
    c3a = claims["C3a"]["primary"]
    assert _interval(c3a) == pytest.approx((0.6, 0.6, 0.6), abs=1e-9)
    assert c3a["interval"]["kind"] == "bootstrap over articles" and c3a["p_value"] == pytest.approx(2 / 201)
    # C3b, fine-tuned on C4: 0.5 (4.00 - 3.50) - (3.60 - 3.50) = 0.15, 0.5 (4.03 - 3.52) - (3.62 - 3.52) = 0.155
    # -> 0.1525 +- t1 x 0.0035355 / sqrt(2) = 0.1525 +- 0.0317655; t = 61, p = 0.0104355.
    c3b = claims["C3b"]["primary"]
    assert _interval(c3b) == pytest.approx((0.1525, 0.1525 - 0.0317655, 0.1525 + 0.0317655), abs=1e-6)
    assert c3b["p_value"] == pytest.approx(_p_t1(61), rel=1e-5)
    # Supporting: uptraining closes most of MQA's gap: 0.5 (5.0 - 3.0) - (3.50 - 3.00, 3.54 - 3.02) = 0.50, 0.48
    # -> 0.49 +- t1 x 0.0141421 / sqrt(2) = 0.49 +- 0.1270620.
    closing = claims["C3b"]["supporting"][0]
    assert _interval(closing) == pytest.approx((0.49, 0.49 - 0.1270620, 0.49 + 0.1270620), abs=1e-6)
    # C4: (t_MHA - t_GQA) - 0.5 (t_MHA - t_MQA) per round: 1.8 - 1.0 = 0.8, 1.9 - 1.075 = 0.825
    # -> 0.8125 +- t1 x 0.0176777 / sqrt(2) = 0.8125 +- 0.1588276; t = 65, p = 0.0097934.
    c4 = claims["C4"]["primary"]
    assert _interval(c4) == pytest.approx((0.8125, 0.8125 - 0.1588276, 0.8125 + 0.1588276), abs=1e-6)
    assert c4["interval"]["kind"] == "t over timing rounds" and c4["p_value"] == pytest.approx(_p_t1(65), rel=1e-5)
    # Holm over the four run: C2 x 4 = 0.0126689, C4 x 3 = 0.0293801, C3a x 2 = 0.0199005 and C3b x 1 raised
    # to the running max 0.0293801: all below 0.05.
    assert [claims[k]["primary"]["p_holm"] for k in ("C2", "C4", "C3a", "C3b")] == pytest.approx(
        [4 * _p_t1(201)] + [3 * _p_t1(65)] * 3, rel=1e-5)
    lsq, keep = results["beyond_paper"]
    # lsq - mean: 4.0 - 5.0 = -1.0 at alpha 0 (a point), -1.0 on both seeds at 0.05; lsq's kept-state run is absent.
    assert (lsq["id"], lsq["verdict"]) == ("B-lsq", "better")
    assert lsq["summary"] == "better for MQA at alpha 0; better for MQA at alpha 0.05"
    assert [c["estimate"] for c in lsq["cells"]] == pytest.approx([-1.0, -1.0])
    assert (keep["id"], keep["verdict"]) == ("B-lsq-keep", "not run")


def test_reduced_study_analysis_of_reversed_scores_is_not_reproduced(tmp_path, _no_jax):
    scores, finetuned = _reversed_scores()
    times = {"MHA": [3.0, 3.2], "GQA-2": [3.2, 3.4], "MQA": [1.0, 1.1]}  # GQA-2 slower than MHA
    settings = _write_study(tmp_path, scores, finetuned, times)
    results = analysis.analyse(tmp_path, settings, _SEEDS, command="x", sessions=[])
    claims = _claims(results)
    assert {k: c["verdict"] for k, c in claims.items()} == {
        "C1": "not run", "C2": "not reproduced", "C3a": "not reproduced", "C3b": "not reproduced",
        "C4": "not reproduced"}
    # C2: 0.5 (3.05 - 3.00) - (3.50 - 3.00) = -0.475, 0.5 (3.078 - 3.02) - (3.54 - 3.02) = -0.491
    # -> -0.483 +- t1 x 0.0113137 / sqrt(2) = -0.483 +- 0.1016496.
    assert _interval(claims["C2"]["primary"]) == pytest.approx((-0.483, -0.5846496, -0.3813504), abs=1e-6)
    # C3a: 0.5 (3.4 - 3.0) - (5.0 - 3.0) = -1.8; C3b: 0.5 (3.60 - 3.50) - (4.00 - 3.50) = -0.45, 0.05 - 0.51 = -0.46
    # -> -0.455 +- t1 x 0.0070711 / sqrt(2) = -0.455 +- 0.0635310.
    assert _interval(claims["C3a"]["primary"]) == pytest.approx((-1.8, -1.8, -1.8), abs=1e-9)
    assert _interval(claims["C3b"]["primary"]) == pytest.approx((-0.455, -0.5185310, -0.3914690), abs=1e-6)
    # C4: (3.0 - 3.2) - 0.5 (3.0 - 1.0) = -1.2, (3.2 - 3.4) - 0.5 (3.2 - 1.1) = -1.25
    # -> -1.225 +- t1 x 0.0353553 / sqrt(2) = -1.225 +- 0.3176551.
    assert _interval(claims["C4"]["primary"]) == pytest.approx((-1.225, -1.5426551, -0.9073449), abs=1e-6)
    # Holm over the four: C3b (t = 91, p 0.0069955) x 4 = 0.0279822, C3a (2 / 201) x 3 = 0.0298507,
    # C2 (t = 60.375) x 2 = 0.0210869 and C4 (t = 49) x 1, both raised to 0.0298507.
    assert [claims[k]["primary"]["p_holm"] for k in ("C3b", "C3a", "C2", "C4")] == pytest.approx(
        [4 * _p_t1(91)] + [3 * 2 / 201] * 3, rel=1e-5)
    assert results["beyond_paper"][0]["verdict"] == "worse"
    assert results["beyond_paper"][0]["summary"] == "worse for MQA at alpha 0; worse for MQA at alpha 0.05"


def test_reduced_study_analysis_of_identical_scores_is_inconclusive(tmp_path, _no_jax):
    scores, finetuned = _tied_scores()
    # GQA-2 exactly halfway between MHA and MQA in each round (binary fractions: no rounding), so that
    # t_MHA - t_GQA = 0.5 (t_MHA - t_MQA).
    times = {"MHA": [3.0, 3.25], "GQA-2": [2.0, 2.125], "MQA": [1.0, 1.0]}
    settings = _write_study(tmp_path, scores, finetuned, times)
    results = analysis.analyse(tmp_path, settings, _SEEDS, command="x", sessions=[])
    claims = _claims(results)
    assert {k: c["verdict"] for k, c in claims.items()} == {
        "C1": "not run", "C2": "inconclusive", "C3a": "inconclusive", "C3b": "inconclusive", "C4": "inconclusive"}
    for claim_id in ("C2", "C3a", "C3b", "C4"):
        primary = claims[claim_id]["primary"]
        assert _interval(primary) == pytest.approx((0.0, 0.0, 0.0), abs=1e-12), claim_id
        assert primary["p_value"] == 1.0, claim_id
    assert results["beyond_paper"][0]["verdict"] == "no difference resolved"
    assert results["beyond_paper"][0]["summary"] == (
        "no difference resolved for MQA at alpha 0; no difference resolved for MQA at alpha 0.05")


def test_a_rerun_may_only_grow_the_additive_settings_and_records_the_extension(tmp_path):
    import dataclasses

    out = tmp_path / "run"
    out.mkdir()
    base = StudySettings.reduced()
    (out / "study.json").write_text(json.dumps({"settings": base.to_json(), "pretrain_seed": 100, "sessions": []}))
    grown = dataclasses.replace(base, keep_state_methods=("mean", "lsq"), saving_alphas=(0.025, 0.05))
    record = reproduction.check_output(out, grown, 100)
    assert record["settings"] == grown.to_json()
    assert record["extended"] == [{"keep_state_methods": {"from": ["lsq"], "to": ["mean", "lsq"]}}]
    for changes in ({"keep_state_methods": ()}, {"saving_alphas": (0.05,)}, {"alphas": (0.05, 0.1, 0.2)}):
        with pytest.raises(UsageError, match=rf"other settings \(\['{next(iter(changes))}'\]\).*only "
                                             r"saving_alphas, keep_state_methods may grow"):
            reproduction.check_output(out, dataclasses.replace(base, **changes), 100)
    with pytest.raises(UsageError, match=r"other settings \(\['pretrain_seed'\]\)"):
        reproduction.check_output(out, base, 7)


@pytest.mark.slow
def test_an_extended_rerun_adds_the_new_runs_and_retrains_a_run_missing_an_alpha(reduced_study, shared_dir, tmp_path):
    import dataclasses
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reduced_study, out)
    # A finished run that lacks one of its alphas (as after saving_alphas grew).
    marker = out / "markers" / "uptrain_g1_lsq_s0.done.json"
    info = json.loads(marker.read_text())
    del info["checkpoints"]["0.025"]
    marker.write_text(json.dumps(info))
    logs: list[str] = []
    grown = dataclasses.replace(StudySettings.reduced(), keep_state_methods=("mean", "lsq"))
    reproduction.run_study(out, settings=grown, seeds=(0, 1), shared_dir=shared_dir, log=logs.append)
    trained = sorted(line.split(":")[0] for line in logs if line.startswith("[uptrain]") and ": alpha up to" in line)
    assert trained == ["[uptrain] g1_lsq_s0", "[uptrain] g1_mean-keep_s0",
                       "[uptrain] g1_mean-keep_s1", "[uptrain] g2_mean-keep_s0", "[uptrain] g2_mean-keep_s1"]
    assert any("g1_lsq_s0 has no checkpoint at alpha 0.025: training it again" in line for line in logs)
    assert (out / "uptrain" / "g1_lsq_s0.superseded").is_dir()
    assert (out / "uptrain" / "g1_lsq_s0" / "checkpoint_41").is_dir()
    record = json.loads((out / "study.json").read_text())
    assert record["extended"] == [{"keep_state_methods": {"from": ["lsq"], "to": ["mean", "lsq"]}}]
