"""The predictions-to-JSONL inference run (`run_inference`, `infer`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gqa_t5x.model import decoding
from gqa_t5x.model import initialization
from gqa_t5x.model.config import T5Config
from gqa_t5x.training import inference


def _config() -> T5Config:
    return T5Config(
        vocab_size=40, dtype="float32", emb_dim=16, num_heads=4, head_dim=4, mlp_dim=24,
        num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0, num_kv_heads=2,
    )


class _CharVocabulary:
    """A tiny seqio-like vocabulary: a..z -> 3..28, EOS 1, PAD 0."""

    eos_id = 1

    def encode(self, text: str) -> list[int]:
        return [ord(c) - ord("a") + 3 for c in text if "a" <= c <= "z"]

    def decode(self, ids) -> str:
        return "".join(chr(i - 3 + ord("a")) if 3 <= i < 29 else "?" for i in ids)


def test_run_inference_writes_one_prediction_per_jsonl_record_next_to_the_input(tmp_path):
    config = _config()
    params = initialization.init_params(config, seed=4)
    vocab = _CharVocabulary()
    records = [{"inputs": "hello", "id": 0}, {"inputs": "abc", "id": 1}, {"inputs": "a" * 20, "id": 2},
               {"inputs": "zz", "id": 3}, {"inputs": "grouped", "id": 4}]
    path = tmp_path / "inputs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = inference.run_inference(config, params, path, vocab, input_length=6, max_decode_length=5, batch_size=2)
    assert out == tmp_path / "inputs-predictions.jsonl"
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [0, 1, 2, 3, 4]
    assert [line["inputs"] for line in lines] == [r["inputs"] for r in records]
    # The same predictions as decoding the tokenized batch directly (EOS appended, truncated to 6).
    enc = np.zeros((5, 6), np.int32)
    for i, r in enumerate(records):
        ids = vocab.encode(r["inputs"])[:5] + [1]
        enc[i, : len(ids)] = ids
    direct = decoding.decode(config, params, enc, decoding.DecodingSpec(max_decode_length=5))
    for i, line in enumerate(lines):
        n = int(direct.lengths[i])
        ids = [int(t) for t in np.asarray(direct.tokens)[i, :n]]
        assert line["aux"]["prediction_ids"] == ids
        assert line["prediction"] == vocab.decode([t for t in ids if t != 1])
        assert line["aux"]["log_prob"] == pytest.approx(float(direct.log_probs[i]), abs=1e-4)
    assert not list(tmp_path.glob("*.tmp"))


def test_run_inference_reads_text_lines_and_names_bad_inputs(tmp_path):
    config = _config()
    params = initialization.init_params(config, seed=4)
    text = tmp_path / "inputs.txt"
    text.write_text("one\ntwo\n")
    out = inference.run_inference(config, params, text, _CharVocabulary(), output_dir=tmp_path / "o",
                                  input_length=4, max_decode_length=3, batch_size=4)
    assert out == tmp_path / "o" / "inputs-predictions.jsonl"
    assert [json.loads(x)["inputs"] for x in out.read_text().splitlines()] == ["one", "two"]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        inference.run_inference(config, params, tmp_path / "missing.jsonl", _CharVocabulary())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: record lacks the field 'inputs'"):
        inference.run_inference(config, params, bad, _CharVocabulary())
    with pytest.raises(ValueError, match="batch_size=0 must be a positive integer"):
        inference.run_inference(config, params, text, _CharVocabulary(), batch_size=0)


@pytest.mark.slow
def test_infer_run_mode_decodes_a_real_t5x_checkpoint_with_the_t5_vocabulary(shared_dir, tmp_path):
    """launcher.py --run_mode=infer with gin/runs/infer.gin on T5X's own tiny checkpoint."""
    import gin

    from gqa_t5x import cli
    from gqa_t5x.data import vocabularies

    checkpoint = shared_dir / "fixtures" / "t5x" / "t5_1_1_tiny" / "checkpoint_0"
    spm = shared_dir / "fixtures" / "t5_vocab" / "cc_all.32000.sentencepiece.model"
    inputs = tmp_path / "in" / "questions.jsonl"
    inputs.parent.mkdir()
    inputs.write_text('{"inputs": "Hello World!, how are you?"}\n{"inputs": "GQA is fast."}\n')
    try:
        code = cli.launcher_main([
            "--gin_file=gin/runs/infer.gin",
            f'--gin.CHECKPOINT_PATH="{checkpoint}"',
            f'--gin.INPUT_FILE="{inputs}"',
            f'--gin.VOCAB_PATH="{spm}"',
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 6}",
            "--gin.BATCH_SIZE=4",
            "--run_mode=infer",
        ])
    finally:
        gin.clear_config()  # the launcher leaves gin's config locked; unlock it for later tests
    assert code == 0
    lines = [json.loads(x) for x in (tmp_path / "in" / "questions-predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["inputs"] == "Hello World!, how are you?"
    from gqa_t5x import checkpoints

    config, params = checkpoints.load(checkpoint)
    vocab = vocabularies.T5Vocabulary(str(spm))
    enc = np.zeros((1, 16), np.int32)
    enc[0, :9] = [8774, 1150, 55, 6, 149, 33, 25, 58, 1]  # the fixture README's ids + EOS
    direct = decoding.decode(
        config.replace(dropout_rate=0.0), params, enc, decoding.DecodingSpec(max_decode_length=6)
    )
    n = int(direct.lengths[0])
    assert lines[0]["aux"]["prediction_ids"] == [int(t) for t in np.asarray(direct.tokens)[0, :n]]
    assert lines[0]["prediction"] == vocab.decode(lines[0]["aux"]["prediction_ids"])


def test_run_inference_ends_with_a_summary_line(tmp_path, capsys, monkeypatch):
    config = _config()
    params = initialization.init_params(config, seed=4)
    text = tmp_path / "inputs.txt"
    text.write_text("one\ntwo\nthreefourfive\n")
    out = inference.run_inference(config, params, text, _CharVocabulary(), input_length=4, max_decode_length=3,
                                  batch_size=2)
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"[infer] 3 inputs -> {out} in ") and line.endswith(
        "inputs/s; greedy decoding, batch 2, up to 3 output tokens; 1 truncated to input_length=4)")


def test_the_summary_line_names_count_file_time_rate_and_settings():
    assert inference.summary_line(1, "/o/p.jsonl", 2.0, method="beam", batch_size=8, max_decode_length=64,
                                  truncated=0, input_length=512) == (
        "[infer] 1 input -> /o/p.jsonl in 2.0s (0.5 inputs/s; beam decoding, batch 8, up to 64 output tokens; "
        "0 truncated to input_length=512)")
