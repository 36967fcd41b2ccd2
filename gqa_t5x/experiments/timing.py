"""Time per sample of greedy decoding for a trained checkpoint (sweeps, quickstart).

The paper's protocol at the scale of one run: fixed input/output lengths
(no early stop at EOS, so every model decodes the same number of steps),
warm-up excluded, `block_until_ready`, time divided by the batch size. The
full benchmark with the kv-head sweep, HF comparison and bandwidth figures is
`gqa-t5x bench` (`gqa_t5x/experiments/bench/benchmark.py`). `interleaved` is
the one timing loop: the benchmark's variants, the study's interleaved rounds,
the roofline measurements (`fastest`) and the microbenchmarks all use it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from gqa_t5x import checkpoints
from gqa_t5x.model import decoding


def round_orders(count: int, rounds: int, seed: int) -> list[list[int]]:
    """Seeded random orders of `count` functions, one per round, for `interleaved`.

    Each round's order is a random permutation, redrawn while it equals the
    previous round's (when `count` > 1), so no position effect (the first
    call after another variant's, caches left warm by the one before) falls
    on one function round after round.

    Returns:
      Per round, the function indices in calling order.
    """
    if count < 1 or rounds < 1:
        raise ValueError(f"count={count} and rounds={rounds} must be >= 1.")
    rng = np.random.default_rng(seed)
    orders: list[list[int]] = []
    for _ in range(rounds):
        order = rng.permutation(count).tolist()
        while count > 1 and orders and order == orders[-1]:
            order = rng.permutation(count).tolist()
        orders.append(order)
    return orders


def interleaved(fns: Sequence[Callable[[], Any]], rounds: int, *,
                orders: Sequence[Sequence[int]] | None = None) -> list[list[tuple[float, Any]]]:
    """The one timing loop: a warm-up round, then `rounds` timed rounds of every function.

    Each round calls every function once, so load from other processes falls
    on all of them alike and round `r` of two functions is a paired
    comparison. Every function must block until its work is done
    (`block_until_ready`).

    Args:
      fns: The functions to time (e.g. one decoder per variant).
      rounds: Timed rounds after the warm-up round (compilation).
      orders: Per timed round, the indices of `fns` in the order to call them
        (`round_orders` draws seeded random ones). Default: the given order
        every round. The warm-up round always calls them in the given order.

    Returns:
      Per function (in the given order), per timed round: (seconds, what the
      call returned).
    """
    if rounds < 1:
        raise ValueError(f"repeats={rounds}: time at least one run after the warm-up.")
    if orders is None:
        orders = [range(len(fns))] * rounds
    orders = [list(order) for order in orders]
    if len(orders) != rounds or any(sorted(order) != list(range(len(fns))) for order in orders):
        raise ValueError(f"orders={orders} must hold {rounds} permutations of 0..{len(fns) - 1}.")
    for fn in fns:  # compile + warm-up
        fn()
    runs: list[list[tuple[float, Any]]] = [[] for _ in fns]
    for order in orders:
        for index in order:
            start = time.perf_counter()
            value = fns[index]()
            runs[index].append((time.perf_counter() - start, value))
    return runs


def fastest(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Seconds of the fastest of `repeats` calls of `fn` after one warm-up call, and its last output.

    The minimum, not the median: on a shared machine other processes only
    ever add time, so the fastest run is the best estimate of the cost.
    """
    runs = interleaved([fn], repeats)[0]
    return min(seconds for seconds, _ in runs), runs[-1][1]


def greedy_decoder(config: Any, params: Any, *, batch: int, input_length: int,
                   output_length: int, seed: int = 0) -> Callable[[], Any]:
    """A function that greedily decodes `batch` random inputs with `params` and blocks.

    Exactly `output_length` steps (no EOS stop), so every variant decodes the
    same number of tokens; the decode-step kernels are made once here, like
    loading the model.

    Args:
      config: Model config (its dtype is the activation dtype used).
      params: Parameters.
      batch: Samples decoded together.
      input_length: Encoder tokens per sample.
      output_length: Decoding steps per sample.
      seed: Seed of the random input tokens.

    Returns:
      The decoding function (returns the decoded tokens).
    """
    if min(batch, input_length, output_length) < 1:
        raise ValueError("batch, input_length and output_length must be >= 1.")
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, min(config.vocab_size, 32000), size=(batch, input_length)).astype(np.int32)
    params = jax.device_put(params)
    spec = decoding.DecodingSpec(method="greedy", max_decode_length=output_length, eos_id=None)
    kernels = decoding.step_kernels(params)

    def run() -> Any:
        return jax.block_until_ready(decoding.decode(config, params, tokens, spec, kernels=kernels).tokens)

    return run


def time_params(config: Any, params: Any, *, batch: int, input_length: int,
                output_length: int, repeats: int = 2, seed: int = 0) -> dict[str, Any]:
    """Measures greedy decoding of random inputs with `params` (`greedy_decoder`).

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
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1.")
    run = greedy_decoder(config, params, batch=batch, input_length=input_length,
                         output_length=output_length, seed=seed)
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
