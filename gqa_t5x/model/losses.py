"""Token losses and the one teacher-forced scorer (T5X's `losses.py`).

`cross_entropy_with_z_loss` is the per-token training loss of
`EncoderDecoderModel.loss_fn`. For a target token t with logits z_t, weight
w_t and log-partition log Z_t = logsumexp(z_t):

    ce_t     = log Z_t - z_t[target_t]             (without label smoothing)
    zloss_t  = z_loss * (log Z_t)^2
    loss     = sum_t w_t (ce_t + zloss_t) / loss_normalizing_factor

With label smoothing s over a vocabulary of V items, the target
distribution puts 1 - s on the target and s / (V - 1) on every other item,
and its entropy is subtracted so that the optimum scores 0 (as in T5X).

`score_examples` is the one teacher-forced scorer of a batch: per example,
the summed log-likelihood sum_t w_t log p(target_t) (= -sum_t w_t ce_t), the
weighted count of positions whose argmax is the target, and the summed
weights. `models.score_batch` (seqio's `score_fn`) and the study's held-out
evaluation (`experiments/study/evaluation.py`) both use it.

Batches are dicts of int arrays with T5X feature names:
`encoder_input_tokens` `[batch, enc_len]` (0 = padding),
`decoder_target_tokens` `[batch, dec_len]`, optionally `decoder_input_tokens`
(default: `shift_right` of the targets) and `decoder_loss_weights` (default:
`decoder_target_tokens > 0`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x.model import layer_stack
from gqa_t5x.model import network
from gqa_t5x.model.config import T5Config

Array = jax.Array


def cross_entropy_with_z_loss(
    logits: Array,
    targets: Array,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[Array, Array, Array]:
    """Per-token cross-entropy and z-loss.

    Args:
      logits: `[batch, length, vocab]` (any float dtype; computed in float32).
      targets: `[batch, length]` integer ids.
      z_loss: Coefficient of (log Z)^2.
      label_smoothing: Mass spread uniformly over the other vocabulary items.

    Returns:
      (total, cross_entropy, z_loss_term), each `[batch, length]` float32,
      with total = cross_entropy + z_loss_term.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, length]
    target_logit = jnp.take_along_axis(
        logits, targets[..., None].astype(jnp.int32), axis=-1
    )[..., 0]  # [batch, length]
    if label_smoothing:
        confidence = 1.0 - label_smoothing
        low = label_smoothing / (vocab - 1)
        # Entropy of the smoothed target distribution: its minimum loss.
        normalizer = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
        expected_logit = confidence * target_logit + low * (jnp.sum(logits, axis=-1) - target_logit)
        cross_entropy = log_z - expected_logit - normalizer  # [batch, length]
    else:
        cross_entropy = log_z - target_logit  # [batch, length]
    z_term = z_loss * jnp.square(log_z)  # [batch, length]
    return cross_entropy + z_term, cross_entropy, z_term


def shift_right(targets: Any) -> np.ndarray:
    """Teacher-forcing decoder inputs: start id 0, then the targets but the last.

    Args:
      targets: `[..., length]` target ids.

    Returns:
      `[..., length]` ids (same dtype), `out[..., 0] = 0` and
      `out[..., 1:] = targets[..., :-1]`.
    """
    targets = np.asarray(targets)
    out = np.zeros_like(targets)  # [..., length]
    out[..., 1:] = targets[..., :-1]
    return out


def require_feature(batch: Mapping[str, Any], key: str) -> np.ndarray:
    """`batch[key]` as a numpy array, checked to be `[batch, length]`.

    Args:
      batch: Features by name.
      key: The feature needed.

    Returns:
      The feature as a 2-D numpy array.

    Raises:
      ValueError: the batch lacks `key` (the error names it and what the
        batch has), or the feature is not 2-D.
    """
    if key not in batch:
        raise ValueError(f"batch lacks {key!r}; it has {sorted(batch)}.")
    value = np.asarray(batch[key])
    if value.ndim != 2:
        raise ValueError(f"batch[{key!r}] must be [batch, length]; got shape {value.shape}.")
    return value


class ExampleScores(NamedTuple):
    """Per-example teacher-forced scores of a batch (`score_examples`).

    Attributes:
      log_likelihood: `[batch]` float32, sum over positions of
        w_t * log p(target_t).
      correct: `[batch]` float32, sum over positions of
        w_t * [argmax logits_t == target_t].
      num_tokens: `[batch]` float32, sum of the weights w_t.
      token_log_probs: `[batch, dec_len, vocab]` float32 log-softmax of the
        logits when asked for, else None.
    """

    log_likelihood: np.ndarray
    correct: np.ndarray
    num_tokens: np.ndarray
    token_log_probs: np.ndarray | None = None


