"""Single-query attention over the decoding cache: its layout, prefix blocks, shared beams.

A decode step attends from one query position per sequence to a cache of
keys/values. The step is memory-bound, so this module is about how the cache
is stored and read:

* **Layout.** Keys are cached as `[batch, kv_heads, head_dim, length]` (T5X's
  decode layout on TPU, where length is the minor dimension) and values as
  `[batch, kv_heads, length, head_dim]`. Each contraction is then a plain
  matrix product per (batch, kv head) with its operand row-major in the
  contracted dimension's natural order: logits `[group, head_dim] x [head_dim,
  length]`, output `[group, length] x [length, head_dim]`. On XLA:CPU this
  pair ran the single-query contractions 3-8x faster than the training layout
  `[batch, length, kv_heads, head_dim]` and 1-5x faster than keys and values
  both in either layout (`scripts/microbench_decode.py`, docs/bench_micro.md).
* **Prefix blocks.** Self-attention at step `i` needs positions `0..i` only.
  `prefix_attention` loops (a `lax.fori_loop` with a traced trip count,
  inside the decoding `while_loop`) over fixed-size blocks of the cache up to
  the one holding position `i`, combining blocks with an online softmax (the
  flash-decoding recurrence), so a step reads about `i + block` positions
  instead of the whole `max_length`.
* **Shared rows (beams).** `cached_attention` lets several query rows share
  one cache row: with `beam_size` beams per example the encoder-decoder
  keys/values are stored once per example and the beams' queries are folded
  into the query axis of that example (read once per step for all beams,
  never copied or gathered).

Both functions compute what `attention.grouped_dot_product_attention` computes
over the same keys/values (tests/model/test_decode_attention.py checks them
against it): float32 logits and softmax, no 1/sqrt(head_dim) scaling (T5).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

# Additive logit of a masked position (as in attention.py).
MASK_VALUE = -1e10
# Running maximum before any block (finite, so exp(m_old - m_new) is 0, never NaN).
_INITIAL_MAX = -1e30
# Positions per self-attention block. 32 keeps the prefix over-read under 32
# positions and a block of a batch-16 MHA layer (K + V, 16 heads x 64) at
# 4 MiB, while the per-block loop overhead stays below ~2% of a step
# (docs/bench_micro.md, "prefix blocks").
DEFAULT_BLOCK = 32


def key_to_cache_layout(key: Array) -> Array:
    """`[batch, length, kv_heads, head_dim]` -> `[batch, kv_heads, head_dim, length]`."""
    return jnp.transpose(key, (0, 2, 3, 1))


def value_to_cache_layout(value: Array) -> Array:
    """`[batch, length, kv_heads, head_dim]` -> `[batch, kv_heads, length, head_dim]`."""
    return jnp.transpose(value, (0, 2, 1, 3))


def cache_blocks(max_length: int, block: int = DEFAULT_BLOCK) -> tuple[int, int]:
    """Block size and block count of a self-attention cache for `max_length` steps.

    The cache is `num_blocks * block_size` long: the fewest blocks of at most
    `block` positions, as equal as possible, so it over-allocates fewer than
    `num_blocks` positions.

    Args:
      max_length: Decoding steps the cache must hold (> 0).
      block: Largest block size (> 0).

    Returns:
      `(block_size, num_blocks)`.
    """
    if max_length < 1 or block < 1:
        raise ValueError(
            f"max_length={max_length} and block={block} must both be >= 1."
        )
    num_blocks = math.ceil(max_length / block)
    return math.ceil(max_length / num_blocks), num_blocks


def _grouped_query(query: Array, kv_heads: int, rows_per_cache_row: int) -> Array:
    """`[batch, q, heads, d]` -> `[cache_batch, kv_heads, rows * q * group, d]`.

    Query row `n` belongs to cache row `n // rows_per_cache_row`; the query
    positions of all rows sharing a cache row, and the heads of each kv
    head's group, become one query axis.
    """
    batch, q_len, heads, head_dim = query.shape
    group = heads // kv_heads
    cache_batch = batch // rows_per_cache_row
    query = query.reshape(cache_batch, rows_per_cache_row, q_len, kv_heads, group, head_dim)
    query = jnp.transpose(query, (0, 3, 1, 2, 4, 5))  # [B, g, rows, q, group, d]
    return query.reshape(cache_batch, kv_heads, rows_per_cache_row * q_len * group, head_dim)


def _ungrouped_output(out: Array, batch: int, q_len: int, heads: int) -> Array:
    """Inverse of `_grouped_query` for the attention output."""
    cache_batch, kv_heads, _, head_dim = out.shape
    rows = batch // cache_batch
    out = out.reshape(cache_batch, kv_heads, rows, q_len, heads // kv_heads, head_dim)
    out = jnp.transpose(out, (0, 2, 3, 1, 4, 5))  # [B, rows, q, g, group, d]
    return out.reshape(batch, q_len, heads, head_dim)


def _grouped_logit_term(term: Array, kv_heads: int, heads: int, rows_per_cache_row: int) -> Array:
    """A bias or mask `[batch or 1, heads or 1, q, k]` in the grouped query order.

    Returns:
      `[cache_batch or 1, kv_heads or 1, rows * q * group, k]`, broadcastable
      to the logits `[cache_batch, kv_heads, rows * q * group, k]`.
    """
    t_batch, t_heads, q_len, k_len = term.shape
    group = heads // kv_heads
    rows = rows_per_cache_row
    b_split = (1, 1) if t_batch == 1 else (t_batch // rows, rows)
    h_split = (1, 1) if t_heads == 1 else (kv_heads, group)
    term = term.reshape(*b_split, *h_split, q_len, k_len)  # [B, rows, g, group, q, k]
    term = jnp.transpose(term, (0, 2, 1, 4, 3, 5))  # [B, g, rows, q, group, k]
    term = jnp.broadcast_to(term, (b_split[0], h_split[0], rows, q_len, group, k_len))
    return term.reshape(b_split[0], h_split[0], rows * q_len * group, k_len)


def cached_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    dtype: Any = jnp.float32,
) -> Array:
    """Attention of a few query positions over a whole cache in the decode layout.

    Rows of `query` may share cache rows: with `query.shape[0] ==
    key.shape[0] * rows`, query row `n` reads cache row `n // rows` (beam
    search's `rows = beam_size` beams of one example share the
    encoder-decoder keys/values). Einsum letters: b = cache batch, g = kv
    heads, r = rows x query positions x group, d = head dim, k = length.

        logits [b, g, r, k] = einsum('bgrd,bgdk->bgrk', query, key)
        output [b, g, r, d] = einsum('bgrk,bgkd->bgrd', weights, value)

    Args:
      query: `[batch, q_len, heads, head_dim]`.
      key: `[cache_batch, kv_heads, head_dim, length]`; cache_batch divides
        batch and kv_heads divides heads.
      value: `[cache_batch, kv_heads, length, head_dim]`.
      bias: Additive, `[batch or 1, heads or 1, q_len, length]`.
      mask: `[batch or 1, heads or 1, q_len, length]`, > 0 = attend.
      dtype: Dtype of the weights and the output (logits are float32).

    Returns:
      `[batch, q_len, heads, head_dim]`.
    """
    batch, q_len, heads, head_dim = query.shape
    cache_batch, kv_heads, key_dim, length = key.shape
    if key_dim != head_dim or value.shape != (cache_batch, kv_heads, length, head_dim):
        raise ValueError(
            f"key must be [cache_batch, kv_heads, {head_dim}, length] and value "
            f"[cache_batch, kv_heads, length, {head_dim}] (the decode layout); got key "
            f"{key.shape}, value {value.shape}."
        )
    if heads % kv_heads or batch % cache_batch:
        raise ValueError(
            f"query {query.shape} does not fit the cache {key.shape}: kv_heads must divide "
            "heads and the cache batch must divide the query batch."
        )
    rows = batch // cache_batch
    grouped = _grouped_query(query.astype(jnp.float32), kv_heads, rows)
    logits = jnp.einsum("bgrd,bgdk->bgrk", grouped, key.astype(jnp.float32))
    if mask is not None:
        mask_bias = jnp.where(mask > 0, 0.0, MASK_VALUE).astype(jnp.float32)
        bias = mask_bias if bias is None else bias + mask_bias
    if bias is not None:
        logits = logits + _grouped_logit_term(bias.astype(jnp.float32), kv_heads, heads, rows)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("bgrk,bgkd->bgrd", weights, value.astype(dtype))
    return _ungrouped_output(out, batch, q_len, heads)


def prefix_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None,
    index: Array,
    *,
    block_size: int,
    dtype: Any = jnp.float32,
) -> Array:
    """One query per row over cache positions `0..index`, block by block.

    Loops over the cache's blocks `0..index // block_size` (a traced trip
    count) and merges them with an online softmax: per block, logits `s`,
    running maximum `m' = max(m, max s)`, sum `l' = l e^(m - m') + sum
    e^(s - m')` and output `o' = o e^(m - m') + e^(s - m') V`; the result is
    `o / l`. Blocks past the one holding `index` are never read.

    Args:
      query: `[batch, 1, heads, head_dim]`.
      key: `[batch, kv_heads, head_dim, length]`, length a multiple of
        block_size.
      value: `[batch, kv_heads, length, head_dim]`.
      bias: Additive, `[batch or 1, heads, 1, length]` (T5's relative
        position bias of this step) or None.
      index: Scalar int, the position of the query (the last written one).
      block_size: Positions per block.
      dtype: Dtype of the weights and the output (statistics are float32).

    Returns:
      `[batch, 1, heads, head_dim]`.
    """
    batch, q_len, heads, head_dim = query.shape
    _, kv_heads, _, length = key.shape
    if q_len != 1:
        raise ValueError(f"prefix_attention takes one query per row; got query {query.shape}.")
    if length % block_size:
        raise ValueError(
            f"The cache length {length} is not a multiple of block_size={block_size}; "
            "size the cache with decode_attention.cache_blocks."
        )
    group = heads // kv_heads
    grouped = _grouped_query(query.astype(jnp.float32), kv_heads, 1)  # [b, g, group, d]
    if bias is not None:
        bias = _grouped_logit_term(bias.astype(jnp.float32), kv_heads, heads, 1)  # [b or 1, g, group, k]
    offsets = jnp.arange(block_size, dtype=jnp.int32)

    def block(i, carry):
        running_max, running_sum, acc = carry
        start = i * block_size
        k = jax.lax.dynamic_slice_in_dim(key, start, block_size, axis=3)  # [b, g, d, blk]
        v = jax.lax.dynamic_slice_in_dim(value, start, block_size, axis=2)  # [b, g, blk, d]
        logits = jnp.einsum("bgrd,bgdk->bgrk", grouped, k.astype(jnp.float32))  # [b, g, group, blk]
        if bias is not None:
            logits = logits + jax.lax.dynamic_slice_in_dim(bias, start, block_size, axis=3)
        logits = jnp.where(start + offsets <= index, logits, MASK_VALUE)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))  # [b, g, group]
        correction = jnp.exp(running_max - new_max)
        probs = jnp.exp(logits - new_max[..., None])
        running_sum = running_sum * correction + jnp.sum(probs, axis=-1)
        acc = acc * correction[..., None] + jnp.einsum(
            "bgrk,bgkd->bgrd", probs.astype(dtype), v.astype(dtype)
        ).astype(jnp.float32)
        return new_max, running_sum, acc

    init = (
        jnp.full((batch, kv_heads, group), _INITIAL_MAX, jnp.float32),
        jnp.zeros((batch, kv_heads, group), jnp.float32),
        jnp.zeros((batch, kv_heads, group, head_dim), jnp.float32),
    )
    num_blocks = index // block_size + 1
    _, running_sum, acc = jax.lax.fori_loop(0, num_blocks, block, init)
    out = (acc / running_sum[..., None]).astype(dtype)  # [b, g, group, d]
    return _ungrouped_output(out, batch, 1, heads)
