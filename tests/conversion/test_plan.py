"""`conversion.plan`: which layers a conversion rewrites, its target config, and
the requests it refuses.

The layers a plan lists are checked against the parameter tree itself: a layer
must be listed exactly when some key/value kernel of it changes shape between
the source and the target config (`param_tree.param_shapes`)."""

from __future__ import annotations

import numpy as np
import pytest

from gqa_t5x.conversion import plan as cplan
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config


def _config(**changes) -> T5Config:
    base = dict(vocab_size=37, dtype="float32", emb_dim=16, num_heads=4, head_dim=4, mlp_dim=24,
                num_encoder_layers=2, num_decoder_layers=3, dropout_rate=0.0)
    base.update(changes)
    return T5Config(**base)


def _layers_whose_shapes_change(source: T5Config, target: T5Config) -> set[str]:
    """Attention prefixes with a parameter whose shape differs between the two configs."""
    before, after = param_tree.param_shapes(source), param_tree.param_shapes(target)
    assert before.keys() == after.keys()
    return {path.rsplit("/", 2)[0] for path in before if before[path] != after[path]}


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_decoder_only_plan_lists_every_decoder_self_and_cross_attention_and_no_encoder_layer(num_kv_heads):
    config = _config()
    plan = cplan.plan_conversion(config, num_kv_heads, method="mean", seed=3)
    expected = {f"decoder/layers_{i}/{m}" for i in range(3) for m in ("self_attention", "encoder_decoder_attention")}
    assert set(plan.layers) == expected  # 3 decoder layers x 2 attentions, no encoder layer
    assert set(plan.layers.values()) == {(4, num_kv_heads)}
    assert plan.target.num_kv_heads == num_kv_heads and plan.target.encoder_num_kv_heads == 4
    assert (plan.source, plan.method, plan.seed) == (config, "mean", 3)
    # Everything but the kv head count is the source's.
    assert plan.target == config.replace(num_kv_heads=num_kv_heads)
    assert set(plan.layers) == _layers_whose_shapes_change(config, plan.target)


def test_convert_encoder_adds_encoder_attention_with_its_own_head_count():
    config = _config()
    plan = cplan.plan_conversion(config, 1, convert_encoder=True, encoder_num_kv_heads=2)
    assert plan.target.num_kv_heads == 1 and plan.target.encoder_num_kv_heads == 2
    assert {k: v for k, v in plan.layers.items() if k.startswith("encoder/")} == {
        "encoder/layers_0/attention": (4, 2), "encoder/layers_1/attention": (4, 2)}
    assert len(plan.layers) == 2 + 6
    assert set(plan.layers) == _layers_whose_shapes_change(config, plan.target)
    # Without an explicit encoder count the encoder gets the decoder's.
    same = cplan.plan_conversion(config, 2, convert_encoder=True)
    assert same.target.encoder_num_kv_heads == 2 and same.layers["encoder/layers_1/attention"] == (4, 2)


def test_unchanged_head_counts_list_no_layer():
    config = _config()
    assert cplan.plan_conversion(config, 4).layers == {}  # MHA -> MHA
    # Encoder converted, decoder kept at 4: only the encoder layers are listed.
    plan = cplan.plan_conversion(config, 4, convert_encoder=True, encoder_num_kv_heads=1)
    assert set(plan.layers) == {"encoder/layers_0/attention", "encoder/layers_1/attention"}
    # A GQA-2 source converted to 2 again changes nothing.
    assert cplan.plan_conversion(_config(num_kv_heads=2), 2).layers == {}


def test_a_gqa_source_is_merged_further_from_its_own_head_count():
    config = _config(num_kv_heads=2, encoder_num_kv_heads=2)
    plan = cplan.plan_conversion(config, 1, convert_encoder=True)
    assert set(plan.layers.values()) == {(2, 1)}
    assert set(plan.layers) == _layers_whose_shapes_change(config, plan.target)


def test_numpy_integers_are_accepted_and_stored_as_int():
    plan = cplan.plan_conversion(_config(), np.int64(2), seed=np.int32(7))
    assert plan.target.num_kv_heads == 2 and type(plan.target.num_kv_heads) is int
    assert plan.seed == 7 and type(plan.seed) is int


