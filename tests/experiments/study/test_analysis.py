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
    (dict(gqa_kv_heads=3), "must divide num_heads"),
    (dict(methods=("first", "random")), "must include 'mean'"),
    (dict(ablation_alpha=0.2), "must be one of alphas"),
    (dict(pretrain_steps=410), "whole number of steps"),
])
def test_invalid_study_settings_are_rejected_naming_the_field(changes, message):
    import dataclasses

    with pytest.raises(ValueError, match=message):
        dataclasses.replace(StudySettings(), **changes).validate()
