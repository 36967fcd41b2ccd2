"""What a conversion changes: target config and the attention layers to rewrite.

Only decoder self-attention and encoder-decoder attention are converted
unless `convert_encoder=True` (the paper's choice). Targets may differ per
layer and per attention kind (`decoder_self_kv_heads`, ...); each layer is
planned on its own. A layer whose kv head count does not change is not
listed, so it is copied bit for bit whatever the method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from gqa_t5x.conversion.methods import get_method
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import KV_HEAD_KINDS, KV_HEAD_MACROS, T5Config, canonical_kv_fields, check_kv_heads, divisors


@dataclasses.dataclass(frozen=True)
class ConversionPlan:
    """What a conversion changes.

    Attributes:
      source: Config of the source checkpoint.
      target: Config of the converted checkpoint.
      method: A registered method name.
      seed: Seed of methods that draw random numbers.
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
        """Projections a converted layer rewrites (the method's; align adds query/out)."""
        return get_method(self.method).projections


def _check_target(name: str, value: Any, num_heads: int, source_kv: int, where: str = "") -> int:
    """A valid target for a source with `source_kv` kv heads, as an int.

    `check_kv_heads` decides what a valid head count is; a conversion can
    moreover only merge whole groups of the source. `where` names the source
    layer when the source's counts differ per layer.
    """
    value = check_kv_heads(num_heads, value, name=name)
    at = f" in {where}" if where else ""
    if value > source_kv:
        raise ValueError(
            f"{name}={value} is more key/value heads than the source has "
            f"({source_kv}{at}, num_heads={num_heads}); conversion can only merge "
            f"heads: choose one of {divisors(source_kv)}."
        )
    if source_kv % value:
        raise ValueError(
            f"{name}={value} does not divide the source's {source_kv} key/value "
            f"heads{at} (num_heads={num_heads}), so its groups would not be unions "
            f"of source groups; choose one of {divisors(source_kv)}."
        )
    return value


# Attention kind -> (module of the parameter tree, stack).
_MODULES = {
    "encoder": (param_tree.ENCODER_ATTENTION, "encoder"),
    "self": (param_tree.DECODER_SELF_ATTENTION, "decoder"),
    "cross": (param_tree.DECODER_CROSS_ATTENTION, "decoder"),
}


def attention_prefix(kind: str, layer: int) -> str:
    """The parameter prefix of one attention layer, e.g. 'decoder/layers_0/self_attention'."""
    module, stack = _MODULES[kind]
    return f"{stack}/layers_{layer}/{module}"


def _kind_targets(config: T5Config, kind: str, per_layer: Any, uniform: Any, uniform_name: str) -> tuple[int, ...]:
    """Checked target counts of every layer of one attention kind.

    `per_layer` (an int for every layer, or one count per layer) wins over
    `uniform`; with neither the source's counts are kept.
    """
    field = KV_HEAD_KINDS[kind][0]
    source = config.layer_kv_heads(kind)
    if per_layer is None and uniform is None:
        return source
    if per_layer is None:
        values, names = [uniform] * len(source), [uniform_name] * len(source)
    elif isinstance(per_layer, (int, np.integer)):
        values, names = [per_layer] * len(source), [field] * len(source)
    elif not isinstance(per_layer, (list, tuple, np.ndarray)):
        raise ValueError(
            f"{field}={per_layer!r} is not a key/value head count or a sequence of counts, one per layer "
            f"(gin: --gin.{KV_HEAD_MACROS[field]}=\"(1, 2)\" in the shell, a tuple without quotes inside gin)."
        )
    else:
        values = list(per_layer)
        if len(values) != len(source):
            raise ValueError(
                f"{field}={tuple(values)} has {len(values)} counts but the source has {len(source)} "
                f"{_MODULES[kind][1]} layers: give one count per layer (or one int for all)."
            )
        names = [f"{field}[{i}]" for i in range(len(values))]
    uniform_source = len(set(source)) <= 1
    return tuple(
        _check_target(name, value, config.num_heads, source_kv,
                      "" if uniform_source else attention_prefix(kind, i))
        for i, (name, value, source_kv) in enumerate(zip(names, values, source))
    )


