"""The quickstart (reduced setting) and its local corpus."""

from __future__ import annotations

import json

import pytest

from gqa_t5x import cli
from gqa_t5x.data import local_corpus

pytestmark = pytest.mark.study


@pytest.mark.slow
def test_local_corpus_is_real_prose_split_into_summary_and_body(tmp_path):
    paths = local_corpus.build_corpus(tmp_path, max_docs=200, vocab_size=400)
    train = [json.loads(l) for l in paths["summarize_train"].read_text().splitlines()]
    valid = [json.loads(l) for l in paths["summarize_validation"].read_text().splitlines()]
    assert len(train) + len(valid) == 200 and valid  # held-out split by name hash
    assert not {r["id"] for r in train} & {r["id"] for r in valid}
    for r in train[:20]:
        assert r["highlights"].endswith(".") and len(r["article"].split()) >= 12
        assert r["highlights"] not in r["article"]
    pretrain = [json.loads(l)["text"] for l in paths["pretrain_train"].read_text().splitlines()]
    assert len(pretrain) == len(train)

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(paths["vocab"]))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert sp.get_piece_size() == 400
    ids = sp.encode(train[0]["highlights"])
    assert sp.decode(ids) == train[0]["highlights"]


@pytest.mark.slow
def test_reduced_quickstart_converts_with_every_method_and_reports_intervals(tmp_path, monkeypatch):
    monkeypatch.delenv("GQA_T5X_SHARED", raising=False)  # needs no shared data
    assert cli.main(["quickstart", "--output", str(tmp_path / "qs"), "--reduced"]) == 0
    out = tmp_path / "qs"
    evals = {p.stem for p in (out / "evals").glob("*.npz")}
    assert {"mha_a0", "g1_mean_a0", "g1_first_a0", "g1_lsq_a0", "g2_mean_a0", "g1_random_a0_s0",
            "g1_random_a0_s2"} <= evals
    assert not (out / "uptrain").exists() and not (out / "finetune").exists()  # alpha = 0 only
    results = json.loads((out / "report" / "reproduction.json").read_text())
    claims = {c["id"]: c for c in results["claims"]}
    assert claims["C2"]["verdict"] == "not run"
    c1 = claims["C1"]
    assert c1["primary"]["interval"]["kind"] == "bootstrap over articles"  # first - mean: deterministic
    assert c1["supporting"][0]["interval"]["kind"] == "t over seeds + bootstrap over articles"  # random's seeds
    assert c1["verdict"] in ("reproduced", "not reproduced", "inconclusive")
    text = (out / "report" / "reproduction.md").read_text()
    assert "What it does not show" in text and "gqa-t5x quickstart --output" in text
    assert (out / "report" / "reproduction" / "methods.png").stat().st_size > 0


# -------------------------------- the quickstart's analysis on hand-made scores
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import study_evals  # noqa: E402  (tests/study_evals.py)
from gqa_t5x.experiments.study import analysis  # noqa: E402
from gqa_t5x.experiments.study import quickstart  # noqa: E402
from gqa_t5x.experiments.study import report as study_report  # noqa: E402

# Per seed of `random`: how much worse than `first` it is (8 seeds, the quickstart's default).
_RANDOM_GAPS = np.array([0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 0.9])
_SCENARIOS = {
    # (first - mean, sign of random - first, MQA - MHA, GQA - MHA, lsq - mean)
    "paper": (0.3, 1.0, 1.0, 0.2, -1.0),
    "tied": (0.0, 0.0, 0.0, 0.0, 0.0),
    "reversed": (-0.3, -1.0, 0.2, 1.0, 1.0),
}


def _quickstart_scores(out, scenario: str):
    """Writes every evaluation the quickstart's analysis reads; returns its settings and seeds."""
    settings = quickstart.reduced_settings()
    seeds = quickstart.DEFAULT_SEEDS
    first_gap, random_sign, mqa_gap, gqa_gap, lsq_gap = _SCENARIOS[scenario]
    (_, n), = settings.heldout_examples
    mha = 3.0 + 0.1 * np.sin(np.arange(n))  # examples differ; every model keeps their order
    ev = out / "evals"
    study_evals.write_config(ev, settings, 8, None, 0.0, seeds, mha)
    for kv, gap in ((1, mqa_gap), (2, gqa_gap)):
        mean, first = mha + gap, mha + gap + first_gap
        study_evals.write_config(ev, settings, kv, "mean", 0.0, seeds, mean)
        study_evals.write_config(ev, settings, kv, "first", 0.0, seeds, first)
        study_evals.write_config(ev, settings, kv, "lsq", 0.0, seeds, mean + lsq_gap)
        # Seed s of random: first + gap_s on every example (so first's loss per token + gap_s).
        study_evals.write_config(ev, settings, kv, "random", 0.0, seeds,
                                 [first + random_sign * g for g in _RANDOM_GAPS])
    return settings, seeds


