"""Single-query attention over the decoding cache: its layout, prefix-only reads, shared beams.

A decode step attends from one query position per sequence to a cache of
keys/values. The step is memory-bound, so this module is about how the cache
is stored and read:

* **Layout.** Keys are cached as `[batch, kv_heads, head_dim, length]` (T5X's
  decode layout on TPU, where length is the minor dimension) and values as
  `[batch, kv_heads, length, head_dim]`. Each contraction is then a plain
  matrix product per (batch, kv head) with its operand row-major in the
  contracted dimension's natural order: logits `[group, head_dim] x [head_dim,
  length]`, output `[group, length] x [length, head_dim]`. On XLA:CPU this
  pair ran the single-query contractions of GQA-8 and MHA 2.4-10x faster
  than the training layout `[batch, length, kv_heads, head_dim]`, and fastest
  of the four layouts measured for GQA and XXL-like MHA; at large-like MHA
  keys and values both `[batch, kv_heads, head_dim, length]` were 8% faster
  (`scripts/microbench_decode.py`, docs/bench_micro.md).
* **Written prefix only.** Self-attention at step `i` needs positions
  `0..i`. The decoding loop (`decoding.py`) runs in segments of steps and
  gives each segment a self-attention cache exactly as long as the segment's
  last step needs (`self_attention_segments`; the cache is resized once per
  segment). A step then reads the whole, short, cache in one masked pass:
  `i + 1` positions rounded up to the segment end instead of `max_length`.
  XLA:CPU cannot read a block of the cache without first copying it (a
  dynamic slice is a copy), so a loop over blocks inside the step with an
  online softmax (flash-decoding's recurrence) ran 1.3-4.5x slower than one
  masked pass over the segment's cache in all 18 measured cases
  (docs/bench_micro.md, "prefix reads").
* **Shared rows (beams).** `cached_attention` lets several query rows share
  one cache row: with `beam_size` beams per example the encoder-decoder
  keys/values are stored once per example and the beams' queries are folded
  into the query axis of that example (read once per step for all beams,
  never copied or gathered).

`cached_attention` computes what `attention.grouped_dot_product_attention`
computes over the same keys/values (tests/model/test_decode_attention.py
checks it against it): float32 logits and softmax, no 1/sqrt(head_dim)
scaling (T5).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

# Additive logit of a masked position (attention.py uses the same).
MASK_VALUE = -1e10
# Self-attention segments: at least this many positions each, at most
# MAX_SEGMENTS of them (each segment compiles its own copy of the step).
MIN_SEGMENT = 32
MAX_SEGMENTS = 8


def key_to_cache_layout(key: Array) -> Array:
    """`[batch, length, kv_heads, head_dim]` -> `[batch, kv_heads, head_dim, length]`."""
    return jnp.transpose(key, (0, 2, 3, 1))


def value_to_cache_layout(value: Array) -> Array:
    """`[batch, length, kv_heads, head_dim]` -> `[batch, kv_heads, length, head_dim]`."""
    return jnp.transpose(value, (0, 2, 1, 3))


def self_attention_segments(max_length: int, min_segment: int = MIN_SEGMENT,
                            max_segments: int = MAX_SEGMENTS) -> tuple[int, ...]:
    """Self-attention cache length of each segment of a `max_length`-step decode.

    Segment `s` runs the steps from the previous segment's end to its own
    end, with a cache of `end` positions: equal segments of at least
    `min_segment` positions, at most `max_segments` of them, the last ending
    at `max_length`. A step at position `i` reads `end >= i + 1` positions
    (fewer than `i + 1 + segment`).

    Args:
      max_length: Decoding steps (> 0).
      min_segment: Smallest segment (> 0).
      max_segments: Largest number of segments (> 0).

    Returns:
      The increasing segment ends, e.g. `(32, 64, 96, 128)` for 128 steps.
    """
    if min(max_length, min_segment, max_segments) < 1:
        raise ValueError(
            f"max_length={max_length}, min_segment={min_segment} and max_segments={max_segments} "
            "must all be >= 1."
        )
    count = max(1, min(max_segments, max_length // min_segment))
    size = math.ceil(max_length / count)
    return tuple(min(size * (k + 1), max_length) for k in range(math.ceil(max_length / size)))


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
