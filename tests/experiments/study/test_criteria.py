"""Pre-registered criteria C1-C4 and the beyond-the-paper comparisons."""

from __future__ import annotations

import numpy as np
import pytest

from gqa_t5x.experiments.study import criteria as cr
from gqa_t5x.experiments.study import statistics as st

pytestmark = pytest.mark.study

CLAIM_KEYS = {"id", "statement", "verdict", "primary", "supporting", "paper"}
PRIMARY_KEYS = {"name", "estimate", "interval", "p_value", "p_holm", "expected", "paper", "note"}
SUPPORTING_KEYS = {"name", "estimate", "interval", "p_value", "expected", "verdict", "paper", "note"}


def interval(mean: float, p: float, half: float = 0.01) -> st.Interval:
    return st.Interval(mean, mean - half, mean + half, 3, st.SEEDS_AND_ARTICLES, p_value=p)


CLAIMS = {
    "C1": lambda x: cr.c1_conversion_methods(x, interval(0.1, 0.001), where="MQA, alpha=0.05"),
    "C2": lambda x: cr.c2_gqa_recovers(x, interval(0.5, 0.001), interval(0.05, 0.2), interval(0.1, None),
                                       gqa="GQA-4"),
    "C3a": lambda x: cr.c3a_zero_shot(x, interval(2.0, 0.001), interval(0.3, 0.001)),
    "C3b": lambda x: cr.c3b_after_finetune(x, interval(1.0, 0.001), interval(2.0, 0.001), interval(0.3, 0.001)),
    "C4": lambda x: cr.c4_speed(x, interval(0.9, None), interval(0.02, 0.001), interval(-0.001, 0.5)),
}


@pytest.mark.parametrize("claim_id", sorted(CLAIMS))
@pytest.mark.parametrize("estimate,p,verdict", [
    (0.2, 0.001, st.REPRODUCED), (-0.2, 0.001, st.NOT_REPRODUCED), (0.2, 0.3, st.INCONCLUSIVE),
    (-0.2, 0.3, st.INCONCLUSIVE),
])
def test_each_criterion_gives_each_verdict(claim_id, estimate, p, verdict):
    claim = CLAIMS[claim_id](interval(estimate, p))
    assert claim["id"] == claim_id and claim["verdict"] == verdict
    assert set(claim) == CLAIM_KEYS and set(claim["primary"]) == PRIMARY_KEYS
    assert all(set(row) == SUPPORTING_KEYS for row in claim["supporting"])
    assert claim["primary"]["expected"] == "> 0" and claim["primary"]["p_holm"] == p  # a family of one
    assert claim["primary"]["estimate"] == estimate and claim["primary"]["interval"]["p_value"] == p
    assert "same_verdict_probability" not in claim  # the re-run estimate is gone (it was 1 by construction)


def test_the_papers_own_numbers_are_reproduced():
    claims = {c["id"]: c for c in cr.paper_claims()}
    assert {k: c["verdict"] for k, c in claims.items()} == {k: st.REPRODUCED for k in ("C1", "C2", "C3b", "C4")}
    assert claims["C1"]["primary"]["estimate"] == pytest.approx(55.55 - 55.45)
    assert claims["C2"]["primary"]["estimate"] == pytest.approx(0.5 * 0.6 - 0.1)
    assert claims["C3b"]["primary"]["estimate"] == pytest.approx(0.5 * 3.61 - 0.83)
    assert claims["C4"]["primary"]["estimate"] == pytest.approx((1.51 - 0.28) - 0.5 * (1.51 - 0.24))
    # Every supporting row with a sign agrees with the paper too.
    assert all(r["verdict"] in (st.REPRODUCED, "reported") for c in claims.values() for r in c["supporting"])
    assert cr.PAPER_GAP_RATIO == pytest.approx((0.1 / 0.6, 0.14 / 0.62))


def test_paper_numbers_as_tight_intervals_are_reproduced():
    def tight(value: float) -> st.Interval:
        return st.Interval(value, value - 0.01, value + 0.01, 3, st.SEEDS_AND_ARTICLES, p_value=1e-4)

    claims = cr.apply_holm([
        cr.c1_conversion_methods(tight(0.10), tight(0.22)),
        cr.c2_gqa_recovers(tight(0.2), tight(0.6), tight(0.1)),
        cr.c3a_zero_shot(tight(0.975)),
        cr.c3b_after_finetune(tight(0.975), tight(1.185)),
        cr.c4_speed(tight(0.595)),
    ])
    assert [c["verdict"] for c in claims] == [st.REPRODUCED] * 5
    assert [c["primary"]["p_holm"] for c in claims] == pytest.approx([5e-4] * 5)


