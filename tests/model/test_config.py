"""T5Config: validation with what to change, JSON and gin round trips, the model gins."""

from __future__ import annotations

import json

import gin
import numpy as np
import pytest

from gqa_t5x import gin_config
from gqa_t5x.model.config import T5Config, check_kv_heads


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
        (dict(attention_query_chunk=0), "attention_query_chunk=0 must be None (one block) or a positive"),
        (dict(attention_query_chunk=2.5), "(gin: --gin.ATTENTION_QUERY_CHUNK=512)"),
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
    assert config.num_kv_heads == heads and config.encoder_num_kv_heads == heads  # MHA by default


def test_num_kv_heads_is_chosen_from_the_command_line():
    config = gin_config.model_config_from_gin("gin/models/t5_1_1/xxl.gin", ["NUM_KV_HEADS=8"])
    assert config.num_kv_heads == 8 and config.encoder_num_kv_heads == 64
    mqa = gin_config.model_config_from_gin("gin/models/t5_1_1/large.gin", ["NUM_KV_HEADS=1", "ACTIVATION_DTYPE='float32'"])
    assert mqa.num_kv_heads == 1 and mqa.dtype == "float32"
    with pytest.raises(ValueError, match="NUM_KV_HEADS"):
        gin_config.model_config_from_gin("gin/models/t5_1_1/small.gin", ["NUM_KV_HEADS=4"])


def test_attention_query_chunk_is_set_by_its_gin_macro_and_round_trips():
    config = gin_config.model_config_from_gin("gin/models/t5_1_1/xxl.gin", ["ATTENTION_QUERY_CHUNK=256"])
    assert config.attention_query_chunk == 256
    assert gin_config.model_config_from_gin("gin/models/t5_1_1/xxl.gin").attention_query_chunk is None
    assert T5Config.from_json(config.to_json()) == config
    assert T5Config(attention_query_chunk=np.int64(8)).attention_query_chunk == 8


def test_missing_gin_file_is_named():
    with pytest.raises(FileNotFoundError, match="no_such.gin"):
        gin_config.model_config_from_gin("gin/models/t5_1_1/no_such.gin")


# ------------------------------------------------- key/value heads: always int


def _kv(**kv_heads) -> T5Config:
    """The 4-head small config with the given key/value head fields."""
    return _small_config(kv_heads.pop("num_kv_heads", None), **kv_heads)


@pytest.mark.parametrize("field", ["num_kv_heads", "encoder_num_kv_heads"])
def test_none_kv_heads_become_num_heads_with_equal_configs_hashes_and_json(field):
    implicit = _kv(**{field: None})
    explicit = _kv(num_kv_heads=4, encoder_num_kv_heads=4)
    assert getattr(implicit, field) == 4 and type(getattr(implicit, field)) is int
    assert implicit == explicit and hash(implicit) == hash(explicit)
    assert implicit.to_json() == explicit.to_json()
    assert json.loads(implicit.to_json())[field] == 4
    assert {implicit: "cached"}[explicit] == "cached"  # lru_cache / flax attribute keys


def test_numpy_integer_kv_heads_are_stored_as_python_ints():
    config = _small_config(np.int64(2), encoder_num_kv_heads=np.int32(1))
    assert (config.num_kv_heads, config.encoder_num_kv_heads) == (2, 1)
    assert type(config.num_kv_heads) is int and config == _small_config(2, encoder_num_kv_heads=1)


def test_replace_with_none_means_multi_head_of_the_new_num_heads():
    gqa = _small_config(2)
    assert gqa.replace(num_kv_heads=None).num_kv_heads == 4
    wider = gqa.replace(num_heads=8, num_kv_heads=None, encoder_num_kv_heads=None)
    assert (wider.num_kv_heads, wider.encoder_num_kv_heads) == (8, 8)


@pytest.mark.parametrize("field", ["num_kv_heads", "encoder_num_kv_heads"])
@pytest.mark.parametrize("value", [0, -1, -4, 3, 5, 8, 2.0, "2", True])
def test_every_invalid_kv_head_count_names_the_field_and_lists_the_divisors(field, value):
    with pytest.raises(ValueError) as raised:
        _kv(**{field: value})
    message = str(raised.value)
    assert f"{field}={value!r}" in message, message
    assert "choose a divisor of 4: [1, 2, 4]" in message, message
    macro = {"num_kv_heads": "NUM_KV_HEADS", "encoder_num_kv_heads": "ENCODER_NUM_KV_HEADS"}[field]
    assert f"--gin.{macro}=" in message, message


