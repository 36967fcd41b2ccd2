"""`EncoderDecoderModel`: T5X's model wrapper around the T5.1.1 network.

It owns what T5X's `models.EncoderDecoderModel` owns: the flax module, the
vocabularies, the feature converter class and the loss (token cross-entropy
plus z-loss, weighted by `decoder_loss_weights`), and exposes
`predict_batch`/`score_batch` for evaluation. Optimisation lives in
`trainer.py`.

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

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from gqa_t5x.model import network

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
                "EncoderDecoderModel.module must be a gqa_t5x.network.Transformer, "
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
    def config(self) -> network.T5Config:
        return self.module.config

    def with_config(self, config: network.T5Config) -> "EncoderDecoderModel":
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
        tokens = jnp.ones((batch_size, length), jnp.int32)
        return self.module.init(rng, tokens, tokens, tokens, enable_dropout=False)["params"]

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

    # ---------------------------------------------------------------- scoring
    def score_batch(self, params: Any, batch: Batch) -> np.ndarray:
        """Log-likelihood of each example's targets, `[batch]` (T5X semantics).

        Delegates to `gqa_t5x.inference.score_batch` (teacher forcing, jit).

        Args:
          params: Network parameters.
          batch: Unpacked converted features (`encoder_input_tokens`,
            `decoder_target_tokens`, optionally `decoder_input_tokens` and
            `decoder_loss_weights`).

        Returns:
          Sum over weighted target tokens of log p(target_t | ...).
        """
        from gqa_t5x.training import inference

        return inference.score_batch(self.config, params, batch)

    # -------------------------------------------------------------- prediction
    def predict_batch(self, params: Any, batch: Batch, **kwargs: Any) -> np.ndarray:
        """Decodes a batch through `gqa_t5x.inference.predict_batch`.

        Args:
          params: Network parameters.
          batch: Unpacked converted features; `encoder_input_tokens` is
            decoded; without `max_decode_length` the targets' length is used.
          **kwargs: `method` ('greedy', the paper's, 'sample', 'beam'),
            `max_decode_length`, `eos_id`, ... (see `inference.predict_batch`).

        Returns:
          Decoded ids `[batch, max_decode_length]` (0 after EOS).
        """
        from gqa_t5x.training import inference  # Decoding is only needed for prediction.

        if kwargs.get("max_decode_length") is None:
            kwargs.pop("max_decode_length", None)
        return inference.predict_batch(self.config, params, batch, **kwargs)
