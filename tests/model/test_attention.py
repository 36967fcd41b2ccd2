"""The grouped attention core against numpy, and the attention module built on it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x.model import attention

HEADS, HEAD_DIM, BATCH, Q_LEN, KV_LEN = 4, 3, 2, 5, 6


def _numpy_attention(query, key, value, bias, mask):
    """Multi-head attention with every key/value head repeated over its query group."""
    group = query.shape[2] // key.shape[2]
    key = np.repeat(key, group, axis=2).astype(np.float64)  # [b, k, heads, d]
    value = np.repeat(value, group, axis=2).astype(np.float64)
    logits = np.einsum("bqhd,bkhd->bhqk", query.astype(np.float64), key)
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = np.where(mask > 0, logits, -1e10)
    logits = logits - logits.max(-1, keepdims=True)
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, value)  # [b, q, heads, d]


def _inputs(kv_heads: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    query = rng.standard_normal((BATCH, Q_LEN, HEADS, HEAD_DIM)).astype(np.float32)
    key = rng.standard_normal((BATCH, KV_LEN, kv_heads, HEAD_DIM)).astype(np.float32)
    value = rng.standard_normal((BATCH, KV_LEN, kv_heads, HEAD_DIM)).astype(np.float32)
    bias = rng.standard_normal((1, HEADS, Q_LEN, KV_LEN)).astype(np.float32)
    mask = np.ones((BATCH, 1, Q_LEN, KV_LEN), np.float32)
    mask[1, :, :, 4:] = 0  # the second example's last two keys are padding
    mask[0, :, 0, 1:] = 0  # and its first query sees one key only
    return query, key, value, bias, mask


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["MHA", "GQA-2", "MQA"])
@pytest.mark.parametrize("with_bias,with_mask", [(False, False), (True, False), (False, True), (True, True)])
def test_grouped_attention_equals_multi_head_attention_on_repeated_key_value_heads(kv_heads, with_bias, with_mask):
    query, key, value, bias, mask = _inputs(kv_heads)
    bias = bias if with_bias else None
    mask = mask if with_mask else None
    ours = attention.grouped_dot_product_attention(query, key, value, bias, mask)
    assert ours.shape == (BATCH, Q_LEN, HEADS, HEAD_DIM)
    np.testing.assert_allclose(np.asarray(ours), _numpy_attention(query, key, value, bias, mask), atol=1e-5)


def test_query_head_h_reads_key_value_head_h_over_group_size():
    query, key, value, _, _ = _inputs(kv_heads=2)
    value = np.zeros_like(value)
    value[:, :, 1] = 1.0  # only the second key/value head carries a signal
    out = np.asarray(attention.grouped_dot_product_attention(query, key, value))
    np.testing.assert_allclose(out[:, :, :2], 0.0)  # heads 0, 1 read kv head 0
    np.testing.assert_allclose(out[:, :, 2:], 1.0, atol=1e-6)  # heads 2, 3 read kv head 1


def test_dropout_needs_a_key_and_is_reproducible_with_one():
    query, key, value, _, _ = _inputs(kv_heads=2)
    plain = attention.grouped_dot_product_attention(query, key, value, dropout_rate=0.5)
    ignored = attention.grouped_dot_product_attention(
        query, key, value, dropout_rate=0.5, dropout_rng=jax.random.PRNGKey(0), deterministic=True
    )
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(ignored))
    dropped = [
        attention.grouped_dot_product_attention(
            query, key, value, dropout_rate=0.5, dropout_rng=jax.random.PRNGKey(seed), deterministic=False
        )
        for seed in (0, 0, 1)
    ]
    np.testing.assert_array_equal(np.asarray(dropped[0]), np.asarray(dropped[1]))
    assert np.abs(np.asarray(dropped[0]) - np.asarray(dropped[2])).max() > 1e-3
    assert np.abs(np.asarray(dropped[0]) - np.asarray(plain)).max() > 1e-3
    with pytest.raises(ValueError, match="needs a dropout_rng"):
        attention.grouped_dot_product_attention(query, key, value, dropout_rate=0.5, deterministic=False)


@pytest.mark.parametrize("kv_heads", [pytest.param(4, marks=pytest.mark.slow), 2, pytest.param(1, marks=pytest.mark.slow)],
                         ids=["MHA", "GQA-2", "MQA"])
@pytest.mark.parametrize("with_bias,with_mask", [(False, False), (True, False), (False, True), (True, True)])
def test_fused_kernel_path_equals_the_einsum_path(kv_heads, with_bias, with_mask):
    query, key, value, bias, mask = _inputs(kv_heads, seed=3)
    bias = bias if with_bias else None
    mask = mask if with_mask else None
    fused = attention.dot_product_attention(query, key, value, bias, mask)
    einsum = attention.grouped_dot_product_attention(query, key, value, bias, mask)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(einsum), atol=1e-6)
    # And their gradients (training runs the fused path without dropout).
    grads = [jax.grad(lambda q, k, v, b: jnp.sum(fn(q, k, v, b, mask) ** 2), argnums=(0, 1, 2, 3))(
        query, key, value, np.zeros_like(_inputs(kv_heads)[3]) if bias is None else bias)
        for fn in (attention.dot_product_attention, attention.grouped_dot_product_attention)]
    for fused_grad, einsum_grad in zip(*grads):
        np.testing.assert_allclose(np.asarray(fused_grad), np.asarray(einsum_grad), atol=1e-5)


def test_fully_masked_query_rows_match_between_fused_and_einsum_paths():
    query, key, value, bias, mask = _inputs(kv_heads=2, seed=4)
    mask[0, :, 2] = 0  # a query that may see nothing (a padding position)
    fused = attention.dot_product_attention(query, key, value, bias, mask)
    einsum = attention.grouped_dot_product_attention(query, key, value, bias, mask)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(einsum), atol=1e-6)


def test_fused_path_hands_dropout_and_16_bit_logits_to_the_einsums():
    query, key, value, bias, mask = _inputs(kv_heads=2, seed=5)
    rng = jax.random.PRNGKey(3)
    dropped = attention.dot_product_attention(query, key, value, bias, mask, dropout_rate=0.5,
                                              dropout_rng=rng, deterministic=False)
    expected = attention.grouped_dot_product_attention(query, key, value, bias, mask, dropout_rate=0.5,
                                                       dropout_rng=rng, deterministic=False)
    np.testing.assert_array_equal(np.asarray(dropped), np.asarray(expected))
    low = attention.dot_product_attention(query, key, value, bias, mask, float32_logits=False, dtype=jnp.bfloat16)
    expected = attention.grouped_dot_product_attention(query, key, value, bias, mask, float32_logits=False,
                                                       dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(low, np.float32), np.asarray(expected, np.float32))
    assert attention.fused_implementation(jnp.float32) == "xla"


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8])  # Q_LEN = 5: blocks that divide it, that do not, one block
@pytest.mark.parametrize("with_bias,with_mask", [(True, True), (False, True), (True, False)])
def test_attention_in_query_blocks_equals_numpy_attention(chunk, with_bias, with_mask):
    query, key, value, bias, mask = _inputs(kv_heads=2, seed=6)
    bias = bias if with_bias else None
    mask = mask if with_mask else None
    out = attention.dot_product_attention(query, key, value, bias, mask, query_chunk=chunk)
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(query, key, value, bias, mask), atol=1e-5)


def test_attention_in_query_blocks_keeps_dropout_masks_and_gradients():
    """T5X's dropout is broadcast along queries: every block draws the whole attention's mask."""
    query, key, value, bias, mask = _inputs(kv_heads=2, seed=7)
    mask[0, :, 2] = 0  # a fully masked query row, cut by the blocks
    rng = jax.random.PRNGKey(5)

    def attend(chunk, q, k, v, b):
        return attention.dot_product_attention(q, k, v, b, mask, dropout_rate=0.4, dropout_rng=rng,
                                               deterministic=False, query_chunk=chunk)

    whole, blocks = attend(None, query, key, value, bias), attend(2, query, key, value, bias)
    np.testing.assert_allclose(np.asarray(blocks), np.asarray(whole), atol=1e-6)
    grads = [jax.grad(lambda *a, c=c: jnp.sum(jnp.sin(attend(c, *a))), argnums=(0, 1, 2, 3))(query, key, value, bias)
             for c in (None, 2)]
    for whole_grad, block_grad in zip(*grads):
        assert np.abs(np.asarray(whole_grad)).max() > 1e-3
        np.testing.assert_allclose(np.asarray(block_grad), np.asarray(whole_grad), atol=1e-5)


def test_attention_in_query_blocks_holds_one_blocks_logits():
    """XLA's buffer assignment: 1024 queries in blocks of 128 need a fraction of the temporaries."""
    b, q, h, d = 2, 1024, 8, 16
    args = (jax.ShapeDtypeStruct((b, q, h, d), jnp.float32), jax.ShapeDtypeStruct((b, q, 2, d), jnp.float32),
            jax.ShapeDtypeStruct((b, q, 2, d), jnp.float32), jax.ShapeDtypeStruct((1, h, q, q), jnp.float32))
    temp = {}
    for chunk in (None, 128):
        fn = jax.jit(lambda *a, c=chunk: attention.dot_product_attention(*a, query_chunk=c))
        temp[chunk] = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
    logits = b * h * q * q * 4  # 64 MiB
    assert temp[None] >= logits  # the whole square exists at once
    assert temp[128] <= logits / 2, temp


