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
from gqa_t5x.conversion import grouping as groupings
from gqa_t5x.conversion.methods import ALL_PROJECTIONS, convert_attention, get_method
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
    grouping: groupings.GroupingSpec = groupings.CONTIGUOUS,
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
        methods such as `lsq` and by the `similarity` grouping.
      grouping: Which source kv heads each group pools: 'contiguous' (the
        default), 'similarity' (from `calibration`), or a recorded grouping
        (a converted checkpoint, its record JSON or the mapping of
        `grouping.Grouping.record`) to reproduce it (`grouping.py`).

    Returns:
      (new_config, new_params). Parameters the conversion does not change are
      the very objects of `params`; converted and permuted kernels are
      float32 numpy arrays.
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
    groupings.check_grouping(grouping)
    statistics = _layer_statistics(plan, calibration)
    flat = param_tree.flatten(params)
    expected = param_tree.param_shapes(config)
    missing = [p for p in expected if p not in flat]
    if missing:
        raise ValueError(f"params lack {len(missing)} parameter(s) of the config, e.g. {missing[:3]}.")

    def read(path: str) -> np.ndarray:
        return np.asarray(flat[path], np.float32)

    chosen = groupings.resolve(plan, grouping, statistics, read)
    out = dict(flat)
    for prefix in _rewritten_layers(plan, chosen):
        for p, kernel in _layer_kernels(prefix, plan, chosen, statistics, read).items():
            out[f"{prefix}/{p}/kernel"] = kernel
    for stack in chosen.relpos:
        order = chosen.relpos_permutation(stack)
        if order is not None:
            out[_relpos_path(stack)] = groupings.permute_relpos(flat[_relpos_path(stack)], order)
    return plan.target, param_tree.unflatten(out)


def _relpos_path(stack: str) -> str:
    """The relative position bias of a stack, e.g. 'decoder/relpos_bias/rel_embedding'."""
    return f"{stack}/relpos_bias/rel_embedding"


def _rewritten_layers(plan: Any, grouping: groupings.Grouping) -> dict[str, tuple[str, ...]]:
    """Attention prefix -> the projections a conversion rewrites there, in tree order.

    A converted layer rewrites its method's projections; a permuted one
    (a grouping's order that is not the identity) all four.
    """
    out = {}
    for prefix in dict.fromkeys([*plan.layers, *grouping.orders]):
        names = set(plan.projections) if prefix in plan.layers else set()
        if grouping.permutation(prefix) is not None:
            names |= set(ALL_PROJECTIONS)
        if names:
            out[prefix] = tuple(p for p in ALL_PROJECTIONS if p in names)
    return out


def _layer_kernels(prefix: str, plan: Any, grouping: groupings.Grouping, statistics: Mapping[str, Any],
                   read: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """The new kernels of one attention layer: its heads permuted, then converted.

    Args:
      prefix: The attention prefix.
      plan: The `ConversionPlan`.
      grouping: The conversion's head orders.
      statistics: Calibration statistics by layer.
      read: Reads a source parameter by path.

    Returns:
      {projection: kernel} for exactly `_rewritten_layers(plan, grouping)[prefix]`.
    """
    names = _rewritten_layers(plan, grouping)[prefix]
    kernels = {p: read(f"{prefix}/{p}/kernel") for p in names}
    order = grouping.permutation(prefix)
    if order is not None:  # each chosen group becomes a contiguous run of kv heads
        kernels = groupings.permute_heads(kernels, order, num_heads=plan.source.num_heads,
                                          head_dim=plan.source.head_dim)
    if prefix not in plan.layers:
        return kernels
    converted = convert_attention(
        {p: kernels[p] for p in plan.projections},
        num_heads=plan.source.num_heads,
        head_dim=plan.source.head_dim,
        target_kv_heads=plan.layers[prefix][1],
        method=plan.method,
        seed=plan.seed,
        path=prefix,
        statistics=statistics.get(prefix),
    )
    return {**kernels, **converted}


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
    grouping: groupings.GroupingSpec = groupings.CONTIGUOUS,
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
      grouping: 'contiguous' (default), 'similarity' (needs `calibration`;
        first reads each converted layer's key/value kernels to choose the
        groups) or a recorded grouping (a converted checkpoint, its record
        JSON or the mapping) to reproduce it without calibration (gin:
        GROUPING). The record is written to `metadata.conversion.grouping`.

    Returns:
      The config of the converted checkpoint.

    Raises:
      FileNotFoundError: no checkpoint at `source`.
      FileExistsError: `output` holds a checkpoint and `overwrite` is False,
        or holds anything else.
      ValueError: invalid method / head counts / grouping, `output` inside
        `source`, a corrupted source, unusual values, calibration statistics
        missing for a method or grouping that needs them, or a recorded
        grouping that does not match the request (nothing is written).
    """
    from tqdm.auto import tqdm

    get_method(method)
    groupings.check_grouping(grouping)
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
        chosen = groupings.resolve(plan, grouping, statistics, read)  # reads kv kernels for 'similarity'
        rewritten = _rewritten_layers(plan, chosen)
        relpos = {_relpos_path(stack): chosen.relpos_permutation(stack) for stack in chosen.relpos}

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
                "grouping": {**chosen.record(), **(
                    {} if isinstance(grouping, str) and grouping in groupings.GROUPINGS else
                    {"reproduced_from": "in memory" if isinstance(grouping, Mapping) else str(grouping)})},
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
                if split and split[1] in rewritten.get(split[0], ()):
                    prefix, proj = split
                    if prefix != layer_prefix:
                        layer_prefix, layer_out = prefix, _layer_kernels(prefix, plan, chosen, statistics, read)
                    array = layer_out.pop(proj)
                elif relpos.get(path) is not None:
                    array = groupings.permute_relpos(read(path), relpos[path])
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
