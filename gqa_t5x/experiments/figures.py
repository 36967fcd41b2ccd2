"""Figures of every report (sweeps, study, benchmark): matplotlib without a display.

Each figure is written whole (local or gs://) through the storage layer;
panels are laid side by side, ours first and the paper's last. The helpers
keep the figures honest: error bars come from an interval's own bounds and
never cross a floor (a time is not negative), the y axis turns logarithmic
where the plotted values span decades, points carry their values, a panel
without data says so, and the paper's panels are dot plots (a bar on an axis
that does not start at 0 inflates small gaps).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from gqa_t5x.experiments import paper
from gqa_t5x.storage import paths
from gqa_t5x.storage.paths import Path


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def panels(count: int = 2, width: float = 5.5) -> tuple[Any, list[Any]]:
    """A figure with `count` side-by-side panels (ours first, the paper's last).

    Args:
      count: Number of panels.
      width: Width of one panel (inches).

    Returns:
      (figure, [axes, ...]).
    """
    fig, axes = pyplot().subplots(1, count, figsize=(width * count, 4.2), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Writes a figure as PNG (local or gs://, written whole) and closes it."""
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=dpi)
    pyplot().close(fig)
    paths.replace_file(path, image.getvalue())



# Values whose largest is more than this many times their smallest are drawn
# on a logarithmic axis (a linear one flattens the small ones onto 0).
LOG_SCALE_RATIO = 20.0


def error_bars(intervals: Sequence[dict[str, float]], floor: float | None = None
               ) -> tuple[list[float], list[list[float]]]:
    """Means and asymmetric error bars (matplotlib's `yerr`) from intervals' bounds.

    Args:
      intervals: Dicts with 'mean', 'low' and 'high' (e.g. `Interval.to_json()`).
      floor: The smallest value the quantity can take (0 for a time, a loss or
        BLEU): a lower bound below it is clipped to it. None: no floor.

    Returns:
      (means, [lengths below, lengths above]); every length is >= 0, and
      mean - length below >= floor.
    """
    means, below, above = [], [], []
    for interval in intervals:
        mean, low, high = float(interval["mean"]), float(interval["low"]), float(interval["high"])
        if floor is not None:
            low = max(low, floor)
        means.append(mean)
        below.append(max(0.0, mean - low))
        above.append(max(0.0, high - mean))
    return means, [below, above]


def spans_decades(values: Sequence[float | None], ratio: float = LOG_SCALE_RATIO) -> bool:
    """Whether positive values span more than `ratio` (largest / smallest).

    Args:
      values: The plotted values (None, non-finite and non-positive ones are
        ignored: a log axis cannot show them).
      ratio: The threshold (default `LOG_SCALE_RATIO`).

    Returns:
      True where a logarithmic axis is needed to show the smallest values.
    """
    positive = [float(v) for v in values if v is not None and math.isfinite(v) and v > 0]
    return len(positive) >= 2 and max(positive) / min(positive) > ratio


def choose_scale(ax: Any, values: Sequence[float | None], axis: str = "y", zero_based: bool = True) -> str:
    """Sets `ax`'s `axis` to a log scale where `values` span decades.

    Args:
      ax: The axes.
      values: Every value plotted along that axis.
      axis: 'x' or 'y'.
      zero_based: On a linear scale, start the axis at 0.

    Returns:
      'log' or 'linear', the scale set.
    """
    if spans_decades(values):
        getattr(ax, f"set_{axis}scale")("log")
        return "log"
    if zero_based:
        getattr(ax, f"set_{axis}lim")(**{"bottom" if axis == "y" else "left": 0})
    return "linear"


def label_values(ax: Any, xs: Sequence[float], ys: Sequence[float | None], fmt: str = "{:.3g}",
                 offset: tuple[float, float] = (4, 4), **kwargs: Any) -> None:
    """Writes each point's value beside it (None values are skipped).

    Args:
      ax: The axes.
      xs: x of each point.
      ys: y of each point, the value written.
      fmt: Format of the value.
      offset: Where the text starts, in points from the point (e.g. (4, -10)
        below it, for a series drawn under another).
      **kwargs: More `annotate` options (e.g. color).
    """
    for x, y in zip(xs, ys):
        if y is not None:
            ax.annotate(fmt.format(y), (x, y), textcoords="offset points", xytext=offset,
                        fontsize=7, **kwargs)


def no_data(ax: Any, message: str = "no data") -> None:
    """Marks an empty panel: the message in its middle, no ticks."""
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", fontsize=10, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def banner(fig: Any, text: str | None) -> None:
    """A warning across the top of a figure (e.g. a reduced run's); None: nothing."""
    if text:
        fig.suptitle(text, color="firebrick", fontsize=10)

# ------------------------------------------------------------ the paper's panels
def paper_alpha_panel(ax: Any, ylabel: str = "average score (higher is better)") -> None:
    """The paper's Figure 5 on `ax`: score against uptraining proportion, MHA line, values labelled."""
    for label, curve in paper.ALPHA_CURVES.items():
        alphas = sorted(curve)
        line, = ax.plot(alphas, [curve[a] for a in alphas], marker="o", label=label)
        label_values(ax, alphas, [curve[a] for a in alphas], "{:.2f}", color=line.get_color())
    ax.axhline(paper.ALPHA_MHA_LINE, color="gray", linestyle="--", label=f"MHA ({paper.ALPHA_MHA_LINE:.2f})")
    ax.set(xlabel="uptraining proportion alpha", ylabel=ylabel, title="paper (T5-XXL)")
    ax.legend(fontsize=8)


# The conversion methods' scores are read off the paper's Figure 4.
PAPER_READING_ERROR = 0.01


def paper_methods_panel(ax: Any, title: str = "paper (T5-Large -> MQA)",
                        ylabel: str = "average score") -> None:
    """The paper's Figure 4 on `ax` as a dot plot: score per conversion method
    with its reading error, the MHA-Large line, values labelled.

    Bars would need an axis from 0 (the gaps are 0.1-0.3 points of 55);
    dots on a narrow axis show the gaps and their labels give the sizes.
    """
    names = list(paper.CONVERSION_METHODS)
    values = [paper.CONVERSION_METHODS[n] for n in names]
    ax.errorbar(range(len(names)), values, yerr=PAPER_READING_ERROR, fmt="o", color="black", capsize=3,
                label=f"read off Fig. 4 (+-{PAPER_READING_ERROR}); axis not from 0")
    label_values(ax, range(len(names)), values, "{:.2f}")
    ax.axhline(paper.CONVERSION_MHA_LARGE, linestyle="--", color="gray",
               label=f"MHA-Large ({paper.CONVERSION_MHA_LARGE:.2f})")
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
