"""Intervals and verdicts for the reproduction study.

Two kinds of 95% interval, and the report always says which one it shows:

* **seeds** (`t_interval`, `paired_t_interval`): Student-t over runs that
  differ only in their seed (uptraining / fine-tuning data order, and the
  initialisation of methods that draw random numbers). With n = 3 seeds the
  half-width is t_{0.975, 2} = 4.303 standard errors. Differences between
  two configurations are taken per seed (the runs of one seed share their
  data order), so the interval is that of the paired differences.
* **examples** (`bootstrap_ratio`, `paired_bootstrap_ratio`): a bootstrap
  over held-out examples, for configurations without seed variance (a
  deterministic conversion evaluated without uptraining). The statistic is a
  ratio of sums (loss per token = summed loss / summed tokens), recomputed on
  every resample; differences resample the same examples for both sides
  (paired). Percentile intervals.

`verdict` turns the interval of a difference into the study's wording:
reproduced (excludes 0 in the paper's direction), not reproduced (excludes 0
in the other direction) or inconclusive. `same_verdict_probability` estimates
how likely a re-run with new seeds puts the interval in the same place.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95
REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
SEEDS = "t over seeds"
ROUNDS = "t over timing rounds"
EXAMPLES = "bootstrap over examples"


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval.

    Attributes:
      mean: The estimate.
      low: Lower end (equal to `mean` when there is no spread to measure).
      high: Upper end.
      n: Runs (seeds) or examples it rests on.
      kind: `SEEDS` or `EXAMPLES` (how the interval was made).
      sd: Standard deviation of the per-seed values (seeds only; else 0).
    """

    mean: float
    low: float
    high: float
    n: int
    kind: str
    sd: float = 0.0

    @property
    def half_width(self) -> float:
        """Half the interval's width."""
        return (self.high - self.low) / 2

    def excludes_zero(self) -> int:
        """+1 if the interval lies above 0, -1 if below, 0 if it contains 0."""
        if self.low > 0:
            return 1
        if self.high < 0:
            return -1
        return 0

    def overlaps(self, other: Interval) -> bool:
        """True when the two intervals share at least one point."""
        return self.low <= other.high and other.low <= self.high

    def to_json(self) -> dict[str, float | int | str]:
        """The interval as a JSON-ready dict."""
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n,
                "kind": self.kind, "sd": self.sd}

    def format(self, digits: int = 3) -> str:
        """'mean +- half-width' for tables."""
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student-t quantile for n values (n - 1 degrees of freedom).

    Args:
      n: Number of values, >= 2.
      confidence: Coverage, e.g. 0.95.

    Returns:
      t_{(1 + confidence) / 2, n - 1}, e.g. 4.303 for n = 3.
    """
    if n < 2:
        raise ValueError(f"A t interval needs at least 2 values; got {n}.")
    from scipy import stats

    return float(stats.t.ppf((1 + confidence) / 2, n - 1))


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE, kind: str = SEEDS) -> Interval:
    """Student-t interval of the mean of per-seed values.

    Args:
      values: One value per seed (at least 2).
      confidence: Coverage.
      kind: What the values are replicates of (`SEEDS`, or `ROUNDS` of a timing).

    Returns:
      An `Interval` of that kind.

    Raises:
      ValueError: fewer than 2 values, or a value that is not finite.
    """
    x = np.asarray(values, np.float64)
    if x.ndim != 1 or x.size < 2:
        raise ValueError(f"t_interval needs at least 2 per-seed values; got {x.tolist()}.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"t_interval got non-finite values {x.tolist()}.")
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    half = t_quantile(x.size, confidence) * sd / math.sqrt(x.size)
    return Interval(mean, mean - half, mean + half, int(x.size), kind, sd)


def paired_t_interval(a: Sequence[float], b: Sequence[float],
                      confidence: float = CONFIDENCE, kind: str = SEEDS) -> Interval:
    """Interval of mean(a - b) from per-seed pairs (a[i] and b[i] share seed i).

    Args:
      a: Per-seed values of the first configuration.
      b: Per-seed values of the second, in the same seed order (a single
        value is broadcast: a configuration without seed variance).
      confidence: Coverage.
      kind: What the pairs are replicates of (`SEEDS` or `ROUNDS`).

    Returns:
      An `Interval` of that kind for a - b.
    """
    a_arr, b_arr = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if b_arr.size == 1:
        b_arr = np.full_like(a_arr, float(b_arr.reshape(())))
    if a_arr.size == 1:
        a_arr = np.full_like(b_arr, float(a_arr.reshape(())))
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"Paired values need the same seeds; got {a_arr.size} and {b_arr.size} values.")
    return t_interval(a_arr - b_arr, confidence, kind)


def _check_sums(num: np.ndarray, den: np.ndarray) -> None:
    if num.ndim != 1 or num.shape != den.shape or num.size == 0:
        raise ValueError(
            f"Per-example numerators and denominators must be 1-D of one length; "
            f"got shapes {num.shape} and {den.shape}."
        )
    if den.sum() <= 0:
        raise ValueError("The per-example denominators (token counts) sum to 0.")


def _resamples(n: int, num_resamples: int, seed: int) -> np.ndarray:
    """[num_resamples, n] counts of each example in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(num_resamples, n))
    counts = np.zeros((num_resamples, n), np.float64)
    np.add.at(counts, (np.arange(num_resamples)[:, None], idx), 1.0)
    return counts


