"""Resampling machinery of the study's intervals (`statistics.py` builds on it).

* `resample_counts`: bootstrap resamples as counts of each item.
* `cluster_bootstrap_indices` / `ClusterResamples`: resamples of whole
  clusters (held-out examples are clustered by their source article).
* `prepare_terms` / `contrast_values`: linear contrasts sum_i w_i loss_i of
  paired runs (loss per token = a ratio of sums), per run and per resample.
* `bootstrap_p_value`: a two-sided bootstrap p-value of H0: 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# One term of a linear contrast: (weight, numerators, denominators). The sums
# are [R, n_examples] (R paired runs on the same n held-out examples) or
# [n_examples] (one run: a deterministic model, broadcast to the R runs).
Term = tuple[float, "np.typing.ArrayLike", "np.typing.ArrayLike"]


def resample_counts(n: int, num_resamples: int, seed: int) -> np.ndarray:
    """[num_resamples, n] counts of each example in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(num_resamples, n))
    counts = np.zeros((num_resamples, n), np.float64)
    np.add.at(counts, (np.arange(num_resamples)[:, None], idx), 1.0)
    return counts


def bootstrap_p_value(stats: np.ndarray) -> float:
    """Two-sided bootstrap p of H0: 0: twice the smaller share of resamples on
    either side of 0 (with the +1 correction), capped at 1. It is below
    1 - confidence about when the percentile interval excludes 0."""
    stats = stats[~np.isnan(stats)]
    stats = np.where(np.abs(stats) <= 1e-12, 0.0, stats)  # rounding error is no difference
    below, above = int(np.sum(stats <= 0.0)), int(np.sum(stats >= 0.0))
    return float(min(1.0, 2.0 * (min(below, above) + 1) / (stats.size + 1)))


@dataclasses.dataclass(frozen=True)
class ClusterResamples:
    """Bootstrap resamples of whole clusters (e.g. the source articles of held-out examples).

    Attributes:
      cluster_of: [n_examples] index in 0..K-1 of each example's cluster
        (clusters numbered in sorted order of their ids).
      counts: [num_resamples, K] how often each cluster is drawn in each
        resample (each row sums to K).
    """

    cluster_of: np.ndarray
    counts: np.ndarray

    @property
    def num_clusters(self) -> int:
        """K, the number of clusters."""
        return int(self.counts.shape[1])

    def cluster_sums(self, values: np.ndarray) -> np.ndarray:
        """Per-cluster sums of per-example values.

        Args:
          values: [n_examples] or [R, n_examples].

        Returns:
          [K] or [R, K].
        """
        v = np.asarray(values, np.float64)
        rows = np.atleast_2d(v)
        out = np.stack([np.bincount(self.cluster_of, weights=row, minlength=self.num_clusters) for row in rows])
        return out if v.ndim == 2 else out[0]

    def example_weights(self) -> np.ndarray:
        """[num_resamples, n_examples]: how often each example is drawn (its cluster's count)."""
        return self.counts[:, self.cluster_of]


def cluster_bootstrap_indices(clusters: np.ndarray, num_resamples: int, seed: int) -> ClusterResamples:
    """Draws bootstrap resamples of whole clusters.

    Each resample draws K clusters with replacement out of the K clusters; an
    example enters as often as its cluster is drawn. With every example its
    own cluster (ids 0..n-1 in example order) this is exactly the example
    bootstrap of `bootstrap_ratio` with the same seed.

    Args:
      clusters: [n_examples] integer cluster id (source article) of each example.
      num_resamples: Bootstrap resamples.
      seed: Seed of the resampling.

    Returns:
      A `ClusterResamples` (cluster of each example, draws per resample).
    """
    ids = np.asarray(clusters)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"clusters must be a non-empty 1-D array of ids; got shape {ids.shape}.")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1; got {num_resamples}.")
    _, cluster_of = np.unique(ids, return_inverse=True)
    cluster_of = cluster_of.reshape(-1)
    return ClusterResamples(cluster_of, resample_counts(int(cluster_of.max()) + 1, num_resamples, seed))


