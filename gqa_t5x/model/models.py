"""`EncoderDecoderModel`: T5X's model wrapper around the T5.1.1 network.

It owns what T5X's `models.EncoderDecoderModel` owns: the flax module, the
vocabularies, the feature converter class and the loss (token cross-entropy
plus z-loss, weighted by `decoder_loss_weights`), and exposes
`predict_batch`/`score_batch` for evaluation. Optimisation lives in
`training/trainer.py`.

The module-level `score_batch`, `predict_batch` and `predict_batch_with_aux`
do the same from a config and parameters (the inference run and the decoding
tests use them). Batches are dicts of int arrays with T5X feature names:
`encoder_input_tokens` `[batch, enc_len]` (0 = padding), and for scoring
`decoder_target_tokens` `[batch, dec_len]`, optionally `decoder_input_tokens`
(default: targets shifted right, starting from 0) and `decoder_loss_weights`
(default: `decoder_target_tokens > 0`).

Loss (T5X `losses.compute_weighted_cross_entropy`), per target token t with
weight w_t, logits z_t and log-partition log Z_t = logsumexp(z_t):

    ce_t     = log Z_t - z_t[target_t]         (label smoothing optional)
    zloss_t  = z_loss * (log Z_t)^2
    loss     = sum_t w_t (ce_t + zloss_t) / loss_normalizing_factor

`loss_normalizing_factor=None` sums over tokens, as T5X does by default;
`'NUM_REAL_TARGET_TOKENS'` divides by the number of weighted tokens; a number
divides by that constant.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from gqa_t5x.model import decoding
from gqa_t5x.model import network
from gqa_t5x.model.config import T5Config

Array = jax.Array
Batch = Mapping[str, Array]

NUM_REAL_TARGET_TOKENS = "NUM_REAL_TARGET_TOKENS"

# Features produced by seqio.EncDecFeatureConverter (T5X names).
INPUT_FEATURES = (
    "encoder_input_tokens",
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
)
PACKING_FEATURES = (
    "encoder_segment_ids",
    "decoder_segment_ids",
    "encoder_positions",
    "decoder_positions",
)


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
        cross_entropy = log_z - expected_logit - normalizer
    else:
        cross_entropy = log_z - target_logit
    z_term = z_loss * jnp.square(log_z)
    return cross_entropy + z_term, cross_entropy, z_term


class EncoderDecoderModel:
    """T5X-style encoder-decoder model (loss, scoring, prediction).

    Attributes:
      module: The flax `network.Transformer`.
      input_vocabulary: Vocabulary of the inputs.
      output_vocabulary: Vocabulary of the targets.
      z_loss: Coefficient of the z-loss (T5X: 1e-4).
      label_smoothing: Label smoothing (T5X: 0).
      loss_normalizing_factor: None (sum), 'NUM_REAL_TARGET_TOKENS' or a number.
    """

    FEATURE_CONVERTER_CLS = seqio.EncDecFeatureConverter

    def __init__(
        self,
        module: network.Transformer,
        input_vocabulary: seqio.Vocabulary | None = None,
        output_vocabulary: seqio.Vocabulary | None = None,
        z_loss: float = 1e-4,
        label_smoothing: float = 0.0,
        loss_normalizing_factor: float | str | None = None,
    ):
        if not isinstance(module, network.Transformer):
            raise TypeError(
                "EncoderDecoderModel.module must be a gqa_t5x.model.network.Transformer, "
                f"got {type(module).__name__}; bind "
                "`models.EncoderDecoderModel.module = @network.Transformer()`."
            )
        if isinstance(loss_normalizing_factor, str) and loss_normalizing_factor != NUM_REAL_TARGET_TOKENS:
            raise ValueError(
                f"EncoderDecoderModel.loss_normalizing_factor={loss_normalizing_factor!r}; "
                f"use None, a number or {NUM_REAL_TARGET_TOKENS!r}."
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"EncoderDecoderModel.label_smoothing={label_smoothing} must be in [0, 1).")
        self.module = module
        self.input_vocabulary = input_vocabulary
        self.output_vocabulary = output_vocabulary or input_vocabulary
        self.z_loss = float(z_loss)
        self.label_smoothing = float(label_smoothing)
        self.loss_normalizing_factor = loss_normalizing_factor

    @property
    def config(self) -> T5Config:
        return self.module.config

    def with_config(self, config: T5Config) -> "EncoderDecoderModel":
        """A copy of this model whose network uses `config`."""
        return EncoderDecoderModel(
            network.Transformer(config),
            self.input_vocabulary,
            self.output_vocabulary,
            z_loss=self.z_loss,
            label_smoothing=self.label_smoothing,
            loss_normalizing_factor=self.loss_normalizing_factor,
        )

    # ---------------------------------------------------------------- params
    def get_initial_params(self, rng: Array, batch_size: int = 1, length: int = 8) -> Any:
        """Randomly initialised parameters (float32, T5X initialisers)."""
        return network.init_variables(self.config, rng, batch_size, length)["params"]

    # ------------------------------------------------------------------ loss
    def compute_logits(
        self, params: Any, batch: Batch, dropout_rng: Array | None = None
    ) -> Array:
        """Teacher-forced logits `[batch, dec_len, vocab]` for a converted batch.

        Args:
          params: Network parameters.
          batch: Features of `seqio.EncDecFeatureConverter` (packed or not).
          dropout_rng: PRNG key enabling dropout; None = deterministic.

        Returns:
          Logits (float32 from the untied output projection).
        """
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        return self.module.apply(
            {"params": params},
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            batch["decoder_target_tokens"],
            encoder_segment_ids=batch.get("encoder_segment_ids"),
            decoder_segment_ids=batch.get("decoder_segment_ids"),
            encoder_positions=batch.get("encoder_positions"),
            decoder_positions=batch.get("decoder_positions"),
            enable_dropout=dropout_rng is not None,
            rngs=rngs,
        )

    def loss_fn(
        self, params: Any, batch: Batch, dropout_rng: Array | None = None
    ) -> tuple[Array, dict[str, Array]]:
        """Training loss and summed metrics of one batch.

        Args:
          params: Network parameters.
          batch: `[batch, length]` features; `decoder_loss_weights` selects the
            target tokens that count (0 on padding).
          dropout_rng: PRNG key for dropout, or None for no dropout.

        Returns:
          (loss, metrics) where metrics are SUMS over the batch's weighted
          tokens (`loss_sum`, `cross_ent_sum`, `z_loss_sum`, `correct`,
          `num_tokens`) so that they aggregate exactly across steps/devices.
        """
        logits = self.compute_logits(params, batch, dropout_rng)
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights")
        if weights is None:
            weights = (targets > 0).astype(jnp.float32)
        weights = weights.astype(jnp.float32)
        total, cross_ent, z_term = cross_entropy_with_z_loss(
            logits, targets, self.z_loss, self.label_smoothing
        )
        loss_sum = jnp.sum(total * weights)
        num_tokens = jnp.sum(weights)
        if self.loss_normalizing_factor is None:
            loss = loss_sum
        elif self.loss_normalizing_factor == NUM_REAL_TARGET_TOKENS:
            loss = loss_sum / jnp.maximum(num_tokens, 1.0)
        else:
            loss = loss_sum / float(self.loss_normalizing_factor)
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        metrics = {
            "loss_sum": loss_sum,
            "cross_ent_sum": jnp.sum(cross_ent * weights),
            "z_loss_sum": jnp.sum(z_term * weights),
            "correct": jnp.sum(correct * weights),
            "num_tokens": num_tokens,
        }
        return loss, metrics

    # ------------------------------------------------------ scoring / decoding
    def score_batch(self, params: Any, batch: Batch) -> np.ndarray:
        """Log-likelihood of each example's targets, `[batch]` (see `score_batch`)."""
        return score_batch(self.config, params, batch)

    def predict_batch_with_aux(
        self,
        params: Any,
        batch: Batch,
        spec: decoding.DecodingSpec | None = None,
        *,
        rng: Any = None,
        return_all_decodes: bool = False,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Decodes a batch; returns decodes and aux scores (see `predict_batch_with_aux`)."""
        return predict_batch_with_aux(
            self.config, params, batch, spec, rng=rng, return_all_decodes=return_all_decodes
        )

    def predict_batch(
        self,
        params: Any,
        batch: Batch,
        spec: decoding.DecodingSpec | None = None,
        *,
        rng: Any = None,
        max_decode_length: int | None = None,
    ) -> np.ndarray:
        """Decoded ids `[batch, length]` (0 after EOS).

        Args:
          params: Network parameters.
          batch: Unpacked converted features; `encoder_input_tokens` is decoded.
          spec: What to decode (default: greedy, the paper's, to the targets'
            length).
          rng: PRNG key or int seed for sampling.
          max_decode_length: Replaces `spec.max_decode_length` when given
            (what `training/evaluation.py` passes).

        Returns:
          The best decode of every example.
        """
        spec = spec or decoding.DecodingSpec()
        if max_decode_length is not None:
            spec = dataclasses.replace(spec, max_decode_length=max_decode_length)
        return predict_batch(self.config, params, batch, spec, rng=rng)


# ------------------------------------------------------------------ scoring
def shift_right(targets: Any) -> np.ndarray:
    """Decoder inputs for `targets` `[batch, len]`: start id 0, then targets[:-1]."""
    targets = np.asarray(targets)
    out = np.zeros_like(targets)
    out[..., 1:] = targets[..., :-1]
    return out


def loss_weights_from_lengths(tokens: Any, lengths: Any) -> np.ndarray:
    """`decoder_loss_weights` covering the first `lengths` tokens of each row.

    Args:
      tokens: `[..., length]` decoded ids (only the shape is used).
      lengths: `[...]` tokens per row, e.g. `DecodeResult.lengths`.

    Returns:
      Float32 `[..., length]`, 1 on the first `lengths` positions.
    """
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    return (np.arange(tokens.shape[-1]) < lengths[..., None]).astype(np.float32)


def _require(batch: Mapping[str, Any], key: str) -> np.ndarray:
    if key not in batch:
        raise ValueError(f"batch lacks {key!r}; it has {sorted(batch)}.")
    value = np.asarray(batch[key])
    if value.ndim != 2:
        raise ValueError(f"batch[{key!r}] must be [batch, length]; got shape {value.shape}.")
    return value


@functools.lru_cache(maxsize=16)
def _scorer(config: T5Config, with_log_probs: bool):
    model = network.Transformer(config)

    @jax.jit
    def score(params, encoder_input_tokens, decoder_input_tokens, targets, weights):
        # The network derives its padding masks from `decoder_target_tokens > 0`;
        # pass the weights instead so that a decoded pad id (0) inside a
        # sequence is scored like HuggingFace and the cached decoder do.
        mask_tokens = (weights > 0).astype(jnp.int32)
        logits = model.apply(
            {"params": params},
            encoder_input_tokens,
            decoder_input_tokens,
            mask_tokens,
            enable_dropout=False,
        )  # [batch, dec_len, vocab]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        token_lp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        scores = jnp.sum(token_lp * weights, axis=-1)  # [batch]
        return (scores, log_probs) if with_log_probs else scores

    return score


def score_batch(
    config: T5Config,
    params: Any,
    batch: Mapping[str, Any],
    *,
    return_token_log_probs: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Teacher-forced log-likelihood of `decoder_target_tokens` per example (T5X).

    Args:
      config: Model config.
      params: Model parameters.
      batch: `encoder_input_tokens`, `decoder_target_tokens`, optional
        `decoder_input_tokens` and `decoder_loss_weights`.
      return_token_log_probs: Also return the full log-softmax
        `[batch, dec_len, vocab]`.

    Returns:
      `[batch]` float32 sums of log p(target) over weighted positions (and the
      log-probabilities when asked).
    """
    encoder_input_tokens = _require(batch, "encoder_input_tokens").astype(np.int32)
    targets = _require(batch, "decoder_target_tokens").astype(np.int32)
    if "decoder_input_tokens" in batch:
        decoder_input_tokens = _require(batch, "decoder_input_tokens").astype(np.int32)
    else:
        decoder_input_tokens = shift_right(targets)
    weights = np.asarray(batch.get("decoder_loss_weights", targets > 0), np.float32)
    if weights.shape != targets.shape or decoder_input_tokens.shape != targets.shape:
        raise ValueError(
            "decoder_input_tokens / decoder_loss_weights must have the shape of "
            f"decoder_target_tokens {targets.shape}; got {decoder_input_tokens.shape} / "
            f"{weights.shape}."
        )
    out = _scorer(config, bool(return_token_log_probs))(
        params, encoder_input_tokens, decoder_input_tokens, targets, weights
    )
    if return_token_log_probs:
        return np.asarray(out[0]), np.asarray(out[1])
    return np.asarray(out)


# --------------------------------------------------------------- prediction
def _pad_rows(tokens: np.ndarray, rows: int | None) -> np.ndarray:
    if rows is None or rows == tokens.shape[0]:
        return tokens
    if rows < tokens.shape[0]:
        raise ValueError(f"pad_batch_to={rows} is smaller than the batch ({tokens.shape[0]}).")
    filler = np.zeros((rows - tokens.shape[0], tokens.shape[1]), tokens.dtype)
    return np.concatenate([tokens, filler], axis=0)


def predict_batch_with_aux(
    config: T5Config,
    params: Any,
    batch: Mapping[str, Any],
    spec: decoding.DecodingSpec | None = None,
    *,
    rng: Any = None,
    return_all_decodes: bool = False,
    pad_batch_to: int | None = None,
    kernels: Any = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Decodes a batch; returns the decodes and per-example scores.

    Args:
      config: Model config.
      params: Model parameters.
      batch: `encoder_input_tokens` `[batch, enc_len]`; when the spec has no
        `max_decode_length`, the length of `decoder_input_tokens` or
        `decoder_target_tokens` is used (as T5X does).
      spec: What to decode (default: greedy, the paper's).
      rng: PRNG key or int seed for sampling.
      return_all_decodes: For 'beam', return every beam `[batch, beams, len]`
        (best first) instead of the best `[batch, len]`.
      pad_batch_to: Append all-padding filler rows up to this many (stripped
        from the outputs) so differently sized batches share one compilation.
      kernels: `decoding.step_kernels(params)`, made once by callers that
        decode many batches with the same params (default: made per call).

    Returns:
      (decodes, aux) with aux keys `scores`, `log_probs`, `lengths`.
    """
    spec = spec or decoding.DecodingSpec()
    encoder_input_tokens = _require(batch, "encoder_input_tokens").astype(np.int32)
    if spec.max_decode_length is None:
        key = next(
            (k for k in ("decoder_input_tokens", "decoder_target_tokens") if k in batch), None
        )
        if key is None:
            raise ValueError(
                "DecodingSpec.max_decode_length is required when the batch has no "
                "decoder_input_tokens / decoder_target_tokens."
            )
        spec = dataclasses.replace(spec, max_decode_length=int(np.shape(batch[key])[1]))
    n = encoder_input_tokens.shape[0]
    result = decoding.decode(
        config, params, _pad_rows(encoder_input_tokens, pad_batch_to), spec, rng=rng, kernels=kernels
    )
    tokens, log_probs = np.asarray(result.tokens)[:n], np.asarray(result.log_probs)[:n]
    scores, lengths = np.asarray(result.scores)[:n], np.asarray(result.lengths)[:n]
    if spec.method == "beam" and not return_all_decodes:
        tokens, log_probs, scores, lengths = tokens[:, 0], log_probs[:, 0], scores[:, 0], lengths[:, 0]
    return tokens, {"scores": scores, "log_probs": log_probs, "lengths": lengths}


def predict_batch(
    config: T5Config,
    params: Any,
    batch: Mapping[str, Any],
    spec: decoding.DecodingSpec | None = None,
    *,
    rng: Any = None,
    return_all_decodes: bool = False,
    pad_batch_to: int | None = None,
) -> np.ndarray:
    """Decoded ids `[batch, len]` (see `predict_batch_with_aux` for arguments)."""
    return predict_batch_with_aux(
        config,
        params,
        batch,
        spec,
        rng=rng,
        return_all_decodes=return_all_decodes,
        pad_batch_to=pad_batch_to,
    )[0]
