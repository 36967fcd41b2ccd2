"""EncoderDecoderModel (loss, scoring, prediction) and predict_batch / score_batch."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gqa_t5x.model import decoding
from gqa_t5x.model import losses
from gqa_t5x.model import models
from gqa_t5x.model import initialization
from gqa_t5x.model import network
from gqa_t5x.model.config import T5Config
from training_utils import tiny_config


def _numpy_losses(logits, targets, z_loss):
    """Per-token cross-entropy and z-loss in float64 (reference for loss_fn)."""
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    log_z = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    target_logit = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return log_z - target_logit, z_loss * log_z**2


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


def test_model_score_batch_is_minus_the_per_example_cross_entropy(tiny):
    model, params, batch = tiny
    no_z = models.EncoderDecoderModel(model.module, z_loss=0.0)
    scores = np.asarray(no_z.score_batch(params, batch))
    logits = np.asarray(jax.jit(model.compute_logits)(params, batch))
    ce, _ = _numpy_losses(logits, batch["decoder_target_tokens"], 0.0)
    np.testing.assert_allclose(scores, -(ce * batch["decoder_loss_weights"]).sum(-1), rtol=1e-5)


@pytest.mark.slow
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


def _config() -> T5Config:
    return T5Config(
        vocab_size=40, dtype="float32", emb_dim=16, num_heads=4, head_dim=4, mlp_dim=24,
        num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0, num_kv_heads=2,
    )


def _batch(rng: np.random.Generator, batch: int = 3) -> dict[str, np.ndarray]:
    enc = rng.integers(2, 40, size=(batch, 7)).astype(np.int32)
    enc[1, 4:] = 0
    tgt = rng.integers(2, 40, size=(batch, 5)).astype(np.int32)
    tgt[2, 3:] = 0
    return {"encoder_input_tokens": enc, "decoder_target_tokens": tgt}


def test_score_batch_equals_the_sum_of_huggingface_target_log_probs():
    hf_reference = pytest.importorskip("hf_reference")
    hf_model = hf_reference.make_hf_t5(
        vocab_size=40, d_model=16, num_heads=4, d_kv=4, d_ff=24, num_layers=1, num_decoder_layers=1, seed=2,
    )
    config = hf_reference.our_config_for(hf_model)
    params = hf_reference.our_params_for(hf_model, config)
    batch = _batch(np.random.default_rng(0))
    tgt = batch["decoder_target_tokens"]
    logits = hf_reference.hf_logits(hf_model, batch["encoder_input_tokens"], losses.shift_right(tgt), tgt)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    expected = (np.take_along_axis(log_probs, tgt[..., None], -1)[..., 0] * (tgt > 0)).sum(-1)
    np.testing.assert_allclose(models.score_batch(config, params, batch), expected, rtol=1e-5, atol=1e-4)
    weights = np.ones_like(tgt, np.float32)
    weights[:, -1] = 0  # explicit loss weights are honoured
    partial = models.score_batch(config, params, dict(batch, decoder_loss_weights=weights * (tgt > 0)))
    last = np.take_along_axis(log_probs, tgt[..., None], -1)[:, -1, 0] * (tgt[:, -1] > 0)
    np.testing.assert_allclose(partial, expected - last, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_predict_batch_defaults_to_the_targets_length_and_strips_filler_rows():
    config = _config()
    params = initialization.init_params(config, seed=1)
    batch = _batch(np.random.default_rng(1))
    tokens, aux = models.predict_batch_with_aux(config, params, batch)
    direct = decoding.decode(config, params, batch["encoder_input_tokens"], decoding.DecodingSpec(max_decode_length=5))
    np.testing.assert_array_equal(tokens, np.asarray(direct.tokens))
    padded, padded_aux = models.predict_batch_with_aux(config, params, batch, pad_batch_to=8)
    np.testing.assert_array_equal(padded, tokens)
    np.testing.assert_allclose(padded_aux["log_probs"], aux["log_probs"], atol=1e-5)
    assert set(aux) == {"scores", "log_probs", "lengths"}
    beam = decoding.DecodingSpec(method="beam", beam_size=2)
    beams = models.predict_batch(config, params, batch, beam, return_all_decodes=True)
    assert beams.shape == (3, 2, 5)
    best = models.predict_batch(config, params, batch, beam)
    np.testing.assert_array_equal(best, beams[:, 0])


@pytest.mark.slow
def test_model_predict_methods_pass_their_config_and_arguments_through():
    config = _config()
    model = models.EncoderDecoderModel(network.Transformer(config))
    params = initialization.init_params(config, seed=1)
    batch = _batch(np.random.default_rng(2))
    three = decoding.DecodingSpec(max_decode_length=3)
    direct = decoding.decode(config, params, batch["encoder_input_tokens"], three)
    tokens = model.predict_batch(params, batch, three, pad_batch_to=4)
    assert tokens.shape == (3, 3)
    np.testing.assert_array_equal(tokens, np.asarray(direct.tokens))
    tokens, aux = model.predict_batch_with_aux(params, batch)  # the targets' length
    assert tokens.shape == (3, 5) and aux["lengths"].shape == (3,)
    beam = decoding.DecodingSpec(method="beam", beam_size=2)
    assert model.predict_batch(params, batch, beam, return_all_decodes=True).shape == (3, 2, 5)


def test_predict_batch_errors_name_the_missing_argument():
    config = _config()
    params = initialization.init_params(config, seed=1)
    enc = {"encoder_input_tokens": np.ones((2, 3), np.int32)}
    with pytest.raises(ValueError, match="max_decode_length is required"):
        models.predict_batch(config, params, enc)
    with pytest.raises(ValueError, match="batch lacks 'decoder_target_tokens'"):
        models.score_batch(config, params, enc)
    with pytest.raises(ValueError, match="pad_batch_to=1 is smaller than the batch"):
        models.predict_batch(config, params, enc, decoding.DecodingSpec(max_decode_length=2), pad_batch_to=1)


def test_loss_weights_from_lengths_cover_the_first_tokens_of_each_row():
    targets = np.array([[5, 6, 1, 0], [7, 1, 0, 0]])
    np.testing.assert_array_equal(
        models.loss_weights_from_lengths(targets, np.array([3, 1])), [[1, 1, 1, 0], [1, 0, 0, 0]]
    )


@pytest.mark.slow
def test_importing_models_loads_neither_seqio_nor_tensorflow():
    import subprocess
    import sys

    code = ("import sys, gqa_t5x.model.models as m; print('seqio' in sys.modules, 'tensorflow' in sys.modules); "
            "print(m.EncoderDecoderModel.FEATURE_CONVERTER_CLS.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "EncDecFeatureConverter"]
