"""The study's findings: claims C1-C4, the methods beyond the paper, the
uptraining recipe's 2x2 and the uptraining saving of the best conversion.

Each function reads an `analysis.Analysis` (per-example sums of the evaluated
configurations) and returns JSON-ready dicts; the criteria themselves are
`criteria.py`'s pre-registered functions, so that the same code judges our
numbers and the paper's (`criteria.paper_claims`).

* C1 (Fig. 4): loss(first) - loss(mean) > 0 for MQA at the ablation alpha.
* C2 (Table 1): D = 0.5 gap(MQA) - gap(GQA) > 0 at the ablation alpha, the
  gap measured against the multi-head model continued for the same steps.
* C3a: the same D at alpha 0 with no training at all (zero-shot after
  conversion; not a number the paper has). C3b: the same D after a short
  fine-tune of the alpha-0 models on C4 (a new domain), scored on C4, as the
  paper's alpha-0 points are fine-tuned (Fig. 5); supporting: uptraining
  closes more than half of MQA's gap.
* C4 (Table 1, Fig. 6): GQA keeps >= 50% of MQA's speed-up over MHA
  ((t_MHA - t_GQA) - 0.5 (t_MHA - t_MQA) > 0 over interleaved rounds).

Holm's correction runs over the primaries of C1, C2, C3a, C3b and C4; the
beyond-paper differences (paired, like everything here) are their own family.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

from gqa_t5x.experiments.study import criteria as cr
from gqa_t5x.experiments.study import statistics as st
from gqa_t5x.experiments.study.settings import (
    FRESH,
    KEEP,
    MHA_RECIPES,
    REPLAY,
    REPLAY_FRESH,
    label,
    split_label,
    variant,
)

PAPER_METHODS = ("mean", "first", "random")


def _gap_parts(weight: float, model: list[str], reference: list[str]) -> list[tuple[float, list[str]]]:
    """w * (metric(model) - metric(reference)) as contrast parts."""
    return [(weight, model), (-weight, reference)]


# Which multi-head model the uptrained gaps are measured against. Decided after
# the recipe's 2x2 (a fresh optimizer state alone costs the multi-head
# continuation about 0.09 nats at alpha 5%) and before any uptrained GQA-2
# evaluation existed: the converted models are uptrained with a fresh state
# (the paper's recipe), so the reference is the multi-head model continued with
# the same recipe; the exact continuation (restored state) is reported beside.
REFERENCE_NOTE = "MHA continued with the same recipe (fresh optimizer state)"


def mha_reference(a: Any, alpha: float | None = None) -> list[str]:
    """The keys of the multi-head reference of uptrained gaps at `alpha` (default the ablation alpha):
    MHA continued with a fresh optimizer state where the 2x2 ran it, else the exact continuation."""
    s, h = a.s, a.s.num_heads
    alpha = s.ablation_alpha if alpha is None else alpha
    if s.mha_recipes and alpha == s.ablation_alpha:
        return a.keys(h, FRESH, alpha)
    return a.keys(h, None, alpha)


def paper_claims(a: Any) -> list[dict]:
    """C1, C2, C3a, C3b from the held-out evaluations (C4 is `timing_claim`'s)."""
    s, h, g = a.s, a.s.num_heads, a.s.gqa_kv_heads
    up, gqa = s.ablation_alpha, variant(g, h)
    mha0 = a.keys(h, None, 0.0)
    claims = []
    if all(m in s.methods for m in PAPER_METHODS):
        alpha = 0.0 if s.conversion_only else up
        first, mean, random = (a.keys(1, m, alpha) for m in ("first", "mean", "random"))
        claims.append(cr.c1_conversion_methods(
            a.contrast([(1, first), (-1, mean)]), a.contrast([(1, random), (-1, first)]),
            where=f"MQA, alpha={alpha:g}"))
    else:
        claims.append(cr.c1_conversion_methods(None, where="first/random not in this study"))

    def half_gap_inputs(mqa: list[str], gqa_keys: list[str], mha: list[str], heldout: str | None = None):
        d = a.contrast([*_gap_parts(cr.HALF_GAP, mqa, mha), *_gap_parts(-1, gqa_keys, mha)], heldout)
        return dict(half_gap=d, gap_mqa=a.contrast(_gap_parts(1, mqa, mha), heldout),
                    gap_gqa=a.contrast(_gap_parts(1, gqa_keys, mha), heldout),
                    ratio=a.ratio(_gap_parts(1, gqa_keys, mha), _gap_parts(1, mqa, mha), heldout))

    if not s.conversion_only:
        mqa_up, gqa_up = a.keys(1, "mean", up), a.keys(g, "mean", up)
        reference, restored = mha_reference(a), a.keys(h, None, up)
        claims.append(cr.c2_gqa_recovers(**half_gap_inputs(mqa_up, gqa_up, reference), gqa=gqa,
                                         where=f"alpha={up:g}, {REFERENCE_NOTE if reference != restored else 'MHA continued'}"))
        if reference != restored:  # the same contrast against the exact continuation (restored state)
            other = half_gap_inputs(mqa_up, gqa_up, restored)
            claims[-1]["supporting"] += [
                cr.supporting(f"{cr.HALF_GAP:g} gap(MQA) - gap({gqa}) against MHA continued with its restored "
                              f"optimizer state [alpha={up:g}]", other["half_gap"], 1,
                              note="the reference carries on pre-training exactly; the converted models' fresh "
                                   "state costs them what the 2x2 measures for MHA"),
                cr.supporting(f"gap({gqa}) / gap(MQA) against MHA with its restored state [alpha={up:g}]",
                              other["ratio"], None)]
    else:
        claims.append(cr.c2_gqa_recovers(None, gqa=gqa, where="no uptraining in this study"))
    claims.append(cr.c3a_zero_shot(**half_gap_inputs(a.keys(1, "mean", 0.0), a.keys(g, "mean", 0.0), mha0), gqa=gqa))
    if s.c4_finetune_steps and not s.conversion_only and "c4" in dict(s.heldout_examples):
        inputs = half_gap_inputs(a.finetuned_keys(1), a.finetuned_keys(g), a.finetuned_keys(h), "c4")
        closing = a.contrast([*_gap_parts(cr.CLOSING, a.keys(1, "mean", 0.0), mha0),
                              *_gap_parts(-1, a.keys(1, "mean", up), mha_reference(a))])
        claims.append(cr.c3b_after_finetune(closing=closing, gqa=gqa, alpha=up, **inputs))
    else:
        claims.append(cr.c3b_after_finetune(None, gqa=gqa, alpha=up))
    return claims


def timing_claim(timing: dict | None, settings: Any) -> tuple[dict, list[dict]]:
    """C4 from the interleaved timing rounds (the first timed shape), and the per-shape table."""
    h, g = settings.num_heads, settings.gqa_kv_heads
    gqa = variant(g, h)
    if timing is None:
        return cr.c4_speed(None, gqa=gqa, where="timing not run"), []
    table = []
    for shape in timing["shapes"]:
        times = shape["time_per_sample"]
        table.append({"input_length": shape["input_length"], "output_length": shape["output_length"],
                      "cache_bytes_per_sample": shape.get("cache_bytes_per_sample"),
                      "cache_to_weight_ratio": shape.get("cache_to_weight_ratio"),
                      "time_per_sample": {n: st.t_interval(v, kind=st.ROUNDS).to_json() for n, v in times.items()}})
    first = timing["shapes"][0]
    t = first["time_per_sample"]
    where = f"in {first['input_length']} / out {first['output_length']}, batch {timing['batch']}"
    speed_kept = st.t_contrast([(1 - cr.SPEED_KEPT, t["MHA"]), (-1, t[gqa]), (cr.SPEED_KEPT, t["MQA"])])
    saving = float(np.mean(t["MHA"]) - np.mean(t["MQA"]))
    share = float((np.mean(t["MHA"]) - np.mean(t[gqa])) / saving) if saving else None
    claim = cr.c4_speed(speed_kept, speedup_share=share,
                        mqa_saving=st.t_contrast([(1, t["MHA"]), (-1, t["MQA"])]),
                        gqa_minus_mqa=st.t_contrast([(1, t[gqa]), (-1, t["MQA"])]), gqa=gqa, where=where)
    return claim, table


def beyond_paper(a: Any) -> list[dict]:
    """Each method beyond the paper (and each KEEP recipe) against mean pooling,
    paired, for MQA and GQA at alpha 0 and the ablation alpha (one Holm family)."""
    s, h = a.s, a.s.num_heads
    alphas = (0.0,) if s.conversion_only else (0.0, s.ablation_alpha)
    cells = []
    labels = [m for m in s.methods if m not in PAPER_METHODS]
    labels += [label(m, KEEP) for m in s.keep_state_methods if not s.conversion_only]
    for name in labels:
        for kv in (1, s.gqa_kv_heads):
            if split_label(name)[0] not in s.methods_for(kv):
                continue
            for alpha in alphas:
                if alpha == 0 and split_label(name)[1] == KEEP:
                    continue  # not uptrained: the same model as the method's
                diff = a.contrast([(1, a.keys(kv, name, alpha)), (-1, a.keys(kv, "mean", alpha))])
                cells.append(cr.MethodCell(name, variant(kv, h), alpha, diff))
    return cr.beyond(cells)


def kept_state(a: Any) -> list[dict]:
    """Does keeping the optimizer state help? loss(method-keep) - loss(method), paired, at every alpha (Holm)."""
    s, h = a.s, a.s.num_heads
    rows = []
    for method in () if s.conversion_only else s.keep_state_methods:
        for kv in (1, s.gqa_kv_heads):
            if method not in s.methods_for(kv):
                continue
            for alpha in s.uptrain_alphas(label(method, KEEP)):
                diff = a.contrast([(1, a.keys(kv, label(method, KEEP), alpha)), (-1, a.keys(kv, method, alpha))])
                rows.append({"method": method, "variant": variant(kv, h), "alpha": alpha,
                             "name": f"loss({method}, state kept) - loss({method}, fresh state)",
                             "interval": diff.to_json() if diff else None})
    tested = [r for r in rows if r["interval"]]
    for row, p in zip(tested, st.holm([r["interval"]["p_value"] for r in tested])):
        est = row["interval"]["mean"]
        row["p_holm"] = p
        row["verdict"] = (cr.UNRESOLVED if p >= cr.LEVEL else "kept state better" if est < 0 else "kept state worse")
    return rows


def recipe_2x2(a: Any) -> dict | None:
    """The multi-head continuation's 2x2 at the ablation alpha: optimizer state
    restored / fresh x data continued / replayed. Each cell against the loss at
    P (the recipe should continue to improve, as pre-training did) and
    against the restored + continued recipe."""
    s, h, up = a.s, a.s.num_heads, a.s.ablation_alpha
    if s.conversion_only or not s.mha_recipes:
        return None
    at_p = a.keys(h, None, 0.0)
    main = a.keys(h, None, up)
    cells = {("restored", "continued"): main, ("fresh", "continued"): a.keys(h, FRESH, up),
             ("restored", "replayed"): a.keys(h, REPLAY, up, a.seeds[:1]),
             ("fresh", "replayed"): a.keys(h, REPLAY_FRESH, up, a.seeds[:1])}
    rows = []
    for (state, data), keys in cells.items():
        level = a.cell(h, None, up, keys=keys)
        vs_p = a.contrast([(1, keys), (-1, at_p)])
        vs_main = None if keys == main else a.contrast([(1, keys), (-1, main)])
        rows.append({"optimizer_state": state, "data": data, "runs": len(keys),
                     "loss": level.to_json() if level else None,
                     "minus_loss_at_P": vs_p.to_json() if vs_p else None,
                     "minus_restored_continued": vs_main.to_json() if vs_main else None})
    main_vs_p = rows[0]["minus_loss_at_P"]
    improves = bool(main_vs_p is not None and main_vs_p["high"] < 0)
    # The continuation's whole alpha curve against the loss at P (the pre-training trend goes on).
    curve = []
    for alpha in s.all_alphas:
        diff = a.contrast([(1, a.keys(h, None, alpha)), (-1, at_p)])
        curve.append({"alpha": alpha, "steps": s.alpha_steps(alpha), "minus_loss_at_P": diff.to_json() if diff else None})
    falls = [c for c in curve if c["minus_loss_at_P"] and c["minus_loss_at_P"]["high"] < 0]
    verdict = ("not run" if main_vs_p is None else
               f"the restored + continued recipe improves on the loss at P at alpha {up:g}" if improves else
               f"the restored + continued recipe does not resolve an improvement on the loss at P at alpha {up:g}"
               + ("; it does at alpha " + ", ".join(f"{c['alpha']:g}" for c in falls) if falls else ""))
    return {"alpha": up, "steps": s.alpha_steps(up), "recipes": list(MHA_RECIPES), "cells": rows,
            "continuation_improves": improves, "continuation_curve": curve, "verdict": verdict}


def _reach_alpha(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """The smallest alpha at which a (linearly interpolated) loss curve reaches `target` (None: not within it)."""
    points = sorted(curve)
    if points and points[0][1] <= target:
        return points[0][0]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y1 <= target:
            return x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return None


def uptraining_saving(a: Any, num_resamples: int = 2000, seed: int = 0) -> list[dict]:
    """The alpha at which each curve method other than mean (`align`; fresh
    and kept state) reaches mean pooling's loss at the ablation alpha, per
    variant, with a bootstrap over seeds (the curves' seed means recomputed
    from the same resampled seeds). Linear interpolation between the
    evaluated alphas, from the method's alpha-0 loss."""
    s, h, up = a.s, a.s.num_heads, a.s.ablation_alpha
    out = []
    if s.conversion_only:
        return out
    heldout = s.primary_set
    rng = np.random.default_rng(seed)
    for kv in (1, s.gqa_kv_heads):
        mean_keys = a.keys(kv, "mean", up)
        if not all(a.evals.has(k) for k in mean_keys):
            continue
        target_runs = np.array([a.evals.value(k, heldout, "loss") for k in mean_keys])
        names = [name for m in s.curve_methods if m != "mean" and m in s.methods_for(kv)
                 for name in (m, *([label(m, KEEP)] if m in s.keep_state_methods else []))]
        for name in names:
            alphas = s.uptrain_alphas(name)
            zero_keys = a.keys(kv, split_label(name)[0], 0.0)
            if not a.evals.has(zero_keys[0]):
                continue
            if any(not all(a.evals.has(k) for k in a.keys(kv, name, x)) for x in alphas):
                continue
            zero = a.evals.value(zero_keys[0], heldout, "loss")
            runs = [[a.evals.value(k, heldout, "loss") for k in a.keys(kv, name, x)] for x in alphas]
            values = np.array(runs)  # [alphas, seeds]
            n = min(values.shape[1], target_runs.size)

            def reach(idx: np.ndarray) -> float | None:
                curve = [(0.0, zero), *zip(alphas, values[:, idx].mean(axis=1))]
                return _reach_alpha(curve, float(target_runs[idx].mean()))

            estimate = reach(np.arange(n))
            estimate = None if estimate is None else float(estimate)
            draws = [reach(rng.integers(0, n, n)) for _ in range(num_resamples)]
            reached = [d for d in draws if d is not None]
            low, high = (np.quantile(reached, [0.025, 0.975]) if len(reached) == len(draws) else (None, None))
            means = values[:, :n].mean(axis=1)
            reaching = [x for x, v in zip(alphas, means) if v <= target_runs[:n].mean()]
            first = min(reaching) if reaching else None
            # Below the first evaluated alpha the curve is not measured: linear interpolation from alpha 0
            # places the crossing, but only "at most the first alpha that reaches it" is observed.
            out.append({"variant": variant(kv, h), "method": name, "target_alpha": up,
                        "target_loss": float(target_runs.mean()), "alpha": estimate,
                        "first_alpha_reaching": first, "alphas_evaluated": list(alphas),
                        "saving_at_least": None if first is None else up / first,
                        "interpolated_below_first_alpha": bool(estimate is not None and estimate < min(alphas)),
                        "interval": None if low is None else [float(low), float(high)],
                        "resamples_not_reaching": len(draws) - len(reached),
                        "reached_at_alpha_0": estimate == 0.0,
                        "saving": None if not estimate else up / estimate})
    return out


def groups_curve(a: Any) -> list[dict]:
    """Quality per number of kv heads at the ablation alpha (mean pooling; MHA continued)."""
    s, h, up = a.s, a.s.num_heads, a.s.ablation_alpha
    rows = []
    if s.conversion_only:
        return rows
    for kv in sorted({1, s.gqa_kv_heads, *s.group_kv_heads, h}):
        method = None if kv == h else "mean"
        cell = a.cell(kv, method, up)
        gap = None if kv == h else a.contrast(_gap_parts(1, a.keys(kv, method, up), mha_reference(a)))
        rows.append({"kv_heads": kv, "variant": variant(kv, h), "loss": cell.to_json() if cell else None,
                     "gap_to_mha": gap.to_json() if gap else None})
    return rows


def rerun_views(a: Any, c4: dict, found: Sequence[dict] = ()) -> list[dict]:
    """C1-C3 seen as re-runs on other data: each half of the held-out articles
    (even / odd article index) with every seed, and each half of the seeds
    with every article; Holm within each view (C4, timing, is the same in all).
    A view *agrees* when its estimate has the whole study's sign and its
    interval holds the whole study's estimate; with half the data a view has
    less power, so its verdict may be inconclusive where the whole study's is
    not (two seeds give t_0.975,1 = 12.7), which is why agreement, not the
    verdict, is the test. These are subsets of one run, not new runs."""
    main = {c["id"]: c for c in found}
    seeds = tuple(a.seeds)
    views = [("articles with even index", a.restricted(articles=lambda ids: ids % 2 == 0)),
             ("articles with odd index", a.restricted(articles=lambda ids: ids % 2 == 1))]
    if len(seeds) >= 4:
        half = len(seeds) // 2 + len(seeds) % 2
        views += [(f"seeds {list(seeds[:half])}", a.restricted(seeds=seeds[:half])),
                  (f"seeds {list(seeds[half:])}", a.restricted(seeds=seeds[half:]))]
    out = []
    for name, view in views:
        if all(view.clusters(h) is None for h, _ in a.s.heldout_examples) and "articles" in name:
            continue  # a study prepared before articles were recorded
        found = cr.apply_holm([*paper_claims(view), copy.deepcopy(c4)])
        out.append({"view": name, "claims": [_agreement(c, main.get(c["id"])) for c in found]})
    return out


def _agreement(c: dict, main: dict | None) -> dict:
    """A view's claim: its verdict and estimate, and whether it agrees with the whole study's
    (the same sign, and the whole study's estimate inside the view's interval)."""
    row = {"id": c["id"], "verdict": c["verdict"], "estimate": c["primary"]["estimate"] if c["primary"] else None,
           "interval": c["primary"]["interval"] if c["primary"] else None, "agrees": None}
    whole = None if not main or not main.get("primary") else main["primary"]["estimate"]
    if row["estimate"] is not None and whole is not None and row["interval"]:
        same_sign = (row["estimate"] > 0) == (whole > 0)
        row["agrees"] = bool(same_sign and row["interval"]["low"] <= whole <= row["interval"]["high"])
    return row
