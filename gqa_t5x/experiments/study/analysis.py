"""Numbers, intervals and verdicts of the reproduction study (`reproduction.json`).

Reads what the stages left under OUTPUT (evaluations, markers, timing) and
returns one JSON-ready dict. The quality metric is the held-out
span-corruption loss per target token on Wikipedia (lower is better; token
accuracy and the out-of-domain C4 sample are reported beside it). Every
number is a mean with a 95% interval: over seeds (Student-t) where the runs
have seeds, else a bootstrap over held-out examples (`statistics.py`); each
interval says which.

Claims (each difference is oriented so that the paper predicts it > 0 or < 0):

* C1: mean beats first beats random (MQA, alpha = ablation alpha): loss(first)
  - loss(mean) > 0 and loss(random) - loss(first) > 0.
* C2: uptrained GQA is better than MQA, and close to MHA: loss(MQA) -
  loss(GQA) > 0, and GQA's gap to MHA (continued for the same steps) is less
  than half of MQA's: loss(GQA) - (loss(MQA) + loss(MHA)) / 2 < 0.
* C3: at alpha = 0 GQA is usable and MQA is not: loss(MQA) - loss(GQA) > 0
  and GQA's gap to MHA is less than half of MQA's; and alpha = 5% closes
  most (more than half) of MQA's gap: loss(MQA, 5%) - (loss(MQA, 0) +
  loss(MHA, 5%)) / 2 < 0.
* C4: time per sample falls from MHA to GQA to MQA (greedy decoding, the
  longest timed shape): t(MHA) - t(GQA) > 0 and t(GQA) - t(MQA) > 0.
* B-<method>: a method beyond the paper against mean, at alpha 0 and the
  ablation alpha, for MQA and GQA. It is called better (worse) only where its
  interval and mean's do not overlap; the paired difference is shown too.

A reduced run (`StudySettings.is_reduced`: `reproduce --reduced`,
`quickstart --reduced`) computes all of this from models pre-trained for a
few dozen steps: `reduced_run` is true and `banner` says that the verdicts
are not meaningful (the report prints it; the verdicts are kept as computed,
so that the tests can check the machinery).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gqa_t5x.experiments import machine as machine_info
from gqa_t5x.experiments import paper
from gqa_t5x.experiments.study import statistics as st
from gqa_t5x.experiments.study.settings import SEEDED_METHODS, StudySettings, eval_key, uptrain_run, variant

PAPER_METHODS = ("mean", "first", "random")
# What a reduced run's report, figures and console say first, and beside each verdict.
REDUCED_BANNER = "reduced run: checks the machinery, verdicts not meaningful"
REDUCED_VERDICT_NOTE = "not meaningful: reduced run"
_NUMERATOR = {"loss": "loss", "accuracy": "correct"}


class Evals:
    """The per-example scores in OUTPUT/evals, loaded on demand."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, dict[str, np.ndarray]] = {}

    def has(self, key: str) -> bool:
        return (self.root / f"{key}.npz").exists()

    def arrays(self, key: str) -> dict[str, np.ndarray]:
        if key not in self._cache:
            with np.load(self.root / f"{key}.npz") as f:
                self._cache[key] = {k: np.asarray(f[k]) for k in f.files}
        return self._cache[key]

    def sums(self, key: str, heldout: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        a = self.arrays(key)
        return a[f"{heldout}/{_NUMERATOR[metric]}"], a[f"{heldout}/tokens"]

    def value(self, key: str, heldout: str, metric: str) -> float:
        num, den = self.sums(key, heldout, metric)
        return float(num.sum() / den.sum())


class Analysis:
    """Intervals of configurations and of contrasts between them.

    Args:
      output: OUTPUT of the study.
      settings: Its settings.
      seeds: The seeds to analyse.
    """

    def __init__(self, output: Path, settings: StudySettings, seeds: Sequence[int]):
        self.out, self.s, self.seeds = output, settings, tuple(seeds)
        self.evals = Evals(output / "evals")

    def keys(self, kv: int, method: str | None, alpha: float) -> list[str]:
        """The evaluation keys of a configuration: one, or one per seed."""
        h = self.s.num_heads
        if alpha == 0 and (kv == h or method not in SEEDED_METHODS):
            return [eval_key(kv, h, method, 0, None)]
        return [eval_key(kv, h, method, alpha, seed) for seed in self.seeds]

    def cell(self, kv: int, method: str | None, alpha: float, heldout: str | None = None,
             metric: str = "loss") -> st.Interval | None:
        """Interval of one configuration's metric (None if not evaluated)."""
        heldout = heldout or self.s.primary_set
        keys = self.keys(kv, method, alpha)
        if not all(self.evals.has(k) for k in keys):
            return None
        if len(keys) == 1:
            num, den = self.evals.sums(keys[0], heldout, metric)
            return st.bootstrap_ratio(num, den, num_resamples=self.s.bootstrap_resamples)
        return st.t_interval([self.evals.value(k, heldout, metric) for k in keys])

    def contrast(self, terms: Sequence[tuple[float, int, str | None, float]], heldout: str | None = None,
                 metric: str = "loss") -> st.Interval | None:
        """Interval of sum_i c_i metric(config_i); terms are (c, kv, method, alpha).

        Seeded configurations pair by seed (t over seeds; single-run terms are
        constants); if no term has seeds, a paired bootstrap over examples.
        """
        heldout = heldout or self.s.primary_set
        keyed = [(c, self.keys(kv, m, a)) for c, kv, m, a in terms]
        if not all(self.evals.has(k) for _, keys in keyed for k in keys):
            return None
        if all(len(keys) == 1 for _, keys in keyed):
            sums = [self.evals.sums(keys[0], heldout, metric) for _, keys in keyed]
            return st.bootstrap_contrast([n for n, _ in sums], [d for _, d in sums], [c for c, _ in keyed],
                                         num_resamples=self.s.bootstrap_resamples)
        per_seed = [sum(c * self.evals.value(keys[i] if len(keys) > 1 else keys[0], heldout, metric)
                        for c, keys in keyed) for i in range(len(self.seeds))]
        return st.t_interval(per_seed)


def comparison(name: str, interval: st.Interval | None, expected_sign: int, note: str = "") -> dict[str, Any]:
    """One tested difference with its verdict and re-run probability."""
    if interval is None:
        return {"comparison": name, "interval": None, "expected": "> 0" if expected_sign > 0 else "< 0",
                "verdict": "not run", "same_verdict_probability": None, "note": note}
    return {"comparison": name, "interval": interval.to_json(), "expected": "> 0" if expected_sign > 0 else "< 0",
            "verdict": st.verdict(interval, expected_sign),
            "same_verdict_probability": st.same_verdict_probability(interval), "note": note}


def claim(claim_id: str, statement: str, paper_text: str, primary: list[dict], supporting: list[dict]) -> dict:
    """A claim: the verdict of its primary comparisons, supporting ones beside."""
    verdicts = [c["verdict"] for c in primary]
    if any(v == "not run" for v in verdicts):
        verdict, probability = "not run", None
    else:
        verdict = st.combine_verdicts(verdicts)
        probs = [c["same_verdict_probability"] for c in primary]
        if verdict == st.REPRODUCED:
            probability = float(np.prod(probs))
        elif verdict == st.NOT_REPRODUCED:
            probability = max(p for c, p in zip(primary, probs) if c["verdict"] == st.NOT_REPRODUCED)
        else:
            probability = float(np.prod([p for c, p in zip(primary, probs) if c["verdict"] != st.REPRODUCED]))
    return {"id": claim_id, "claim": statement, "paper": paper_text, "verdict": verdict,
            "same_verdict_probability": probability, "primary": primary, "supporting": supporting}


# ---------------------------------------------------------------- claims
def _label(kv: int, h: int) -> str:
    return variant(kv, h)


def claims_c1_c2_c3(a: Analysis) -> list[dict]:
    """C1-C3 from the held-out evaluations."""
    s, h, g = a.s, a.s.num_heads, a.s.gqa_kv_heads
    up = s.ablation_alpha
    gqa, mqa = _label(g, h), "MQA"

    def order(kv: int, alpha: float) -> list[dict]:
        where = f"{_label(kv, h)}, alpha={alpha:g}"
        return [comparison(f"loss(first) - loss(mean) [{where}]", a.contrast([(1, kv, "first", alpha), (-1, kv, "mean", alpha)]), 1),
                comparison(f"loss(random) - loss(first) [{where}]", a.contrast([(1, kv, "random", alpha), (-1, kv, "first", alpha)]), 1)]

    statement = "Mean pooling beats keeping the first head, which beats random initialisation."
    paper_c1 = ("T5-Large -> MQA, 5% uptraining: mean {mean} > first {first} > random {random} "
                "(average of CNN/DM, MultiNews, TriviaQA; Fig. 4)".format(**paper.CONVERSION_METHODS))
    gqa_has = all(m in s.methods_for(g) for m in PAPER_METHODS)
    if not all(m in s.methods for m in PAPER_METHODS):
        c1 = claim("C1", statement, paper_c1, [comparison("methods first/random not in this study", None, 1)], [])
    elif s.conversion_only:
        c1 = claim("C1", statement + " (alpha = 0: no uptraining in this study)", paper_c1,
                   order(1, 0.0), order(g, 0.0) if gqa_has else [])
    else:
        c1 = claim("C1", statement, paper_c1, order(1, up),
                   (order(g, up) + order(g, 0.0) if gqa_has else []) + order(1, 0.0))
    t1 = paper.TABLE1
    c3_zero = [
        comparison(f"loss({mqa}) - loss({gqa}) [alpha=0]", a.contrast([(1, 1, "mean", 0.0), (-1, g, "mean", 0.0)]), 1),
        comparison(f"loss({gqa}) - (loss({mqa}) + loss(MHA)) / 2 [alpha=0]",
                   a.contrast([(1, g, "mean", 0.0), (-0.5, 1, "mean", 0.0), (-0.5, h, None, 0.0)]), -1,
                   "GQA's gap to MHA is less than half of MQA's")]
    curves = paper.ALPHA_CURVES
    paper_c3 = (f"Fig. 5 (XXL): alpha=0 GQA-8 {curves['GQA-8'][0.0]}, MQA {curves['MQA'][0.0]}; alpha=0.05 GQA-8 "
                f"{curves['GQA-8'][0.05]}, MQA {curves['MQA'][0.05]}; MHA {paper.ALPHA_MHA_LINE}")
    if s.conversion_only:
        return [c1, claim("C2", "Uptrained GQA is better than MQA and close to MHA.", "Table 1",
                          [comparison("no uptraining in this study", None, 1)], []),
                claim("C3", "GQA is usable without uptraining while MQA needs it (alpha = 0 part only: "
                      "no uptraining in this study).", paper_c3, c3_zero, [])]
    c2 = claim(
        "C2", f"Uptrained GQA is better than MQA and close to MHA ({gqa}, alpha={up:g}).",
        f"Table 1: GQA-8-XXL {t1['GQA-8-XXL']['avg']} vs MHA-XXL {t1['MHA-XXL']['avg']} vs MQA-XXL "
        f"{t1['MQA-XXL']['avg']} (average score)",
        [comparison(f"loss({mqa}) - loss({gqa}) [alpha={up:g}]", a.contrast([(1, 1, "mean", up), (-1, g, "mean", up)]), 1),
         comparison(f"loss({gqa}) - (loss({mqa}) + loss(MHA continued)) / 2 [alpha={up:g}]",
                    a.contrast([(1, g, "mean", up), (-0.5, 1, "mean", up), (-0.5, h, None, up)]), -1,
                    "GQA's gap to MHA is less than half of MQA's")],
        [comparison(f"loss({gqa}) - loss(MHA continued) [alpha={up:g}]", a.contrast([(1, g, "mean", up), (-1, h, None, up)]), -1,
                    "a gap, expected small"),
         comparison(f"accuracy({gqa}) - accuracy({mqa}) [alpha={up:g}]",
                    a.contrast([(1, g, "mean", up), (-1, 1, "mean", up)], metric="accuracy"), 1),
         comparison(f"C4 loss({mqa}) - loss({gqa}) [alpha={up:g}]",
                    a.contrast([(1, 1, "mean", up), (-1, g, "mean", up)], heldout="c4"), 1)])
    c3 = claim(
        "C3", "GQA is usable without uptraining while MQA needs it; uptraining closes most of MQA's gap.", paper_c3,
        [*c3_zero,
         comparison(f"loss({mqa}, {up:g}) - (loss({mqa}, 0) + loss(MHA continued, {up:g})) / 2",
                    a.contrast([(1, 1, "mean", up), (-0.5, 1, "mean", 0.0), (-0.5, h, None, up)]), -1,
                    f"alpha={up:g} closes more than half of MQA's gap")],
        [comparison(f"loss({gqa}, {up:g}) - (loss({gqa}, 0) + loss(MHA continued, {up:g})) / 2",
                    a.contrast([(1, g, "mean", up), (-0.5, g, "mean", 0.0), (-0.5, h, None, up)]), -1,
                    f"alpha={up:g} closes more than half of GQA's gap")])
    return [c1, c2, c3]


def timing_claim(timing: dict | None, settings: StudySettings) -> tuple[dict, list[dict]]:
    """C4 from the interleaved timing rounds, and the per-shape table."""
    h, g = settings.num_heads, settings.gqa_kv_heads
    names = ("MHA", _label(g, h), "MQA")
    if timing is None:
        return claim("C4", "Time per sample falls from MHA to GQA to MQA.", "Table 1",
                     [comparison("timing not run", None, 1)], []), []
    table, per_shape = [], []
    for shape in timing["shapes"]:
        times = shape["time_per_sample"]
        where = f"in {shape['input_length']} / out {shape['output_length']}, batch {timing['batch']}"
        row = {"input_length": shape["input_length"], "output_length": shape["output_length"],
               "time_per_sample": {n: st.t_interval(times[n], kind=st.ROUNDS).to_json() for n in names}}
        table.append(row)
        per_shape.append([
            comparison(f"t(MHA) - t({names[1]}) [{where}]",
                       st.paired_t_interval(times["MHA"], times[names[1]], kind=st.ROUNDS), 1),
            comparison(f"t({names[1]}) - t(MQA) [{where}]",
                       st.paired_t_interval(times[names[1]], times["MQA"], kind=st.ROUNDS), 1)])
    # C4 is decided on the longest shape (most decoded and encoded tokens), in whatever order it was timed.
    longest = max(range(len(table)), key=lambda i: (table[i]["output_length"] + table[i]["input_length"],
                                                     table[i]["output_length"]))
    t1 = paper.TABLE1
    c4 = claim("C4", "Time per sample falls from MHA to GQA to MQA (greedy decoding).",
               f"Table 1 (TPUv4, XXL): MHA {t1['MHA-XXL']['time']} s, GQA-8 {t1['GQA-8-XXL']['time']} s, "
               f"MQA {t1['MQA-XXL']['time']} s", per_shape[longest],
               [c for i, rows in enumerate(per_shape) if i != longest for c in rows])
    return c4, table


def beyond_paper(a: Analysis) -> list[dict]:
    """B-<method> for every method of the study that is not the paper's."""
    s, h = a.s, a.s.num_heads
    out = []
    for method in [m for m in s.methods if m not in PAPER_METHODS]:
        cells = []
        for kv in (1, s.gqa_kv_heads):
            if method not in s.methods_for(kv):
                continue
            for alpha in (0.0,) if s.conversion_only else (0.0, s.ablation_alpha):
                mine, mean = a.cell(kv, method, alpha), a.cell(kv, "mean", alpha)
                paired = a.contrast([(1, kv, "mean", alpha), (-1, kv, method, alpha)])
                if mine is None or mean is None or paired is None:
                    result = "not run"
                elif mine.overlaps(mean):
                    result = "no difference resolved"
                else:
                    result = "better" if mine.mean < mean.mean else "worse"
                cells.append({"variant": _label(kv, h), "alpha": alpha, "result": result,
                              "loss": mine.to_json() if mine else None, "mean_loss": mean.to_json() if mean else None,
                              "paired_mean_minus_method": paired.to_json() if paired else None,
                              "paired_side": paired.excludes_zero() if paired else None})
        out.append({"id": f"B-{method}", "method": method, "claim": f"{method} beats mean pooling.",
                    "verdict": _beyond_verdict(cells), "cells": cells})
    return out


def _beyond_verdict(cells: list[dict]) -> str:
    """'better at alpha 0; no difference resolved at alpha 0.05' (per variant where they differ)."""
    parts = []
    for alpha in sorted({c["alpha"] for c in cells}):
        at = [c for c in cells if c["alpha"] == alpha]
        results = {c["result"] for c in at}
        if len(results) == 1:
            parts.append(f"{results.pop()} at alpha {alpha:g}")
        else:
            parts.append(", ".join(f"{c['result']} for {c['variant']}" for c in at) + f" at alpha {alpha:g}")
    return "; ".join(parts) if parts else "not run"


# -------------------------------------------------------------- sections
def pretraining_section(a: Analysis, output: Path) -> dict:
    """The pre-training curve and how flat it got."""
    s = a.s
    period = s.pretrain_steps // s.curve_points
    points = []
    for step in range(period, s.pretrain_steps + 1, period):
        key = f"pretrain_{step}"
        if a.evals.has(key):
            points.append({"step": step, **{f"{n}_{m}": a.evals.value(key, n, m)
                                            for n, _ in s.heldout_examples for m in ("loss", "accuracy")}})
    marker = output / "markers" / "pretrain.done.json"
    train_loss = json.loads(marker.read_text())["train_loss"] if marker.exists() else []
    section: dict[str, Any] = {"steps": s.pretrain_steps, "curve": points, "train_loss": train_loss}
    if len(points) >= 3:
        loss = [p[f"{s.primary_set}_loss"] for p in points]
        steps = [p["step"] for p in points]
        late = max(i for i, step in enumerate(steps) if step <= 0.8 * s.pretrain_steps)
        section["flattening"] = {
            "early_drop_per_1k_steps": (loss[0] - loss[1]) / period * 1000,
            "final_drop_per_1k_steps": (loss[-2] - loss[-1]) / period * 1000,
            "final_over_early": (loss[-2] - loss[-1]) / (loss[0] - loss[1]) if loss[0] != loss[1] else None,
            "late_from_step": steps[late],
            "late_share_of_drop": (loss[late] - loss[-1]) / (loss[0] - loss[-1]) if loss[0] != loss[-1] else None}
    return section


def table_rows(a: Analysis) -> list[dict]:
    """Every evaluated configuration with its intervals (loss, accuracy, C4 loss)."""
    s, h = a.s, a.s.num_heads
    uptrained = () if s.conversion_only else s.all_alphas
    configs: list[tuple[int, str | None, float]] = [(h, None, 0.0)] + [(h, None, x) for x in uptrained]
    for kv in (s.gqa_kv_heads, 1):
        for method in s.methods_for(kv):
            alphas = (0.0, *uptrained) if method == "mean" or s.conversion_only else (0.0, s.ablation_alpha)
            configs += [(kv, method, x) for x in alphas]
    rows = []
    for kv, method, alpha in configs:
        values = {f"{n}_{m}": a.cell(kv, method, alpha, n, m) for n, _ in s.heldout_examples for m in ("loss", "accuracy")}
        if all(v is None for v in values.values()):
            continue
        rows.append({"variant": variant(kv, h), "kv_heads": kv, "method": method, "alpha": alpha,
                     "runs": len(a.keys(kv, method, alpha)),
                     **{k: v.to_json() if v else None for k, v in values.items()}})
    return rows


def _finetuned(a: Analysis, output: Path, kv: int, method: str | None) -> tuple[list[float], list[str]]:
    """BLEU per seed and the evaluation keys of the fine-tuned models of a variant."""
    s, h = a.s, a.s.num_heads
    bleu, keys = [], []
    for seed in a.seeds[:s.finetune_seeds]:
        name = f"{uptrain_run(kv, h, method, seed)}_a{s.ablation_alpha:g}"
        marker = output / "markers" / f"finetune_{name}.done.json"
        if marker.exists():
            bleu.append(float(json.loads(marker.read_text())["bleu"]))
            keys.append(f"wmt_{name}")
    return bleu, keys


def downstream(a: Analysis, output: Path) -> tuple[list[dict], list[dict]]:
    """BLEU and WMT validation loss of each fine-tuned variant over seeds, and
    the comparisons of GQA with MQA and MHA on them (C2's downstream rows)."""
    s, h, g = a.s, a.s.num_heads, a.s.gqa_kv_heads
    rows, per_seed = [], {}
    for kv, method in s.finetuned():
        name = variant(kv, h)
        bleu, keys = _finetuned(a, output, kv, method)
        losses = [a.evals.value(k, "wmt", "loss") for k in keys if a.evals.has(k)]
        per_seed[name] = (bleu, losses)
        rows.append({"variant": name, "alpha": s.ablation_alpha, "bleu_per_seed": bleu,
                     "bleu": st.t_interval(bleu).to_json() if len(bleu) >= 2 else None,
                     "wmt_loss_per_seed": losses,
                     "wmt_loss": st.t_interval(losses).to_json() if len(losses) >= 2 else None})
    gqa = variant(g, h)

    def paired(x: str, y: str, index: int) -> st.Interval | None:
        if x not in per_seed or y not in per_seed:
            return None
        a_values, b_values = per_seed[x][index], per_seed[y][index]
        if len(a_values) < 2 or len(a_values) != len(b_values):
            return None
        return st.paired_t_interval(a_values, b_values)

    comparisons = [
        comparison(f"WMT loss(MQA) - loss({gqa}) [fine-tuned]", paired("MQA", gqa, 1), 1),
        comparison(f"BLEU({gqa}) - BLEU(MQA) [fine-tuned]", paired(gqa, "MQA", 0), 1),
        comparison(f"WMT loss({gqa}) - loss(MHA) [fine-tuned]", paired(gqa, "MHA", 1), -1, "a gap, expected small"),
    ]
    return rows, comparisons


def stage_times(output: Path) -> dict[str, float]:
    """Wall seconds per kind of stage (markers and evaluations), summed."""
    totals: dict[str, float] = {}
    for path in (output / "markers").glob("*.done.json"):
        kind = path.name.split(".")[0].split("_")[0]
        totals[kind] = totals.get(kind, 0.0) + float(json.loads(path.read_text()).get("wall_s", 0.0))
    for path in (output / "evals").glob("*.json"):
        totals["eval"] = totals.get("eval", 0.0) + float(json.loads(path.read_text()).get("wall_s", 0.0))
    return {k: round(v, 1) for k, v in sorted(totals.items())}


def analyse(output: Path, settings: StudySettings, seeds: Sequence[int], *, command: str,
            sessions: list[dict]) -> dict[str, Any]:
    """Everything `reproduction.json` holds (see the module docstring)."""
    a = Analysis(output, settings, seeds)
    timing_marker = output / "markers" / "timing.done.json"
    timing = json.loads(timing_marker.read_text()) if timing_marker.exists() else None
    c4, timing_table = timing_claim(timing, settings)
    downstream_rows, downstream_comparisons = downstream(a, output)
    claims = [*claims_c1_c2_c3(a), c4]
    for c in claims:
        if c["id"] == "C2" and not settings.conversion_only:
            c["supporting"] += downstream_comparisons
    data_info = output / "data" / "data.json"
    return {
        "command": command,
        "reduced_run": settings.is_reduced,
        "banner": REDUCED_BANNER if settings.is_reduced else None,
        "machine": machine_info.describe(),
        "sessions": sessions,
        "wall_time_s": round(sum(x.get("wall_s", 0.0) for x in sessions), 1),
        "stage_wall_time_s": stage_times(output),
        "settings": settings.to_json(),
        "seeds": list(seeds),
        "data": json.loads(data_info.read_text()) if data_info.exists() else None,
        "pretraining": pretraining_section(a, output),
        "configurations": table_rows(a),
        "claims": claims,
        "beyond_paper": beyond_paper(a),
        "downstream": downstream_rows,
        "timing": timing_table,
    }
