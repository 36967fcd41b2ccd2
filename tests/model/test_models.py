"""EncoderDecoderModel: cross-entropy + z-loss over target weights, scoring."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x.model import models
from gqa_t5x.model import network
from training_utils import tiny_config


def _numpy_losses(logits, targets, z_loss):
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    log_z = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    target_logit = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return log_z - target_logit, z_loss * log_z**2


def test_cross_entropy_and_z_loss_match_a_numpy_reference():
    rng = np.random.RandomState(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    targets = rng.randint(0, 11, size=(2, 5))
    total, ce, z = models.cross_entropy_with_z_loss(jnp.asarray(logits), jnp.asarray(targets), 1e-4)
    ref_ce, ref_z = _numpy_losses(logits, targets, 1e-4)
    np.testing.assert_allclose(np.asarray(ce), ref_ce, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(z), ref_z, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(total), ref_ce + ref_z, rtol=1e-5)


def test_label_smoothing_loss_is_minimal_at_the_smoothed_distribution():
    vocab, smoothing = 7, 0.1
    target = 3
    probs = np.full(vocab, smoothing / (vocab - 1))
    probs[target] = 1 - smoothing
    _, ce, _ = models.cross_entropy_with_z_loss(
        jnp.asarray(np.log(probs))[None, None], jnp.asarray([[target]]), 0.0, smoothing
    )
    # The smoothed target's entropy is subtracted: the optimum scores 0.
    np.testing.assert_allclose(float(ce[0, 0]), 0.0, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    model = models.EncoderDecoderModel(network.Transformer(config), z_loss=1e-4)
    params = jax.jit(model.get_initial_params)(jax.random.PRNGKey(0))
    rng = np.random.RandomState(1)
    targets = rng.randint(2, config.vocab_size, size=(3, 6)).astype(np.int32)
    weights = np.ones_like(targets, dtype=np.float32)
    targets[0, 4:] = 0  # padding
    weights[0, 4:] = 0
    batch = {
        "encoder_input_tokens": rng.randint(2, config.vocab_size, size=(3, 9)).astype(np.int32),
        "decoder_input_tokens": np.concatenate([np.zeros((3, 1), np.int32), targets[:, :-1]], 1),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": weights,
    }
    return model, params, batch


def test_loss_fn_sums_token_losses_over_weighted_targets_only(tiny):
    model, params, batch = tiny
    loss, metrics = jax.jit(model.loss_fn)(params, batch)
    logits = np.asarray(jax.jit(model.compute_logits)(params, batch))
    ce, z = _numpy_losses(logits, batch["decoder_target_tokens"], 1e-4)
    w = batch["decoder_loss_weights"]
    np.testing.assert_allclose(float(loss), np.sum((ce + z) * w), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["z_loss_sum"]), np.sum(z * w), rtol=1e-5)
    assert float(metrics["num_tokens"]) == w.sum() == 16
    correct = (logits.argmax(-1) == batch["decoder_target_tokens"]) * w
    assert float(metrics["correct"]) == correct.sum()


def test_loss_normalizing_factor_divides_by_real_target_tokens(tiny):
    model, params, batch = tiny
    per_token = models.EncoderDecoderModel(
        model.module, loss_normalizing_factor=models.NUM_REAL_TARGET_TOKENS
    )
    total, _ = jax.jit(model.loss_fn)(params, batch)
    mean, _ = jax.jit(per_token.loss_fn)(params, batch)
    np.testing.assert_allclose(float(mean), float(total) / 16, rtol=1e-6)
    with pytest.raises(ValueError, match="loss_normalizing_factor"):
        models.EncoderDecoderModel(model.module, loss_normalizing_factor="tokens")


def test_score_batch_through_inference_is_minus_the_per_example_cross_entropy(tiny):
    model, params, batch = tiny
    no_z = models.EncoderDecoderModel(model.module, z_loss=0.0)
    scores = np.asarray(no_z.score_batch(params, batch))
    logits = np.asarray(jax.jit(model.compute_logits)(params, batch))
    ce, _ = _numpy_losses(logits, batch["decoder_target_tokens"], 0.0)
    np.testing.assert_allclose(scores, -(ce * batch["decoder_loss_weights"]).sum(-1), rtol=1e-5)


def test_dropout_rng_changes_the_loss_only_when_dropout_is_enabled(tiny):
    model, params, batch = tiny
    rng = jax.random.PRNGKey(5)
    base, _ = jax.jit(model.loss_fn)(params, batch, None)
    assert float(jax.jit(model.loss_fn)(params, batch, rng)[0]) == pytest.approx(float(base), rel=1e-6)
    dropped = model.with_config(model.config.replace(dropout_rate=0.5))
    assert abs(float(jax.jit(dropped.loss_fn)(params, batch, rng)[0]) - float(base)) > 1e-3


def test_model_rejects_a_module_that_is_not_the_t5_network():
    with pytest.raises(TypeError, match="network.Transformer"):
        models.EncoderDecoderModel(object())
