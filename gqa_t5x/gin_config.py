"""Gin plumbing shared by every entry point: search paths, parsing, model config.

Gin files are layered as in T5X: model gin (sizes, `gin/models/...`) -> run gin
(`gin/runs/...`) -> experiment gin (`configs/...`) -> command-line bindings
(`--gin.NUM_KV_HEADS=8`). Includes are written relative to the repository root
(`include 'gin/models/t5_1_1/common.gin'`), which is always on the search path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import gin

from gqa_t5x.model import network

REPO_ROOT = Path(__file__).resolve().parent.parent
GIN_DIR = REPO_ROOT / "gin"


def default_search_paths() -> list[str]:
    """The repository root (so `gin/...` includes resolve) and the cwd."""
    return [str(REPO_ROOT), os.getcwd()]


def parse_gin(
    gin_files: Sequence[str] = (),
    gin_bindings: Sequence[str] = (),
    search_paths: Sequence[str] = (),
    *,
    clear: bool = True,
) -> None:
    """Parses gin files and bindings the way T5X's launcher does.

    Args:
      gin_files: Gin files, searched for in `search_paths` + the defaults.
      gin_bindings: Bindings such as `NUM_KV_HEADS=8` (the `--gin.` prefix of
        the command line already stripped).
      search_paths: Extra gin search paths (`--gin_search_paths`).
      clear: Start from an empty gin config.
    """
    if clear:
        gin.clear_config()
    for path in [*search_paths, *default_search_paths()]:
        gin.add_config_file_search_path(path)
    resolved = []
    for path in gin_files:
        hits = [Path(base) / path for base in ["", *search_paths, *default_search_paths()]]
        hit = next((h for h in hits if h.is_file()), None)
        if hit is None:
            raise FileNotFoundError(
                f"Gin file {path!r} not found in the working directory or the gin "
                f"search paths {[*search_paths, *default_search_paths()]}; pass "
                "--gin_search_paths or an absolute path."
            )
        # Absolute paths keep gin from logging failed lookups of relative ones.
        resolved.append(str(hit.resolve()))
    # gin's package-resource reader logs "Path not found" at ERROR level for
    # every include it then finds on a search path; those lines are noise.
    root_logger = logging.getLogger()
    root_logger.addFilter(_drop_gin_path_noise)
    try:
        gin.parse_config_files_and_bindings(resolved, list(gin_bindings))
    finally:
        root_logger.removeFilter(_drop_gin_path_noise)


def _drop_gin_path_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Path not found")


def model_config() -> network.T5Config:
    """The `network.T5Config` bound by the parsed gin files."""
    return gin.get_configurable(network.T5Config)()


def model_config_from_gin(
    gin_file: str, gin_bindings: Sequence[str] = ()
) -> network.T5Config:
    """Parses `gin_file` (+ bindings) and returns the model config it binds."""
    parse_gin([gin_file], gin_bindings)
    return model_config()
