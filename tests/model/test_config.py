"""T5Config: validation with what to change, JSON and gin round trips, the model gins."""

from __future__ import annotations

import gin
import pytest

from gqa_t5x import gin_config
from gqa_t5x.model.config import T5Config


def _small_config(num_kv_heads: int | None, **kw) -> T5Config:
    base = dict(vocab_size=64, dtype="float32", emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
                num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0)
    base.update(kw)
    return T5Config(num_kv_heads=num_kv_heads, **base)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_heads=16, num_kv_heads=6), "num_heads=16 is not divisible by num_kv_heads=6; choose a divisor of 16"),
        (dict(num_heads=8, num_kv_heads=16), "num_kv_heads=16 exceeds num_heads=8"),
        (dict(num_heads=8, encoder_num_kv_heads=3), "encoder_num_kv_heads=3"),
        (dict(num_kv_heads=0), "num_kv_heads=0 must be a positive integer"),
        (dict(dtype="float64"), "T5Config.dtype='float64' is not supported"),
        (dict(mlp_activations=("gelu", "softplus")), "'softplus'"),
        (dict(emb_dim=0), "T5Config.emb_dim=0 must be a positive integer"),
    ],
)
def test_invalid_configs_fail_at_construction_with_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        T5Config(**kwargs)


def test_config_json_round_trip():
    config = _small_config(2, encoder_num_kv_heads=1, dtype="bfloat16")
    assert T5Config.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="Unknown T5Config field"):
        T5Config.from_dict({"emb_dim": 8, "n_heads": 2})


@pytest.mark.parametrize("changes", [dict(num_kv_heads=2, encoder_num_kv_heads=1, dtype="bfloat16"),
                                     dict(num_kv_heads=None, mlp_activations=("relu",), logits_via_embedding=True)])
def test_to_gin_text_parses_back_into_the_same_config(changes):
    config = _small_config(**changes)
    text = config.to_gin()
    assert "from gqa_t5x.model import network" in text
    try:
        gin.clear_config()
        gin.parse_config(text)
        assert gin_config.model_config() == config
    finally:
        gin.clear_config()


@pytest.mark.parametrize(
    "size,shape",
    [
        ("tiny", (8, 4, 3, 16, 2)),
        ("small", (512, 6, 64, 1024, 8)),
        ("base", (768, 12, 64, 2048, 12)),
        ("large", (1024, 16, 64, 2816, 24)),
        ("xl", (2048, 32, 64, 5120, 24)),
        ("xxl", (4096, 64, 64, 10240, 24)),
    ],
)
def test_model_gins_have_the_papers_shapes(size, shape):
    config = gin_config.model_config_from_gin(f"gin/models/t5_1_1/{size}.gin")
    emb, heads, head_dim, mlp, layers = shape
    assert (config.emb_dim, config.num_heads, config.head_dim, config.mlp_dim) == (emb, heads, head_dim, mlp)
    assert config.num_encoder_layers == config.num_decoder_layers == layers
    assert config.vocab_size == 32128 and config.mlp_activations == ("gelu", "linear")
    assert config.decoder_kv_heads == heads and config.encoder_kv_heads == heads  # MHA by default


def test_num_kv_heads_is_chosen_from_the_command_line():
    config = gin_config.model_config_from_gin("gin/models/t5_1_1/xxl.gin", ["NUM_KV_HEADS=8"])
    assert config.decoder_kv_heads == 8 and config.encoder_kv_heads == 64
    mqa = gin_config.model_config_from_gin("gin/models/t5_1_1/large.gin", ["NUM_KV_HEADS=1", "ACTIVATION_DTYPE='float32'"])
    assert mqa.decoder_kv_heads == 1 and mqa.dtype == "float32"
    with pytest.raises(ValueError, match="NUM_KV_HEADS"):
        gin_config.model_config_from_gin("gin/models/t5_1_1/small.gin", ["NUM_KV_HEADS=4"])


def test_missing_gin_file_is_named():
    with pytest.raises(FileNotFoundError, match="no_such.gin"):
        gin_config.model_config_from_gin("gin/models/t5_1_1/no_such.gin")
