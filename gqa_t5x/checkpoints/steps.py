"""The step directories of a run: T5X's `MODEL_DIR/checkpoint_<step>`.

`latest_checkpoint` is also a gin configurable, so a command printed before
its input exists (`gqa-t5x sweep --mode print`) can name "the newest
checkpoint of that run" and resolve it when it runs:

    --gin.INITIAL_CHECKPOINT_PATH=@gqa_t5x.checkpoints.steps.latest_checkpoint()
    --gin.gqa_t5x.checkpoints.steps.latest_checkpoint.model_dir="'/runs/p/uptrain'"
"""

from __future__ import annotations

import os
import re

import gin

from gqa_t5x.storage import paths

STEP_PREFIX = "checkpoint"
_STEP = re.compile(rf"{STEP_PREFIX}_(\d+)")


def complete_steps(directory: str | os.PathLike | paths.Path) -> list[int]:
    """Steps of the `checkpoint_<step>` directories in `directory`, ascending ([] if none).

    Unfinished writes (`checkpoint_<step>.orbax-checkpoint-tmp...`) do not count.
    """
    root = paths.as_path(directory, name="MODEL_DIR")
    if not root.is_dir():
        return []
    steps = (_STEP.fullmatch(name) for name in paths.listdir(root))
    return sorted(int(m.group(1)) for m in steps if m and (root / m.group(0)).is_dir())


@gin.configurable(module="gqa_t5x.checkpoints.steps")
def latest_checkpoint(model_dir: str | os.PathLike) -> str:
    """The `checkpoint_<step>` with the largest step under `model_dir` (local or gs://).

    Args:
      model_dir: A run's MODEL_DIR (or MODEL_DIR/best).

    Returns:
      Its path.

    Raises:
      FileNotFoundError: `model_dir` holds no checkpoint (yet).
    """
    steps = complete_steps(model_dir)
    if not steps:
        raise FileNotFoundError(
            f"No {STEP_PREFIX}_<step> directory in {str(model_dir)!r}: the run that writes it has not "
            "finished (or not started)."
        )
    return str(paths.as_path(model_dir, name="MODEL_DIR") / f"{STEP_PREFIX}_{steps[-1]}")
