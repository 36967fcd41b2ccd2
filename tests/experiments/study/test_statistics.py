"""Intervals and verdicts of the reproduction study."""

from __future__ import annotations

import numpy as np
import pytest

from gqa_t5x.experiments.study import statistics as st

pytestmark = pytest.mark.study


def test_t_interval_of_three_seeds_uses_t_4303():
    interval = st.t_interval([1.0, 2.0, 3.0])
    assert interval.mean == 2.0 and interval.n == 3 and interval.kind == st.SEEDS
    assert interval.half_width == pytest.approx(4.303 * 1.0 / np.sqrt(3), rel=1e-3)
    with pytest.raises(ValueError, match="at least 2"):
        st.t_interval([1.0])


def test_paired_t_interval_cancels_a_shared_seed_effect():
    seed_effect = np.array([0.0, 5.0, -5.0])
    a, b = 1.0 + seed_effect + np.array([0.01, -0.01, 0.0]), seed_effect
    paired = st.paired_t_interval(a, b)
    assert paired.excludes_zero() == 1  # the unpaired intervals would overlap widely
    assert st.t_interval(a).overlaps(st.t_interval(b))
    broadcast = st.paired_t_interval([3.0, 3.1, 2.9], 1.0)  # b without seed variance
    assert broadcast.mean == pytest.approx(2.0)


def test_paired_bootstrap_of_loss_per_token_sees_a_consistent_small_difference():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 20, size=400).astype(float)
    base = rng.gamma(2.0, 2.0, size=400) * tokens  # large example-to-example spread
    worse = base + 0.05 * tokens  # +0.05 nats per token on every example
    diff = st.paired_bootstrap_ratio(worse, tokens, base, tokens, num_resamples=500)
    assert diff.mean == pytest.approx(0.05) and diff.excludes_zero() == 1 and diff.kind == st.EXAMPLES
    # The marginal intervals of the two overlap: only pairing resolves the difference.
    assert st.bootstrap_ratio(worse, tokens, num_resamples=500).overlaps(st.bootstrap_ratio(base, tokens, num_resamples=500))
    with pytest.raises(ValueError, match="same examples"):
        st.paired_bootstrap_ratio(worse, tokens, base[:10], tokens[:10])


@pytest.mark.parametrize("low,high,sign,expected", [
    (0.1, 0.3, 1, st.REPRODUCED), (-0.3, -0.1, 1, st.NOT_REPRODUCED), (-0.1, 0.2, 1, st.INCONCLUSIVE),
    (-0.3, -0.1, -1, st.REPRODUCED),
])
def test_verdict_follows_the_side_of_zero(low, high, sign, expected):
    assert st.verdict(st.Interval((low + high) / 2, low, high, 3, st.SEEDS), sign) == expected


def test_combined_verdict_needs_every_part():
    assert st.combine_verdicts([st.REPRODUCED, st.REPRODUCED]) == st.REPRODUCED
    assert st.combine_verdicts([st.REPRODUCED, st.INCONCLUSIVE]) == st.INCONCLUSIVE
    assert st.combine_verdicts([st.INCONCLUSIVE, st.NOT_REPRODUCED]) == st.NOT_REPRODUCED


def test_same_verdict_probability_grows_with_the_margin():
    near = st.t_interval([0.30, 0.45, 0.60])  # excludes 0, but only just
    far = st.t_interval([1.00, 1.10, 1.20])
    assert near.excludes_zero() == far.excludes_zero() == 1
    assert st.same_verdict_probability(near) < 0.8 < 0.99 < st.same_verdict_probability(far)
    around_zero = st.t_interval([-0.5, 0.0, 0.5])
    assert 0.5 < st.same_verdict_probability(around_zero) < 1.0
    examples = st.Interval(0.2, 0.1, 0.3, 500, st.EXAMPLES)
    assert st.same_verdict_probability(examples) == 1.0


def test_bootstrap_contrast_of_three_configurations_is_their_linear_combination():
    rng = np.random.default_rng(1)
    tokens = rng.integers(5, 20, size=300).astype(float)
    a, b, c = (rng.gamma(2.0, 1.0, size=300) * tokens for _ in range(3))
    interval = st.bootstrap_contrast([a, b, c], [tokens] * 3, [1.0, -0.5, -0.5], num_resamples=300)
    expected = a.sum() / tokens.sum() - 0.5 * b.sum() / tokens.sum() - 0.5 * c.sum() / tokens.sum()
    assert interval.mean == pytest.approx(expected) and interval.low < expected < interval.high


