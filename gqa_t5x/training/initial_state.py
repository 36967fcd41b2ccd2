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
* Continuing another run exactly (`check_initial_options`): a run that does
  not resume from MODEL_DIR reads its data from INITIAL_DATA_ROW (default
  row 0), and a run from INITIAL_CHECKPOINT_PATH may take the optimizer
  state of a trainer checkpoint, INITIAL_OPTIMIZER_STATE
  (`open_optimizer_state`, `restore_optimizer_state`): the state of every
  parameter whose shape is unchanged (and the optax step counters) is
  restored, that of reshaped parameters (a GQA conversion's key/value
  kernels) is fresh. A MODEL_DIR resume ignores both: its checkpoint holds
  its own data row and optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from gqa_t5x import checkpoints
from gqa_t5x.model import layer_stack
from gqa_t5x.model import models
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import KV_HEAD_MACROS, T5Config
from gqa_t5x.storage import paths
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


def _load_initial_params(path: str, config: T5Config, shardings: Any, allow_unusual_values: bool) -> Any:
    """Streams a checkpoint's parameters onto their shardings (values checked as read).

    A scanned model's layers are read one by one onto the per-layer
    shardings, then stacked onto `shardings` (`layer_stack.stack_layers`).
    """
    stacked = layer_stack.is_stacked(shardings)
    flat_shardings = param_tree.flatten(layer_stack.unstack_layers(shardings, config) if stacked else shardings)
    with checkpoints.open_checkpoint(path, allow_unusual_values=allow_unusual_values) as reader:
        check_param_shapes(config, reader, path)
        flat = {key: _put(reader.read(key), flat_shardings[key]) for key in reader.keys()}
    params = param_tree.unflatten(flat)
    if stacked:
        params = jax.jit(lambda p: layer_stack.stack_layers(p, config), out_shardings=shardings)(params)
    return params


# ------------------------------------------ continuing another run exactly
DATA_ROW_OPTION = "INITIAL_DATA_ROW (gqa_t5x.training.trainer.train.initial_data_row)"
OPT_STATE_OPTION = "INITIAL_OPTIMIZER_STATE (gqa_t5x.training.trainer.train.initial_optimizer_state)"


def check_initial_options(
    initial_data_row: int | None,
    initial_optimizer_state: str | None,
    initial_checkpoint_path: str | None,
) -> None:
    """Checks INITIAL_DATA_ROW and INITIAL_OPTIMIZER_STATE before anything is read.

    Args:
      initial_data_row: Global data row a run not resumed from MODEL_DIR
        reads first (None: row 0).
      initial_optimizer_state: A trainer checkpoint whose optimizer state a
        run from INITIAL_CHECKPOINT_PATH continues with (None: fresh).
      initial_checkpoint_path: INITIAL_CHECKPOINT_PATH.

    Raises:
      ValueError: the row is not a non-negative integer, or an optimizer
        state is given without an initial checkpoint.
    """
    if initial_data_row is not None and (
        isinstance(initial_data_row, bool)
        or not isinstance(initial_data_row, (int, np.integer))
        or initial_data_row < 0
    ):
        raise ValueError(
            f"{DATA_ROW_OPTION}={initial_data_row!r} must be a non-negative integer: the "
            "global row of the training data that a run not resumed from MODEL_DIR reads "
            "first (to continue a pre-training run of S steps at batch B, S * B); leave it "
            "None to start at row 0."
        )
    if initial_optimizer_state and not initial_checkpoint_path:
        raise ValueError(
            f"{OPT_STATE_OPTION}={initial_optimizer_state!r} needs INITIAL_CHECKPOINT_PATH: "
            "it restores the optimizer state that goes with the initial checkpoint's "
            "parameters, and this run starts from scratch. Set --gin.INITIAL_CHECKPOINT_PATH "
            "(e.g. to the same checkpoint) or leave INITIAL_OPTIMIZER_STATE None."
        )


@dataclasses.dataclass(frozen=True)
class OptimizerSource:
    """A trainer checkpoint's optimizer state, checked but not yet read.

    Attributes:
      path: INITIAL_OPTIMIZER_STATE as given.
      state_dir: Its Orbax `state/` item (absolute).
      config: The model config recorded in its metadata.
      tree: Orbax's metadata tree of the whole `state/` item.
      leaves: {optimizer-state leaf path ('0/v_row/encoder/...'): shape}.
    """

    path: str
    state_dir: paths.Path
    config: T5Config
    tree: Any
    leaves: dict[str, tuple[int, ...]]


def _abstract_params(config: T5Config) -> dict[str, Any]:
    """The unscanned float32 parameter tree of `config` (shapes only)."""
    shapes = param_tree.param_shapes(config)
    return param_tree.unflatten({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()})


