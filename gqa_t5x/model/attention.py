"""Grouped-query dot-product attention (T5's position bias: `position_bias.py`).

A layer has `num_heads` query heads and `num_kv_heads` key/value heads; query
head `h` reads key/value head `h // (num_heads // num_kv_heads)` (contiguous
groups, as in the paper). The grouped computation never repeats keys/values:
queries are reshaped to `[batch, q_len, kv_heads, group, head_dim]` and
contracted against `[batch, kv_len, kv_heads, head_dim]`, so both FLOPs of the
key/value projections and the memory of the decoding cache scale with
`num_kv_heads`.

`grouped_dot_product_attention` is the pure attention core (einsums, any
dropout); `dot_product_attention` routes the same computation through the
ecosystem's fused kernel, `jax.nn.dot_product_attention` (grouped heads
natively, cuDNN flash attention on GPUs), wherever its numerics are ours and
falls back to the einsums elsewhere. `MultiHeadDotProductAttention` adds the
T5X projections and the decoding cache around them.

Decoding (`decode=True`) keeps, per layer (`decode_attention.py` explains the
layout and how a step reads it):
* self-attention: `cached_key` `[batch, kv_heads, head_dim, length]`,
  `cached_value` `[batch, kv_heads, length, head_dim]` and `cache_index`; the
  decoding loop hands each segment of steps a cache only as long as its last
  step needs, so a step reads about the positions written so far;
* encoder-decoder attention: `cached_key` `[cache_batch, kv_heads, head_dim,
  enc_len]` and `cached_value` `[cache_batch, kv_heads, enc_len, head_dim]`,
  projected ONCE from the encoder output (T5X recomputes them at every step);
  `cache_batch` is the number of examples, shared by their beams.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x.model import decode_attention
from gqa_t5x.model import layers
from gqa_t5x.model.config import check_kv_heads

Array = jax.Array

# Additive logit of a masked position: one value for the training and decode paths.
_MASK_VALUE = decode_attention.MASK_VALUE

# Names of the decoding-cache variables of an attention layer.
CACHED_KEY = "cached_key"
CACHED_VALUE = "cached_value"
CACHE_INDEX = "cache_index"


# ---------------------------------------------------------------------- masks
def make_attention_mask(
    query_input: Array,
    key_input: Array,
    pairwise_fn: Any = jnp.multiply,
    dtype: Any = jnp.float32,
) -> Array:
    """Pairwise mask `[batch, 1, q_len, kv_len]` from per-position inputs.

    Args:
      query_input: `[batch, q_len]`.
      key_input: `[batch, kv_len]`.
      pairwise_fn: Combines query and key values (multiply for padding masks,
        equal for segment ids).
      dtype: Output dtype.

    Returns:
      The mask, 1 where attention is allowed.
    """
    mask = pairwise_fn(query_input[:, :, None], key_input[:, None, :])
    return mask[:, None, :, :].astype(dtype)


def make_causal_mask(x: Array, dtype: Any = jnp.float32) -> Array:
    """Causal mask `[batch, 1, len, len]` for `x` `[batch, len]`."""
    idxs = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
    return make_attention_mask(idxs, idxs, jnp.greater_equal, dtype=dtype)


def combine_masks(*masks: Array | None, dtype: Any = jnp.float32) -> Array | None:
    """Logical AND of the non-None masks (all `[batch, 1, q, k]`-broadcastable)."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0].astype(jnp.bool_)
    for m in present[1:]:
        out = jnp.logical_and(out, m.astype(jnp.bool_))
    return out.astype(dtype)


