"""What the report tests check on drawn matplotlib figures.

`capture` keeps the figures a report would save (instead of writing PNGs),
so that tests read back what was handed to matplotlib: bar patches and the
axis limits, error-bar segments, scales and labels.
"""

from __future__ import annotations

from typing import Any

from gqa_t5x.experiments import figures


def capture(monkeypatch) -> list[Any]:
    """Replaces `figures.save_figure`: each figure is appended to the returned list."""
    saved: list[Any] = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path, dpi=110: saved.append(fig))
    return saved


def close(figs: list[Any]) -> None:
    for fig in figs:
        figures.pyplot().close(fig)


def truncated_bars(ax: Any) -> bool:
    """Whether `ax` draws bars of positive values on a y axis that does not start at 0."""
    bars = [patch for container in ax.containers if hasattr(container, "patches")
            for patch in container.patches]
    return bool(bars) and ax.get_yscale() == "linear" and ax.get_ylim()[0] > 0


def error_bar_ends(ax: Any) -> list[float]:
    """The y of both ends of every error bar drawn on `ax`."""
    ends = []
    for container in ax.containers:
        if type(container).__name__ != "ErrorbarContainer":
            continue
        _, _, bar_lines = container.lines
        for collection in bar_lines:
            ends += [float(y) for segment in collection.get_segments() for _, y in segment]
    return ends


def texts(ax: Any) -> list[str]:
    """Every text written on `ax` (value labels, 'no data')."""
    return [t.get_text() for t in ax.texts]
