"""Multi-head -> grouped-query conversion of T5.1.1 checkpoints.

The GQA paper (Ainslie et al. 2023, sec. 2.1) turns a multi-head checkpoint
into a grouped-query one by mean-pooling, per group of contiguous query heads,
the key and value projection heads; everything else is kept. This module does
that on in-memory parameters (`convert`) and, streaming one attention layer at
a time, on checkpoints of any size (`convert_checkpoint`).

Methods (selected by name, see `METHODS`):

* `mean`   (the paper): new kv head g = mean of the group's key (value) heads.
* `first`  (paper ablation): keep each group's first kv head.
* `random` (paper ablation): fresh T5X initialisation of the key/value
  kernels (`variance_scaling(1.0, 'fan_in', 'normal')`, fan_in = emb_dim),
  deterministic given `seed`.
* `align`  (beyond the paper): rotate every kv head's key space by an
  orthogonal R_s (the same R_s applied to the query columns of the query heads
  reading it, so q.k is unchanged) and its value space by an orthogonal S_s
  (S_s^T applied to the rows of the out kernel of those query heads, so the
  attention output is unchanged), with R_s / S_s chosen by generalised
  orthogonal Procrustes so that the heads of a group agree; then mean-pool.
  The rotation step alone is exactly function-preserving (T5 has no rotary
  embeddings and the relative position bias is added to the logits, not to
  q or k). It changes the query and out kernels of converted layers too.

Only decoder self-attention and encoder-decoder attention are converted unless
`convert_encoder=True`. Converting a layer to the number of kv heads it already
has returns it unchanged, bit for bit, whatever the method.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gqa_t5x.model import param_tree
from gqa_t5x.conversion.alignment import (  # noqa: F401  (re-exported)
    align_rotations,
    attention_error,
    group_rotations,
    rotate_heads,
)
from gqa_t5x.conversion.alignment import split_heads as _heads
from gqa_t5x.model.config import T5Config

METHODS = ("mean", "first", "random", "align")
_PROJECTIONS = param_tree.ATTENTION_PROJECTIONS  # ('query', 'key', 'value', 'out')



def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ----------------------------------------------------------------------- plan
@dataclasses.dataclass(frozen=True)
class ConversionPlan:
    """What a conversion changes.

    Attributes:
      source: Config of the source checkpoint.
      target: Config of the converted checkpoint.
      method: One of `METHODS`.
      seed: Seed of the `random` method.
      layers: Attention prefix (e.g. 'decoder/layers_0/self_attention') ->
        (source kv heads, target kv heads), for every layer whose kv head count
        changes. Layers not listed are copied unchanged.
    """

    source: T5Config
    target: T5Config
    method: str
    seed: int
    layers: dict[str, tuple[int, int]]

    @property
    def projections(self) -> tuple[str, ...]:
        """Projections a converted layer rewrites (align also rotates q/out)."""
        return _PROJECTIONS if self.method == "align" else ("key", "value")


def _check_kv_heads(name: str, value: Any, num_heads: int, source_kv: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(
            f"{name}={value!r} must be a positive integer (1 = multi-query, "
            f"{num_heads} = multi-head); divisors of num_heads={num_heads}: "
            f"{_divisors(num_heads)}."
        )
    value = int(value)
    if num_heads % value:
        raise ValueError(
            f"{name}={value} does not divide num_heads={num_heads}; choose one "
            f"of {_divisors(num_heads)}."
        )
    if value > source_kv:
        raise ValueError(
            f"{name}={value} is more key/value heads than the source has "
            f"({source_kv}, num_heads={num_heads}); conversion can only merge "
            f"heads: choose one of {_divisors(source_kv)}."
        )
    if source_kv % value:
        raise ValueError(
            f"{name}={value} does not divide the source's {source_kv} key/value "
            f"heads (num_heads={num_heads}), so its groups would not be unions "
            f"of source groups; choose one of {_divisors(source_kv)}."
        )
    return value


def plan_conversion(
    config: T5Config,
    num_kv_heads: int,
    *,
    method: str = "mean",
    convert_encoder: bool = False,
    encoder_num_kv_heads: int | None = None,
    seed: int = 0,
) -> ConversionPlan:
    """Validates a conversion request and lists the layers it changes.

    Args:
      config: Config of the source model (may already be GQA).
      num_kv_heads: Target kv heads of decoder self- and cross-attention.
      method: One of `METHODS`.
      convert_encoder: Also convert encoder self-attention.
      encoder_num_kv_heads: Target kv heads of encoder self-attention when
        `convert_encoder` (default: `num_kv_heads`).
      seed: Seed of the `random` method.

    Returns:
      The `ConversionPlan`.

    Raises:
      ValueError: unknown method, or kv head counts that do not divide the
        source's heads, or that exceed them.
    """
    if method not in METHODS:
        raise ValueError(
            f"Unknown conversion method {method!r}; choose one of {list(METHODS)}."
        )
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r} must be an integer.")
    heads = config.num_heads
    dec_kv = _check_kv_heads("num_kv_heads", num_kv_heads, heads, config.decoder_kv_heads)
    changes: dict[str, Any] = {"num_kv_heads": dec_kv}
    enc_kv = config.encoder_kv_heads
    if convert_encoder:
        requested = num_kv_heads if encoder_num_kv_heads is None else encoder_num_kv_heads
        enc_kv = _check_kv_heads(
            "encoder_num_kv_heads", requested, heads, config.encoder_kv_heads
        )
        changes["encoder_num_kv_heads"] = enc_kv
    elif encoder_num_kv_heads is not None:
        raise ValueError(
            "encoder_num_kv_heads was given but convert_encoder is False; pass "
            "convert_encoder=True (--convert_encoder) to convert the encoder."
        )
    target = config.replace(**changes)
    layers: dict[str, tuple[int, int]] = {}
    if enc_kv != config.encoder_kv_heads:
        for i in range(config.num_encoder_layers):
            layers[f"encoder/layers_{i}/{param_tree.ENCODER_ATTENTION}"] = (
                config.encoder_kv_heads,
                enc_kv,
            )
    if dec_kv != config.decoder_kv_heads:
        for i in range(config.num_decoder_layers):
            for module in (param_tree.DECODER_SELF_ATTENTION, param_tree.DECODER_CROSS_ATTENTION):
                layers[f"decoder/layers_{i}/{module}"] = (config.decoder_kv_heads, dec_kv)
    return ConversionPlan(
        source=config, target=target, method=method, seed=int(seed), layers=layers
    )


def split_attention_path(path: str) -> tuple[str, str] | None:
    """'x/self_attention/key/kernel' -> ('x/self_attention', 'key'); else None."""
    parts = path.split("/")
    if len(parts) >= 3 and parts[-1] == "kernel" and parts[-2] in _PROJECTIONS:
        return "/".join(parts[:-2]), parts[-2]
    return None


# ------------------------------------------------------------------ the maths
def _pool(heads: np.ndarray, groups: int, reduce: str) -> np.ndarray:
    """[emb, S, d] -> [emb, groups*d] by averaging / taking the first head."""
    emb, n, d = heads.shape
    grouped = heads.reshape(emb, groups, n // groups, d)  # [emb, G, S/G, d]
    if reduce == "mean":
        pooled = grouped.astype(np.float64).mean(axis=2)
    else:
        pooled = grouped[:, :, 0, :]
    return np.ascontiguousarray(pooled.reshape(emb, groups * d), dtype=np.float32)


def _random_kernel(shape: tuple[int, int], seed: int, path: str) -> np.ndarray:
    """T5X's key/value initialiser, keyed by (seed, parameter path)."""
    import jax

    key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(path.encode()))
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    return np.asarray(init(key, shape, np.float32), dtype=np.float32)


