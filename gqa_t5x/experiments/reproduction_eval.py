"""Held-out span-corruption scores per example, and interleaved decoding timing.

`score_checkpoint` is the study's evaluation: teacher-forced cross-entropy
and argmax accuracy of every target token of fixed held-out examples. It
keeps the per-example sums (loss, correct tokens, tokens), so the report can
bootstrap over examples and pair configurations example by example. Its
loss per token is what `--run_mode=eval` reports as `cross_ent_loss` on the
same examples (`metrics.token_loss`, without z-loss); the token accuracy is
the training log's `accuracy` (argmax = target).

`time_variants` measures greedy decoding time per sample of several
checkpoints in interleaved rounds (`timing.time_params`), so load from other
processes falls on all of them alike and each round gives one paired
difference.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_ROW_BATCH = 128


@functools.lru_cache(maxsize=8)
def _scorer(config: Any):
    import jax
    import jax.numpy as jnp

    from gqa_t5x.model import network

    model = network.Transformer(config)

    @jax.jit
    def score(params, encoder_tokens, decoder_inputs, targets):
        logits = model.apply({"params": params}, encoder_tokens, decoder_inputs, targets, enable_dropout=False)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        token_lp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        weights = (targets > 0).astype(jnp.float32)
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * weights
        return -jnp.sum(token_lp * weights, -1), jnp.sum(correct, -1), jnp.sum(weights, -1)

    return score


def score_params(config: Any, params: Any, examples: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-example loss sum, correct tokens and tokens of `examples`.

    Args:
      config: The model's `T5Config` (evaluated in float32 without dropout).
      params: Its parameters.
      examples: 'encoder_input_tokens' `[n, in]` and 'decoder_target_tokens'
        `[n, out]` (0 = padding).

    Returns:
      {'loss': [n] summed cross-entropy, 'correct': [n], 'tokens': [n]} float64.
    """
    from gqa_t5x.model import models

    score = _scorer(config.replace(dtype="float32", dropout_rate=0.0))
    encoder = np.asarray(examples["encoder_input_tokens"], np.int32)
    targets = np.asarray(examples["decoder_target_tokens"], np.int32)
    n = encoder.shape[0]
    rows = min(_ROW_BATCH, n)
    out: dict[str, list[np.ndarray]] = {"loss": [], "correct": [], "tokens": []}
    for start in range(0, n, rows):
        enc, tgt = encoder[start:start + rows], targets[start:start + rows]
        real = enc.shape[0]
        if real < rows:  # pad the last batch: one compiled shape
            enc = np.concatenate([enc, np.zeros((rows - real, enc.shape[1]), np.int32)])
            tgt = np.concatenate([tgt, np.zeros((rows - real, tgt.shape[1]), np.int32)])
        values = score(params, enc, models.shift_right(tgt), tgt)
        for name, value in zip(("loss", "correct", "tokens"), values):
            out[name].append(np.asarray(value, np.float64)[:real])
    return {k: np.concatenate(v) for k, v in out.items()}


def score_checkpoint(path: str, sets: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`score_params` of a checkpoint on every held-out set.

    Args:
      path: Any checkpoint the checkpoints package reads.
      sets: {set name: examples}.

    Returns:
      {'<set>/loss', '<set>/correct', '<set>/tokens': [n]} arrays.
    """
    from gqa_t5x import checkpoints

    config, params = checkpoints.load(path)
    out = {}
    for name, examples in sets.items():
        for key, value in score_params(config, params, examples).items():
            out[f"{name}/{key}"] = value
    return out


def summary(scores: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """{set: {'loss': per token, 'accuracy': per token, 'tokens': n}} of `score_checkpoint`'s output."""
    sets = sorted({k.split("/")[0] for k in scores})
    out = {}
    for name in sets:
        tokens = float(scores[f"{name}/tokens"].sum())
        out[name] = {"loss": float(scores[f"{name}/loss"].sum()) / tokens,
                     "accuracy": float(scores[f"{name}/correct"].sum()) / tokens, "tokens": tokens}
    return out


def time_variants(checkpoints_by_name: Mapping[str, str], shapes: Sequence[tuple[int, int]], *,
                  batch: int, rounds: int) -> dict[str, Any]:
    """Interleaved greedy-decoding time per sample of several checkpoints.

    Args:
      checkpoints_by_name: {variant: checkpoint path}.
      shapes: (input length, output length) pairs.
      batch: Samples decoded together.
      rounds: Rounds; each times every variant once (after a warm-up).

    Returns:
      {'batch', 'rounds', 'shapes': [{'input_length', 'output_length',
      'time_per_sample': {variant: [one value per round]}}]}.
    """
    from gqa_t5x import checkpoints
    from gqa_t5x.experiments import timing

    models = {}
    for name, path in checkpoints_by_name.items():
        config, params = checkpoints.load(path)
        models[name] = (config.replace(dtype="float32", dropout_rate=0.0), params)
    result: dict[str, Any] = {"batch": batch, "rounds": rounds, "shapes": []}
    for input_length, output_length in shapes:
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(rounds):
            for name, (config, params) in models.items():
                measured = timing.time_params(config, params, batch=batch, input_length=input_length,
                                              output_length=output_length, repeats=1)
                times[name].append(float(measured["time_per_sample"]))
        result["shapes"].append({"input_length": input_length, "output_length": output_length,
                                 "time_per_sample": times})
    return result