def test_gqa_slightly_worse_than_mha_as_in_the_paper_still_reproduces_c2():
    # Table 1: GQA-8 47.1 < MHA 47.2: GQA's gap is positive (worse), and small against MQA's 0.6.
    claim = cr.c2_gqa_recovers(0.5 * 0.6 - 0.1, 0.6, 0.1, 0.1 / 0.6, gqa="GQA-8")
    assert claim["verdict"] == st.REPRODUCED
    gqa_row = next(r for r in claim["supporting"] if r["name"].startswith("gap(GQA-8) ="))
    assert gqa_row["verdict"] == "reported" and gqa_row["estimate"] == pytest.approx(0.1)
    # Even a resolved, clearly worse GQA (but within half of MQA's gap) does not fail C2.
    resolved = cr.c2_gqa_recovers(interval(0.15, 1e-4), interval(0.4, 1e-4), interval(0.05, 1e-4))
    assert resolved["verdict"] == st.REPRODUCED


def test_gqa_faster_than_mqa_as_in_figure_6_still_reproduces_c4():
    claims = {c["id"]: c for c in cr.paper_claims(use_figure6=True)}
    c4 = claims["C4"]
    assert c4["verdict"] == st.REPRODUCED
    assert c4["primary"]["estimate"] == pytest.approx((2.53 - 0.48) - 0.5 * (2.53 - 0.49))
    faster = next(r for r in c4["supporting"] if r["name"].startswith("t(GQA-4) - t(MQA)"))
    assert faster["estimate"] == pytest.approx(-0.01) and faster["verdict"] == "reported"


def test_c4_fails_when_gqa_keeps_too_little_of_the_speed_up():
    # MHA 1.0 s, MQA 0.2 s, GQA 0.8 s: GQA keeps 25% of MQA's saving.
    claim = cr.c4_speed((1.0 - 0.8) - 0.5 * (1.0 - 0.2), 0.25, 0.8, 0.6)
    assert claim["verdict"] == st.NOT_REPRODUCED


def test_c3b_primary_is_the_half_gap_and_closing_is_supporting():
    claim = cr.c3b_after_finetune(interval(0.5, 1e-4), interval(-0.3, 1e-4), alpha=0.1)
    assert claim["verdict"] == st.REPRODUCED  # the closing contrast does not decide
    closing = claim["supporting"][0]
    assert "alpha=0.1" in closing["name"] and closing["verdict"] == st.NOT_REPRODUCED
    assert closing["paper"] == pytest.approx(0.5 * 3.61 - 0.62)
    assert cr.c3a_zero_shot(interval(0.5, 1e-4))["paper"].startswith("No such number")


def test_apply_holm_adjusts_over_the_reports_primaries():
    claims = [CLAIMS[k](interval(0.2, p)) for k, p in
              zip(("C1", "C2", "C3a", "C3b", "C4"), (0.011, 0.04, 0.001, 0.02, 0.03))]
    assert all(c["verdict"] == st.REPRODUCED for c in claims)  # each alone
    cr.apply_holm(claims)
    assert [c["primary"]["p_holm"] for c in claims] == pytest.approx(st.holm([0.011, 0.04, 0.001, 0.02, 0.03]))
    assert [c["verdict"] for c in claims] == [st.REPRODUCED, st.INCONCLUSIVE, st.REPRODUCED,
                                              st.INCONCLUSIVE, st.INCONCLUSIVE]
    assert all(r.get("p_holm") is None for c in claims for r in c["supporting"])  # supporting rows stay raw


def test_a_claim_not_run_stays_out_of_the_family():
    missing = cr.c2_gqa_recovers(None)
    assert missing["verdict"] == cr.NOT_RUN and missing["primary"]["interval"] is None
    claims = cr.apply_holm([missing, CLAIMS["C1"](interval(0.2, 0.03))])
    assert claims[1]["primary"]["p_holm"] == pytest.approx(0.03)  # a family of one
    assert claims[0]["verdict"] == cr.NOT_RUN and claims[1]["verdict"] == st.REPRODUCED


