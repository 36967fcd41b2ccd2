"""Orbax PyTree checkpoints (T5X's newer format, and the array store of ours).

Layouts accepted (all read through orbax-checkpoint's API):

* an Orbax PyTree directory: `_METADATA` (+ per-leaf zarr directories, or an
  OCDBT store `manifest.ocdbt` + `d/`), or the older layout with a msgpack
  `checkpoint` file whose leaves are 'PLACEHOLDER://<leaf dir>' strings;
* a T5X step directory `checkpoint_<step>/` holding such a tree in `state/`
  (or an Orbax CheckpointManager step directory with the item `default/`).

Model parameters are looked up under `target/` (T5X), `_optimizer/target/`
(older T5X), `params/` or `params/params/` (flax `{'params': ...}`), or the
root. Each `read` is an Orbax *partial* restore of that one leaf
(`PyTreeRestore(item=<one leaf>, partial_restore=True)`): Orbax skips every
other leaf, so memory holds one parameter at a time.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from gqa_t5x.checkpoints import registry, zarr_io
from gqa_t5x.checkpoints.base import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReader,
    CorruptCheckpointError,
)
from gqa_t5x.checkpoints.t5x_legacy import (
    CHECKPOINT_FILE,
    is_msgpack_map,
    scan_msgpack_file,
)
from gqa_t5x.model.config import T5Config
from gqa_t5x.storage import paths
from gqa_t5x.storage.paths import Path, PathLike

FORMAT = "t5x_orbax"
PLACEHOLDER = "PLACEHOLDER://"
METADATA_FILE = "_METADATA"
PARAM_PREFIXES = ("target", "_optimizer/target", "optimizer/target", "params/params", "params", "")
STEP_KEYS = ("state/step", "_optimizer/state/step", "optimizer/state/step", "step")
ITEM_DIRS = ("state", "default")


def _ocp():
    # Orbax logs a warning per restore about missing sharding info; quiet it.
    logging.getLogger("absl").setLevel(logging.ERROR)
    import orbax.checkpoint as ocp

    return ocp


def _read_aggregate(directory: Path) -> dict[str, Any] | None:
    """The msgpack `checkpoint` file of an older Orbax tree, if any.

    Parsed with the lazy scanner of `t5x_legacy`, so a large T5X legacy file
    in the same place is indexed, not decoded.
    """
    file = directory / CHECKPOINT_FILE
    if not is_msgpack_map(file):
        return None
    tree = scan_msgpack_file(file)
    return tree if isinstance(tree, dict) else None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    elif prefix:
        out[prefix] = tree
    return out


def _has_placeholders(tree: Mapping[str, Any]) -> bool:
    return any(isinstance(v, str) and v.startswith(PLACEHOLDER) for v in _flatten(tree).values())


def is_pytree_dir(directory: PathLike | Path) -> bool:
    """True for an Orbax PyTree directory (new or old layout)."""
    directory = paths.as_path(directory)
    if not directory.is_dir():
        return False
    if (directory / METADATA_FILE).is_file():
        return True
    tree = None
    try:
        tree = _read_aggregate(directory)
    except CorruptCheckpointError:
        return False
    return tree is not None and "optimizer" not in tree and "version" not in tree and _has_placeholders(tree)


def find_pytree_dir(path: PathLike | Path) -> Path | None:
    """The Orbax PyTree directory at `path` (itself or its `state/`/`default/`)."""
    path = paths.as_path(path)
    if path.name in (CHECKPOINT_FILE, METADATA_FILE) and path.is_file():
        path = path.parent
    if is_pytree_dir(path):
        return path
    for item in ITEM_DIRS:
        sub = path / item
        if is_pytree_dir(sub):
            return sub
    return None


def detect(path: Path) -> Path | None:
    """The checkpoint path when `path` is (a file of) an Orbax PyTree
    checkpoint or a step directory holding one in `state/` or `default/`."""
    if path.name in (CHECKPOINT_FILE, METADATA_FILE) and path.is_file():
        return path.parent if is_pytree_dir(path.parent) else None
    return path if find_pytree_dir(path) is not None else None


def _missing_leaf_directories(directory: Path) -> list[str]:
    """Array directories that `_METADATA` lists but that are absent (non-OCDBT).

    Orbax's own metadata call fails without naming them when one is missing.
    """
    try:
        meta = json.loads((directory / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return []
    if meta.get("use_ocdbt"):
        return []
    missing = []
    for entry in (meta.get("tree_metadata") or {}).values():
        keys = [str(k.get("key")) for k in entry.get("key_metadata", [])]
        value_type = (entry.get("value_metadata") or {}).get("value_type", "")
        if keys and value_type in ("np.ndarray", "jax.Array") and not (directory / ".".join(keys)).is_dir():
            missing.append(".".join(keys))
    return missing


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


# Orbax tree metadata of local checkpoints read in this process, keyed by the
# directory and the identity of its _METADATA file (inode, mtime, size): a
# finished checkpoint does not change, and one written again gets a new file.
# Orbax reads every leaf's array metadata for it (about 0.1 s for a small
# training checkpoint), and a run opens its initial and latest checkpoints
# several times.
_METADATA_MEMO: dict[tuple[str, int, int, int], Any] = {}
_METADATA_MEMO_SIZE = 256


def _tree_metadata(checkpointer: Any, directory: Path) -> Any:
    """`checkpointer.metadata(directory)`, remembered for local directories."""
    if paths.is_remote(directory):
        return checkpointer.metadata(directory)
    stat = os.stat(os.path.join(str(directory), METADATA_FILE))
    key = (str(directory), stat.st_ino, stat.st_mtime_ns, stat.st_size)
    if key not in _METADATA_MEMO:
        if len(_METADATA_MEMO) >= _METADATA_MEMO_SIZE:
            _METADATA_MEMO.clear()
        _METADATA_MEMO[key] = checkpointer.metadata(directory)
    return _METADATA_MEMO[key]


class _OrbaxTree:
    """Structure of an Orbax PyTree directory and per-leaf restore."""

    def __init__(self, directory: PathLike | Path):
        self.directory = paths.absolute(directory)
        ocp = _ocp()
        self._checkpointer = ocp.PyTreeCheckpointer()
        self.aggregate = None
        self.placeholders: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, np.dtype] = {}
        if (self.directory / METADATA_FILE).is_file():
            missing = _missing_leaf_directories(self.directory)
            if missing:
                raise CorruptCheckpointError(
                    f"{self.directory / missing[0]}: array directory missing ({len(missing)} "
                    f"of the leaves listed in {self.directory / METADATA_FILE} have none: "
                    f"{missing[:3]}{' ...' if len(missing) > 3 else ''}); the checkpoint "
                    f"was copied or written incompletely."
                )
            try:
                meta = _tree_metadata(self._checkpointer, self.directory)
            except Exception as e:
                raise CorruptCheckpointError(
                    f"{self.directory}: unreadable Orbax metadata ({METADATA_FILE}): {e}"
                ) from e
            tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
            if tree is None:
                tree = getattr(meta, "item_metadata", meta)
            if tree is None:
                raise CorruptCheckpointError(
                    f"{self.directory}: Orbax could not read the tree metadata in "
                    f"{METADATA_FILE} (a leaf's .zarray missing or corrupted?)."
                )
            for key, leaf in _flatten(tree).items():
                if hasattr(leaf, "shape") and hasattr(leaf, "dtype") and leaf.dtype is not None:
                    self.shapes[key] = tuple(leaf.shape)
                    self.dtypes[key] = np.dtype(leaf.dtype)
            self.leaves = list(_flatten(tree))
        else:
            self.aggregate = _read_aggregate(self.directory)
            if self.aggregate is None:
                raise CheckpointNotFoundError(f"{self.directory}: not an Orbax PyTree directory.")
            flat = _flatten(self.aggregate)
            self.leaves = list(flat)
            self.placeholders = {
                k: v[len(PLACEHOLDER):] for k, v in flat.items() if isinstance(v, str) and v.startswith(PLACEHOLDER)
            }
            for key, name in self.placeholders.items():
                zarray = self.directory / name / ".zarray"
                if zarray.is_file():
                    info = json.loads(zarray.read_text())
                    self.shapes[key] = tuple(info["shape"])
                    self.dtypes[key] = np.dtype(info["dtype"]) if info["dtype"] != "bfloat16" else np.dtype("float32")

    def restore(self, keys: list[str]) -> dict[str, np.ndarray]:
        """Restores only `keys` (flat '/' paths) as numpy arrays.

        Orbax's partial restore needs the `_METADATA` layout; the older
        aggregate layout keeps each leaf in a plain zarr directory, which is
        read directly (what Orbax itself does for that layout).
        """
        if self.aggregate is not None:
            out = {}
            for key in keys:
                spec = {"driver": "zarr", "kvstore": zarr_io.kvstore_for(self.directory / self.placeholders[key])}
                out[key] = zarr_io.read_zarr(spec, name=key, shape=self.shapes[key])
            return out
        ocp = _ocp()
        item = _nest({k: 0 for k in keys})
        restore_args = _nest({k: ocp.RestoreArgs(restore_type=np.ndarray) for k in keys})
        try:
            out = self._checkpointer.restore(
                self.directory,
                args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
            )
        except Exception as e:
            raise CorruptCheckpointError(
                f"{self.directory}: Orbax could not restore {keys[:3]}"
                f"{' ...' if len(keys) > 3 else ''} (missing, truncated or corrupted "
                f"array files?): {type(e).__name__}: {e}"
            ) from e
        flat = _flatten(out)
        missing = [k for k in keys if k not in flat]
        if missing:
            raise CorruptCheckpointError(f"{self.directory}: Orbax restored no value for {missing[:3]}.")
        return {k: np.asarray(flat[k]) for k in keys}


def read_orbax_tree(path: PathLike | Path, *, template: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Reads everything in an Orbax PyTree checkpoint (any state, not only T5).

    Args:
      path: the PyTree directory, or a step directory holding `state/`.
      template: optional nested dict whose leaves have `.shape` and `.dtype`
        (numpy arrays, `jax.ShapeDtypeStruct`), used - like Orbax's restore
        args - for leaves whose zarr metadata file (`.zarray`) is absent, as
        in T5X's own Orbax test data; ignored where metadata exists.

    Returns:
      The nested dict with numpy leaves in their stored dtypes.

    Raises:
      CheckpointNotFoundError: no Orbax tree at `path`.
      CorruptCheckpointError: unreadable leaves (names the directory), or
        metadata missing without a template for that leaf.
    """
    directory = find_pytree_dir(path)
    if directory is None:
        raise CheckpointNotFoundError(
            f"No Orbax PyTree checkpoint at {path} (looked for {METADATA_FILE} or a "
            f"msgpack 'checkpoint' with {PLACEHOLDER} leaves, in it or in "
            f"{'/ or '.join(ITEM_DIRS)}/)."
        )
    tree = _OrbaxTree(directory)
    if tree.aggregate is None:
        keys = [k for k in tree.leaves if k in tree.shapes]
        return _nest(tree.restore(keys) if keys else {})
    if all(k in tree.shapes for k in tree.placeholders):
        try:
            out = tree._checkpointer.restore(directory)
        except Exception as e:
            raise CorruptCheckpointError(f"{directory}: Orbax could not restore the checkpoint: {type(e).__name__}: {e}") from e
        return _nest({k: np.asarray(v) if hasattr(v, "shape") else v for k, v in _flatten(out).items()})
    flat_template = _flatten(template) if template is not None else {}
    out: dict[str, Any] = {}
    for key, value in _flatten(tree.aggregate).items():
        if key not in tree.placeholders:
            out[key] = value.read() if hasattr(value, "read") else value
            continue
        hint = flat_template.get(key)
        name = tree.placeholders[key]
        spec = {"driver": "zarr", "kvstore": zarr_io.kvstore_for(directory / name)}
        if key not in tree.shapes and hint is None:
            raise CorruptCheckpointError(
                f"{directory / name}: no zarr metadata file (.zarray) for leaf "
                f"{key!r}; pass template= with its shape and dtype to read it."
            )
        out[key] = zarr_io.read_zarr(
            spec,
            name=key,
            shape=tuple(hint.shape) if hint is not None else None,
            dtype=np.dtype(hint.dtype) if hint is not None else None,
        )
    return _nest(out)


