"""HuggingFace T5 directories: `config.json` + safetensors or PyTorch weights.

Weights, in the order HuggingFace itself prefers them:
`model.safetensors.index.json` (shards), `model.safetensors`,
`pytorch_model.bin.index.json` (shards), `pytorch_model.bin`.

Safetensors files are parsed here (8-byte header size, JSON header, raw
little-endian data) and memory mapped, so each `read` copies one tensor
(bfloat16 included, which safetensors' numpy API lacks); sizes are checked
against the header when the file is opened, so a truncated file fails at
once, naming the file. PyTorch `.bin` files are opened with
`torch.load(weights_only=True, mmap=True)` (torch is needed only for them).

`nn.Linear` weights are `[out, in]`, the transpose of T5X kernels, and the
relative position bias is `[buckets, heads]`; `read` returns T5X layout.

Output projection. HuggingFace's T5 scales the decoder output by
d_model**-0.5 before `lm_head` when `scale_decoder_outputs` is true
(transformers >= 5) or, in older configs, when `tie_word_embeddings` is true
(T5.0). That is T5X's `logits_via_embedding=True` (which also divides by
sqrt(emb)) when `lm_head` is absent or equal to `shared`. Without scaling
the logits are `y @ lm_head.T`: T5X's `decoder/logits_dense/kernel` =
`lm_head.T`, or `shared.T` when transformers tied `lm_head` to `shared` and
saved only the latter (transformers 5 always ties at construction).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from gqa_t5x.model.config import T5Config
from gqa_t5x.model import param_tree
from gqa_t5x.checkpoints.base import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReader,
    CorruptCheckpointError,
)

WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
# HuggingFace feed_forward_proj -> T5X mlp_activations. HF's 'gated-gelu' is
# the tanh-approximated gelu ('gelu_new'), which is T5X's 'gelu'.
_ACTIVATIONS = {
    "relu": ("relu",),
    "gated-gelu": ("gelu", "linear"),
    "gated-gelu_new": ("gelu", "linear"),
    "gelu_new": ("gelu",),
    "gated-relu": ("relu", "linear"),
    "gated-silu": ("silu", "linear"),
    "silu": ("silu",),
}
_ALIASES = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_IGNORED = {
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    # HuggingFace ignores this one too (`_keys_to_ignore_on_load_unexpected`).
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
}
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def is_hf_dir(path: str) -> bool:
    """True for a directory with config.json and HuggingFace weight files."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES
    )


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class SafetensorsFile:
    """A memory-mapped safetensors file; tensors are copied out on demand."""

    def __init__(self, path: str):
        self.path = path
        try:
            f = open(path, "rb")
        except OSError as e:
            raise CheckpointNotFoundError(f"Cannot open safetensors file {path}: {e}") from e
        with f:
            size = os.fstat(f.fileno()).st_size
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
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
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
        raw = self._mmap[self._base + begin : self._base + end]
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)

    def close(self) -> None:
        self._mmap.close()


class _TorchFile:
    """A PyTorch state-dict file opened lazily (memory mapped)."""

    def __init__(self, path: str):
        self.path = path
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(
                f"{path}: reading PyTorch .bin weights needs torch (pip install "
                f"torch), or convert the model to safetensors."
            ) from e
        try:
            self._sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CorruptCheckpointError(f"{path}: unreadable PyTorch weights file (truncated or corrupted?): {e}") from e
        if not isinstance(self._sd, Mapping):
            raise CorruptCheckpointError(f"{path}: does not hold a state dict.")
        self.entries = {k: tuple(v.shape) for k, v in self._sd.items() if hasattr(v, "shape")}

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name]

    def read(self, name: str) -> np.ndarray:
        import torch

        return self._sd[name].detach().to(torch.float32).numpy()

    def close(self) -> None:
        self._sd = {}


