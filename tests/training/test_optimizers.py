"""Adafactor with T5's settings and the learning-rate schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x.training import optimizers


def test_rsqrt_schedule_is_constant_0_01_then_inverse_sqrt_of_global_step():
    lr = optimizers.rsqrt_schedule()
    np.testing.assert_allclose(float(lr(0)), 0.01, rtol=1e-6)
    np.testing.assert_allclose(float(lr(9_999)), 0.01, rtol=1e-6)
    np.testing.assert_allclose(float(lr(40_000)), 0.005, rtol=1e-6)
    # Uptraining from a public T5.1.1 checkpoint starts at step 1M.
    np.testing.assert_allclose(float(lr(1_000_000)), 0.001, rtol=1e-6)


def test_constant_schedule_ignores_the_step_and_rejects_nonpositive_rates():
    lr = optimizers.constant_schedule(0.001)
    assert float(lr(0)) == pytest.approx(0.001)
    assert float(lr(1_050_000)) == pytest.approx(0.001)
    with pytest.raises(ValueError, match="base_learning_rate"):
        optimizers.constant_schedule(0.0)


def _t5_adafactor_first_step(param: np.ndarray, grad: np.ndarray, lr: float) -> np.ndarray:
    """Shazeer & Stern's Adafactor, first step, T5 settings, written out in numpy."""
    g2 = grad.astype(np.float64) ** 2 + 1e-30
    # beta2 at step 1 is 1 - 1^-0.8 = 0: the statistics are this step's.
    v_row = g2.mean(axis=1)  # [rows]
    v_col = g2.mean(axis=0)  # [cols]
    v_hat = np.outer(v_row, v_col) / v_row.mean()
    update = grad / np.sqrt(v_hat)
    rms = np.sqrt(np.mean(update**2))
    update = update / max(1.0, rms / 1.0)  # clipping threshold 1.0
    scale = max(1e-3, np.sqrt(np.mean(param.astype(np.float64) ** 2)))
    return param - lr * scale * update


def test_adafactor_matches_t5_factored_clipped_parameter_scaled_update():
    rng = np.random.RandomState(0)
    param = rng.normal(size=(256, 384)).astype(np.float32) * 0.05
    grad = rng.normal(size=(256, 384)).astype(np.float32)
    tx = optimizers.adafactor()
    state = tx.init({"w": jnp.asarray(param)})
    updates, state = tx.update({"w": jnp.asarray(grad)}, state, {"w": jnp.asarray(param)})
    updates = optimizers.scale_updates(updates, jnp.float32(0.01))
    new = np.asarray(param + updates["w"])
    np.testing.assert_allclose(new, _t5_adafactor_first_step(param, grad, 0.01), rtol=1e-4, atol=1e-7)
    # Factored: second moments are row/column vectors, not a full matrix.
    shapes = sorted(tuple(x.shape) for x in jax.tree_util.tree_leaves(state) if np.ndim(x) > 0)
    assert (256,) in shapes and (384,) in shapes and (256, 384) not in shapes


def test_adafactor_rejects_a_decay_rate_outside_0_1():
    with pytest.raises(ValueError, match="decay_rate"):
        optimizers.adafactor(decay_rate=1.5)
