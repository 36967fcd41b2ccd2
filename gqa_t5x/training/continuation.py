"""Continuing another run exactly: its data row and its optimizer state.

A run that does not resume from MODEL_DIR reads its data from
INITIAL_DATA_ROW (default row 0), and a run from INITIAL_CHECKPOINT_PATH may
take the optimizer state of a trainer checkpoint, INITIAL_OPTIMIZER_STATE
(`open_optimizer_state`, `restore_optimizer_state`): the state of every
parameter whose shape and values the run's initial parameters share with
that checkpoint (and the optax step counters) is restored; that of a
parameter a conversion changed (a GQA conversion's reshaped key/value
kernels, and the query/output kernels that `align` rotates) is fresh.
A MODEL_DIR resume ignores both: its checkpoint holds its own data row and
optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
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
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config
from gqa_t5x.storage import paths
from gqa_t5x.training import train_state as ts

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
    return param_tree.abstract_params(config)


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
    params: Any,
    opt_shardings: Any,
    replicated: jax.sharding.Sharding,
) -> tuple[Any, str]:
    """This run's optimizer state with `source`'s leaves for its unchanged parameters.

    A parameter whose shape is the same in `source.config` and `config`, and
    whose initial values equal the checkpoint's bit for bit, gets every leaf
    of its state (Adafactor's `v_row`, `v_col`, `v`) from the checkpoint; a
    parameter the conversion reshaped (GQA key/value kernels) or rewrote
    (`align` rotates query and output kernels) keeps its fresh state. Leaves
    that belong to no parameter (optax's `count`, which sets Adafactor's
    second-moment decay: a fresh leaf then starts at the checkpoint step's
    decay, as T5X's Adafactor takes it from the global step) are restored
    too. Leaves are matched by key path, never by shape. A scanned run's
    stacked state and parameters are matched layer by layer (the checkpoint
    is saved unscanned) and stacked again. While the values are compared,
    the checkpoint's same-shape parameters are held beside the run's.

    Args:
      source: From `open_optimizer_state`.
      config: This run's model config.
      fresh: This run's freshly initialised optimizer state (on its shardings).
      params: This run's initial parameters (stacked when scanned).
      opt_shardings: The shardings of the optimizer state.
      replicated: A sharding replicated over the mesh (the checkpoint's step).

    Returns:
      (optimizer state, one console line saying what was restored).
    """
    counts = layer_stack.layer_counts(params)
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
    like_params = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding), params
    )
    flat_like = param_tree.flatten(layer_stack.unstack_tree(like_params, counts) if counts else like_params)
    for name in same:
        keep[f"target/{name}"] = flat_like[name]
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
    stored = {k[len("target/"):]: v for k, v in flat.items() if k.startswith("target/")}
    equal = jax.device_get(jax.jit(lambda run, found: _equal_leaves(run, found, counts))(params, stored))
    changed = sorted(name for name in same if not bool(equal[name]))
    del stored
    loaded = {k[len(prefix):]: v for k, v in flat.items()
              if k.startswith(prefix) and _mirrored_param(k[len(prefix):], run_shapes) not in changed}
    like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), with_shardings)

    def merge(state: Any, values: dict[str, Any]) -> Any:
        tree = layer_stack.unstack_tree(state, counts) if counts else state
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        tree = treedef.unflatten([values.get(param_tree.keypath_str(p), x) for p, x in leaves])
        return layer_stack.stack_tree(tree, like) if counts else tree

    opt_state = jax.jit(merge, out_shardings=opt_shardings)(fresh, loaded)
    reshaped = [p for p in run_shapes if p not in same]
    parts = [f"{len(reshaped)} whose shape differs from that checkpoint's model: {_grouped(reshaped)}"] if reshaped else []
    if changed:
        parts.append(f"{len(changed)} whose values differ from that checkpoint's: {_grouped(changed)}")
    note = (
        f"[train] optimizer state from {source.path} (step "
        f"{int(jax.device_get(flat[f'{ts.STATE_ITEM}/step']))}): restored for {len(same) - len(changed)} of "
        f"{len(run_shapes)} parameters and the optimizer's step counters; "
        + (f"reinitialised for {'; and '.join(parts)}." if parts else "none reinitialised.")
    )
    return opt_state, note


def _equal_leaves(params: Any, found: Mapping[str, jax.Array], counts: Any) -> dict[str, jax.Array]:
    """{name: whether the run's parameter equals the checkpoint's `found[name]`} (in the run's dtype)."""
    flat = param_tree.flatten(layer_stack.unstack_tree(params, counts) if counts else params)
    return {name: jnp.array_equal(flat[name], value.astype(flat[name].dtype)) for name, value in found.items()}
