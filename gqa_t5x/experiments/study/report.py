"""`reproduction.md`, `reproduction.json` and the figures, from `reproduction_analysis`.

Every sentence with a number or a finding is generated from the analysed
results; the fixed text only explains the design and how to read it.
Figures put this study's numbers and the paper's in separate panels (as
`gqa-t5x report` does): the paper reports downstream scores of T5-Large/XXL,
we report held-out loss of a small model, so the axes are not comparable.

A reduced run (`results["reduced_run"]`, `StudySettings.is_reduced`) checks
the machinery only: its report, figures and console lines carry
`analysis.REDUCED_BANNER`, and each verdict says it is not meaningful.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from gqa_t5x.experiments import paper, tables
from gqa_t5x.experiments import figures as report_figures
from gqa_t5x.experiments.study.analysis import REDUCED_BANNER, REDUCED_VERDICT_NOTE


def _fmt(interval: dict | None, digits: int = 3) -> str:
    if not interval:
        return "-"
    half = (interval["high"] - interval["low"]) / 2
    return f"{interval['mean']:.{digits}f} ± {half:.{digits}f}"


def _kind(interval: dict | None) -> str:
    if not interval:
        return ""
    return {"t over seeds": "seeds", "t over timing rounds": "rounds"}.get(interval["kind"], "examples")


def _prob(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# ------------------------------------------------------------------ figures
def _reduced(results: dict) -> bool:
    return bool(results.get("reduced_run"))


def _errorbar(ax, xs, intervals, fmt: str = "{:.3f}", offset: tuple[float, float] = (4, 4), **kw) -> list[float]:
    """Means with their intervals (never below 0: losses, times and BLEU are
    not negative), each labelled with its value at `offset` points; returns
    the means drawn."""
    pts = [(x, i) for x, i in zip(xs, intervals) if i]
    if not pts:
        return []
    means, yerr = report_figures.error_bars([i for _, i in pts], floor=0.0)
    line = ax.errorbar([x for x, _ in pts], means, yerr=yerr, marker="o", capsize=3, **kw)
    report_figures.label_values(ax, [x for x, _ in pts], means, fmt, offset, color=line[0].get_color())
    return means


def _save(fig, results: dict, path: Path) -> None:
    report_figures.banner(fig, REDUCED_BANNER if _reduced(results) else None)
    report_figures.save_figure(fig, path)


def plot_pretraining(results: dict, path: Path) -> None:
    """Held-out loss (and the training loss) against pre-training steps."""
    fig, (ax,) = report_figures.panels(1, 7.0)
    section = results["pretraining"]
    if section["train_loss"]:
        ax.plot([p[0] for p in section["train_loss"]], [p[1] for p in section["train_loss"]],
                color="lightgray", label="training loss (batch)")
    for index, name in enumerate(n for n, _ in results["settings"]["heldout_examples"]):
        pts = [(p["step"], p[f"{name}_loss"]) for p in section["curve"]]
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"held-out {name}")
        ends = [pts[0], pts[-1]] if pts else []  # the first and last checkpoints: the drop
        report_figures.label_values(ax, [p[0] for p in ends], [p[1] for p in ends], "{:.2f}",
                                    (4, -10) if index == 0 else (4, 4), color=line.get_color())
    ax.set(xlabel="pre-training step", ylabel="loss per target token",
           title=f"MHA pre-training (span corruption, {results['settings']['heldout_examples'][0][0]})")
    if section["curve"] or section["train_loss"]:
        ax.legend(fontsize=8)
    else:
        report_figures.no_data(ax, "no pre-training checkpoint evaluated")
    _save(fig, results, path)


def _primary(results: dict) -> str:
    """'<first held-out set>_loss', the key of the primary metric."""
    return f"{results['settings']['heldout_examples'][0][0]}_loss"


def _config(results: dict, variant: str, method: str | None, alpha: float) -> dict | None:
    for row in results["configurations"]:
        if row["variant"] == variant and row["method"] == method and abs(row["alpha"] - alpha) < 1e-12:
            return row
    return None


def plot_methods(results: dict, path: Path) -> None:
    """Loss per conversion method at alpha 0 and the ablation alpha (paper's Fig. 4 beside)."""
    s = results["settings"]
    variants = ["MQA", f"GQA-{s['gqa_kv_heads']}"]
    alphas = (0.0,) if s["conversion_only"] else (0.0, s["ablation_alpha"])
    fig, axes = report_figures.panels(len(alphas) + 1, 4.6)
    for ax, alpha in zip(axes, alphas):
        drawn = []
        for offset, name in enumerate(variants):
            rows = [_config(results, name, m, alpha) for m in s["methods"]]  # absent methods: no point
            xs = [i + 0.15 * (offset * 2 - 1) for i in range(len(s["methods"]))]
            drawn += _errorbar(ax, xs, [r[_primary(results)] if r else None for r in rows], linestyle="none",
                               label=name)
        if not drawn:
            report_figures.no_data(ax, f"no converted model evaluated at alpha {alpha:g}")
            continue
        mha = _config(results, "MHA", None, 0.0)
        if mha:
            mha_loss = mha[_primary(results)]["mean"]
            ax.axhline(mha_loss, color="gray", linestyle="--", label=f"MHA (alpha 0): {mha_loss:.3f}")
        ax.set_xticks(range(len(s["methods"])), s["methods"])
        ax.set(ylabel="held-out loss (lower is better)", title=f"this study, alpha = {alpha:g}")
        ax.legend(fontsize=8)
    report_figures.paper_methods_panel(axes[-1], "paper: T5-Large -> MQA, alpha 0.05",
                                       "average score (higher is better)")
    _save(fig, results, path)


def plot_alpha(results: dict, path: Path) -> None:
    """Loss against the uptraining proportion (paper's Fig. 5 beside)."""
    s = results["settings"]
    alphas = [0.0, *sorted(set(s["alphas"]) | {s["ablation_alpha"]})]
    fig, (ours, ref) = report_figures.panels(2)
    drawn = []
    # Labels: MQA's above its points, GQA's and MHA's below theirs (the curves meet after uptraining).
    for name, offset in ((f"GQA-{s['gqa_kv_heads']}", (4, -10)), ("MQA", (4, 4))):
        rows = [_config(results, name, "mean", a) for a in alphas]
        drawn += _errorbar(ours, alphas, [r[_primary(results)] if r else None for r in rows], offset=offset,
                           label=f"{name} (mean)")
    mha = [_config(results, "MHA", None, a) for a in alphas]
    drawn += _errorbar(ours, alphas, [r[_primary(results)] if r else None for r in mha], offset=(-28, -11),
                       label="MHA continued", color="gray")
    if mha[0]:
        ours.axhline(mha[0][_primary(results)]["mean"], color="gray", linestyle="--", label="MHA (alpha 0)")
    ours.set(xlabel="uptraining proportion alpha", ylabel="held-out loss (lower is better)", title="this study")
    if drawn:
        ours.legend(fontsize=8)
    else:
        report_figures.no_data(ours, "no uptrained model evaluated")
    report_figures.paper_alpha_panel(ref)
    _save(fig, results, path)


def plot_timing(results: dict, path: Path) -> None:
    """Time per sample against kv heads (paper's time vs groups beside)."""
    s = results["settings"]
    kv = {"MHA": s["num_heads"], f"GQA-{s['gqa_kv_heads']}": s["gqa_kv_heads"], "MQA": 1}
    fig, (ours, ref) = report_figures.panels(2)
    drawn = []
    for row in results["timing"]:
        names = list(row["time_per_sample"])
        drawn += _errorbar(ours, [kv[n] for n in names], [row["time_per_sample"][n] for n in names], "{:.3g}",
                           label=f"in {row['input_length']} / out {row['output_length']}")
    if drawn:
        ours.set_xscale("log", base=2)
        ours.set_xticks(sorted(set(kv.values())), [str(g) for g in sorted(set(kv.values()))])
        scale = report_figures.choose_scale(ours, drawn)
        ours.set(xlabel="key/value heads", ylabel="time per sample (s)" + (", log scale" if scale == "log" else ""),
                 title="this study (CPU, greedy; 95% interval over rounds)")
        ours.legend(fontsize=8)
    else:
        report_figures.no_data(ours, "timing not run")
    groups = sorted(paper.TIME_VS_GROUPS)
    ref.plot(groups, [paper.TIME_VS_GROUPS[g] for g in groups], marker="o", color="gray")
    report_figures.label_values(ref, groups, [paper.TIME_VS_GROUPS[g] for g in groups], "{:.2f}")
    ref.set_xscale("log", base=2)
    ref.set_xticks(groups, [str(g) for g in groups])
    ref.set(xlabel="groups", ylabel="time per sample (s)", title="paper (T5-XXL, in 2048 / out 512)")
    _save(fig, results, path)


def plot_bleu(results: dict, path: Path) -> None:
    """BLEU per variant (paper's Table 1 WMT column beside).

    A variant fine-tuned with two or more seeds is drawn with its interval;
    one fine-tuned with a single seed (as the reduced setting does) has no
    interval and is drawn as that seed's point; with none, the panel says so.
    """
    fig, (ours, ref) = report_figures.panels(2)
    rows = results["downstream"]
    drawn = _errorbar(ours, list(range(len(rows))), [r["bleu"] for r in rows], "{:.3g}", linestyle="none",
                      label="mean, 95% interval over seeds")
    single = [(i, r["bleu_per_seed"][0]) for i, r in enumerate(rows) if not r["bleu"] and r["bleu_per_seed"]]
    if single:
        ours.plot([i for i, _ in single], [b for _, b in single], "D", color="gray", label="one seed (no interval)")
        report_figures.label_values(ours, [i for i, _ in single], [b for _, b in single], "{:.3g}")
    if drawn or single:
        ours.set_xticks(range(len(rows)), [r["variant"] for r in rows])
        ours.set_xlim(-0.5, len(rows) - 0.5)
        ours.set_ylim(bottom=0)
        ours.set(ylabel="BLEU (greedy)", title="this study: WMT En-De sample")
        ours.legend(fontsize=8)
    else:
        report_figures.no_data(ours, "no fine-tuned model was scored")
        ours.set(title="this study: WMT En-De sample")
    names = ["MHA-XXL", "GQA-8-XXL", "MQA-XXL"]
    scores = [paper.TABLE1[n]["scores"]["wmt14_ende"] for n in names]
    bars = ref.bar(range(3), scores, color="gray")  # bars from 0: their lengths are the scores
    ref.bar_label(bars, [f"{v:.1f}" for v in scores], fontsize=7)
    ref.set_xticks(range(3), names)
    ref.set(ylabel="BLEU", title="paper: WMT14 En-De (Table 1)")
    _save(fig, results, path)


# ------------------------------------------------------------------ markdown
def _verdict(results: dict, verdict: str) -> str:
    """A verdict as the report prints it ('not meaningful' in a reduced run)."""
    return f"{verdict} ({REDUCED_VERDICT_NOTE})" if _reduced(results) and verdict != "not run" else verdict


def _verdict_table(results: dict) -> list[str]:
    lines = ["| id | claim | verdict | same verdict on a re-run (est.) | the paper |", "|---|---|---|---|---|"]
    for c in results["claims"]:
        p = "- (reduced run)" if _reduced(results) else _prob(c["same_verdict_probability"])
        lines.append(f"| {c['id']} | {c['claim']} | **{_verdict(results, c['verdict'])}** | {p} | {c['paper']} |")
    for b in results["beyond_paper"]:
        lines.append(f"| {b['id']} | {b['claim']} | **{_verdict(results, b['verdict'])}** | see below | "
                     "(beyond the paper) |")
    return lines


def _banner_lines(results: dict) -> list[str]:
    """The reduced run's banner as a markdown quote and why (nothing for a full run)."""
    if not _reduced(results):
        return []
    s = results["settings"]
    return [f"> **{REDUCED_BANNER}.** This run used the reduced sizes (`--reduced`: {s['pretrain_steps']} "
            f"pre-training steps of a {s['num_layers']}+{s['num_layers']}-layer model with d_model "
            f"{s['emb_dim']}): it shows that every stage runs and the report is written. Its numbers, "
            "verdicts and re-run estimates say nothing about GQA; run without `--reduced` for the study.", ""]


def _comparison_rows(results: dict, claim: dict) -> list[str]:
    lines = []
    for role, items in (("primary", claim["primary"]), ("supporting", claim["supporting"])):
        for c in items:
            note = f" ({c['note']})" if c.get("note") else ""
            lines.append(f"| {claim['id']} | {role} | {c['comparison']}{note} | {c['expected']} | "
                         f"{_fmt(c['interval'], 4)} | {_kind(c['interval'])} | {_verdict(results, c['verdict'])} | "
                         f"{'-' if _reduced(results) else _prob(c['same_verdict_probability'])} |")
    return lines


def _configuration_table(results: dict) -> list[str]:
    sets = [n for n, _ in results["settings"]["heldout_examples"]]
    head = "| model | method | alpha | runs | " + " | ".join(f"{n} loss | {n} accuracy" for n in sets) + " | interval |"
    lines = [head, "|" + "---|" * (5 + 2 * len(sets))]
    for r in results["configurations"]:
        cells = " | ".join(f"{_fmt(r[f'{n}_loss'])} | {_fmt(r[f'{n}_accuracy'])}" for n in sets)
        kind = _kind(r[f"{sets[0]}_loss"])
        lines.append(f"| {r['variant']} | {r['method'] or '-'} | {r['alpha']:g} | {r['runs']} | {cells} | {kind} |")
    return lines


def _beyond_rows(results: dict) -> list[str]:
    lines = ["| method | model | alpha | method's loss | mean's loss | paired loss(mean) - loss(method) | result |",
             "|---|---|---|---|---|---|---|"]
    for b in results["beyond_paper"]:
        for c in b["cells"]:
            lines.append(f"| {b['method']} | {c['variant']} | {c['alpha']:g} | {_fmt(c['loss'], 4)} | "
                         f"{_fmt(c['mean_loss'], 4)} | {_fmt(c['paired_mean_minus_method'], 4)} "
                         f"({_kind(c['paired_mean_minus_method'])}) | {c['result']} |")
    return lines


def _downstream_rows(results: dict) -> list[str]:
    timing: dict[str, dict] = {}
    for row in results["timing"]:
        for name, interval in row["time_per_sample"].items():
            timing.setdefault(name, {})[(row["input_length"], row["output_length"])] = interval
    shapes = [(r["input_length"], r["output_length"]) for r in results["timing"]]
    head = ("| model | BLEU (seeds) | WMT validation loss (seeds) | "
            + " | ".join(f"s/sample in {i} / out {o} (rounds)" for i, o in shapes) + " |")
    lines = [head, "|" + "---|" * (3 + len(shapes))]
    for r in results["downstream"]:
        times = " | ".join(_fmt(timing.get(r["variant"], {}).get(shape), 5) for shape in shapes)
        lines.append(f"| {r['variant']} (alpha {r['alpha']:g}) | {_fmt(r['bleu'], 2)} | {_fmt(r['wmt_loss'])} | {times} |")
    return lines


def _heldout_sizes(results: dict) -> list[tuple[str, int]]:
    """(set, examples actually kept) pairs (a small split keeps all it has)."""
    sizes = (results.get("data") or {}).get("heldout", {})
    return [(n, sizes.get(n, {}).get("examples", k)) for n, k in results["settings"]["heldout_examples"]]


def _pretraining_text(results: dict) -> list[str]:
    section, s = results["pretraining"], results["settings"]
    lines = []
    if section["curve"]:
        first, last = section["curve"][0], section["curve"][-1]
        name = s["heldout_examples"][0][0]
        lines.append(f"Held-out {name} loss {first[f'{name}_loss']:.3f} at step {first['step']} -> "
                     f"{last[f'{name}_loss']:.3f} at step {last['step']} (token accuracy "
                     f"{first[f'{name}_accuracy']:.3f} -> {last[f'{name}_accuracy']:.3f}).")
    flat = section.get("flattening")
    if flat and flat["final_over_early"] is not None and flat["late_share_of_drop"] is not None:
        first_step = section["curve"][0]["step"]
        lines.append(f"The loss fell {flat['early_drop_per_1k_steps']:.3f} per 1,000 steps between the first two "
                     f"checkpoints and {flat['final_drop_per_1k_steps']:.3f} per 1,000 steps between the last two "
                     f"(ratio {flat['final_over_early']:.2f}); the steps after {flat['late_from_step']} "
                     f"({1 - flat['late_from_step'] / s['pretrain_steps']:.0%} of the run) gave "
                     f"{100 * flat['late_share_of_drop']:.1f}% of the drop since step {first_step}.")
    lines.append(f"Learning rate: {s['peak_learning_rate']} for the first {s['warmup_fraction']:.0%} of the steps, "
                 "then 1/sqrt(step) (T5's schedule, compressed to this length); uptraining continues it.")
    return lines


def _rerun_text(results: dict) -> list[str]:
    if _reduced(results):
        return ["Not estimated: the verdicts of a reduced run are not meaningful, so neither is their stability."]
    lines = []
    for c in results["claims"]:
        p = c["same_verdict_probability"]
        if p is None:
            continue
        kinds = {_kind(x["interval"]) for x in c["primary"] if x["interval"]}
        if kinds == {"examples"}:
            basis = "its intervals are over held-out examples of deterministic conversions, which new seeds do not change"
        elif kinds == {"rounds"}:
            basis = "timing rounds on this machine; the verdict depends on the machine and its load, not on seeds"
        else:
            basis = "a normal model of the per-seed spread: a re-run's mean ~ N(mean, 2 sd^2 / n)"
        lines.append(f"- {c['id']} ({c['verdict']}): {p:.2f} ({basis}).")
    return lines


def _design(results: dict) -> list[str]:
    s = results["settings"]
    vocab_size = results["data"]["vocab_size"] if results["data"] else "-"
    corpus = s["heldout_examples"][0][0]
    lines = [
        f"- Model: T5.1.1 (gated GELU, RMS norm, relative position bias), {s['num_layers']}+{s['num_layers']} "
        f"layers, d_model {s['emb_dim']}, {s['num_heads']} heads of {s['head_dim']}, d_ff {s['mlp_dim']}; "
        f"8 query heads so that G = 1, 2, 4, 8 exist. GQA variant: G = {s['gqa_kv_heads']}.",
        f"- Vocabulary: SentencePiece unigram, {s['vocab_pieces']} pieces + 100 sentinels (padded to {vocab_size}); "
        "a far cheaper output layer than T5's 32k on a CPU"
        + (f", trained on {s['vocab_sentences']} Wikipedia lines plus a quarter as many WMT training sentences of "
           "each language, so that it covers German." if corpus == "wikipedia" else f", trained on the {corpus}."),
        f"- Pre-training on {corpus}: span corruption (noise 0.15, mean span 3), {s['input_length']} input / "
        f"{s['target_length']} target tokens, batch {s['batch_size']}, P = {s['pretrain_steps']} steps, Adafactor.",
        f"- Conversion of decoder self- and cross-attention with {', '.join(s['methods'])}"
        + (f" (GQA: {', '.join(s['gqa_methods'])})" if s.get("gqa_methods") else "")
        + f"; `lsq` is calibrated on {s['calibration_examples']} training examples.",
        "- Held-out sets: " + ", ".join(f"{n} ({k} examples)" for n, k in _heldout_sizes(results))
        + ", fixed span-corrupted examples spread over each validation split."]
    if not s["conversion_only"]:
        lines += [
            f"- Uptraining: alpha in {s['alphas']} (alpha * P steps, the same recipe); the multi-head model is "
            "continued for the same steps (the compute-fair reference).",
            f"- Downstream: WMT En-De sample, pairs up to {s['wmt_length']} tokens, {s['finetune_steps']} fine-tuning "
            f"steps (batch {s['finetune_batch']}, lr 0.001, dropout 0.1), BLEU of greedy decodes on "
            f"{s['bleu_examples']} validation pairs; time per sample of greedy decoding, batch {s['timing_batch']}, "
            f"{s['timing_rounds']} interleaved rounds."]
    return lines


def _scope(results: dict) -> list[str]:
    s = results["settings"]
    if s["conversion_only"]:
        return [
            "What it shows: for one small model pre-trained here, how much each conversion method loses right after "
            "conversion (alpha = 0), with intervals, and which orderings those intervals resolve.",
            "",
            "What it does not show: anything about uptraining (the paper's ablation compares methods after 5% "
            "uptraining, where differences shrink), downstream quality, decoding speed, or models at T5's scale; "
            "`gqa-t5x reproduce` runs those parts (docs/experiments.md).",
            "",
            "- One small pre-trained model, not T5.1.1 on C4; the pre-trained model is not varied (its seed is fixed).",
            "- Held-out examples come from a few hundred documents; the bootstrap treats examples as independent, "
            "so intervals over examples are somewhat optimistic."]
    return [
        "- One small pre-trained model on Wikipedia, not T5.1.1 on C4; quality is held-out loss, not the "
        "paper's downstream averages, and the pre-trained model is not varied (its seed is fixed).",
        "- Held-out examples come from a few hundred articles; the bootstrap treats examples as independent, "
        "so intervals over examples are somewhat optimistic.",
        "- Time per sample is measured on this machine's CPU at small shapes, where the key/value cache is "
        "small; the paper's speed-up comes from memory bandwidth at large shapes (see docs/bench_decode.md)."]


def markdown(results: dict, figure_dir: str) -> str:
    """The report's text."""
    s, m = results["settings"], results["machine"]
    minutes = results["wall_time_s"] / 60
    pretrain_seed = results["sessions"][-1].get("pretrain_seed") if results["sessions"] else "-"
    title = "GQA's conversion ablation at alpha = 0 (quickstart)" if s["conversion_only"] else (
        "Reproducing GQA's findings at small scale")
    out = [f"# {title}", "", *_banner_lines(results),
           "Generated by `gqa-t5x` from one run of the command below; every number is a mean with "
           "its 95% interval. Interval kinds: **seeds** = Student-t over the seeds (runs that differ in "
           "uptraining/fine-tuning data order and, for `random`, initialisation; differences paired by seed); "
           "**examples** = bootstrap over held-out examples (deterministic conversions without uptraining, "
           "differences paired by example); **rounds** = Student-t over interleaved timing rounds. The quality "
           "metric is held-out span-corruption loss per target token (lower is better). All results are "
           "conditional on one pre-trained model.", "",
           "## Verdicts", "", *([f"> **{REDUCED_BANNER}.**", ""] if _reduced(results) else []),
           *_verdict_table(results), "",
           "## Run", "", f"    {results['command']}", "",
           f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, JAX {m['jax']} on {m['backend']}.",
           f"- Wall time: {minutes:.1f} minutes over {len(results['sessions'])} recorded session(s) (a killed "
           f"session counts up to its last finished stage); the stages' own times add up to "
           f"{sum(results['stage_wall_time_s'].values()) / 60:.1f} minutes, per stage (s): "
           + ", ".join(f"{k} {v:g}" for k, v in results["stage_wall_time_s"].items()) + ".",
           f"- Seeds: {results['seeds']} (pre-training seed {pretrain_seed}).", "",
           "## Design", "", *_design(results), "",
           "## Pre-training", "", *_pretraining_text(results), "", f"![pre-training]({figure_dir}/pretraining.png)", ""]
    if s["conversion_only"]:
        out += ["## Conversion ablation at alpha = 0 (paper Fig. 4 without uptraining)", "",
                *_configuration_table(results), "", f"![methods]({figure_dir}/methods.png)", ""]
    else:
        out += ["## Conversion ablation (paper Fig. 4) and uptraining proportion (Fig. 5)", "",
                *_configuration_table(results), "", f"![methods]({figure_dir}/methods.png)", "",
                f"![alpha]({figure_dir}/alpha.png)", "",
                "## Downstream and time per sample (Table 1 at small scale)", "", *_downstream_rows(results), "",
                f"![bleu]({figure_dir}/bleu.png)", "", f"![timing]({figure_dir}/timing.png)", ""]
    out += ["## Every tested difference", "",
            "| claim | role | difference | paper predicts | estimate ± 95% | interval | verdict | same on re-run |",
            "|---|---|---|---|---|---|---|---|"]
    for c in results["claims"]:
        out += _comparison_rows(results, c)
    out += ["", "A claim is reproduced when every primary difference excludes 0 in the paper's direction, not "
            "reproduced when one excludes 0 in the other direction, else inconclusive. Supporting rows are "
            "reported but do not enter the verdict.", "",
            "## Beyond the paper", "",
            "A method is called better (worse) than mean only where its own interval and mean's do not overlap; "
            "the paired difference (positive = the method's loss is lower) is shown beside.", "",
            *_beyond_rows(results), "",
            "## How likely is the same verdict with other seeds?", "",
            "Estimated probability that a re-run with as many new seeds gives the same verdict:", "",
            *_rerun_text(results), "",
            "## What this does and does not show" if s["conversion_only"] else "## What this does not show", "",
            *_scope(results), ""]
    return "\n".join(out)


def write_report(results: dict, report_dir: str | Path) -> dict[str, Path]:
    """Writes reproduction.md, reproduction.json and the figures.

    Args:
      results: `reproduction_analysis.analyse`'s output.
      report_dir: Folder of the two files; figures go to its `reproduction/`.

    Returns:
      Name -> path of each file written.
    """
    out = Path(report_dir)
    figures = out / "reproduction"
    figures.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "reproduction.md", "json": out / "reproduction.json"}
    plots = {"pretraining": plot_pretraining, "methods": plot_methods}
    if not results["settings"]["conversion_only"]:
        plots.update(alpha=plot_alpha, timing=plot_timing, bleu=plot_bleu)
    for name, plot in plots.items():
        files[name] = figures / f"{name}.png"
        plot(results, files[name])
    files["json"].write_text(json.dumps(results, indent=2))
    files["markdown"].write_text(markdown(results, "reproduction"))
    return files


def summary_lines(results: dict, width: int = tables.CONSOLE_WIDTH) -> list[str]:
    """The verdicts for the console, each at most `width` characters wide.

    Args:
      results: `analysis.analyse`'s output.
      width: Most characters per line (a long verdict continues, indented,
        on the next line).

    Returns:
      A reduced run's banner first (if it is one), then one verdict per
      claim, 'ID: verdict - claim' (a reduced run's verdicts say they are
      not meaningful).
    """
    lines = []
    if _reduced(results):
        lines.append(f"*** {REDUCED_BANNER} ***")
    for item in [*results["claims"], *results["beyond_paper"]]:
        text = f"{item['id']}: {_verdict(results, item['verdict'])} - {item['claim']}"
        lines += textwrap.wrap(text, width, subsequent_indent="    ", break_on_hyphens=False)
    return lines