def plan_conversion(
    config: T5Config,
    num_kv_heads: int | None = None,
    *,
    method: str = "mean",
    convert_encoder: bool = False,
    encoder_num_kv_heads: int | None = None,
    decoder_self_kv_heads: int | Sequence[int] | None = None,
    decoder_cross_kv_heads: int | Sequence[int] | None = None,
    encoder_layer_kv_heads: int | Sequence[int] | None = None,
    seed: int = 0,
) -> ConversionPlan:
    """Validates a conversion request and lists the layers it changes.

    Per-layer and per-kind targets override the uniform ones of their
    attention kind; a kind given no target keeps the source's counts. Each
    listed layer is converted exactly as a uniform conversion of that layer
    to its count would convert it.

    Args:
      config: Config of the source model (may already be GQA, also per layer).
      num_kv_heads: Target kv heads of decoder self- and cross-attention
        (None: only the per-kind targets below change the decoder).
      method: A registered method name (see `METHODS`).
      convert_encoder: Also convert encoder self-attention.
      encoder_num_kv_heads: Target kv heads of encoder self-attention when
        `convert_encoder` (default: `num_kv_heads`).
      decoder_self_kv_heads: Target of decoder self-attention: one int for
        every layer or one count per decoder layer (default: `num_kv_heads`).
      decoder_cross_kv_heads: The same for encoder-decoder attention.
      encoder_layer_kv_heads: Encoder targets per layer (or one int) when
        `convert_encoder` (default: `encoder_num_kv_heads`).
      seed: Seed of methods that draw random numbers.

    Returns:
      The `ConversionPlan`. Its target is canonical (`T5Config`); a source
      recorded with `scan_layers` gets `scan_layers=False` when its new
      counts differ between the layers of a stack (scan needs equal ones).

    Raises:
      ValueError: unknown method, no target, per-layer targets of the wrong
        length, or kv head counts that do not divide the source's heads, or
        that exceed them (the message names the field and layer).
    """
    get_method(method)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r} must be an integer.")
    heads = config.num_heads
    encoder_given = encoder_num_kv_heads is not None or encoder_layer_kv_heads is not None
    if encoder_given and not convert_encoder:
        given = "encoder_num_kv_heads" if encoder_num_kv_heads is not None else "encoder_layer_kv_heads"
        raise ValueError(
            f"{given} was given but convert_encoder is False; pass "
            "convert_encoder=True (--convert_encoder) to convert the encoder."
        )
    if num_kv_heads is not None or (decoder_self_kv_heads is None and decoder_cross_kv_heads is None and not (
            convert_encoder and encoder_given)):
        num_kv_heads = check_kv_heads(heads, num_kv_heads, name="num_kv_heads",
                                      hint=" (or per kind: decoder_self_kv_heads / decoder_cross_kv_heads)")
    targets = {
        "self": _kind_targets(config, "self", decoder_self_kv_heads, num_kv_heads, "num_kv_heads"),
        "cross": _kind_targets(config, "cross", decoder_cross_kv_heads, num_kv_heads, "num_kv_heads"),
        "encoder": config.layer_kv_heads("encoder"),
    }
    if convert_encoder:
        uniform, name = (num_kv_heads, "num_kv_heads") if encoder_num_kv_heads is None else (
            encoder_num_kv_heads, "encoder_num_kv_heads")
        if uniform is None and encoder_layer_kv_heads is None:
            check_kv_heads(heads, None, name="encoder_num_kv_heads", hint=" (the encoder's target)")
        targets["encoder"] = _kind_targets(config, "encoder", encoder_layer_kv_heads, uniform, name)
    fields = canonical_kv_fields(
        heads, encoder=targets["encoder"], decoder_self=targets["self"], decoder_cross=targets["cross"],
        num_kv_heads=config.num_kv_heads if num_kv_heads is None else num_kv_heads,
        encoder_num_kv_heads=config.encoder_num_kv_heads if encoder_num_kv_heads is None else encoder_num_kv_heads,
    )
    if config.scan_layers and any(len(set(counts)) > 1 for counts in targets.values()):
        fields["scan_layers"] = False  # Checkpoints hold unscanned layers either way.
    target = config.replace(**fields)
    layers: dict[str, tuple[int, int]] = {}  # in the parameter tree's order
    order = [("encoder", i) for i in range(config.num_encoder_layers)]
    order += [(kind, i) for i in range(config.num_decoder_layers) for kind in ("self", "cross")]
    for kind, i in order:
        before, after = config.kv_heads(kind, i), targets[kind][i]
        if before != after:
            layers[attention_prefix(kind, i)] = (before, after)
    return ConversionPlan(source=config, target=target, method=method, seed=int(seed), layers=layers)


def split_attention_path(path: str) -> tuple[str, str] | None:
    """'x/self_attention/key/kernel' -> ('x/self_attention', 'key'); else None."""
    parts = path.split("/")
    if len(parts) >= 3 and parts[-1] == "kernel" and parts[-2] in param_tree.ATTENTION_PROJECTIONS:
        return "/".join(parts[:-2]), parts[-2]
    return None