def _open_weights(directory: str) -> tuple[dict[str, Any], list[Any]]:
    """Maps every tensor name to the (lazily opened) file that holds it."""
    for kind in WEIGHT_FILES:
        path = os.path.join(directory, kind)
        if not os.path.isfile(path):
            continue
        opener = SafetensorsFile if "safetensors" in kind else _TorchFile
        if kind.endswith(".index.json"):
            try:
                with open(path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CorruptCheckpointError(f"{path}: unreadable shard index: {e}") from e
            files = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = os.path.join(directory, shard)
                if not os.path.isfile(shard_path):
                    raise CorruptCheckpointError(f"{path}: shard {shard_path} is missing.")
                files[shard] = opener(shard_path)
            by_name = {}
            for name, shard in weight_map.items():
                if name not in files[shard].entries:
                    raise CorruptCheckpointError(f"{path}: {name!r} is not in its shard {shard}.")
                by_name[name] = files[shard]
            return by_name, list(files.values())
        single = opener(path)
        return {name: single for name in single.entries}, [single]
    raise CheckpointNotFoundError(f"No HuggingFace weights ({', '.join(WEIGHT_FILES)}) in {directory}.")


def config_overrides(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """T5Config fields stated by a HuggingFace T5 config.json.

    Args:
      hf: the parsed config.json.
      source: path named in errors.

    Returns:
      Fields that tensor shapes must agree with (sizes) or cannot tell
      (activations, relative attention settings, dropout).
    """
    model_type = hf.get("model_type", "t5")
    if model_type not in ("t5", "mt5"):
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not a T5 encoder-decoder "
            f"('t5' or 'mt5'); umt5/longt5 have other parameters."
        )
    ffp = hf.get("feed_forward_proj", "relu")
    if ffp not in _ACTIVATIONS:
        raise CheckpointError(
            f"{source}: feed_forward_proj={ffp!r} is not supported; supported: "
            f"{sorted(_ACTIVATIONS)}."
        )
    out = {
        "vocab_size": hf.get("vocab_size"),
        "emb_dim": hf.get("d_model"),
        "num_heads": hf.get("num_heads"),
        "head_dim": hf.get("d_kv"),
        "mlp_dim": hf.get("d_ff"),
        "num_encoder_layers": hf.get("num_layers"),
        "num_decoder_layers": hf.get("num_decoder_layers") or hf.get("num_layers"),
        "mlp_activations": _ACTIVATIONS[ffp],
        "relative_attention_num_buckets": hf.get("relative_attention_num_buckets"),
        "relative_attention_max_distance": hf.get("relative_attention_max_distance"),
        "dropout_rate": hf.get("dropout_rate"),
    }
    return {k: v for k, v in out.items() if v is not None}


class HuggingFaceReader(CheckpointReader):
    """Reads a HuggingFace T5 checkpoint directory lazily in T5X names/layout."""

    format = "huggingface"

    def __init__(
        self,
        path: str,
        *,
        config: T5Config | None = None,
        num_heads: int | None = None,
        head_dim: int | None = None,
    ):
        path = os.fspath(path)
        if os.path.isfile(path):
            path = os.path.dirname(path)
        if not is_hf_dir(path):
            raise CheckpointNotFoundError(f"No HuggingFace T5 checkpoint (config.json + weights) at {path}.")
        super().__init__(path)
        self._files: list[Any] = []
        try:
            self._index(path, config=config, num_heads=num_heads, head_dim=head_dim)
        except BaseException:
            self.close()
            raise

    def _index(
        self,
        path: str,
        *,
        config: T5Config | None,
        num_heads: int | None,
        head_dim: int | None,
    ) -> None:
        try:
            with open(os.path.join(path, "config.json")) as f:
                hf = json.load(f)
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(f"{path}/config.json: unreadable: {e}") from e
        self.hf_config = hf
        self._by_name, self._files = _open_weights(path)
        overrides = config_overrides(hf, path)
        self._entries: dict[str, tuple[str, bool]] = {}
        unknown = []
        for name in self._by_name:
            mapped = param_tree.hf_to_t5x(name)
            if mapped is not None:
                self._entries[mapped[0]] = (name, mapped[1])
            elif name not in _IGNORED:
                unknown.append(name)
        if unknown:
            raise CheckpointError(
                f"{path}: tensors {sorted(unknown)[:5]} have no T5X equivalent "
                f"(not a T5 / T5.1.1 model?)."
            )
        emb_name = next((n for n in _ALIASES if n in self._by_name), None)
        if emb_name is None:
            raise CheckpointError(f"{path}: missing the embedding 'shared.weight'.")
        self._entries["token_embedder/embedding"] = (emb_name, False)
        scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
        head = self._entries.get("decoder/logits_dense/kernel")
        if scaled:
            if head is not None:
                if not np.array_equal(self._raw(head[0]), self._raw(emb_name)):
                    raise CheckpointError(
                        f"{path}: lm_head.weight differs from shared.weight but the "
                        f"config scales decoder outputs (tied T5.0 semantics); this "
                        f"combination has no T5X equivalent."
                    )
                del self._entries["decoder/logits_dense/kernel"]
            overrides["logits_via_embedding"] = True
        else:
            if head is None:
                # Tied by transformers and saved once: logits = y @ shared.T, unscaled.
                self._entries["decoder/logits_dense/kernel"] = (emb_name, True)
            overrides["logits_via_embedding"] = False
        shapes = {}
        for key, (name, transpose) in self._entries.items():
            shape = tuple(self._by_name[name].shape(name))
            shapes[key] = shape[::-1] if transpose else shape
        if config is not None:
            overrides = {}
        self._setup(shapes, config=config, num_heads=num_heads, head_dim=head_dim, overrides=overrides)

    def _raw(self, name: str) -> np.ndarray:
        file = self._by_name[name]
        try:
            return file.read(name)
        except Exception as e:
            raise CorruptCheckpointError(f"{file.path}: cannot read tensor {name!r}: {e}") from e

    def _load(self, key: str) -> np.ndarray:
        name, transpose = self._entries[key]
        array = self._raw(name)
        return array.T if transpose else array

    def _close(self) -> None:
        for f in self._files:
            f.close()
        self._files, self._by_name = [], {}
