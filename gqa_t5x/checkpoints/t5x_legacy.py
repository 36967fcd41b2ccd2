"""T5X legacy checkpoints: `checkpoint_<step>/checkpoint` (msgpack) + zarr arrays.

Layout written by T5X (`t5x/checkpoints.py`, VERSION 3):

    checkpoint_<step>/
      checkpoint                       msgpack: {'version': 3, 'optimizer':
                                         {'target': params, 'state': {'step',
                                         'param_states': {...}}}}
      target.encoder.layers_0.attention.query.kernel/   zarr array (large leaves)
      ...

A leaf of the msgpack tree is either inline - flax's msgpack extension type 1
(ndarray) or 3 (numpy scalar), whose payload is itself msgpack
`(shape, dtype_name, raw C-order bytes)` (arrays above 1 GiB are split by
flax into `{'__msgpack_chunked_array__': True, 'shape': ..., 'chunks': ...}`)
- or a tensorstore spec dict (`{'driver': 'zarr', 'kvstore': {...,
'path': <relative>}, 'metadata': ..., 'dtype': ...}`). Version 2 stored
bfloat16 as uint16 (converted back here); version 0 has no 'optimizer' level.

The msgpack file is indexed without decoding tensors: a small structural
scanner records where each inline array's bytes lie (the file is memory
mapped), so reading one parameter touches only that parameter's bytes.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from typing import Any

import msgpack
import numpy as np

from gqa_t5x.checkpoints import registry, zarr_io
from gqa_t5x.checkpoints.base import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReader,
    CorruptCheckpointError,
)
from gqa_t5x.model.config import T5Config
from gqa_t5x.storage import paths
from gqa_t5x.storage.paths import Path, PathLike

FORMAT = "t5x_legacy"
CHECKPOINT_FILE = "checkpoint"

_EXT_NDARRAY = 1
_EXT_NPSCALAR = 3
_CHUNKED = "__msgpack_chunked_array__"


# ------------------------------------------------------------- lazy leaves
class InlineArray:
    """An array stored inside the msgpack file (read on demand)."""

    def __init__(self, buf: Any, offset: int, shape: tuple[int, ...], dtype: np.dtype, scalar: bool, source: str):
        self.buf, self.offset, self.shape, self.dtype = buf, offset, shape, dtype
        self.scalar, self.source = scalar, source

    def read(self) -> np.ndarray:
        count = math.prod(self.shape)
        view = np.frombuffer(self.buf, dtype=self.dtype, count=count, offset=self.offset)
        out = view.reshape(self.shape).copy()  # one copy; the mapping is released
        del view
        return out


class ChunkedInlineArray:
    """A >1 GiB inline array that flax split into flat chunks."""

    def __init__(self, shape: tuple[int, ...], chunks: list[InlineArray]):
        self.shape, self.chunks = shape, chunks
        self.dtype = chunks[0].dtype if chunks else np.dtype(np.float32)

    def read(self) -> np.ndarray:
        flat = np.concatenate([c.read().reshape(-1) for c in self.chunks])
        return flat.reshape(self.shape)


class TensorstoreLeaf:
    """A leaf stored as a zarr array next to the msgpack file."""

    def __init__(self, spec: dict[str, Any], name: str):
        self.spec, self.name = spec, name
        meta = spec.get("metadata") or {}
        self.shape = tuple(meta.get("shape", ()))
        self.dtype = np.dtype(_dtype_from_name(spec.get("dtype") or meta.get("dtype") or "float32"))

    def read(self) -> np.ndarray:
        return zarr_io.read_zarr(self.spec, name=self.name, shape=self.shape)


def _dtype_from_name(name: Any) -> Any:
    if isinstance(name, bytes):
        name = name.decode()
    if name == "bfloat16":
        import ml_dtypes  # jax dependency

        return ml_dtypes.bfloat16
    return np.dtype(name)


# --------------------------------------------------------- msgpack scanner
class _Scanner:
    """Walks msgpack bytes, decoding structure but not array payloads."""

    def __init__(self, buf: Any, source: str):
        self.buf, self.source, self.n = buf, source, len(buf)

    def _need(self, pos: int, count: int) -> None:
        if pos + count > self.n:
            raise CorruptCheckpointError(
                f"{self.source}: msgpack data is truncated (needs byte {pos + count} "
                f"of a {self.n}-byte file)."
            )

    def _uint(self, pos: int, size: int) -> int:
        self._need(pos, size)
        return int.from_bytes(self.buf[pos : pos + size], "big")

    def _decode_slice(self, start: int, end: int) -> Any:
        try:
            return msgpack.unpackb(bytes(self.buf[start:end]), raw=False, strict_map_key=False)
        except Exception as e:
            raise CorruptCheckpointError(f"{self.source}: corrupted msgpack value at byte {start}: {e}") from e

    def skip(self, pos: int) -> int:
        """Returns the position after the value starting at `pos`."""
        self._need(pos, 1)
        b = self.buf[pos]
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            return pos + 1
        if 0x80 <= b <= 0x8F:
            return self._skip_items(pos + 1, 2 * (b & 0x0F))
        if 0x90 <= b <= 0x9F:
            return self._skip_items(pos + 1, b & 0x0F)
        if 0xA0 <= b <= 0xBF:
            return self._end(pos + 1, b & 0x1F)
        fixed = {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
        if b in fixed:
            return self._end(pos + 1, fixed[b])
        if b in (0xC4, 0xD9):
            return self._end(pos + 2, self._uint(pos + 1, 1))
        if b in (0xC5, 0xDA):
            return self._end(pos + 3, self._uint(pos + 1, 2))
        if b in (0xC6, 0xDB):
            return self._end(pos + 5, self._uint(pos + 1, 4))
        if b in (0xD4, 0xD5, 0xD6, 0xD7, 0xD8):
            return self._end(pos + 2, 1 << (b - 0xD4))
        if b in (0xC7, 0xC8, 0xC9):
            size = {0xC7: 1, 0xC8: 2, 0xC9: 4}[b]
            return self._end(pos + 2 + size, self._uint(pos + 1, size))
        if b in (0xDC, 0xDD):
            size = 2 if b == 0xDC else 4
            return self._skip_items(pos + 1 + size, self._uint(pos + 1, size))
        if b in (0xDE, 0xDF):
            size = 2 if b == 0xDE else 4
            return self._skip_items(pos + 1 + size, 2 * self._uint(pos + 1, size))
        raise CorruptCheckpointError(f"{self.source}: invalid msgpack type byte 0x{b:02x} at byte {pos}.")

    def _end(self, start: int, length: int) -> int:
        self._need(start, length)
        return start + length

    def _skip_items(self, pos: int, count: int) -> int:
        for _ in range(count):
            pos = self.skip(pos)
        return pos

    def map_header(self, pos: int) -> tuple[int, int] | None:
        """(entries, first entry position) if a map starts at `pos`."""
        self._need(pos, 1)
        b = self.buf[pos]
        if 0x80 <= b <= 0x8F:
            return b & 0x0F, pos + 1
        if b == 0xDE:
            return self._uint(pos + 1, 2), pos + 3
        if b == 0xDF:
            return self._uint(pos + 1, 4), pos + 5
        return None

    def ext_header(self, pos: int) -> tuple[int, int, int] | None:
        """(code, payload start, payload length) if an ext value starts at `pos`."""
        self._need(pos, 1)
        b = self.buf[pos]
        if 0xD4 <= b <= 0xD8:
            self._need(pos, 2)
            return struct.unpack(">b", self.buf[pos + 1 : pos + 2])[0], pos + 2, 1 << (b - 0xD4)
        if b in (0xC7, 0xC8, 0xC9):
            size = {0xC7: 1, 0xC8: 2, 0xC9: 4}[b]
            length = self._uint(pos + 1, size)
            code = struct.unpack(">b", self.buf[pos + 1 + size : pos + 2 + size])[0]
            return code, pos + 2 + size, length
        return None

    def parse(self, pos: int, path: str) -> tuple[Any, int]:
        """Parses the value at `pos` into a tree with lazy array leaves."""
        header = self.map_header(pos)
        if header is not None:
            count, cur = header
            out: dict[str, Any] = {}
            for _ in range(count):
                key_end = self.skip(cur)
                key = self._decode_slice(cur, key_end)
                key = key.decode() if isinstance(key, bytes) else str(key)
                value, cur = self.parse(key_end, f"{path}/{key}" if path else key)
                out[key] = value
            if out.get(_CHUNKED) is True:
                return self._chunked(out, path), cur
            return out, cur
        ext = self.ext_header(pos)
        if ext is not None and ext[0] in (_EXT_NDARRAY, _EXT_NPSCALAR):
            code, start, length = ext
            self._need(start, length)
            return self._inline(start, length, code == _EXT_NPSCALAR, path), start + length
        end = self.skip(pos)
        return self._decode_slice(pos, end), end

    def _inline(self, start: int, length: int, scalar: bool, path: str) -> InlineArray:
        # Payload: msgpack array (shape, dtype_name, bin bytes).
        end = start + length
        b = self.buf[start]
        if b != 0x93:
            raise CorruptCheckpointError(f"{self.source}: malformed array payload for {path!r} at byte {start}.")
        shape_end = self.skip(start + 1)
        dtype_end = self.skip(shape_end)
        shape = self._decode_slice(start + 1, shape_end)
        dtype_name = self._decode_slice(shape_end, dtype_end)
        tag = self.buf[dtype_end]
        sizes = {0xC4: 1, 0xC5: 2, 0xC6: 4}
        if tag not in sizes:
            raise CorruptCheckpointError(f"{self.source}: malformed array payload for {path!r}.")
        nbytes = self._uint(dtype_end + 1, sizes[tag])
        data_start = dtype_end + 1 + sizes[tag]
        try:
            dtype = np.dtype(_dtype_from_name(dtype_name))
        except TypeError as e:
            raise CorruptCheckpointError(f"{self.source}: unknown dtype {dtype_name!r} for {path!r}.") from e
        shape = tuple(int(s) for s in shape)
        if data_start + nbytes != end or nbytes != math.prod(shape) * dtype.itemsize:
            raise CorruptCheckpointError(
                f"{self.source}: array {path!r} declares shape {shape} {dtype} but "
                f"holds {nbytes} bytes (corrupted file)."
            )
        self._need(data_start, nbytes)
        return InlineArray(self.buf, data_start, shape, dtype, scalar, self.source)

    def _chunked(self, node: dict[str, Any], path: str) -> ChunkedInlineArray:
        try:
            shape = tuple(int(node["shape"][str(i)]) for i in range(len(node["shape"])))
            chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
        except (KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"{self.source}: malformed chunked array {path!r}.") from e
        return ChunkedInlineArray(shape, chunks)


# ------------------------------------------------------------- file access
def _map_file(path: Path) -> Any:
    """Memory-maps a local file or reads an object-storage file; returns a buffer."""
    if paths.is_remote(path):
        if not path.is_file():
            raise CheckpointNotFoundError(f"No T5X checkpoint file at {path}.")
        return memoryview(path.read_bytes())
    with open(os.fspath(path), "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise CorruptCheckpointError(f"{path}: the checkpoint file is empty.")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def scan_msgpack_file(file: PathLike | Path) -> Any:
    """Parses a msgpack file into a tree with lazy array leaves.

    Tensorstore specs are left as dicts (not resolved). A local file is memory
    mapped; leaves keep the mapping alive while referenced.
    """
    file = paths.as_path(file)
    buf = _map_file(file)
    scanner = _Scanner(buf, str(file))
    tree, end = scanner.parse(0, "")
    if end != len(buf):
        raise CorruptCheckpointError(
            f"{file}: {len(buf) - end} unexpected trailing bytes after the msgpack tree."
        )
    return tree


def checkpoint_file(path: PathLike | Path) -> Path:
    """The msgpack file of a T5X checkpoint given its directory or the file."""
    path = paths.as_path(path)
    if path.name != CHECKPOINT_FILE or path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointNotFoundError(f"No T5X msgpack '{CHECKPOINT_FILE}' file at {path}.")
    return path


def is_msgpack_map(path: PathLike | Path) -> bool:
    """True when `path` is a file that starts like a msgpack map."""
    path = paths.as_path(path)
    try:
        if not path.is_file():
            return False
        with path.open("rb") as f:
            head = f.read(1)
    except OSError:
        return False
    return bool(head) and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF))


def detect(path: Path) -> Path | None:
    """The checkpoint directory when `path` is one with a msgpack `checkpoint`
    file (or that file itself)."""
    if path.name == CHECKPOINT_FILE and is_msgpack_map(path):
        return path.parent
    if is_msgpack_map(path / CHECKPOINT_FILE):
        return path
    return None


def _attach(node: Any, ckpt_dir: Path, path: str, version: int) -> Any:
    """Replaces tensorstore spec dicts by lazy leaves, resolving their paths."""
    if isinstance(node, dict):
        if "driver" in node and "kvstore" in node or ("driver" in node and "path" in node):
            spec = zarr_io.resolve_tensorstore_spec(node, ckpt_dir)
            return TensorstoreLeaf(spec, f"{path} ({zarr_io.describe(spec)})")
        return {k: _attach(v, ckpt_dir, f"{path}/{k}" if path else k, version) for k, v in node.items()}
    return node


def index_t5x_legacy(path: PathLike | Path) -> tuple[dict[str, Any], int, Path, Any]:
    """Indexes a T5X legacy checkpoint without reading tensors.

    Args:
      path: the `checkpoint_<step>` directory or its `checkpoint` file (local or gs://).

    Returns:
      (tree, version, msgpack file path, buffer): the whole stored tree
      (including 'version' and 'optimizer') with `InlineArray` /
      `TensorstoreLeaf` leaves, and the mapped file they read from.
    """
    file = checkpoint_file(path)
    buf = _map_file(file)
    scanner = _Scanner(buf, str(file))
    if scanner.map_header(0) is None:
        raise CorruptCheckpointError(f"{file}: not a T5X msgpack checkpoint (no top-level map).")
    tree, end = scanner.parse(0, "")
    if end != len(buf):
        raise CorruptCheckpointError(
            f"{file}: {len(buf) - end} unexpected trailing bytes after the msgpack tree."
        )
    version = int(tree.get("version", 0)) if isinstance(tree.get("version", 0), int) else 0
    return _attach(tree, paths.absolute(file.parent), "", version), version, file, buf


def _materialise(node: Any, version: int) -> Any:
    if isinstance(node, dict):
        return {k: _materialise(v, version) for k, v in node.items()}
    if isinstance(node, (InlineArray, ChunkedInlineArray, TensorstoreLeaf)):
        array = node.read()
        return _from_v2(array, version)
    return node


def _from_v2(array: np.ndarray, version: int) -> np.ndarray:
    """Version-2 checkpoints stored bfloat16 bits as uint16."""
    if version <= 2 and array.dtype == np.uint16:
        import ml_dtypes

        return array.view(ml_dtypes.bfloat16)
    return array


def read_t5x_legacy_tree(path: PathLike | Path) -> dict[str, Any]:
    """Reads EVERYTHING in a T5X legacy checkpoint (params and optimizer state).

    For any T5X state, not only T5 models (e.g. T5X's toy test checkpoints).

    Args:
      path: the `checkpoint_<step>` directory or its `checkpoint` file.

    Returns:
      The stored nested dict ({'version': 3, 'optimizer': {'target': ...,
      'state': {...}}}) with numpy arrays in their stored dtypes (numpy
      scalars as 0-d arrays; version-2 uint16 leaves as bfloat16).
    """
    tree, version, _, buf = index_t5x_legacy(path)
    try:
        return _materialise(tree, version)
    finally:
        if isinstance(buf, mmap.mmap):
            buf.close()


def _flatten_leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(_flatten_leaves(v, f"{prefix}/{k}" if prefix else k))
    else:
        out[prefix] = node
    return out


class T5XLegacyReader(CheckpointReader):
    """Reads the model parameters (`optimizer/target`) of a T5X legacy checkpoint."""

    format = FORMAT

    def __init__(
        self,
        path: PathLike | Path,
        *,
        config: T5Config | None = None,
        num_heads: int | None = None,
        head_dim: int | None = None,
    ):
        tree, version, file, self._buf = index_t5x_legacy(path)
        super().__init__(file.parent)
        self.version = version
        try:
            self._index(tree, file, config=config, num_heads=num_heads, head_dim=head_dim)
        except BaseException:
            self.close()
            raise

    def _index(
        self,
        tree: dict[str, Any],
        file: Path,
        *,
        config: T5Config | None,
        num_heads: int | None,
        head_dim: int | None,
    ) -> None:
        version = self.version
        root = tree.get("optimizer", tree) if version >= 1 else tree
        if not isinstance(root, dict) or "target" not in root:
            raise CheckpointError(f"{file}: no 'optimizer/target' parameter tree in this T5X checkpoint.")
        leaves = _flatten_leaves(root["target"])
        bad = [k for k, v in leaves.items() if not isinstance(v, (InlineArray, ChunkedInlineArray, TensorstoreLeaf))]
        if bad:
            raise CheckpointError(f"{file}: target leaves {bad[:3]} are not arrays.")
        self._leaves = leaves
        step = root.get("state", {}).get("step") if isinstance(root.get("state"), dict) else None
        if isinstance(step, (InlineArray, TensorstoreLeaf)):
            step = step.read()
        self.step = int(np.asarray(step)) if step is not None else None
        shapes = {k: tuple(v.shape) for k, v in leaves.items()}
        self._setup(shapes, config=config, num_heads=num_heads, head_dim=head_dim)

    def _load(self, key: str) -> np.ndarray:
        return _from_v2(self._leaves[key].read(), self.version)

    def _close(self) -> None:
        self._leaves = {}
        if isinstance(self._buf, mmap.mmap):
            self._buf.close()


registry.register_format(
    registry.CheckpointFormat(
        name=FORMAT,
        doc="a msgpack 'checkpoint' file (the directory or the file)",
        detect=detect,
        reader=T5XLegacyReader,
    )
)
