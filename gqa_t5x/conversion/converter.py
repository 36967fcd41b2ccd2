"""Multi-head -> grouped-query conversion of T5.1.1 parameters and checkpoints.

The GQA paper (Ainslie et al. 2023, sec. 2.1) turns a multi-head checkpoint
into a grouped-query one by mean-pooling, per group of contiguous query heads,
the key and value projection heads; everything else is kept. `convert` does
that on in-memory parameters and `convert_checkpoint`, streaming one
attention layer at a time, on checkpoints of any size and format. The
methods (mean, first, random, align, and any registered later) are in
`methods.py`, the plan of what changes in `plan.py`.

Gin: `gin/runs/convert.gin` binds `converter.convert_checkpoint` directly
(dynamic registration), as T5X's run gins bind their functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from gqa_t5x import checkpoints
from gqa_t5x.conversion import calibration as calibration_stats
from gqa_t5x.conversion.methods import convert_attention, get_method
from gqa_t5x.conversion.plan import plan_conversion, split_attention_path
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import LAYER_KV_HEAD_FIELDS, T5Config
from gqa_t5x.storage import paths
from gqa_t5x.storage.paths import Path, PathLike


def convert(
    config: T5Config,
    params: Mapping[str, Any],
    num_kv_heads: int | None = None,
    method: str = "mean",
    convert_encoder: bool = False,
    seed: int = 0,
    *,
    encoder_num_kv_heads: int | None = None,
    decoder_self_kv_heads: int | Sequence[int] | None = None,
    decoder_cross_kv_heads: int | Sequence[int] | None = None,
    encoder_layer_kv_heads: int | Sequence[int] | None = None,
    calibration: str | calibration_stats.Statistics | None = None,
) -> tuple[T5Config, dict[str, Any]]:
    """Converts in-memory parameters to grouped-query attention.

    Args:
      config: Config of `params`.
      params: Nested parameter dict with `param_shapes(config)` (numpy or jax
        arrays).
      num_kv_heads: Target kv heads of decoder self- and cross-attention.
      method: A registered method name (see `METHODS`).
      convert_encoder: Also convert encoder self-attention.
      seed: Seed of methods that draw random numbers.
      encoder_num_kv_heads: Encoder target when `convert_encoder` (default:
        `num_kv_heads`).
      decoder_self_kv_heads, decoder_cross_kv_heads, encoder_layer_kv_heads:
        Targets per attention kind, one int or one count per layer; they
        override the uniform targets of their kind (`plan_conversion`).
      calibration: Calibration statistics (a `.npz` path or the mapping
        `calibration.collect_statistics` returns), required by data-aware
        methods such as `lsq`.

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
        decoder_self_kv_heads=decoder_self_kv_heads,
        decoder_cross_kv_heads=decoder_cross_kv_heads,
        encoder_layer_kv_heads=encoder_layer_kv_heads,
        seed=seed,
    )
    statistics = _layer_statistics(plan, calibration)
    flat = param_tree.flatten(params)
    expected = param_tree.param_shapes(config)
    missing = [p for p in expected if p not in flat]
    if missing:
        raise ValueError(f"params lack {len(missing)} parameter(s) of the config, e.g. {missing[:3]}.")
    out = dict(flat)
    for prefix, (_, target_kv) in plan.layers.items():
        kernels = {p: np.asarray(flat[f"{prefix}/{p}/kernel"], np.float32) for p in plan.projections}
        converted = convert_attention(
            kernels,
            num_heads=config.num_heads,
            head_dim=config.head_dim,
            target_kv_heads=target_kv,
            method=method,
            seed=plan.seed,
            path=prefix,
            statistics=statistics.get(prefix),
        )
        for p, kernel in converted.items():
            out[f"{prefix}/{p}/kernel"] = kernel
    return plan.target, param_tree.unflatten(out)


def _listed(counts: tuple[int, ...] | None) -> list[int] | None:
    """A per-layer field as JSON writes it."""
    return None if counts is None else list(counts)


