"""Reading every public T5 checkpoint format and writing ours.

    reader = open_checkpoint(path)          # format detected, config inferred
    reader.keys(); reader.shape(k); reader.read(k)   # one tensor at a time
    config, params = load(path)             # everything, nested dict

    with CheckpointWriter(out, config, step=step) as w:   # streaming, atomic
        for k in reader.keys():
            w.write(k, reader.read(k))

Formats live in a registry (`registry.py`); each format module registers its
detection, reader and (optionally) exporter: 'gqa_t5x' (ours: an Orbax
PyTree + config + manifest), 'huggingface' (safetensors / .bin; export too),
't5x_legacy' (msgpack + tensorstore), 't5x_orbax' (Orbax PyTree), 'mesh_tf'
(TensorFlow bundle). Paths may be local or gs:// URLs. See
docs/checkpoints.md.
"""

from __future__ import annotations

# Importing a format module registers it, in import order (the order of
# `formats()` and of the list in "nothing found" messages).
from gqa_t5x.checkpoints import huggingface, mesh_tf, native, t5x_legacy, t5x_orbax  # noqa: F401
from gqa_t5x.checkpoints import steps, vocabulary
from gqa_t5x.checkpoints.base import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReader,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    check_shapes,
    infer_config,
)
from gqa_t5x.checkpoints.huggingface import (
    HuggingFaceReader,
    export_huggingface,
    export_huggingface_checkpoint,
)
from gqa_t5x.checkpoints.mesh_tf import MeshTFReader
from gqa_t5x.checkpoints.native import CheckpointWriter, NativeReader, save
from gqa_t5x.checkpoints.registry import (
    AmbiguousCheckpointError,
    CheckpointFormat,
    describe_existing,
    detect_format,
    format_names,
    formats,
    get_format,
    open_checkpoint,
    register_format,
)
from gqa_t5x.checkpoints.t5x_legacy import T5XLegacyReader, read_t5x_legacy_tree
from gqa_t5x.checkpoints.t5x_orbax import OrbaxReader, read_orbax_tree
from gqa_t5x.checkpoints.value_limits import MAX_ABS_VALUE, UnusualValuesError, check_tree, check_values
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config
from gqa_t5x.storage import DestinationExistsError
from gqa_t5x.storage.paths import Path, PathLike


def load(
    path: PathLike | Path,
    *,
    format: str | None = None,
    config: T5Config | None = None,
    head_dim: int | None = None,
    num_heads: int | None = None,
    allow_unusual_values: bool = False,
) -> tuple[T5Config, dict]:
    """Reads a whole checkpoint into memory.

    Args:
      path, format, config, head_dim, num_heads, allow_unusual_values: as
        for `open_checkpoint`.

    Returns:
      (config, params): params is the nested dict `{'token_embedder': ...,
      'encoder': ..., 'decoder': ...}` of float32 numpy arrays with
      `param_tree.param_shapes(config)`.
    """
    with open_checkpoint(path, format=format, config=config, head_dim=head_dim, num_heads=num_heads,
                         allow_unusual_values=allow_unusual_values) as reader:
        return reader.config, param_tree.unflatten(reader.read_many())


def is_checkpoint(path: PathLike | Path) -> bool:
    """True when `path` holds a complete checkpoint of exactly one format."""
    try:
        return detect_format(path) is not None
    except (CheckpointError, OSError):
        return False


__all__ = [
    "AmbiguousCheckpointError",
    "CheckpointError",
    "CheckpointFormat",
    "CheckpointNotFoundError",
    "MAX_ABS_VALUE",
    "CheckpointReader",
    "CheckpointWriter",
    "CorruptCheckpointError",
    "DestinationExistsError",
    "HuggingFaceReader",
    "IncompleteCheckpointError",
    "MeshTFReader",
    "NativeReader",
    "OrbaxReader",
    "T5XLegacyReader",
    "UnusualValuesError",
    "steps",
    "vocabulary",
    "check_shapes",
    "check_tree",
    "check_values",
    "describe_existing",
    "detect_format",
    "export_huggingface",
    "export_huggingface_checkpoint",
    "format_names",
    "formats",
    "get_format",
    "infer_config",
    "is_checkpoint",
    "load",
    "open_checkpoint",
    "read_orbax_tree",
    "read_t5x_legacy_tree",
    "register_format",
    "save",
]
