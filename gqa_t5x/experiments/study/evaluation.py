"""Held-out span-corruption scores per example, and interleaved decoding timing.

`score_checkpoint` is the study's evaluation (`scoring.score_params`, the
experiments' one scorer, on each held-out set): teacher-forced cross-entropy
and argmax accuracy of every target token of fixed held-out examples. It
keeps the per-example sums (loss, correct tokens, tokens), so the report can
bootstrap over examples and pair configurations example by example. Its
loss per token is what `--run_mode=eval` reports as `cross_ent_loss` on the
same examples (`metrics.token_loss`, without z-loss); the token accuracy is
the training log's `accuracy` (argmax = target).

`time_variants` measures greedy decoding time per sample of several
checkpoints in interleaved rounds (`timing.time_params`), so load from other
processes falls on all of them alike and each round gives one paired
difference. The study's checkpoints are tiny (d_model 128): their KV cache
is a rounding error next to their weights, so their timing cannot show what
fewer kv heads save. `time_random_variants` therefore times MHA/GQA/MQA
models with random weights at a large-like attention shape (T5-Large's 16
heads of 64, d_model 1024, few layers), where the batch's KV cache is as large
as the weights a decode step reads, in rounds whose variant order is drawn
at random per round; it reports the cache bytes per sample next to the times.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gqa_t5x.experiments.scoring import score_params  # the experiments' one scorer (re-exported)


def score_checkpoint(path: str, sets: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`score_params` of a checkpoint on every held-out set.

    Args:
      path: Any checkpoint the checkpoints package reads.
      sets: {set name: examples}.

    Returns:
      {'<set>/loss', '<set>/correct', '<set>/tokens': [n]} arrays.
    """
    from gqa_t5x import checkpoints

    config, params = checkpoints.load(path)
    out = {}
    for name, examples in sets.items():
        for key, value in score_params(config, params, examples).items():
            out[f"{name}/{key}"] = value
    return out


