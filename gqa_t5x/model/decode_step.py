"""One cached decoding step and the cache operations around the step loop.

`decoding.py` builds its greedy, sampling and beam loops from these:

* `step_fn`: one decoder step over the cache (`Transformer.decode`), optionally
  multiplying by the decoder kernels transposed once per run
  (`decode_kernels`, used on CPU: `use_decode_kernels`);
* `segmented_while_loop` / `resize_self_cache`: the step loop run in segments,
  each with a self-attention cache only as long as its last step needs
  (`decode_attention.self_attention_segments`);
* `gather_beams`: beam reordering of the per-sequence cache rows (the
  encoder-decoder keys/values, one row per example, are shared by its beams).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gqa_t5x.model import attention
from gqa_t5x.model import layer_stack
from gqa_t5x.model import layers
from gqa_t5x.model import network
from gqa_t5x.model import param_tree

Array = jax.Array


def use_decode_kernels() -> bool:
    """Whether decoding steps read decoder kernels transposed (`decode_kernels`).

    On XLA:CPU a decode step's weight products run 1.5-3x faster over `[out,
    in]` kernels (docs/bench_micro.md), which is worth one transposed copy of
    the decoder's kernels per decoding run. Accelerators' matmul units do not
    care, so they skip the copy.
    """
    return jax.default_backend() == "cpu"


def decode_kernels(params: Any) -> Any:
    """The decoder kernels a decode step multiplies by, transposed to `[out, in]`.

    Every 2-D `kernel` under `decoder/` except the encoder-decoder key/value
    kernels (used once, to build the cache), nested like `params`, for the
    `layers.DECODE_KERNELS` collection. One copy of those weights: built once
    per decoding run, before the step loop.

    Args:
      params: The model's `params`.

    Returns:
      `{'decoder': {...: {'kernel': [out, in]}}}`; a scanned decoder's
      stacked kernels `[layers, in, out]` become `[layers, out, in]`.
    """
    kernels = {}
    for path, value in param_tree.flatten(params).items():
        once = (param_tree.is_cross_attention(path)
                and param_tree.attention_projection(path) in param_tree.KEY_VALUE_PROJECTIONS)
        matrix_ndim = 3 if layer_stack.is_stacked_path(path) else 2
        if path.startswith("decoder/") and path.endswith("/kernel") and value.ndim == matrix_ndim and not once:
            kernels[path] = jnp.swapaxes(value, -1, -2)  # [(layers,) out, in]
    return param_tree.unflatten(kernels)


def step_fn(model: network.Transformer, params: Any, encoder_input_tokens: Array,
             kernels: Any = None):
    """Returns `step(cache, tokens [n]) -> (logits [n, vocab] float32, cache)`.

    Args:
      model: The network.
      params: Its parameters.
      encoder_input_tokens: `[n, enc_len]` (for the encoder-decoder mask).
      kernels: `decode_kernels(params)` or None (the steps then read `params`).
    """
    variables_in = {"params": params}
    if kernels is not None:
        variables_in[layers.DECODE_KERNELS] = kernels

    def step(cache: Any, tokens: Array) -> tuple[Array, Any]:
        tokens = tokens[:, None]  # [n, 1]
        logits, variables = model.apply(
            {**variables_in, "cache": cache},
            None,
            encoder_input_tokens,
            tokens,
            tokens,
            enable_dropout=False,
            decode=True,
            method=network.Transformer.decode,
            mutable=["cache"],
        )
        return logits[:, 0].astype(jnp.float32), variables["cache"]

    return step


def resize_self_cache(cache: Any, length: int) -> Any:
    """The cache with its self-attention keys/values cut or zero-padded to `length`.

    Keys `[rows, kv_heads, head_dim, L]` along their last axis, values
    `[rows, kv_heads, L, head_dim]` along their third (a scanned decoder's
    caches have a layer axis in front); `key_positions` (whose shape tells a
    step the length) becomes `arange(length)`. The encoder-decoder
    keys/values and the scalars are kept.
    """

    def resize(keypath, leaf):
        path = param_tree.keypath_str(keypath)
        name = path.split("/")[-1]
        if name == "key_positions":
            return jnp.arange(length, dtype=leaf.dtype)
        if param_tree.is_cross_attention(path) or name not in (attention.CACHED_KEY, attention.CACHED_VALUE):
            return leaf
        axis = leaf.ndim - 1 if name == attention.CACHED_KEY else leaf.ndim - 2
        if leaf.shape[axis] >= length:
            return jax.lax.slice_in_dim(leaf, 0, length, axis=axis)
        pad = [(0, 0)] * leaf.ndim
        pad[axis] = (0, length - leaf.shape[axis])
        return jnp.pad(leaf, pad)

    return jax.tree_util.tree_map_with_path(resize, cache)


def segmented_while_loop(cond: Any, body: Any, state: tuple, segments: tuple[int, ...]) -> tuple:
    """`lax.while_loop(cond, body, state)` run segment by segment.

    `state[0]` is the step and `state[1]` the cache. Before the segment that
    ends at step `end`, the self-attention cache is resized to `end`
    positions (positions written so far are kept), so each step reads its
    written prefix rounded up to the segment end rather than the whole
    `max_decode_length` (`decode_attention.self_attention_segments`). A loop
    that has stopped early stays stopped: later segments run no step.
    """
    for end in segments:
        state = (state[0], resize_self_cache(state[1], end), *state[2:])
        state = jax.lax.while_loop(
            lambda s, end=end: jnp.logical_and(cond(s), s[0] < end), body, state
        )
    return state


def gather_beams(tree: Any, flat_index: Array) -> Any:
    """Reorders the per-sequence rows of a decoding cache.

    Leaves with a leading `[batch * beams]` axis (ndim >= 2) are gathered;
    scalars (`cache_index`, `position`) and `key_positions` `[length]` are
    shared by all rows and kept. Encoder-decoder keys/values are stored once
    per example (`[batch, ...]`, read by all its beams), and beams only move
    within an example, so those (the largest leaves) are not touched. A
    scanned decoder's caches `[layers, batch * beams, ...]` (and its
    per-layer `cache_index` `[layers]`) are gathered along their second axis.
    """

    def gather(keypath, leaf):
        path = param_tree.keypath_str(keypath)
        rows_axis = 1 if layer_stack.is_stacked_path(path) else 0
        if leaf.ndim < rows_axis + 2 or param_tree.is_cross_attention(path):
            return leaf
        return jnp.take(leaf, flat_index, axis=rows_axis)

    return jax.tree_util.tree_map_with_path(gather, tree)
