"""Intervals and verdicts for the reproduction study.

Four kinds of 95% interval, and the report always says which one it shows:

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
* **articles** (`cluster_bootstrap_indices`, `clustered_mean_interval`): the
  held-out examples come in clusters (several examples cut from one source
  article), so the bootstrap resamples whole articles: examples of one
  article are not independent draws.
* **seeds + articles** (`paired_contrast`, `paired_difference`): a linear
  contrast sum_i w_i loss_i of R paired runs on the same held-out examples.
  Both sources of variation count: between seeds (the per-seed contrasts'
  variance / R) and held-out article sampling (a cluster bootstrap of the
  seed-averaged contrast): half-width = t_{R-1} sqrt(var_seeds / R +
  var_articles), p-value from the same t statistic. With R = 1 (a
  deterministic model) it is the cluster-bootstrap percentile interval and a
  bootstrap p-value. `ratio_interval` (a ratio of two contrasts) resamples
  seeds and articles jointly.

`verdict` turns the interval of a difference into the study's wording:
reproduced (excludes 0 in the paper's direction), not reproduced (excludes 0
in the other direction) or inconclusive. With several claims tested at once,
`holm` adjusts their p-values (Holm's step-down, family-wise error rate) and
`p_value_verdict` / `holm_verdicts` word the adjusted results.
`same_verdict_probability` estimates how likely a re-run with new seeds puts
the interval in the same place.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from gqa_t5x.experiments.study.resampling import (  # noqa: F401  (re-exported)
    ClusterResamples,
    Term,
    bootstrap_p_value,
    cluster_bootstrap_indices,
    cluster_resampler,
    contrast_values,
    prepare_terms,
    resample_counts,
)

CONFIDENCE = 0.95
REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
SEEDS = "t over seeds"
ROUNDS = "t over timing rounds"
EXAMPLES = "bootstrap over examples"
ARTICLES = "bootstrap over articles"
SEEDS_AND_ARTICLES = "t over seeds + bootstrap over articles"
JOINT = "bootstrap over seeds and articles"
LEVEL = 0.05  # family-wise error rate of the Holm-adjusted tests


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval.

    Attributes:
      mean: The estimate.
      low: Lower end (equal to `mean` when there is no spread to measure).
      high: Upper end.
      n: Runs (seeds) or examples it rests on.
      kind: How the interval was made (`SEEDS`, `ROUNDS`, `EXAMPLES`,
        `ARTICLES`, `SEEDS_AND_ARTICLES` or `JOINT`).
      sd: Standard deviation of the per-seed values (seeds only; else 0).
      p_value: Two-sided p-value of H0: the quantity is 0 (for differences
        and contrasts; None where no test was made, e.g. a mean loss).
    """

    mean: float
    low: float
    high: float
    n: int
    kind: str
    sd: float = 0.0
    p_value: float | None = None

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

    def to_json(self) -> dict[str, float | int | str | None]:
        """The interval as a JSON-ready dict (p_value None where no test was made)."""
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n,
                "kind": self.kind, "sd": self.sd, "p_value": self.p_value}

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


# Below this, an estimate without spread is rounding error, not a difference
# (per-token losses ~1-10 and times ~1e-4-10 s are summed in float64).
ROUNDING = 1e-12


