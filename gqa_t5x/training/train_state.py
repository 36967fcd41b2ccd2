"""Training state and its Orbax checkpoints (T5X layout, resumable).

A checkpoint is `MODEL_DIR/checkpoint_<step>/` written by an Orbax
`CheckpointManager` with two items:

* `state/`: the T5X-shaped PyTree `{'target': params, 'state': {'step': step,
  'param_states': optimizer state}}` (parameters under `target`, as T5X);
* `metadata/`: JSON with the model config and the data position: the step
  and global row at which this part of the run's data began
  (`data_start_step`, `data_start_row`), the batch size, the pipeline
  ('cache' or 'stream') and the cache's fingerprint, so a restarted run
  resumes the data where it left off (`data_row`).

MODEL_DIR may be local or gs:// (`storage.as_path`). A run killed while
saving leaves no checkpoint that counts: on local disk Orbax writes to a
temporary directory and renames it when complete; on object storage, which
has no atomic rename, it writes in place and marks completion last
(`commit_success.txt`). Either way an unfinished step directory is ignored
and removed by the next start (`cleanup_tmp_directories`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from gqa_t5x.checkpoints import steps
from gqa_t5x.model import layer_stack
from gqa_t5x.model.config import T5Config
from gqa_t5x.storage import paths

STATE_ITEM = "state"
METADATA_ITEM = "metadata"
STEP_PREFIX = steps.STEP_PREFIX


@flax.struct.dataclass
class TrainState:
    """Parameters, optimizer state and the global step.

    Attributes:
      step: Int32 scalar: updates applied so far, counted from the start of
        pre-training (an uptraining run from a step-1,000,000 checkpoint
        starts at 1,000,000).
      params: Network parameters (float32).
      opt_state: Optax state.
    """

    step: jax.Array
    params: Any
    opt_state: Any

    def to_tree(self) -> dict[str, Any]:
        """The T5X-shaped tree that is saved.

        Always T5X's unscanned names: a scanned model's stacked parameters
        (`encoder/layers/...`) and the optimizer state that mirrors them are
        sliced per layer (`layer_stack.unstack_tree`), so a scanned and an
        unscanned run read each other's checkpoints (the slices are copies:
        while a scanned state is saved its device holds it twice). Leaves
        may be arrays or `jax.ShapeDtypeStruct`s (`abstract_tree`).
        """
        counts = layer_stack.layer_counts(self.params)
        params, opt_state = self.params, self.opt_state
        if counts:
            params = layer_stack.unstack_tree(params, counts)
            opt_state = layer_stack.unstack_tree(opt_state, counts)
        return {"target": params, "state": {"step": self.step, "param_states": opt_state}}

    @classmethod
    def from_tree(cls, tree: Mapping[str, Any], like: "TrainState | None" = None) -> "TrainState":
        """The state of a saved tree; stacked like `like` when that is a scanned state.

        Args:
          tree: `to_tree()`'s layout (unscanned names).
          like: A state (arrays or `jax.ShapeDtypeStruct`s) whose stacked
            parameters and optimizer state the result should have; None or
            an unscanned state keeps the tree's layout.
        """
        state = cls(step=tree["state"]["step"], params=tree["target"], opt_state=tree["state"]["param_states"])
        if like is None or not layer_stack.layer_counts(like.params):
            return state
        return cls(
            step=state.step,
            params=layer_stack.stack_tree(state.params, like.params),
            opt_state=layer_stack.stack_tree(state.opt_state, like.opt_state),
        )


def abstract_tree(state: TrainState, shardings: TrainState) -> dict[str, Any]:
    """ShapeDtypeStructs (with shardings) of `state.to_tree()` for restoring."""
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=s), state, shardings
    )
    return abstract.to_tree()


TMP_MARK = ".orbax-checkpoint-tmp"


def remove_partial_checkpoints(directory: paths.PathLike | paths.Path) -> list[str]:
    """Removes unfinished checkpoint writes (Orbax's temporary directories).

    Called after a write failed (a full disk): the next start would remove
    them too (`cleanup_tmp_directories`), but a full disk must be freed now.

    Args:
      directory: MODEL_DIR (or MODEL_DIR/best).

    Returns:
      The names removed, e.g. ['checkpoint_4.orbax-checkpoint-tmp'].
    """
    root = paths.as_path(directory, name="MODEL_DIR")
    if not root.is_dir():
        return []
    removed = sorted(n for n in paths.listdir(root) if n.startswith(f"{STEP_PREFIX}_") and TMP_MARK in n)
    for name in removed:
        paths.rmtree(root / name)
    return removed


def checkpoint_manager(
    directory: paths.PathLike | paths.Path,
    *,
    max_to_keep: int | None = None,
    best_metric: str | None = None,
    best_mode: str = "max",
    async_save: bool = True,
) -> ocp.CheckpointManager:
    """An Orbax manager writing `directory/checkpoint_<step>`.

    Args:
      directory: MODEL_DIR (or MODEL_DIR/best), local or gs://.
      max_to_keep: Keep only the newest N (or the best N with `best_metric`).
      best_metric: Rank checkpoints by this key of the metrics passed to save.
      best_mode: 'max' or 'min' for `best_metric`.
      async_save: Write in a background thread (the state is copied first).

    Returns:
      The manager.
    """
    best_fn = None
    if best_metric is not None:
        best_fn = lambda metrics: float(metrics[best_metric])  # noqa: E731
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        step_prefix=STEP_PREFIX,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
        best_fn=best_fn,
        best_mode=best_mode,
        keep_checkpoints_without_metrics=best_metric is None,
    )
    return ocp.CheckpointManager(
        paths.absolute(paths.as_path(directory, name="MODEL_DIR")), options=options,  # Orbax needs absolute paths.
        item_names=(STATE_ITEM, METADATA_ITEM),
    )


def save(
    manager: ocp.CheckpointManager,
    state: TrainState,
    metadata: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
) -> bool:
    """Saves `state` at its step (no-op when that step is already saved)."""
    step = int(jax.device_get(state.step))
    if step in manager.all_steps():
        return False
    return manager.save(
        step,
        args=ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardSave(state.to_tree()),
                METADATA_ITEM: ocp.args.JsonSave(dict(metadata)),
            }
        ),
        metrics=dict(metrics) if metrics is not None else None,
        force=True,
    )


def restore(
    manager: ocp.CheckpointManager, step: int, template: TrainState, shardings: TrainState
) -> tuple[TrainState, dict[str, Any]]:
    """Restores checkpoint `step` onto the shardings of `template`.

    Args:
      manager: The manager of MODEL_DIR.
      step: Step to restore.
      template: A state with the right structure/shapes (arrays or
        ShapeDtypeStructs).
      shardings: NamedShardings of every leaf (same structure).

    Returns:
      (state, metadata).
    """
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardRestore(abstract_tree(template, shardings)),
                METADATA_ITEM: ocp.args.JsonRestore(),
            }
        ),
    )
    tree, meta = restored[STATE_ITEM], dict(restored[METADATA_ITEM])
    if not layer_stack.layer_counts(template.params):
        return TrainState.from_tree(tree), meta
    # A scanned model: stack the per-layer leaves onto the template's shardings.
    like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), template)
    return jax.jit(lambda t: TrainState.from_tree(t, like), out_shardings=shardings)(tree), meta


def metadata_for(
    config: T5Config,
    *,
    data_start_step: int,
    batch_size: int,
    task: str,
    seed: int | None,
    data_start_row: int = 0,
    data_pipeline: str = "stream",
    data_cache: str | None = None,
    vocabulary: Mapping[str, Any] | None = None,
    run_start_step: int | None = None,
) -> dict[str, Any]:
    """The JSON stored beside each training checkpoint.

    Args:
      config: The model config.
      data_start_step: Step at which this part of the run's data began.
      batch_size: Rows per step since then (BATCH_SIZE).
      task: MIXTURE_OR_TASK_NAME.
      seed: RANDOM_SEED.
      data_start_row: Global row read first at `data_start_step`.
      data_pipeline: 'cache' or 'stream'.
      data_cache: The cache's fingerprint (None when streaming).
      vocabulary: The run's vocabulary record (`checkpoints.vocabulary.record`),
        read back by eval, infer and export; None when the model has none.
      run_start_step: The step the run began at before any resume (its
        progress is counted from it); None when unknown.

    Returns:
      The metadata dict.
    """
    return {
        "config": config.to_dict(),
        "data_start_step": int(data_start_step),
        "data_start_row": int(data_start_row),
        "batch_size": int(batch_size),
        "data_pipeline": data_pipeline,
        "data_cache": data_cache,
        "mixture_or_task_name": task,
        "seed": seed,
        **({"vocabulary": dict(vocabulary)} if vocabulary else {}),
        **({"run_start_step": int(run_start_step)} if run_start_step is not None else {}),
    }


def data_row(metadata: Mapping[str, Any], step: int) -> int:
    """The global data row a run resumed at `step` reads first.

    `data_start_row + (step - data_start_step) * batch_size`; checkpoints
    written before rows were recorded started at row 0.

    Args:
      metadata: A training checkpoint's metadata (`metadata_for`).
      step: The checkpoint's step.

    Returns:
      The row index.
    """
    start_step = int(metadata["data_start_step"])
    return int(metadata.get("data_start_row", 0)) + (step - start_step) * int(metadata["batch_size"])


def best_so_far(manager: ocp.CheckpointManager) -> dict[str, Any] | None:
    """Metadata of the best checkpoint a `best_metric` manager kept, if any.

    The trainer stores `eval_metric`, `eval_score` and `eval_results` in the
    metadata of best checkpoints, so a resumed fine-tuning run knows the best
    evaluation of its earlier part.
    """
    step = manager.best_step()
    if step is None:
        return None
    restored = manager.restore(step, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()}))
    meta = dict(restored[METADATA_ITEM])
    return dict(meta, step=step) if "eval_score" in meta else None
