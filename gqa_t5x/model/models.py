"""`EncoderDecoderModel`: T5X's model wrapper around the T5.1.1 network.

It owns what T5X's `models.EncoderDecoderModel` owns: the flax module, the
vocabularies, the feature converter class and the loss (token cross-entropy
plus z-loss, weighted by `decoder_loss_weights`; the formula is in
`losses.py`), and exposes `predict_batch`/`predict_batch_with_aux`/
`score_batch` for evaluation. Optimisation lives in `training/trainer.py`.

The module-level `score_batch`, `predict_batch` and `predict_batch_with_aux`
are the implementations, from a config and parameters (the inference run and
the decoding tests call them); the model's methods of the same names pass
their own config and the same arguments to them. Batches are dicts of int
arrays with T5X feature names: `encoder_input_tokens` `[batch, enc_len]`
(0 = padding), and for scoring `decoder_target_tokens` `[batch, dec_len]`,
optionally `decoder_input_tokens` (default: targets shifted right, starting
from 0) and `decoder_loss_weights` (default: `decoder_target_tokens > 0`).

`loss_normalizing_factor=None` sums the weighted token losses, as T5X does
by default; `'NUM_REAL_TARGET_TOKENS'` divides by the number of weighted
tokens; a number divides by that constant.

Importing this module imports neither seqio nor TensorFlow: seqio is only
loaded when `EncoderDecoderModel.FEATURE_CONVERTER_CLS` is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x.model import decoding
from gqa_t5x.model import layer_stack
from gqa_t5x.model import losses
from gqa_t5x.model import initialization
from gqa_t5x.model import network
from gqa_t5x.model.config import T5Config

if TYPE_CHECKING:
    import seqio

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


class _FeatureConverterClass:
    """`seqio.EncDecFeatureConverter`, imported when first read (not at import)."""

    def __get__(self, instance: Any, owner: type | None = None) -> type:
        import seqio

        return seqio.EncDecFeatureConverter


class EncoderDecoderModel:
    """T5X-style encoder-decoder model (loss, scoring, prediction).

    Attributes:
      module: The flax `network.Transformer`.
      input_vocabulary: Vocabulary of the inputs.
      output_vocabulary: Vocabulary of the targets.
      z_loss: Coefficient of the z-loss (T5X: 1e-4).
      label_smoothing: Label smoothing (T5X: 0).
      loss_normalizing_factor: None (sum), 'NUM_REAL_TARGET_TOKENS' or a number.
      FEATURE_CONVERTER_CLS: `seqio.EncDecFeatureConverter` (class attribute,
        seqio is imported when it is first read).
    """

    FEATURE_CONVERTER_CLS = _FeatureConverterClass()

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
        """Randomly initialised parameters (float32, T5X initialisers).

        The network's own tree: stacked (`encoder/layers/...`) for a scanned
        config, which a scanned training state keeps (checkpoints unstack it,
        `TrainState.to_tree`).
        """
        return initialization.init_variables(self.config, rng, batch_size, length)["params"]

    # ------------------------------------------------------------------ loss
    def compute_logits(
        self, params: Any, batch: Batch, dropout_rng: Array | None = None
    ) -> Array:
        """Teacher-forced logits `[batch, dec_len, vocab]` for a converted batch.

        Args:
          params: Network parameters, the unstacked (checkpoint) tree or, for
            a scanned config, the stacked one (`layer_stack.model_params`
            stacks the former here, inside the caller's jit: gradients then
            flow back to the unstacked leaves).
          batch: Features of `seqio.EncDecFeatureConverter` (packed or not).
          dropout_rng: PRNG key enabling dropout; None = deterministic.

        Returns:
          Logits (float32 from the untied output projection).
        """
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        return self.module.apply(
            {"params": layer_stack.model_params(params, self.config, cast=False)},
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
          (loss, metrics): the weighted sum of
          `losses.cross_entropy_with_z_loss` divided as
          `loss_normalizing_factor` says; metrics are SUMS over the batch's
          weighted tokens (`loss_sum`, `cross_ent_sum`, `z_loss_sum`,
          `correct`, `num_tokens`) so that they aggregate exactly across
          steps/devices.
        """
        logits = self.compute_logits(params, batch, dropout_rng)
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights")
        if weights is None:
            weights = (targets > 0).astype(jnp.float32)
        weights = weights.astype(jnp.float32)
        total, cross_ent, z_term = losses.cross_entropy_with_z_loss(
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
    def score_batch(
        self, params: Any, batch: Batch, *, return_token_log_probs: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The module-level `score_batch` with this model's config."""
        return score_batch(self.config, params, batch, return_token_log_probs=return_token_log_probs)

    def predict_batch_with_aux(
        self,
        params: Any,
        batch: Batch,
        spec: decoding.DecodingSpec | None = None,
        *,
        rng: Any = None,
        return_all_decodes: bool = False,
        pad_batch_to: int | None = None,
        kernels: Any = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The module-level `predict_batch_with_aux` with this model's config."""
        return predict_batch_with_aux(
            self.config,
            params,
            batch,
            spec,
            rng=rng,
            return_all_decodes=return_all_decodes,
            pad_batch_to=pad_batch_to,
            kernels=kernels,
        )

    def predict_batch(
        self,
        params: Any,
        batch: Batch,
        spec: decoding.DecodingSpec | None = None,
        *,
        rng: Any = None,
        return_all_decodes: bool = False,
        pad_batch_to: int | None = None,
        kernels: Any = None,
    ) -> np.ndarray:
        """The module-level `predict_batch` with this model's config."""
        return predict_batch(
            self.config,
            params,
            batch,
            spec,
            rng=rng,
            return_all_decodes=return_all_decodes,
            pad_batch_to=pad_batch_to,
            kernels=kernels,
        )


# ------------------------------------------------------------------ scoring
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


def score_batch(
    config: T5Config,
    params: Any,
    batch: Mapping[str, Any],
    *,
    return_token_log_probs: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Teacher-forced log-likelihood of `decoder_target_tokens` per example (T5X).

    seqio's `score_fn` contract on top of `losses.score_examples`.

    Args:
      config: Model config.
      params: Model parameters.
      batch: `encoder_input_tokens`, `decoder_target_tokens`, optional
        `decoder_input_tokens` and `decoder_loss_weights` (positions with
        weight > 0 are the decoder's real tokens, even a decoded id 0).
      return_token_log_probs: Also return the full log-softmax
        `[batch, dec_len, vocab]`.

    Returns:
      `[batch]` float32 sums of log p(target) over weighted positions (and the
      log-probabilities when asked).

    Raises:
      ValueError: a feature is missing (named in the error) or misshapen.
    """
    scores = losses.score_examples(
        config, params, batch, return_token_log_probs=return_token_log_probs
    )
    if return_token_log_probs:
        return scores.log_likelihood, scores.token_log_probs
    return scores.log_likelihood


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
    encoder_input_tokens = losses.require_feature(batch, "encoder_input_tokens").astype(np.int32)
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
    kernels: Any = None,
) -> np.ndarray:
    """The decodes of `predict_batch_with_aux` (same arguments), without aux.

    Returns:
      Decoded ids `[batch, len]` (0 after EOS), or `[batch, beams, len]` for
      beam search with `return_all_decodes`.
    """
    return predict_batch_with_aux(
        config,
        params,
        batch,
        spec,
        rng=rng,
        return_all_decodes=return_all_decodes,
        pad_batch_to=pad_batch_to,
        kernels=kernels,
    )[0]