# ----------------------------------------------------------------- p-values and Holm
def test_t_interval_p_value_is_the_one_sample_t_test():
    from scipy import stats

    values = [0.3, 0.5, 0.2, 0.6]
    assert st.t_interval(values).p_value == pytest.approx(stats.ttest_1samp(values, 0.0).pvalue)
    assert st.t_interval([1.0, 1.0, 1.0]).p_value == 0.0  # no spread, not 0: certain
    assert st.t_interval([0.0, 0.0]).p_value == 1.0
    json = st.t_interval(values).to_json()
    assert set(json) == {"mean", "low", "high", "n", "kind", "sd", "p_value"}
    assert st.Interval(1.0, 0.5, 1.5, 3, st.SEEDS).to_json()["p_value"] is None


@pytest.mark.parametrize("p,adjusted", [
    ([0.01, 0.04, 0.03, 0.005], [0.03, 0.06, 0.06, 0.02]),  # textbook: 4 p, 3 p, 2 p, 1 p with the running max
    ([0.01, 0.02, 0.03], [0.03, 0.04, 0.04]),  # monotone: the last (1 x 0.03) is raised to 0.04
    ([0.5, 0.6], [1.0, 1.0]),  # capped at 1
    ([0.02], [0.02]),
    ([], []),
])
def test_holm_adjusts_step_down(p, adjusted):
    assert st.holm(p) == pytest.approx(adjusted)


def test_holm_rejects_invalid_p_values():
    with pytest.raises(ValueError, match="p-values"):
        st.holm([0.1, 1.5])
    with pytest.raises(ValueError, match="p-values"):
        st.holm([float("nan")])


def test_holm_verdicts_word_the_adjusted_p_and_the_sign():
    got = st.holm_verdicts([0.2, -0.1, 0.3, 0.4], [0.001, 0.002, 0.04, 0.001], [1, 1, 1, -1])
    assert [p for p, _ in got] == pytest.approx([0.004, 0.004, 0.04, 0.004])
    assert [v for _, v in got] == [st.REPRODUCED, st.NOT_REPRODUCED, st.REPRODUCED, st.NOT_REPRODUCED]
    assert st.p_value_verdict(0.2, 0.05, 1) == st.INCONCLUSIVE  # p must be below the level
    assert st.p_value_verdict(0.0, 0.0, 1) == st.INCONCLUSIVE
    with pytest.raises(ValueError, match="expected_sign"):
        st.p_value_verdict(0.1, 0.01, 0)


def test_bootstrap_contrast_carries_a_bootstrap_p_value():
    rng = np.random.default_rng(2)
    tokens = rng.integers(5, 20, size=200).astype(float)
    base = rng.gamma(2.0, 2.0, size=200) * tokens
    shifted = st.paired_bootstrap_ratio(base + 0.05 * tokens, tokens, base, tokens, num_resamples=400)
    assert shifted.p_value == pytest.approx(2 / 401)  # every resample above 0
    same = st.paired_bootstrap_ratio(base, tokens, base, tokens, num_resamples=400)
    assert same.p_value == 1.0


# ----------------------------------------------------------------- clusters (articles)
def _clustered_sums(seed: int, articles: int = 30, per_article: int = 5):
    """Examples in articles, each example an exact copy of its article's (num, den), shuffled."""
    rng = np.random.default_rng(seed)
    tokens_k = rng.integers(5, 20, size=articles).astype(float)
    num_k = rng.gamma(2.0, 2.0, size=articles) * tokens_k
    ids = np.repeat(np.arange(100, 100 + articles), per_article)  # ids need not start at 0
    order = rng.permutation(ids.size)
    ids = ids[order]
    return num_k, tokens_k, num_k[ids - 100], tokens_k[ids - 100], ids


def test_cluster_resamples_draw_whole_clusters():
    ids = np.array([7, 3, 3, 9, 7, 7])
    res = st.cluster_bootstrap_indices(ids, num_resamples=50, seed=4)
    assert res.num_clusters == 3 and res.cluster_of.tolist() == [1, 0, 0, 2, 1, 1]  # sorted ids 3, 7, 9
    assert res.counts.shape == (50, 3) and np.all(res.counts.sum(axis=1) == 3)
    weights = res.example_weights()
    assert np.array_equal(weights[:, 4], weights[:, 0]) and np.array_equal(weights[:, 1], weights[:, 2])
    assert res.cluster_sums(np.arange(6.0)).tolist() == [3.0, 9.0, 3.0]
    # Every example its own cluster: the example bootstrap with the same seed.
    own = st.cluster_bootstrap_indices(np.arange(6), num_resamples=50, seed=4)
    assert np.array_equal(own.counts, st.resample_counts(6, 50, 4))
    with pytest.raises(ValueError, match="1-D"):
        st.cluster_bootstrap_indices(np.zeros((2, 2)), 10, 0)


