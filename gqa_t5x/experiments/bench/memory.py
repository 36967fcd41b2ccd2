"""What a bench run holds in memory, and the batch that fits.

A shape's variants are timed beside the multi-head weights they are
converted from; `estimate_peak_bytes` adds the larger phase (the encoder's
attention and MLP, or one variant's decoding cache), `pick_batch` halves the
batch asked for until the estimate fits the budget (`memory_budget_bytes`
times `--memory_fraction`) and says why, and `variants_fit_together` decides
whether all variants can be held at once for interleaved timing rounds.
Cache and weight bytes come from abstract shapes (nothing allocated).
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from gqa_t5x.experiments import machine as machine_info
from gqa_t5x.model import attention
from gqa_t5x.model import layer_stack
from gqa_t5x.model import network
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config


def memory_budget_bytes() -> int | None:
    """Memory a run may plan with: the device's on an accelerator, else available RAM."""
    if jax.default_backend() != "cpu":
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return machine_info.available_memory_bytes()


def _shapes_of(config: T5Config) -> T5Config:
    """`config` without the fields that change no parameter or cache shape (one cache entry)."""
    return config.replace(attention_query_chunk=None)


def cache_bytes(config: T5Config, batch: int, input_length: int, output_length: int) -> dict[str, int]:
    """Bytes of the decoding cache (from its abstract shapes, nothing allocated;
    each layer's caches have that layer's kv heads).

    Returns:
      {'self': decoder self-attention K/V, 'cross': encoder-decoder K/V}
      for the whole batch.
    """
    # Every cache leaf is [batch, ...] ([layers, batch, ...] scanned): one row, times the batch.
    # The bytes do not depend on scanning or query blocks; a scanned decoder traces one layer.
    shape_only = _shapes_of(config).replace(scan_layers=config.scan_layers or config.uniform_kv_heads)
    return {kind: batch * size for kind, size in _cache_bytes(shape_only, 1, input_length, output_length).items()}


@functools.lru_cache(maxsize=64)  # tracing an XXL decoder takes over a second; the planning asks often
def _cache_bytes(config: T5Config, batch: int, input_length: int, output_length: int) -> dict[str, int]:
    model = network.Transformer(config)
    encoded = jax.ShapeDtypeStruct((batch, input_length, config.emb_dim), config.activation_dtype)
    params = param_tree.abstract_params(config)
    _, variables = jax.eval_shape(
        lambda p, e: model.apply({"params": layer_stack.model_params(p, config)}, e, output_length,
                                 method=network.Transformer.init_decode_cache, mutable=["cache"]),
        params, encoded,
    )
    sizes = {"self": 0, "cross": 0}
    for path, leaf in param_tree.flatten(variables["cache"]).items():
        if path.split("/")[-1] in (attention.CACHED_KEY, attention.CACHED_VALUE):
            kind = "cross" if param_tree.is_cross_attention(path) else "self"
            sizes[kind] += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return sizes


def weight_bytes(config: T5Config) -> int:
    """Bytes of one variant's parameters in its `param_dtype`."""
    shapes = param_tree.param_shapes(_shapes_of(config))
    return sum(int(np.prod(s)) for s in shapes.values()) * config.parameter_dtype.itemsize


# Float32 temporaries of an attention block's logits size that XLA keeps at once
# (logits, masked + biased logits, softmax): its compiled buffer assignment of
# the encoder holds 2.3-3.4 of them (XLA:CPU, `Compiled.memory_analysis`; tests/
# experiments/bench/test_memory.py checks the estimate stays above it).
_LOGIT_TEMPORARIES = 4


def _converted_bytes(config: T5Config) -> int:
    """Bytes of the decoder key/value kernels, the parameters a conversion replaces."""
    return config.parameter_dtype.itemsize * sum(
        int(np.prod(shape)) for path, shape in param_tree.param_shapes(_shapes_of(config)).items()
        if path.startswith("decoder/") and param_tree.attention_projection(path) in ("key", "value"))


def encoder_activation_bytes(config: T5Config, batch: int, input_length: int) -> int:
    """Largest activations of one encoder layer: `_LOGIT_TEMPORARIES` float32 copies of
    one query block's logits `[batch, heads, block, input_length]` (block =
    `config.attention_query_chunk` or the whole input) beside the full relative
    bias and mask (two float32 copies each), and the MLP's hidden layer with a
    1.5x working margin."""
    block = min(input_length, config.attention_query_chunk or input_length)
    attention = (_LOGIT_TEMPORARIES * batch * config.num_heads * block * input_length * 4
                 + 2 * (config.num_heads + batch) * input_length * input_length * 4)
    mlp = batch * input_length * config.mlp_dim * config.activation_dtype.itemsize * len(config.mlp_activations)
    return attention + int(1.5 * mlp)


