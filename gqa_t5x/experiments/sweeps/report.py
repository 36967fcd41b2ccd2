"""Aggregates run results into the paper's Table 1 layout and figures.

Every finished run (a sweep point, or the quickstart) leaves a `results.json`
in its directory:

    {
      "name": "GQA-2 mean a=0.05",       # row label
      "model": "tiny",                   # size name
      "num_heads": 4, "num_kv_heads": 2,
      "method": "mean",                  # conversion method (null for MHA)
      "alpha": 0.05,                     # uptraining proportion (null: none)
      "time_per_sample": 0.0123,         # seconds (greedy decoding), or null
      "scores": {"cnn_dailymail": 12.3}  # the paper's metric per task
    }

`gqa-t5x report RUN_DIRS... --output OUT` (each local or gs://) writes
`table1.md`, `table1.csv`,
`report.json` and four figures: quality vs time per sample, the alpha
curves, conversion-method bars (from 0), time vs number of groups. The
paper's own numbers (`gqa_t5x.paper`) are drawn beside ours as a reference
series, in their own panels because the scales differ. Points and bars carry
their values, a panel without data says so, and an axis whose values span
decades is logarithmic (`figures`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from gqa_t5x.data import task_table
from gqa_t5x.experiments import figures, paper
from gqa_t5x.storage import paths
from gqa_t5x.storage.paths import Path

RESULTS_FILE = "results.json"
_REQUIRED = ("name", "num_heads", "num_kv_heads", "scores")


class ReportError(ValueError):
    """A run directory or results file that cannot be reported."""


def _results_under(directory: Path) -> list[Path]:
    """Every `results.json` below `directory` (any depth, local or gs://),
    not looking inside checkpoints (`checkpoint_<step>`: many objects on gs://)."""
    found = []
    for root, dirs, files in paths.walk(directory):
        dirs[:] = [d for d in dirs if not re.fullmatch(r"checkpoint_\d+/?", d)]
        if RESULTS_FILE in files:
            found.append(root / RESULTS_FILE)
    return sorted(found, key=str)


def find_results(run_dirs: Iterable[str | os.PathLike]) -> list[Path]:
    """Every `results.json` in or under `run_dirs` (sorted, without duplicates).

    Args:
      run_dirs: run directories, folders of them, or results files; local
        paths or gs:// URLs.

    Raises:
      ReportError: a path does not exist or holds no results file.
    """
    found: list[Path] = []
    for path in (paths.as_path(p, name="run directory") for p in run_dirs):
        if path.is_file() and path.name == RESULTS_FILE:
            hits = [path]
        elif path.is_dir():
            hits = _results_under(path)
        else:
            raise ReportError(f"Run directory {str(path)!r} does not exist.")
        if not hits:
            raise ReportError(
                f"No {RESULTS_FILE} in or under {str(path)!r}: the run has not "
                "finished (or is not a gqa-t5x run directory)."
            )
        found.extend(hits)
    unique = {str(paths.absolute(p)): paths.absolute(p) for p in found}
    return [unique[k] for k in sorted(unique)]


def load_result(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates one `results.json` (local or gs://)."""
    path = paths.as_path(path, name="results file")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is not valid JSON: {err}") from err
    missing = [k for k in _REQUIRED if k not in result]
    if missing:
        raise ReportError(f"{path} lacks the field(s) {missing}.")
    if not isinstance(result["scores"], dict):
        raise ReportError(f"{path}: 'scores' must map task names to numbers.")
    bad = {k: v for k, v in result["scores"].items() if not isinstance(v, (int, float))}
    if bad:
        raise ReportError(f"{path}: scores must be numbers; got {bad}.")
    result["run_dir"] = str(path.parent)
    return result


def paper_task_columns() -> dict[str, str]:
    """Task key -> Table 1 column label, in the paper's order (the task table)."""
    return {spec.key: spec.paper_column for spec in task_table.paper_tasks()}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def average(scores: dict[str, float], tasks: Sequence[str] | None = None) -> float | None:
    """Mean over the `tasks` (default: all scored) that have a score (None if none has)."""
    tasks = list(scores) if tasks is None else tasks
    return _mean([float(scores[t]) for t in tasks if t in scores])


def extra_tasks(results: Sequence[dict[str, Any]]) -> list[str]:
    """Tasks scored by the runs that are not among the paper's seven."""
    return sorted({t for r in results for t in r["scores"]} - set(paper_task_columns()))


def columns(results: Sequence[dict[str, Any]]) -> list[str]:
    """Table 1's columns, then one per extra task (e.g. the quickstart's)."""
    return ["model", "time", "avg", *paper_task_columns().values(), *extra_tasks(results)]


def table_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run in Table 1's column order (missing scores are None).

    `avg` is the mean over every task the run has a score for.
    """
    rows = []
    extras = extra_tasks(results)
    for r in results:
        row: dict[str, Any] = {
            "model": r["name"],
            "time": r.get("time_per_sample"),
            "avg": average(r["scores"], [*paper_task_columns(), *extras]),
        }
        for task, column in paper_task_columns().items():
            row[column] = r["scores"].get(task)
        for task in extras:
            row[task] = r["scores"].get(task)
        rows.append(row)
    return rows


def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], include_paper: bool = True) -> str:
    """Table 1 as markdown; the paper's rows follow ours when asked."""
    columns = list(rows[0]) if rows else ["model", "time", "avg", *paper_task_columns().values()]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append(
            "| "
            + " | ".join(
                _fmt(row[c], 4 if c == "time" else 1) if c != "model" else row[c]
                for c in columns
            )
            + " |"
        )
    if include_paper:
        lines.append("| *paper (T5.1.1, TPUv4):* |" + " |" * (len(columns) - 1))
        for name, entry in paper.TABLE1.items():
            cells = [f"{name} (paper)", _fmt(entry["time"], 2), _fmt(entry["avg"], 1)]
            cells += [_fmt(entry["scores"][t], 1) for t in paper_task_columns()]
            cells += ["-"] * (len(columns) - len(cells))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Writes the table rows as CSV (written whole: `storage.replace_file`)."""
    columns = list(rows[0]) if rows else ["model", "time", "avg", *paper_task_columns().values()]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({c: ("" if row[c] is None else row[c]) for c in columns})
    paths.replace_file(path, text.getvalue())


# -------------------------------------------------------------------- figures
def _panels():
    """A figure with two panels: this run (left), the paper (right)."""
    fig, (ours, ref) = figures.panels(2)
    return fig, ours, ref


def plot_quality_vs_time(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Average score against time per sample (the paper's Figure 3 style), values labelled."""
    fig, ours, ref = _panels()
    times = []
    for r in results:
        avg, t = average(r["scores"]), r.get("time_per_sample")
        if avg is None or t is None:
            continue
        ours.scatter([t], [avg], s=40)
        ours.annotate(f"{r['name']}: {avg:.1f}, {t:.3g} s", (t, avg), textcoords="offset points", xytext=(4, 4),
                      fontsize=8)
        times.append(t)
    ours.set(xlabel="time per sample (s)", ylabel="average score", title="this run")
    if times:
        if figures.choose_scale(ours, times, axis="x", zero_based=False) == "log":
            ours.set_xlabel("time per sample (s), log scale")
    else:
        figures.no_data(ours, "no run has both a score and a time")
    for name, entry in paper.TABLE1.items():
        ref.scatter([entry["time"]], [entry["avg"]], s=40, color="gray")
        ref.annotate(f"{name}: {entry['avg']:.1f}, {entry['time']:.2f} s", (entry["time"], entry["avg"]),
                     textcoords="offset points", xytext=(4, 4), fontsize=8)
    ref.set(xlabel="time per sample (s)", ylabel="average score", title="paper (T5.1.1, TPUv4)")
    figures.save_figure(fig, path)


def _series_label(r: dict[str, Any]) -> str:
    g, h = r["num_kv_heads"], r["num_heads"]
    kind = "MHA" if g == h else ("MQA" if g == 1 else f"GQA-{g}")
    method = r.get("method")
    return kind if kind == "MHA" or not method else f"{kind} ({method})"


def plot_alpha(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Ablation-task average against the uptraining proportion alpha, values labelled."""
    fig, ours, ref = _panels()
    series: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        avg = average(r["scores"], paper.ABLATION_TASKS) or average(r["scores"])
        if avg is None:
            continue
        if r["num_kv_heads"] == r["num_heads"] and not r.get("method"):
            ours.axhline(avg, color="gray", linestyle="--", label=f"{r['name']} (MHA): {avg:.1f}")
            continue
        if r.get("alpha") is None:
            continue
        series.setdefault(_series_label(r), []).append((float(r["alpha"]), avg))
    for label, points in sorted(series.items()):
        points.sort()
        line, = ours.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        figures.label_values(ours, [p[0] for p in points], [p[1] for p in points], "{:.1f}",
                             color=line.get_color())
    ours.set(xlabel="uptraining proportion alpha", ylabel="average score", title="this run")
    if series:
        ours.legend(fontsize=8)
    else:
        figures.no_data(ours, "no converted run with an alpha")
    figures.paper_alpha_panel(ref, "CNN/MultiNews/TriviaQA avg")
    figures.save_figure(fig, path)


def plot_methods(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Bars from 0 of the average score per conversion method (and kv heads), values labelled."""
    fig, ours, ref = _panels()
    bars: dict[str, list[float]] = {}
    for r in results:
        avg = average(r["scores"], paper.ABLATION_TASKS) or average(r["scores"])
        if not r.get("method") or avg is None or r["num_kv_heads"] == r["num_heads"]:
            continue
        bars.setdefault(_series_label(r), []).append(avg)
    labels = sorted(bars)
    if labels:
        values = [_mean(bars[k]) for k in labels]
        drawn = ours.bar(range(len(labels)), values)
        ours.bar_label(drawn, [f"{v:.1f}" for v in values], fontsize=7)
        ours.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        if min(values) >= 0:
            ours.set_ylim(bottom=0)  # a bar's length is its value
    else:
        figures.no_data(ours, "no converted run")
    ours.set(ylabel="average score", title="this run")
    figures.paper_methods_panel(ref)
    figures.save_figure(fig, path)


def plot_time_vs_groups(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Time per sample against the number of kv heads, values labelled."""
    fig, ours, ref = _panels()
    by_g: dict[int, list[float]] = {}
    for r in results:
        if r.get("time_per_sample") is not None:
            by_g.setdefault(int(r["num_kv_heads"]), []).append(float(r["time_per_sample"]))
    gs = sorted(by_g)
    if gs:
        times = [_mean(by_g[g]) for g in gs]
        ours.plot(gs, times, marker="o")
        figures.label_values(ours, gs, times)
        ours.set_xscale("log", base=2)
        ours.set_xticks(gs, [str(g) for g in gs])
        scale = figures.choose_scale(ours, times)
        ours.set(xlabel="key/value heads (groups)",
                 ylabel="time per sample (s)" + (", log scale" if scale == "log" else ""), title="this run")
    else:
        figures.no_data(ours, "no run measured its time per sample")
        ours.set(title="this run")
    ref_g = sorted(paper.TIME_VS_GROUPS)
    ref_t = [paper.TIME_VS_GROUPS[g] for g in ref_g]
    ref.plot(ref_g, ref_t, marker="o", color="gray")
    figures.label_values(ref, ref_g, ref_t, "{:.2f}")
    ref.set_xscale("log", base=2)
    ref.set_xticks(ref_g, [str(g) for g in ref_g])
    ref.set(xlabel="groups", ylabel="time per sample (s)", title="paper (T5-XXL, in 2048 / out 512)")
    figures.save_figure(fig, path)


def write_report(
    run_dirs: Sequence[str | os.PathLike], output_dir: str | os.PathLike, include_paper: bool = True
) -> dict[str, Path]:
    """Collects every run's results and writes the table and figures.

    Args:
      run_dirs: run directories, or folders containing them (local or gs://).
      output_dir: where the report goes (created; local or gs://).
      include_paper: add the paper's numbers as a reference series.

    Returns:
      Name -> path of each file written.
    """
    results = [load_result(p) for p in find_results(run_dirs)]
    results.sort(key=lambda r: (-r["num_kv_heads"], r.get("method") or "", r.get("alpha") or 0.0, r["name"]))
    out = paths.makedirs(paths.as_path(output_dir, name="--output"))
    rows = table_rows(results)
    files = {
        "table_md": out / "table1.md",
        "table_csv": out / "table1.csv",
        "json": out / "report.json",
        "quality_vs_time": out / "quality_vs_time.png",
        "alpha": out / "alpha.png",
        "methods": out / "methods.png",
        "time_vs_groups": out / "time_vs_groups.png",
    }
    paths.replace_file(files["table_md"], markdown_table(rows, include_paper))
    write_csv(files["table_csv"], rows)
    paths.replace_file(files["json"], json.dumps({"runs": results, "table": rows}, indent=2))
    plot_quality_vs_time(results, files["quality_vs_time"])
    plot_alpha(results, files["alpha"])
    plot_methods(results, files["methods"])
    plot_time_vs_groups(results, files["time_vs_groups"])
    return files
