"""The quickstart pipeline (reduced setting) and its local corpus."""

from __future__ import annotations

import json

from gqa_t5x.data import local_corpus
from gqa_t5x.experiments import quickstart


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


def test_reduced_quickstart_runs_the_whole_pipeline_and_reports(tmp_path):
    files = quickstart.run_quickstart(tmp_path / "qs", quickstart.QuickstartSettings.reduced(), log=lambda s: None)
    runs = sorted((tmp_path / "qs" / "runs").glob("*/results.json"))
    assert [p.parent.name for p in runs] == ["g1_mean_a0.1", "mha_a0"]
    for path in runs:
        r = json.loads(path.read_text())
        assert "docstring_summary" in r["scores"] and r["time_per_sample"] > 0
    mqa = json.loads(runs[0].read_text())
    assert mqa["num_kv_heads"] == 1 and mqa["method"] == "mean" and mqa["alpha"] == 0.1
    # Pre-training ran 20 steps; uptraining alpha * 20 = 2 more.
    assert (tmp_path / "qs" / "pretrain_mha" / "checkpoint_20").is_dir()
    assert (tmp_path / "qs" / "runs" / "g1_mean_a0.1" / "uptrain" / "checkpoint_22").is_dir()
    table = files["table_md"].read_text()
    assert "| MQA mean a=0.1 |" in table and "docstring_summary" in table.splitlines()[0]
    assert len(files["time_vs_groups"].read_bytes()) > 0