def convert_attention(
    kernels: Mapping[str, np.ndarray],
    *,
    num_heads: int,
    head_dim: int,
    target_kv_heads: int,
    method: str = "mean",
    seed: int = 0,
    path: str = "",
) -> dict[str, np.ndarray]:
    """Converts one attention layer's kernels to `target_kv_heads` kv heads.

    Args:
      kernels: 'key' and 'value' `[emb, S*head_dim]` (S = source kv heads);
        'query' `[emb, H*head_dim]` and 'out' `[H*head_dim, emb]` too for
        `align`.
      num_heads: H (query heads).
      head_dim: d.
      target_kv_heads: G, a divisor of S.
      method: One of `METHODS`.
      seed: Seed of `random`.
      path: The layer's prefix; keys the random stream and names errors.

    Returns:
      Float32 kernels: 'key'/'value' `[emb, G*head_dim]`, plus 'query'/'out'
      for `align`.
    """
    key = np.asarray(kernels["key"])
    source_kv = key.shape[1] // head_dim
    if key.ndim != 2 or key.shape[1] != source_kv * head_dim or num_heads % source_kv:
        raise ValueError(
            f"{path}/key/kernel has shape {key.shape}, which is not "
            f"[emb, kv_heads*{head_dim}] with kv_heads dividing num_heads={num_heads}."
        )
    if target_kv_heads <= 0 or source_kv % target_kv_heads:
        raise ValueError(
            f"{path}: cannot merge {source_kv} key/value heads into "
            f"{target_kv_heads}; choose one of {_divisors(source_kv)}."
        )
    if method in ("mean", "first"):
        return {
            proj: _pool(_heads(np.asarray(kernels[proj]), head_dim), target_kv_heads, method)
            for proj in ("key", "value")
        }
    if method == "random":
        shape = (key.shape[0], target_kv_heads * head_dim)
        return {
            proj: _random_kernel(shape, seed, f"{path}/{proj}/kernel")
            for proj in ("key", "value")
        }
    if method == "align":
        key_rot, value_rot = align_rotations(kernels, target_kv_heads, head_dim)
        rotated = rotate_heads(kernels, key_rot, value_rot, head_dim)
        result = {
            proj: _pool(_heads(rotated[proj], head_dim), target_kv_heads, "mean")
            for proj in ("key", "value")
        }
        result["query"] = rotated["query"].astype(np.float32)
        result["out"] = rotated["out"].astype(np.float32)
        return result
    raise ValueError(f"Unknown conversion method {method!r}; choose one of {list(METHODS)}.")