def _leaf_paths(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a/0/b': leaf} of a nested dict/list tree (Orbax metadata or restored)."""
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {} if tree is None else {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(_leaf_paths(value, f"{prefix}/{key}" if prefix else str(key)))
    return out


def open_optimizer_state(path: str, optimizer: optax.GradientTransformation) -> OptimizerSource:
    """Checks that `path` is a trainer checkpoint holding `optimizer`'s state.

    Reads only metadata: the model config the checkpoint recorded and
    Orbax's tree metadata, compared with the state `optimizer` builds for
    that config's (unscanned, as saved) parameters.

    Args:
      path: INITIAL_OPTIMIZER_STATE: `MODEL_DIR/checkpoint_<step>` of a run
        of this trainer (local or gs://).
      optimizer: This run's optimizer.

    Returns:
      The checked `OptimizerSource`.

    Raises:
      CheckpointNotFoundError: `path` does not exist.
      CheckpointError: it is not a trainer checkpoint (a converted or
        exported one carries no optimizer state).
      ValueError: its optimizer state has another structure than `optimizer`'s.
    """
    root = paths.absolute(paths.as_path(path, name="INITIAL_OPTIMIZER_STATE"))
    if root.name == ts.STATE_ITEM and (root.parent / ts.METADATA_ITEM).exists():
        root = root.parent  # checkpoint_<step>/state given: its step directory.
    if not root.exists():
        raise checkpoints.CheckpointNotFoundError(
            f"{OPT_STATE_OPTION}={path!r} does not exist; point it at a "
            "MODEL_DIR/checkpoint_<step> directory of a run of this trainer."
        )
    state_dir, meta_file = root / ts.STATE_ITEM, root / ts.METADATA_ITEM / "metadata"
    not_trainer = (
        f"{OPT_STATE_OPTION}={path!r} is not a training checkpoint written by this trainer "
        f"(MODEL_DIR/{ts.STEP_PREFIX}_<step>/ with {ts.STATE_ITEM}/ and {ts.METADATA_ITEM}/"
        f"metadata holding the optimizer state and the model config)"
    )
    if not (state_dir / "_METADATA").is_file() or not meta_file.is_file():
        raise checkpoints.CheckpointError(
            f"{not_trainer}. Converted and exported checkpoints carry no optimizer state: "
            "leave INITIAL_OPTIMIZER_STATE None for a fresh one."
        )
    try:
        config = T5Config.from_dict(json.loads(meta_file.read_text())["config"])
        meta = ocp.PyTreeCheckpointer().metadata(state_dir)
    except Exception as e:  # Unreadable JSON or Orbax metadata, a config of another version.
        raise checkpoints.CheckpointError(f"{not_trainer}: {type(e).__name__}: {e}") from e
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
    states = tree.get("state", {}).get("param_states") if isinstance(tree, Mapping) else None
    if states is None:
        raise checkpoints.CheckpointError(f"{not_trainer}: it has no state/param_states.")
    have = {k: tuple(v.shape) for k, v in _leaf_paths(states).items()}
    want = {
        param_tree.keypath_str(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_leaves_with_path(
            jax.eval_shape(optimizer.init, _abstract_params(config))
        )
    }
    if have != want:
        differing = [
            f"{k}: checkpoint {have.get(k, 'absent')} vs this optimizer {want.get(k, 'absent')}"
            for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)
        ]
        raise ValueError(
            f"{OPT_STATE_OPTION}={path!r} holds the state of another optimizer than this "
            f"run's (built for that checkpoint's model): {len(differing)} leaves differ, e.g. "
            + "; ".join(differing[:3])
            + ". Use the optimizer settings (optimizers.adafactor: factored, momentum, ...) "
            "of the run that wrote it, or leave INITIAL_OPTIMIZER_STATE None for a fresh state."
        )
    return OptimizerSource(path, state_dir, config, tree, have)


def _mirrored_param(leaf_path: str, params: Mapping[str, Any]) -> str | None:
    """The parameter an optimizer-state leaf belongs to (longest path suffix), or None."""
    parts = leaf_path.split("/")
    return next(("/".join(parts[i:]) for i in range(len(parts)) if "/".join(parts[i:]) in params), None)


def _prune(node: Any, prefix: str, keep: Mapping[str, Any]) -> Any:
    """Orbax's metadata tree cut down to the leaves in `keep` (a partial-restore item).

    Dict entries without kept leaves are dropped; list entries become None
    (Orbax's partial restore keeps a list's length).
    """
    if isinstance(node, Mapping):
        subs = {k: _prune(v, f"{prefix}/{k}" if prefix else str(k), keep) for k, v in node.items()}
        return {k: v for k, v in subs.items() if v is not None} or None
    if isinstance(node, (list, tuple)):
        return [_prune(v, f"{prefix}/{i}" if prefix else str(i), keep) for i, v in enumerate(node)]
    return keep.get(prefix)


def _grouped(names: list[str]) -> str:
    """Parameter names, those of several layers folded: 'decoder/layers_*/.../kernel (x24)'."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(re.sub(r"layers_\d+", "layers_*", name), []).append(name)
    return ", ".join(f"{k} (x{len(v)})" if len(v) > 1 else v[0] for k, v in groups.items())


def restore_optimizer_state(
    source: OptimizerSource,
    *,
    config: T5Config,
    fresh: Any,
    abstract_params: Any,
    opt_shardings: Any,
    replicated: jax.sharding.Sharding,
) -> tuple[Any, str]:
    """This run's optimizer state with `source`'s leaves wherever shapes agree.

    A parameter whose shape is the same in `source.config` and `config` gets
    every leaf of its state (Adafactor's `v_row`, `v_col`, `v`) from the
    checkpoint; leaves that belong to no parameter (optax's `count`) are
    restored too. Leaves are matched by key path, never by shape. A scanned
    run's stacked state is matched layer by layer (the checkpoint is saved
    unscanned) and stacked again.

    Args:
      source: From `open_optimizer_state`.
      config: This run's model config.
      fresh: This run's freshly initialised optimizer state (on its shardings).
      abstract_params: This run's parameters (shapes; stacked when scanned).
      opt_shardings: The shardings of the optimizer state.
      replicated: A sharding replicated over the mesh (the checkpoint's step).

    Returns:
      (optimizer state, one console line saying what was restored).
    """
    counts = layer_stack.layer_counts(abstract_params)
    with_shardings = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=s), fresh, opt_shardings
    )
    run_shapes = param_tree.param_shapes(config)
    found_shapes = param_tree.param_shapes(source.config)
    same = {p for p, shape in run_shapes.items() if found_shapes.get(p) == shape}
    keep = {}
    for keypath, leaf in jax.tree_util.tree_leaves_with_path(
        layer_stack.unstack_tree(with_shardings, counts) if counts else with_shardings
    ):
        key = param_tree.keypath_str(keypath)
        param = _mirrored_param(key, run_shapes)
        if param is not None and param not in same:
            continue
        if source.leaves.get(key) != tuple(leaf.shape):  # Not this optimizer's state.
            raise ValueError(f"{OPT_STATE_OPTION}={source.path!r}: leaf {key} has shape "
                             f"{source.leaves.get(key, 'absent')}, this run's {tuple(leaf.shape)}.")
        keep[f"{ts.STATE_ITEM}/param_states/{key}"] = leaf
    keep[f"{ts.STATE_ITEM}/step"] = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    item = _prune(source.tree, "", keep)
    restore_args = jax.tree_util.tree_map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), item
    )
    restored = ocp.PyTreeCheckpointer().restore(
        source.state_dir,
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
    )
    flat = _leaf_paths(restored)
    prefix = f"{ts.STATE_ITEM}/param_states/"
    loaded = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), with_shardings)

    def merge(state: Any, values: dict[str, Any]) -> Any:
        tree = layer_stack.unstack_tree(state, counts) if counts else state
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        tree = treedef.unflatten([values.get(param_tree.keypath_str(p), x) for p, x in leaves])
        return layer_stack.stack_tree(tree, like) if counts else tree

    opt_state = jax.jit(merge, out_shardings=opt_shardings)(fresh, loaded)
    reinitialised = [p for p in run_shapes if p not in same]
    note = (
        f"[train] optimizer state from {source.path} (step "
        f"{int(jax.device_get(flat[f'{ts.STATE_ITEM}/step']))}): restored for {len(same)} of "
        f"{len(run_shapes)} parameters and the optimizer's step counters; "
        + (f"reinitialised for {len(reinitialised)} whose shape differs from that checkpoint's "
           f"model: {_grouped(reinitialised)}." if reinitialised else "none reinitialised.")
    )
    return opt_state, note


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
        (`restore_optimizer_state`); ignored on a MODEL_DIR resume.

    Returns:
      (state, state shardings, start with `data_row` and `notes`).

    Raises:
      UnusualValuesError: a restored parameter (MODEL_DIR's checkpoint or
        INITIAL_CHECKPOINT_PATH) holds such values; it is named.
      ValueError, CheckpointError: INITIAL_DATA_ROW or INITIAL_OPTIMIZER_STATE
        is invalid (`check_initial_options`, `open_optimizer_state`).
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
    check_initial_options(
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
            source = open_optimizer_state(initial_optimizer_state, optimizer)
        params = _load_initial_params(
            initial_checkpoint_path, model.config, param_shardings, allow_unusual_values
        )
    else:
        params = jax.jit(model.get_initial_params, out_shardings=param_shardings)(rng)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    notes = ()
    if source is not None:
        opt_state, note = restore_optimizer_state(
            source, config=model.config, fresh=opt_state, abstract_params=abstract_params,
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
