"""`gqa-t5x list`: what the registries hold, one line each.

    gqa-t5x list tasks      # seqio tasks of the task table (MIXTURE_OR_TASK_NAME)
    gqa-t5x list methods    # conversion methods (convert --method)
    gqa-t5x list groupings  # conversion groupings (convert --grouping)
    gqa-t5x list formats    # checkpoint formats (--source_format, export --format)
    gqa-t5x list presets    # bench presets (bench --preset)
    gqa-t5x list            # all of them

Each listing reads its registry when it runs, so methods, formats and tasks
registered by the user's own code (imported first) are listed too.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable, Sequence


def _tasks() -> list[tuple[str, str]]:
    from gqa_t5x.data import task_table

    rows = []
    for spec in task_table.task_specs():
        lengths = spec.feature_lengths
        metrics = ", ".join(getattr(fn, "__name__", str(fn)) for fn in spec.metric_fns) or "none"
        parts = [f"key {spec.key}", f"{lengths['inputs']} -> {lengths['targets']} tokens",
                 metrics + (f", best by {spec.primary_metric}" if spec.primary_metric else "")]
        if spec.paper_column:
            parts.append(f"Table 1 {spec.paper_column}")
        if not spec.requires_inputs:
            parts.append("span corruption")
        rows.append((spec.name, "; ".join(parts)))
    mixture = task_table.EVAL_MIXTURE_TASKS
    rows.append((task_table.EVAL_MIXTURE, f"mixture of the paper's {len(mixture)} evaluation tasks at equal rates"))
    return rows


def _methods() -> list[tuple[str, str]]:
    from gqa_t5x.conversion import registered_methods

    return [(m.name, m.doc + (" (needs --calibration)" if m.needs_calibration and "calibration" not in m.doc else ""))
            for m in registered_methods()]


def _groupings() -> list[tuple[str, str]]:
    from gqa_t5x.conversion import GROUPINGS

    return [(g.name, g.doc) for g in GROUPINGS.values()] + [
        ("PATH", "a converted checkpoint or its conversion record JSON: the same groups, no calibration")]


def _formats() -> list[tuple[str, str]]:
    from gqa_t5x import checkpoints

    return [(f.name, f.doc + ("; export --format " + f.name if f.exporter is not None else ""))
            for f in checkpoints.formats()]


def _presets() -> list[tuple[str, str]]:
    from gqa_t5x.experiments.bench import presets

    return [(name, str(values.get("label") or ", ".join(f"{k}={v}" for k, v in values.items())))
            for name, values in presets.PRESETS.items()]


# What each listing shows: (title, rows).
LISTINGS: dict[str, tuple[str, Callable[[], list[tuple[str, str]]]]] = {
    "tasks": ("seqio tasks (--gin.MIXTURE_OR_TASK_NAME)", _tasks),
    "methods": ("conversion methods (convert --method)", _methods),
    "groupings": ("conversion groupings (convert --grouping)", _groupings),
    "formats": ("checkpoint formats (--source_format)", _formats),
    "presets": ("bench presets (bench --preset)", _presets),
}


def format_rows(rows: Sequence[tuple[str, str]], width: int = 120) -> str:
    """'name  description' lines, the descriptions aligned and wrapped to `width` columns."""
    column = max((len(name) for name, _ in rows), default=0) + 4
    lines = []
    for name, text in rows:
        lines.append(textwrap.fill(text, width, initial_indent=f"  {name}".ljust(column),
                                   subsequent_indent=" " * column, break_on_hyphens=False))
    return "\n".join(lines)


def list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", nargs="?", choices=tuple(LISTINGS), default=None,
                        help="What to list (all when left out).")


def run_list(args: argparse.Namespace) -> int:
    names = [args.what] if args.what else list(LISTINGS)
    if "tasks" in names:  # the task table imports seqio, hence TensorFlow
        from gqa_t5x import runtime

        runtime.keep_tensorflow_off_accelerators(quiet=not getattr(args, "debug", False))
    sections = []
    for name in names:
        title, rows = LISTINGS[name]
        sections.append(f"{title}:\n{format_rows(rows())}")
    print("\n\n".join(sections))
    return 0