def test_a_primary_without_p_value_is_refused():
    with pytest.raises(ValueError, match="p-value"):
        cr.c1_conversion_methods(st.Interval(0.1, 0.05, 0.15, 3, st.SEEDS))


def test_deficits_orient_scores_and_losses_alike():
    assert cr.deficit(46.6, 47.2, higher_is_better=True) == pytest.approx(0.6)
    assert cr.deficit(3.1, 3.0) == pytest.approx(0.1)
    assert cr.exact(0.0).p_value == 1.0 and cr.exact(-0.2).p_value == 0.0


@pytest.mark.parametrize("higher_is_better", [False, True])
def test_half_gap_contrast_from_per_example_sums(higher_is_better):
    rng = np.random.default_rng(3)
    ids = np.repeat(np.arange(30), 4)
    tokens = rng.integers(5, 20, size=ids.size).astype(float)
    base = rng.gamma(4.0, 0.5, size=ids.size)
    sign = -1.0 if higher_is_better else 1.0  # a score falls where a loss rises
    seeds = 3

    def model(gap: float) -> tuple[np.ndarray, np.ndarray]:
        per_token = base[None, :] + sign * (gap + rng.normal(0.0, 0.01, size=(seeds, ids.size)))
        return per_token * tokens, np.tile(tokens, (seeds, 1))

    mha, gqa, mqa = model(0.0), model(0.05), model(0.4)
    terms = cr.gap_contrast_terms([(cr.HALF_GAP, mqa, mha), (-1.0, gqa, mha)], higher_is_better=higher_is_better)
    d = st.paired_contrast(terms, ids, num_resamples=300)
    ratio = st.ratio_interval(cr.gap_contrast_terms([(1.0, gqa, mha)], higher_is_better=higher_is_better),
                              cr.gap_contrast_terms([(1.0, mqa, mha)], higher_is_better=higher_is_better),
                              ids, num_resamples=300)
    gap_mqa = st.paired_contrast(cr.gap_contrast_terms([(1.0, mqa, mha)], higher_is_better=higher_is_better), ids,
                                 num_resamples=300)
    assert d.mean == pytest.approx(0.5 * 0.4 - 0.05, abs=0.01) and ratio.mean == pytest.approx(0.125, abs=0.03)
    claim = cr.c2_gqa_recovers(d, gap_mqa, None, ratio)
    assert claim["verdict"] == st.REPRODUCED and claim["supporting"][0]["verdict"] == st.REPRODUCED


def test_beyond_calls_methods_better_worse_or_unresolved_after_holm():
    cells = [
        cr.MethodCell("align", "MQA", 0.0, interval(-0.05, 0.001)),
        cr.MethodCell("align", "GQA-4", 0.0, interval(-0.01, 0.3)),
        cr.MethodCell("lsq", "MQA", 0.0, interval(0.04, 0.002)),
        {"method": "weighted", "variant": "MQA", "alpha": 0.05, "difference": interval(-0.02, 0.03)},
        cr.MethodCell("mixed", "MQA", 0.0, interval(-0.03, 0.0001)),
        cr.MethodCell("mixed", "GQA-4", 0.0, interval(0.03, 0.0001)),
        cr.MethodCell("missing", "MQA", 0.0, None),
    ]
    out = {b["method"]: b for b in cr.beyond(cells)}
    assert list(out) == ["align", "lsq", "weighted", "mixed", "missing"]
    assert {m: b["verdict"] for m, b in out.items()} == {
        "align": cr.BETTER, "lsq": cr.WORSE, "weighted": cr.UNRESOLVED,  # raw 0.03, 5th of 6: 2 x 0.03
        "mixed": cr.MIXED, "missing": cr.NOT_RUN}
    assert set(out["align"]) == {"id", "method", "statement", "verdict", "summary", "cells"}
    assert out["align"]["id"] == "B-align"
    assert out["align"]["summary"] == (f"{cr.BETTER} for MQA at alpha 0; {cr.UNRESOLVED} for GQA-4 at alpha 0")
    assert out["weighted"]["cells"][0]["p_holm"] == pytest.approx(0.06)
    assert set(out["lsq"]["cells"][0]) == {"variant", "alpha", "name", "estimate", "interval", "p_value", "p_holm",
                                           "verdict"}
    with pytest.raises(ValueError, match="p-values"):
        cr.beyond([cr.MethodCell("align", "MQA", 0.0, st.Interval(0.1, 0.0, 0.2, 3, st.SEEDS))])
