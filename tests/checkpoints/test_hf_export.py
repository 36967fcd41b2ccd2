"""Export to HuggingFace T5: kv heads repeated per group, identical logits, atomic."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conversion_utils import (
    config_for_hf,
    flat,
    hf_logits,
    make_hf_t5_v1_1,
    masked_max_diff,
    our_logits,
    tokens,
)
from gqa_t5x import conversion
from gqa_t5x.checkpoints import hf_export
from gqa_t5x.model import param_tree

transformers = pytest.importorskip("transformers")


def _load_hf(directory):
    return transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()


@pytest.fixture(scope="module")
def hf_source():
    model = make_hf_t5_v1_1(seed=4)
    config = config_for_hf(model)
    return model, config, param_tree.params_from_hf_state_dict(model.state_dict(), config)


def test_repeat_kv_heads_puts_kv_head_g_under_query_heads_of_group_g():
    kernel = np.arange(2 * 6, dtype=np.float32).reshape(2, 6)  # emb 2, G=3 heads of 2
    out = hf_export.repeat_kv_heads(kernel, num_heads=6, head_dim=2)
    assert out.shape == (2, 12)
    for h in range(6):
        g = h // 2
        np.testing.assert_array_equal(out[:, 2 * h : 2 * h + 2], kernel[:, 2 * g : 2 * g + 2])


def test_export_of_unconverted_hf_model_reproduces_hf_logits(hf_source, tmp_path):
    model, config, params = hf_source
    hf_export.export_huggingface(tmp_path / "hf", config, params)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"
    ]
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["feed_forward_proj"] == "gated-gelu"
    assert hf_config["tie_word_embeddings"] is False
    batch = tokens(0, config.vocab_size)
    reloaded = _load_hf(tmp_path / "hf")
    # Untied lm_head survived (transformers 5 would otherwise tie it).
    np.testing.assert_array_equal(reloaded.lm_head.weight.detach().numpy(), model.lm_head.weight.detach().numpy())
    assert masked_max_diff(hf_logits(reloaded, batch), hf_logits(model, batch), batch[2]) == 0.0


@pytest.mark.parametrize("groups,method", [(1, "mean"), (2, "mean"), (2, "align")])
def test_exported_gqa_model_gives_our_gqa_logits_in_huggingface(hf_source, tmp_path, groups, method):
    _, config, params = hf_source
    gqa_config, gqa_params = conversion.convert(config, params, groups, method=method)
    hf_export.export_huggingface(tmp_path / "hf", gqa_config, gqa_params)
    batch = tokens(groups, config.vocab_size)
    ours = our_logits(gqa_config, gqa_params, batch)
    theirs = hf_logits(_load_hf(tmp_path / "hf"), batch)
    assert masked_max_diff(ours, theirs, batch[2]) <= 1e-4


def test_bfloat16_export_loads_with_bfloat16_weights(hf_source, tmp_path):
    import torch

    _, config, params = hf_source
    hf_export.export_huggingface(tmp_path / "hf", config, params, dtype="bfloat16")
    model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    weight = model.decoder.block[0].layer[0].SelfAttention.k.weight
    assert weight.dtype == torch.bfloat16
    expected = flat(params)["decoder/layers_0/self_attention/key/kernel"].T
    np.testing.assert_allclose(weight.detach().float().numpy(), expected, rtol=1e-2, atol=1e-3)


def test_export_refuses_existing_directory_and_replaces_it_with_overwrite(hf_source, tmp_path):
    _, config, params = hf_source
    target = tmp_path / "hf"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        hf_export.export_huggingface(target, config, params)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temp dirs left
    hf_export.export_huggingface(target, config, params, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_failed_export_leaves_nothing_behind(hf_source, tmp_path):
    _, config, params = hf_source
    broken = flat(params)
    broken["decoder/layers_0/mlp/wo/kernel"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"decoder/layers_0/mlp/wo/kernel"):
        hf_export.export_huggingface(tmp_path / "hf", config, param_tree.unflatten(broken))
    relu = config.replace(mlp_activations=("tanh", "linear"))
    with pytest.raises(ValueError, match="mlp_activations"):
        hf_export.export_huggingface(tmp_path / "hf", relu, params)
    assert list(tmp_path.iterdir()) == []


def test_streaming_export_from_checkpoint_equals_in_memory_export(hf_source, tmp_path):
    from safetensors.numpy import load_file

    from gqa_t5x import checkpoints

    _, config, params = hf_source
    gqa_config, gqa_params = conversion.convert(config, params, 2)
    checkpoints.save(tmp_path / "ckpt", gqa_config, gqa_params, step=7)
    hf_export.export_huggingface_checkpoint(tmp_path / "ckpt", tmp_path / "a", progress=False)
    hf_export.export_huggingface(tmp_path / "b", gqa_config, gqa_params)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["gqa_t5x"]["num_kv_heads"] == 2
