"""Reading every public T5 checkpoint format and writing ours.

    reader = open_checkpoint(path)          # format detected, config inferred
    reader.keys(); reader.shape(k); reader.read(k)   # one tensor at a time
    config, params = load(path)             # everything, nested dict

    with CheckpointWriter(out, config, step=step) as w:   # streaming, atomic
        for k in reader.keys():
            w.write(k, reader.read(k))

Formats read: 't5x_legacy' (msgpack + tensorstore), 't5x_orbax' (Orbax
PyTree), 'mesh_tf' (TensorFlow bundle), 'huggingface' (safetensors / .bin),
'gqa_t5x' (ours: an Orbax PyTree + config + manifest). See
docs/checkpoints.md.
"""

from __future__ import annotations

import os

from gqa_t5x.model.config import T5Config
from gqa_t5x.model import param_tree
from gqa_t5x.checkpoints.base import (
    FORMATS,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointReader,
    CorruptCheckpointError,
    check_shapes,
    infer_config,
)
from gqa_t5x.checkpoints.detect import detect_format, not_found_message, safe_detect
from gqa_t5x.checkpoints.huggingface import HuggingFaceReader
from gqa_t5x.checkpoints.mesh_tf import MeshTFReader
from gqa_t5x.checkpoints.native import CheckpointWriter, NativeReader, save
from gqa_t5x.checkpoints.orbax_io import OrbaxReader, read_orbax_tree
from gqa_t5x.checkpoints.t5x_legacy import T5XLegacyReader, read_t5x_legacy_tree

_READERS = {
    "t5x_legacy": T5XLegacyReader,
    "t5x_orbax": OrbaxReader,
    "mesh_tf": MeshTFReader,
    "huggingface": HuggingFaceReader,
    "gqa_t5x": NativeReader,
}


def open_checkpoint(
    path: str | os.PathLike,
    *,
    config: T5Config | None = None,
    head_dim: int | None = None,
    num_heads: int | None = None,
) -> CheckpointReader:
    """Opens a checkpoint of any supported format for lazy reading.

    Args:
      path: checkpoint directory (or a file naming it: T5X `checkpoint`, a TF
        prefix or `.index`, HuggingFace `config.json`, our manifest).
      config: the expected config; tensor shapes are checked against it
        instead of inferring one.
      head_dim: width of an attention head, for checkpoints whose head count
        cannot be read from the tensors.
      num_heads: number of query heads, likewise.

    Returns:
      A `CheckpointReader` (index read, no tensor loaded yet).

    Raises:
      CheckpointNotFoundError: nothing recognised at `path`.
      CheckpointError: config/shape mismatch, missing or unexpected parameters.
      CorruptCheckpointError: unreadable or truncated files (named).
    """
    path = os.fspath(path)
    found = detect_format(path)
    if found is None:
        raise CheckpointNotFoundError(not_found_message(path))
    fmt, resolved = found
    return _READERS[fmt](resolved, config=config, num_heads=num_heads, head_dim=head_dim)


def load(
    path: str | os.PathLike,
    *,
    config: T5Config | None = None,
    head_dim: int | None = None,
    num_heads: int | None = None,
) -> tuple[T5Config, dict]:
    """Reads a whole checkpoint into memory.

    Args:
      path, config, head_dim, num_heads: as for `open_checkpoint`.

    Returns:
      (config, params): params is the nested dict `{'token_embedder': ...,
      'encoder': ..., 'decoder': ...}` of float32 numpy arrays with
      `param_tree.param_shapes(config)`.
    """
    with open_checkpoint(path, config=config, head_dim=head_dim, num_heads=num_heads) as reader:
        flat = {key: reader.read(key) for key in reader.keys()}
        return reader.config, param_tree.unflatten(flat)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` holds a checkpoint of a supported format."""
    return safe_detect(path) is not None


__all__ = [
    "FORMATS",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "CheckpointWriter",
    "CorruptCheckpointError",
    "HuggingFaceReader",
    "MeshTFReader",
    "NativeReader",
    "OrbaxReader",
    "T5XLegacyReader",
    "check_shapes",
    "detect_format",
    "infer_config",
    "is_checkpoint",
    "load",
    "open_checkpoint",
    "read_orbax_tree",
    "read_t5x_legacy_tree",
    "save",
]