def test_shapes_that_cannot_be_grouped_are_rejected():
    query, key, value, _, _ = _inputs(kv_heads=4)
    with pytest.raises(ValueError, match="not a multiple of the 3 key/value heads"):
        attention.grouped_dot_product_attention(query, key[:, :, :3], value[:, :, :3])
    with pytest.raises(ValueError, match="key and value must both be"):
        attention.grouped_dot_product_attention(query, key, value[:, :, :2])
    with pytest.raises(ValueError, match="query must be"):
        attention.grouped_dot_product_attention(query[0], key, value)
    with pytest.raises(ValueError, match="not a multiple of the 3 key/value heads"):
        attention.dot_product_attention(query, key[:, :, :3], value[:, :, :3])


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["MHA", "GQA-2", "MQA"])
def test_attention_module_is_projections_around_the_pure_function(kv_heads):
    emb = 8
    module = attention.MultiHeadDotProductAttention(
        num_heads=HEADS, num_kv_heads=kv_heads, head_dim=HEAD_DIM, out_features=emb
    )
    rng = np.random.default_rng(1)
    inputs_q = jnp.asarray(rng.standard_normal((BATCH, Q_LEN, emb)), jnp.float32)
    inputs_kv = jnp.asarray(rng.standard_normal((BATCH, KV_LEN, emb)), jnp.float32)
    _, _, _, bias, mask = _inputs(kv_heads)
    params = module.init(jax.random.PRNGKey(0), inputs_q, inputs_kv, mask, bias)["params"]
    out = module.apply({"params": params}, inputs_q, inputs_kv, mask, bias)

    kernel = {name: np.asarray(params[name]["kernel"]) for name in ("query", "key", "value", "out")}
    query = (np.asarray(inputs_q) @ kernel["query"]).reshape(BATCH, Q_LEN, HEADS, HEAD_DIM)
    key = (np.asarray(inputs_kv) @ kernel["key"]).reshape(BATCH, KV_LEN, kv_heads, HEAD_DIM)
    value = (np.asarray(inputs_kv) @ kernel["value"]).reshape(BATCH, KV_LEN, kv_heads, HEAD_DIM)
    core = attention.grouped_dot_product_attention(query, key, value, bias, mask)
    expected = np.asarray(core).reshape(BATCH, Q_LEN, HEADS * HEAD_DIM) @ kernel["out"]
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
    assert kernel["key"].shape == (emb, kv_heads * HEAD_DIM)