def test_check_kv_heads_is_the_shared_check_for_counts_outside_a_config():
    assert check_kv_heads(16, 8) == 8 and type(check_kv_heads(16, np.int64(4))) is int
    with pytest.raises(ValueError, match=r"^num_heads=16 is not divisible by --num_kv_heads=6; "
                                         r"choose a divisor of 16: \[1, 2, 4, 8, 16\]\.$"):
        check_kv_heads(16, 6, name="--num_kv_heads")
    with pytest.raises(ValueError, match=r"G=None must be a positive integer"):
        check_kv_heads(16, None, name="G")


def test_a_config_json_that_recorded_null_kv_heads_loads_as_multi_head():
    record = json.loads(_small_config(2).to_json())
    record.update(num_kv_heads=None, encoder_num_kv_heads=None)
    config = T5Config.from_json(json.dumps(record))
    assert (config.num_kv_heads, config.encoder_num_kv_heads) == (4, 4)
    assert config == _small_config(4)


@pytest.mark.parametrize("macro", ["None", "64"])
def test_gin_none_and_num_heads_build_the_same_config(macro):
    config = gin_config.model_config_from_gin("gin/models/t5_1_1/xxl.gin", [f"NUM_KV_HEADS={macro}"])
    assert config == gin_config.model_config_from_gin("gin/models/t5_1_1/xxl.gin")
    assert config.num_kv_heads == 64 and config.encoder_num_kv_heads == 64


# -------------------------------------- key/value heads per layer and attention kind
def _layered(**kv_heads) -> T5Config:
    """The 4-head small config (2 + 2 layers) with the given key/value head fields."""
    return _small_config(kv_heads.pop("num_kv_heads", None), **kv_heads)


@pytest.mark.parametrize("per_layer,uniform", [
    (dict(decoder_self_kv_heads=(2, 2), decoder_cross_kv_heads=2), dict(num_kv_heads=2)),
    (dict(decoder_self_kv_heads=[1, 1], decoder_cross_kv_heads=(1, 1), num_kv_heads=4), dict(num_kv_heads=1)),
    (dict(num_kv_heads=2, decoder_cross_kv_heads=[2, 2]), dict(num_kv_heads=2)),
    (dict(encoder_layer_kv_heads=(1, 1)), dict(encoder_num_kv_heads=1)),
    (dict(encoder_layer_kv_heads=np.array([2, 2]), encoder_num_kv_heads=4), dict(encoder_num_kv_heads=2)),
])
def test_per_layer_counts_that_are_all_equal_equal_and_hash_as_the_uniform_config(per_layer, uniform):
    layered, plain = _layered(**per_layer), _layered(**uniform)
    assert layered == plain and hash(layered) == hash(plain) and layered.to_json() == plain.to_json()
    assert layered.uniform_kv_heads and layered.decoder_self_kv_heads is None
    assert layered.encoder_layer_kv_heads is None and layered.decoder_cross_kv_heads is None


def test_per_layer_counts_are_canonical_whichever_way_they_are_written():
    # Self 1 everywhere, cross 4 everywhere: an int per kind, tuples, or num_kv_heads for one kind.
    writings = [dict(decoder_self_kv_heads=1, decoder_cross_kv_heads=4),
                dict(decoder_self_kv_heads=[1, 1], decoder_cross_kv_heads=(4, 4), num_kv_heads=2),
                dict(num_kv_heads=4, decoder_self_kv_heads=(1, 1)),
                dict(num_kv_heads=1, decoder_cross_kv_heads=4)]
    configs = [_layered(**w) for w in writings]
    assert all(c == configs[0] and hash(c) == hash(configs[0]) for c in configs)
    assert (configs[0].num_kv_heads, configs[0].decoder_self_kv_heads, configs[0].decoder_cross_kv_heads) == (
        1, None, (4, 4))  # self's count is num_kv_heads; cross keeps its tuple
    both = _layered(decoder_self_kv_heads=(1, 2), decoder_cross_kv_heads=(4, 1), num_kv_heads=2)
    assert both == _layered(decoder_self_kv_heads=(1, 2), decoder_cross_kv_heads=(4, 1))
    assert both.num_kv_heads == 4  # unused when both kinds have tuples: num_heads
    assert not both.uniform_kv_heads


