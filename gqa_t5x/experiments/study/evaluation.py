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

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_ROW_BATCH = 128


def score_params(config: Any, params: Any, examples: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-example loss sum, correct tokens and tokens of `examples`.

    Scores with `losses.score_examples` in batches of `_ROW_BATCH` rows (the
    last one padded with all-zero rows, so one compiled shape serves all).

    Args:
      config: The model's `T5Config` (evaluated in float32 without dropout).
      params: Its parameters.
      examples: 'encoder_input_tokens' `[n, in]` and 'decoder_target_tokens'
        `[n, out]` (0 = padding; the decoder inputs are the targets shifted
        right).

    Returns:
      {'loss': [n] summed cross-entropy (minus the summed log-likelihood),
      'correct': [n] argmax = target tokens, 'tokens': [n] target tokens},
      float64.
    """
    from gqa_t5x.model import losses

    config = config.replace(dtype="float32", dropout_rate=0.0)
    encoder = np.asarray(examples["encoder_input_tokens"], np.int32)  # [n, in]
    targets = np.asarray(examples["decoder_target_tokens"], np.int32)  # [n, out]
    n = encoder.shape[0]
    rows = min(_ROW_BATCH, n)
    out: dict[str, list[np.ndarray]] = {"loss": [], "correct": [], "tokens": []}
    for start in range(0, n, rows):
        enc, tgt = encoder[start:start + rows], targets[start:start + rows]
        real = enc.shape[0]
        if real < rows:  # pad the last batch: one compiled shape
            enc = np.concatenate([enc, np.zeros((rows - real, enc.shape[1]), np.int32)])
            tgt = np.concatenate([tgt, np.zeros((rows - real, tgt.shape[1]), np.int32)])
        batch = {"encoder_input_tokens": enc, "decoder_target_tokens": tgt}
        scores = losses.score_examples(config, params, batch)
        out["loss"].append(-np.asarray(scores.log_likelihood, np.float64)[:real])
        out["correct"].append(np.asarray(scores.correct, np.float64)[:real])
        out["tokens"].append(np.asarray(scores.num_tokens, np.float64)[:real])
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
      rounds: Rounds; each times every variant once (`timing.interleaved`, after
        a warm-up round).

    Returns:
      {'batch', 'rounds', 'shapes': [{'input_length', 'output_length',
      'time_per_sample': {variant: [one value per round]}}]}.
    """
    from gqa_t5x import checkpoints
    from gqa_t5x.experiments import timing

    decoders: dict[str, dict[tuple[int, int], Any]] = {}
    for name, path in checkpoints_by_name.items():
        config, params = checkpoints.load(path)
        config = config.replace(dtype="float32", dropout_rate=0.0)
        decoders[name] = {(n_in, n_out): timing.greedy_decoder(config, params, batch=batch, input_length=n_in,
                                                               output_length=n_out)
                          for n_in, n_out in shapes}
    result: dict[str, Any] = {"batch": batch, "rounds": rounds, "shapes": []}
    for input_length, output_length in shapes:
        runs = timing.interleaved([d[(input_length, output_length)] for d in decoders.values()], rounds)
        times = {name: [seconds / batch for seconds, _ in variant_runs]
                 for name, variant_runs in zip(decoders, runs)}
        result["shapes"].append({"input_length": input_length, "output_length": output_length,
                                 "time_per_sample": times})
    return result
