"""Held-out teacher-forced scores of in-memory parameters: the one scorer of the experiments.

`score_params` batches fixed examples through `losses.score_examples` (one
compiled shape per config: the last batch is padded) and keeps per-example
sums, so callers can pair and bootstrap over examples. The study scores its
checkpoints with it (`study.evaluation`) and the planner its candidate
conversions (`planning.planner`).
"""

from __future__ import annotations

from collections.abc import Mapping
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