@functools.lru_cache(maxsize=16)
def _jitted_scorer(config: T5Config, with_log_probs: bool) -> Callable[..., tuple[Array, ...]]:
    """The compiled scorer of one config (cached: one compilation per shape)."""
    model = network.Transformer(config)

    @jax.jit
    def score(params, encoder_input_tokens, decoder_input_tokens, targets, weights):
        # The network derives its decoder padding masks from
        # `decoder_target_tokens > 0`; pass the weights' support instead, so a
        # decoded pad id (0) inside a weighted sequence is attended to and
        # scored like HuggingFace (with that attention mask) and the cached
        # decoder do.
        mask_tokens = (weights > 0).astype(jnp.int32)  # [batch, dec_len]
        logits = model.apply(
            {"params": layer_stack.model_params(params, config)},
            encoder_input_tokens,
            decoder_input_tokens,
            mask_tokens,
            enable_dropout=False,
        ).astype(jnp.float32)  # [batch, dec_len, vocab]
        log_probs = jax.nn.log_softmax(logits, axis=-1)  # [batch, dec_len, vocab]
        token_lp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [batch, dec_len]
        hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)  # [batch, dec_len]
        log_likelihood = jnp.sum(token_lp * weights, axis=-1)  # [batch]
        correct = jnp.sum(hits * weights, axis=-1)  # [batch]
        num_tokens = jnp.sum(weights, axis=-1)  # [batch]
        if with_log_probs:
            return log_likelihood, correct, num_tokens, log_probs
        return log_likelihood, correct, num_tokens

    return score


def score_examples(
    config: T5Config,
    params: Any,
    batch: Mapping[str, Any],
    *,
    return_token_log_probs: bool = False,
) -> ExampleScores:
    """Teacher-forced scores of every example of a batch.

    The network runs without dropout in `config.dtype`; log-probabilities are
    computed in float32.

    Args:
      config: Model config.
      params: Model parameters.
      batch: `encoder_input_tokens` `[batch, enc_len]` and
        `decoder_target_tokens` `[batch, dec_len]`, optionally
        `decoder_input_tokens` (default: `shift_right` of the targets) and
        `decoder_loss_weights` (default: `decoder_target_tokens > 0`), both
        `[batch, dec_len]`. Positions with weight > 0 are the decoder's real
        tokens, whatever their id.
      return_token_log_probs: Also return the log-softmax
        `[batch, dec_len, vocab]`.

    Returns:
      `ExampleScores` of numpy arrays: summed log-likelihood, correct argmax
      tokens and tokens (weights) per example.

    Raises:
      ValueError: a feature is missing (the error names it) or has the
        wrong rank or shape.
    """
    encoder_input_tokens = require_feature(batch, "encoder_input_tokens").astype(np.int32)  # [batch, enc_len]
    targets = require_feature(batch, "decoder_target_tokens").astype(np.int32)  # [batch, dec_len]
    if "decoder_input_tokens" in batch:
        decoder_input_tokens = require_feature(batch, "decoder_input_tokens").astype(np.int32)
    else:
        decoder_input_tokens = shift_right(targets)  # [batch, dec_len]
    if "decoder_loss_weights" in batch:
        weights = require_feature(batch, "decoder_loss_weights").astype(np.float32)
    else:
        weights = (targets > 0).astype(np.float32)  # [batch, dec_len]
    if decoder_input_tokens.shape != targets.shape or weights.shape != targets.shape:
        raise ValueError(
            "decoder_input_tokens / decoder_loss_weights must have the shape of "
            f"decoder_target_tokens {targets.shape}; got {decoder_input_tokens.shape} / "
            f"{weights.shape}."
        )
    if encoder_input_tokens.shape[0] != targets.shape[0]:
        raise ValueError(
            f"encoder_input_tokens has {encoder_input_tokens.shape[0]} rows but "
            f"decoder_target_tokens has {targets.shape[0]}; they must be paired."
        )
    out = _jitted_scorer(config, bool(return_token_log_probs))(
        params, encoder_input_tokens, decoder_input_tokens, targets, weights
    )
    return ExampleScores(*(np.asarray(x) for x in out))
