"""Hand-made evaluation files for the reproduction study's analysis.

`Evals` reads OUTPUT/evals/<key>.npz holding, per held-out set, per-example
sums: `<set>/loss` (summed token loss), `<set>/correct` (correct tokens) and
`<set>/tokens` (target tokens). These helpers write such files with a known
loss per token, so that every mean, difference and interval the analysis
computes can be worked out by hand:

* `constant`: the same loss per token on every example: every bootstrap
  resample gives exactly that value, so an interval over examples is a point.
* `per_example`: a given loss per token for each example (for paired
  differences that hold on every example while the examples differ).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gqa_t5x.experiments.study.settings import StudySettings, eval_key

# Student-t quantiles t_{0.975, df} from printed tables (not scipy).
T975 = {1: 12.7062047, 2: 4.3026527, 3: 3.1824463, 7: 2.3646243}


def tokens_for(n: int) -> np.ndarray:
    """Target tokens of n examples: 4, 5, ..., 12, 4, 5, ... (fixed, so examples pair)."""
    return (4 + np.arange(n) % 9).astype(np.float64)


def write(root: Path, key: str, settings: StudySettings, loss_per_token, accuracy: float = 0.5) -> None:
    """OUTPUT/evals/<key>.npz for every held-out set of `settings`.

    Args:
      root: OUTPUT/evals.
      key: The evaluation key (`eval_key`).
      settings: Gives the held-out sets and their sizes.
      loss_per_token: A number (every example) or one number per example
        (a longer array gives the smaller sets its first entries).
      accuracy: Correct tokens / tokens on every example.
    """
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, n in settings.heldout_examples:
        tokens = tokens_for(n)
        value = np.asarray(loss_per_token, np.float64)
        per_token = np.broadcast_to(value, (n,)) if value.ndim == 0 else value[:n]
        assert per_token.shape == (n,), (key, name, value.shape)
        arrays |= {f"{name}/loss": per_token * tokens, f"{name}/correct": accuracy * tokens,
                   f"{name}/tokens": tokens}
    np.savez(root / f"{key}.npz", **arrays)


def write_config(root: Path, settings: StudySettings, kv: int, method: str | None, alpha: float,
                 seeds: Sequence[int], values) -> None:
    """The evaluations of one configuration: one file, or one per seed.

    `values` is the loss per token: for a single-run configuration a number
    (or per-example array); for a seeded one a list with one number per seed.
    """
    h = settings.num_heads
    single = alpha == 0 and (kv == h or method != "random")
    if single:
        write(root, eval_key(kv, h, method, 0.0, None), settings, values)
        return
    assert len(values) == len(seeds), (kv, method, alpha)
    for seed, value in zip(seeds, values):
        write(root, eval_key(kv, h, method, alpha, seed), settings, value)


def write_timing(output: Path, settings: StudySettings, times: dict[str, list[float]], batch: int = 2) -> None:
    """OUTPUT/markers/timing.done.json with per-round times per variant at the study's first shape."""
    markers = output / "markers"
    markers.mkdir(parents=True, exist_ok=True)
    n_in, n_out = settings.timing_shapes[0]
    (markers / "timing.done.json").write_text(json.dumps({"batch": batch, "rounds": len(times["MHA"]), "shapes": [
        {"input_length": n_in, "output_length": n_out, "time_per_sample": times}]}))


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high) of a 95% Student-t interval, with the tabulated quantile."""
    x = np.asarray(values, np.float64)
    mean, sd = x.mean(), x.std(ddof=1)
    half = T975[x.size - 1] * sd / np.sqrt(x.size)
    return float(mean), float(mean - half), float(mean + half)
