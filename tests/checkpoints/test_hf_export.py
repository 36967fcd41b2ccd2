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
    random_params,
    tiny_config,
    tokens,
)
from gqa_t5x import conversion
from gqa_t5x.checkpoints import huggingface
from gqa_t5x.model import param_tree

transformers = pytest.importorskip("transformers")
hf_reference = pytest.importorskip("hf_reference")


def _load_hf(directory):
    return transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()


@pytest.fixture(scope="module")
def hf_source():
    model = make_hf_t5_v1_1(seed=4)
    config = config_for_hf(model)
    return model, config, hf_reference.params_from_hf_state_dict(model.state_dict(), config)


def test_repeat_kv_heads_puts_kv_head_g_under_query_heads_of_group_g():
    kernel = np.arange(2 * 6, dtype=np.float32).reshape(2, 6)  # emb 2, G=3 heads of 2
    out = huggingface.repeat_kv_heads(kernel, num_heads=6, head_dim=2)
    assert out.shape == (2, 12)
    for h in range(6):
        g = h // 2
        np.testing.assert_array_equal(out[:, 2 * h : 2 * h + 2], kernel[:, 2 * g : 2 * g + 2])


def test_export_of_unconverted_hf_model_reproduces_hf_logits(hf_source, tmp_path):
    model, config, params = hf_source
    huggingface.export_huggingface(tmp_path / "hf", config, params)
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


@pytest.mark.parametrize("groups,method", [pytest.param(1, "mean", marks=pytest.mark.slow),
                                           pytest.param(2, "mean", marks=pytest.mark.slow),
                                           pytest.param(2, "align", marks=pytest.mark.slow)])
def test_exported_gqa_model_gives_our_gqa_logits_in_huggingface(hf_source, tmp_path, groups, method):
    _, config, params = hf_source
    gqa_config, gqa_params = conversion.convert(config, params, groups, method=method)
    huggingface.export_huggingface(tmp_path / "hf", gqa_config, gqa_params)
    batch = tokens(groups, config.vocab_size)
    ours = our_logits(gqa_config, gqa_params, batch)
    theirs = hf_logits(_load_hf(tmp_path / "hf"), batch)
    assert masked_max_diff(ours, theirs, batch[2]) <= 1e-4


def test_bfloat16_export_loads_with_bfloat16_weights(hf_source, tmp_path):
    import torch

    _, config, params = hf_source
    huggingface.export_huggingface(tmp_path / "hf", config, params, dtype="bfloat16")
    model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    weight = model.decoder.block[0].layer[0].SelfAttention.k.weight
    assert weight.dtype == torch.bfloat16
    expected = flat(params)["decoder/layers_0/self_attention/key/kernel"].T
    np.testing.assert_allclose(weight.detach().float().numpy(), expected, rtol=1e-2, atol=1e-3)


def test_export_never_replaces_other_files_and_replaces_an_export_only_with_overwrite(hf_source, tmp_path):
    _, config, params = hf_source
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="holds no checkpoint"):
        huggingface.export_huggingface(notes, config, params, overwrite=True)
    assert [p.name for p in notes.iterdir()] == ["keep.txt"]
    target = tmp_path / "hf"
    huggingface.export_huggingface(target, config, params)
    with pytest.raises(FileExistsError, match="already holds a huggingface checkpoint.*--overwrite"):
        huggingface.export_huggingface(target, config, params, dtype="bfloat16")
    assert json.loads((target / "config.json").read_text())["torch_dtype"] == "float32"
    huggingface.export_huggingface(target, config, params, dtype="bfloat16", overwrite=True)
    assert json.loads((target / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "notes"]  # no temp dirs left


def test_failed_export_leaves_nothing_behind(hf_source, tmp_path):
    _, config, params = hf_source
    broken = flat(params)
    broken["decoder/layers_0/mlp/wo/kernel"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"decoder/layers_0/mlp/wo/kernel"):
        huggingface.export_huggingface(tmp_path / "hf", config, param_tree.unflatten(broken))
    ungated = config.replace(mlp_activations=("relu", "gelu"))  # HF gates with a linear branch only
    with pytest.raises(ValueError, match="mlp_activations"):
        huggingface.export_huggingface(tmp_path / "hf", ungated, params)
    assert list(tmp_path.iterdir()) == []


def test_streaming_export_from_checkpoint_equals_in_memory_export(hf_source, tmp_path):
    from safetensors.numpy import load_file

    from gqa_t5x import checkpoints

    _, config, params = hf_source
    gqa_config, gqa_params = conversion.convert(config, params, 2)
    checkpoints.save(tmp_path / "ckpt", gqa_config, gqa_params, step=7)
    huggingface.export_huggingface_checkpoint(tmp_path / "ckpt", tmp_path / "a", progress=False, weights_only=True)
    huggingface.export_huggingface(tmp_path / "b", gqa_config, gqa_params)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["gqa_t5x"]["num_kv_heads"] == 2


def _activation_cases() -> list[tuple[str, ...]]:
    from gqa_t5x.model import config as config_module

    # Every activation T5Config accepts, alone (`wi`) and gated (`wi_0`, `wi_1`).
    names = config_module._ACTIVATIONS
    return [(a,) for a in names] + [(a, "linear") for a in names]


@pytest.mark.parametrize("activations", [  # the fast tier: gated GELU (T5.1.1) and ReLU (T5)
    pytest.param(c, marks=() if c in (("gelu", "linear"), ("relu",)) else pytest.mark.slow) for c in _activation_cases()],
    ids="-".join)
def test_every_activation_round_trips_through_a_huggingface_export(tmp_path, activations):
    from gqa_t5x import checkpoints
    from gqa_t5x.model import layers
    import torch

    config = tiny_config(vocab_size=32, num_encoder_layers=1, num_decoder_layers=1, mlp_activations=activations)
    params = random_params(config)
    huggingface.export_huggingface(tmp_path / "hf", config, params)
    proj = json.loads((tmp_path / "hf" / "config.json").read_text())["feed_forward_proj"]
    hf_model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf")
    hf_act = hf_model.encoder.block[0].layer[1].DenseReluDense.act
    x = np.linspace(-4, 4, 101, dtype=np.float32)
    ours = np.asarray(layers.activation_fn(activations[0])(x))
    np.testing.assert_allclose(hf_act(torch.from_numpy(x)).numpy(), ours, rtol=1e-5, atol=1e-6, err_msg=proj)
    # T5X's 'gelu' and 'gelu_new' are the same (tanh) function, which HuggingFace
    # names once: it reads back as 'gelu'. Every other name reads back as itself.
    canonical = tuple("gelu" if a == "gelu_new" else a for a in activations)
    with checkpoints.open_checkpoint(tmp_path / "hf") as reader:
        assert reader.config == config.replace(mlp_activations=canonical), proj
        for key, value in flat(params).items():
            np.testing.assert_array_equal(reader.read(key), value, err_msg=key)


def test_export_refuses_per_layer_kv_heads_naming_them_and_writes_nothing(tmp_path):
    config = tiny_config(vocab_size=32, num_encoder_layers=1, num_decoder_layers=2).replace(
        decoder_self_kv_heads=(1, 2))
    # Refused from the config alone: zeros of the right shapes will do (no network init to compile).
    params = param_tree.unflatten({k: np.zeros(v, np.float32) for k, v in param_tree.param_shapes(config).items()})
    with pytest.raises(ValueError, match=r"decoder_self_kv_heads=\(1, 2\).*export a model with uniform"):
        huggingface.export_huggingface(tmp_path / "hf", config, params)
    assert not (tmp_path / "hf").exists()