@pytest.mark.parametrize("scenario,c1,c3,lsq", [
    ("paper", "reproduced", "reproduced", "better"),
    ("tied", "inconclusive", "inconclusive", "no difference resolved"),
    ("reversed", "not reproduced", "not reproduced", "worse"),
])
def test_quickstart_analysis_of_hand_made_scores_gives_the_known_verdicts(tmp_path, scenario, c1, c3, lsq):
    settings, seeds = _quickstart_scores(tmp_path, scenario)
    results = analysis.analyse(tmp_path, settings, seeds, command="gqa-t5x quickstart", sessions=[])
    claims = {c["id"]: c for c in results["claims"]}
    assert {k: c["verdict"] for k, c in claims.items()} == {
        "C1": c1, "C2": "not run", "C3a": c3, "C3b": "not run", "C4": "not run"}
    first_gap, random_sign, mqa_gap, gqa_gap, lsq_gap = _SCENARIOS[scenario]
    # C1 at alpha 0 for MQA: first - mean holds on every example, so the paired article bootstrap is a point ...
    first_minus_mean = claims["C1"]["primary"]["interval"]
    assert (first_minus_mean["mean"], first_minus_mean["low"], first_minus_mean["high"]) == pytest.approx(
        (first_gap,) * 3, abs=1e-9)
    # ... and random - first (supporting) is a t interval over the 8 seeds (the articles add nothing: the
    # difference is the same on every example): 0.9 +- 2.3646 x 0.1852 / sqrt(8).
    random_minus_first = claims["C1"]["supporting"][0]["interval"]
    mean, low, high = study_evals.t_interval(random_sign * _RANDOM_GAPS)
    assert (random_minus_first["mean"], random_minus_first["low"], random_minus_first["high"]) == pytest.approx(
        (mean, low, high), abs=1e-6)  # the tabulated quantile has 8 digits
    assert random_minus_first["kind"] == "t over seeds + bootstrap over articles" and random_minus_first["n"] == 8
    # C3a at alpha 0: 0.5 gap(MQA) - gap(GQA), exact on every example.
    assert claims["C3a"]["primary"]["interval"]["mean"] == pytest.approx(0.5 * mqa_gap - gqa_gap, abs=1e-9)
    lsq_row = next(b for b in results["beyond_paper"] if b["id"] == "B-lsq")
    assert lsq_row["verdict"] == lsq and {c["alpha"] for c in lsq_row["cells"]} == {0.0}
    # The reduced quickstart's settings: each console verdict says it is not meaningful.
    assert f"C1: {c1} (not meaningful: reduced run) - " in "\n".join(study_report.summary_lines(results))


def test_a_refused_quickstart_writes_nothing_into_a_foreign_or_other_settings_folder(tmp_path, capsys):
    from gqa_t5x import cli
    from gqa_t5x.experiments.study import reproduction
    from gqa_t5x.experiments.study.settings import StudySettings

    foreign = tmp_path / "other_run"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's run")
    assert cli.main(["quickstart", "--reduced", "--output", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "is not empty (notes.txt) and holds no study" in err, err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # No corpus/ was written.

    other = tmp_path / "other_settings"
    other.mkdir()
    (other / "study.json").write_text(json.dumps({"settings": {"steps": 1}, "pretrain_seed": 100, "sessions": []}))
    with pytest.raises(cli.UsageError, match="holds a study with other settings"):
        reproduction.check_output(other, StudySettings.quickstart(), 100, own=("corpus",))
    assert sorted(p.name for p in other.iterdir()) == ["study.json"]
    assert reproduction.check_output(tmp_path / "new", StudySettings.quickstart(), 100) is None