def _t_p_value(estimate: float, se: float, df: int) -> float:
    """Two-sided p of H0: 0 for estimate / se ~ t_df (0 or 1 when se is 0)."""
    if se <= 0.0:
        # No spread: a difference that is zero up to rounding is no difference.
        return 0.0 if abs(estimate) > ROUNDING else 1.0
    from scipy import stats

    return float(min(1.0, 2.0 * stats.t.sf(abs(estimate) / se, df)))


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE, kind: str = SEEDS) -> Interval:
    """Student-t interval of the mean of per-seed values.

    Args:
      values: One value per seed (at least 2).
      confidence: Coverage.
      kind: What the values are replicates of (`SEEDS`, or `ROUNDS` of a timing).

    Returns:
      An `Interval` of that kind, with the p-value of the one-sample t test
      of mean = 0 (meaningful where the values are differences).

    Raises:
      ValueError: fewer than 2 values, or a value that is not finite.
    """
    x = np.asarray(values, np.float64)
    if x.ndim != 1 or x.size < 2:
        raise ValueError(f"t_interval needs at least 2 per-seed values; got {x.tolist()}.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"t_interval got non-finite values {x.tolist()}.")
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    se = sd / math.sqrt(x.size)
    half = t_quantile(x.size, confidence) * se
    return Interval(mean, mean - half, mean + half, int(x.size), kind, sd, _t_p_value(mean, se, x.size - 1))


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
    counts = resample_counts(n_arr.size, num_resamples, seed)
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
      An `Interval` of kind `EXAMPLES` with a bootstrap p-value of H0: 0.
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
    counts = resample_counts(nums[0].size, num_resamples, seed)
    stats = sum(c * (counts @ num) / np.maximum(counts @ den, 1e-12)
                for c, num, den in zip(coefficients, nums, dens))
    estimate = sum(c * num.sum() / den.sum() for c, num, den in zip(coefficients, nums, dens))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return Interval(float(estimate), float(low), float(high), int(nums[0].size), EXAMPLES,
                    p_value=bootstrap_p_value(stats))


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


def paired_contrast(terms: Sequence[Term], clusters: np.ndarray | None = None, *, num_resamples: int = 2000,
                    seed: int = 0, confidence: float = CONFIDENCE, kind: str | None = None) -> Interval:
    """Interval and p-value of sum_i w_i loss_i over R paired runs on the same examples.

    loss_i of run r = sum(num_i[r]) / sum(den_i[r]) (loss per token); the
    contrast is computed per run r (runs of one index share their seed) and
    averaged over runs. With R >= 2 both sources of variation count:
    var_seeds = the per-run contrasts' variance (ddof 1), var_articles = the
    cluster-bootstrap variance of the run-averaged contrast, and
    half-width = t_{0.975, R-1} sqrt(var_seeds / R + var_articles), p-value =
    2 P(t_{R-1} > |estimate| / sqrt(...)). With R = 1, the cluster-bootstrap
    percentile interval and bootstrap p-value.

    Args:
      terms: (weight, num, den) per configuration: num, den [R, n] or [n] (a
        single run, e.g. a deterministic model, taken as the same for all R).
      clusters: [n] cluster (article) id per example; None: every example is
        its own cluster.
      num_resamples: Bootstrap resamples.
      seed: Seed of the resampling.
      confidence: Coverage.
      kind: Overrides the interval's kind label.

    Returns:
      An `Interval` (kind `SEEDS_AND_ARTICLES`, n = R, sd = per-run sd; or
      with R = 1 kind `ARTICLES`, n = number of clusters) with `p_value`.
    """
    prepared, runs, n = prepare_terms(terms)
    res = cluster_resampler(clusters, n, num_resamples, seed)
    per_run, boot = contrast_values(prepared, res)
    estimate, averaged = float(per_run.mean()), boot.mean(axis=1)
    if runs == 1:
        alpha = (1 - confidence) / 2
        low, high = np.quantile(averaged, [alpha, 1 - alpha])
        return Interval(estimate, float(low), float(high), res.num_clusters, kind or ARTICLES,
                        p_value=bootstrap_p_value(averaged))
    var_seeds = float(per_run.var(ddof=1))
    var_articles = float(averaged.var(ddof=1)) if averaged.size > 1 else 0.0
    se = math.sqrt(var_seeds / runs + var_articles)
    half = t_quantile(runs, confidence) * se
    return Interval(estimate, estimate - half, estimate + half, runs, kind or SEEDS_AND_ARTICLES,
                    math.sqrt(var_seeds), _t_p_value(estimate, se, runs - 1))


def paired_difference(a_num: np.ndarray, a_den: np.ndarray, b_num: np.ndarray, b_den: np.ndarray,
                      clusters: np.ndarray | None = None, **kwargs) -> Interval:
    """Interval of loss(a) - loss(b) (loss per token) over paired runs: `paired_contrast` with weights (1, -1).

    Args:
      a_num, a_den: [R, n] (or [n]) per-example sums of configuration a.
      b_num, b_den: The same examples' (and seeds') sums of configuration b.
      clusters: [n] article id per example (None: examples independent).
      **kwargs: num_resamples, seed, confidence, kind of `paired_contrast`.

    Returns:
      An `Interval` of a - b with a two-sided p-value of H0: a - b = 0.
    """
    return paired_contrast([(1.0, a_num, a_den), (-1.0, b_num, b_den)], clusters, **kwargs)


def clustered_mean_interval(num: np.ndarray, den: np.ndarray, clusters: np.ndarray | None = None, *,
                            num_resamples: int = 2000, seed: int = 0, confidence: float = CONFIDENCE) -> Interval:
    """Loss per token sum(num) / sum(den) with a cluster (article) bootstrap percentile interval.

    Args:
      num: [n] per-example numerators (summed loss); [R, n] for R seeds gives
        the seeds + articles interval of `paired_contrast`.
      den: Per-example denominators (tokens), same shape.
      clusters: [n] article id per example (None: examples independent).
      num_resamples: Bootstrap resamples.
      seed: Seed of the resampling.
      confidence: Coverage.

    Returns:
      An `Interval` of kind `ARTICLES` (n = articles), or `SEEDS_AND_ARTICLES`
      for [R, n] sums; no p-value (a level, not a difference).
    """
    interval = paired_contrast([(1.0, num, den)], clusters, num_resamples=num_resamples, seed=seed,
                               confidence=confidence)
    return dataclasses.replace(interval, p_value=None)


def ratio_interval(numerator: Sequence[Term], denominator: Sequence[Term], clusters: np.ndarray | None = None, *,
                   num_resamples: int = 2000, seed: int = 0, confidence: float = CONFIDENCE,
                   kind: str | None = None) -> Interval:
    """Ratio of two linear contrasts (e.g. gap(GQA) / gap(MQA)) with a joint percentile bootstrap.

    The estimate is (run-averaged numerator contrast) / (run-averaged
    denominator contrast). Each resample draws R runs (seeds) with
    replacement and K articles with replacement together, and recomputes
    the ratio. For reporting: near-zero denominators make it unstable, so
    verdicts use linear contrasts (`paired_contrast`) instead.

    Args:
      numerator: Terms (weight, num, den) of the numerator contrast.
      denominator: Terms of the denominator contrast (same examples and runs).
      clusters: [n] article id per example (None: examples independent).
      num_resamples: Bootstrap resamples.
      seed: Seed of the resampling.
      confidence: Coverage.
      kind: Overrides the kind label (default `JOINT`).

    Returns:
      An `Interval` (n = R, no p-value).
    """
    prepared, runs, n = prepare_terms([*numerator, *denominator])
    res = cluster_resampler(clusters, n, num_resamples, seed)
    top_run, top_boot = contrast_values(prepared[:len(numerator)], res)
    bottom_run, bottom_boot = contrast_values(prepared[len(numerator):], res)
    seed_rng = np.random.default_rng([seed, 1])
    draws = seed_rng.integers(0, runs, size=(num_resamples, runs))
    weights = np.zeros((num_resamples, runs))
    np.add.at(weights, (np.arange(num_resamples)[:, None], draws), 1.0 / runs)
    with np.errstate(divide="ignore", invalid="ignore"):
        stats = (weights * top_boot).sum(axis=1) / (weights * bottom_boot).sum(axis=1)
        estimate = float(top_run.mean() / bottom_run.mean()) if bottom_run.mean() != 0 else math.nan
    alpha = (1 - confidence) / 2
    low, high = (np.nanquantile(stats, [alpha, 1 - alpha]) if np.any(~np.isnan(stats)) else (math.nan, math.nan))
    return Interval(estimate, float(low), float(high), runs, kind or JOINT)


def t_contrast(terms: Sequence[tuple[float, Sequence[float]]], confidence: float = CONFIDENCE,
               kind: str = ROUNDS) -> Interval:
    """Student-t interval of sum_i w_i mean(values_i) over paired replicates (e.g. timing rounds).

    Args:
      terms: (weight, per-replicate values) per configuration, replicates in
        the same order (round r of every configuration was timed together).
      confidence: Coverage.
      kind: What the replicates are (`ROUNDS` or `SEEDS`).

    Returns:
      `t_interval` of the per-replicate contrasts, with its p-value.
    """
    arrays = [(float(w), np.asarray(v, np.float64)) for w, v in terms]
    if not arrays or len({v.shape for _, v in arrays}) != 1 or arrays[0][1].ndim != 1:
        raise ValueError(f"t_contrast needs 1-D per-replicate values of one length; got "
                         f"{[v.shape for _, v in arrays]}.")
    return t_interval(sum(w * v for w, v in arrays), confidence, kind)


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


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error rate).

    The k-th smallest of m p-values becomes max over j <= k of (m - j + 1)
    p_(j), capped at 1: monotone in the raw p-values; reject where the
    adjusted p < level.

    Args:
      p_values: The family's raw p-values, each in [0, 1].

    Returns:
      The adjusted p-values in the input order.
    """
    p = np.asarray(p_values, np.float64).reshape(-1)
    if p.size and (not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(f"p-values must lie in [0, 1]; got {p.tolist()}.")
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


def p_value_verdict(estimate: float, p_value: float, expected_sign: int, level: float = LEVEL) -> str:
    """The study's wording from a (adjusted) p-value and the estimate's sign.

    Args:
      estimate: The contrast's estimate.
      p_value: Its (Holm-adjusted) two-sided p-value.
      expected_sign: +1 if the paper predicts a positive contrast, -1 if negative.
      level: Significance level.

    Returns:
      REPRODUCED (p < level, the paper's sign), NOT_REPRODUCED (p < level,
      the other sign) or INCONCLUSIVE.
    """
    if expected_sign not in (1, -1):
        raise ValueError(f"expected_sign must be +1 or -1; got {expected_sign}.")
    if p_value >= level or estimate == 0.0:
        return INCONCLUSIVE
    return REPRODUCED if np.sign(estimate) == expected_sign else NOT_REPRODUCED


def holm_verdicts(estimates: Sequence[float], p_values: Sequence[float], expected_signs: Sequence[int],
                  level: float = LEVEL) -> list[tuple[float, str]]:
    """Holm-adjusts a family's p-values and words each result.

    Args:
      estimates: The contrasts' estimates.
      p_values: Their raw two-sided p-values.
      expected_signs: The paper's sign of each (+1 or -1).
      level: Family-wise significance level.

    Returns:
      (adjusted p-value, `p_value_verdict`) per contrast, in input order.
    """
    if not len(estimates) == len(p_values) == len(expected_signs):
        raise ValueError("holm_verdicts needs one estimate, p-value and expected sign per contrast.")
    adjusted = holm(p_values)
    return [(p, p_value_verdict(e, p, s, level)) for e, p, s in zip(estimates, adjusted, expected_signs)]


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
