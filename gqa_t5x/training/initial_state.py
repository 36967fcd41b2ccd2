"""Where a training run starts, and the state it starts from.

* `find_start` + `check_train_steps`: the run resumes from MODEL_DIR's newest
  checkpoint, else starts at INITIAL_CHECKPOINT_PATH's step, else at step 0;
  TRAIN_STEPS (absolute, counted from the start of pre-training) must lie
  beyond that step, except that a MODEL_DIR already at TRAIN_STEPS is a
  finished run whose rerun does nothing.
* `restore_or_initialize`: restores MODEL_DIR's checkpoint (parameters,
  optimizer state, the global data row the run continues at), or loads the
  initial checkpoint's parameters after comparing their shapes with the
  model's (`check_param_shapes`), or initialises randomly; the optimizer
  state is fresh unless restored.
* Continuing another run exactly (INITIAL_DATA_ROW, INITIAL_OPTIMIZER_STATE):
  `continuation`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gqa_t5x import checkpoints
from gqa_t5x.model import layer_stack
from gqa_t5x.model import models
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import KV_HEAD_MACROS, T5Config
from gqa_t5x.training import continuation
from gqa_t5x.training import partitioning
from gqa_t5x.training import train_state as ts


def checkpoint_step(path: str) -> int:
    """The training step recorded in a checkpoint of any format (0 if none)."""
    with checkpoints.open_checkpoint(path) as reader:
        return int(reader.step or 0)


@dataclasses.dataclass(frozen=True)
class StartInfo:
    """Where a run starts.

    Attributes:
      step: Global step of the state the run starts from.
      resumed_from: 'model_dir', 'initial_checkpoint' or 'scratch'.
      data_row: Global row of the training data the run reads first
        (MODEL_DIR's checkpoint says which on a resume, else INITIAL_DATA_ROW,
        default 0); None until restored.
      restored_metadata: The metadata of the MODEL_DIR checkpoint resumed
        from (which data pipeline and cache it read), else None.
      notes: Console lines about the start (the optimizer state restored
        from INITIAL_OPTIMIZER_STATE, options a resume ignores).
    """

    step: int
    resumed_from: str
    data_row: int | None = None
    restored_metadata: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()


def find_start(latest_step: int | None, initial_checkpoint_path: str | None) -> StartInfo:
    """Where the run starts (reads only steps, no parameters).

    Args:
      latest_step: Newest checkpoint step in MODEL_DIR, or None.
      initial_checkpoint_path: INITIAL_CHECKPOINT_PATH, used when MODEL_DIR
        has no checkpoint.

    Returns:
      The start (without `data_row`).
    """
    if latest_step is not None:
        return StartInfo(latest_step, "model_dir")
    if initial_checkpoint_path:
        return StartInfo(checkpoint_step(initial_checkpoint_path), "initial_checkpoint")
    return StartInfo(0, "scratch")


def check_train_steps(
    total_steps: int, start: StartInfo, model_dir: str, initial_checkpoint_path: str | None
) -> bool:
    """Checks TRAIN_STEPS against the start step.

    A MODEL_DIR whose newest checkpoint is exactly TRAIN_STEPS holds a
    finished run: rerunning the same command (a sweep resuming, a job
    retried) is a no-op, not an error.

    Returns:
      True when the run is already finished (nothing to do).

    Raises:
      ValueError: TRAIN_STEPS is not beyond the start step; the message gives
        the checkpoint's step and a value to use.
    """
    if not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"TRAIN_STEPS={total_steps!r} must be a positive integer.")
    if start.resumed_from == "model_dir" and start.step == total_steps:
        return True
    if total_steps > start.step:
        return False
    absolute = (
        "TRAIN_STEPS is absolute, counted from the start of pre-training (T5X), "
        "not a number of steps to add"
    )
    if start.resumed_from == "model_dir":
        raise ValueError(
            f"TRAIN_STEPS={total_steps} is below the step of MODEL_DIR's newest "
            f"checkpoint {model_dir}/checkpoint_{start.step}: {absolute}. To train "
            f"further set TRAIN_STEPS beyond {start.step} (e.g. {start.step} + N); to "
            "start over use a new MODEL_DIR."
        )
    raise ValueError(
        f"TRAIN_STEPS={total_steps} is not beyond step {start.step} of "
        f"INITIAL_CHECKPOINT_PATH={initial_checkpoint_path!r}, so this run would "
        f"train nothing: {absolute}. For N more steps set TRAIN_STEPS = {start.step} "
        f"+ N (e.g. {start.step + max(total_steps, 1)}), or bind TRAIN_STEPS="
        "@gqa_t5x.training.trainer.steps_after_checkpoint() with "
        "gqa_t5x.training.trainer.steps_after_checkpoint.steps = N."
    )


def _fields_changing_shapes(model: T5Config, found: T5Config) -> list[str]:
    """Config fields on which the two disagree in a way that changes shapes."""
    reference = param_tree.param_shapes(found)
    fields = []
    for field in dataclasses.fields(T5Config):
        if getattr(model, field.name) == getattr(found, field.name):
            continue
        try:
            changed = found.replace(**{field.name: getattr(model, field.name)})
        except ValueError:  # Not even a valid config with the checkpoint's other fields.
            fields.append(field.name)
            continue
        if param_tree.param_shapes(changed) != reference:
            fields.append(field.name)
    return fields


def _describe(config: T5Config, field: str) -> str:
    value = getattr(config, field)
    if field in KV_HEAD_MACROS:
        if value == config.num_heads:
            return f"{value} (= num_heads, multi-head)"
        if value == 1:
            return "1 (multi-query)"
    return repr(value)


def check_param_shapes(
    config: T5Config, reader: checkpoints.CheckpointReader, path: str
) -> None:
    """Compares a checkpoint's parameter shapes with the model's.

    Raises:
      ValueError: they differ; the message names the config fields (and
        their gin macros) that explain it and the first differing parameters.
    """
    want = param_tree.param_shapes(config)
    have = {key: tuple(reader.shape(key)) for key in reader.keys()}
    if want == have:
        return
    differing = [
        f"{key}: model {want.get(key, 'absent')} vs checkpoint {have.get(key, 'absent')}"
        for key in [*want, *(k for k in have if k not in want)]
        if want.get(key) != have.get(key)
    ]
    causes = []
    for field in _fields_changing_shapes(config, reader.config):
        macro = KV_HEAD_MACROS.get(field)  # the gin macro that sets it
        hint = f" (gin macro {macro})" if macro else ""
        causes.append(
            f"{field}: model gin {_describe(config, field)} vs checkpoint "
            f"{_describe(reader.config, field)}{hint}"
        )
    raise ValueError(
        f"INITIAL_CHECKPOINT_PATH={path!r} does not match the model gin: "
        + "; ".join(causes or ["parameter shapes differ"])
        + f". {len(differing)} parameter(s) differ, e.g. "
        + "; ".join(differing[:3])
        + "."
    )


def _put(array: np.ndarray, sharding: jax.sharding.NamedSharding) -> jax.Array:
    array = np.asarray(array, np.float32)
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


# Parameters read in one request while streaming an initial checkpoint: few
# requests for small models (each Orbax restore has a fixed cost), bounded
# host memory for large ones.
READ_BATCH_BYTES = 256 * 2**20


def _read_batches(reader: Any, limit_bytes: int) -> list[list[str]]:
    """The reader's keys in order, split into runs of at most `limit_bytes` of float32
    (a larger parameter is a run of its own)."""
    batches: list[list[str]] = [[]]
    size = 0
    for key in reader.keys():
        nbytes = 4 * math.prod(reader.shape(key))
        if batches[-1] and size + nbytes > limit_bytes:
            batches.append([])
            size = 0
        batches[-1].append(key)
        size += nbytes
    return [batch for batch in batches if batch]


def _load_initial_params(path: str, config: T5Config, shardings: Any, allow_unusual_values: bool) -> Any:
    """Streams a checkpoint's parameters onto their shardings (values checked as read).

    A scanned model's layers are read one by one onto the per-layer
    shardings, then stacked onto `shardings` (`layer_stack.stack_layers`).
    """
    stacked = layer_stack.is_stacked(shardings)
    flat_shardings = param_tree.flatten(layer_stack.unstack_layers(shardings, config) if stacked else shardings)
    with checkpoints.open_checkpoint(path, allow_unusual_values=allow_unusual_values) as reader:
        check_param_shapes(config, reader, path)
        flat = {}
        for keys in _read_batches(reader, READ_BATCH_BYTES):
            flat.update({key: _put(value, flat_shardings[key]) for key, value in reader.read_many(keys).items()})
    params = param_tree.unflatten(flat)
    if stacked:
        params = jax.jit(lambda p: layer_stack.stack_layers(p, config), out_shardings=shardings)(params)
    return params


def restore_or_initialize(
    *,
    start: StartInfo,
    model: models.EncoderDecoderModel,
    optimizer: optax.GradientTransformation,
    partitioner: partitioning.Partitioner,
    manager: Any,
    initial_checkpoint_path: str | None,
    batch_size: int,
    rng: jax.Array,
    allow_unusual_values: bool = False,
    initial_data_row: int | None = None,
    initial_optimizer_state: str | None = None,
) -> tuple[ts.TrainState, ts.TrainState, StartInfo]:
    """Restores MODEL_DIR's checkpoint, loads the initial one, or initialises.

    Args:
      start: From `find_start`.
      model: The model.
      optimizer: Optax transformation (its state is initialised fresh unless
        restored from MODEL_DIR).
      partitioner: Mesh and shardings.
      manager: Checkpoint manager of MODEL_DIR.
      initial_checkpoint_path: INITIAL_CHECKPOINT_PATH.
      batch_size: BATCH_SIZE (compared with the checkpoint's).
      rng: Initialisation key.
      allow_unusual_values: ALLOW_UNUSUAL_VALUES: accept restored parameters
        that are non-finite or have |x| > 1e4 (`checkpoints.value_limits`).
      initial_data_row: INITIAL_DATA_ROW: the data row a start from the
        initial checkpoint or from scratch reads first (None: 0); ignored
        on a MODEL_DIR resume.
      initial_optimizer_state: INITIAL_OPTIMIZER_STATE: a trainer checkpoint
        whose optimizer state a start from the initial checkpoint continues
        (`continuation.restore_optimizer_state`); ignored on a MODEL_DIR resume.

    Returns:
      (state, state shardings, start with `data_row` and `notes`).

    Raises:
      UnusualValuesError: a restored parameter (MODEL_DIR's checkpoint or
        INITIAL_CHECKPOINT_PATH) holds such values; it is named.
      ValueError, CheckpointError: INITIAL_DATA_ROW or INITIAL_OPTIMIZER_STATE
        is invalid (`continuation`).
    """
    abstract_params = jax.eval_shape(model.get_initial_params, rng)
    param_shardings = partitioner.param_shardings(abstract_params, model.config)
    if partitioner.replicated_params:
        logging.info("Replicated (not split over 'model'): %s", partitioner.replicated_params)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    opt_shardings = partitioner.opt_state_shardings(abstract_opt, abstract_params, param_shardings)
    shardings = ts.TrainState(
        step=partitioner.replicated, params=param_shardings, opt_state=opt_shardings
    )
    continuation.check_initial_options(
        initial_data_row, initial_optimizer_state,
        initial_checkpoint_path if start.resumed_from != "scratch" else None,
    )
    if start.resumed_from == "model_dir":
        template = ts.TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt
        )
        state, meta = ts.restore(manager, start.step, template, shardings)
        if not allow_unusual_values:
            checkpoints.check_tree(state.params, source=f"{manager.directory}/{ts.STEP_PREFIX}_{start.step}")
        row = ts.data_row(meta, start.step)
        if meta.get("batch_size") != batch_size:
            logging.warning(
                "BATCH_SIZE changed from %s to %s since the checkpoint: the data "
                "resumes by example, at global row %d.", meta.get("batch_size"), batch_size, row,
            )
        ignored = [name for name, value in (("INITIAL_DATA_ROW", initial_data_row),
                                            ("INITIAL_OPTIMIZER_STATE", initial_optimizer_state))
                   if value is not None and value != ""]
        notes = (f"[train] {' and '.join(ignored)} ignored: resumed from MODEL_DIR, whose "
                 f"checkpoint holds the data row ({row}) and the optimizer state.",) if ignored else ()
        return state, shardings, dataclasses.replace(
            start, data_row=row, restored_metadata=meta, notes=notes)
    source = None
    if start.resumed_from == "initial_checkpoint":
        if initial_optimizer_state:  # Checked before the (long) parameter load.
            source = continuation.open_optimizer_state(initial_optimizer_state, optimizer)
        params = _load_initial_params(
            initial_checkpoint_path, model.config, param_shardings, allow_unusual_values
        )
    else:
        params = jax.jit(model.get_initial_params, out_shardings=param_shardings)(rng)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    notes = ()
    if source is not None:
        opt_state, note = continuation.restore_optimizer_state(
            source, config=model.config, fresh=opt_state, params=params,
            opt_shardings=opt_shardings, replicated=partitioner.replicated,
        )
        logging.info("%s", note)
        notes = (note,)
    state = ts.TrainState(
        step=jax.device_put(jnp.asarray(start.step, jnp.int32), partitioner.replicated),
        params=params,
        opt_state=opt_state,
    )
    row = int(initial_data_row or 0)
    return state, shardings, dataclasses.replace(start, data_row=row, notes=notes)
