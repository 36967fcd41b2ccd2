"""The T5X parameter tree read from the network, and the names that address it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x.model import network
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config

# The T5X tree (t5x/examples/t5/network.py) of a 1+1-layer T5.1.1, in T5X's order:
# emb 6, 4 heads of 2 (inner 8), encoder kv heads 2, decoder kv heads 1, mlp 5, vocab 11.
T5X_TREE = {
    "token_embedder/embedding": (11, 6),
    "encoder/relpos_bias/rel_embedding": (4, 32),
    "encoder/layers_0/pre_attention_layer_norm/scale": (6,),
    "encoder/layers_0/attention/query/kernel": (6, 8),
    "encoder/layers_0/attention/key/kernel": (6, 4),
    "encoder/layers_0/attention/value/kernel": (6, 4),
    "encoder/layers_0/attention/out/kernel": (8, 6),
    "encoder/layers_0/pre_mlp_layer_norm/scale": (6,),
    "encoder/layers_0/mlp/wi_0/kernel": (6, 5),
    "encoder/layers_0/mlp/wi_1/kernel": (6, 5),
    "encoder/layers_0/mlp/wo/kernel": (5, 6),
    "encoder/encoder_norm/scale": (6,),
    "decoder/relpos_bias/rel_embedding": (4, 32),
    "decoder/layers_0/pre_self_attention_layer_norm/scale": (6,),
    "decoder/layers_0/self_attention/query/kernel": (6, 8),
    "decoder/layers_0/self_attention/key/kernel": (6, 2),
    "decoder/layers_0/self_attention/value/kernel": (6, 2),
    "decoder/layers_0/self_attention/out/kernel": (8, 6),
    "decoder/layers_0/pre_cross_attention_layer_norm/scale": (6,),
    "decoder/layers_0/encoder_decoder_attention/query/kernel": (6, 8),
    "decoder/layers_0/encoder_decoder_attention/key/kernel": (6, 2),
    "decoder/layers_0/encoder_decoder_attention/value/kernel": (6, 2),
    "decoder/layers_0/encoder_decoder_attention/out/kernel": (8, 6),
    "decoder/layers_0/pre_mlp_layer_norm/scale": (6,),
    "decoder/layers_0/mlp/wi_0/kernel": (6, 5),
    "decoder/layers_0/mlp/wi_1/kernel": (6, 5),
    "decoder/layers_0/mlp/wo/kernel": (5, 6),
    "decoder/decoder_norm/scale": (6,),
    "decoder/logits_dense/kernel": (6, 11),
}


def _config(**changes) -> T5Config:
    base = dict(vocab_size=11, emb_dim=6, num_heads=4, head_dim=2, mlp_dim=5, num_encoder_layers=1,
                num_decoder_layers=1, num_kv_heads=1, encoder_num_kv_heads=2)
    return T5Config(**{**base, **changes})


def test_param_shapes_is_the_t5x_tree_in_t5x_order():
    shapes = param_tree.param_shapes(_config())
    assert list(shapes.items()) == list(T5X_TREE.items())


def test_param_shapes_orders_layers_numerically_and_follows_the_config():
    config = _config(num_encoder_layers=0, num_decoder_layers=12, mlp_activations=("relu",),
                     logits_via_embedding=True)
    paths = list(param_tree.param_shapes(config))
    layer_order = [int(p.split("/")[1][len("layers_"):]) for p in paths if p.startswith("decoder/layers_")]
    assert layer_order == sorted(layer_order) and layer_order[-1] == 11
    assert "decoder/layers_11/mlp/wi/kernel" in paths
    assert "decoder/logits_dense/kernel" not in paths
    assert not any(p.startswith("encoder/layers_") for p in paths)


def test_param_shapes_returns_a_fresh_dict_per_call():
    shapes = param_tree.param_shapes(_config())
    shapes.clear()
    assert param_tree.param_shapes(_config()) == T5X_TREE


def test_module_name_constants_name_the_networks_attention_modules():
    shapes = param_tree.param_shapes(_config())
    owners = {(p.split("/")[0], p.split("/")[2]) for p in shapes if p.endswith("/query/kernel")}
    assert owners == {
        ("encoder", param_tree.ENCODER_ATTENTION),
        ("decoder", param_tree.DECODER_SELF_ATTENTION),
        ("decoder", param_tree.DECODER_CROSS_ATTENTION),
    }
    module = "decoder/layers_0/" + param_tree.DECODER_SELF_ATTENTION
    assert [p.split("/")[-2] for p in shapes if p.startswith(module + "/")] == list(param_tree.ATTENTION_PROJECTIONS)


def test_is_cross_attention_picks_the_encoder_decoder_caches_and_kernels():
    config = _config()
    model = network.Transformer(config)
    params = param_tree.abstract_params(config)
    encoded = jax.ShapeDtypeStruct((2, 3, config.emb_dim), jnp.float32)
    _, variables = jax.eval_shape(  # shapes only: nothing is computed
        lambda p, e: model.apply({"params": p}, e, 4, method=network.Transformer.init_decode_cache,
                                 mutable=["cache"]), params, encoded)
    cache = param_tree.flatten(variables["cache"])
    cross = {p for p in cache if param_tree.is_cross_attention(p)}
    assert cross == {"decoder/layers_0/encoder_decoder_attention/cached_key",
                     "decoder/layers_0/encoder_decoder_attention/cached_value"}
    # The decode layout: keys [batch, kv_heads, head_dim, enc_len], values [batch, kv_heads, enc_len, head_dim].
    assert cache["decoder/layers_0/encoder_decoder_attention/cached_key"].shape == (2, 1, 2, 3)
    assert cache["decoder/layers_0/encoder_decoder_attention/cached_value"].shape == (2, 1, 3, 2)
    kernels = [p for p in T5X_TREE if param_tree.is_cross_attention(p)]
    assert len(kernels) == 4 and all("/encoder_decoder_attention/" in p for p in kernels)


def test_attention_projection_names_attention_kernels_only():
    projections = {p: param_tree.attention_projection(p) for p in T5X_TREE}
    assert projections["decoder/layers_0/encoder_decoder_attention/value/kernel"] == "value"
    assert projections["encoder/layers_0/attention/query/kernel"] == "query"
    assert projections["decoder/layers_0/mlp/wo/kernel"] is None
    assert sum(v is not None for v in projections.values()) == 12  # 3 attention modules x 4


def test_keypath_str_joins_tree_paths_like_flatten():
    tree = {"a": {"b": np.zeros(1), "c": [np.zeros(1)]}}
    paths = [param_tree.keypath_str(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(tree)]
    assert paths == ["a/b", "a/c/0"]