def _training_metadata(state_dir: Path) -> dict[str, Any]:
    """The JSON item our trainer saves beside `state/` (`checkpoint_<step>/metadata/metadata`), or {}."""
    if state_dir.name != "state":
        return {}
    file = state_dir.parent / "metadata" / "metadata"
    try:
        return dict(json.loads(file.read_text())) if file.is_file() else {}
    except (OSError, ValueError, TypeError) as e:
        raise CorruptCheckpointError(f"{file}: unreadable training metadata: {e}") from e


class OrbaxReader(CheckpointReader):
    """Reads T5 parameters from an Orbax PyTree checkpoint, one leaf per restore."""

    format = FORMAT

    def __init__(
        self,
        path: PathLike | Path,
        *,
        config: T5Config | None = None,
        num_heads: int | None = None,
        head_dim: int | None = None,
        overrides: Mapping[str, Any] | None = None,
    ):
        directory = find_pytree_dir(path)
        if directory is None:
            raise CheckpointNotFoundError(f"No Orbax PyTree checkpoint at {path}.")
        super().__init__(path)
        self._tree = _OrbaxTree(directory)
        leaves = set(self._tree.leaves)
        prefix = next(
            (p for p in PARAM_PREFIXES if f"{p}/token_embedder/embedding".lstrip("/") in leaves),
            None,
        )
        if prefix is None:
            raise CheckpointError(
                f"{directory}: no T5 parameter tree (token_embedder/embedding) under "
                f"any of {[p + '/' for p in PARAM_PREFIXES if p]} or the root."
            )
        self.params_prefix = prefix
        strip = len(prefix) + 1 if prefix else 0
        self._source = {
            k[strip:]: k for k in self._tree.leaves if not prefix or k.startswith(prefix + "/")
        }
        missing_meta = [k for k, src in self._source.items() if src not in self._tree.shapes]
        if missing_meta:
            raise CorruptCheckpointError(
                f"{directory}: no array metadata (shape/dtype) for {missing_meta[:3]}; "
                f"the checkpoint is incomplete (were hidden files such as .zarray copied?)."
            )
        shapes = {k: self._tree.shapes[src] for k, src in self._source.items()}
        step_key = next((k for k in STEP_KEYS if k in self._tree.shapes), None)
        if step_key is not None:
            self.step = int(self._tree.restore([step_key])[step_key])
        self._setup(shapes, config=config, num_heads=num_heads, head_dim=head_dim, overrides=overrides)
        self.metadata = _training_metadata(directory)

    def _load(self, key: str) -> np.ndarray:
        source = self._source[key]
        return self._tree.restore([source])[source]

    def _load_many(self, keys: list[str]) -> dict[str, np.ndarray]:
        # One partial restore for all keys: each Orbax restore call costs tens
        # of milliseconds of set-up, whatever its size.
        restored = self._tree.restore([self._source[key] for key in keys])
        return {key: restored[self._source[key]] for key in keys}


registry.register_format(
    registry.CheckpointFormat(
        name=FORMAT,
        doc=f"{METADATA_FILE} (or an older msgpack 'checkpoint' with {PLACEHOLDER} leaves) "
        f"here or in {'/ or '.join(ITEM_DIRS)}/",
        detect=detect,
        reader=OrbaxReader,
        # Orbax's older layout keeps its tree in a msgpack `checkpoint` file.
        supersedes=("t5x_legacy",),
    )
)
