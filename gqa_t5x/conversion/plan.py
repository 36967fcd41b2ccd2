"""What a conversion changes: target config and the attention layers to rewrite.

Only decoder self-attention and encoder-decoder attention are converted
unless `convert_encoder=True` (the paper's choice). A layer whose kv head
count does not change is not listed, so it is copied bit for bit whatever
the method.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from gqa_t5x.conversion.methods import get_method
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config, check_kv_heads, divisors


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


def _check_target(name: str, value: Any, num_heads: int, source_kv: int) -> int:
    """A valid target for a source with `source_kv` kv heads, as an int.

    `check_kv_heads` decides what a valid head count is; a conversion can
    moreover only merge whole groups of the source.
    """
    value = check_kv_heads(num_heads, value, name=name)
    if value > source_kv:
        raise ValueError(
            f"{name}={value} is more key/value heads than the source has "
            f"({source_kv}, num_heads={num_heads}); conversion can only merge "
            f"heads: choose one of {divisors(source_kv)}."
        )
    if source_kv % value:
        raise ValueError(
            f"{name}={value} does not divide the source's {source_kv} key/value "
            f"heads (num_heads={num_heads}), so its groups would not be unions "
            f"of source groups; choose one of {divisors(source_kv)}."
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
      method: A registered method name (see `METHODS`).
      convert_encoder: Also convert encoder self-attention.
      encoder_num_kv_heads: Target kv heads of encoder self-attention when
        `convert_encoder` (default: `num_kv_heads`).
      seed: Seed of methods that draw random numbers.

    Returns:
      The `ConversionPlan`.

    Raises:
      ValueError: unknown method, or kv head counts that do not divide the
        source's heads, or that exceed them.
    """
    get_method(method)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r} must be an integer.")
    heads = config.num_heads
    dec_kv = _check_target("num_kv_heads", num_kv_heads, heads, config.num_kv_heads)
    changes: dict[str, Any] = {"num_kv_heads": dec_kv}
    enc_kv = config.encoder_num_kv_heads
    if convert_encoder:
        requested = num_kv_heads if encoder_num_kv_heads is None else encoder_num_kv_heads
        enc_kv = _check_target("encoder_num_kv_heads", requested, heads, config.encoder_num_kv_heads)
        changes["encoder_num_kv_heads"] = enc_kv
    elif encoder_num_kv_heads is not None:
        raise ValueError(
            "encoder_num_kv_heads was given but convert_encoder is False; pass "
            "convert_encoder=True (--convert_encoder) to convert the encoder."
        )
    target = config.replace(**changes)
    layers: dict[str, tuple[int, int]] = {}
    if enc_kv != config.encoder_num_kv_heads:
        for i in range(config.num_encoder_layers):
            layers[f"encoder/layers_{i}/{param_tree.ENCODER_ATTENTION}"] = (config.encoder_num_kv_heads, enc_kv)
    if dec_kv != config.num_kv_heads:
        for i in range(config.num_decoder_layers):
            for module in (param_tree.DECODER_SELF_ATTENTION, param_tree.DECODER_CROSS_ATTENTION):
                layers[f"decoder/layers_{i}/{module}"] = (config.num_kv_heads, dec_kv)
    return ConversionPlan(source=config, target=target, method=method, seed=int(seed), layers=layers)


def split_attention_path(path: str) -> tuple[str, str] | None:
    """'x/self_attention/key/kernel' -> ('x/self_attention', 'key'); else None."""
    parts = path.split("/")
    if len(parts) >= 3 and parts[-1] == "kernel" and parts[-2] in param_tree.ATTENTION_PROJECTIONS:
        return "/".join(parts[:-2]), parts[-2]
    return None
