"""The reproduction report's figures (PNG, matplotlib Agg), from `analysis.analyse`'s results.

One function per figure, each `plot_<name>(results, path)`; `available`
says which figures have data and `write_figures` draws those (a figure
without data is skipped, and the report links only the figures written).
This study's numbers and the paper's are in separate panels: the paper
reports downstream scores of T5-Large/XXL on TPUs, we report held-out loss of
a small model and CPU times, so the axes are not comparable. Error bars are
the intervals' own bounds (losses and times clipped at 0); a reduced run's
figures carry `analysis.REDUCED_BANNER` across the top.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gqa_t5x.experiments import figures, paper
from gqa_t5x.experiments.study.analysis import REDUCED_BANNER
from gqa_t5x.experiments.study.settings import KEEP, label, split_label


def reduced(results: dict) -> bool:
    """Whether the results are a reduced run's (machinery check only)."""
    return bool(results.get("reduced_run"))


def primary_metric(results: dict) -> str:
    """'<first held-out set>_loss', the key of the primary metric in a configuration row."""
    return f"{results['settings']['heldout_examples'][0][0]}_loss"


def gqa_name(settings: dict) -> str:
    """The label of the study's GQA variant, e.g. 'GQA-2'."""
    return f"GQA-{settings['gqa_kv_heads']}"


def config(results: dict, variant: str, method: str | None, alpha: float) -> dict | None:
    """The configuration row (not a C4-fine-tuned one) of a variant, method label and alpha."""
    for row in results.get("configurations") or []:
        if (row["variant"] == variant and row["method"] == method and abs(row["alpha"] - alpha) < 1e-12
                and not row.get("finetuned")):
            return row
    return None


def kv_heads(name: str, num_heads: int) -> int:
    """'MHA' -> num_heads, 'MQA' -> 1, 'GQA-G' -> G."""
    return num_heads if name == "MHA" else 1 if name == "MQA" else int(name.split("-")[1])


def curve_labels(settings: dict) -> list[str]:
    """The method labels with an alpha curve besides mean (e.g. 'align', 'align-keep')."""
    keep = set(settings.get("keep_state_methods") or ())
    out = []
    for method in settings.get("curve_methods") or ():
        if method != "mean":
            out += [method] + ([label(method, KEEP)] if method in keep else [])
    return out


def _errorbar(ax, xs, intervals, fmt: str = "{:.3f}", offset: tuple[float, float] = (4, 4),
              floor: float | None = 0.0, labelled: bool = True, **kw) -> list[float]:
    """Means with their intervals (clipped at `floor`), each labelled with its value (unless not
    `labelled`); returns the means drawn."""
    pts = [(x, i) for x, i in zip(xs, intervals) if i]
    if not pts:
        return []
    means, yerr = figures.error_bars([i for _, i in pts], floor=floor)
    line = ax.errorbar([x for x, _ in pts], means, yerr=yerr, marker="o", capsize=3, **kw)
    if labelled:
        figures.label_values(ax, [x for x, _ in pts], means, fmt, offset, color=line[0].get_color())
    return means


def _save(fig, results: dict, path: Path) -> None:
    figures.banner(fig, REDUCED_BANNER if reduced(results) else None)
    figures.save_figure(fig, path)


def _log2_kv(ax, values: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(values, [str(v) for v in values])


# ------------------------------------------------------------------ figures
def plot_pretraining(results: dict, path: Path) -> None:
    """Held-out loss (and the training loss) against pre-training steps."""
    fig, (ax,) = figures.panels(1, 7.0)
    section = results.get("pretraining") or {}
    train, curve = section.get("train_loss") or [], section.get("curve") or []
    if train:
        ax.plot([p[0] for p in train], [p[1] for p in train], color="lightgray", label="training loss (batch)")
    for index, name in enumerate(n for n, _ in results["settings"]["heldout_examples"]):
        pts = [(p["step"], p[f"{name}_loss"]) for p in curve if f"{name}_loss" in p]
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"held-out {name}")
        ends = [pts[0], pts[-1]] if pts else []  # the first and last checkpoints: the drop
        figures.label_values(ax, [p[0] for p in ends], [p[1] for p in ends], "{:.2f}",
                             (4, -10) if index == 0 else (4, 4), color=line.get_color())
    ax.set(xlabel="pre-training step", ylabel="loss per target token",
           title=f"MHA pre-training (span corruption, {results['settings']['heldout_examples'][0][0]})")
    if curve or train:
        ax.legend(fontsize=8)
    else:
        figures.no_data(ax, "no pre-training checkpoint evaluated")
    _save(fig, results, path)


