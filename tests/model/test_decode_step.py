"""The cached decoding step and the cache operations around the step loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x.model import decode_step
from gqa_t5x.model import decoding
from gqa_t5x.model import initialization
from gqa_t5x.model import network
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config

VOCAB = 48
MAX_LEN = 14


def _config(num_kv_heads: int) -> T5Config:
    return T5Config(
        vocab_size=VOCAB, dtype="float32", emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
        num_encoder_layers=1, num_decoder_layers=2, dropout_rate=0.0, num_kv_heads=num_kv_heads,
    )


def test_resizing_the_self_attention_cache_keeps_written_positions_and_the_cross_cache():
    config = _config(2)
    model = network.Transformer(config)
    encoded = jnp.ones((3, 5, 32), jnp.float32)
    _, variables = model.apply({"params": initialization.init_params(config)}, encoded, 6,
                               method=network.Transformer.init_decode_cache, mutable=["cache"])
    cache = jax.tree_util.tree_map(lambda x: x + 1.0 if x.ndim == 4 else x, variables["cache"])
    short = param_tree.flatten(decode_step.resize_self_cache(cache, 4))
    longer = param_tree.flatten(decode_step.resize_self_cache(cache, 9))
    flat = param_tree.flatten(cache)
    key, value = "decoder/layers_0/self_attention/cached_key", "decoder/layers_0/self_attention/cached_value"
    assert short[key].shape == (3, 2, 8, 4) and short[value].shape == (3, 2, 4, 8)
    np.testing.assert_array_equal(np.asarray(short[key]), np.asarray(flat[key])[..., :4])
    np.testing.assert_array_equal(np.asarray(longer[value])[:, :, :6], np.asarray(flat[value]))
    assert not np.asarray(longer[value])[:, :, 6:].any()
    np.testing.assert_array_equal(np.asarray(longer["decoder/key_positions"]), np.arange(9))
    cross = "decoder/layers_0/encoder_decoder_attention/cached_key"
    assert short[cross] is flat[cross] and longer[cross].shape == (3, 2, 8, 5)


def test_decode_steps_over_transposed_kernels_equal_steps_over_the_params():
    config = _config(2)
    params = initialization.init_params(config, seed=3)
    enc = np.random.default_rng(0).integers(2, VOCAB, size=(6, 10)).astype(np.int32)
    enc[1, 6:] = 0
    kernels = decode_step.decode_kernels(params)
    flat = param_tree.flatten(kernels)
    assert flat["decoder/logits_dense/kernel"].shape == (VOCAB, 32)  # [out, in]
    assert flat["decoder/layers_1/mlp/wi_0/kernel"].shape == (48, 32)
    # The encoder-decoder key/value kernels only build the cache; the encoder has no steps.
    assert not any(k.endswith(("encoder_decoder_attention/key/kernel", "encoder_decoder_attention/value/kernel"))
                   or k.startswith("encoder/") for k in flat)
    net = network.Transformer(config)
    fns = decoding.compile_decoding(config, decoding.DecodingSpec(max_decode_length=MAX_LEN))
    cache, _ = fns.init_cache(params, fns.encode(params, enc), enc)
    plain_step = jax.jit(decode_step.step_fn(net, params, jnp.asarray(enc)))
    kernel_step = jax.jit(decode_step.step_fn(net, params, jnp.asarray(enc), kernels))
    plain_cache, kernel_cache = cache, cache
    tokens = jnp.zeros((enc.shape[0],), jnp.int32)
    for _ in range(4):
        plain, plain_cache = plain_step(plain_cache, tokens)
        transposed, kernel_cache = kernel_step(kernel_cache, tokens)
        np.testing.assert_allclose(np.asarray(transposed), np.asarray(plain), atol=1e-5)
        tokens = jnp.argmax(plain, -1).astype(jnp.int32)


def test_beam_reordering_gathers_self_attention_caches_and_shares_cross_attention_ones():
    config = _config(2)
    model = network.Transformer(config)
    encoded = jnp.arange(3 * 5 * 32, dtype=jnp.float32).reshape(3, 5, 32) / 100.0  # rows differ
    _, variables = model.apply({"params": initialization.init_params(config)}, encoded, 4,
                               method=network.Transformer.init_decode_cache, mutable=["cache"])
    cache = jax.tree_util.tree_map(lambda x: x + 1.0 if x.ndim == 4 else x, variables["cache"])
    cache["decoder"]["layers_0"]["self_attention"]["cached_key"] *= jnp.arange(1.0, 4.0)[:, None, None, None]
    order = jnp.array([2, 0, 1])
    gathered = param_tree.flatten(decode_step.gather_beams(cache, order))
    for path, leaf in param_tree.flatten(cache).items():
        if param_tree.is_cross_attention(path) or leaf.ndim < 2:
            np.testing.assert_array_equal(np.asarray(gathered[path]), np.asarray(leaf), err_msg=path)
        else:
            np.testing.assert_array_equal(np.asarray(gathered[path]), np.asarray(leaf)[np.asarray(order)], err_msg=path)
    cross = "decoder/layers_0/encoder_decoder_attention/cached_key"
    assert not np.array_equal(np.asarray(gathered[cross]), np.asarray(gathered[cross])[np.asarray(order)])