# ------------------------------------------------------------------ attention
def grouped_dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    float32_logits: bool = True,
    dtype: Any = jnp.float32,
) -> Array:
    """Dot-product attention of `heads` query heads over `kv_heads` key/value heads.

    Query head `h` reads key/value head `h // (heads // kv_heads)`: queries
    are viewed as `[batch, q, kv_heads, group, head_dim]` and contracted with
    the un-repeated keys and values. Einsum letters: b = batch, q = query
    length, k = key/value length, g = key/value heads, r = query heads per
    key/value head (the group), d = head dim.

        logits  [b, g, r, q, k] = einsum('bqgrd,bkgd->bgrqk', query, key)
        output  [b, q, g, r, d] = einsum('bgrqk,bkgd->bqgrd', weights, value)

    Logits are not scaled by 1/sqrt(head_dim) (T5 folds the scale into the
    query initialiser).

    Args:
      query: `[batch, q_len, heads, head_dim]`.
      key: `[batch, kv_len, kv_heads, head_dim]`; kv_heads must divide heads.
      value: `[batch, kv_len, kv_heads, head_dim]`.
      bias: Additive bias broadcastable to `[batch, heads, q_len, kv_len]`
        (T5's relative position bias is `[1, heads, q_len, kv_len]`).
      mask: Broadcastable to `[batch, heads, q_len, kv_len]`, > 0 = attend
        (the network's masks are `[batch, 1, q_len, kv_len]`).
      dropout_rng: PRNG key of the attention-weight dropout.
      dropout_rate: Dropout rate on the attention weights, broadcast along
        the query axis as in T5X.
      deterministic: Disables dropout.
      float32_logits: Compute logits and softmax in float32.
      dtype: Dtype of the weights and the output.

    Returns:
      `[batch, q_len, heads, head_dim]`.
    """
    if query.ndim != 4:
        raise ValueError(f"query must be [batch, q_len, heads, head_dim]; got shape {query.shape}.")
    batch, q_len, heads, head_dim = query.shape
    if key.ndim != 4 or value.shape != key.shape or key.shape[3] != head_dim:
        raise ValueError(
            f"key and value must both be [batch, kv_len, kv_heads, {head_dim}] "
            f"to match query {query.shape}; got key {key.shape}, value {value.shape}."
        )
    kv_len, kv_heads = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(
            f"query has {heads} heads, which is not a multiple of the {kv_heads} "
            "key/value heads; use a number of key/value heads that divides it."
        )
    use_dropout = not deterministic and dropout_rate > 0.0
    if use_dropout and dropout_rng is None:
        raise ValueError(
            f"dropout_rate={dropout_rate} with deterministic=False needs a dropout_rng."
        )
    group = heads // kv_heads
    query = query.reshape(batch, q_len, kv_heads, group, head_dim)  # [b, q, g, r, d]
    if float32_logits:
        query = query.astype(jnp.float32)
        key = key.astype(jnp.float32)
    else:
        key = key.astype(dtype)
    logits = jnp.einsum("bqgrd,bkgd->bgrqk", query, key)  # [b, g, r, q, k]

    if mask is not None:
        mask_bias = jnp.where(mask > 0, 0.0, _MASK_VALUE)  # [b or 1, 1 or heads, q, k]
        bias = mask_bias if bias is None else bias + mask_bias
    if bias is not None:
        bias = jnp.broadcast_to(bias, (bias.shape[0], heads, q_len, kv_len)).reshape(
            bias.shape[0], kv_heads, group, q_len, kv_len
        )  # [b or 1, g, r, q, k]
        logits = logits + bias.astype(logits.dtype)

    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    if use_dropout:
        keep_prob = 1.0 - dropout_rate
        keep_shape = list(weights.shape)
        keep_shape[-2] = 1  # Broadcast along the query axis, as T5X does.
        keep = jax.random.bernoulli(dropout_rng, keep_prob, keep_shape)
        weights = weights * (keep.astype(weights.dtype) / keep_prob)

    out = jnp.einsum("bgrqk,bkgd->bqgrd", weights, value.astype(dtype))  # [b, q, g, r, d]
    return out.reshape(batch, q_len, heads, head_dim)