def plot_methods(results: dict, path: Path) -> None:
    """Loss per conversion method (and kept-state recipe) at alpha 0 and the ablation alpha, MQA and GQA
    (the paper's Fig. 4 beside)."""
    s, metric = results["settings"], primary_metric(results)
    variants = ["MQA", gqa_name(s)]
    alphas = (0.0,) if s["conversion_only"] else (0.0, s["ablation_alpha"])
    keep = [label(m, KEEP) for m in s.get("keep_state_methods") or ()]
    fig, axes = figures.panels(len(alphas) + 1, 4.8)
    for ax, alpha in zip(axes, alphas):
        names = list(s["methods"]) + (keep if alpha else [])
        drawn = []
        for offset, name in enumerate(variants):
            rows = [config(results, name, m, alpha) for m in names]  # absent methods: no point
            xs = [i + 0.15 * (offset * 2 - 1) for i in range(len(names))]
            drawn += _errorbar(ax, xs, [r[metric] if r else None for r in rows], linestyle="none", label=name)
        if not drawn:
            figures.no_data(ax, f"no converted model evaluated at alpha {alpha:g}")
            continue
        mha = config(results, "MHA", None, alpha)
        if mha and mha.get(metric):
            value = mha[metric]["mean"]
            ax.axhline(value, color="gray", linestyle="--", label=f"MHA (alpha {alpha:g}): {value:.3f}")
        ax.set_xticks(range(len(names)), names)
        ax.set(ylabel="held-out loss (lower is better)", title=f"this study, alpha = {alpha:g}")
        ax.legend(fontsize=8)
    figures.paper_methods_panel(axes[-1], "paper: T5-Large -> MQA, alpha 0.05", "average score (higher is better)")
    _save(fig, results, path)


def plot_alpha(results: dict, path: Path) -> None:
    """Loss against the uptraining proportion: mean pooling for MQA, GQA and the MHA
    continuation (Fig. 5 at this scale), then per variant the other curve methods
    (fresh and kept optimizer state) against mean's target; the paper's Fig. 5 last."""
    s, metric = results["settings"], primary_metric(results)
    up, gqa = s["ablation_alpha"], gqa_name(s)
    alphas = [0.0, *sorted(set(s["alphas"]) | {up})]
    others = curve_labels(s)
    fig, axes = figures.panels(2 + 2 * bool(others), 4.6)
    ours, ref = axes[0], axes[-1]
    drawn = []
    # Labels: MQA's above its points, GQA's and MHA's below theirs (the curves meet after uptraining).
    for name, offset in ((gqa, (4, -10)), ("MQA", (4, 4))):
        rows = [config(results, name, "mean", a) for a in alphas]
        drawn += _errorbar(ours, alphas, [r[metric] if r else None for r in rows], offset=offset,
                           label=f"{name} (mean)")
    mha = [config(results, "MHA", None, a) for a in alphas]
    drawn += _errorbar(ours, alphas, [r[metric] if r else None for r in mha], offset=(-28, -11),
                       label="MHA continued", color="gray")
    if mha[0]:
        ours.axhline(mha[0][metric]["mean"], color="gray", linestyle="--", label="MHA (alpha 0)")
    ours.set(xlabel="uptraining proportion alpha", ylabel="held-out loss (lower is better)",
             title="this study: mean pooling")
    if drawn:
        ours.legend(fontsize=8)
    else:
        figures.no_data(ours, "no uptrained model evaluated")
    for ax, name in zip(axes[1:-1] if others else [], ("MQA", gqa)):
        saving = [0.0, *sorted(x for x in set(s.get("saving_alphas") or ()) | {up} if x <= up)]
        shown = []
        for index, method in enumerate(["mean", *others]):
            base = split_label(method)[0]
            rows = [config(results, name, base if a == 0 else method, a) for a in saving]
            shown += _errorbar(ax, [a + 0.0004 * index for a in saving], [r[metric] if r else None for r in rows],
                               labelled=index == 0, label=method)  # values of the others: the tables
        target = config(results, name, "mean", up)
        if target:
            ax.axhline(target[metric]["mean"], color="gray", linestyle=":", label=f"mean at alpha {up:g}")
        ax.set(xlabel="uptraining proportion alpha", ylabel="held-out loss", title=f"this study: {name}, methods")
        if shown:
            ax.legend(fontsize=8)
        else:
            figures.no_data(ax, f"no {name} curve evaluated")
    figures.paper_alpha_panel(ref)
    _save(fig, results, path)


