"""The shared sample data of the sample configs, found without the working directory.

`configs/uptrain_c4_sample.gin` and `configs/finetune_cnn_sample.gin` train on
real samples (C4, CNN/DailyMail, the T5 vocabulary) kept in a `shared`
folder. Their paths are `shared_path` calls, so a run works from any
directory: the folder is `$GQA_T5X_SHARED`, else the `shared` folder beside
the source checkout gqa_t5x is imported from (`<checkout>/../shared`). A gin
flag (`--gin.C4_DIR=...`, `--gin.VOCAB_PATH=...`) still overrides each path.
"""

from __future__ import annotations

import os
from pathlib import Path

import gin

SHARED_VAR = "GQA_T5X_SHARED"


def shared_root() -> Path | None:
    """`$GQA_T5X_SHARED`, else `<checkout>/../shared` when it exists, else None."""
    if os.environ.get(SHARED_VAR):
        return Path(os.environ[SHARED_VAR])
    beside = Path(__file__).resolve().parents[2].parent / "shared"  # gqa_t5x/data/ -> checkout -> ..
    return beside if beside.is_dir() else None


@gin.configurable(module="gqa_t5x.data.shared_data")
def shared_path(relative: str) -> str:
    """The path of `relative` inside the shared folder (gin: `@shared_data.shared_path()`).

    Args:
      relative: e.g. 'data/c4/en/3.0.1'.

    Returns:
      The absolute path.

    Raises:
      FileNotFoundError: no shared folder is known, or it lacks `relative`;
        the message says how to point at it.
    """
    root = shared_root()
    if root is None:
        raise FileNotFoundError(
            f"The sample configs read {relative} from the shared data folder, which was not found: set "
            f"{SHARED_VAR}=/path/to/shared (the folder holding data/ and fixtures/), or override the path "
            "with its gin macro (C4_DIR, CNN_FILE, VOCAB_PATH)."
        )
    path = root / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: {SHARED_VAR} (or <checkout>/../shared) must be the shared data folder "
            f"holding {relative}; or override the path with its gin macro (C4_DIR, CNN_FILE, VOCAB_PATH)."
        )
    return str(path)