def prepare_terms(terms: Sequence[Term]) -> tuple[list[tuple[float, np.ndarray, np.ndarray]], int, int]:
    """Checks a contrast's terms and broadcasts single runs to the others' R.

    Args:
      terms: (weight, num, den) per configuration, num and den [R, n] or [n].

    Returns:
      ([(weight, num[R, n], den[R, n])], R, n).

    Raises:
      ValueError: shapes that differ, other numbers of runs than 1 and R,
        non-finite sums, or a run without tokens.
    """
    if not terms:
        raise ValueError("A contrast needs at least one (weight, numerators, denominators) term.")
    prepared = []
    for weight, num, den in terms:
        n_arr, d_arr = np.atleast_2d(np.asarray(num, np.float64)), np.atleast_2d(np.asarray(den, np.float64))
        if n_arr.ndim != 2 or n_arr.shape != d_arr.shape or n_arr.size == 0:
            raise ValueError(f"A term's numerators and denominators must be [R, n] (or [n]) of one shape; "
                             f"got {np.shape(num)} and {np.shape(den)}.")
        if not (np.all(np.isfinite(n_arr)) and np.all(np.isfinite(d_arr))) or np.any(d_arr.sum(axis=1) <= 0):
            raise ValueError("A term has non-finite sums or a run whose denominators (token counts) sum to 0.")
        prepared.append((float(weight), n_arr, d_arr))
    runs = max(x[1].shape[0] for x in prepared)
    sizes = {x[1].shape[1] for x in prepared}
    if len(sizes) != 1:
        raise ValueError(f"Paired terms need the same held-out examples; got {sorted(sizes)} examples.")
    if any(x[1].shape[0] not in (1, runs) for x in prepared):
        raise ValueError(f"Paired terms need the same seeds (or a single run); got "
                         f"{sorted({x[1].shape[0] for x in prepared})} runs.")
    prepared = [(w, np.broadcast_to(n_arr, (runs, n_arr.shape[1])), np.broadcast_to(d_arr, (runs, d_arr.shape[1])))
                for w, n_arr, d_arr in prepared]
    return prepared, runs, sizes.pop()


def cluster_resampler(clusters: np.ndarray | None, n: int, num_resamples: int, seed: int) -> ClusterResamples:
    """`cluster_bootstrap_indices` for n examples (clusters None: each example its own cluster).

    Args:
      clusters: [n] cluster ids, or None.
      n: Number of examples the ids must cover.
      num_resamples: Bootstrap resamples.
      seed: Seed of the resampling.

    Returns:
      The `ClusterResamples`.
    """
    res = cluster_bootstrap_indices(np.arange(n) if clusters is None else clusters, num_resamples, seed)
    if res.cluster_of.size != n:
        raise ValueError(f"clusters has {res.cluster_of.size} ids for {n} examples.")
    return res


def contrast_values(terms: list[tuple[float, np.ndarray, np.ndarray]],
                    res: ClusterResamples) -> tuple[np.ndarray, np.ndarray]:
    """sum_i w_i sum(num_i[r]) / sum(den_i[r]) per run r, on all examples and on each resample.

    Args:
      terms: Output of `prepare_terms`.
      res: Resamples of the terms' examples.

    Returns:
      ([R] contrasts on all examples, [num_resamples, R] on each resample).
    """
    per_run = sum(w * num.sum(axis=1) / den.sum(axis=1) for w, num, den in terms)
    boot = sum(w * (res.counts @ res.cluster_sums(num).T) / np.maximum(res.counts @ res.cluster_sums(den).T, 1e-12)
               for w, num, den in terms)
    return np.asarray(per_run, np.float64), np.asarray(boot, np.float64)