def plot_groups(results: dict, path: Path) -> None:
    """Loss and gap to MHA against the number of kv heads at the ablation alpha (mean pooling)."""
    s = results["settings"]
    rows = results.get("groups") or []
    fig, (loss_ax, gap_ax) = figures.panels(2, 5.0)
    kv = [r["kv_heads"] for r in rows]
    drawn = _errorbar(loss_ax, kv, [r.get("loss") for r in rows], label="mean pooling (MHA: continued)")
    gaps = _errorbar(gap_ax, kv, [r.get("gap_to_mha") for r in rows], floor=None, label="paired, seeds+articles")
    for ax, values, key, ylabel in ((loss_ax, drawn, "loss", "held-out loss"),
                                    (gap_ax, gaps, "gap_to_mha", "loss(GQA-G) - loss(MHA)")):
        if not values:
            figures.no_data(ax, "groups not run")
            continue
        _log2_kv(ax, sorted({r["kv_heads"] for r in rows if r.get(key)}))
        ax.set(xlabel="key/value heads G", ylabel=ylabel, title=f"this study, alpha = {s['ablation_alpha']:g}")
        ax.legend(fontsize=8)
    if gaps:
        gap_ax.axhline(0.0, color="gray", linestyle="--")
    _save(fig, results, path)


def plot_timing(results: dict, path: Path) -> None:
    """Time per sample and cache bytes per sample against kv heads (the paper's time vs groups beside)."""
    s = results["settings"]
    setup = results.get("timing_setup") or {}
    kv = dict(setup.get("variants") or {})
    fig, (ours, cache, ref) = figures.panels(3, 4.8)
    drawn = []
    for row in results.get("timing") or []:
        names = sorted(row["time_per_sample"], key=lambda n: kv.get(n, kv_heads(n, s["num_heads"])))
        xs = [kv.get(n, kv_heads(n, s["num_heads"])) for n in names]
        drawn += _errorbar(ours, xs, [row["time_per_sample"][n] for n in names], "{:.3g}",
                           label=f"in {row['input_length']} / out {row['output_length']}")
    if drawn:
        _log2_kv(ours, sorted({kv.get(n, kv_heads(n, s["num_heads"]))
                               for r in results["timing"] for n in r["time_per_sample"]}))
        scale = figures.choose_scale(ours, drawn)
        ours.set(xlabel="key/value heads", ylabel="time per sample (s)" + (", log scale" if scale == "log" else ""),
                 title="this study (CPU, greedy; 95% over rounds)")
        ours.legend(fontsize=8)
    else:
        figures.no_data(ours, "timing not run")
    first = (results.get("timing") or [{}])[0]
    totals = {n: v["total"] for n, v in (first.get("cache_bytes_per_sample") or {}).items()}
    if totals:
        names = sorted(totals, key=lambda n: kv.get(n, kv_heads(n, s["num_heads"])))
        bars = cache.bar(range(len(names)), [totals[n] / 1024 for n in names], color="tab:blue")
        cache.bar_label(bars, [f"{totals[n] / 1024:.3g}" for n in names], fontsize=7)
        cache.set_xticks(range(len(names)), names)
        cache.set_ylim(bottom=0)
        cache.set(ylabel="KV cache per sample (KiB)", title="this study: cache (self + cross)")
    else:
        figures.no_data(cache, "cache size not recorded")
    groups = sorted(paper.TIME_VS_GROUPS)
    ref.plot(groups, [paper.TIME_VS_GROUPS[g] for g in groups], marker="o", color="gray")
    figures.label_values(ref, groups, [paper.TIME_VS_GROUPS[g] for g in groups], "{:.2f}")
    _log2_kv(ref, groups)
    ref.set(xlabel="groups", ylabel="time per sample (s)", title="paper (T5-XXL, in 2048 / out 512)")
    _save(fig, results, path)