def test_clustered_interval_of_perfectly_correlated_examples_is_the_bootstrap_of_the_clusters():
    num_k, tokens_k, num, tokens, ids = _clustered_sums(5)
    clustered = st.clustered_mean_interval(num, tokens, ids, num_resamples=1000, seed=3)
    over_clusters = st.bootstrap_ratio(num_k, tokens_k, num_resamples=1000, seed=3)
    assert (clustered.mean, clustered.low, clustered.high) == pytest.approx(
        (over_clusters.mean, over_clusters.low, over_clusters.high))
    assert clustered.kind == st.ARTICLES and clustered.n == 30 and clustered.p_value is None
    examples = st.bootstrap_ratio(num, tokens, num_resamples=1000, seed=3)  # pretends 150 independent draws
    assert clustered.half_width > 1.8 * examples.half_width  # about sqrt(5) wider


def test_paired_difference_recovers_a_known_shift_over_seeds_and_articles():
    num_k, tokens_k, num, tokens, ids = _clustered_sums(6)
    rng = np.random.default_rng(7)
    seeds = 3
    a = num[None, :] + rng.normal(0.0, 0.01, size=(seeds, num.size)) * tokens  # [R, n]
    b = a + 0.05 * tokens  # b is worse by 0.05 per token in every seed and example
    den = np.broadcast_to(tokens, (seeds, tokens.size))
    diff = st.paired_difference(b, den, a, den, ids, num_resamples=500)
    assert diff.mean == pytest.approx(0.05) and diff.n == seeds and diff.kind == st.SEEDS_AND_ARTICLES
    assert diff.low == pytest.approx(0.05) and diff.high == pytest.approx(0.05) and diff.p_value < 1e-12
    reverse = st.paired_difference(a, den, b, den, ids, num_resamples=500)
    assert reverse.mean == pytest.approx(-0.05)  # a - b
    # One run (a deterministic model): the cluster-bootstrap percentile interval and p.
    one = st.paired_difference(b[0], tokens, a[0], tokens, ids, num_resamples=500)
    assert one.kind == st.ARTICLES and one.n == 30 and one.p_value == pytest.approx(2 / 501)
    # A single-run term is broadcast against the seeds of the other.
    broadcast = st.paired_difference(b, den, a[0], tokens, ids, num_resamples=500)
    assert broadcast.mean == pytest.approx((b.sum(1) / den.sum(1)).mean() - a[0].sum() / tokens.sum())
    with pytest.raises(ValueError, match="same seeds"):
        st.paired_difference(b, den, a[:2], den[:2], ids)
    with pytest.raises(ValueError, match="ids for"):
        st.paired_difference(b, den, a, den, ids[:10])


def test_paired_contrast_adds_seed_and_article_variances():
    num_k, tokens_k, num, tokens, ids = _clustered_sums(8)
    rng = np.random.default_rng(9)
    seeds = 4
    terms = [(w, num[None, :] * (1 + rng.normal(0.0, 0.05, size=(seeds, num.size))), np.tile(tokens, (seeds, 1)))
             for w in (0.5, -1.0, 0.5)]
    got = st.paired_contrast(terms, ids, num_resamples=300, seed=1)
    # By hand: per-seed contrasts, and the cluster bootstrap of their mean.
    per_seed = sum(w * n.sum(1) / d.sum(1) for w, n, d in terms)
    res = st.cluster_bootstrap_indices(ids, 300, 1)
    boot = sum(w * (res.counts @ res.cluster_sums(n).T) / (res.counts @ res.cluster_sums(d).T)
               for w, n, d in terms).mean(axis=1)
    se = np.sqrt(per_seed.var(ddof=1) / seeds + boot.var(ddof=1))
    assert got.mean == pytest.approx(per_seed.mean()) and got.sd == pytest.approx(per_seed.std(ddof=1))
    assert got.half_width == pytest.approx(st.t_quantile(seeds) * se)
    from scipy import stats

    assert got.p_value == pytest.approx(2 * stats.t.sf(abs(per_seed.mean()) / se, seeds - 1))


