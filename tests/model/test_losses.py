"""`losses`: token cross-entropy / z-loss and the teacher-forced scorer,
checked against numpy and HuggingFace's PyTorch T5."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x.model import losses


def _numpy_losses(logits, targets, z_loss):
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    log_z = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    target_logit = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return log_z - target_logit, z_loss * log_z**2


def _numpy_log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def test_cross_entropy_and_z_loss_match_a_numpy_reference():
    rng = np.random.RandomState(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    targets = rng.randint(0, 11, size=(2, 5))
    total, ce, z = losses.cross_entropy_with_z_loss(jnp.asarray(logits), jnp.asarray(targets), 1e-4)
    ref_ce, ref_z = _numpy_losses(logits, targets, 1e-4)
    np.testing.assert_allclose(np.asarray(ce), ref_ce, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(z), ref_z, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(total), ref_ce + ref_z, rtol=1e-5)


def test_label_smoothing_loss_is_minimal_at_the_smoothed_distribution():
    vocab, smoothing = 7, 0.1
    target = 3
    probs = np.full(vocab, smoothing / (vocab - 1))
    probs[target] = 1 - smoothing
    _, ce, _ = losses.cross_entropy_with_z_loss(
        jnp.asarray(np.log(probs))[None, None], jnp.asarray([[target]]), 0.0, smoothing
    )
    # The smoothed target's entropy is subtracted: the optimum scores 0.
    np.testing.assert_allclose(float(ce[0, 0]), 0.0, atol=1e-5)


def test_shift_right_starts_from_0_and_drops_the_last_target():
    targets = np.array([[5, 6, 1, 0], [7, 1, 0, 0]], np.int32)
    shifted = losses.shift_right(targets)
    np.testing.assert_array_equal(shifted, [[0, 5, 6, 1], [0, 7, 1, 0]])
    assert shifted.dtype == np.int32


@pytest.fixture(scope="module")
def hf():
    """A tiny HuggingFace T5, our config and params for it, and a batch."""
    hf_reference = pytest.importorskip("hf_reference")
    hf_model = hf_reference.make_hf_t5(
        vocab_size=40, d_model=16, num_heads=4, d_kv=4, d_ff=24, num_layers=1, num_decoder_layers=1, seed=3,
    )
    config = hf_reference.our_config_for(hf_model)
    params = hf_reference.our_params_for(hf_model, config)
    rng = np.random.default_rng(4)
    enc = rng.integers(2, 40, size=(3, 7)).astype(np.int32)
    enc[1, 4:] = 0
    tgt = rng.integers(2, 40, size=(3, 6)).astype(np.int32)
    tgt[2, 3:] = 0
    return hf_reference, hf_model, config, params, {"encoder_input_tokens": enc, "decoder_target_tokens": tgt}


def test_score_examples_equals_huggingface_target_log_probs_and_argmax(hf):
    hf_reference, hf_model, config, params, batch = hf
    enc, tgt = batch["encoder_input_tokens"], batch["decoder_target_tokens"]
    hf_logits = hf_reference.hf_logits(hf_model, enc, losses.shift_right(tgt), tgt)  # [batch, len, vocab]
    log_probs = _numpy_log_softmax(hf_logits)
    real = tgt > 0
    expected = (np.take_along_axis(log_probs, tgt[..., None], -1)[..., 0] * real).sum(-1)
    expected_correct = ((hf_logits.argmax(-1) == tgt) & real).sum(-1)

    scores = losses.score_examples(config, params, batch, return_token_log_probs=True)
    np.testing.assert_allclose(scores.log_likelihood, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(scores.correct, expected_correct)
    np.testing.assert_array_equal(scores.num_tokens, real.sum(-1))
    assert scores.log_likelihood.shape == scores.correct.shape == scores.num_tokens.shape == (3,)
    assert scores.token_log_probs.shape == (3, 6, 40)
    # At real positions (padding positions attend to nothing, unlike HF's).
    np.testing.assert_allclose(scores.token_log_probs[real], log_probs[real], atol=1e-4)
    assert losses.score_examples(config, params, batch).token_log_probs is None


def test_score_examples_honours_loss_weights_and_scores_a_decoded_pad_id_like_huggingface(hf):
    hf_reference, hf_model, config, params, batch = hf
    enc = batch["encoder_input_tokens"]
    tgt = batch["decoder_target_tokens"].copy()
    tgt[0, 2] = 0  # a decoded pad id inside a sequence
    weights = np.ones_like(tgt, np.float32)
    weights[2, 3:] = 0  # padding
    weights[1, 4:] = 0  # the last two tokens do not count
    # HuggingFace with the weights' support as its decoder attention mask.
    hf_logits = hf_reference.hf_logits(hf_model, enc, losses.shift_right(tgt), (weights > 0).astype(np.int32))
    log_probs = _numpy_log_softmax(hf_logits)
    expected = (np.take_along_axis(log_probs, tgt[..., None], -1)[..., 0] * weights).sum(-1)
    expected_correct = ((hf_logits.argmax(-1) == tgt) * weights).sum(-1)

    weighted = {"encoder_input_tokens": enc, "decoder_target_tokens": tgt, "decoder_loss_weights": weights}
    scores = losses.score_examples(config, params, weighted)
    np.testing.assert_allclose(scores.log_likelihood, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(scores.correct, expected_correct)
    np.testing.assert_array_equal(scores.num_tokens, [6, 4, 3])
    # Explicit decoder inputs are used as given: other inputs, other scores.
    other_inputs = losses.shift_right(tgt)
    other_inputs[:, 1] = 5
    other = hf_reference.hf_logits(hf_model, enc, other_inputs, (weights > 0).astype(np.int32))
    expected_other = (np.take_along_axis(_numpy_log_softmax(other), tgt[..., None], -1)[..., 0] * weights).sum(-1)
    explicit = losses.score_examples(config, params, dict(weighted, decoder_input_tokens=other_inputs))
    np.testing.assert_allclose(explicit.log_likelihood, expected_other, rtol=1e-5, atol=1e-4)


def test_score_examples_errors_name_the_missing_or_misshapen_feature(hf):
    _, _, config, params, batch = hf
    with pytest.raises(ValueError, match="batch lacks 'decoder_target_tokens'"):
        losses.score_examples(config, params, {"encoder_input_tokens": batch["encoder_input_tokens"]})
    with pytest.raises(ValueError, match="batch lacks 'encoder_input_tokens'"):
        losses.score_examples(config, params, {"decoder_target_tokens": batch["decoder_target_tokens"]})
    with pytest.raises(ValueError, match=r"batch\['decoder_target_tokens'\] must be \[batch, length\]"):
        losses.score_examples(config, params, dict(batch, decoder_target_tokens=np.ones(6, np.int32)))
    with pytest.raises(ValueError, match="must have the shape of decoder_target_tokens"):
        losses.score_examples(config, params, dict(batch, decoder_loss_weights=np.ones((3, 5), np.float32)))
    with pytest.raises(ValueError, match="must be paired"):
        losses.score_examples(config, params, dict(batch, encoder_input_tokens=batch["encoder_input_tokens"][:2]))
