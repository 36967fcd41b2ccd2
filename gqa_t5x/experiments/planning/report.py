"""The plan's report: a console table, DIR/plan.md, DIR/plan.json and DIR/plan.png.

Rows are sorted by predicted time per sample; a row on the Pareto front of
(predicted time per sample, alpha-0 loss) is marked `T`, one on the front of
(KV bytes, loss) `K`. The figure plots loss against predicted time (left)
and against KV bytes (right), one colour per family and one marker per
method, the fronts drawn as steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gqa_t5x.experiments import tables

_MIB = 2**20
_FAMILY_COLOURS = {"uniform": "tab:blue", "self-cross": "tab:orange", "per-layer": "tab:green"}
_MARKERS = "osD^v<>p*"


def _front(row: dict[str, Any]) -> str:
    return ("T" if row["front_time"] else "") + ("K" if row["front_kv"] else "")


def table_rows(plan: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the plan's table, fastest predicted first."""
    header = ["candidate", "family", "method", "KV MiB", "KV/src", "budget", "pred ms/sample", "speedup",
              "loss", "d loss", "front"]
    body = []
    for row in sorted(plan["rows"], key=lambda r: (r["time_per_sample_s"], r["loss"], r["candidate"], r["method"])):
        delta = row["loss_vs_source"]
        body.append([row["candidate"], row["family"], row["method"], f"{row['kv_bytes']['total'] / _MIB:.1f}",
                     f"{row['kv_fraction']:.3f}", "yes" if row["within_budget"] else "no",
                     f"{1e3 * row['time_per_sample_s']:.4g}", f"{row['speedup']:.2f}x", f"{row['loss']:.4f}",
                     "" if delta is None else f"{delta:+.4f}", _front(row)])
    return header, body


def format_table(plan: dict[str, Any]) -> str:
    """The table for the console (`tables.fixed_width`, at most 120 columns)."""
    header, body = table_rows(plan)
    return tables.fixed_width(header, body, keys=3)


def _describe(plan: dict[str, Any]) -> list[str]:
    s, d, b = plan["settings"], plan["device"], plan["budget"]
    info = plan["candidates_info"]
    return [
        f"Checkpoint `{s['checkpoint']}`; {plan['examples']} held-out examples of `{s['examples']}` "
        f"(evenly spaced rows); methods {', '.join(s['methods'])}; groupings {', '.join(s['groupings'])}.",
        f"Device `{d['name']}`: {d['bandwidth_gbs']:g} GB/s, {d['peak_gflops']:g} GFLOP/s in {d['dtype']} "
        f"({d['source']}); input {s['input_length']}, output {s['output_length']}, batch {s['batch']}.",
        f"KV budget of the per-layer family: {b['kv_bytes'] / _MIB:.1f} MiB for the batch "
        f"({100 * b['fraction_of_source']:.1f}% of the source's cache). {info['generated']} candidates generated"
        + (f", {info['dropped']} cut by --max_candidates." if info["dropped"] else "."),
        "",
        "Predicted time per sample = (encoder + cache build + output_length x decode step) / batch, each phase "
        "its roofline bound max(bytes / bandwidth, FLOPs / peak) (`experiments/roofline.py`): an optimistic "
        "bound without launch or loop overheads. KV MiB: the decoding cache of the whole batch after "
        "output_length tokens. loss: teacher-forced loss per target token at alpha 0 (converted, not "
        "uptrained); d loss: minus the source's. front: T = on the Pareto front of (predicted time, loss), "
        "K = of (KV bytes, loss).",
    ]


def format_markdown(plan: dict[str, Any], figure: str | None = "plan.png") -> str:
    """The plan as a markdown page: setting, model, table, figure."""
    header, body = table_rows(plan)
    lines = ["# kv-head plan (`gqa-t5x plan`)", "", *_describe(plan), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    if figure:
        lines += ["", f"![predicted time and KV bytes vs alpha-0 loss]({figure})"]
    lines += ["", f"Wall time of the plan: {plan['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def plot(plan: dict[str, Any], path: Path) -> Path:
    """Loss vs predicted time per sample and vs KV bytes, fronts as steps; written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = plan["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    panels = ((axes[0], lambda r: 1e3 * r["time_per_sample_s"], "front_time", "predicted time per sample (ms)"),
              (axes[1], lambda r: r["kv_bytes"]["total"] / _MIB, "front_kv", "KV cache of the batch (MiB)"))
    for ax, x, front, label in panels:
        for row in rows:
            ax.scatter(x(row), row["loss"], s=28, color=_FAMILY_COLOURS.get(row["family"], "grey"),
                       marker=_MARKERS[methods.index(row["method"]) % len(_MARKERS)],
                       edgecolors="black" if row[front] else "none", linewidths=0.8, alpha=0.85)
        on_front = sorted((x(r), r["loss"]) for r in rows if r[front])
        if on_front:
            ax.step([p[0] for p in on_front], [p[1] for p in on_front], where="post", color="black", lw=1,
                    label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("alpha-0 held-out loss per token")
    for family, colour in _FAMILY_COLOURS.items():
        axes[1].scatter([], [], color=colour, label=family)
    for i, method in enumerate(methods):
        axes[1].scatter([], [], color="grey", marker=_MARKERS[i % len(_MARKERS)], label=method)
    axes[1].legend(fontsize=8, loc="upper right")
    s = plan["settings"]
    fig.suptitle(f"{plan['device']['name']}: in {s['input_length']}, out {s['output_length']}, batch {s['batch']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(plan: dict[str, Any], output: str | Path) -> dict[str, Path]:
    """Writes OUTPUT/plan.md, plan.json and plan.png.

    Args:
      plan: `planner.run_plan`'s result.
      output: Directory (created).

    Returns:
      {'markdown', 'json', 'figure'}: the paths.
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "plan.md", "json": out / "plan.json", "figure": out / "plan.png"}
    paths["json"].write_text(json.dumps(plan, indent=1, sort_keys=True, default=str) + "\n")
    plot(plan, paths["figure"])
    paths["markdown"].write_text(format_markdown(plan, paths["figure"].name))
    return paths