def test_kv_heads_accessor_gives_every_layers_count_of_every_kind():
    config = _layered(decoder_self_kv_heads=(1, 2), decoder_cross_kv_heads=(4, 1), encoder_layer_kv_heads=[2, 1])
    assert [config.kv_heads("self", i) for i in range(2)] == [1, 2]
    assert [config.kv_heads("cross", i) for i in range(2)] == [4, 1]
    assert [config.kv_heads("encoder", i) for i in range(2)] == [2, 1]
    assert config.layer_kv_heads("cross") == (4, 1)
    uniform = _layered(num_kv_heads=2, encoder_num_kv_heads=1)
    assert uniform.layer_kv_heads("self") == uniform.layer_kv_heads("cross") == (2, 2)
    assert uniform.kv_heads("encoder", 1) == 1 and type(uniform.kv_heads("self", 0)) is int
    with pytest.raises(IndexError, match=r"layer=2 is not a layer of the self attention \(num_decoder_layers=2\)"):
        config.kv_heads("self", 2)
    with pytest.raises(ValueError, match="kind='decoder' is not an attention kind"):
        config.kv_heads("decoder", 0)
    assert config.describe_kv_heads() == (
        "decoder_self_kv_heads=(1, 2), decoder_cross_kv_heads=(4, 1), encoder_layer_kv_heads=(2, 1)")


def test_per_layer_counts_round_trip_through_json_dict_and_gin():
    config = _layered(decoder_self_kv_heads=(1, 2), decoder_cross_kv_heads=4, encoder_layer_kv_heads=(2, 1))
    record = json.loads(config.to_json())
    assert record["decoder_self_kv_heads"] == [1, 2] and record["encoder_layer_kv_heads"] == [2, 1]
    assert record["decoder_cross_kv_heads"] is None and record["num_kv_heads"] == 4
    assert T5Config.from_json(config.to_json()) == config
    assert T5Config.from_dict(config.to_dict()) == config
    try:
        gin.clear_config()
        gin.parse_config(config.to_gin())
        assert gin_config.model_config() == config
    finally:
        gin.clear_config()


def test_gin_macros_set_per_layer_counts():
    config = gin_config.model_config_from_gin(
        "gin/models/t5_1_1/small.gin", ["DECODER_SELF_KV_HEADS=(1,1,2,2,3,3,6,6)", "DECODER_CROSS_KV_HEADS=2",
                                        "ENCODER_LAYER_KV_HEADS=[6, 6, 6, 6, 6, 6, 6, 1]"])  # 6 heads, 8 layers
    assert config.layer_kv_heads("self") == (1, 1, 2, 2, 3, 3, 6, 6)
    assert config.layer_kv_heads("cross") == (2,) * 8 and config.num_kv_heads == 2
    assert config.layer_kv_heads("encoder") == (6,) * 7 + (1,)
    assert gin_config.model_config_from_gin("gin/models/t5_1_1/small.gin").uniform_kv_heads  # default None


@pytest.mark.parametrize("kwargs,message", [
    (dict(decoder_self_kv_heads=(1, 3)),
     "num_heads=4 is not divisible by decoder_self_kv_heads[1]=3; choose a divisor of 4: [1, 2, 4] "
     "(gin: --gin.DECODER_SELF_KV_HEADS=...)."),
    (dict(decoder_cross_kv_heads=(8, 1)), "decoder_cross_kv_heads[0]=8 exceeds num_heads=4"),
    (dict(encoder_layer_kv_heads=(2, 0)), "encoder_layer_kv_heads[1]=0 must be a positive integer"),
    (dict(encoder_layer_kv_heads=(2, "1")), "encoder_layer_kv_heads[1]='1' must be a positive integer"),
    (dict(decoder_self_kv_heads=(1, 2, 2)),
     "T5Config.decoder_self_kv_heads=(1, 2, 2) has 3 counts but num_decoder_layers=2: give one count per layer"),
    (dict(decoder_cross_kv_heads="1,2"), "T5Config.decoder_cross_kv_heads='1,2' must be None, one key/value"),
    (dict(decoder_self_kv_heads=(1, 2), scan_layers=True),
     "scan_layers stacks every layer's parameters, so every layer of a stack needs the same kv heads; "
     "decoder_self_kv_heads=(1, 2) differ: set SCAN_LAYERS=False or equal counts."),
    (dict(encoder_layer_kv_heads=(4, 1), scan_layers=True), "encoder_layer_kv_heads=(4, 1) differ"),
])
def test_invalid_per_layer_counts_name_the_field_and_index(kwargs, message):
    with pytest.raises(ValueError) as raised:
        _layered(**kwargs)
    assert message in str(raised.value)


def test_scan_layers_accepts_different_self_and_cross_counts():
    config = _layered(decoder_self_kv_heads=1, decoder_cross_kv_heads=4, scan_layers=True)
    assert (config.kv_heads("self", 1), config.kv_heads("cross", 1)) == (1, 4)
