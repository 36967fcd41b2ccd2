"""Decode-layout attention: equal to the reference attention core, prefix-only reads, shared beams."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x.model import attention
from gqa_t5x.model import decode_attention

HEADS, HEAD_DIM = 4, 3


def _kv(rng, batch: int, length: int, kv_heads: int):
    """Keys and values `[batch, length, kv_heads, head_dim]` (the training layout)."""
    shape = (batch, length, kv_heads, HEAD_DIM)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def _to_cache(key, value):
    return decode_attention.key_to_cache_layout(key), decode_attention.value_to_cache_layout(value)


def test_cache_layout_is_kv_heads_then_head_dim_by_length_for_keys_and_length_by_head_dim_for_values():
    key = np.arange(2 * 5 * 3 * 4).reshape(2, 5, 3, 4)  # [batch, length, kv_heads, head_dim]
    cached_key, cached_value = _to_cache(key, key)
    assert cached_key.shape == (2, 3, 4, 5) and cached_value.shape == (2, 3, 5, 4)
    assert cached_key[1, 2, 3, 4] == key[1, 4, 2, 3]
    assert cached_value[1, 2, 4, 3] == key[1, 4, 2, 3]


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["MHA", "GQA-2", "MQA"])
@pytest.mark.parametrize("with_bias,with_mask", [(False, False), (True, False), (False, True), (True, True)])
def test_cached_attention_equals_the_attention_core_on_the_same_keys_and_values(kv_heads, with_bias, with_mask):
    rng = np.random.default_rng(0)
    batch, q_len, length = 3, 2, 7
    query = rng.standard_normal((batch, q_len, HEADS, HEAD_DIM)).astype(np.float32)
    key, value = _kv(rng, batch, length, kv_heads)
    bias = rng.standard_normal((1, HEADS, q_len, length)).astype(np.float32) if with_bias else None
    mask = None
    if with_mask:
        mask = np.ones((batch, 1, q_len, length), np.float32)
        mask[1, :, :, 5:] = 0  # padding keys of the second row
        mask[2, :, 0, 2:] = 0
    expected = attention.grouped_dot_product_attention(query, key, value, bias, mask)
    ours = decode_attention.cached_attention(query, *_to_cache(key, value), bias, mask)
    assert ours.shape == (batch, q_len, HEADS, HEAD_DIM)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), atol=2e-6)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["MHA", "GQA-2", "MQA"])
def test_beams_sharing_a_cache_row_equal_attention_over_the_row_repeated_per_beam(kv_heads):
    rng = np.random.default_rng(1)
    examples, beams, length = 2, 3, 6
    query = rng.standard_normal((examples * beams, 1, HEADS, HEAD_DIM)).astype(np.float32)
    key, value = _kv(rng, examples, length, kv_heads)
    mask = np.ones((examples * beams, 1, 1, length), np.float32)
    mask[beams:, :, :, 4:] = 0  # the second example's input is padded
    shared = decode_attention.cached_attention(query, *_to_cache(key, value), None, mask)
    repeated = decode_attention.cached_attention(
        query, *_to_cache(np.repeat(key, beams, 0), np.repeat(value, beams, 0)), None, mask)
    reference = attention.grouped_dot_product_attention(
        query, np.repeat(key, beams, 0), np.repeat(value, beams, 0), None, mask)
    np.testing.assert_allclose(np.asarray(shared), np.asarray(repeated), atol=1e-6)
    np.testing.assert_allclose(np.asarray(shared), np.asarray(reference), atol=2e-6)


def test_cache_blocks_are_at_most_the_block_size_and_cover_the_length_with_under_one_block_spare():
    assert decode_attention.cache_blocks(128, 32) == (32, 4)
    assert decode_attention.cache_blocks(100, 32) == (25, 4)
    assert decode_attention.cache_blocks(33, 32) == (17, 2)
    assert decode_attention.cache_blocks(5, 32) == (5, 1)
    for length in range(1, 300):
        size, count = decode_attention.cache_blocks(length, 32)
        assert size <= 32 and length <= size * count < length + count
        # A cache's own length gives back its blocks (the step re-derives them).
        assert decode_attention.cache_blocks(size * count, 32) == (size, count)
    with pytest.raises(ValueError, match="must both be >= 1"):
        decode_attention.cache_blocks(0)


def _masked_reference(query, key, value, bias, index):
    """The full-cache attention with positions after `index` masked (the old decode step)."""
    length = key.shape[1]
    mask = (np.arange(length) <= index)[None, None, None, :].astype(np.float32)
    return attention.grouped_dot_product_attention(query, key, value, bias, mask)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["MHA", "GQA-2", "MQA"])
@pytest.mark.parametrize("block_size", [1, 4, 12])
def test_blockwise_prefix_attention_equals_the_masked_full_cache_attention(kv_heads, block_size):
    rng = np.random.default_rng(2)
    batch, length = 2, 12
    query = rng.standard_normal((batch, 1, HEADS, HEAD_DIM)).astype(np.float32)
    key, value = _kv(rng, batch, length, kv_heads)
    key[0] *= 4.0  # large logits: the online softmax must rescale its running sums
    bias = rng.standard_normal((1, HEADS, 1, length)).astype(np.float32)
    cached_key, cached_value = _to_cache(key, value)
    prefix = jax.jit(decode_attention.prefix_attention, static_argnames=("block_size",))
    for index in range(length):  # first position, block boundaries, last position
        ours = prefix(query, cached_key, cached_value, bias, jnp.int32(index), block_size=block_size)
        expected = _masked_reference(query, key, value, bias, index)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), atol=2e-6, err_msg=f"index {index}")


def test_prefix_attention_never_reads_the_blocks_after_the_current_one():
    rng = np.random.default_rng(3)
    batch, length, block_size = 2, 16, 4
    query = rng.standard_normal((batch, 1, HEADS, HEAD_DIM)).astype(np.float32)
    key, value = _kv(rng, batch, length, 2)
    for index in (0, 3, 5, 10):
        first_unread = (index // block_size + 1) * block_size
        poisoned_key, poisoned_value = key.copy(), value.copy()
        poisoned_key[:, first_unread:] = np.nan  # any read of these would make the output NaN
        poisoned_value[:, first_unread:] = np.nan
        ours = decode_attention.prefix_attention(
            query, *_to_cache(poisoned_key, poisoned_value), None, jnp.int32(index), block_size=block_size)
        assert np.isfinite(np.asarray(ours)).all(), index
        np.testing.assert_allclose(np.asarray(ours), np.asarray(_masked_reference(query, key, value, None, index)),
                                   atol=2e-6)
    # The check can fail: NaN inside the block being read does reach the output.
    poisoned_value = value.copy()
    poisoned_value[:, 0] = np.nan
    out = decode_attention.prefix_attention(query, *_to_cache(key, poisoned_value), None, jnp.int32(1),
                                            block_size=block_size)
    assert np.isnan(np.asarray(out)).any()


def test_prefix_attention_rejects_a_cache_that_is_not_whole_blocks_and_several_queries():
    rng = np.random.default_rng(4)
    key, value = _to_cache(*_kv(rng, 1, 10, 2))
    query = np.zeros((1, 1, HEADS, HEAD_DIM), np.float32)
    with pytest.raises(ValueError, match="not a multiple of block_size=4"):
        decode_attention.prefix_attention(query, key, value, None, jnp.int32(0), block_size=4)
    with pytest.raises(ValueError, match="one query per row"):
        decode_attention.prefix_attention(np.zeros((1, 2, HEADS, HEAD_DIM), np.float32), key, value, None,
                                          jnp.int32(0), block_size=5)


def test_cached_attention_names_a_cache_in_the_wrong_layout():
    rng = np.random.default_rng(5)
    key, value = _kv(rng, 2, 6, 2)  # training layout, not the decode layout
    query = np.zeros((2, 1, HEADS, HEAD_DIM), np.float32)
    with pytest.raises(ValueError, match="the decode layout"):
        decode_attention.cached_attention(query, key, value)