def bootstrap_ratio(num: Sequence[float], den: Sequence[float], *, num_resamples: int = 2000,
                    seed: int = 0, confidence: float = CONFIDENCE) -> Interval:
    """Percentile bootstrap of sum(num) / sum(den) over examples.

    Args:
      num: Per-example numerators (e.g. summed token loss).
      den: Per-example denominators (e.g. target tokens).
      num_resamples: Bootstrap resamples.
      seed: Seed of the resampling.
      confidence: Coverage.

    Returns:
      An `Interval` of kind `EXAMPLES`.
    """
    n_arr, d_arr = np.asarray(num, np.float64), np.asarray(den, np.float64)
    _check_sums(n_arr, d_arr)
    counts = _resamples(n_arr.size, num_resamples, seed)
    stats = (counts @ n_arr) / np.maximum(counts @ d_arr, 1e-12)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return Interval(float(n_arr.sum() / d_arr.sum()), float(low), float(high), int(n_arr.size), EXAMPLES)


def bootstrap_contrast(numerators: Sequence[Sequence[float]], denominators: Sequence[Sequence[float]],
                       coefficients: Sequence[float], *, num_resamples: int = 2000, seed: int = 0,
                       confidence: float = CONFIDENCE) -> Interval:
    """Bootstrap of sum_i c_i sum(num_i) / sum(den_i), resampling the same examples for every i.

    Args:
      numerators: Per-example numerators of each configuration (same examples).
      denominators: Their per-example denominators.
      coefficients: c_i, e.g. (1, -1) for a difference.
      num_resamples: Bootstrap resamples.
      seed: Seed of the resampling.
      confidence: Coverage.

    Returns:
      An `Interval` of kind `EXAMPLES`.
    """
    nums = [np.asarray(x, np.float64) for x in numerators]
    dens = [np.asarray(x, np.float64) for x in denominators]
    if not nums or len(nums) != len(dens) or len(nums) != len(coefficients):
        raise ValueError("bootstrap_contrast needs one numerator, denominator and coefficient per configuration.")
    for num, den in zip(nums, dens):
        _check_sums(num, den)
    if len({num.size for num in nums}) != 1:
        raise ValueError(
            f"A paired bootstrap needs the same examples; got {sorted({num.size for num in nums})} examples."
        )
    counts = _resamples(nums[0].size, num_resamples, seed)
    stats = sum(c * (counts @ num) / np.maximum(counts @ den, 1e-12)
                for c, num, den in zip(coefficients, nums, dens))
    estimate = sum(c * num.sum() / den.sum() for c, num, den in zip(coefficients, nums, dens))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return Interval(float(estimate), float(low), float(high), int(nums[0].size), EXAMPLES)


def paired_bootstrap_ratio(num_a: Sequence[float], den_a: Sequence[float], num_b: Sequence[float],
                           den_b: Sequence[float], *, num_resamples: int = 2000, seed: int = 0,
                           confidence: float = CONFIDENCE) -> Interval:
    """Bootstrap of sum(num_a)/sum(den_a) - sum(num_b)/sum(den_b), same examples for both.

    Args:
      num_a, den_a: Per-example sums of configuration a.
      num_b, den_b: The same examples' sums of configuration b.
      num_resamples: Bootstrap resamples.
      seed: Seed of the resampling.
      confidence: Coverage.

    Returns:
      An `Interval` of kind `EXAMPLES` for a - b.
    """
    return bootstrap_contrast([num_a, num_b], [den_a, den_b], [1.0, -1.0], num_resamples=num_resamples,
                              seed=seed, confidence=confidence)


def verdict(interval: Interval, expected_sign: int) -> str:
    """The study's wording for a difference whose sign the paper predicts.

    Args:
      interval: Interval of the difference.
      expected_sign: +1 if the paper predicts a positive difference, -1 if
        negative.

    Returns:
      REPRODUCED, NOT_REPRODUCED or INCONCLUSIVE.
    """
    if expected_sign not in (1, -1):
        raise ValueError(f"expected_sign must be +1 or -1; got {expected_sign}.")
    side = interval.excludes_zero()
    if side == expected_sign:
        return REPRODUCED
    if side == -expected_sign:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """A claim made of several parts: reproduced only if every part is;
    not reproduced if any part is; else inconclusive."""
    if not verdicts:
        raise ValueError("combine_verdicts needs at least one verdict.")
    if any(v == NOT_REPRODUCED for v in verdicts):
        return NOT_REPRODUCED
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    return INCONCLUSIVE


def same_verdict_probability(interval: Interval, confidence: float = CONFIDENCE) -> float:
    """Chance that a re-run with as many new seeds puts its interval in the same place.

    The places are: above 0, below 0, containing 0. For a seed interval with
    mean m and per-seed sd s over n seeds, a re-run's mean is modelled as
    Normal(m, 2 s^2 / n) (the uncertainty of m plus the new sampling) and its
    half-width as t s / sqrt(n). An examples interval does not depend on
    seeds (the same checkpoint on the same examples gives the same numbers),
    so its probability is 1.

    Args:
      interval: The interval of a difference.
      confidence: Coverage of the re-run's interval.

    Returns:
      A probability in [0, 1].
    """
    if interval.kind == EXAMPLES or interval.n < 2 or interval.sd == 0.0:
        return 1.0
    from scipy import stats

    half = t_quantile(interval.n, confidence) * interval.sd / math.sqrt(interval.n)
    spread = interval.sd * math.sqrt(2.0 / interval.n)
    above = float(stats.norm.sf((half - interval.mean) / spread))
    below = float(stats.norm.cdf((-half - interval.mean) / spread))
    side = interval.excludes_zero()
    return above if side == 1 else below if side == -1 else max(0.0, 1.0 - above - below)
