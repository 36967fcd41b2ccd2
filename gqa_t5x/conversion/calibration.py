"""Calibration statistics for data-aware conversion methods (`lsq`).

A data-aware method needs, for every attention layer it converts, the second
moment of the inputs of that layer's query projection, C_q = E[x^T x] over
real (non-padding) tokens. The `similarity` grouping (`grouping.py`) needs
the second moment of the key/value projections' inputs: for self-attention
the same inputs (C_q), for encoder-decoder attention the encoder output,
recorded as `key_second_moment` C_k over real encoder tokens (cross layers
only; files written before it existed still load, without it).
`collect_statistics` runs the source model on a few batches and records them:
flax's `intercept_methods` sees the argument of every `query` (and
cross-attention `key`) projection's call, so no module has to expose its
activations.
`save_statistics` / `load_statistics` keep them in one `.npz` file that
`convert_checkpoint(..., calibration=PATH)` reads.

Layer keys are the attention prefixes of the parameter tree
('decoder/layers_0/self_attention', 'decoder/layers_0/encoder_decoder_attention',
'encoder/layers_0/attention').
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

QUERY_SECOND_MOMENT = "query_second_moment"
KEY_SECOND_MOMENT = "key_second_moment"
TOKENS = "tokens"
KEY_TOKENS = "key_tokens"
_SEPARATOR = "|"

LayerStatistics = Mapping[str, np.ndarray]
Statistics = Mapping[str, LayerStatistics]


def _capture_fn(config: Any):
    """A jitted forward pass returning the inputs of every query projection
    ({prefix: x}) and of every cross-attention key projection
    ({prefix + _SEPARATOR + 'key': encoder output})."""
    import flax.linen as nn
    import jax

    from gqa_t5x.model import network, param_tree

    model = network.Transformer(config)

    def forward(params, encoder_tokens, decoder_inputs, decoder_targets):
        captured: dict[str, Any] = {}

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name == "__call__" and args:
                prefix = "/".join(module.path[:-1])
                if module.name == "query":
                    captured[prefix] = args[0]
                elif module.name == "key" and len(module.path) > 1 and module.path[-2] == param_tree.DECODER_CROSS_ATTENTION:
                    captured[prefix + _SEPARATOR + "key"] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model.apply({"params": params}, encoder_tokens, decoder_inputs, decoder_targets,
                        enable_dropout=False)
        return captured

    return jax.jit(forward)


def collect_statistics(config: Any, params: Any, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    """Second moments of every attention layer's query (and cross key) inputs on `batches`.

    Args:
      config: The source model's `T5Config` (any dtype; float32 is used).
      params: Its parameters (nested dict).
      batches: Unpacked batches with `encoder_input_tokens` and
        `decoder_target_tokens` `[batch, length]` (0 = padding), optionally
        `decoder_input_tokens` (default: targets shifted right).

    Returns:
      {layer prefix: {QUERY_SECOND_MOMENT: [emb, emb] float64, TOKENS: count}},
      cross-attention layers also {KEY_SECOND_MOMENT: [emb, emb], KEY_TOKENS:
      count}. Encoder layers and cross keys average over real encoder tokens,
      decoder queries (self- and cross-attention) over real decoder positions.

    Raises:
      ValueError: no batch, or no real token in them.
    """
    from gqa_t5x.model import losses

    # Unscanned: the captures are keyed by each layer's own module path.
    forward = _capture_fn(config.replace(dtype="float32", dropout_rate=0.0, scan_layers=False))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in batches:
        encoder = np.asarray(batch["encoder_input_tokens"], np.int32)
        targets = np.asarray(batch["decoder_target_tokens"], np.int32)
        inputs = np.asarray(batch.get("decoder_input_tokens", losses.shift_right(targets)), np.int32)
        captured = forward(params, encoder, inputs, targets)
        for name, x in captured.items():
            keys = name.endswith(_SEPARATOR + "key")  # cross-attention keys: the encoder output
            mask = (encoder if keys or name.startswith("encoder/") else targets) > 0
            rows = np.asarray(x, np.float64)[mask]  # [tokens, emb]
            sums[name] = sums.get(name, 0.0) + rows.T @ rows
            counts[name] = counts.get(name, 0) + int(rows.shape[0])
    if not counts or min(counts.values()) == 0:
        raise ValueError("collect_statistics saw no real (non-padding) tokens; give it non-empty batches.")
    out: dict[str, dict[str, np.ndarray]] = {}
    for name in sorted(sums):
        prefix, _, keys = name.partition(_SEPARATOR)
        moment, tokens = (KEY_SECOND_MOMENT, KEY_TOKENS) if keys else (QUERY_SECOND_MOMENT, TOKENS)
        out.setdefault(prefix, {})[moment] = sums[name] / counts[name]
        out[prefix][tokens] = np.asarray(counts[name])
    return out


def save_statistics(path: str | os.PathLike, statistics: Statistics) -> Path:
    """Writes statistics to a `.npz` file (atomically: a temporary file, then rename).

    Args:
      path: Local file path ending in `.npz`.
      statistics: {layer prefix: {name: array}}.

    Returns:
      The path written.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"Calibration statistics are written to a .npz file; got {str(path)!r}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{prefix}{_SEPARATOR}{name}": np.asarray(value)
              for prefix, layer in statistics.items() for name, value in layer.items()}
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_statistics(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Reads statistics written by `save_statistics`.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is not a statistics file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Calibration statistics {str(path)!r} do not exist; write them with "
            "gqa_t5x.conversion.calibration.collect_statistics + save_statistics."
        )
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as data:
        for key in data.files:
            prefix, sep, name = key.rpartition(_SEPARATOR)
            if not sep:
                raise ValueError(f"{path} is not a calibration statistics file (entry {key!r}).")
            out.setdefault(prefix, {})[name] = np.asarray(data[key])
    for prefix, layer in out.items():
        if QUERY_SECOND_MOMENT not in layer:
            raise ValueError(f"{path}: layer {prefix!r} lacks {QUERY_SECOND_MOMENT!r}.")
    return out


def resolve(calibration: str | os.PathLike | Statistics | None) -> Statistics | None:
    """Statistics from a path, a mapping (returned as is) or None."""
    if calibration is None or isinstance(calibration, Mapping):
        return calibration
    return load_statistics(calibration)
