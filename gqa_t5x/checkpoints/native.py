"""Our checkpoint format: an Orbax PyTree written one parameter at a time.

    <directory>/                       e.g. .../checkpoint_1050000
      gqa_t5x_checkpoint.json          manifest, written LAST: format, version,
                                       step, config, per parameter
                                       shape/dtype/crc32, metadata
      config.json                      T5Config.to_json() (for people and tools)
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

Streaming: `CheckpointWriter.write` compresses one array to storage and keeps
only its crc32; `commit` writes the small metadata files. Peak memory is the
array being written. Atomicity: `storage.AtomicDirectory` with the manifest
as completion marker; a directory with our layout but no manifest is an
incomplete checkpoint and is refused (it cannot be verified).
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from gqa_t5x.checkpoints import registry, zarr_io
from gqa_t5x.checkpoints.base import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)
from gqa_t5x.checkpoints.t5x_orbax import FORMAT as ORBAX_FORMAT
from gqa_t5x.checkpoints.t5x_orbax import OrbaxReader
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config
from gqa_t5x.storage import atomic, paths
from gqa_t5x.storage.paths import Path, PathLike

FORMAT = "gqa_t5x"
FORMAT_VERSION = 1
MANIFEST = "gqa_t5x_checkpoint.json"
CONFIG_JSON = "config.json"
CONFIG_GIN = "config.gin"
STATE_DIR = "state"
PARAMS_KEY = "target"
STEP_PATH = ("state", "step")
_PYTREE_HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"


def detect(path: Path) -> Path | None:
    """Our checkpoint directory at `path` (or its manifest).

    Raises:
      IncompleteCheckpointError: `path` has our layout (state/, config.json,
        config.gin) but no manifest: an interrupted write or partial copy.
    """
    if path.name == MANIFEST and path.is_file():
        return path.parent
    if (path / MANIFEST).is_file():
        return path
    if all((path / name).exists() for name in (STATE_DIR, CONFIG_JSON, CONFIG_GIN)):
        raise IncompleteCheckpointError(
            f"{path} has the {FORMAT} layout ({STATE_DIR}/, {CONFIG_JSON}, {CONFIG_GIN}) but "
            f"no {MANIFEST}, which is written last: the checkpoint is incomplete (an "
            f"interrupted write or a partial copy) and its data cannot be verified. "
            f"Copy it again completely, or rerun the conversion."
        )
    return None


def _orbax_tree_metadata(leaves: list[tuple[str, ...]]) -> dict[str, Any]:
    """Orbax `_METADATA` for numpy leaves stored as zarr v2 (no OCDBT)."""
    tree = {}
    for parts in leaves:
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


def _leaf_name(key: str) -> str:
    return ".".join((PARAMS_KEY, *key.split("/")))


class CheckpointWriter:
    """Streams parameters into a new checkpoint of our format, atomically.

    Usage:
      with CheckpointWriter(out_dir, config, step=step) as writer:
        for key in param_tree.param_shapes(config):
          writer.write(key, array)      # one parameter in memory at a time
      # committed here; an exception in the block leaves nothing at out_dir.

    Args:
      directory: destination directory of the checkpoint (local or gs://).
      config: config of the network; fixes the parameters and their shapes.
      step: training step recorded with the checkpoint.
      overwrite: replace a checkpoint at `directory` (locally only once the
        new one is complete). Without it an existing checkpoint is an error;
        a directory holding anything else is never replaced.
      metadata: JSON-serialisable dict stored in the manifest.

    Raises:
      CheckpointError: `config` is not a T5Config, `metadata` not JSON.
      FileExistsError: see `storage.check_destination`.
    """

    def __init__(
        self,
        directory: PathLike | Path,
        config: T5Config,
        *,
        step: int = 0,
        overwrite: bool = False,
        metadata: dict | None = None,
    ):
        if not isinstance(config, T5Config):
            raise CheckpointError(f"config must be a T5Config, got {type(config).__name__}.")
        try:
            self.metadata = json.loads(json.dumps(metadata or {}))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"metadata for {directory} is not JSON-serialisable: {e}") from e
        self.config = config
        self.step = int(step)
        self._shapes = param_tree.param_shapes(config)
        self._target = atomic.AtomicDirectory(
            directory, marker=MANIFEST, describe=registry.describe_existing, overwrite=overwrite
        )
        self.directory = self._target.destination
        self._state = self._target.path / STATE_DIR
        try:
            self._state.mkdir()
        except BaseException:
            self._target.abort()
            raise
        self._written: dict[str, dict[str, Any]] = {}
        self._init_ns = time.time_ns()

    def write(self, key: str, array: Any) -> None:
        """Writes one parameter to storage (nothing is kept in memory).

        Args:
          key: canonical T5X path from `param_tree.param_shapes(config)`.
          array: floating-point array (numpy/jax) of exactly that shape; stored
            as float32.

        Raises:
          CheckpointError: unknown or repeated key, wrong shape or dtype, or
            the writer was already committed/aborted.
        """
        if self._target.done:
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
        zarr_io.write_zarr(self._state / _leaf_name(key), array)
        self._written[key] = {
            "shape": list(array.shape),
            "dtype": "float32",
            "crc32": zlib.crc32(memoryview(array).cast("B")),
        }

    def commit(self) -> None:
        """Writes the metadata, then publishes the checkpoint (manifest last).

        Raises:
          CheckpointError: a parameter of the config was not written (nothing
            is published; more can be written, or `abort`).
          FileExistsError: something that may not be replaced appeared at the
            destination meanwhile.
        """
        if self._target.done:
            raise CheckpointError(f"{self.directory}: writer already committed or aborted.")
        missing = [k for k in self._shapes if k not in self._written]
        if missing:
            raise CheckpointError(
                f"{self.directory}: cannot commit, {len(missing)} parameter(s) were "
                f"not written, e.g. {missing[:3]}."
            )
        zarr_io.write_zarr(self._state / ".".join(STEP_PATH), np.asarray(self.step, np.int32))
        leaves = [(PARAMS_KEY, *k.split("/")) for k in self._shapes] + [STEP_PATH]
        paths.write_file(self._state / "_METADATA", json.dumps(_orbax_tree_metadata(leaves), indent=1))
        checkpoint_metadata = {
            "item_handlers": _PYTREE_HANDLER,
            "metrics": {},
            "performance_metrics": {},
            "init_timestamp_nsecs": self._init_ns,
            "commit_timestamp_nsecs": time.time_ns(),
            "custom_metadata": {},
        }
        paths.write_file(self._state / "_CHECKPOINT_METADATA", json.dumps(checkpoint_metadata, indent=1))
        paths.write_file(self._state / "commit_success.txt", f"Checkpoint commit was successful to {self.directory / STATE_DIR}")
        paths.write_file(self._target.path / CONFIG_JSON, self.config.to_json())
        paths.write_file(self._target.path / CONFIG_GIN, self.config.to_gin())
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "config": json.loads(self.config.to_json()),
            "orbax_item": STATE_DIR,
            "params_key": PARAMS_KEY,
            "params": {k: self._written[k] for k in self._shapes},
            "metadata": self.metadata,
        }
        self._target.publish(json.dumps(manifest, indent=1))

    def abort(self) -> None:
        """Deletes everything written so far; the destination is untouched."""
        self._target.abort()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None and not self._target.done:
            try:
                self.commit()
            except BaseException as error:
                self._target.__exit__(type(error), error, error.__traceback__)  # abort; a full disk named
                raise
            return
        self._target.__exit__(exc_type, exc, tb)  # abort (a no-op once published); a full disk named


def save(
    directory: PathLike | Path,
    config: T5Config,
    params: Mapping[str, Any],
    *,
    step: int = 0,
    overwrite: bool = False,
) -> None:
    """Saves a nested parameter dict (or flax `{'params': tree}`) in our format.

    Args:
      directory: destination checkpoint directory (local or gs://).
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
        raise CheckpointError(f"{directory}: params hold {unknown[:3]} which are not parameters of the config.")
    missing = [k for k in shapes if k not in flat]
    if missing:
        raise CheckpointError(f"{directory}: params lack {missing[:3]}, e.g. {missing[0]!r} {shapes[missing[0]]}.")
    with CheckpointWriter(directory, config, step=step, overwrite=overwrite) as writer:
        for key in shapes:
            writer.write(key, flat[key])


class NativeReader(OrbaxReader):
    """Reads our format: config and checksums from the manifest, data via Orbax."""

    format = FORMAT

    def __init__(
        self,
        path: PathLike | Path,
        *,
        config: T5Config | None = None,
        num_heads: int | None = None,
        head_dim: int | None = None,
    ):
        path = paths.as_path(path)
        manifest_file = path / MANIFEST
        if not manifest_file.is_file():
            raise CheckpointNotFoundError(f"No {FORMAT} checkpoint at {path} (no {MANIFEST}).")
        try:
            manifest = json.loads(manifest_file.read_text())
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(f"{manifest_file}: unreadable manifest: {e}") from e
        if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
            raise CorruptCheckpointError(
                f"{manifest_file}: format {manifest.get('format')!r} version "
                f"{manifest.get('format_version')!r} is not readable by this version."
            )
        stored = self._stored_config(path, manifest)
        super().__init__(
            path / manifest.get("orbax_item", STATE_DIR),
            config=config or stored,
            num_heads=num_heads,
            head_dim=head_dim,
        )
        self.manifest = manifest
        self.metadata = manifest.get("metadata", {})
        self.path = str(path)
        self.step = int(manifest.get("step", self.step or 0))

    @staticmethod
    def _stored_config(path: Path, manifest: Mapping[str, Any]) -> T5Config:
        """The config recorded in the manifest (older manifests: config.json)."""
        if "config" in manifest:
            where, text = path / MANIFEST, json.dumps(manifest["config"])
        else:
            where = path / CONFIG_JSON
            try:
                text = where.read_text()
            except OSError as e:
                raise CorruptCheckpointError(f"{where}: unreadable: {e}") from e
        try:
            return T5Config.from_json(text)
        except (ValueError, TypeError) as e:
            raise CorruptCheckpointError(f"{where}: not a {FORMAT} T5Config: {e}") from e

    def _load(self, key: str) -> np.ndarray:
        array = np.asarray(super()._load(key), dtype=np.float32, order="C")
        entry = self.manifest["params"].get(key)
        if entry is None:
            raise CorruptCheckpointError(f"{self.path}: {MANIFEST} has no entry for {key!r}.")
        crc = zlib.crc32(memoryview(array).cast("B"))
        if crc != entry["crc32"] or list(array.shape) != entry["shape"]:
            leaf = paths.as_path(self.path) / STATE_DIR / _leaf_name(key)
            raise CorruptCheckpointError(
                f"{leaf}: data of parameter {key!r} does not match its checksum in "
                f"{MANIFEST} (corrupted or partially copied chunk files)."
            )
        return array


registry.register_format(
    registry.CheckpointFormat(
        name=FORMAT,
        doc=f"{MANIFEST} (ours)",
        detect=detect,
        reader=NativeReader,
        # Our state/ is an Orbax tree, which Orbax detection finds too.
        supersedes=(ORBAX_FORMAT,),
    )
)
