"""Our checkpoint format: an Orbax PyTree written one parameter at a time.

    <directory>/                       e.g. .../checkpoint_1050000
      gqa_t5x_checkpoint.json          manifest: format, version, step, per
                                       parameter shape/dtype/crc32, metadata
      config.json                      T5Config.to_json()
      config.gin                       T5Config.to_gin()
      state/                           an Orbax PyTree checkpoint (T5X layout)
        _METADATA                      Orbax tree metadata (non-OCDBT, zarr v2)
        _CHECKPOINT_METADATA
        target.token_embedder.embedding/{.zarray, 0.0, 1.0, ...}
        target.encoder.layers_0.attention.query.kernel/...
        state.step/{.zarray, 0}

The tree is T5X's Orbax state `{'target': params, 'state': {'step': ...}}`,
so `orbax.checkpoint.PyTreeCheckpointer().restore('<directory>/state')` (or
T5X's Orbax manager with `checkpoint_<step>/state`) restores it for
training, and any single parameter can be restored alone (partial restore).

Streaming: `CheckpointWriter.write` compresses one array to disk and keeps
only its crc32; `commit` writes the small metadata files. Peak memory is the
array being written. Atomicity: everything goes to a hidden temporary
directory beside the destination, which is renamed into place by `commit`;
an exception inside `with CheckpointWriter(...)` deletes it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from gqa_t5x.model.config import T5Config
from gqa_t5x.model import param_tree
from gqa_t5x.checkpoints import zarr_io
from gqa_t5x.checkpoints.base import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    return_freed_buffers_to_os,
)
from gqa_t5x.checkpoints.orbax_io import OrbaxReader

FORMAT = "gqa_t5x"
FORMAT_VERSION = 1
MANIFEST = "gqa_t5x_checkpoint.json"
STATE_DIR = "state"
PARAMS_KEY = "target"
STEP_PATH = ("state", "step")
_PYTREE_HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"


def is_native(path: str | os.PathLike) -> bool:
    """True when `path` is a directory written by `CheckpointWriter`."""
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def _orbax_tree_metadata(paths: list[tuple[str, ...]]) -> dict[str, Any]:
    """Orbax `_METADATA` for numpy leaves stored as zarr v2 (no OCDBT)."""
    tree = {}
    for parts in paths:
        tree[str(tuple(parts))] = {
            "key_metadata": [{"key": part, "key_type": 2} for part in parts],  # 2: dict key
            "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
        }
    return {
        "tree_metadata": tree,
        "use_ocdbt": False,
        "use_zarr3": False,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None,
    }


def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


class CheckpointWriter:
    """Streams parameters into a new checkpoint of our format, atomically.

    Usage:
      with CheckpointWriter(out_dir, config, step=step) as writer:
        for key in param_tree.param_shapes(config):
          writer.write(key, array)      # one parameter in memory at a time
      # committed here; an exception in the block leaves nothing at out_dir.

    Args:
      directory: destination directory of the checkpoint (local).
      config: config of the network; fixes the parameters and their shapes.
      step: training step recorded with the checkpoint.
      overwrite: replace an existing checkpoint at `directory` (only once the
        new one is complete). Without it an existing destination is an error.
      metadata: JSON-serialisable dict stored in the manifest.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        config: T5Config,
        *,
        step: int = 0,
        overwrite: bool = False,
        metadata: dict | None = None,
    ):
        directory = os.fspath(directory)
        if directory.startswith("gs://"):
            raise CheckpointError(
                f"Writing to {directory} is not supported; write locally and copy "
                f"the directory (e.g. gsutil -m cp -r)."
            )
        if not isinstance(config, T5Config):
            raise CheckpointError(f"config must be a T5Config, got {type(config).__name__}.")
        self.directory = os.path.abspath(directory)
        self.config = config
        self.step = int(step)
        self.overwrite = overwrite
        try:
            self.metadata = json.loads(json.dumps(metadata or {}))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"metadata for {directory} is not JSON-serialisable: {e}") from e
        self._shapes = param_tree.param_shapes(config)
        self._check_destination()
        return_freed_buffers_to_os()
        parent = os.path.dirname(self.directory)
        os.makedirs(parent, exist_ok=True)
        base = os.path.basename(self.directory)
        self._tmp = os.path.join(parent, f".{base}.gqa_t5x-tmp-{uuid.uuid4().hex[:12]}")
        os.makedirs(os.path.join(self._tmp, STATE_DIR))
        self._written: dict[str, dict[str, Any]] = {}
        self._init_ns = time.time_ns()
        self._done = False

    # ----------------------------------------------------------------- checks
    def _check_destination(self) -> None:
        """Errors unless the destination is absent, empty, or replaceable."""
        from gqa_t5x.checkpoints import detect

        d = self.directory
        if not os.path.lexists(d):
            return
        if not os.path.isdir(d):
            raise CheckpointExistsError(f"Checkpoint destination {d} exists and is not a directory.")
        if not os.listdir(d):
            return
        found = detect.safe_detect(d)
        if found is None:
            raise CheckpointExistsError(
                f"Checkpoint destination {d} is a non-empty directory that holds no "
                f"checkpoint; refusing to replace it (choose another directory)."
            )
        if not self.overwrite:
            raise CheckpointExistsError(
                f"Checkpoint destination {d} already holds a {found[0]} checkpoint; "
                f"pass overwrite=True to replace it."
            )

    # ------------------------------------------------------------------ write
    def write(self, key: str, array: Any) -> None:
        """Writes one parameter to disk (nothing is kept in memory).

        Args:
          key: canonical T5X path from `param_tree.param_shapes(config)`.
          array: floating-point array (numpy/jax) of exactly that shape; stored
            as float32.

        Raises:
          CheckpointError: unknown or repeated key, wrong shape or dtype, or
            the writer was already committed/aborted.
        """
        if self._done:
            raise CheckpointError(f"{self.directory}: writer already committed or aborted.")
        if key not in self._shapes:
            raise CheckpointError(
                f"{self.directory}: {key!r} is not a parameter of this config "
                f"(expected one of param_tree.param_shapes(config), e.g. "
                f"{next(iter(self._shapes))!r})."
            )
        if key in self._written:
            raise CheckpointError(f"{self.directory}: parameter {key!r} was already written.")
        array = np.asarray(array)
        if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
            raise CheckpointError(
                f"{self.directory}: parameter {key!r} has dtype {array.dtype}; expected "
                f"a floating-point array."
            )
        if tuple(array.shape) != tuple(self._shapes[key]):
            raise CheckpointError(
                f"{self.directory}: parameter {key!r} has shape {tuple(array.shape)} but "
                f"the config needs {tuple(self._shapes[key])}."
            )
        array = np.asarray(array, dtype=np.float32, order="C")
        leaf = ".".join((PARAMS_KEY, *key.split("/")))
        zarr_io.write_zarr(os.path.join(self._tmp, STATE_DIR, leaf), array)
        self._written[key] = {
            "shape": list(array.shape),
            "dtype": "float32",
            "crc32": zlib.crc32(memoryview(array).cast("B")),
        }

    # ----------------------------------------------------------------- commit
    def commit(self) -> None:
        """Writes metadata and atomically publishes the checkpoint.

        Raises:
          CheckpointError: a parameter of the config was not written (the
            temporary directory is kept so more can be written; `abort` or
            leaving the `with` block with the exception deletes it).
          CheckpointExistsError: the destination appeared meanwhile and
            `overwrite` is False.
        """
        if self._done:
            raise CheckpointError(f"{self.directory}: writer already committed or aborted.")
        missing = [k for k in self._shapes if k not in self._written]
        if missing:
            raise CheckpointError(
                f"{self.directory}: cannot commit, {len(missing)} parameter(s) were "
                f"not written, e.g. {missing[:3]}."
            )
        state = os.path.join(self._tmp, STATE_DIR)
        zarr_io.write_zarr(os.path.join(state, ".".join(STEP_PATH)), np.asarray(self.step, np.int32))
        leaves = [(PARAMS_KEY, *k.split("/")) for k in self._shapes] + [STEP_PATH]
        _write_json(os.path.join(state, "_METADATA"), _orbax_tree_metadata(leaves))
        _write_json(
            os.path.join(state, "_CHECKPOINT_METADATA"),
            {
                "item_handlers": _PYTREE_HANDLER,
                "metrics": {},
                "performance_metrics": {},
                "init_timestamp_nsecs": self._init_ns,
                "commit_timestamp_nsecs": time.time_ns(),
                "custom_metadata": {},
            },
        )
        with open(os.path.join(state, "commit_success.txt"), "w") as f:
            f.write(f"Checkpoint commit was successful to {self.directory}/{STATE_DIR}")
        with open(os.path.join(self._tmp, "config.json"), "w") as f:
            f.write(self.config.to_json())
        with open(os.path.join(self._tmp, "config.gin"), "w") as f:
            f.write(self.config.to_gin())
        _write_json(
            os.path.join(self._tmp, MANIFEST),
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "step": self.step,
                "orbax_item": STATE_DIR,
                "params_key": PARAMS_KEY,
                "params": {k: self._written[k] for k in self._shapes},
                "metadata": self.metadata,
            },
        )
        self._check_destination()
        old = None
        if os.path.lexists(self.directory):
            old = os.path.join(
                os.path.dirname(self.directory),
                f".{os.path.basename(self.directory)}.gqa_t5x-old-{uuid.uuid4().hex[:12]}",
            )
            os.rename(self.directory, old)
        try:
            os.rename(self._tmp, self.directory)
        except OSError:
            if old is not None:
                os.rename(old, self.directory)
            raise
        self._done = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Deletes everything written so far; the destination is untouched."""
        if not self._done:
            self._done = True
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise


def save(
    directory: str | os.PathLike,
    config: T5Config,
    params: Mapping[str, Any],
    *,
    step: int = 0,
    overwrite: bool = False,
) -> None:
    """Saves a nested parameter dict (or flax `{'params': tree}`) in our format.

    Args:
      directory: destination checkpoint directory.
      config: the network config; `params` must match `param_shapes(config)`.
      params: nested dict of arrays with T5X param_tree.
      step: training step to record.
      overwrite: replace an existing checkpoint.

    Raises:
      CheckpointError: unknown, missing or misshapen parameters (nothing is
        written at `directory`).
    """
    if set(params) == {"params"} and isinstance(params["params"], Mapping):
        params = params["params"]
    flat = param_tree.flatten(params)
    shapes = param_tree.param_shapes(config)
    unknown = [k for k in flat if k not in shapes]
    if unknown:
        raise CheckpointError(
            f"{os.fspath(directory)}: params hold {unknown[:3]} which are not "
            f"parameters of the config."
        )
    with CheckpointWriter(directory, config, step=step, overwrite=overwrite) as writer:
        for key in shapes:
            if key not in flat:
                raise CheckpointError(f"{os.fspath(directory)}: params lack {key!r} {shapes[key]}.")
            writer.write(key, flat[key])


class NativeReader(OrbaxReader):
    """Reads our format: config from config.json, data via Orbax, crc32-checked."""

    format = FORMAT

    def __init__(
        self,
        path: str,
        *,
        config: T5Config | None = None,
        num_heads: int | None = None,
        head_dim: int | None = None,
    ):
        path = os.fspath(path)
        manifest_file = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest_file):
            raise CheckpointNotFoundError(f"No {FORMAT} checkpoint at {path} (no {MANIFEST}).")
        try:
            with open(manifest_file) as f:
                manifest = json.load(f)
            with open(os.path.join(path, "config.json")) as f:
                stored = T5Config.from_json(f.read())
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(f"{path}: unreadable manifest or config.json: {e}") from e
        if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
            raise CorruptCheckpointError(
                f"{manifest_file}: format {manifest.get('format')!r} version "
                f"{manifest.get('format_version')!r} is not readable by this version."
            )
        self.manifest = manifest
        self.metadata = manifest.get("metadata", {})
        super().__init__(
            os.path.join(path, manifest.get("orbax_item", STATE_DIR)),
            config=config or stored,
            num_heads=num_heads,
            head_dim=head_dim,
        )
        self.path = path
        self.step = int(manifest.get("step", self.step or 0))

    def _load(self, key: str) -> np.ndarray:
        array = np.asarray(super()._load(key), dtype=np.float32, order="C")
        entry = self.manifest["params"].get(key)
        if entry is None:
            raise CorruptCheckpointError(f"{self.path}: {MANIFEST} has no entry for {key!r}.")
        crc = zlib.crc32(memoryview(array).cast("B"))
        if crc != entry["crc32"] or list(array.shape) != entry["shape"]:
            leaf = os.path.join(self.path, STATE_DIR, ".".join((PARAMS_KEY, *key.split("/"))))
            raise CorruptCheckpointError(
                f"{leaf}: data of parameter {key!r} does not match its checksum in "
                f"{MANIFEST} (corrupted or partially copied chunk files)."
            )
        return array
