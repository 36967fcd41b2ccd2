"""HuggingFace tensor files: safetensors (read and write) and PyTorch `.bin` (read).

Safetensors are parsed here (8-byte little-endian header size, a JSON header
of {dtype, shape, data_offsets}, then raw little-endian data): opening reads
the header and checks it against the file size, so a truncated file fails at
once, naming the file; `read` seeks to one tensor (bfloat16 included, which
safetensors' numpy API lacks). Files are opened through the storage layer, so
gs:// works as well as local disk. `SafetensorsWriter` writes tensor by
tensor after computing the header from the shapes, holding one tensor.

PyTorch `.bin` files are loaded with `torch.load(weights_only=True)`: the
zip format (torch >= 1.6) memory-mapped, legacy (pre-zip) files whole, since
torch cannot map them. A pickle holding anything but tensors is refused with
our own message: torch's suggests disabling the safety check, which must
never reach the user. `.bin` files must be local.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from gqa_t5x.checkpoints.base import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
)
from gqa_t5x.storage import paths
from gqa_t5x.storage.paths import Path

# HuggingFace's preference order.
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
# safetensors dtype <-> numpy dtype name
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
# dtypes `SafetensorsWriter` writes: numpy name -> safetensors name
WRITE_DTYPES = {"float32": "F32", "bfloat16": "BF16"}


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class SafetensorsFile:
    """An open safetensors file; tensors are read on demand."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = path.open("rb")
        except OSError as e:
            raise CheckpointNotFoundError(f"Cannot open safetensors file {path}: {e}") from e
        try:
            self._index()
        except BaseException:
            self._file.close()
            raise

    def _index(self) -> None:
        f, path = self._file, self.path
        f.seek(0, 2)
        size = f.tell()
        f.seek(0)
        if size < 8:
            raise CorruptCheckpointError(f"{path}: truncated safetensors file ({size} bytes).")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise CorruptCheckpointError(
                f"{path}: truncated or corrupted safetensors file (header of "
                f"{header_len} bytes in a {size}-byte file)."
            )
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise CorruptCheckpointError(f"{path}: corrupted safetensors header: {e}") from e
        self._base = 8 + header_len
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        end_max = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = _np_dtype(_ST_DTYPES[info["dtype"]])
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise CorruptCheckpointError(f"{path}: bad safetensors entry for {name!r}: {info}") from e
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise CorruptCheckpointError(
                    f"{path}: tensor {name!r} {shape} {dtype} spans {end - begin} bytes "
                    f"(corrupted header)."
                )
            self.entries[name] = (dtype, shape, begin, end)
            end_max = max(end_max, end)
        if self._base + end_max > size:
            raise CorruptCheckpointError(
                f"{path}: truncated safetensors file: the header needs "
                f"{self._base + end_max} bytes but the file has {size}."
            )

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[name]
        self._file.seek(self._base + begin)
        data = self._file.read(end - begin)
        if len(data) != end - begin:
            raise CorruptCheckpointError(f"{self.path}: tensor {name!r} is cut short (file truncated?).")
        return np.frombuffer(data, dtype=dtype.newbyteorder("<")).reshape(shape)

    def close(self) -> None:
        self._file.close()


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, in the order given.

    Args:
      path: the file to create.
      tensors: (name, shape) of every tensor, in writing order.
      dtype: a key of `WRITE_DTYPES`.
      metadata: string metadata stored in the header.
    """

    def __init__(
        self,
        path: Path,
        tensors: list[tuple[str, tuple[int, ...]]],
        dtype: str,
        metadata: Mapping[str, str],
    ) -> None:
        if dtype not in WRITE_DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; choose one of {sorted(WRITE_DTYPES)}.")
        itemsize = _np_dtype(dtype).itemsize
        header: dict[str, Any] = {"__metadata__": dict(metadata)}
        offset = 0
        self._order = []
        for name, shape in tensors:
            size = math.prod(shape) * itemsize
            header[name] = {"dtype": WRITE_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._order.append((name, tuple(shape)))
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
        self._dtype = _np_dtype(dtype)
        self._next = 0
        self._file = path.open("wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)

    def write(self, name: str, array: np.ndarray) -> None:
        """Appends the next tensor (name and shape must be the expected ones)."""
        expected_name, shape = self._order[self._next]
        if name != expected_name or tuple(array.shape) != shape:
            raise ValueError(
                f"safetensors writer expected {expected_name!r} {shape}, got "
                f"{name!r} {tuple(array.shape)}."
            )
        bits = np.ascontiguousarray(array, dtype=self._dtype).reshape(-1).view(f"u{self._dtype.itemsize}")
        self._file.write(memoryview(bits.astype(f"<u{self._dtype.itemsize}", copy=False)).cast("B"))
        self._next += 1

    def close(self) -> None:
        """Closes the file.

        Raises:
          ValueError: not every tensor of the header was written.
        """
        self._file.close()
        if self._next != len(self._order):
            raise ValueError(f"safetensors file incomplete: {self._next} of {len(self._order)} tensors.")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def _torch_text(error: BaseException) -> str:
    """torch's reason, unless it advises weights_only=False (never passed on)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return "" if "weights_only" in str(error) else f": {type(error).__name__}: {text}"