# ------------------------------------------------------------ in-memory params
def convert(
    config: T5Config,
    params: Mapping[str, Any],
    num_kv_heads: int,
    method: str = "mean",
    convert_encoder: bool = False,
    seed: int = 0,
    *,
    encoder_num_kv_heads: int | None = None,
) -> tuple[T5Config, dict[str, Any]]:
    """Converts in-memory parameters to grouped-query attention.

    Args:
      config: Config of `params`.
      params: Nested parameter dict with `param_shapes(config)` (numpy or jax
        arrays).
      num_kv_heads: Target kv heads of decoder self- and cross-attention.
      method: One of `METHODS`.
      convert_encoder: Also convert encoder self-attention.
      seed: Seed of the `random` method.
      encoder_num_kv_heads: Encoder target when `convert_encoder` (default:
        `num_kv_heads`).

    Returns:
      (new_config, new_params). Parameters the conversion does not change are
      the very objects of `params`; converted kernels are float32 numpy arrays.
    """
    plan = plan_conversion(
        config,
        num_kv_heads,
        method=method,
        convert_encoder=convert_encoder,
        encoder_num_kv_heads=encoder_num_kv_heads,
        seed=seed,
    )
    flat = param_tree.flatten(params)
    expected = param_tree.param_shapes(config)
    missing = [p for p in expected if p not in flat]
    if missing:
        raise ValueError(
            f"params lack {len(missing)} parameter(s) of the config, e.g. {missing[:3]}."
        )
    out = dict(flat)
    for prefix, (_, target_kv) in plan.layers.items():
        needed = _PROJECTIONS if method == "align" else ("key", "value")
        kernels = {p: np.asarray(flat[f"{prefix}/{p}/kernel"], np.float32) for p in needed}
        for p, kernel in kernels.items():
            want = expected[f"{prefix}/{p}/kernel"]
            if kernel.shape != want:
                raise ValueError(
                    f"{prefix}/{p}/kernel has shape {kernel.shape}; config expects {want}."
                )
        converted = convert_attention(
            kernels,
            num_heads=config.num_heads,
            head_dim=config.head_dim,
            target_kv_heads=target_kv,
            method=method,
            seed=plan.seed,
            path=prefix,
        )
        for p, kernel in converted.items():
            out[f"{prefix}/{p}/kernel"] = kernel
    return plan.target, param_tree.unflatten(out)