@pytest.mark.parametrize("value", [0, -2, 2.0, True, "2", None])
def test_kv_heads_that_are_not_positive_integers_are_refused(value):
    with pytest.raises(ValueError, match=r"num_kv_heads=.* must be a positive integer.*\[1, 2, 4\]"):
        cplan.plan_conversion(_config(), value)


def test_kv_heads_that_do_not_divide_the_heads_are_refused_with_the_divisors():
    # The message names the request and the valid choices (its wording is the config's).
    with pytest.raises(ValueError, match=r"(?=.*num_kv_heads=3\b)(?=.*num_heads=4)(?=.*\[1, 2, 4\])"):
        cplan.plan_conversion(_config(), 3)


def test_more_kv_heads_than_the_source_has_is_refused():
    with pytest.raises(ValueError, match=r"num_kv_heads=4 is more key/value heads than the source has \(2"):
        cplan.plan_conversion(_config(num_kv_heads=2), 4)
    with pytest.raises(ValueError, match=r"encoder_num_kv_heads=4 is more key/value heads.*\(1,"):
        cplan.plan_conversion(_config(encoder_num_kv_heads=1), 1, convert_encoder=True, encoder_num_kv_heads=4)


def test_groups_that_would_not_be_unions_of_source_groups_are_refused():
    # 12 heads, 4 kv heads (groups of 3 query heads); 3 kv heads divides 12 but not 4.
    config = _config(num_heads=12, num_kv_heads=4)
    with pytest.raises(ValueError, match=r"num_kv_heads=3 does not divide the source's 4 key/value heads.*\[1, 2, 4\]"):
        cplan.plan_conversion(config, 3)


def test_encoder_count_without_convert_encoder_is_refused():
    with pytest.raises(ValueError, match="convert_encoder is False"):
        cplan.plan_conversion(_config(), 2, encoder_num_kv_heads=2)


@pytest.mark.parametrize("seed", [1.5, "0", True, None])
def test_non_integer_seeds_are_refused(seed):
    with pytest.raises(ValueError, match="must be an integer"):
        cplan.plan_conversion(_config(), 2, seed=seed)


def test_unknown_method_is_refused_naming_the_registered_ones():
    with pytest.raises(ValueError, match=r"Unknown conversion method 'median'.*'mean'"):
        cplan.plan_conversion(_config(), 2, method="median")


@pytest.mark.parametrize("method,projections", [
    ("mean", ("key", "value")), ("first", ("key", "value")), ("random", ("key", "value")),
    ("align", ("query", "key", "value", "out")), ("lsq", ("query", "key", "value", "out")),
])
def test_projections_are_those_the_method_rewrites(method, projections):
    assert cplan.plan_conversion(_config(), 1, method=method).projections == projections


@pytest.mark.parametrize("path,expected", [
    ("decoder/layers_0/self_attention/key/kernel", ("decoder/layers_0/self_attention", "key")),
    ("encoder/layers_11/attention/out/kernel", ("encoder/layers_11/attention", "out")),
    ("decoder/layers_1/encoder_decoder_attention/query/kernel",
     ("decoder/layers_1/encoder_decoder_attention", "query")),
    ("x/value/kernel", ("x", "value")),
    ("value/kernel", None),  # no prefix
    ("decoder/layers_0/mlp/wo/kernel", None),  # not an attention projection
    ("decoder/layers_0/self_attention/key/bias", None),  # not a kernel
    ("decoder/decoder_norm/scale", None),
    ("token_embedder/embedding", None),
])
def test_split_attention_path(path, expected):
    assert cplan.split_attention_path(path) == expected


def test_split_attention_path_finds_exactly_the_attention_kernels_of_the_real_tree():
    shapes = param_tree.param_shapes(_config())
    found = {p for p in shapes if cplan.split_attention_path(p)}
    # 2 encoder + 3 x 2 decoder attentions, 4 projections each.
    assert len(found) == (2 + 6) * 4
    assert all("attention/" in p and p.endswith("/kernel") for p in found)
