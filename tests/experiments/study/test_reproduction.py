"""`gqa-t5x reproduce --reduced`: every stage runs, resumes, and the report is written.

The reduced settings check the machinery, not the findings (a 1+1-layer model
pre-trained for 40 steps says nothing about GQA)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gqa_t5x import cli
from gqa_t5x.errors import UsageError
from gqa_t5x.experiments.study import reproduction
from gqa_t5x.experiments.study import stages as study_stages
from gqa_t5x.experiments.study import data as reproduction_data
from gqa_t5x.experiments.study.settings import StudySettings, check_seeds, eval_key

pytestmark = pytest.mark.study


@pytest.fixture(scope="module")
def reduced_study(tmp_path_factory, shared_dir):
    out = tmp_path_factory.mktemp("study")
    code = cli.main(["reproduce", "--output", str(out / "run"), "--reduced", "--seeds", "0,1",
                     "--shared_dir", str(shared_dir)])
    assert code == 0
    return out / "run"


@pytest.mark.slow
def test_reduced_study_runs_every_stage_and_writes_the_report(reduced_study):
    out = reduced_study
    settings = StudySettings.reduced()
    markers = {p.name.removesuffix(".done.json") for p in (out / "markers").glob("*.done.json")}
    assert {"data", "pretrain", "calibrate", "timing", "convert_g1_lsq", "convert_g2_mean", "uptrain_mha_s1",
            "uptrain_g1_mean_s0", "uptrain_g1_lsq_s1", "uptrain_g2_mean_s1", "finetune_g1_mean_s0_a0.05"} <= markers
    # Mean is uptrained to the largest alpha with a checkpoint at every alpha on the way.
    p = settings.pretrain_steps
    assert sorted(x.name for x in (out / "uptrain" / "g1_mean_s0").glob("checkpoint_*")) == [
        f"checkpoint_{p + 2}", f"checkpoint_{p + 4}"]
    for key in ("mha_a0", "g1_lsq_a0", "g1_lsq_a0.05_s1", "g2_mean_a0.1_s1", "mha_a0.05_s0", "pretrain_40",
                "wmt_g1_mean_s0_a0.05"):
        assert (out / "evals" / f"{key}.npz").exists(), key
    results = json.loads((out / "report" / "reproduction.json").read_text())
    assert {c["id"] for c in results["claims"]} == {"C1", "C2", "C3", "C4"}
    assert {b["id"] for b in results["beyond_paper"]} == {"B-lsq"}
    verdicts = {c["id"]: c["verdict"] for c in results["claims"]}
    assert verdicts["C1"] == "not run"  # the reduced settings leave out `first`
    assert all(v in ("reproduced", "not reproduced", "inconclusive") for k, v in verdicts.items() if k != "C1")
    assert results["seeds"] == [0, 1] and [r["variant"] for r in results["downstream"]] == ["MQA"]
    assert len(results["downstream"][0]["bleu_per_seed"]) == 1  # the reduced setting fine-tunes one seed
    text = (out / "report" / "reproduction.md").read_text()
    assert "gqa-t5x reproduce --output" in text and "--reduced" in text
    for name in ("pretraining", "methods", "alpha", "timing", "bleu"):
        assert (out / "report" / "reproduction" / f"{name}.png").stat().st_size > 0


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


def test_heldout_scores_equal_huggingface_per_example(monkeypatch):
    """`score_params`' loss, correct and token counts against HuggingFace's T5,
    in batches of 2 rows so the last batch is padded."""
    hf_reference = pytest.importorskip("hf_reference")
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
    monkeypatch.setattr(evaluation, "_ROW_BATCH", 2)
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
import study_evals  # noqa: E402  (tests/study_evals.py)
from gqa_t5x.experiments.study import analysis  # noqa: E402

_SEEDS = (0, 1)
# Loss per token of each configuration of the reduced study (per seed where seeded):
# GQA-2 sits between MQA and MHA, uptraining closes most of MQA's gap, lsq beats mean by 1.
_PAPER = {
    (8, None, 0.0): 3.0, (2, "mean", 0.0): 3.4, (1, "mean", 0.0): 5.0,
    (8, None, 0.05): [3.00, 3.02], (2, "mean", 0.05): [3.05, 3.07], (1, "mean", 0.05): [3.50, 3.54],
    (8, None, 0.1): [2.95, 2.97], (2, "mean", 0.1): [3.00, 3.02], (1, "mean", 0.1): [3.20, 3.24],
    (1, "lsq", 0.0): 4.0, (1, "lsq", 0.05): [2.50, 2.54],
}
_PAPER_TIMES = {"MHA": [3.0, 3.2], "GQA-2": [2.0, 2.1], "MQA": [1.0, 1.05]}


def _reversed_scores() -> dict:
    """MQA and GQA-2 swapped, lsq worse than mean by 1."""
    out = dict(_PAPER)
    for alpha in (0.0, 0.05, 0.1):
        out[(1, "mean", alpha)], out[(2, "mean", alpha)] = _PAPER[(2, "mean", alpha)], _PAPER[(1, "mean", alpha)]
    out[(1, "lsq", 0.0)] = out[(1, "mean", 0.0)] + 1.0
    out[(1, "lsq", 0.05)] = [v + 1.0 for v in out[(1, "mean", 0.05)]]
    return out


def _tied_scores() -> dict:
    """Every model scores the same, at every alpha."""
    return {key: (3.0 if key[2] == 0 else [3.0, 3.0]) for key in _PAPER}


def _write_study(out, scores: dict, times: dict):
    settings = StudySettings.reduced()
    for (kv, method, alpha), values in scores.items():
        study_evals.write_config(out / "evals", settings, kv, method, alpha, _SEEDS, values)
    study_evals.write_timing(out, settings, times)
    return settings


def _interval(comparison: dict) -> tuple[float, float, float]:
    i = comparison["interval"]
    return i["mean"], i["low"], i["high"]


def test_reduced_study_analysis_of_paper_shaped_scores_reproduces_c2_c3_c4_with_hand_intervals(tmp_path):
    settings = _write_study(tmp_path, _PAPER, _PAPER_TIMES)
    results = analysis.analyse(tmp_path, settings, _SEEDS, command="x", sessions=[])
    claims = {c["id"]: c for c in results["claims"]}
    assert {k: c["verdict"] for k, c in claims.items()} == {
        "C1": "not run", "C2": "reproduced", "C3": "reproduced", "C4": "reproduced"}  # no `first` in reduced
    t1 = 12.7062047  # t_{0.975, 1}: two seeds
    c2 = claims["C2"]["primary"]
    # MQA - GQA per seed: 0.45, 0.47 -> 0.46 +- t1 x 0.0141421 / sqrt(2) = 0.46 +- 0.1270620.
    assert _interval(c2[0]) == pytest.approx((0.46, 0.46 - 0.1270620, 0.46 + 0.1270620), abs=1e-6)
    # GQA - (MQA + MHA) / 2 per seed: 3.05 - 3.25 = -0.20, 3.07 - 3.28 = -0.21 -> -0.205 +- 0.0635310.
    assert _interval(c2[1]) == pytest.approx((-0.205, -0.205 - 0.0635310, -0.205 + 0.0635310), abs=1e-6)
    assert c2[0]["interval"]["kind"] == "t over seeds" and c2[1]["expected"] == "< 0"
    c3 = claims["C3"]["primary"]
    # Alpha 0 (one run each, the same loss on every example): points 5.0 - 3.4 and 3.4 - (5.0 + 3.0) / 2.
    assert _interval(c3[0]) == pytest.approx((1.6, 1.6, 1.6), abs=1e-9)
    assert _interval(c3[1]) == pytest.approx((-0.6, -0.6, -0.6), abs=1e-9)
    assert c3[0]["interval"]["kind"] == "bootstrap over examples"
    # MQA(5%) - (MQA(0) + MHA(5%)) / 2: 3.50 - 4.00 = -0.50, 3.54 - 4.01 = -0.47 -> -0.485 +- 0.1905931.
    assert _interval(c3[2]) == pytest.approx((-0.485, -0.485 - 0.1905931, -0.485 + 0.1905931), abs=1e-6)
    # C4: t(MHA) - t(GQA) per round 1.0, 1.1 -> 1.05 +- 0.635310; t(GQA) - t(MQA): 1.0, 1.05 -> 1.025 +- 0.317655.
    c4 = claims["C4"]["primary"]
    assert _interval(c4[0]) == pytest.approx((1.05, 1.05 - 0.635310, 1.05 + 0.635310), abs=1e-6)
    assert _interval(c4[1]) == pytest.approx((1.025, 1.025 - 0.317655, 1.025 + 0.317655), abs=1e-6)
    assert c4[0]["interval"]["kind"] == "t over timing rounds"
    (lsq,) = results["beyond_paper"]
    assert lsq["verdict"] == "better at alpha 0; better at alpha 0.05"


def test_reduced_study_analysis_of_reversed_scores_is_not_reproduced(tmp_path):
    times = {"MHA": _PAPER_TIMES["MQA"], "GQA-2": _PAPER_TIMES["GQA-2"], "MQA": _PAPER_TIMES["MHA"]}
    settings = _write_study(tmp_path, _reversed_scores(), times)
    results = analysis.analyse(tmp_path, settings, _SEEDS, command="x", sessions=[])
    claims = {c["id"]: c for c in results["claims"]}
    assert {k: c["verdict"] for k, c in claims.items()} == {
        "C1": "not run", "C2": "not reproduced", "C3": "not reproduced", "C4": "not reproduced"}
    # The mirror image of the paper-shaped MQA - GQA: -0.46 +- 0.1270620.
    assert _interval(claims["C2"]["primary"][0]) == pytest.approx((-0.46, -0.5870620, -0.3329380), abs=1e-6)
    assert _interval(claims["C3"]["primary"][0]) == pytest.approx((-1.6, -1.6, -1.6), abs=1e-9)
    assert results["beyond_paper"][0]["verdict"] == "worse at alpha 0; worse at alpha 0.05"


def test_reduced_study_analysis_of_identical_scores_is_inconclusive(tmp_path):
    settings = _write_study(tmp_path, _tied_scores(), {n: [2.0, 2.1] for n in ("MHA", "GQA-2", "MQA")})
    results = analysis.analyse(tmp_path, settings, _SEEDS, command="x", sessions=[])
    claims = {c["id"]: c for c in results["claims"]}
    assert {k: c["verdict"] for k, c in claims.items()} == {
        "C1": "not run", "C2": "inconclusive", "C3": "inconclusive", "C4": "inconclusive"}
    for c in claims["C2"]["primary"] + claims["C3"]["primary"] + claims["C4"]["primary"]:
        assert _interval(c) == pytest.approx((0.0, 0.0, 0.0), abs=1e-12), c["comparison"]
    assert results["beyond_paper"][0]["verdict"] == (
        "no difference resolved at alpha 0; no difference resolved at alpha 0.05")
