"""Task postprocessors: what seqio hands a task's metrics as targets.

seqio calls `postprocess_fn(text, example=..., is_target=...)` on every
decoded target (and prediction) before the metrics see them (T5's
`t5.data.postprocessors` convention).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tensorflow as tf


def qa_postprocess(
    output: str, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> Any:
    """Targets become the example's list of acceptable answers (T5's `qa`).

    Args:
      output: Decoded text.
      example: The task's example (with `answers`) when `is_target`.
      is_target: Whether `output` is a target.

    Returns:
      [answers] for targets, the text itself for predictions.
    """
    if is_target:
        return [tf.compat.as_text(a) for a in example["answers"]]
    return output


def target_token_count(
    output: str, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> Any:
    """Targets become their token count (EOS included), for `metrics.token_loss`.

    Span-corrupted targets are sentinels and fragments, not text to compare;
    the score metrics need how many tokens each example's log-likelihood sums.

    Args:
      output: Decoded text.
      example: The task's tokenized example when `is_target`.
      is_target: Whether `output` is a target.

    Returns:
      The number of target tokens for targets, the text for predictions.
    """
    if is_target:
        return int(len(example["targets"]))
    return output