class TorchStateDictFile:
    """A PyTorch state-dict file, loaded with `weights_only=True`."""

    def __init__(self, path: Path):
        self.path = path
        local = paths.local_file(path, purpose="reading PyTorch .bin weights")
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(
                f"{path}: reading PyTorch .bin weights needs torch (pip install "
                f"torch), or convert the model to safetensors."
            ) from e
        # Zip files (torch >= 1.6) are mapped; legacy pickles cannot be.
        mapped = zipfile.is_zipfile(local)
        try:
            state = torch.load(local, map_location="cpu", weights_only=True, mmap=mapped)
        except pickle.UnpicklingError:
            raise CheckpointError(
                f"{path}: refused to load: the pickle holds Python objects other than "
                f"tensors, which can run code when loaded (the file may be malicious). "
                f"Only plain tensor state dicts are read; get the weights as "
                f"model.safetensors instead."
            ) from None
        except Exception as e:
            reason = _torch_text(e)
            raise CorruptCheckpointError(
                f"{path}: unreadable PyTorch weights file (truncated or corrupted?){reason}"
            ) from (e if reason else None)
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors.")
        others = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
        if others:
            raise CheckpointError(
                f"{path}: refused: entries {others[:3]}{' ...' if len(others) > 3 else ''} are "
                f"not tensors; only plain tensor state dicts (as save_pretrained writes) are read."
            )
        self._state = state
        self.entries = {str(k): tuple(v.shape) for k, v in state.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name]

    def read(self, name: str) -> np.ndarray:
        import torch

        return self._state[name].detach().to(torch.float32).numpy()

    def close(self) -> None:
        self._state = {}


def is_weights_file(name: str) -> bool:
    """True for the name of a HuggingFace weights file or shard index."""
    return name.endswith((".safetensors", ".bin", ".index.json"))


def open_weights(directory: Path) -> tuple[dict[str, Any], list[Any]]:
    """Maps every tensor name to the open file that holds it.

    Args:
      directory: a HuggingFace model directory.

    Returns:
      (tensor name -> file, every opened file); files have `entries`,
      `shape(name)`, `read(name)` and `close()`.

    Raises:
      CheckpointNotFoundError: no weights file.
      CorruptCheckpointError: unreadable shard index, missing shard, or a
        tensor absent from the shard the index names.
    """
    for kind in WEIGHT_FILES:
        path = directory / kind
        if not path.is_file():
            continue
        opener = SafetensorsFile if "safetensors" in kind else TorchStateDictFile
        if not kind.endswith(".index.json"):
            single = opener(path)
            return {name: single for name in single.entries}, [single]
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"{path}: unreadable shard index: {e}") from e
        files: dict[str, Any] = {}
        try:
            for shard in sorted(set(weight_map.values())):
                shard_path = directory / shard
                if not shard_path.is_file():
                    raise CorruptCheckpointError(f"{path}: shard {shard_path} is missing.")
                files[shard] = opener(shard_path)
            by_name = {}
            for name, shard in weight_map.items():
                if name not in files[shard].entries:
                    raise CorruptCheckpointError(f"{path}: {name!r} is not in its shard {shard}.")
                by_name[name] = files[shard]
        except BaseException:
            for f in files.values():
                f.close()
            raise
        return by_name, list(files.values())
    raise CheckpointNotFoundError(f"No HuggingFace weights ({', '.join(WEIGHT_FILES)}) in {directory}.")