def estimate_peak_bytes(config: T5Config, batch: int, input_length: int, output_length: int,
                        kv_heads: tuple[int, ...] | None = None) -> int:
    """Rough peak memory of a shape timed one variant at a time.

    The multi-head weights are held throughout (each variant is converted
    from them; twice under `scan_layers`: the checkpoint tree and the
    stacked one) and the encoder output from the encoder phase on. On top of
    them, the larger of the two phases: the encoder's activations
    (`encoder_activation_bytes`), or one variant's decoding: its weights and
    cache (`_variant_bytes`) and a step's float32 logits with a 1.5x margin.

    Args:
      config: The multi-head model.
      batch, input_length, output_length: The shape.
      kv_heads: The variants (default: the multi-head model alone).

    Returns:
      Bytes.
    """
    decoding = max(_variant_bytes(config, g, batch, input_length, output_length)
                   for g in kv_heads or (config.num_kv_heads,))
    phases = max(encoder_activation_bytes(config, batch, input_length), decoding + _step_logit_bytes(config, batch))
    return _held_bytes(config, batch, input_length) + phases


def _held_bytes(base: T5Config, batch: int, input_length: int) -> int:
    """The multi-head weights (twice under `scan_layers`) and the encoder output."""
    weights = weight_bytes(base) * (2 if base.scan_layers else 1)
    return weights + batch * input_length * base.emb_dim * base.activation_dtype.itemsize


def _step_logit_bytes(base: T5Config, batch: int) -> int:
    """One decoding step's float32 logits with a 1.5x margin."""
    return int(1.5 * batch * base.vocab_size * 4)


def _variant_bytes(base: T5Config, g: int, batch: int, input_length: int, output_length: int) -> int:
    """What decoding the `g`-kv-head variant adds to the multi-head weights: its cache and
    its own weights (none for the multi-head model itself, the converted key/value
    kernels of a variant, which shares the rest, or a whole stacked copy under
    `scan_layers`)."""
    variant = base.replace(num_kv_heads=g)
    cache = sum(cache_bytes(variant, batch, input_length, output_length).values())
    if g == base.num_kv_heads:
        return cache
    return cache + (weight_bytes(variant) if base.scan_layers else _converted_bytes(variant))


def pick_batch(config: T5Config, cap: int, input_length: int, output_length: int,
               budget: int | None, kv_heads: tuple[int, ...] | None = None) -> tuple[int, str]:
    """The batch asked for (`cap`) when its estimated peak fits `budget`, else the largest
    halving of it that fits, and why.

    Returns:
      (batch, reason): the reason says whether the asked batch ran and, if
      not, the estimate and budget that ruled it out.
    """
    if budget is None:
        return cap, f"batch {cap} as asked (no memory budget known)"
    need = estimate_peak_bytes(config, cap, input_length, output_length, kv_heads) / 1e9
    batch = cap
    while batch > 1 and estimate_peak_bytes(config, batch, input_length, output_length, kv_heads) > budget:
        batch //= 2
    if batch == cap:
        return cap, f"batch {cap} as asked (estimated peak {need:.1f} GB of a {budget / 1e9:.1f} GB budget)"
    hints = ["a larger --memory_fraction"]
    if not config.attention_query_chunk or config.attention_query_chunk > 64:
        hints.append("a smaller --attention_query_chunk")
    if jax.default_backend() != "cpu":
        hints.append("a larger XLA_PYTHON_CLIENT_MEM_FRACTION (JAX's share of the device)")
    return batch, (f"batch {batch}, not the {cap} asked: batch {cap} needs an estimated {need:.1f} GB, over the "
                   f"{budget / 1e9:.1f} GB budget (--memory_fraction of the device's free memory); to run it, "
                   f"give {' or '.join(hints)}")


def variants_fit_together(base: T5Config, kv_heads, batch: int, n_in: int, n_out: int,
                          budget: int | None) -> bool:
    """Whether every variant's weights and cache fit the budget at once (for interleaved
    rounds), beside the multi-head weights and the encoder output."""
    if budget is None:
        return True
    variants = sum(_variant_bytes(base, g, batch, n_in, n_out) for g in kv_heads)
    return _held_bytes(base, batch, n_in) + variants + _step_logit_bytes(base, batch) <= budget


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is running out of memory: XLA's RESOURCE_EXHAUSTED or CUDA's (PyTorch's)
    "out of memory"."""
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def halve_until_it_fits(run: Callable[[int], Any], size: int,
                        on_halve: Callable[[int, int, str], None]) -> tuple[Any, int]:
    """`run(size)`, tried again at half the size while it runs out of memory (`is_out_of_memory`).

    Before each new try, `on_halve(size that failed, new size, first line of the error)` is called, after
    the failed attempt's arrays were let go. Any other error, and running out of memory
    at size 1, is raised.

    Returns:
      (what `run` returned, the size it ran at).
    """
    while True:
        try:
            return run(size), size
        except Exception as error:  # noqa: BLE001 - only running out of memory is retried
            if not is_out_of_memory(error) or size == 1:
                raise
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        gc.collect()  # past the `except` block, whose traceback held the failed attempt's arrays
        on_halve(size, size // 2, first)
        size //= 2


def halved_batch_reason(failed: int, batch: int, first_line: str) -> str:
    """Why the bench runs `batch`: `failed` passed the memory estimate but ran out of memory."""
    return f"batch {batch}: batch {failed} passed the memory estimate but ran out of memory ({first_line}); halved"