def test_paired_contrast_of_one_example_is_the_t_interval_over_rounds():
    times = {"MHA": [1.5, 1.6, 1.4, 1.55], "GQA": [0.3, 0.32, 0.29, 0.31], "MQA": [0.25, 0.24, 0.26, 0.25]}
    ones = np.ones((4, 1))
    terms = [(0.5, np.array(times["MHA"])[:, None], ones), (-1.0, np.array(times["GQA"])[:, None], ones),
             (0.5, np.array(times["MQA"])[:, None], ones)]
    via_contrast = st.paired_contrast(terms, num_resamples=50, kind=st.ROUNDS)
    via_t = st.t_contrast([(0.5, times["MHA"]), (-1.0, times["GQA"]), (0.5, times["MQA"])])
    assert (via_contrast.mean, via_contrast.low, via_contrast.high, via_contrast.p_value) == pytest.approx(
        (via_t.mean, via_t.low, via_t.high, via_t.p_value))
    assert via_t.kind == via_contrast.kind == st.ROUNDS
    by_hand = 0.5 * np.array(times["MHA"]) - np.array(times["GQA"]) + 0.5 * np.array(times["MQA"])
    assert via_t.mean == pytest.approx(by_hand.mean())


def _simulate(rng, *, seeds: int, article_sd: float, seed_sd: float, articles: int = 40, per_article: int = 3):
    """Paired runs of a and b = a + 0.1 + article effect + seed effect + noise (per token)."""
    ids = np.repeat(np.arange(articles), per_article)
    tokens = rng.integers(5, 20, size=ids.size).astype(float)
    base = rng.gamma(4.0, 0.5, size=ids.size)
    article = rng.normal(0.0, article_sd, size=articles)[ids]
    a = base[None, :] + rng.normal(0.0, 0.02, size=(seeds, ids.size))
    b = base[None, :] + 0.1 + article[None, :] + rng.normal(0.0, seed_sd, size=(seeds, 1)) \
        + rng.normal(0.0, 0.02, size=(seeds, ids.size))
    den = np.tile(tokens, (seeds, 1))
    return b * den, a * den, den, ids


@pytest.mark.parametrize("seeds,article_sd,seed_sd", [(3, 0.1, 0.001), (3, 0.001, 0.03), (1, 0.05, 0.0)])
def test_paired_difference_covers_the_true_shift(seeds, article_sd, seed_sd):
    rng = np.random.default_rng(11)
    reps, covered, seed_only_covered = 150, 0, 0
    for rep in range(reps):
        b, a, den, ids = _simulate(rng, seeds=seeds, article_sd=article_sd, seed_sd=seed_sd)
        interval = st.paired_difference(b, den, a, den, ids, num_resamples=300, seed=rep)
        covered += interval.low <= 0.1 <= interval.high
        if seeds > 1:
            seed_only = st.paired_t_interval(b.sum(1) / den.sum(1), a.sum(1) / den.sum(1))
            seed_only_covered += seed_only.low <= 0.1 <= seed_only.high
    assert covered / reps >= (0.88 if seeds > 1 else 0.85)
    if article_sd > seed_sd and seeds > 1:
        # The articles are shared by the seeds: t over seeds alone misses their variation.
        assert seed_only_covered / reps < 0.5


def test_ratio_interval_of_proportional_gaps():
    num_k, tokens_k, num, tokens, ids = _clustered_sums(12)
    rng = np.random.default_rng(13)
    gap_mqa = rng.uniform(0.1, 0.5, size=num.size) * tokens
    mha, mqa, gqa = (num, tokens), (num + gap_mqa, tokens), (num + 0.2 * gap_mqa, tokens)
    exact = st.ratio_interval([(1.0, *gqa), (-1.0, *mha)], [(1.0, *mqa), (-1.0, *mha)], ids, num_resamples=300)
    assert (exact.mean, exact.low, exact.high) == pytest.approx((0.2, 0.2, 0.2))  # the same ratio everywhere
    assert exact.kind == st.JOINT and exact.p_value is None
    seeds = 3
    noisy_gqa = (num[None, :] + (0.2 + rng.normal(0.0, 0.03, size=(seeds, 1))) * gap_mqa
                 + rng.normal(0.0, 0.05, size=(seeds, num.size)) * tokens, np.tile(tokens, (seeds, 1)))
    noisy = st.ratio_interval([(1.0, *noisy_gqa), (-1.0, *mha)], [(1.0, *mqa), (-1.0, *mha)], ids,
                              num_resamples=500)
    assert noisy.n == seeds and noisy.low < noisy.mean < noisy.high and noisy.low < 0.2 < noisy.high
    assert noisy.high - noisy.low > 0.01
