"""Optimizer and learning-rate schedules with T5's pre-training settings.

T5 (and the GQA paper's uptraining) uses Adafactor with decay rate 0.8,
factored second moments, no momentum, update clipping at RMS 1.0 and updates
scaled by the parameters' RMS, and the schedule `1 / sqrt(max(step, 10_000))`
(T5X: `constant * rsqrt_decay`, base 1.0, warmup 10,000). Fine-tuning keeps
Adafactor with a constant learning rate of 0.001.

The learning rate is a function of the GLOBAL step (which starts at the
initial checkpoint's step, e.g. 1,000,000, as in T5X), so it is applied by
the trainer (`scale_updates`) rather than by optax, whose own step counter
restarts at 0 with a fresh optimizer state. Adafactor's second-moment decay
follows its own counter, which is what a freshly initialised state needs.

Scanned models (`T5Config.scan_layers`) train on stacked parameters
(`encoder/layers/...` `[layers, ...]`, `model/layer_stack.py`). Adafactor
treats each layer of a stacked leaf as its own block, as T5X's Adafactor
does with the 'layers' axis as a batch dimension: update clipping and the
parameter scale use per-layer RMS, and the factored second moments are
per-layer row/column statistics (optax factors the two largest axes, which
are a layer's own while there are fewer layers than
`min_dim_size_to_factor`). A scanned run's updates are therefore those of the
unscanned run, and its optimizer state is the unscanned one stacked.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gqa_t5x.model import layer_stack
from gqa_t5x.model import param_tree

Schedule = Callable[[jax.Array | int], jax.Array]


def adafactor(
    decay_rate: float = 0.8,
    clipping_threshold: float | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    factored: bool = True,
    min_dim_size_to_factor: int = 128,
    momentum: float | None = None,
    epsilon1: float = 1e-30,
    weight_decay_rate: float | None = None,
) -> optax.GradientTransformation:
    """Adafactor with T5's hyper-parameters, WITHOUT the learning rate.

    The returned transformation maps gradients to descent directions (already
    negated); multiply them by the learning rate with `scale_updates`.

    Args:
      decay_rate: Second-moment decay exponent (T5: 0.8, i.e.
        beta2_t = 1 - t^-0.8).
      clipping_threshold: Update clipping by block RMS (T5: 1.0); None = off.
      multiply_by_parameter_scale: Scale updates by max(1e-3, RMS(param)).
      factored: Factor second moments of matrices into row/column statistics.
      min_dim_size_to_factor: Only factor dimensions at least this large.
      momentum: First-moment decay (T5: None, no momentum).
      epsilon1: Regulariser of the squared gradients (T5: 1e-30).
      weight_decay_rate: Decoupled weight decay (T5: None).

    Returns:
      An optax `GradientTransformation`.
    """
    if not 0.0 < decay_rate <= 1.0:
        raise ValueError(f"adafactor decay_rate={decay_rate} must be in (0, 1].")
    return _adafactor(decay_rate, clipping_threshold, multiply_by_parameter_scale, factored,
                      min_dim_size_to_factor, momentum, epsilon1, weight_decay_rate)


# One object per setting: equal settings give the same transformation, so the
# trainer reuses a run's traced train step in the next run of the process
# (`trainer.compile_train_step`). Transformations hold no state.
@functools.lru_cache(maxsize=64)
def _adafactor(decay_rate: float, clipping_threshold: float | None, multiply_by_parameter_scale: bool,
               factored: bool, min_dim_size_to_factor: int, momentum: float | None, epsilon1: float,
               weight_decay_rate: float | None) -> optax.GradientTransformation:
    # optax.adafactor(learning_rate=None)'s chain, state for state, with the
    # two block-RMS steps per layer on stacked leaves.
    chain = [optax.scale_by_factored_rms(factored, decay_rate, 0, min_dim_size_to_factor, epsilon1)]
    if clipping_threshold is not None:
        chain.append(clip_by_block_rms(clipping_threshold))
    if multiply_by_parameter_scale:
        chain.append(scale_by_param_block_rms())
    if momentum is not None:
        chain.append(optax.ema(momentum, debias=False, accumulator_dtype=jnp.float32))
    if weight_decay_rate is not None:
        chain.append(optax.add_decayed_weights(weight_decay_rate))
    chain.append(optax.scale(-1))
    inner = optax.chain(*chain)

    def init(params: Any) -> Any:
        _check_layer_axes(params, min_dim_size_to_factor if factored else None)
        return inner.init(params)

    return optax.GradientTransformation(init, inner.update)


def _block_axes(keypath: Any, leaf: Any) -> tuple[int, ...] | None:
    """Axes of one block: all but the layer axis of a stacked leaf, else all (None)."""
    if layer_stack.is_stacked_path(param_tree.keypath_str(keypath)) and np.ndim(leaf) > 1:
        return tuple(range(1, np.ndim(leaf)))
    return None


def _check_layer_axes(params: Any, min_dim_size_to_factor: int | None) -> None:
    """Raises when a stacked leaf has so many layers that optax would factor across them."""
    for keypath, leaf in jax.tree_util.tree_leaves_with_path(params):
        layers = np.shape(leaf)[0] if _block_axes(keypath, leaf) else 0
        if min_dim_size_to_factor is not None and layers >= min_dim_size_to_factor:
            raise ValueError(
                f"{param_tree.keypath_str(keypath)} stacks {layers} layers, at least adafactor's "
                f"min_dim_size_to_factor={min_dim_size_to_factor}: its second moments "
                "would be factored across layers; train it unscanned (SCAN_LAYERS=False)."
            )


def clip_by_block_rms(threshold: float) -> optax.GradientTransformation:
    """`optax.clip_by_block_rms` with one block per layer of a stacked leaf.

    Each block's update is divided by `max(1, rms(block) / threshold)`.
    """

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params

        def clip(keypath: Any, u: jax.Array) -> jax.Array:
            rms = jnp.sqrt(jnp.mean(jnp.square(u), axis=_block_axes(keypath, u), keepdims=True))
            return u / jnp.maximum(1.0, rms / threshold)

        return jax.tree_util.tree_map_with_path(clip, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def scale_by_param_block_rms(min_scale: float = 1e-3) -> optax.GradientTransformation:
    """`optax.scale_by_param_block_rms` with one block per layer of a stacked leaf.

    Each block's update is multiplied by `max(min_scale, rms(parameter block))`.
    """

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if params is None:
            raise ValueError("scale_by_param_block_rms needs the parameters (update(..., params)).")

        def scale(keypath: Any, u: jax.Array, p: jax.Array) -> jax.Array:
            rms = jnp.sqrt(jnp.mean(jnp.square(p), axis=_block_axes(keypath, p), keepdims=True))
            return u * jnp.maximum(rms, min_scale)

        return jax.tree_util.tree_map_with_path(scale, updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> Schedule:
    """T5's inverse square root schedule: base / sqrt(max(step, warmup_steps)).

    Args:
      base_learning_rate: Multiplier (T5: 1.0).
      warmup_steps: Steps with a constant rate base / sqrt(warmup_steps)
        (T5: 10,000, i.e. 0.01).

    Returns:
      A function of the global step.
    """
    if warmup_steps <= 0:
        raise ValueError(f"rsqrt_schedule warmup_steps={warmup_steps} must be positive.")
    return _rsqrt_schedule(base_learning_rate, warmup_steps)


@functools.lru_cache(maxsize=64)  # one function per setting, as `_adafactor`
def _rsqrt_schedule(base_learning_rate: float, warmup_steps: int) -> Schedule:
    def schedule(step: jax.Array | int) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        return base_learning_rate * jax.lax.rsqrt(jnp.maximum(step, float(warmup_steps)))

    return schedule


def constant_schedule(base_learning_rate: float = 0.001) -> Schedule:
    """A constant learning rate (the paper's fine-tuning: 0.001).

    Args:
      base_learning_rate: The rate.

    Returns:
      A function of the global step.
    """
    if base_learning_rate <= 0:
        raise ValueError(f"constant_schedule base_learning_rate={base_learning_rate} must be positive.")
    return _constant_schedule(base_learning_rate)


@functools.lru_cache(maxsize=64)  # one function per setting, as `_adafactor`
def _constant_schedule(base_learning_rate: float) -> Schedule:
    def schedule(step: jax.Array | int) -> jax.Array:
        return jnp.full((), base_learning_rate, jnp.float32) + 0.0 * jnp.asarray(step, jnp.float32)

    return schedule


def scale_updates(updates: Any, learning_rate: jax.Array) -> Any:
    """Multiplies every update leaf by `learning_rate` (keeping its dtype)."""
    return jax.tree_util.tree_map(lambda u: (u * learning_rate).astype(u.dtype), updates)
