"""The quickstart (reduced setting) and its local corpus."""

from __future__ import annotations

import json

from gqa_t5x import cli
from gqa_t5x.data import local_corpus


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
    assert [c["interval"]["kind"] for c in c1["primary"]] == ["bootstrap over examples", "t over seeds"]
    assert c1["verdict"] in ("reproduced", "not reproduced", "inconclusive")
    text = (out / "report" / "reproduction.md").read_text()
    assert "What it does not show" in text and "gqa-t5x quickstart --output" in text
    assert (out / "report" / "reproduction" / "methods.png").stat().st_size > 0
