"""Decode-layout attention: equal to the reference attention core, prefix-only reads, shared beams."""

from __future__ import annotations

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


@pytest.mark.parametrize("kv_heads", [pytest.param(4, marks=pytest.mark.slow), 2, pytest.param(1, marks=pytest.mark.slow)],
                         ids=["MHA", "GQA-2", "MQA"])
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


def test_segments_end_at_the_length_are_equal_and_at_least_the_minimum_and_at_most_the_cap():
    assert decode_attention.self_attention_segments(128) == (32, 64, 96, 128)
    assert decode_attention.self_attention_segments(512) == (64, 128, 192, 256, 320, 384, 448, 512)
    assert decode_attention.self_attention_segments(14) == (14,)
    assert decode_attention.self_attention_segments(100, 32, 8) == (34, 68, 100)
    for length in range(1, 600, 7):
        ends = decode_attention.self_attention_segments(length)
        assert ends[-1] == length and list(ends) == sorted(set(ends)) and len(ends) <= 8
        sizes = np.diff((0,) + ends)
        assert sizes.max() - sizes[:-1].min(initial=sizes.max()) <= 0 and (len(ends) == 1 or sizes[0] >= 32)
    with pytest.raises(ValueError, match="must all be >= 1"):
        decode_attention.self_attention_segments(0)


def _masked_reference(query, key, value, bias, index):
    """The full-cache attention with positions after `index` masked (the old decode step)."""
    length = key.shape[1]
    mask = (np.arange(length) <= index)[None, None, None, :].astype(np.float32)
    return attention.grouped_dot_product_attention(query, key, value, bias, mask)


@pytest.mark.slow  # decoding through written prefixes stays fast: tests/model/test_decoding.py
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["MHA", "GQA-2", "MQA"])
def test_reading_only_the_written_prefix_equals_the_masked_full_cache_attention(kv_heads):
    rng = np.random.default_rng(2)
    batch, length = 2, 8
    query = rng.standard_normal((batch, 1, HEADS, HEAD_DIM)).astype(np.float32)
    key, value = _kv(rng, batch, length, kv_heads)
    key[0] *= 4.0  # large logits
    bias = rng.standard_normal((1, HEADS, 1, length)).astype(np.float32)
    for index in range(length):
        # Segments ending exactly at the step, two steps after it, and at the end of the cache.
        for prefix in sorted({index + 1, min(length, index + 3), length}):
            mask = (np.arange(prefix) <= index)[None, None, None, :]
            ours = decode_attention.cached_attention(
                query, *_to_cache(key[:, :prefix], value[:, :prefix]), bias[..., :prefix], mask)
            np.testing.assert_allclose(np.asarray(ours), np.asarray(_masked_reference(query, key, value, bias, index)),
                                       atol=2e-6, err_msg=f"index {index}, prefix {prefix}")


def test_cached_attention_names_a_cache_in_the_wrong_layout():
    rng = np.random.default_rng(5)
    key, value = _kv(rng, 2, 6, 2)  # training layout, not the decode layout
    query = np.zeros((2, 1, HEADS, HEAD_DIM), np.float32)
    with pytest.raises(ValueError, match="the decode layout"):
        decode_attention.cached_attention(query, key, value)
