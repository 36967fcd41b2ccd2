"""Numbers, intervals and verdicts of the reproduction study (`reproduction.json`).

Reads what the stages left under OUTPUT (evaluations, markers, timing) and
returns one JSON-ready dict. The quality metric is the held-out
span-corruption loss per target token on Wikipedia (lower is better; token
accuracy and the out-of-domain C4 sample are reported beside it). Every
interval is 95% and counts both sources of variation: the seeds (runs that
differ in their rows of uptraining data and, for `random`, initialisation;
Student-t) and the held-out articles (a bootstrap that resamples whole
articles, as examples of one article are not independent); a deterministic
model without seeds has the article bootstrap alone. Differences are
paired: by seed, and example by example (`statistics.paired_contrast`).

`Analysis` reads the per-example sums; `claims.py` turns them into C1-C4
(pre-registered criteria, `criteria.py`, Holm over the claims), the
beyond-paper comparisons, the recipe's 2x2, the uptraining saving and the
groups curve; this module adds the tables and puts it all together.

A reduced run (`StudySettings.is_reduced`: `reproduce --reduced`,
`quickstart --reduced`) computes all of this from models pre-trained for a
few dozen steps: `reduced_run` is true and `banner` says that the verdicts
are not meaningful (the report prints it; the verdicts are kept as computed,
so that the tests can check the machinery).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gqa_t5x.experiments import machine as machine_info
from gqa_t5x.experiments.study import claims
from gqa_t5x.experiments.study import criteria as cr
from gqa_t5x.experiments.study import statistics as st
from gqa_t5x.experiments.study.settings import (
    KEEP,
    MHA_RECIPES,
    SEEDED_METHODS,
    StudySettings,
    eval_key,
    label,
    split_label,
    uptrain_run,
    variant,
)

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
    """Sums, intervals and paired contrasts of evaluated configurations.

    A configuration is a list of evaluation keys: one (a deterministic model)
    or one per seed. Contrasts pair runs by seed (the seeds every seeded
    term has) and examples by position; intervals count both the seeds and
    the held-out articles (`statistics.paired_contrast`).

    Args:
      output: OUTPUT of the study.
      settings: Its settings.
      seeds: The seeds to analyse.
    """

    def __init__(self, output: Path, settings: StudySettings, seeds: Sequence[int],
                 articles: Callable[[np.ndarray], np.ndarray] | None = None):
        self.out, self.s, self.seeds = output, settings, tuple(seeds)
        self.evals = Evals(output / "evals")
        self._clusters: dict[str, np.ndarray | None] = {}
        self._articles = articles

    def restricted(self, seeds: Sequence[int] | None = None,
                   articles: Callable[[np.ndarray], np.ndarray] | None = None) -> Analysis:
        """The same study seen through other seeds and/or a subset of the held-out
        articles (`articles(article_ids) -> bool mask`): a re-run on other data."""
        return Analysis(self.out, self.s, self.seeds if seeds is None else seeds, articles or self._articles)

    def _mask(self, heldout: str) -> np.ndarray | None:
        clusters = self.clusters(heldout)
        return None if self._articles is None or clusters is None else self._articles(clusters)

    def clusters(self, heldout: str) -> np.ndarray | None:
        """Article id per held-out example (None: a study prepared before articles were recorded)."""
        if heldout not in self._clusters:
            path = self.out / "data" / f"heldout_{heldout}.npz"
            article = None
            if path.exists():
                with np.load(path) as f:
                    article = np.asarray(f["article"]) if "article" in f.files else None
            self._clusters[heldout] = article
        return self._clusters[heldout]

    def kept_clusters(self, heldout: str) -> np.ndarray | None:
        """The article ids of the examples this view keeps."""
        clusters, mask = self.clusters(heldout), self._mask(heldout)
        return clusters if mask is None else clusters[mask]

    def seeds_for(self, kv: int, method: str | None) -> tuple[int, ...]:
        """The seeds a configuration ran with (`random` has more)."""
        if kv == self.s.num_heads or method is None:
            return self.seeds
        return self.s.seeds_of(method, self.seeds)

    def keys(self, kv: int, method: str | None, alpha: float, seeds: Sequence[int] | None = None) -> list[str]:
        """The evaluation keys of a configuration: one, or one per seed."""
        h = self.s.num_heads
        if alpha == 0 and (kv == h or split_label(method)[0] not in SEEDED_METHODS):
            return [eval_key(kv, h, method, 0, None)]
        return [eval_key(kv, h, method, alpha, seed) for seed in (seeds or self.seeds_for(kv, method))]

    def finetuned_keys(self, kv: int) -> list[str]:
        """The C4-fine-tuned alpha-0 models of a variant, one per seed (`Stages.finetune_c4`)."""
        h = self.s.num_heads
        base = eval_key(kv, h, None if kv == h else "mean", 0.0, None)
        return [f"ft_{base}_s{seed}" for seed in self.seeds]

    def sums(self, keys: Sequence[str], heldout: str, metric: str = "loss") -> tuple[np.ndarray, np.ndarray] | None:
        """[R, n] (or [n] for one key) per-example sums, or None if any key is missing."""
        if not keys or not all(self.evals.has(k) for k in keys):
            return None
        pairs = [self.evals.sums(k, heldout, metric) for k in keys]
        mask = self._mask(heldout)
        if mask is not None:
            pairs = [(n[mask], d[mask]) for n, d in pairs]
        if len(pairs) == 1:
            return pairs[0]
        return np.stack([n for n, _ in pairs]), np.stack([d for _, d in pairs])

    def cell(self, kv: int, method: str | None, alpha: float, heldout: str | None = None,
             metric: str = "loss", keys: Sequence[str] | None = None) -> st.Interval | None:
        """Interval of one configuration's metric (None if not evaluated)."""
        heldout = heldout or self.s.primary_set
        sums = self.sums(keys if keys is not None else self.keys(kv, method, alpha), heldout, metric)
        if sums is None:
            return None
        return st.clustered_mean_interval(*sums, self.kept_clusters(heldout), num_resamples=self.s.bootstrap_resamples)

    def _paired_keys(self, configs: Sequence[Sequence[str]]) -> list[list[str]]:
        """Keys of each configuration restricted to the runs all seeded ones share (by position of seed)."""
        seeded = [c for c in configs if len(c) > 1]
        if not seeded:
            return [list(c) for c in configs]
        runs = min(len(c) for c in seeded)  # seeds are listed in the same order: the first `runs` pair
        return [list(c[:runs]) if len(c) > 1 else list(c) for c in configs]

    def terms(self, parts: Sequence[tuple[float, Sequence[str]]], heldout: str | None = None,
              metric: str = "loss") -> list[st.Term] | None:
        """(weight, num, den) terms of sum_i w_i metric(config_i), paired by seed; None if any is missing."""
        heldout = heldout or self.s.primary_set
        paired = self._paired_keys([keys for _, keys in parts])
        out = []
        for (weight, _), keys in zip(parts, paired):
            sums = self.sums(keys, heldout, metric)
            if sums is None:
                return None
            out.append((float(weight), *sums))
        return out

    def contrast(self, parts: Sequence[tuple[float, Sequence[str]]], heldout: str | None = None,
                 metric: str = "loss") -> st.Interval | None:
        """Paired interval (with p-value) of sum_i w_i metric(config_i); parts are (w, keys)."""
        heldout = heldout or self.s.primary_set
        terms = self.terms(parts, heldout, metric)
        if terms is None:
            return None
        return st.paired_contrast(terms, self.kept_clusters(heldout), num_resamples=self.s.bootstrap_resamples)

    def ratio(self, numerator: Sequence[tuple[float, Sequence[str]]], denominator: Sequence[tuple[float, Sequence[str]]],
              heldout: str | None = None) -> st.Interval | None:
        """Ratio of two contrasts with a joint bootstrap over seeds and articles (reported, not tested)."""
        heldout = heldout or self.s.primary_set
        terms = self.terms([*numerator, *denominator], heldout)
        if terms is None:
            return None
        return st.ratio_interval(terms[:len(numerator)], terms[len(numerator):], self.kept_clusters(heldout),
                                 num_resamples=self.s.bootstrap_resamples)


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
    """Every evaluated configuration with its intervals (loss, accuracy per held-out set)."""
    s, h = a.s, a.s.num_heads
    configs: list[tuple[int, str | None, float, list[str] | None]] = [(h, None, 0.0, None)]
    if not s.conversion_only:
        configs += [(h, None, x, None) for x in s.all_alphas]
        configs += [(h, r, s.ablation_alpha, a.keys(h, r, s.ablation_alpha, None if r == "fresh" else a.seeds[:1]))
                    for r in MHA_RECIPES] if s.mha_recipes else []
    for kv in s.converted_variants():
        for method in s.methods_for(kv):
            names = [method] + [label(method, KEEP)] * (method in s.keep_state_methods and kv not in s.group_kv_heads)
            configs.append((kv, method, 0.0, None))
            if not s.conversion_only:
                configs += [(kv, name, x, None) for name in names for x in s.uptrain_alphas(name)]
    rows = []
    for kv, method, alpha, keys in configs:
        keys = keys or a.keys(kv, method, alpha)
        values = {f"{n}_{m}": a.cell(kv, method, alpha, n, m, keys=keys)
                  for n, _ in s.heldout_examples for m in ("loss", "accuracy")}
        if all(v is None for v in values.values()):
            continue
        rows.append({"variant": variant(kv, h), "kv_heads": kv, "method": method, "alpha": alpha,
                     "runs": len(keys), **{k: v.to_json() if v else None for k, v in values.items()}})
    for kv in (h, a.s.gqa_kv_heads, 1) if s.c4_finetune_steps and "c4" in dict(s.heldout_examples) else ():
        value = a.cell(kv, None, 0.0, "c4", keys=a.finetuned_keys(kv))
        if value is not None:
            rows.append({"variant": variant(kv, h), "kv_heads": kv, "method": None if kv == h else "mean",
                         "alpha": 0.0, "finetuned": "c4", "runs": len(a.seeds), "c4_loss": value.to_json()})
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


