"""T5's relative position bias: bucketed key-minus-query distances, one learned
value per bucket and head (`rel_embedding`), shared by the layers of a stack.

The bias `[1, heads, q_len, kv_len]` is added to the attention logits
(`attention.dot_product_attention`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x.model import layers

Array = jax.Array


def relative_position_bucket(
    relative_position: Array,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Array:
    """T5's bucketing of `memory_position - query_position`.

    Half the buckets (a quarter each way if bidirectional) hold exact small
    distances; the rest grow logarithmically up to `max_distance`.

    Args:
      relative_position: Integer array of key minus query positions.
      bidirectional: Whether keys after the query get their own buckets.
      num_buckets: Number of buckets.
      max_distance: Distances beyond this share the last bucket.

    Returns:
      Int32 bucket ids in `[0, num_buckets)`, same shape as the input.
    """
    ret = jnp.zeros_like(relative_position, dtype=jnp.int32)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    eps = np.finfo(np.float32).eps
    val_if_large = max_exact + (
        jnp.log(n.astype(jnp.float32) / max_exact + eps)
        / np.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(jnp.int32)
    val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
    return ret + jnp.where(is_small, n, val_if_large)


class RelativePositionBiases(nn.Module):
    """T5's per-head relative position bias, `rel_embedding` `[heads, buckets]`.

    One instance per stack, shared by all its layers.

    Attributes:
      num_buckets: Number of relative position buckets (32).
      max_distance: Largest distinguished distance (128).
      num_heads: Number of query heads.
      dtype: Dtype of the returned bias.
    """

    num_buckets: int
    max_distance: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        qlen: int,
        klen: int,
        bidirectional: bool = True,
        query_offset: Array | int = 0,
    ) -> Array:
        """Returns the bias `[1, heads, qlen, klen]`.

        Args:
          qlen: Number of query positions.
          klen: Number of key positions.
          bidirectional: True in the encoder, False in the decoder.
          query_offset: Position of the first query (the step when decoding).
        """
        rel_embedding = layers.param_with_axes(
            self,
            "rel_embedding",
            nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
            (self.num_heads, self.num_buckets),
            ("heads", "relpos_buckets"),
        )  # [heads, buckets]
        context_position = jnp.arange(qlen, dtype=jnp.int32)[:, None] + query_offset
        memory_position = jnp.arange(klen, dtype=jnp.int32)[None, :]
        buckets = relative_position_bucket(
            memory_position - context_position,
            bidirectional=bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )  # [qlen, klen]
        values = jnp.take(rel_embedding, buckets, axis=1)  # [heads, qlen, klen]
        return values[None].astype(self.dtype)
