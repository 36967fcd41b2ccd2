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
