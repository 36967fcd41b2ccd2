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


@pytest.fixture(scope="module")
def reduced_study(tmp_path_factory, shared_dir):
    out = tmp_path_factory.mktemp("study")
    code = cli.main(["reproduce", "--output", str(out / "run"), "--reduced", "--seeds", "0,1",
                     "--shared_dir", str(shared_dir)])
    assert code == 0
    return out / "run"


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


def test_heldout_examples_are_fixed_and_scores_pair_example_by_example(reduced_study):
    out = reduced_study
    data = reproduction_data.StudyData(out / "data")
    heldout = reproduction_data.load_arrays(data.heldout("wikipedia"))
    assert heldout["encoder_input_tokens"].shape == (32, 32)
    a = reproduction_data.load_arrays(out / "evals" / f"{eval_key(1, 8, 'mean', 0.0, None)}.npz")
    b = reproduction_data.load_arrays(out / "evals" / "mha_a0.npz")
    np.testing.assert_array_equal(a["wikipedia/tokens"], b["wikipedia/tokens"])  # the same examples
    assert a["wikipedia/tokens"].sum() == (heldout["decoder_target_tokens"] > 0).sum()


def test_heldout_loss_equals_the_eval_run_modes_cross_entropy(reduced_study):
    """Our per-example scorer and `--run_mode=eval`'s `token_loss` agree on the same examples."""
    from gqa_t5x import checkpoints
    from gqa_t5x.data import metrics
    from gqa_t5x.experiments.study import evaluation as reproduction_eval
    from gqa_t5x.model import models

    out = reduced_study
    heldout = reproduction_data.load_arrays(reproduction_data.StudyData(out / "data").heldout("c4"))
    config, params = checkpoints.load(out / "pretrain" / "checkpoint_40")
    mine = reproduction_eval.score_params(config, params, heldout)
    scores = models.score_batch(config.replace(dtype="float32"), params, heldout)
    tokens = (heldout["decoder_target_tokens"] > 0).sum(axis=1)
    reference = metrics.token_loss(tokens, scores)["cross_ent_loss"]
    assert mine["loss"].sum() / mine["tokens"].sum() == pytest.approx(reference, rel=1e-5)


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
    with pytest.raises(RuntimeError, match="killed"):
        reproduction.run_study(tmp_path / "study", settings=StudySettings.reduced(), seeds=(0, 1),
                               shared_dir=tmp_path, log=lambda line: None)
    assert seen["wall_s"] >= 0.05 and seen["seeds"] == [0, 1]
    assert len(json.loads((tmp_path / "study" / "study.json").read_text())["sessions"]) == 1
