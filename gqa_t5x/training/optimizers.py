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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

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
    return optax.adafactor(
        learning_rate=None,
        min_dim_size_to_factor=min_dim_size_to_factor,
        decay_rate=decay_rate,
        decay_offset=0,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
        clipping_threshold=clipping_threshold,
        momentum=momentum,
        eps=epsilon1,
        factored=factored,
        weight_decay_rate=weight_decay_rate,
    )


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

    def schedule(step: jax.Array | int) -> jax.Array:
        return jnp.full((), base_learning_rate, jnp.float32) + 0.0 * jnp.asarray(step, jnp.float32)

    return schedule


def scale_updates(updates: Any, learning_rate: jax.Array) -> Any:
    """Multiplies every update leaf by `learning_rate` (keeping its dtype)."""
    return jax.tree_util.tree_map(lambda u: (u * learning_rate).astype(u.dtype), updates)