def attend_in_query_chunks(
    attend: Any,
    query: Array,
    bias: Array | None,
    mask: Array | None,
    chunk: int,
) -> Array:
    """`attend(query, bias, mask)` run over blocks of `chunk` queries, one after another.

    Attention of a query does not depend on the other queries, so splitting
    the query axis changes nothing but the memory: one block's logits
    `[batch, heads, chunk, kv_len]` exist at a time instead of the whole
    `[batch, heads, q_len, kv_len]`. Each block reads its rows of the bias
    and mask in place (no blocked copy of them) and is rematerialised
    (`jax.checkpoint`), so a backward pass recomputes its logits rather than
    keeping every block's. T5X's attention dropout is broadcast along the
    query axis, so every block drawing from the same key draws the mask the
    whole attention would. When `chunk` does not divide the length, the last
    block starts `q_len - chunk` and rewrites rows the one before it wrote,
    with the same values.

    Args:
      attend: `(query, bias, mask) -> [batch, q, heads, head_dim]`, the
        attention over the full key/value sequence.
      query: `[batch, q_len, heads, head_dim]`, q_len > chunk.
      bias: `[batch or 1, heads or 1, q_len or 1, kv_len]` or None.
      mask: `[batch or 1, heads or 1, q_len or 1, kv_len]` or None.
      chunk: Queries per block (> 0).

    Returns:
      `[batch, q_len, heads, head_dim]`.
    """
    q_len = query.shape[1]
    blocks = -(-q_len // chunk)

    def rows(x: Array | None, start: Array, axis: int) -> Array | None:
        if x is None or x.shape[axis] == 1:  # absent or the same for every query
            return x
        return jax.lax.dynamic_slice_in_dim(x, start, chunk, axis)

    block = jax.checkpoint(attend, prevent_cse=False)

    def step(i: Array, out: Array) -> Array:
        start = jnp.minimum(i * chunk, q_len - chunk)
        part = block(rows(query, start, 1), rows(bias, start, 2), rows(mask, start, 2))  # [b, chunk, h, d]
        return jax.lax.dynamic_update_slice_in_dim(out, part.astype(out.dtype), start, 1)

    first = jax.eval_shape(attend, rows(query, 0, 1), rows(bias, 0, 2), rows(mask, 0, 2))
    out = jnp.zeros(query.shape[:3] + first.shape[3:], first.dtype)  # [batch, q_len, heads, head_dim]
    return jax.lax.fori_loop(0, blocks, step, out)


def fused_implementation(dtype: Any) -> str:
    """The `jax.nn.dot_product_attention` implementation to ask for.

    'cudnn' (flash attention) on GPUs with 16-bit activations, which is what
    cuDNN's kernel takes; 'xla' elsewhere (CPU, TPU, float32).
    """
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    float32_logits: bool = True,
    dtype: Any = jnp.float32,
    query_chunk: int | None = None,
) -> Array:
    """`grouped_dot_product_attention` through the fused kernel where it applies.

    `jax.nn.dot_product_attention` takes grouped key/value heads natively,
    T5's additive bias and a boolean mask; called with `scale=1` it computes
    what the einsum path computes when there is no dropout (it has none) and
    the logits are float32 (it always accumulates them in float32). Those
    calls go to it, with the implementation `fused_implementation` picks
    (cuDNN flash attention on GPUs; if cuDNN rejects the shapes, XLA's);
    everything else (attention dropout in training, `float32_logits=False`
    with 16-bit activations) runs the einsums. Arguments and shapes are
    those of `grouped_dot_product_attention`; `query_chunk` (queries per
    block, None = one block) runs it block after block
    (`attend_in_query_chunks`) when the queries are longer than that.

    Returns:
      `[batch, q_len, heads, head_dim]`.
    """
    if query_chunk is not None and query.ndim == 4 and query.shape[1] > query_chunk:
        def attend(q: Array, b: Array | None, m: Array | None) -> Array:
            return dot_product_attention(
                q, key, value, b, m, dropout_rng=dropout_rng, dropout_rate=dropout_rate,
                deterministic=deterministic, float32_logits=float32_logits, dtype=dtype,
            )

        return attend_in_query_chunks(attend, query, bias, mask, query_chunk)
    use_dropout = not deterministic and dropout_rate > 0.0
    exact_logits = float32_logits or jnp.dtype(dtype) == jnp.float32
    if use_dropout or not exact_logits or query.ndim != 4 or key.ndim != 4:
        return grouped_dot_product_attention(
            query, key, value, bias, mask, dropout_rng=dropout_rng, dropout_rate=dropout_rate,
            deterministic=deterministic, float32_logits=float32_logits, dtype=dtype,
        )
    if key.shape != value.shape or key.shape[3] != query.shape[3] or query.shape[2] % key.shape[2]:
        # The einsum path raises the error that says what to change.
        return grouped_dot_product_attention(query, key, value, bias, mask, dtype=dtype)
    query, key, value = (x.astype(dtype) for x in (query, key, value))
    bool_mask = None if mask is None else mask > 0
    if bias is not None:
        bias = bias.astype(jnp.float32)
    implementation = fused_implementation(dtype)
    try:
        out = jax.nn.dot_product_attention(
            query, key, value, bias, bool_mask, scale=1.0, implementation=implementation
        )
    except (ValueError, NotImplementedError):
        if implementation == "xla":
            raise
        out = jax.nn.dot_product_attention(
            query, key, value, bias, bool_mask, scale=1.0, implementation="xla"
        )
    return out.astype(dtype)