# ------------------------------------------------------------------ streaming
def _is_nonempty(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def convert_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    num_kv_heads: int,
    method: str = "mean",
    convert_encoder: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    seed: int = 0,
    *,
    encoder_num_kv_heads: int | None = None,
    on_param: Callable[[str], None] | None = None,
) -> T5Config:
    """Converts a checkpoint on disk, streaming one attention layer at a time.

    Reads any format `open_checkpoint` detects (T5X legacy, Orbax, Mesh TF,
    HuggingFace, ours) and writes our format atomically with
    `CheckpointWriter`. At most one attention layer's kernels (four for
    `align`, key and value otherwise), their converted versions and the current
    parameter are in memory. The step of the source is kept (T5X's
    TRAIN_STEPS is absolute); the optimizer state is not carried over (a fresh
    Adafactor state, see docs/conversion.md).

    Args:
      source: Path of the source checkpoint.
      output: Directory of the converted checkpoint.
      num_kv_heads: Target kv heads of decoder self- and cross-attention.
      method: One of `METHODS`.
      convert_encoder: Also convert encoder self-attention.
      overwrite: Replace an existing checkpoint at `output`.
      progress: Show a tqdm progress bar over parameters.
      seed: Seed of the `random` method.
      encoder_num_kv_heads: Encoder target when `convert_encoder`.
      on_param: Called with each parameter path after it is written.

    Returns:
      The config of the converted checkpoint.

    Raises:
      FileNotFoundError: no checkpoint at `source`.
      FileExistsError: `output` holds files and `overwrite` is False.
      ValueError: invalid method / head counts, or `output` is `source`.
    """
    from tqdm.auto import tqdm

    from gqa_t5x import checkpoints

    if method not in METHODS:
        raise ValueError(
            f"Unknown conversion method {method!r}; choose one of {list(METHODS)}."
        )
    source_path, output_path = Path(source), Path(output)
    if not source_path.exists():
        raise FileNotFoundError(f"No checkpoint at --source {str(source)!r}: path does not exist.")
    if output_path.resolve() == source_path.resolve() or source_path.resolve() in output_path.resolve().parents:
        raise ValueError(
            f"--output {str(output)!r} must not be (inside) the source checkpoint {str(source)!r}."
        )
    if _is_nonempty(output_path) and not overwrite:
        raise FileExistsError(
            f"--output {str(output)!r} already exists and is not empty; pass "
            f"overwrite=True (--overwrite) to replace it."
        )
    with checkpoints.open_checkpoint(source_path) as reader:
        plan = plan_conversion(
            reader.config,
            num_kv_heads,
            method=method,
            convert_encoder=convert_encoder,
            encoder_num_kv_heads=encoder_num_kv_heads,
            seed=seed,
        )
        source_shapes = param_tree.param_shapes(plan.source)
        available = set(reader.keys())
        missing = [p for p in source_shapes if p not in available]
        if missing:
            raise ValueError(
                f"Checkpoint {str(source)!r} lacks {len(missing)} parameter(s) of "
                f"its config, e.g. {missing[:3]}."
            )
        metadata = {
            "conversion": {
                "source": str(source),
                "source_format": str(getattr(reader, "format", "")),
                "method": method,
                "seed": plan.seed,
                "source_num_kv_heads": plan.source.decoder_kv_heads,
                "num_kv_heads": plan.target.decoder_kv_heads,
                "source_encoder_num_kv_heads": plan.source.encoder_kv_heads,
                "encoder_num_kv_heads": plan.target.encoder_kv_heads,
                "optimizer_state": "fresh (not carried over)",
            }
        }
        target_shapes = param_tree.param_shapes(plan.target)
        step = int(getattr(reader, "step", 0) or 0)
        with checkpoints.CheckpointWriter(
            output_path, plan.target, step=step, overwrite=overwrite, metadata=metadata
        ) as writer:
            layer_prefix, layer_out = None, {}  # the one layer held in memory
            bar = tqdm(
                target_shapes.items(),
                total=len(target_shapes),
                desc=f"convert ({method}, G={plan.target.decoder_kv_heads})",
                unit="param",
                disable=not progress,
            )
            for path, shape in bar:
                split = split_attention_path(path)
                if split and split[0] in plan.layers and split[1] in plan.projections:
                    prefix, proj = split
                    if prefix != layer_prefix:
                        layer_prefix, layer_out = prefix, {}
                        needed = _PROJECTIONS if method == "align" else ("key", "value")
                        kernels = {p: reader.read(f"{prefix}/{p}/kernel") for p in needed}
                        layer_out = convert_attention(
                            kernels,
                            num_heads=plan.source.num_heads,
                            head_dim=plan.source.head_dim,
                            target_kv_heads=plan.layers[prefix][1],
                            method=method,
                            seed=plan.seed,
                            path=prefix,
                        )
                        del kernels
                    array = layer_out.pop(proj)
                else:
                    array = reader.read(path)
                if tuple(array.shape) != tuple(shape):
                    raise ValueError(
                        f"{path}: got shape {tuple(array.shape)} from {str(source)!r}, "
                        f"expected {tuple(shape)}."
                    )
                writer.write(path, array)
                del array
                if on_param is not None:
                    on_param(path)
            writer.commit()
    return plan.target