def plot_bleu(results: dict, path: Path) -> None:
    """BLEU per WMT-fine-tuned variant (the paper's Table 1 WMT column beside); one seed: its point."""
    fig, (ours, ref) = figures.panels(2)
    rows = results.get("downstream") or []
    drawn = _errorbar(ours, list(range(len(rows))), [r.get("bleu") for r in rows], "{:.3g}", linestyle="none",
                      label="mean, 95% over seeds")
    single = [(i, r["bleu_per_seed"][0]) for i, r in enumerate(rows) if not r.get("bleu") and r.get("bleu_per_seed")]
    if single:
        ours.plot([i for i, _ in single], [b for _, b in single], "D", color="gray", label="one seed (no interval)")
        figures.label_values(ours, [i for i, _ in single], [b for _, b in single], "{:.3g}")
    if drawn or single:
        ours.set_xticks(range(len(rows)), [r["variant"] for r in rows])
        ours.set_xlim(-0.5, len(rows) - 0.5)
        ours.set_ylim(bottom=0)
        ours.set(ylabel="BLEU (greedy)", title="this study: WMT En-De sample")
        ours.legend(fontsize=8)
    else:
        figures.no_data(ours, "no fine-tuned model was scored")
    names = ["MHA-XXL", "GQA-8-XXL", "MQA-XXL"]
    scores = [paper.TABLE1[n]["scores"]["wmt14_ende"] for n in names]
    bars = ref.bar(range(3), scores, color="gray")  # bars from 0: their lengths are the scores
    ref.bar_label(bars, [f"{v:.1f}" for v in scores], fontsize=7)
    ref.set_xticks(range(3), names)
    ref.set(ylabel="BLEU", title="paper: WMT14 En-De (Table 1)")
    _save(fig, results, path)


# ------------------------------------------------------------------ which, and all
PLOTS: dict[str, Callable[[dict, Path], None]] = {
    "pretraining": plot_pretraining, "methods": plot_methods, "alpha": plot_alpha, "groups": plot_groups,
    "timing": plot_timing, "bleu": plot_bleu}


def available(results: dict) -> list[str]:
    """The figures whose data the results hold (in `PLOTS` order)."""
    section = results.get("pretraining") or {}
    rows = [r for r in results.get("configurations") or [] if not r.get("finetuned")]
    has = {
        "pretraining": bool(section.get("curve") or section.get("train_loss")),
        "methods": any(r["variant"] != "MHA" for r in rows),
        "alpha": any(r["alpha"] > 0 for r in rows),
        "groups": any(r.get("loss") for r in results.get("groups") or []),
        "timing": bool(results.get("timing")),
        "bleu": bool(results.get("downstream")),
    }
    return [name for name in PLOTS if has[name]]


def write_figures(results: dict, figure_dir: Path) -> dict[str, Path]:
    """Draws every available figure as `<figure_dir>/<name>.png`; returns name -> path."""
    figure_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in available(results):
        written[name] = figure_dir / f"{name}.png"
        PLOTS[name](results, written[name])
    return written
