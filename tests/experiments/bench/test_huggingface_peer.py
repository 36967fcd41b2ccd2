"""The bench's HuggingFace peer: made on a device in its dtype, timed, and micro-batched when out of memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gqa_t5x.experiments.bench import huggingface_peer
from gqa_t5x.model.config import T5Config


def _config() -> T5Config:
    return T5Config(vocab_size=64, emb_dim=16, num_heads=4, head_dim=4, mlp_dim=32, num_encoder_layers=2,
                    num_decoder_layers=2, dropout_rate=0.0, dtype="float32")


def test_a_random_model_is_made_in_the_asked_dtype_and_leaves_torchs_default_dtype_alone():
    before = torch.get_default_dtype()
    model = huggingface_peer.random_hf_model(_config(), "cpu", "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert torch.get_default_dtype() == before
    assert model.config.num_heads == 4 and model.config.d_model == 16 and model.config.num_layers == 2


def _out_of_memory_above(model, rows: int, calls: list[int]):
    """Makes `model.encoder` raise CUDA's out-of-memory error for more than `rows` rows."""
    forward = model.encoder.forward

    def limited(*args, input_ids=None, **kwargs):
        calls.append(int(input_ids.shape[0]))
        if input_ids.shape[0] > rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 17.00 GiB")
        return forward(*args, input_ids=input_ids, **kwargs)

    model.encoder.forward = limited


def test_an_encoder_out_of_memory_is_retried_in_halved_micro_batches_and_decodes_the_same_tokens():
    config = _config()
    tokens = huggingface_peer.bench_tokens(0, config.vocab_size, 4, 9)
    model = huggingface_peer.random_hf_model(config, "cpu", "float32")
    whole = huggingface_peer.time_huggingface(model, tokens, 5, 1, "cpu")
    assert whole["encoder_micro_batch"] == 4 and whole["tokens"].shape == (4, 5)
    calls, logged = [], []
    _out_of_memory_above(model, 1, calls)
    halved = huggingface_peer.time_huggingface(model, tokens, 5, 1, "cpu", log=logged.append)
    assert halved["encoder_micro_batch"] == 1
    assert calls[:2] == [4, 2] and set(calls[2:]) == {1}  # 4 fails, 2 fails, then rows of 1
    assert logged == ["[huggingface] the encoder ran out of memory; micro-batches of 2",
                      "[huggingface] the encoder ran out of memory; micro-batches of 1"]
    np.testing.assert_array_equal(halved["tokens"], whole["tokens"])
    row = huggingface_peer.huggingface_row(halved, 9, 5)
    assert row["batch"] == 4 and row["encoder_micro_batch"] == 1
    assert row["time_per_sample_s"] == pytest.approx((halved["encoder_s"] + halved["decoder_s"]) / 4)
    assert row["decode_step_s"] == pytest.approx(halved["decoder_s"] / 5)


def test_an_error_other_than_out_of_memory_is_raised_not_retried():
    model = huggingface_peer.random_hf_model(_config(), "cpu", "float32")
    calls = []

    def broken(*args, input_ids=None, **kwargs):
        calls.append(int(input_ids.shape[0]))
        raise RuntimeError("shape mismatch in the encoder")

    model.encoder.forward = broken
    with pytest.raises(RuntimeError, match="shape mismatch"):
        huggingface_peer.time_huggingface(model, np.full((4, 6), 5, np.int32), 3, 1, "cpu")
    assert calls == [4]


def test_bench_huggingface_alone_times_every_shape_on_the_benchs_inputs_and_writes_one_json(tmp_path, capsys):
    import json

    from gqa_t5x import cli

    out = tmp_path / "hf" / "tiny"
    assert cli.main(["bench", "--huggingface_alone", "--gin_file", "gin/models/t5_1_1/tiny.gin", "--input_length",
                     "9,12", "--output_length", "3", "--batch_size", "2", "--dtype", "bfloat16", "--seed", "5",
                     "--output", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert [(r["input_length"], r["output_length"], r["batch"]) for r in result["huggingface"]] == [(9, 3, 2), (12, 3, 2)]
    assert all(r["dtype"] == "float32" and r["device"] == "cpu" for r in result["huggingface"])  # a CPU: float32
    assert result["weights"] == "HuggingFace's random initialisation" and result["seed"] == 5
    assert result["model_gin"] == "gin/models/t5_1_1/tiny.gin" and result["label"] == "tiny"
    printed = capsys.readouterr().out
    assert "[huggingface] in=12 out=3 batch=2:" in printed and f"Wrote {out}.json" in printed
