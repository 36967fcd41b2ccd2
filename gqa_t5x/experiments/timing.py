"""Time per sample of greedy decoding for a trained checkpoint (sweeps, quickstart).

The paper's protocol at the scale of one run: fixed input/output lengths
(no early stop at EOS, so every model decodes the same number of steps),
warm-up excluded, `block_until_ready`, time divided by the batch size. The
full benchmark with the kv-head sweep, HF comparison and bandwidth figures is
`gqa-t5x bench` (`gqa_t5x/experiments/benchmark.py`). `fastest` is the one
timing loop the benchmark, the roofline measurements and this module share.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np

from gqa_t5x import checkpoints
from gqa_t5x.model import decoding


def fastest(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Seconds of the fastest of `repeats` calls of `fn` after one warm-up call, and its output.

    The minimum, not the median: on a shared machine other processes only
    ever add time, so the fastest run is the best estimate of the cost. `fn`
    must block until its work is done (`block_until_ready`).
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: time at least one run after the warm-up.")
    out = fn()  # compile + warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def time_params(config: Any, params: Any, *, batch: int, input_length: int,
                output_length: int, repeats: int = 2, seed: int = 0) -> dict[str, Any]:
    """Measures greedy decoding of random inputs with `params`.

    Args:
      config: Model config (its dtype is the activation dtype used).
      params: Parameters.
      batch: Samples decoded together.
      input_length: Encoder tokens per sample.
      output_length: Decoding steps per sample.
      repeats: Timed repetitions after one warm-up call (the fastest counts).
      seed: Seed of the random input tokens.

    Returns:
      {'time_per_sample', 'seconds', 'batch', 'input_length', 'output_length'}.
    """
    if min(batch, input_length, output_length, repeats) < 1:
        raise ValueError("batch, input_length, output_length and repeats must be >= 1.")
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, min(config.vocab_size, 32000), size=(batch, input_length)).astype(np.int32)
    params = jax.device_put(params)
    spec = decoding.DecodingSpec(method="greedy", max_decode_length=output_length, eos_id=None)

    kernels = decoding.step_kernels(params)  # made once per model, like loading it

    def run() -> None:
        result = decoding.decode(config, params, tokens, spec, kernels=kernels)
        jax.block_until_ready(result.tokens)

    best, _ = fastest(run, repeats)
    return {"time_per_sample": best / batch, "seconds": best, "batch": batch,
            "input_length": input_length, "output_length": output_length}


def time_checkpoint(path: str, *, dtype: str = "float32", batch: int = 8, input_length: int = 512,
                    output_length: int = 128, repeats: int = 2) -> dict[str, Any]:
    """`time_params` on a checkpoint of any supported format."""
    config, params = checkpoints.load(path)
    config = config.replace(dtype=dtype, dropout_rate=0.0)
    result = time_params(config, params, batch=batch, input_length=input_length,
                         output_length=output_length, repeats=repeats)
    result["checkpoint"] = path
    return result
