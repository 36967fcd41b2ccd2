"""Tensorstore/zarr (v2) arrays as T5X and Orbax store them, one array at a time.

T5X legacy checkpoints keep large leaves as zarr arrays whose tensorstore spec
sits in the msgpack file with a path relative to the checkpoint directory;
Orbax (non-OCDBT) and our own format keep one zarr array per leaf. This module
resolves such specs (local paths and `gs://` buckets, through
`storage.paths.kvstore_spec`; opened with `storage.paths.tensorstore_context`,
which carries the gs:// retry policy), reads an array with clear errors
(naming the array's directory) and writes one.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorstore as ts

from gqa_t5x.checkpoints.base import CheckpointError, CorruptCheckpointError
from gqa_t5x.storage import paths
from gqa_t5x.storage.paths import Path, PathLike

# Chunks of about this many bytes (split along the first axis); T5X uses 64 MiB.
CHUNK_BYTES = 64 * 1024 * 1024
# Orbax's default zarr v2 compressor.
COMPRESSOR = {"id": "zstd", "level": 1}

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def resolve_tensorstore_spec(spec: Mapping[str, Any], checkpoint_dir: PathLike | Path) -> dict[str, Any]:
    """Makes the relative path of a T5X tensorstore spec absolute.

    T5X writes `{'driver': 'zarr', 'kvstore': {'driver': 'gfile'|'file'|'gcs',
    'path': 'target.encoder.layers_0...'}, ...}` (older tensorstore put 'path'
    at the top level). The path is relative to the directory holding the
    msgpack `checkpoint` file. A `gs://` checkpoint directory selects
    tensorstore's gcs driver with that bucket; a local one the file driver.

    Args:
      spec: the spec dict found in the msgpack file.
      checkpoint_dir: local directory or gs:// URL of the checkpoint.

    Returns:
      A new spec dict whose kvstore points at the array's directory.
    """
    spec = copy.deepcopy(dict(spec))
    kv = spec.get("kvstore")
    if isinstance(kv, Mapping) and "path" in kv:
        relative = kv["path"]
        driver = kv.get("driver")
    elif "path" in spec:  # tensorstore < 0.1.14 layout
        relative = spec.pop("path")
        driver = kv.get("driver") if isinstance(kv, Mapping) else kv
    else:
        raise CheckpointError(
            f"Tensorstore spec without a 'path' (in the spec or its kvstore): {spec}."
        )
    if driver not in ("file", "gfile", "gcs", None):
        raise CheckpointError(
            f"Unsupported tensorstore kvstore driver {driver!r} in spec {spec}; "
            f"T5X writes 'file', 'gfile' or 'gcs'."
        )
    spec["kvstore"] = kvstore_for(paths.as_path(checkpoint_dir) / relative)
    return spec


def kvstore_for(directory: PathLike | Path) -> dict[str, Any]:
    """The tensorstore kvstore of a zarr array directory (local or gs://)."""
    kvstore = paths.kvstore_spec(directory)
    kvstore["path"] = kvstore["path"].rstrip("/") + "/"
    return kvstore


def describe(spec: Mapping[str, Any]) -> str:
    """Human-readable location of a zarr array spec (for error messages)."""
    kv = spec.get("kvstore", {})
    if kv.get("driver") == "gcs":
        return f"gs://{kv.get('bucket')}/{kv.get('path')}"
    return str(kv.get("path"))


def _list_keys(kvstore: Mapping[str, Any]) -> list[str]:
    store = ts.KvStore.open(dict(kvstore), context=paths.tensorstore_context()).result()
    return [k.decode() if isinstance(k, bytes) else str(k) for k in store.list().result()]


def _read_key(kvstore: Mapping[str, Any], key: str) -> bytes | None:
    store = ts.KvStore.open(dict(kvstore), context=paths.tensorstore_context()).result()
    result = store.read(key).result()
    return bytes(result.value) if result.state == "value" else None


def _sniff_compressor(data: bytes, raw_nbytes: int, where: str) -> dict[str, Any] | None:
    if data.startswith(_GZIP_MAGIC):
        return {"id": "gzip"}
    if data.startswith(_ZSTD_MAGIC):
        return {"id": "zstd"}
    if len(data) == raw_nbytes:
        return None
    raise CorruptCheckpointError(
        f"{where}: cannot identify the compression of chunk data ({len(data)} "
        f"bytes, neither gzip, zstd nor raw {raw_nbytes} bytes)."
    )


def read_zarr(
    spec: Mapping[str, Any],
    *,
    name: str,
    shape: tuple[int, ...] | None = None,
    dtype: Any = None,
) -> np.ndarray:
    """Reads a whole zarr v2 array.

    When the array's `.zarray` file is absent (as in T5X's own test data) the
    metadata recorded in `spec` (shape, chunks, dtype, compressor) or the
    given `shape`/`dtype` are used instead (tensorstore's `assume_metadata`);
    a single-chunk layout and the compressor are then read off the chunk file.

    Args:
      spec: zarr spec with an absolute kvstore (see `resolve_tensorstore_spec`).
      name: the leaf's name, used in errors.
      shape: expected shape (checked; also used when `.zarray` is missing).
      dtype: dtype to use when neither `.zarray` nor the spec records one.

    Returns:
      The array as numpy, in its stored dtype.

    Raises:
      CorruptCheckpointError: no data, unreadable/truncated chunks, shape mismatch.
    """
    spec = copy.deepcopy(dict(spec))
    where = describe(spec)
    kvstore = spec["kvstore"]
    try:
        keys = _list_keys(kvstore)
    except Exception as e:  # tensorstore raises ValueError subclasses
        raise CorruptCheckpointError(f"{name}: cannot list the array directory {where}: {e}") from e
    chunk_keys = sorted(k for k in keys if not k.startswith("."))
    metadata = dict(spec.get("metadata") or {})
    has_zarray = ".zarray" in keys
    if has_zarray:
        raw = _read_key(kvstore, ".zarray")
        try:
            stored = json.loads(raw or b"")
        except ValueError as e:
            raise CorruptCheckpointError(f"{name}: unreadable {where}.zarray: {e}") from e
        stored_shape = tuple(stored.get("shape", ()))
        if "shape" in metadata and tuple(metadata["shape"]) != stored_shape:
            raise CorruptCheckpointError(
                f"{name}: {where}.zarray has shape {stored_shape} but the checkpoint "
                f"index records {tuple(metadata['shape'])}."
            )
        # Let .zarray govern chunking/compression (they may legitimately differ).
        spec["metadata"] = {"shape": list(stored_shape)}
        open_kwargs: dict[str, Any] = {}
        array_shape = stored_shape
    else:
        array_shape = tuple(metadata.get("shape", shape if shape is not None else ()))
        if "shape" not in metadata and shape is None:
            raise CorruptCheckpointError(
                f"{name}: {where} has no .zarray metadata file and its shape is "
                f"not recorded elsewhere."
            )
        if "dtype" not in spec and "dtype" not in metadata:
            if dtype is None:
                raise CorruptCheckpointError(
                    f"{name}: {where} has no .zarray metadata file and its dtype is "
                    f"not recorded elsewhere."
                )
            spec["dtype"] = np.dtype(dtype).name
        metadata["shape"] = list(array_shape)
        if "chunks" not in metadata:
            if len(chunk_keys) > 1:
                raise CorruptCheckpointError(
                    f"{name}: {where} has no .zarray and {len(chunk_keys)} chunk "
                    f"files; the chunk shape cannot be recovered."
                )
            metadata["chunks"] = list(array_shape)
        if "compressor" not in metadata and chunk_keys:
            dt = np.dtype(spec.get("dtype") or metadata.get("dtype"))
            nbytes = math.prod(metadata["chunks"]) * dt.itemsize
            first = _read_key(kvstore, chunk_keys[0]) or b""
            metadata["compressor"] = _sniff_compressor(first, nbytes, where + chunk_keys[0])
        spec["metadata"] = metadata
        open_kwargs = {"assume_metadata": True}
    if shape is not None and tuple(shape) != tuple(array_shape):
        raise CorruptCheckpointError(
            f"{name}: array at {where} has shape {tuple(array_shape)}, expected "
            f"{tuple(shape)}."
        )
    if not chunk_keys and math.prod(array_shape) > 0:
        raise CorruptCheckpointError(
            f"{name}: no chunk data in {where} (the array directory is empty or "
            f"missing; was the checkpoint copied completely?)."
        )
    try:
        store = ts.open(spec, open=True, read=True, context=paths.tensorstore_context(), **open_kwargs).result()
        return np.asarray(store.read().result())
    except Exception as e:
        raise CorruptCheckpointError(
            f"{name}: cannot read the zarr array at {where} (truncated or "
            f"corrupted chunk file?): {e}"
        ) from e


def write_zarr(directory: PathLike | Path, array: np.ndarray, *, chunk_bytes: int = CHUNK_BYTES) -> None:
    """Writes `array` as a zarr v2 array (zstd, chunks split along axis 0).

    Every chunk is stored, even all-zero ones, so a missing chunk file is
    always an error on read, never a silent zero.

    Args:
      directory: the array's directory, local or gs:// (created).
      array: the data, written in its own dtype.
      chunk_bytes: target bytes per chunk.
    """
    array = np.asarray(array, order="C")
    shape = list(array.shape)
    chunks = list(shape)
    if shape and array.nbytes > chunk_bytes:
        row_bytes = max(1, array.nbytes // max(1, shape[0]))
        chunks[0] = max(1, chunk_bytes // row_bytes)
    spec = {
        "driver": "zarr",
        "kvstore": kvstore_for(directory),
        "metadata": {
            "shape": shape,
            "chunks": [max(1, c) for c in chunks],
            "dtype": array.dtype.str,
            "compressor": dict(COMPRESSOR),
        },
        "store_data_equal_to_fill_value": True,
    }
    store = ts.open(spec, create=True, open=False, context=paths.tensorstore_context()).result()
    store.write(array).result()