class MultiHeadDotProductAttention(nn.Module):
    """Grouped-query attention (MHA when num_kv_heads == num_heads, MQA at 1).

    Parameters (T5X names and logical axes): `query/kernel`
    `[emb, heads*head_dim]` ('embed', 'joined_kv'), `key/kernel` and
    `value/kernel` `[emb, kv_heads*head_dim]` ('embed', 'kv_joined_kv'),
    `out/kernel` `[heads*head_dim, emb]` ('joined_kv', 'embed'). The attention
    itself is `grouped_dot_product_attention`.

    Attributes:
      num_heads: Query heads.
      num_kv_heads: Key/value heads, a divisor of num_heads (an int;
        `config.check_kv_heads` decides).
      head_dim: Width of a head.
      out_features: Output width (the model's emb_dim).
      is_cross_attention: Encoder-decoder attention (keys from the encoder):
        in decode mode its keys/values are projected once and cached.
      dtype: Computation dtype.
      dropout_rate: Dropout on attention weights.
      float32_logits: Compute logits and softmax in float32.
      query_chunk: Queries per block of full-sequence attention (None = one
        block; `dot_product_attention`); the decode step ignores it.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    out_features: int
    is_cross_attention: bool = False
    dtype: Any = jnp.float32
    dropout_rate: float = 0.0
    float32_logits: bool = True
    query_chunk: int | None = None

    def setup(self) -> None:
        check_kv_heads(self.num_heads, self.num_kv_heads, name="num_kv_heads")
        depth_scaling = float(np.sqrt(self.head_dim))

        def query_init(key, shape, dtype=jnp.float32):
            return layers.default_kernel_init(key, shape, dtype) / depth_scaling

        inner = self.num_heads * self.head_dim
        kv_inner = self.num_kv_heads * self.head_dim
        self.query = layers.Dense(
            inner, kernel_axes=("embed", "joined_kv"), dtype=self.dtype, kernel_init=query_init
        )
        self.key = layers.Dense(kv_inner, kernel_axes=("embed", "kv_joined_kv"), dtype=self.dtype)
        self.value = layers.Dense(kv_inner, kernel_axes=("embed", "kv_joined_kv"), dtype=self.dtype)
        self.out = layers.Dense(
            self.out_features, kernel_axes=("joined_kv", "embed"), dtype=self.dtype
        )

    def project_kv(self, inputs_kv: Array) -> tuple[Array, Array]:
        """Keys and values `[batch, kv_len, kv_heads, head_dim]` of `inputs_kv`."""
        batch, length = inputs_kv.shape[:2]
        shape = (batch, length, self.num_kv_heads, self.head_dim)
        key = self.key(inputs_kv).reshape(shape)
        value = self.value(inputs_kv).reshape(shape)
        return key, value

    def init_cache(
        self,
        batch: int,
        max_length: int,
        inputs_kv: Array | None = None,
    ) -> None:
        """Creates this layer's decoding cache (the layout of `decode_attention`).

        Self-attention: zero `cached_key` `[batch, kv_heads, head_dim,
        max_length]` and `cached_value` `[batch, kv_heads, max_length,
        head_dim]`, and `cache_index = 0` (the decoding loop may hand a step a
        shorter cache, as long as the steps it runs need). Cross-attention:
        keys and values projected once from `inputs_kv` (the encoder output, one row per example; `batch` is
        then unused and may be a multiple of it, e.g. examples x beams).

        Args:
          batch: Rows of the self-attention cache (sequences decoded at once).
          max_length: Decoding steps the self-attention cache must hold.
          inputs_kv: `[examples, enc_len, emb]`, cross-attention only.
        """
        if self.is_cross_attention:
            if inputs_kv is None:
                raise ValueError("Cross-attention cache needs the encoder output.")
            key, value = self.project_kv(inputs_kv)  # [examples, enc_len, kv_heads, head_dim]
            self.put_variable("cache", CACHED_KEY,
                              decode_attention.key_to_cache_layout(key).astype(self.dtype))
            self.put_variable("cache", CACHED_VALUE,
                              decode_attention.value_to_cache_layout(value).astype(self.dtype))
            return
        key_shape = (batch, self.num_kv_heads, self.head_dim, max_length)
        value_shape = (batch, self.num_kv_heads, max_length, self.head_dim)
        self.put_variable("cache", CACHED_KEY, jnp.zeros(key_shape, self.dtype))
        self.put_variable("cache", CACHED_VALUE, jnp.zeros(value_shape, self.dtype))
        self.put_variable("cache", CACHE_INDEX, jnp.array(0, dtype=jnp.int32))

    def _decode_step(self, query: Array, inputs_kv: Array | None, mask: Array | None,
                     bias: Array | None) -> Array:
        """Attention of one decoding step over the cache, updating it.

        Args:
          query: `[batch, q_len, heads, head_dim]` (q_len 1 for self-attention).
          inputs_kv: `[batch, 1, emb]` for self-attention (its new key/value).
          mask: Cross-attention `[batch, 1, q_len, enc_len]`; None for
            self-attention (positions up to the step are visible).
          bias: Additive bias `[1, heads, q_len, cache length]` or None.

        Returns:
          `[batch, q_len, heads, head_dim]`.
        """
        if self.is_cross_attention:
            return decode_attention.cached_attention(
                query, self.get_variable("cache", CACHED_KEY),
                self.get_variable("cache", CACHED_VALUE), bias, mask, dtype=self.dtype,
            )
        if inputs_kv is None or query.shape[1] != 1:
            raise ValueError(
                "Incremental decoding feeds one token per step to self-attention; got a "
                f"query of shape {query.shape} and inputs_kv "
                f"{None if inputs_kv is None else inputs_kv.shape}."
            )
        if mask is not None:
            raise ValueError(
                "Cached self-attention sees positions 0..step; pass decoder_mask=None "
                "when decoding (Transformer.decode does)."
            )
        new_key, new_value = self.project_kv(inputs_kv)  # [batch, 1, kv_heads, head_dim]
        cached_key = self.get_variable("cache", CACHED_KEY)  # [batch, kv_heads, head_dim, length]
        cached_value = self.get_variable("cache", CACHED_VALUE)  # [batch, kv_heads, length, head_dim]
        index = self.get_variable("cache", CACHE_INDEX)
        key = jax.lax.dynamic_update_slice(
            cached_key, decode_attention.key_to_cache_layout(new_key).astype(cached_key.dtype),
            (0, 0, 0, index),
        )
        value = jax.lax.dynamic_update_slice(
            cached_value, decode_attention.value_to_cache_layout(new_value).astype(cached_value.dtype),
            (0, 0, index, 0),
        )
        self.put_variable("cache", CACHED_KEY, key)
        self.put_variable("cache", CACHED_VALUE, value)
        self.put_variable("cache", CACHE_INDEX, index + 1)
        # Only positions written so far are visible; the cache is as long as
        # this segment of steps needs (decoding.py), and read in one pass.
        step_mask = (jnp.arange(key.shape[3]) <= index)[None, None, None, :]  # [1, 1, 1, length]
        return decode_attention.cached_attention(query, key, value, bias, step_mask, dtype=self.dtype)

    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None,
        mask: Array | None = None,
        bias: Array | None = None,
        *,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        """Attends from `inputs_q` to `inputs_kv`.

        Args:
          inputs_q: `[batch, q_len, emb]`.
          inputs_kv: `[batch, kv_len, emb]`; may be None for cached
            cross-attention in decode mode.
          mask: `[batch, 1, q_len, kv_len]`, 1 = attend.
          bias: `[batch or 1, heads, q_len, kv_len]` additive bias.
          deterministic: Disables dropout.
          decode: Use (and update) the decoding cache; the query length must
            be 1 once the cache exists.

        Returns:
          `[batch, q_len, emb]`.
        """
        batch, q_len, _ = inputs_q.shape
        query = self.query(inputs_q).reshape(
            batch, q_len, self.num_heads, self.head_dim
        )  # [batch, q_len, heads, head_dim]
        if decode and self.has_variable("cache", CACHED_KEY):
            out = self._decode_step(query, inputs_kv, mask, bias)
        else:
            if inputs_kv is None:
                raise ValueError("inputs_kv is required unless decoding from a cache.")
            key, value = self.project_kv(inputs_kv)  # [batch, kv_len, kv_heads, head_dim]
            use_dropout = not deterministic and self.dropout_rate > 0.0
            out = dot_product_attention(
                query,
                key,
                value,
                bias,
                mask,
                dropout_rng=self.make_rng("dropout") if use_dropout else None,
                dropout_rate=self.dropout_rate,
                deterministic=deterministic,
                float32_logits=self.float32_logits,
                dtype=self.dtype,
                query_chunk=self.query_chunk,
            )  # [batch, q_len, heads, head_dim]
        return self.out(out.reshape(batch, q_len, self.num_heads * self.head_dim))  # [batch, q_len, emb]
