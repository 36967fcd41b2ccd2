"""Figures of every report (sweeps, study, benchmark): matplotlib without a display.

Each figure is written whole (local or gs://) through the storage layer;
panels are laid side by side, ours first and the paper's last.
"""

from __future__ import annotations

import io
from typing import Any

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
