"""Export to HuggingFace `T5ForConditionalGeneration` (safetensors + config.json).

HuggingFace's T5 has no grouped-query attention, so every key/value head of a
GQA layer is repeated for the query heads of its group (query head h reads kv
head h // (H/G), contiguous groups). The exported model computes exactly what
the GQA model computes; it is as large as the multi-head model it came from.

Files are written into a temporary sibling directory and renamed into place,
so a failed export never leaves a half-written model; an existing non-empty
directory is only replaced with `overwrite=True`. `model.safetensors` is
written one tensor at a time (the header is computed from the shapes first),
so exporting from a checkpoint path holds one parameter in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config

# numpy dtype name -> (safetensors dtype, HuggingFace torch dtype name)
_DTYPES = {"float32": ("F32", "float32"), "bfloat16": ("BF16", "bfloat16")}
_FEED_FORWARD = {
    ("gelu", "linear"): "gated-gelu",
    ("relu", "linear"): "gated-relu",
    ("silu", "linear"): "gated-silu",
    ("relu",): "relu",
}


def hf_config_dict(config: T5Config, dtype: str = "float32") -> dict[str, Any]:
    """The HuggingFace `config.json` of `config` (T5 v1.1 conventions).

    Args:
      config: Our model config.
      dtype: 'float32' or 'bfloat16', recorded as the model's dtype.

    Returns:
      A JSON-serialisable dict for `transformers.T5Config`.

    Raises:
      ValueError: the MLP activations have no HuggingFace T5 equivalent.
    """
    activations = tuple(config.mlp_activations)
    if activations not in _FEED_FORWARD:
        raise ValueError(
            f"mlp_activations={activations} has no HuggingFace T5 equivalent; "
            f"supported: {[list(a) for a in _FEED_FORWARD]}."
        )
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "is_encoder_decoder": True,
        "vocab_size": config.vocab_size,
        "d_model": config.emb_dim,
        "d_kv": config.head_dim,
        "d_ff": config.mlp_dim,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "num_heads": config.num_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "dropout_rate": float(config.dropout_rate),
        "layer_norm_epsilon": 1e-6,
        "initializer_factor": 1.0,
        "feed_forward_proj": _FEED_FORWARD[activations],
        # T5.1.1 does not tie the output projection to the embedding; HF reads
        # False as "untied lm_head, no d_model**-0.5 rescaling of the decoder
        # output", True as T5X's logits_via_embedding (which rescales too).
        "tie_word_embeddings": bool(config.logits_via_embedding),
        "use_cache": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "torch_dtype": _DTYPES[dtype][1],
        "gqa_t5x": {
            "num_kv_heads": config.decoder_kv_heads,
            "encoder_num_kv_heads": config.encoder_kv_heads,
            "note": "key/value heads repeated per group for HuggingFace T5",
        },
    }


def repeat_kv_heads(kernel: np.ndarray, num_heads: int, head_dim: int) -> np.ndarray:
    """[emb, G*head_dim] -> [emb, H*head_dim], each kv head repeated H/G times."""
    emb, width = kernel.shape
    kv_heads = width // head_dim
    if kv_heads * head_dim != width or num_heads % kv_heads:
        raise ValueError(
            f"A key/value kernel of width {width} does not hold a divisor of "
            f"num_heads={num_heads} heads of size {head_dim}."
        )
    heads = kernel.reshape(emb, kv_heads, 1, head_dim)  # [emb, G, 1, d]
    heads = np.broadcast_to(heads, (emb, kv_heads, num_heads // kv_heads, head_dim))
    return np.ascontiguousarray(heads.reshape(emb, num_heads * head_dim))


def _hf_tensors(config: T5Config) -> list[tuple[str, str, bool, tuple[int, ...], bool]]:
    """(our path, HF name, transpose, HF shape, repeat kv heads) per tensor."""
    mha = config.replace(num_kv_heads=None, encoder_num_kv_heads=None)
    mha_shapes = param_tree.param_shapes(mha)
    out = []
    for path, shape in param_tree.param_shapes(config).items():
        name, transpose = param_tree.hf_name(path)
        full = mha_shapes[path]
        repeat = tuple(full) != tuple(shape)
        hf_shape = tuple(reversed(full)) if transpose else tuple(full)
        out.append((path, name, transpose, hf_shape, repeat))
    return out


class _SafetensorsWriter:
    """Writes a safetensors file tensor by tensor (header computed up front).

    Format: 8-byte little-endian header length, a JSON header mapping names to
    {dtype, shape, data_offsets}, then the raw little-endian data.
    """

    def __init__(
        self,
        path: Path,
        tensors: list[tuple[str, tuple[int, ...]]],
        dtype: str,
        metadata: Mapping[str, str],
    ) -> None:
        st_dtype = _DTYPES[dtype][0]
        header: dict[str, Any] = {"__metadata__": dict(metadata)}
        offset = 0
        self._order = []
        for name, shape in tensors:
            size = int(np.prod(shape, dtype=np.int64)) * (4 if dtype == "float32" else 2)
            header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._order.append((name, tuple(shape)))
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
        self._dtype = dtype
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)

    def write(self, name: str, array: np.ndarray) -> None:
        expected_name, shape = self._order[self._next]
        if name != expected_name or tuple(array.shape) != shape:
            raise ValueError(
                f"safetensors writer expected {expected_name!r} {shape}, got "
                f"{name!r} {tuple(array.shape)}."
            )
        if self._dtype == "bfloat16":
            import ml_dtypes

            data = np.ascontiguousarray(array, dtype=ml_dtypes.bfloat16).view("<u2")
        else:
            data = np.ascontiguousarray(array, dtype="<f4")
        self._file.write(memoryview(data.reshape(-1)).cast("B"))
        self._next += 1

    def finish(self) -> None:
        """Closes the file; every tensor of the header must have been written."""
        self._file.close()
        if self._next != len(self._order):
            raise ValueError(
                f"safetensors file incomplete: {self._next} of {len(self._order)} tensors."
            )


def _check_destination(directory: Path, overwrite: bool) -> None:
    if directory.is_file():
        raise FileExistsError(f"--output {str(directory)!r} is a file, not a directory.")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--output {str(directory)!r} already exists and is not empty; pass "
            f"overwrite=True (--overwrite) to replace it."
        )


def _export(
    directory: str | os.PathLike,
    config: T5Config,
    get: Callable[[str], np.ndarray],
    *,
    overwrite: bool,
    dtype: str,
    progress: bool,
) -> Path:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {sorted(_DTYPES)}.")
    directory = Path(directory)
    _check_destination(directory, overwrite)
    hf_config = hf_config_dict(config, dtype)  # validates before any writing
    tensors = _hf_tensors(config)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        from tqdm.auto import tqdm

        writer = _SafetensorsWriter(
            tmp / "model.safetensors",
            [(name, shape) for _, name, _, shape, _ in tensors],
            dtype,
            {"format": "pt"},
        )
        try:
            for path, name, transpose, _, repeat in tqdm(
                tensors, desc="export huggingface", unit="param", disable=not progress
            ):
                array = np.asarray(get(path), np.float32)
                if repeat:
                    array = repeat_kv_heads(array, config.num_heads, config.head_dim)
                writer.write(name, array.T if transpose else array)
                del array
        except BaseException:
            writer._file.close()
            raise
        writer.finish()
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        generation = {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        _check_destination(directory, overwrite)  # nothing appeared meanwhile
        old = None
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            directory.rename(old)
        tmp.rename(directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def export_huggingface(
    directory: str | os.PathLike,
    config: T5Config,
    params: Mapping[str, Any],
    *,
    overwrite: bool = False,
    dtype: str = "float32",
    progress: bool = False,
) -> Path:
    """Writes `params` as a HuggingFace `T5ForConditionalGeneration` directory.

    Args:
      directory: Output directory (created; must be absent or empty unless
        `overwrite`).
      config: Config of `params` (GQA key/value heads are repeated per group).
      params: Nested parameter dict with `param_shapes(config)`.
      overwrite: Replace an existing non-empty directory.
      dtype: 'float32' (default) or 'bfloat16' tensors.
      progress: Show a progress bar.

    Returns:
      The output directory, holding `model.safetensors`, `config.json` and
      `generation_config.json`.
    """
    flat = param_tree.flatten(params)
    expected = param_tree.param_shapes(config)
    for path, shape in expected.items():
        if path not in flat:
            raise ValueError(f"params lack {path!r} (shape {shape}) of the config.")
        if tuple(np.shape(flat[path])) != tuple(shape):
            raise ValueError(
                f"params[{path!r}] has shape {tuple(np.shape(flat[path]))}; the "
                f"config needs {tuple(shape)}."
            )
    return _export(
        directory, config, lambda p: flat[p], overwrite=overwrite, dtype=dtype, progress=progress
    )


def export_huggingface_checkpoint(
    checkpoint: str | os.PathLike,
    directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: str = "float32",
    progress: bool = True,
) -> Path:
    """Streams a checkpoint on disk (any readable format) to a HuggingFace directory.

    Args:
      checkpoint: Path of the checkpoint (e.g. the output of `gqa-t5x convert`).
      directory: Output directory.
      overwrite: Replace an existing non-empty directory.
      dtype: 'float32' or 'bfloat16' tensors.
      progress: Show a progress bar over parameters.

    Returns:
      The output directory.
    """
    from gqa_t5x import checkpoints

    source, target = Path(checkpoint), Path(directory)
    if not source.exists():
        raise FileNotFoundError(f"No checkpoint at --checkpoint {str(checkpoint)!r}: path does not exist.")
    if target.resolve() == source.resolve() or source.resolve() in target.resolve().parents:
        raise ValueError(
            f"--output {str(directory)!r} must not be (inside) the checkpoint {str(checkpoint)!r}."
        )
    _check_destination(target, overwrite)
    with checkpoints.open_checkpoint(source) as reader:
        return _export(
            target, reader.config, reader.read, overwrite=overwrite, dtype=dtype, progress=progress
        )