def summary(scores: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """{set: {'loss': per token, 'accuracy': per token, 'tokens': n}} of `score_checkpoint`'s output."""
    sets = sorted({k.split("/")[0] for k in scores})
    out = {}
    for name in sets:
        tokens = float(scores[f"{name}/tokens"].sum())
        out[name] = {"loss": float(scores[f"{name}/loss"].sum()) / tokens,
                     "accuracy": float(scores[f"{name}/correct"].sum()) / tokens, "tokens": tokens}
    return out


def time_variants(checkpoints_by_name: Mapping[str, str], shapes: Sequence[tuple[int, int]], *,
                  batch: int, rounds: int) -> dict[str, Any]:
    """Interleaved greedy-decoding time per sample of several checkpoints.

    Args:
      checkpoints_by_name: {variant: checkpoint path}.
      shapes: (input length, output length) pairs.
      batch: Samples decoded together.
      rounds: Rounds; each times every variant once (`timing.interleaved`, after
        a warm-up round).

    Returns:
      {'batch', 'rounds', 'shapes': [{'input_length', 'output_length',
      'time_per_sample': {variant: [one value per round]}}]}.
    """
    from gqa_t5x import checkpoints
    from gqa_t5x.experiments import timing

    decoders: dict[str, dict[tuple[int, int], Any]] = {}
    for name, path in checkpoints_by_name.items():
        config, params = checkpoints.load(path)
        config = config.replace(dtype="float32", dropout_rate=0.0)
        decoders[name] = {(n_in, n_out): timing.greedy_decoder(config, params, batch=batch, input_length=n_in,
                                                               output_length=n_out)
                          for n_in, n_out in shapes}
    result: dict[str, Any] = {"batch": batch, "rounds": rounds, "shapes": []}
    for input_length, output_length in shapes:
        runs = timing.interleaved([d[(input_length, output_length)] for d in decoders.values()], rounds)
        times = {name: [seconds / batch for seconds, _ in variant_runs]
                 for name, variant_runs in zip(decoders, runs)}
        result["shapes"].append({"input_length": input_length, "output_length": output_length,
                                 "time_per_sample": times})
    return result


def time_random_variants(num_heads: int, kv_heads: Sequence[int], *, emb_dim: int = 1024, head_dim: int = 64,
                         mlp_dim: int = 2816, num_layers: int = 2, vocab_size: int = 8064,
                         shapes: Sequence[tuple[int, int]] = ((512, 128),), batch: int = 8, rounds: int = 7,
                         seed: int = 0) -> dict[str, Any]:
    """Interleaved greedy-decoding time per sample of MHA/GQA/MQA models with random weights.

    One T5.1.1 model with `num_layers` encoder and decoder layers is
    initialised at random (T5X initialisers, `seed`) as multi-head; each
    kv-head count is derived from it by mean-pooling its decoder key/value
    heads (`conversion.convert`, the encoder stays multi-head, as in the
    study), so the variants differ only in kv heads. Every variant decodes the
    same seeded random inputs greedily in float32, exactly `output_length`
    steps, encoder included (`timing.greedy_decoder`); after one warm-up
    (compile) call each, `rounds` timed rounds call every variant once, in an
    order drawn at random per round (`timing.round_orders(seed)`).

    The defaults (T5-Large's attention, 2+2 layers, batch 8, 7 rounds, 3
    variants at (512, 128)) take about 2-3 minutes on a 2-core CPU.

    Args:
      num_heads: Query heads (the MHA variant's kv heads).
      kv_heads: kv-head counts to time, each a divisor of `num_heads`.
      emb_dim: d_model.
      head_dim: Width of one head.
      mlp_dim: Hidden width of the gated MLP.
      num_layers: Encoder layers and decoder layers (each).
      vocab_size: Vocabulary (the logits kernel every decode step reads).
      shapes: (input length, output length) pairs.
      batch: Samples decoded together.
      rounds: Timed rounds per shape.
      seed: Seed of the weights, the inputs and the round orders.

    Returns:
      {'batch', 'rounds', 'seed', 'wall_s', 'config': the MHA `T5Config.to_dict()`,
      'variants': {name: kv heads}, 'decode_step_weight_bytes': {name: bytes
      of the weights one decode step reads}, 'shapes': [{'input_length',
      'output_length', 'time_per_sample': {name: [seconds per sample, one per
      round]}, 'order': [[names in calling order] per round],
      'cache_bytes_per_sample': {name: {'self', 'cross', 'total'}} (decoder
      self-attention and cross-attention K/V), 'cache_to_weight_ratio': {name:
      the batch's cache bytes / decode_step_weight_bytes}}]}. Names are
      'MHA', 'GQA-G', 'MQA' (`settings.variant`).
    """
    import time

    from gqa_t5x import conversion
    from gqa_t5x.experiments import timing
    from gqa_t5x.experiments import roofline
    from gqa_t5x.experiments.study import settings as study_settings
    from gqa_t5x.model import initialization
    from gqa_t5x.model.config import T5Config

    started = time.perf_counter()
    base = T5Config(vocab_size=vocab_size, dtype="float32", emb_dim=emb_dim, num_heads=num_heads, head_dim=head_dim,
                    mlp_dim=mlp_dim, num_encoder_layers=num_layers, num_decoder_layers=num_layers,
                    dropout_rate=0.0)
    names = [study_settings.variant(g, num_heads) for g in kv_heads]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"kv_heads={list(kv_heads)} must name at least one kv-head count, each once.")
    configs = [base.replace(num_kv_heads=g) for g in kv_heads]  # validates: divisors of num_heads
    if not shapes or min(batch, rounds, *(n for shape in shapes for n in shape)) < 1:
        raise ValueError(f"shapes={list(shapes)}, batch={batch} and rounds={rounds} must be non-empty and >= 1.")
    mha = initialization.init_params(base, seed)
    params = [mha if g == num_heads else conversion.convert(base, mha, g)[1] for g in kv_heads]
    step_weights = {name: roofline.decode_step_weights(c) * np.dtype(np.float32).itemsize
                    for name, c in zip(names, configs)}
    result: dict[str, Any] = {"batch": batch, "rounds": rounds, "seed": seed, "config": base.to_dict(),
                              "variants": dict(zip(names, (int(g) for g in kv_heads))),
                              "decode_step_weight_bytes": step_weights, "shapes": []}
    for index, (input_length, output_length) in enumerate(shapes):
        decoders = [timing.greedy_decoder(c, p, batch=batch, input_length=input_length,
                                          output_length=output_length, seed=seed) for c, p in zip(configs, params)]
        orders = timing.round_orders(len(names), rounds, seed + index)
        runs = timing.interleaved(decoders, rounds, orders=orders)
        del decoders
        cache = {}
        for name, c in zip(names, configs):
            sizes = {k: v * np.dtype(np.float32).itemsize
                     for k, v in roofline.cache_numbers(c, 1, input_length, output_length).items()}
            cache[name] = {**sizes, "total": sizes["self"] + sizes["cross"]}
        result["shapes"].append({
            "input_length": input_length, "output_length": output_length,
            "time_per_sample": {name: [seconds / batch for seconds, _ in variant_runs]
                                for name, variant_runs in zip(names, runs)},
            "order": [[names[i] for i in order] for order in orders],
            "cache_bytes_per_sample": cache,
            "cache_to_weight_ratio": {name: batch * cache[name]["total"] / step_weights[name] for name in names},
        })
    result["wall_s"] = time.perf_counter() - started
    return result
