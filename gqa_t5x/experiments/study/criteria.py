"""Pre-registered criteria of the reproduction study: C1-C4 and the methods beyond the paper.

Pure functions of intervals (`statistics.Interval` with a p-value, made by
`statistics.paired_contrast` / `t_contrast`) or of plain numbers (taken as
exact: an interval of zero width with p = 0, which is how the paper's own
numbers are fed in). Each claim function returns

    {"id", "statement", "verdict", "primary", "supporting", "paper"}

with `primary` = {"name", "estimate", "interval", "p_value", "p_holm",
"expected", "paper", "note"} (one pre-registered contrast per claim) and
`supporting` = [{"name", "estimate", "interval", "p_value", "expected",
"verdict", "paper", "note"}] (reported beside it; unadjusted, never part of
the verdict).

Sign convention. Every quality input is a *deficit*: positive = worse. A gap
gap(X) = deficit of X against the reference (MHA): loss(X) - loss(MHA) for our
losses (lower is better), score(MHA) - score(X) for the paper's scores
(higher is better; `deficit(..., higher_is_better=True)`,
`gap_contrast_terms(..., higher_is_better=True)`). Times are like losses.

Verdict of a claim, from its primary contrast: REPRODUCED if the
Holm-adjusted p < LEVEL and the estimate has the paper's sign, NOT_REPRODUCED
if adjusted p < LEVEL with the other sign, else INCONCLUSIVE ("not run" where
the primary's interval is missing). The Holm family is the primaries of
C1, C2, C3a, C3b and C4 of one report: the claim functions fill p_holm with
the raw p (a family of one); `apply_holm(claims)` adjusts over the report's
claims and must be called on them. `beyond(cells)` is its own Holm family.
`paper_claims()` applies the criteria to the paper's own numbers (all
reproduced: a check that the criteria say what the paper says).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gqa_t5x.experiments import paper
from gqa_t5x.experiments.study import statistics as st

LEVEL = st.LEVEL  # 0.05, family-wise over the primaries of C1..C4 (Holm)
NOT_RUN = "not run"
EXACT = "exact (no interval)"
BETTER, WORSE, UNRESOLVED, MIXED = "better", "worse", "no difference resolved", "mixed"

# C2, C3a, C3b: GQA's gap to MHA is less than HALF_GAP of MQA's, tested as
# D = HALF_GAP * gap(MQA) - gap(GQA) > 0 (with gap(MQA) > 0: gap ratio < 0.5).
# Paper: Table 1 (XXL, average): (47.2 - 47.1) / (47.2 - 46.6) = 0.17; Fig. 5
# (XXL, alpha 0.05): (57.54 - 57.40) / (57.54 - 56.92) = 0.23; Fig. 5 alpha 0:
# (57.54 - 56.71) / (57.54 - 53.93) = 0.23.
HALF_GAP = 0.5
# C3b: uptraining closes most of MQA's gap: gap_MQA(alpha) < CLOSING * gap_MQA(0),
# tested as CLOSING * gap_MQA(0) - gap_MQA(alpha) > 0. Paper: Fig. 5 (XXL):
# gap_MQA(0.05) = 57.54 - 56.92 = 0.62 vs gap_MQA(0) = 57.54 - 53.93 = 3.61.
CLOSING = 0.5
# C4: GQA keeps at least SPEED_KEPT of MQA's speed-up over MHA:
# (t_MHA - t_GQA) - SPEED_KEPT (t_MHA - t_MQA) > 0 (not: GQA slower than MQA).
# Paper: Table 1 (TPUv4, XXL): (1.51 - 0.28) / (1.51 - 0.24) = 0.97; Fig. 6
# (XXL, in 2048 / out 512): G=8 (2.53 - 0.51) / (2.53 - 0.49) = 0.99, and G=4
# (0.48 s) is faster than G=1 = MQA (0.49 s).
SPEED_KEPT = 0.5
# The gap ratio gap(GQA) / gap(MQA) the paper shows (C2: reported, not decided on).
PAPER_GAP_RATIO = ((paper.TABLE1["MHA-XXL"]["avg"] - paper.TABLE1["GQA-8-XXL"]["avg"])
                   / (paper.TABLE1["MHA-XXL"]["avg"] - paper.TABLE1["MQA-XXL"]["avg"]),  # Table 1: 0.17
                   (paper.ALPHA_MHA_LINE - paper.ALPHA_CURVES["GQA-8"][0.05])
                   / (paper.ALPHA_MHA_LINE - paper.ALPHA_CURVES["MQA"][0.05]))  # Fig. 5, alpha 0.05: 0.23

Quantity = st.Interval | float | None


# ------------------------------------------------------------------ inputs
def deficit(value: float, reference: float, higher_is_better: bool = False) -> float:
    """How much worse `value` is than `reference` (positive = worse).

    Args:
      value: The configuration's number (loss, time or score).
      reference: The reference's number (e.g. MHA's).
      higher_is_better: True for scores (ROUGE, BLEU, F1), False for losses and times.

    Returns:
      reference - value for scores, value - reference otherwise.
    """
    return reference - value if higher_is_better else value - reference


def gap_contrast_terms(parts: Sequence[tuple[float, tuple[Any, Any], tuple[Any, Any]]], *,
                       higher_is_better: bool = False) -> list[st.Term]:
    """Terms of sum_k w_k gap(model_k vs reference_k) for `statistics.paired_contrast`.

    Recipes (models are (num, den) per-example sums, [R, n] or [n]):
    C2 / C3 D = [(HALF_GAP, mqa, mha), (-1, gqa, mha)]; C3b closing =
    [(CLOSING, mqa_0, mha_0), (-1, mqa_alpha, mha_alpha)]; C1 =
    [(1, first, mean)]; a gap = [(1, x, mha)]. For ratios give
    `statistics.ratio_interval` the terms of [(1, gqa, mha)] over [(1, mqa, mha)].

    Args:
      parts: (weight, model, reference) with model and reference (num, den).
      higher_is_better: The sums are of a score (the gap is reference - model).

    Returns:
      [(weight, num, den)] terms (a reference appearing twice is fine).
    """
    sign = -1.0 if higher_is_better else 1.0
    terms: list[st.Term] = []
    for weight, (num, den), (ref_num, ref_den) in parts:
        terms += [(sign * weight, num, den), (-sign * weight, ref_num, ref_den)]
    return terms


def exact(value: float) -> st.Interval:
    """A number without uncertainty (e.g. the paper's) as a zero-width interval, p = 0 unless it is 0.

    Args:
      value: The number.

    Returns:
      Interval(value, value, value) of kind EXACT with p_value 0 (1 for value 0).
    """
    return st.Interval(float(value), float(value), float(value), 1, EXACT, p_value=0.0 if value != 0 else 1.0)


def _interval(value: Quantity) -> st.Interval | None:
    return value if value is None or isinstance(value, st.Interval) else exact(float(value))


# ------------------------------------------------------------------ rows and claims
def _expected(sign: int | None) -> str:
    return {1: "> 0", -1: "< 0", None: "reported"}[sign]


def _paper(value: float | None) -> float | None:
    """The paper's value of a row's quantity (its units: score points or seconds), without float noise."""
    return None if value is None else round(float(value), 4)


def _primary(name: str, value: Quantity, sign: int, paper_value: float | None, note: str = "") -> dict:
    interval = _interval(value)
    if interval is not None and interval.p_value is None:
        raise ValueError(f"The primary contrast {name!r} needs an interval with a p-value "
                         "(statistics.paired_contrast, t_contrast or t_interval make one).")
    p = None if interval is None else interval.p_value
    return {"name": name, "estimate": None if interval is None else interval.mean,
            "interval": None if interval is None else interval.to_json(), "p_value": p, "p_holm": p,
            "expected": _expected(sign), "paper": _paper(paper_value), "note": note}


def _supporting(name: str, value: Quantity, sign: int | None, paper_value: float | None, note: str = "") -> dict:
    interval = _interval(value)
    if interval is None:
        result = NOT_RUN
    elif sign is None:
        result = "reported"
    elif interval.p_value is not None:
        result = st.p_value_verdict(interval.mean, interval.p_value, sign)
    else:
        result = st.verdict(interval, sign)
    return {"name": name, "estimate": None if interval is None else interval.mean,
            "interval": None if interval is None else interval.to_json(),
            "p_value": None if interval is None else interval.p_value, "expected": _expected(sign),
            "verdict": result, "paper": _paper(paper_value), "note": note}


def supporting(name: str, value: Quantity, sign: int | None, paper_value: float | None = None,
               note: str = "") -> dict:
    """A supporting row for a claim's `supporting` list (unadjusted p; never part of the verdict).

    Args:
      name: The contrast.
      value: Its interval (with p-value), a number (exact), or None (not run).
      sign: The paper's sign (1 or -1), or None: reported without a sign.
      paper_value: The paper's value of the same quantity, if it has one.
      note: What the row shows.

    Returns:
      The row dict (see the module docstring).
    """
    return _supporting(name, value, sign, paper_value, note)


def _sign(primary: dict) -> int:
    return 1 if primary["expected"] == "> 0" else -1


def _decide(claim: dict, level: float = LEVEL) -> dict:
    row = claim["primary"]
    claim["verdict"] = (NOT_RUN if row["p_holm"] is None
                        else st.p_value_verdict(row["estimate"], row["p_holm"], _sign(row), level))
    return claim


def _claim(claim_id: str, statement: str, paper_text: str, primary: dict, supporting: list[dict]) -> dict:
    return _decide({"id": claim_id, "statement": statement, "verdict": NOT_RUN, "primary": primary,
                    "supporting": supporting, "paper": paper_text})


def _at(where: str) -> str:
    return f" [{where}]" if where else ""


# ------------------------------------------------------------------ C1..C4
def c1_conversion_methods(first_vs_mean: Quantity, random_vs_first: Quantity = None, *, where: str = "") -> dict:
    """C1: mean pooling beats keeping the first head, which beats random initialisation.

    Primary: deficit(first) - deficit(mean) > 0 (loss(first) - loss(mean)).
    Supporting: deficit(random) - deficit(first) > 0.

    Args:
      first_vs_mean: Interval of loss(first) - loss(mean) (paired; with p-value).
      random_vs_first: Interval of loss(random) - loss(first).
      where: Where it was measured, e.g. "MQA, alpha=0.05".

    Returns:
      The claim dict (see the module docstring).
    """
    m = paper.CONVERSION_METHODS
    return _claim(
        "C1", "Mean pooling beats keeping the first head, which beats random initialisation.",
        f"Fig. 4 (T5-Large -> MQA, alpha 0.05, average of CNN/DM, MultiNews, TriviaQA): mean {m['mean']} > "
        f"first {m['first']} > random {m['random']}",
        _primary(f"loss(first) - loss(mean){_at(where)}", first_vs_mean, 1, m["mean"] - m["first"]),
        [_supporting(f"loss(random) - loss(first){_at(where)}", random_vs_first, 1,
                     m["first"] - m["random"])])


def _half_gap_rows(half_gap: Quantity, gap_mqa: Quantity, gap_gqa: Quantity, ratio: Quantity, gqa: str, where: str,
                   paper_values: tuple[float, float, float, float] | None) -> tuple[dict, list[dict]]:
    d, g_mqa, g_gqa, rho = paper_values or (None, None, None, None)
    primary = _primary(f"{HALF_GAP:g} gap(MQA) - gap({gqa}){_at(where)}", half_gap, 1, d,
                       f"{gqa}'s gap to MHA is less than {HALF_GAP:g} of MQA's")
    supporting = [
        _supporting(f"gap(MQA) = loss(MQA) - loss(MHA){_at(where)}", gap_mqa, 1, g_mqa),
        _supporting(f"gap({gqa}) / gap(MQA){_at(where)}", ratio, None, rho,
                    f"the paper: {PAPER_GAP_RATIO[0]:.2f} (Table 1) to {PAPER_GAP_RATIO[1]:.2f} (Fig. 5)"),
        _supporting(f"gap({gqa}) = loss({gqa}) - loss(MHA){_at(where)}", gap_gqa, None, g_gqa,
                    "expected >= 0 and small; no sign required"),
    ]
    return primary, supporting


def c2_gqa_recovers(half_gap: Quantity, gap_mqa: Quantity = None, gap_gqa: Quantity = None,
                    ratio: Quantity = None, *, gqa: str = "GQA", where: str = "") -> dict:
    """C2: uptrained GQA recovers most of MQA's gap to MHA.

    Primary: D = HALF_GAP gap(MQA) - gap(GQA) > 0. Supporting: gap(MQA) > 0,
    the ratio gap(GQA) / gap(MQA) (reported, paper 0.17-0.23), gap(GQA)
    (reported: the paper has GQA slightly worse than MHA, 47.1 vs 47.2).

    Args:
      half_gap: Interval of D (`paired_contrast` of `gap_contrast_terms`).
      gap_mqa: Interval of loss(MQA) - loss(MHA).
      gap_gqa: Interval of loss(GQA) - loss(MHA).
      ratio: Interval of gap(GQA) / gap(MQA) (`ratio_interval`).
      gqa: The GQA variant's label, e.g. "GQA-4".
      where: e.g. "alpha=0.05".

    Returns:
      The claim dict.
    """
    t1 = paper.TABLE1
    mha, g8, mq = t1["MHA-XXL"]["avg"], t1["GQA-8-XXL"]["avg"], t1["MQA-XXL"]["avg"]
    g_mqa, g_gqa = deficit(mq, mha, True), deficit(g8, mha, True)
    primary, supporting = _half_gap_rows(half_gap, gap_mqa, gap_gqa, ratio, gqa, where,
                                         (HALF_GAP * g_mqa - g_gqa, g_mqa, g_gqa, g_gqa / g_mqa))
    return _claim("C2", f"Uptrained {gqa} recovers most of MQA's quality gap to MHA "
                  f"(its gap is less than {HALF_GAP:g} of MQA's).",
                  f"Table 1 (XXL, average score): MHA {mha}, GQA-8 {g8}, MQA {mq}: gap ratio "
                  f"{PAPER_GAP_RATIO[0]:.2f} (Fig. 5 at alpha 0.05: {PAPER_GAP_RATIO[1]:.2f})", primary, supporting)


def c3a_zero_shot(half_gap: Quantity, gap_mqa: Quantity = None, gap_gqa: Quantity = None, ratio: Quantity = None,
                  *, gqa: str = "GQA") -> dict:
    """C3a (our extension): right after conversion, with no training, GQA's gap is less than half of MQA's.

    The paper reports no zero-shot numbers (all its scores follow
    fine-tuning); the criterion is C3b's. Primary: D = HALF_GAP gap(MQA) -
    gap(GQA) > 0 at alpha 0 (the only contrast of this part).

    Args:
      half_gap: Interval of D at alpha 0, no training.
      gap_mqa: Interval of loss(MQA) - loss(MHA).
      gap_gqa: Interval of loss(GQA) - loss(MHA).
      ratio: Interval of gap(GQA) / gap(MQA).
      gqa: The GQA variant's label.

    Returns:
      The claim dict (`paper` says there is no such number).
    """
    primary, supporting = _half_gap_rows(half_gap, gap_mqa, gap_gqa, ratio, gqa, "alpha=0, no training", None)
    return _claim("C3a", f"Right after conversion (no training) {gqa}'s gap to MHA is less than {HALF_GAP:g} of "
                  "MQA's (our extension of Fig. 5).",
                  "No such number in the paper (its scores all follow fine-tuning); same criterion as C3b.",
                  primary, supporting)


def c3b_after_finetune(half_gap: Quantity, closing: Quantity = None, gap_mqa: Quantity = None,
                       gap_gqa: Quantity = None, ratio: Quantity = None, *, gqa: str = "GQA",
                       alpha: float = 0.05) -> dict:
    """C3b: after a short fine-tune GQA is usable without uptraining while MQA needs it.

    Primary (chosen: the paper's headline for Fig. 5, "GQA already achieves
    reasonable performance after conversion while MQA requires uptraining"):
    D = HALF_GAP gap(MQA) - gap(GQA) > 0 at alpha 0, fine-tuned. Supporting:
    uptraining closes most of MQA's gap, CLOSING gap_MQA(0) - gap_MQA(alpha) > 0
    (paper 0.62 vs 3.61), and the gaps and their ratio at alpha 0.

    Args:
      half_gap: Interval of D at alpha 0 after the fine-tune.
      closing: Interval of CLOSING gap_MQA(0) - gap_MQA(alpha) (the study:
        held-out span-corruption loss of the models before any fine-tune).
      gap_mqa: Interval of gap(MQA) at alpha 0.
      gap_gqa: Interval of gap(GQA) at alpha 0.
      ratio: Interval of gap(GQA) / gap(MQA) at alpha 0.
      gqa: The GQA variant's label.
      alpha: The uptraining proportion of `closing`.

    Returns:
      The claim dict.
    """
    c, mha = paper.ALPHA_CURVES, paper.ALPHA_MHA_LINE
    g_mqa, g_gqa = deficit(c["MQA"][0.0], mha, True), deficit(c["GQA-8"][0.0], mha, True)
    g_mqa_up = deficit(c["MQA"][0.05], mha, True)
    primary, supporting = _half_gap_rows(half_gap, gap_mqa, gap_gqa, ratio, gqa, "alpha=0, fine-tuned",
                                         (HALF_GAP * g_mqa - g_gqa, g_mqa, g_gqa, g_gqa / g_mqa))
    supporting.insert(0, _supporting(f"{CLOSING:g} gap(MQA, alpha=0) - gap(MQA, alpha={alpha:g}) "
                                     "[pre-training objective, not fine-tuned]",
                                     closing, 1, CLOSING * g_mqa - g_mqa_up,
                                     f"uptraining closes more than {1 - CLOSING:g} of MQA's gap (the paper's "
                                     "numbers are fine-tuned; ours are the held-out span-corruption loss)"))
    return _claim("C3b", f"After a short fine-tune, {gqa} without uptraining has less than {HALF_GAP:g} of "
                  "MQA's gap to MHA; uptraining closes most of MQA's gap.",
                  f"Fig. 5 (XXL): alpha 0: GQA-8 {c['GQA-8'][0.0]}, MQA {c['MQA'][0.0]}; alpha 0.05: GQA-8 "
                  f"{c['GQA-8'][0.05]}, MQA {c['MQA'][0.05]}; MHA {mha}", primary, supporting)


def c4_speed(speed_kept: Quantity, speedup_share: Quantity = None, mqa_saving: Quantity = None,
             gqa_minus_mqa: Quantity = None, *, gqa: str = "GQA", where: str = "") -> dict:
    """C4: GQA keeps at least SPEED_KEPT of MQA's speed-up over MHA.

    Primary: (t_MHA - t_GQA) - SPEED_KEPT (t_MHA - t_MQA) > 0 over paired
    timing rounds (`statistics.t_contrast([(0.5, t_mha), (-1, t_gqa), (0.5, t_mqa)])`).
    GQA need not be slower than MQA (Fig. 6 has G=4 faster than G=1).
    Supporting: S = (t_MHA - t_GQA) / (t_MHA - t_MQA) (reported), t_MHA -
    t_MQA > 0, t_GQA - t_MQA (reported).

    Args:
      speed_kept: Interval of the primary contrast (seconds per sample).
      speedup_share: Interval of S.
      mqa_saving: Interval of t_MHA - t_MQA.
      gqa_minus_mqa: Interval of t_GQA - t_MQA.
      gqa: The GQA variant's label.
      where: The timed shape, e.g. "in 512 / out 128".

    Returns:
      The claim dict.
    """
    t = {k: paper.TABLE1[f"{k}-XXL"]["time"] for k in ("MHA", "GQA-8", "MQA")}
    saving_gqa, saving_mqa = t["MHA"] - t["GQA-8"], t["MHA"] - t["MQA"]
    g = paper.TIME_VS_GROUPS
    return _claim(
        "C4", f"{gqa} keeps at least {SPEED_KEPT:g} of MQA's speed-up over MHA (greedy decoding).",
        f"Table 1 (TPUv4, XXL): MHA {t['MHA']} s, GQA-8 {t['GQA-8']} s, MQA {t['MQA']} s per sample "
        f"(S = {saving_gqa / saving_mqa:.2f}); Fig. 6: G=1 {g[1]}, G=4 {g[4]}, G=8 {g[8]}, MHA {g[64]} s",
        _primary(f"(t(MHA) - t({gqa})) - {SPEED_KEPT:g} (t(MHA) - t(MQA)){_at(where)}", speed_kept, 1,
                 saving_gqa - SPEED_KEPT * saving_mqa),
        [_supporting(f"S = (t(MHA) - t({gqa})) / (t(MHA) - t(MQA)){_at(where)}", speedup_share, None,
                     saving_gqa / saving_mqa),
         _supporting(f"t(MHA) - t(MQA){_at(where)}", mqa_saving, 1, saving_mqa),
         _supporting(f"t({gqa}) - t(MQA){_at(where)}", gqa_minus_mqa, None, t["GQA-8"] - t["MQA"],
                     f"no sign required (Fig. 6: G=4 {g[4]} s vs G=1 {g[1]} s)")])


def apply_holm(claims: list[dict], level: float = LEVEL) -> list[dict]:
    """Holm-adjusts the primaries of one report's claims (C1..C4) and redoes their verdicts.

    Args:
      claims: The claim dicts (changed in place); claims not run stay out of the family.
      level: Family-wise significance level.

    Returns:
      The same list.
    """
    family = [c for c in claims if c["primary"]["p_value"] is not None]
    for c, p in zip(family, st.holm([c["primary"]["p_value"] for c in family])):
        c["primary"]["p_holm"] = p
    for c in claims:
        _decide(c, level)
    return claims


# ------------------------------------------------------------------ beyond the paper
@dataclasses.dataclass(frozen=True)
class MethodCell:
    """One comparison of a method with mean pooling.

    Attributes:
      method: The method, e.g. "align".
      variant: "MQA" or "GQA-<G>".
      alpha: Uptraining proportion.
      difference: Paired interval (with p-value) of loss(method) - loss(mean):
        < 0 means the method is better; None if not run.
    """

    method: str
    variant: str
    alpha: float
    difference: st.Interval | None


def _cell_result(estimate: float | None, p_holm: float | None, level: float) -> str:
    if p_holm is None or estimate is None:
        return NOT_RUN
    if p_holm >= level or estimate == 0:
        return UNRESOLVED
    return BETTER if estimate < 0 else WORSE


def beyond(method_cells: Iterable[MethodCell | Mapping[str, Any]], level: float = LEVEL) -> list[dict]:
    """Methods beyond the paper against mean pooling, Holm over all the cells given (their own family).

    Args:
      method_cells: `MethodCell`s (or dicts with its fields).
      level: Family-wise significance level.

    Returns:
      Per method, in first-seen order: {"id": "B-<method>", "method",
      "statement", "verdict", "summary", "cells"}; verdict BETTER / WORSE
      (some cell resolved that way, none the other), MIXED (both),
      UNRESOLVED (none resolved) or NOT_RUN; cells = [{"variant", "alpha",
      "name", "estimate", "interval", "p_value", "p_holm", "verdict"}].
    """
    cells = [c if isinstance(c, MethodCell) else MethodCell(**c) for c in method_cells]
    if any(c.difference is not None and c.difference.p_value is None for c in cells):
        raise ValueError("beyond() needs paired intervals with p-values (statistics.paired_difference).")
    tested = [c for c in cells if c.difference is not None]
    adjusted = dict(zip(map(id, tested), st.holm([c.difference.p_value for c in tested])))
    out: dict[str, dict] = {}
    for c in cells:
        d, p_holm = c.difference, adjusted.get(id(c))
        row = {"variant": c.variant, "alpha": c.alpha,
               "name": f"loss({c.method}) - loss(mean) [{c.variant}, alpha={c.alpha:g}]",
               "estimate": None if d is None else d.mean, "interval": None if d is None else d.to_json(),
               "p_value": None if d is None else d.p_value, "p_holm": p_holm,
               "verdict": _cell_result(None if d is None else d.mean, p_holm, level)}
        out.setdefault(c.method, {"id": f"B-{c.method}", "method": c.method,
                                  "statement": f"{c.method} beats mean pooling.", "cells": []})["cells"].append(row)
    for entry in out.values():
        results = {r["verdict"] for r in entry["cells"]}
        entry["verdict"] = (MIXED if {BETTER, WORSE} <= results else BETTER if BETTER in results
                            else WORSE if WORSE in results else UNRESOLVED if UNRESOLVED in results else NOT_RUN)
        entry["summary"] = "; ".join(f"{r['verdict']} for {r['variant']} at alpha {r['alpha']:g}"
                                     for r in entry["cells"])
    return [{k: e[k] for k in ("id", "method", "statement", "verdict", "summary", "cells")} for e in out.values()]


# ------------------------------------------------------------------ the paper's own numbers
def paper_claims(use_figure6: bool = False) -> list[dict]:
    """The criteria applied to the paper's own numbers (exact, p = 0), Holm-adjusted.

    Args:
      use_figure6: Take C4's times from Fig. 6 (G=4 as GQA: faster than MQA)
        instead of Table 1.

    Returns:
      [C1, C2, C3b, C4] claim dicts; all REPRODUCED by construction of the criteria.
    """
    m, t1, c, line = paper.CONVERSION_METHODS, paper.TABLE1, paper.ALPHA_CURVES, paper.ALPHA_MHA_LINE

    def gap(score: float, reference: float) -> float:
        return deficit(score, reference, higher_is_better=True)

    mha, g8, mq = t1["MHA-XXL"]["avg"], t1["GQA-8-XXL"]["avg"], t1["MQA-XXL"]["avg"]
    g_mqa0, g_gqa0 = gap(c["MQA"][0.0], line), gap(c["GQA-8"][0.0], line)
    if use_figure6:
        g = paper.TIME_VS_GROUPS
        t_mha, t_gqa, t_mqa, label = g[64], g[4], g[1], "GQA-4"
    else:
        t_mha, t_gqa, t_mqa, label = t1["MHA-XXL"]["time"], t1["GQA-8-XXL"]["time"], t1["MQA-XXL"]["time"], "GQA-8"
    claims = [
        c1_conversion_methods(deficit(m["first"], m["mean"], True), deficit(m["random"], m["first"], True),
                              where="paper, MQA, alpha=0.05"),
        c2_gqa_recovers(HALF_GAP * gap(mq, mha) - gap(g8, mha), gap(mq, mha), gap(g8, mha),
                        gap(g8, mha) / gap(mq, mha), gqa="GQA-8", where="paper, Table 1"),
        c3b_after_finetune(HALF_GAP * g_mqa0 - g_gqa0, CLOSING * g_mqa0 - gap(c["MQA"][0.05], line), g_mqa0, g_gqa0,
                           g_gqa0 / g_mqa0, gqa="GQA-8"),
        c4_speed((t_mha - t_gqa) - SPEED_KEPT * (t_mha - t_mqa), (t_mha - t_gqa) / (t_mha - t_mqa), t_mha - t_mqa,
                 t_gqa - t_mqa, gqa=label, where="paper"),
    ]
    return apply_holm(claims)


__all__ = [
    "BETTER", "CLOSING", "EXACT", "HALF_GAP", "LEVEL", "MIXED", "MethodCell", "NOT_RUN", "PAPER_GAP_RATIO",
    "SPEED_KEPT", "UNRESOLVED", "WORSE", "apply_holm", "beyond", "c1_conversion_methods", "c2_gqa_recovers",
    "c3a_zero_shot", "c3b_after_finetune", "c4_speed", "deficit", "exact", "gap_contrast_terms", "paper_claims",
]
