"""Recognises which checkpoint format a path holds (without reading tensors)."""

from __future__ import annotations

import os
import re

from gqa_t5x.checkpoints import huggingface, mesh_tf, native, orbax_io, t5x_legacy, zarr_io
from gqa_t5x.checkpoints.base import CheckpointError

LOOKED_FOR = (
    f"{native.MANIFEST} (gqa_t5x); config.json + "
    f"{'/'.join(huggingface.WEIGHT_FILES)} (HuggingFace); a msgpack 'checkpoint' "
    f"file (T5X legacy); {orbax_io.METADATA_FILE} here or in state/ (Orbax); "
    f"a TensorFlow '<prefix>.index' or 'checkpoint' state file (Mesh TF)"
)


def _gcs_exists(url: str) -> bool:
    import tensorstore as ts

    bucket, key = zarr_io.split_gcs(url)
    try:
        store = ts.KvStore.open({"driver": "gcs", "bucket": bucket}).result()
        return store.read(key).result().state == "value"
    except Exception:
        return False


def _msgpack_kind(file: str) -> str | None:
    """'t5x_legacy' or 't5x_orbax' for a msgpack `checkpoint` file, else None."""
    if not t5x_legacy.is_msgpack_map(file):
        return None
    if orbax_io.is_pytree_dir(os.path.dirname(os.path.abspath(file))):
        return "t5x_orbax"
    return "t5x_legacy"


def detect_format(path: str | os.PathLike) -> tuple[str, str] | None:
    """Identifies the checkpoint at `path`.

    Args:
      path: a checkpoint directory, or a file inside it that names it (the
        T5X `checkpoint` file, a TF `.index` file or prefix, a HuggingFace
        `config.json` / weights file, our manifest).

    Returns:
      (format, path to open) or None when nothing is recognised.

    Raises:
      CheckpointError: the path is ambiguous (e.g. several TF checkpoints).
    """
    path = os.fspath(path)
    if path.startswith("gs://"):
        file = path if path.rstrip("/").endswith("/checkpoint") else path.rstrip("/") + "/checkpoint"
        return ("t5x_legacy", path) if _gcs_exists(file) else None
    if not os.path.exists(path):
        prefix = mesh_tf.find_prefix(path)
        return ("mesh_tf", prefix) if prefix else None
    if os.path.isfile(path):
        base, parent = os.path.basename(path), os.path.dirname(os.path.abspath(path))
        if base == native.MANIFEST:
            return "gqa_t5x", parent
        if base.endswith(".index") and not base.endswith(".index.json"):
            return ("mesh_tf", path[: -len(".index")]) if mesh_tf.find_prefix(path) else None
        if base == "checkpoint":
            kind = _msgpack_kind(path)
            if kind == "t5x_legacy":
                return kind, parent
            if kind == "t5x_orbax":
                return kind, parent
            prefix = mesh_tf.find_prefix(parent)
            return ("mesh_tf", prefix) if prefix else None
        if base == orbax_io.METADATA_FILE and orbax_io.is_pytree_dir(parent):
            return "t5x_orbax", parent
        if huggingface.is_hf_dir(parent) and (
            base == "config.json" or base.endswith((".safetensors", ".bin", ".index.json"))
        ):
            return "huggingface", parent
        return None
    if native.is_native(path):
        return "gqa_t5x", path
    if huggingface.is_hf_dir(path):
        return "huggingface", path
    kind = _msgpack_kind(os.path.join(path, "checkpoint"))
    if kind is not None:
        return kind, path
    if orbax_io.find_pytree_dir(path) is not None:
        return "t5x_orbax", path
    prefix = mesh_tf.find_prefix(path)
    if prefix is not None:
        return "mesh_tf", prefix
    return None


def not_found_message(path: str) -> str:
    """Error text for a path holding no recognised checkpoint."""
    hint = ""
    if os.path.isdir(path):
        steps = sorted(
            (int(m.group(1)), d)
            for d in os.listdir(path)
            if (m := re.fullmatch(r"checkpoint_(\d+)", d)) and os.path.isdir(os.path.join(path, d))
        )
        if steps:
            hint = (
                f" It holds {len(steps)} step directories; pass one of them, e.g. the "
                f"latest {os.path.join(path, steps[-1][1])}."
            )
    elif not os.path.exists(path):
        hint = " The path does not exist."
    return f"No checkpoint found at {path}: looked for {LOOKED_FOR}.{hint}"


def safe_detect(path: str | os.PathLike) -> tuple[str, str] | None:
    """`detect_format` that answers None instead of raising."""
    try:
        return detect_format(path)
    except (CheckpointError, OSError):
        return None
