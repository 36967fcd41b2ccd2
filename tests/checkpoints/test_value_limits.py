"""Every restore refuses non-finite or implausibly large values, unless overridden.

A flipped exponent bit turns a weight into ~1e36 and the file still parses;
the readers (conversion, export, eval, infer, a training run's initial
checkpoint) and the training restore from MODEL_DIR must stop on it, naming
the parameter and the override, and accept it with the override.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x import checkpoints
from gqa_t5x import cli
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config
from gqa_t5x.training import inference

CONFIG = T5Config(vocab_size=32, emb_dim=8, num_heads=2, head_dim=4, mlp_dim=16, dtype="float32",
                  num_encoder_layers=1, num_decoder_layers=1)
BAD_KEY = "decoder/layers_0/mlp/wo/kernel"


def _checkpoint(path, value: float, key: str = BAD_KEY) -> str:
    rng = np.random.default_rng(0)
    flat = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in param_tree.param_shapes(CONFIG).items()}
    flat[key][1, 2] = value
    checkpoints.save(path, CONFIG, param_tree.unflatten(flat), step=7)
    return str(path)


@pytest.mark.parametrize("value,kind", [(np.nan, "non-finite"), (np.inf, "non-finite"),
                                        (-3e4, "implausibly large (|x| > 10000)")])
def test_a_reader_refuses_a_bad_value_naming_the_parameter_and_the_override(tmp_path, value, kind):
    path = _checkpoint(tmp_path / "ckpt", value)
    with checkpoints.open_checkpoint(path) as reader:
        reader.read("token_embedder/embedding")  # A clean parameter reads as before.
        with pytest.raises(checkpoints.UnusualValuesError) as raised:
            reader.read(BAD_KEY)
    message = str(raised.value)
    assert f"parameter '{BAD_KEY}' holds 1 {kind} value(s)" in message
    assert "at index (1, 2)" in message and path in message
    assert "--allow_unusual_values (gin: ALLOW_UNUSUAL_VALUES = True)" in message


def test_the_override_reads_the_value_unchanged(tmp_path):
    path = _checkpoint(tmp_path / "ckpt", np.nan)
    with checkpoints.open_checkpoint(path, allow_unusual_values=True) as reader:
        assert np.isnan(reader.read(BAD_KEY)[1, 2])
    config, params = checkpoints.load(path, allow_unusual_values=True)
    assert np.isnan(params["decoder"]["layers_0"]["mlp"]["wo"]["kernel"][1, 2])


def test_infer_loads_through_the_same_check(tmp_path):
    path = _checkpoint(tmp_path / "ckpt", 5e4)
    with pytest.raises(checkpoints.UnusualValuesError, match=BAD_KEY):
        inference.load_params(path)
    config, _ = inference.load_params(path, allow_unusual_values=True)
    assert config.num_heads == 2


def test_check_tree_names_the_bad_parameter_of_device_arrays():
    flat = {k: jnp.zeros(s) for k, s in param_tree.param_shapes(CONFIG).items()}
    tree = param_tree.unflatten(flat)
    checkpoints.check_tree(tree, source="run/checkpoint_9")  # All finite and small: passes.
    flat[BAD_KEY] = flat[BAD_KEY].at[0, 3].set(jnp.inf)
    with pytest.raises(checkpoints.UnusualValuesError) as raised:
        checkpoints.check_tree(param_tree.unflatten(flat), source="run/checkpoint_9")
    assert str(raised.value).startswith(
        f"run/checkpoint_9: parameter '{BAD_KEY}' holds 1 non-finite value(s), the first inf at index (0, 3)")
    # Integer leaves (a step counter) are not parameters and are skipped.
    checkpoints.check_tree({"step": jnp.asarray(2**31 - 1), "w": jnp.ones(2)}, source="x")


def test_export_refuses_a_bad_checkpoint_leaving_nothing_and_accepts_it_with_the_flag(tmp_path, capsys):
    path = _checkpoint(tmp_path / "ckpt", np.nan)
    out = tmp_path / "hf"
    code = cli.main(["export", "--checkpoint", path, "--format", "huggingface", "--output", str(out),
                     "--no_progress", "--weights_only"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"gqa-t5x export: error: {path}: parameter '{BAD_KEY}'")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    code = cli.main(["export", "--checkpoint", path, "--format", "huggingface", "--output", str(out),
                     "--no_progress", "--weights_only", "--allow_unusual_values"])
    assert code == 0, capsys.readouterr().err
    assert (out / "config.json").exists()
