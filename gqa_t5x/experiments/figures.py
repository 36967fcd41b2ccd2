"""Figures of every report (sweeps, study, benchmark): matplotlib without a display.

Each figure is written whole (local or gs://) through the storage layer;
panels are laid side by side, ours first and the paper's last.
"""

from __future__ import annotations

import io
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


# ------------------------------------------------------------ the paper's panels
def paper_alpha_panel(ax: Any, ylabel: str = "average score (higher is better)") -> None:
    """The paper's Figure 5 on `ax`: score against uptraining proportion, MHA line."""
    for label, curve in paper.ALPHA_CURVES.items():
        alphas = sorted(curve)
        ax.plot(alphas, [curve[a] for a in alphas], marker="o", label=label)
    ax.axhline(paper.ALPHA_MHA_LINE, color="gray", linestyle="--", label="MHA")
    ax.set(xlabel="uptraining proportion alpha", ylabel=ylabel, title="paper (T5-XXL)")
    ax.legend(fontsize=8)


def paper_methods_panel(ax: Any, title: str = "paper (T5-Large -> MQA)",
                        ylabel: str = "average score") -> None:
    """The paper's Figure 4 on `ax`: score per conversion method, MHA-Large line."""
    names = list(paper.CONVERSION_METHODS)
    ax.bar(range(len(names)), [paper.CONVERSION_METHODS[n] for n in names], color="gray")
    ax.axhline(paper.CONVERSION_MHA_LARGE, linestyle="--", color="black", label="MHA-Large")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(min(paper.CONVERSION_METHODS.values()) - 0.5, paper.CONVERSION_MHA_LARGE + 0.3)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