def _layer_statistics(plan: Any, calibration: Any) -> dict[str, Any]:
    """The statistics of each converted layer; checks coverage for data-aware methods.

    A conversion that changes no layer (G = the source's kv heads) needs none.
    """
    statistics = dict(calibration_stats.resolve(calibration) or {})
    if get_method(plan.method).needs_calibration and plan.layers:
        if not statistics:
            raise ValueError(
                f"Method {plan.method!r} needs calibration statistics of the source model: pass "
                "--calibration PATH (API: calibration=PATH; gin: converter.convert_checkpoint.calibration), "
                "a .npz written by gqa_t5x.conversion.calibration.save_statistics."
            )
        missing = [prefix for prefix in plan.layers if prefix not in statistics]
        if missing:
            raise ValueError(
                f"The calibration statistics lack {len(missing)} converted layer(s), e.g. "
                f"{missing[:3]}; they have {sorted(statistics)[:3]}... Collect them on the "
                "source checkpoint."
            )
    return statistics


def convert_checkpoint(
    source: PathLike | Path,
    output: PathLike | Path,
    num_kv_heads: int | None = None,
    method: str = "mean",
    convert_encoder: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    seed: int = 0,
    *,
    encoder_num_kv_heads: int | None = None,
    decoder_self_kv_heads: int | Sequence[int] | None = None,
    decoder_cross_kv_heads: int | Sequence[int] | None = None,
    encoder_layer_kv_heads: int | Sequence[int] | None = None,
    on_param: Callable[[str], None] | None = None,
    allow_unusual_values: bool = False,
    source_format: str | None = None,
    calibration: str | calibration_stats.Statistics | None = None,
    vocab: str | None = None,
) -> T5Config:
    """Converts a checkpoint on disk, streaming one attention layer at a time.

    Reads any format `checkpoints.open_checkpoint` detects (T5X legacy, Orbax,
    Mesh TF, HuggingFace, ours; local or gs://) and writes our format with
    `CheckpointWriter` (atomic; leftovers of killed earlier runs to the same
    output are removed, in one log line). At most one attention layer's
    kernels (the method's projections), their converted versions and the
    current parameter are in memory. Every source tensor is checked as it is
    read (`checkpoints.value_limits`, in the reader). The step of the source is kept (T5X's
    TRAIN_STEPS is absolute); the optimizer state is not carried over (a fresh
    Adafactor state, see docs/conversion.md).

    Args:
      source: Path of the source checkpoint.
      output: Directory of the converted checkpoint.
      num_kv_heads: Target kv heads of decoder self- and cross-attention.
      method: A registered method name (see `METHODS`).
      convert_encoder: Also convert encoder self-attention.
      overwrite: Replace an existing checkpoint at `output`.
      progress: Show a tqdm progress bar over parameters.
      seed: Seed of methods that draw random numbers.
      encoder_num_kv_heads: Encoder target when `convert_encoder`.
      decoder_self_kv_heads, decoder_cross_kv_heads, encoder_layer_kv_heads:
        Targets per attention kind, as in `convert` (gin: the macros
        DECODER_SELF_KV_HEADS, DECODER_CROSS_KV_HEADS, ENCODER_LAYER_KV_HEADS).
      on_param: Called with each parameter path after it is written.
      allow_unusual_values: Convert even if source values are non-finite or
        |x| > `checkpoints.MAX_ABS_VALUE` (otherwise an error naming the
        parameter).
      source_format: Read `source` as this format when it holds several.
      calibration: Calibration statistics of the source (a local `.npz` path
        or a mapping, see `calibration.py`), required by data-aware methods
        such as `lsq` (gin: `converter.convert_checkpoint.calibration`).
      vocab: The SentencePiece model of the source, recorded in the output
        (`checkpoints.vocabulary`); None keeps the source's record, if any.

    Returns:
      The config of the converted checkpoint.

    Raises:
      FileNotFoundError: no checkpoint at `source`.
      FileExistsError: `output` holds a checkpoint and `overwrite` is False,
        or holds anything else.
      ValueError: invalid method / head counts, `output` inside `source`, a
        corrupted source, unusual values, or calibration statistics missing
        for a method that needs them (nothing is written).
    """
    from tqdm.auto import tqdm

    get_method(method)
    source_path = paths.as_path(source, name="--source")
    output_path = paths.as_path(output, name="--output")
    if paths.is_same_or_inside(output_path, source_path):
        raise ValueError(f"--output {output_path} must not be (inside) the source checkpoint {source_path}.")
    with checkpoints.open_checkpoint(
        source_path, format=source_format, allow_unusual_values=allow_unusual_values
    ) as reader:
        plan = plan_conversion(
            reader.config,
            num_kv_heads,
            method=method,
            convert_encoder=convert_encoder,
            encoder_num_kv_heads=encoder_num_kv_heads,
            decoder_self_kv_heads=decoder_self_kv_heads,
            decoder_cross_kv_heads=decoder_cross_kv_heads,
            encoder_layer_kv_heads=encoder_layer_kv_heads,
            seed=seed,
        )
        statistics = _layer_statistics(plan, calibration)

        read = reader.read  # Checks each value unless allow_unusual_values (`value_limits`).

        recorded = checkpoints.vocabulary.for_checkpoint(reader, vocab)
        metadata = {
            **({checkpoints.vocabulary.KEY: recorded} if recorded else {}),
            "conversion": {
                "source": str(source_path),
                "source_format": reader.format,
                "method": method,
                "seed": plan.seed,
                "source_num_kv_heads": plan.source.num_kv_heads,
                "num_kv_heads": plan.target.num_kv_heads,
                "source_encoder_num_kv_heads": plan.source.encoder_num_kv_heads,
                "encoder_num_kv_heads": plan.target.encoder_num_kv_heads,
                **{f"{side}{field}": _listed(getattr(cfg, field))
                   for side, cfg in (("source_", plan.source), ("", plan.target))
                   for field in LAYER_KV_HEAD_FIELDS},
                "optimizer_state": "fresh (not carried over)",
                "calibration": str(calibration) if isinstance(calibration, (str, os.PathLike)) else (
                    "in memory" if calibration is not None else None),
            }
        }
        target_shapes = param_tree.param_shapes(plan.target)
        with checkpoints.CheckpointWriter(
            output_path, plan.target, step=int(reader.step or 0), overwrite=overwrite, metadata=metadata
        ) as writer:
            layer_prefix, layer_out = None, {}  # the one layer held in memory
            bar = tqdm(
                target_shapes.items(),
                total=len(target_shapes),
                desc=f"convert ({method}, " + (f"G={plan.target.num_kv_heads})" if plan.target.uniform_kv_heads
                                               else f"{plan.target.describe_kv_heads()})"),
                unit="param",
                disable=not progress,
            )
            for path, shape in bar:
                split = split_attention_path(path)
                if split and split[0] in plan.layers and split[1] in plan.projections:
                    prefix, proj = split
                    if prefix != layer_prefix:
                        kernels = {p: read(f"{prefix}/{p}/kernel") for p in plan.projections}
                        layer_prefix, layer_out = prefix, convert_attention(
                            kernels,
                            num_heads=plan.source.num_heads,
                            head_dim=plan.source.head_dim,
                            target_kv_heads=plan.layers[prefix][1],
                            method=method,
                            seed=plan.seed,
                            path=prefix,
                            statistics=statistics.get(prefix),
                        )
                        del kernels
                    array = layer_out.pop(proj)
                else:
                    array = read(path)
                if tuple(array.shape) != tuple(shape):
                    raise ValueError(
                        f"{path}: got shape {tuple(array.shape)} from {source_path}, expected {tuple(shape)}."
                    )
                writer.write(path, array)
                del array
                if on_param is not None:
                    on_param(path)
            writer.commit()
    return plan.target