def downstream(a: Analysis, output: Path) -> list[dict]:
    """BLEU and WMT validation loss of each WMT-fine-tuned variant over seeds (when any was fine-tuned)."""
    s, h = a.s, a.s.num_heads
    rows = []
    for kv, method in s.finetuned():
        bleu, keys = _finetuned(a, output, kv, method)
        losses = [a.evals.value(k, "wmt", "loss") for k in keys if a.evals.has(k)]
        rows.append({"variant": variant(kv, h), "alpha": s.ablation_alpha, "bleu_per_seed": bleu,
                     "bleu": st.t_interval(bleu).to_json() if len(bleu) >= 2 else None,
                     "wmt_loss_per_seed": losses,
                     "wmt_loss": st.t_interval(losses).to_json() if len(losses) >= 2 else None})
    return rows


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
    c4, timing_table = claims.timing_claim(timing, settings)
    found = cr.apply_holm([*claims.paper_claims(a), c4])
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
        "claims": found,
        "rerun": claims.rerun_views(a, c4, found),
        "paper_through_criteria": cr.paper_claims(),
        "beyond_paper": claims.beyond_paper(a),
        "kept_optimizer_state": claims.kept_state(a),
        "recipe_2x2": claims.recipe_2x2(a),
        "uptraining_saving": claims.uptraining_saving(a, settings.bootstrap_resamples),
        "groups": claims.groups_curve(a),
        "downstream": downstream(a, output),
        "timing": timing_table,
        "timing_setup": None if timing is None else {k: v for k, v in timing.items() if k not in ("shapes",)},
    }
