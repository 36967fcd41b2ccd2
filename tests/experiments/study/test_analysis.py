"""The study's analysis (`study/analysis.py`) on hand-made evaluations: which
evaluations a configuration is, its interval (seeds and articles), paired
contrasts, the tables and `analyse` as a whole. The claims themselves are
`test_claims.py`'s."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats  # noqa: F401  (imported here, so that no test pays for its first import)

import study_evals  # tests/study_evals.py
from gqa_t5x.experiments.study import analysis
from gqa_t5x.experiments.study import statistics as st
from gqa_t5x.experiments.study.settings import StudySettings

pytestmark = pytest.mark.study

SEEDS = (0, 1, 2)
SMALL = dataclasses.replace(StudySettings(), heldout_examples=(("wikipedia", 40), ("c4", 10)),
                               # the 5-seed run's recipes (the tests' scores are written for them)
                               keep_state_methods=("align",), saving_alphas=(0.0125, 0.025, 0.05),
                            bootstrap_resamples=400)
H = SMALL.num_heads  # 16
T2 = study_evals.T975[2]  # t_{0.975, 2}: three seeds


def _analysis(output: Path, settings: StudySettings = SMALL, seeds=SEEDS) -> analysis.Analysis:
    return analysis.Analysis(output, settings, seeds)


def _varied(n: int) -> np.ndarray:
    """A loss per token that differs from example to example (3 +- 0.5)."""
    return 3.0 + 0.5 * np.sin(np.arange(n))


def _triple(i: st.Interval) -> tuple[float, float, float]:
    return i.mean, i.low, i.high


# ------------------------------------------------------------------ evaluations and keys
def test_evals_value_is_summed_loss_over_summed_tokens(tmp_path):
    evals = tmp_path / "evals"
    evals.mkdir()
    np.savez(evals / "k.npz", **{"wikipedia/loss": [1.0, 3.0, 6.0], "wikipedia/tokens": [2.0, 3.0, 5.0],
                                 "wikipedia/correct": [1.0, 1.0, 2.0]})
    e = analysis.Evals(evals)
    assert e.has("k") and not e.has("other")
    assert e.value("k", "wikipedia", "loss") == pytest.approx(10.0 / 10.0)  # not the mean of 1/2, 1, 6/5
    assert e.value("k", "wikipedia", "accuracy") == pytest.approx(4.0 / 10.0)
    num, den = e.sums("k", "wikipedia", "accuracy")
    np.testing.assert_array_equal(num, [1.0, 1.0, 2.0])
    np.testing.assert_array_equal(den, [2.0, 3.0, 5.0])


def test_keys_are_one_evaluation_for_deterministic_alpha_0_models_and_one_per_seed_otherwise(tmp_path):
    a = _analysis(tmp_path)
    assert a.keys(H, None, 0.0) == ["mha_a0"]
    assert a.keys(1, "mean", 0.0) == ["g1_mean_a0"]
    assert a.keys(2, "align", 0.0) == ["g2_align_a0"]
    assert a.keys(1, "align-keep", 0.0) == ["g1_align_a0"]  # not uptrained yet: the method's own model
    assert a.keys(2, "mean", 0.05) == ["g2_mean_a0.05_s0", "g2_mean_a0.05_s1", "g2_mean_a0.05_s2"]
    assert a.keys(1, "align-keep", 0.025) == [f"g1_align-keep_a0.025_s{s}" for s in SEEDS]
    assert a.keys(H, None, 0.1) == ["mha_a0.1_s0", "mha_a0.1_s1", "mha_a0.1_s2"]
    assert a.keys(4, "mean", 0.05, seeds=(1,)) == ["g4_mean_a0.05_s1"]


def test_random_has_settings_seeds_of_seeds_the_others_the_given_seeds(tmp_path):
    a = _analysis(tmp_path)
    assert SMALL.seeds_of("random", SEEDS) == tuple(range(10))  # the given 3, then 3, 4, ... up to 10
    assert a.seeds_for(1, "random") == tuple(range(10))
    assert a.keys(1, "random", 0.0) == [f"g1_random_a0_s{s}" for s in range(10)]  # seeded even without uptraining
    assert a.keys(1, "random", 0.05) == [f"g1_random_a0.05_s{s}" for s in range(10)]
    assert a.seeds_for(1, "mean") == a.seeds_for(H, None) == a.seeds_for(2, "align-keep") == SEEDS


def test_mha_recipe_keys_and_the_c4_finetuned_keys(tmp_path):
    a = _analysis(tmp_path)
    assert a.keys(H, "fresh", 0.05) == ["mha-fresh_a0.05_s0", "mha-fresh_a0.05_s1", "mha-fresh_a0.05_s2"]
    assert a.keys(H, "replay", 0.05, SEEDS[:1]) == ["mha-replay_a0.05_s0"]
    assert a.keys(H, "replay-fresh", 0.05, SEEDS[:1]) == ["mha-replay-fresh_a0.05_s0"]
    # The C4-fine-tuned alpha-0 models (claim C3b): one per seed, mean pooling for the converted ones.
    assert a.finetuned_keys(H) == ["ft_mha_a0_s0", "ft_mha_a0_s1", "ft_mha_a0_s2"]
    assert a.finetuned_keys(1) == ["ft_g1_mean_a0_s0", "ft_g1_mean_a0_s1", "ft_g1_mean_a0_s2"]
    assert a.finetuned_keys(2) == [study_evals.finetuned_key(SMALL, 2, s) for s in SEEDS]


def test_sums_stack_seeds_and_are_none_when_any_evaluation_is_missing(tmp_path):
    study_evals.write_config(tmp_path / "evals", SMALL, 2, "mean", 0.05, SEEDS, [3.0, 3.2, 3.4])
    a = _analysis(tmp_path)
    num, den = a.sums(a.keys(2, "mean", 0.05), "wikipedia")
    assert num.shape == den.shape == (3, 40)
    np.testing.assert_allclose(num[1], 3.2 * study_evals.tokens_for(40))
    one, _ = a.sums(a.keys(2, "mean", 0.05)[:1], "c4")
    assert one.shape == (10,)
    assert a.sums(a.keys(2, "mean", 0.05) + ["g2_mean_a0.05_s3"], "wikipedia") is None and a.sums([], "c4") is None


# ------------------------------------------------------------------ intervals of one configuration
def test_a_deterministic_configuration_with_one_loss_everywhere_has_a_point_interval(tmp_path):
    study_evals.write_config(tmp_path / "evals", SMALL, 1, "mean", 0.0, SEEDS, 2.5)
    a = _analysis(tmp_path)
    cell = a.cell(1, "mean", 0.0)
    assert _triple(cell) == pytest.approx((2.5, 2.5, 2.5))
    # No article file: every example is its own cluster; a level has no p-value.
    assert cell.kind == st.ARTICLES and cell.n == 40 and cell.p_value is None
    c4 = a.cell(1, "mean", 0.0, heldout="c4", metric="accuracy")
    assert (c4.mean, c4.n) == (pytest.approx(0.5), 10)


def test_a_deterministic_configurations_interval_is_about_the_ratio_estimators_normal_interval(tmp_path):
    n = 400
    settings = dataclasses.replace(SMALL, heldout_examples=(("wikipedia", n),), bootstrap_resamples=2000)
    loss = 3.0 + np.random.default_rng(7).gamma(2.0, 0.5, size=n)  # skewed per-example losses
    study_evals.write_config(tmp_path / "evals", settings, 1, "mean", 0.0, SEEDS, loss)
    cell = _analysis(tmp_path, settings).cell(1, "mean", 0.0)
    tokens = study_evals.tokens_for(n)
    ratio = (loss * tokens).sum() / tokens.sum()
    # Delta method: var(sum l / sum t) ~ sum (l_i t_i - R t_i)^2 / (sum t)^2.
    se = np.sqrt((((loss - ratio) * tokens) ** 2).sum() * n / (n - 1)) / tokens.sum()
    assert cell.mean == pytest.approx(ratio)
    assert cell.half_width == pytest.approx(1.96 * se, rel=0.15)
    assert cell.low < ratio < cell.high


def test_a_seeded_configuration_with_one_loss_per_seed_is_students_t_over_its_seeds(tmp_path):
    study_evals.write_config(tmp_path / "evals", SMALL, 2, "mean", 0.05, SEEDS, [3.0, 3.2, 3.4])
    study_evals.write_articles(tmp_path, SMALL, 5)
    cell = _analysis(tmp_path).cell(2, "mean", 0.05)
    # Every example of a seed has the seed's loss: each article resample gives it again, var_articles = 0, and
    # t_{R-1} sqrt(var_seeds / R + var_articles) is Student-t over the seeds: mean 3.2, sd 0.2,
    # half-width 4.3026527 x 0.2 / sqrt(3) = 4.3026527 x 0.1154701 = 0.4968275.
    assert _triple(cell) == pytest.approx((3.2, 2.7031725, 3.6968275))
    assert (cell.kind, cell.n, cell.sd) == (st.SEEDS_AND_ARTICLES, 3, pytest.approx(0.2))


def test_a_seeded_configurations_interval_adds_the_article_variance_to_the_seed_variance(tmp_path):
    article = np.arange(40) // 5  # 8 articles of 5 examples
    per_article = 0.4 * np.array([1.0, -1.0, 0.5, -0.5, 0.8, -0.2, 0.1, -0.7])
    offsets = [0.0, 0.2, 0.4]
    study_evals.write_config(tmp_path / "evals", SMALL, 2, "mean", 0.05, SEEDS,
                             [3.0 + d + per_article[article] for d in offsets])
    study_evals.write_articles(tmp_path, SMALL, 5)
    cell = _analysis(tmp_path).cell(2, "mean", 0.05)
    # Seed r's loss is offset_r + L, L the token-weighted article loss, so var_seeds = var(0, 0.2, 0.4) = 0.04 and
    # var_articles = the variance of L over the resamples of 8 whole articles (drawn as the analysis draws them).
    tokens = study_evals.tokens_for(40)
    res = st.cluster_bootstrap_indices(article, SMALL.bootstrap_resamples, seed=0)
    losses = (3.0 + per_article[article]) * tokens
    level = (res.counts @ res.cluster_sums(losses)) / (res.counts @ res.cluster_sums(tokens))
    var_articles = level.var(ddof=1)
    half = T2 * math.sqrt(0.04 / 3 + var_articles)
    mean = 3.2 + (per_article[article] * tokens).sum() / tokens.sum()
    assert _triple(cell) == pytest.approx((mean, mean - half, mean + half), abs=1e-6)
    assert var_articles > 0.001 and cell.half_width > T2 * 0.2 / math.sqrt(3)  # wider than the seeds alone


def test_article_clusters_widen_an_interval_when_the_examples_of_an_article_share_their_loss(tmp_path):
    article = np.arange(40) // 5
    per_article = 3.0 + 0.4 * np.array([1.0, -1.0, 0.5, -0.5, 0.8, -0.2, 0.1, -0.7])
    effect = 0.2 + 0.1 * np.array([1.0, -1.0, 0.6, -0.4, 0.2, 0.0, -0.8, 0.5])  # MQA's deficit, by article
    for out in (tmp_path / "examples", tmp_path / "articles"):
        study_evals.write_config(out / "evals", SMALL, H, None, 0.0, SEEDS, per_article[article])
        study_evals.write_config(out / "evals", SMALL, 1, "mean", 0.0, SEEDS, (per_article + effect)[article])
    study_evals.write_articles(tmp_path / "articles", SMALL, 5)  # heldout_<set>.npz with `article`
    by_example, by_article = _analysis(tmp_path / "examples"), _analysis(tmp_path / "articles")
    np.testing.assert_array_equal(by_article.clusters("wikipedia"), article)
    assert by_example.clusters("wikipedia") is None
    level = (by_example.cell(H, None, 0.0), by_article.cell(H, None, 0.0))
    assert level[0].mean == pytest.approx(level[1].mean) and (level[0].n, level[1].n) == (40, 8)
    # Five examples of one article are one draw, not five: about sqrt(5) times wider.
    assert level[1].half_width > 1.5 * level[0].half_width
    gap = [a.contrast([(1, a.keys(1, "mean", 0.0)), (-1, a.keys(H, None, 0.0))]) for a in (by_example, by_article)]
    assert gap[0].mean == pytest.approx(gap[1].mean) and gap[1].half_width > 1.5 * gap[0].half_width


def test_the_article_bootstrap_is_the_example_bootstrap_of_the_articles_sums(tmp_path):
    article = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3] * 4) + np.repeat([0, 4, 8, 12], 10)  # 16 articles, 1-4 examples
    loss = _varied(40)
    study_evals.write_config(tmp_path / "examples" / "evals", SMALL, 1, "mean", 0.0, SEEDS, loss)
    study_evals.write_articles(tmp_path / "examples", SMALL, {"wikipedia": article, "c4": np.arange(10)})
    # The same held-out set summed per article: 16 "examples" of no article file.
    tokens = study_evals.tokens_for(40)
    summed = tmp_path / "summed" / "evals"
    summed.mkdir(parents=True)
    np.savez(summed / "g1_mean_a0.npz", **{"wikipedia/loss": np.bincount(article, loss * tokens),
                                           "wikipedia/tokens": np.bincount(article, tokens),
                                           "wikipedia/correct": np.bincount(article, 0.5 * tokens)})
    clustered = _analysis(tmp_path / "examples").cell(1, "mean", 0.0)
    resummed = _analysis(tmp_path / "summed").cell(1, "mean", 0.0)
    assert _triple(clustered) == pytest.approx(_triple(resummed), rel=1e-12)
    assert clustered.n == resummed.n == 16


# ------------------------------------------------------------------ paired contrasts
@pytest.mark.parametrize("shift", [0.3, 0.0, -0.3])
def test_a_difference_that_holds_on_every_example_is_a_point_interval(tmp_path, shift):
    # first = mean + shift on every example, while examples differ by +-0.5: only pairing (the same
    # examples, and articles, on both sides) gives exactly `shift` on every resample.
    mean = _varied(40)
    ev = tmp_path / "evals"
    study_evals.write_config(ev, SMALL, 1, "mean", 0.0, SEEDS, mean)
    study_evals.write_config(ev, SMALL, 1, "first", 0.0, SEEDS, mean + shift)
    study_evals.write_config(ev, SMALL, 1, "mean", 0.05, SEEDS, [mean - 0.1, mean, mean + 0.2])
    study_evals.write_config(ev, SMALL, 1, "first", 0.05, SEEDS, [mean - 0.1 + shift, mean + shift, mean + 0.2 + shift])
    study_evals.write_articles(tmp_path, SMALL, 4)
    a = _analysis(tmp_path)
    diff = a.contrast([(1, a.keys(1, "first", 0.0)), (-1, a.keys(1, "mean", 0.0))])
    assert _triple(diff) == pytest.approx((shift, shift, shift), abs=1e-12)
    assert diff.kind == st.ARTICLES and diff.n == 10
    # Bootstrap p: every one of 400 resamples on one side of 0: 2 (0 + 1) / 401; at 0 on both sides: 1.
    assert diff.p_value == pytest.approx(2 / 401 if shift else 1.0)
    seeded = a.contrast([(1, a.keys(1, "first", 0.05)), (-1, a.keys(1, "mean", 0.05))])
    assert _triple(seeded) == pytest.approx((shift, shift, shift), abs=1e-12)
    assert seeded.kind == st.SEEDS_AND_ARTICLES and seeded.n == 3
    assert seeded.p_value < 1e-12 if shift else seeded.p_value == 1.0


def test_a_contrast_pairs_by_seed_and_holds_single_runs_constant(tmp_path):
    ev = tmp_path / "evals"
    study_evals.write_config(ev, SMALL, 1, "mean", 0.05, SEEDS, [3.50, 3.54, 3.40])
    study_evals.write_config(ev, SMALL, 1, "mean", 0.0, SEEDS, 5.0)
    study_evals.write_config(ev, SMALL, H, None, 0.05, SEEDS, [3.00, 3.02, 2.90])
    a = _analysis(tmp_path)
    got = a.contrast([(1, a.keys(1, "mean", 0.05)), (-0.5, a.keys(1, "mean", 0.0)), (-0.5, a.keys(H, None, 0.05))])
    # Per seed: 3.50 - (5 + 3.00) / 2 = -0.50, 3.54 - 4.01 = -0.47, 3.40 - 3.95 = -0.55: mean -0.5066667,
    # sd 0.0404145, se 0.0233333, half-width 4.3026527 x 0.0233333 = 0.1003952.
    assert _triple(got) == pytest.approx((-0.5066667, -0.6070619, -0.4062715), abs=1e-6)
    assert _triple(got) == pytest.approx(study_evals.t_interval([-0.50, -0.47, -0.55]), abs=1e-7)
    assert got.kind == st.SEEDS_AND_ARTICLES and got.n == 3 and got.sd == pytest.approx(0.0404145, abs=1e-7)
    # p: t = 0.5066667 / 0.0233333 = 21.714; with 2 degrees of freedom 1 - t / sqrt(t^2 + 2) = 0.0021153.
    t = 0.50666667 / (0.04041452 / math.sqrt(3))
    assert got.p_value == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-5)
    # Unpaired (seed 0 of one against seed 2 of the other), the same numbers would not give these contrasts:
    # pairing is by seed, not by sorting.
    swapped = [3.40, 3.54, 3.50]
    study_evals.write_config(ev, SMALL, 1, "mean", 0.05, SEEDS, swapped)
    b = _analysis(tmp_path)
    other = b.contrast([(1, b.keys(1, "mean", 0.05)), (-0.5, b.keys(1, "mean", 0.0)), (-0.5, b.keys(H, None, 0.05))])
    assert _triple(other) == pytest.approx(study_evals.t_interval([-0.60, -0.47, -0.45]), abs=1e-7)


def test_randoms_ten_seeds_pair_with_means_five_on_the_first_five(tmp_path):
    seeds = (0, 1, 2, 3, 4)
    ev = tmp_path / "evals"
    mean = [3.00, 3.01, 2.99, 3.02, 2.98]
    study_evals.write_config(ev, SMALL, 1, "mean", 0.05, seeds, mean)
    # random's seeds 5..9 are far off: any use of them would show.
    random = [m + d for m, d in zip(mean, [0.30, 0.32, 0.28, 0.31, 0.29])] + [100.0] * 5
    study_evals.write_config(ev, SMALL, 1, "random", 0.05, SMALL.seeds_of("random", seeds), random)
    study_evals.write_config(ev, SMALL, 1, "mean", 0.0, seeds, 3.0)
    study_evals.write_config(ev, SMALL, 1, "random", 0.0, SMALL.seeds_of("random", seeds),
                             [3.5 + 0.1 * k for k in range(10)])
    a = _analysis(tmp_path, seeds=seeds)
    assert len(a.keys(1, "random", 0.05)) == 10 and len(a.keys(1, "mean", 0.05)) == 5
    got = a.contrast([(1, a.keys(1, "random", 0.05)), (-1, a.keys(1, "mean", 0.05))])
    # The first 5 pairs: 0.30, 0.32, 0.28, 0.31, 0.29: mean 0.30, sd 0.0158114,
    # half-width t_{0.975, 4} 0.0158114 / sqrt(5) = 2.7764451 x 0.0070711 = 0.0196324.
    assert _triple(got) == pytest.approx((0.30, 0.30 - 0.0196324, 0.30 + 0.0196324), abs=1e-6)
    assert got.n == 5
    # random's own level uses all 10; against a single run (mean at alpha 0) the 10 seeds all count:
    # 0.5 + 0.1 k, k = 0..9: mean 0.95, sd 0.3027650, half-width t_{0.975, 9} 0.3027650 / sqrt(10) = 0.2165852.
    assert a.cell(1, "random", 0.05).n == 10
    zero = a.contrast([(1, a.keys(1, "random", 0.0)), (-1, a.keys(1, "mean", 0.0))])
    assert _triple(zero) == pytest.approx((0.95, 0.95 - 0.2165852, 0.95 + 0.2165852), abs=1e-6)
    assert zero.n == 10


def test_a_configuration_missing_an_evaluation_has_no_cell_contrast_or_ratio(tmp_path):
    study_evals.write(tmp_path / "evals", "g2_mean_a0.05_s0", SMALL, 3.0)  # seeds 1 and 2 missing
    study_evals.write_config(tmp_path / "evals", SMALL, 1, "mean", 0.05, SEEDS, [3.1, 3.2, 3.3])
    study_evals.write_config(tmp_path / "evals", SMALL, H, None, 0.05, SEEDS, [3.0, 3.0, 3.0])
    a = _analysis(tmp_path)
    assert a.cell(2, "mean", 0.05) is None and a.cell(1, "mean", 0.0) is None
    assert a.cell(1, "mean", 0.05) is not None
    gqa, mqa, mha = (a.keys(2, "mean", 0.05), a.keys(1, "mean", 0.05), a.keys(H, None, 0.05))
    assert a.contrast([(1, gqa), (-1, mqa)]) is None and a.terms([(1, gqa), (-1, mqa)]) is None
    assert a.ratio([(1, gqa), (-1, mha)], [(1, mqa), (-1, mha)]) is None
    assert a.contrast([(1, mqa), (-1, mha)], heldout="c4") is not None


# ------------------------------------------------------------------ tables and the whole analysis
def test_table_rows_list_every_evaluated_configuration_with_its_runs(tmp_path):
    scores = {(H, None, 0.0): 3.0, (H, None, 0.05): [2.95, 2.96, 2.94], (H, "fresh", 0.05): 2.97,
              (H, "replay", 0.05): 2.99, (1, "mean", 0.0): 4.0, (1, "mean", 0.05): [3.15, 3.17, 3.14],
              (1, "random", 0.0): 6.0, (1, "align-keep", 0.05): 3.1, (4, "mean", 0.05): [2.96, 2.97, 2.95]}
    study_evals.write_study(tmp_path, SMALL, SEEDS, scores, finetuned={H: [3.5] * 3, 2: [3.6] * 3, 1: [3.9] * 3})
    rows = analysis.table_rows(_analysis(tmp_path))
    assert [(r["variant"], r["method"], r["alpha"], r["runs"], r.get("finetuned")) for r in rows] == [
        ("MHA", None, 0.0, 1, None), ("MHA", None, 0.05, 3, None), ("MHA", "fresh", 0.05, 3, None),
        ("MHA", "replay", 0.05, 1, None),  # the replays ran seed 0 only
        ("MQA", "mean", 0.0, 1, None), ("MQA", "mean", 0.05, 3, None), ("MQA", "random", 0.0, 10, None),
        ("MQA", "align-keep", 0.05, 3, None), ("GQA-4", "mean", 0.05, 3, None),
        ("MHA", None, 0.0, 3, "c4"), ("GQA-2", "mean", 0.0, 3, "c4"), ("MQA", "mean", 0.0, 3, "c4")]
    first = rows[0]
    assert set(first) == {"variant", "kv_heads", "method", "alpha", "runs", "wikipedia_loss", "wikipedia_accuracy",
                          "c4_loss", "c4_accuracy"}
    assert first["wikipedia_loss"]["mean"] == pytest.approx(3.0) and first["c4_accuracy"]["mean"] == pytest.approx(0.5)
    assert rows[1]["wikipedia_loss"]["mean"] == pytest.approx(2.95) and rows[1]["wikipedia_loss"]["n"] == 3
    # The fine-tuned models are scored on C4 only.
    assert set(rows[-1]) == {"variant", "kv_heads", "method", "alpha", "finetuned", "runs", "c4_loss"}
    assert rows[-1]["c4_loss"]["mean"] == pytest.approx(3.9)


def test_pretraining_section_measures_how_flat_the_curve_got(tmp_path):
    settings = dataclasses.replace(SMALL, pretrain_steps=400, curve_points=4)
    for step, loss in ((100, 5.0), (200, 4.0), (300, 3.5), (400, 3.4)):
        study_evals.write(tmp_path / "evals", f"pretrain_{step}", settings, loss)
    (tmp_path / "markers").mkdir()
    (tmp_path / "markers" / "pretrain.done.json").write_text(json.dumps({"train_loss": [[1, 7.0], [400, 3.3]]}))
    section = analysis.pretraining_section(_analysis(tmp_path, settings), tmp_path)
    assert [p["step"] for p in section["curve"]] == [100, 200, 300, 400]
    assert section["curve"][1]["wikipedia_loss"] == pytest.approx(4.0) and section["train_loss"][1] == [400, 3.3]
    flat = section["flattening"]
    # Drops of 1.0 then 0.1 nats per 100 steps: 10 and 1 per 1k steps; from step 300 (the last <= 0.8 P)
    # the curve falls 3.5 - 3.4 of its 5.0 - 3.4: 0.0625.
    assert flat == pytest.approx({"early_drop_per_1k_steps": 10.0, "final_drop_per_1k_steps": 1.0,
                                  "final_over_early": 0.1, "late_from_step": 300, "late_share_of_drop": 0.0625})


def test_downstream_and_stage_times_read_the_markers(tmp_path):
    settings = dataclasses.replace(SMALL, finetune_variants=("MQA",))
    markers, evals = tmp_path / "markers", tmp_path / "evals"
    markers.mkdir()
    evals.mkdir()
    for seed, bleu in zip(SEEDS, (1.0, 1.5, 2.0)):
        name = f"g1_mean_s{seed}_a0.05"
        (markers / f"finetune_{name}.done.json").write_text(json.dumps({"bleu": bleu, "wall_s": 10.0}))
        tokens = np.full(5, 10.0)
        np.savez(evals / f"wmt_{name}.npz", **{"wmt/loss": tokens * (4.0 + seed / 10), "wmt/tokens": tokens,
                                                "wmt/correct": tokens / 2})
        (evals / f"wmt_{name}.json").write_text(json.dumps({"wall_s": 2.5}))
    (markers / "pretrain.done.json").write_text(json.dumps({"wall_s": 100.04}))
    (row,) = analysis.downstream(_analysis(tmp_path, settings), tmp_path)
    assert row["variant"] == "MQA" and row["bleu_per_seed"] == [1.0, 1.5, 2.0]
    # BLEU 1.0, 1.5, 2.0: 1.5 +- 4.3026527 x 0.5 / sqrt(3) = 1.5 +- 1.2420688.
    assert (row["bleu"]["mean"], row["bleu"]["high"]) == pytest.approx((1.5, 2.7420688), abs=1e-6)
    assert row["wmt_loss_per_seed"] == pytest.approx([4.0, 4.1, 4.2])
    assert analysis.stage_times(tmp_path) == {"eval": 7.5, "finetune": 30.0, "pretrain": 100.0}


def _paper_shaped_study(output: Path) -> None:
    profile = 0.3 * np.sin(np.arange(40) // 4)
    scores = {(H, None, 0.0): 3.00, (H, None, 0.05): [2.95, 2.96, 2.94],
              (1, "mean", 0.0): 4.00, (1, "mean", 0.05): [3.15, 3.17, 3.14],
              (2, "mean", 0.0): 3.30, (2, "mean", 0.05): [2.98, 2.99, 2.97],
              (1, "first", 0.05): [3.25, 3.28, 3.23], (1, "random", 0.05): [3.55, 3.57, 3.54] + [3.55] * 7,
              (1, "align", 0.0): 3.8, (1, "align", 0.05): [3.10, 3.12, 3.09]}
    study_evals.write_study(output, SMALL, SEEDS,
                            {k: ([x + profile for x in v] if isinstance(v, list) else v + profile)
                             for k, v in scores.items()},
                            finetuned={H: [3.50, 3.52, 3.49], 1: [3.90, 3.93, 3.88], 2: [3.60, 3.62, 3.59]},
                            times={"MHA": [3.0, 3.1, 3.05], "GQA-2": [1.2, 1.3, 1.22], "MQA": [1.0, 1.05, 1.01]},
                            articles=4)


@pytest.fixture
def no_jax(monkeypatch):
    """`machine.describe` imports JAX (seconds, the first time): not what these tests are about."""
    monkeypatch.setattr(analysis.machine_info, "describe", lambda: {"platform": "test"})


def test_analyse_puts_every_section_together_as_strict_json(tmp_path, no_jax):
    _paper_shaped_study(tmp_path)
    results = analysis.analyse(tmp_path, SMALL, SEEDS, command="gqa-t5x reproduce", sessions=[{"wall_s": 10.0}])
    assert {"command", "reduced_run", "banner", "machine", "sessions", "wall_time_s", "stage_wall_time_s", "settings",
            "seeds", "data", "pretraining", "configurations", "claims", "paper_through_criteria", "beyond_paper",
            "kept_optimizer_state", "recipe_2x2", "uptraining_saving", "groups", "downstream", "timing",
            "timing_setup"} <= set(results)
    assert results["reduced_run"] is False and results["banner"] is None and results["seeds"] == list(SEEDS)
    assert results["wall_time_s"] == 10.0 and results["settings"] == SMALL.to_json()
    assert results["machine"] == {"platform": "test"}
    assert [c["id"] for c in results["claims"]] == ["C1", "C2", "C3a", "C3b", "C4"]
    assert all(c["verdict"] == st.REPRODUCED for c in results["claims"])
    raw = [c["primary"]["p_value"] for c in results["claims"]]
    assert [c["primary"]["p_holm"] for c in results["claims"]] == pytest.approx(st.holm(raw))  # one family
    assert [c["id"] for c in results["paper_through_criteria"]] == ["C1", "C2", "C3b", "C4"]
    assert results["beyond_paper"][0]["id"] == "B-align" and results["timing_setup"] == {"batch": 2, "rounds": 3}
    json.dumps(results, allow_nan=False)  # no NaN or numpy value a strict reader would refuse


def test_analyse_of_a_study_without_evaluations_runs_no_claim_and_a_reduced_one_says_so(tmp_path, no_jax):
    results = analysis.analyse(tmp_path, SMALL, SEEDS, command="x", sessions=[])
    assert {c["id"]: c["verdict"] for c in results["claims"]} == {
        k: "not run" for k in ("C1", "C2", "C3a", "C3b", "C4")}
    assert results["configurations"] == [] and results["timing"] == [] and results["timing_setup"] is None
    assert results["pretraining"]["curve"] == [] and "flattening" not in results["pretraining"]
    reduced = analysis.analyse(tmp_path, StudySettings.reduced(), (0, 1), command="x", sessions=[])
    assert reduced["reduced_run"] is True and reduced["banner"] == analysis.REDUCED_BANNER
