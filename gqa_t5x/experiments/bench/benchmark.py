"""`gqa-t5x bench`: time per sample of greedy decoding, swept over kv heads.

The paper's protocol (Table 1, Figure 6): time per sample = (encoder time +
decoder time) / batch, at the largest batch that fits up to a cap, warm-up
(compilation) excluded, every phase ended with `block_until_ready`. Decoding
runs exactly `output_length` greedy steps (no EOS stop), as a fixed output
length demands.

For each shape (model gin + layer overrides, input/output length, batch cap)
the multi-head model is initialised once; every GQA-G variant is derived from
it by the paper's mean-pooling conversion (`conversion.convert`), which does
not touch the encoder. The encoder is therefore timed once per shape and its
output reused by every variant; the decoder (cross-attention K/V projection +
the `while_loop`) is timed per variant, in interleaved rounds so that load
from other processes falls on every variant alike, keeping the fastest run.

Also reported, per phase (encoder, cache build, decode step): the roofline
bound for this machine, `max(bytes / measured bandwidth, FLOPs / measured
matmul peak)` (`roofline.py` counts the bytes and FLOPs), and the fraction of
it reached; per variant the KV-cache bytes per sample and the GB/s of the
cross-attention core the decoder runs (`decode_attention.cached_attention`)
against the measured stream bandwidth. HuggingFace `transformers` T5
(PyTorch, its own KV cache, `generate(do_sample=False)`; `huggingface_peer.py`)
decodes the same shape with the same multi-head weights in this process
(HuggingFace has no GQA, so it always pays MHA costs); on an accelerator
`scripts/accelerator_check.py` times it in a process of its own.

Outputs: a table on stdout, `<prefix>.json`, `<prefix>.md`, `<prefix>.png`
(written by `bench_report`).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import hashlib
import itertools
import time
from time import monotonic as _wall  # phase logs; `time` is the timed runs' clock
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gqa_t5x import conversion
from gqa_t5x.experiments import roofline
from gqa_t5x.experiments.bench import huggingface_peer
from gqa_t5x.experiments.bench import memory
from gqa_t5x.experiments import machine as machine_info
from gqa_t5x.experiments import timing
from gqa_t5x.model import decode_attention
from gqa_t5x.model import decoding
from gqa_t5x.model import initialization
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config
from gqa_t5x.training import partitioning

_GB = 1e9
Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What to measure.

    Attributes:
      config: The multi-head model config (num_kv_heads is swept).
      num_kv_heads: kv-head counts to time (each must divide num_heads).
      input_lengths: Encoder lengths.
      output_lengths: Decoded tokens per sample.
      batch_caps: Largest batch to try per shape (the paper: 32 per chip).
      repeats: Timed runs after the warm-up; the fastest is reported.
      huggingface: Also time HuggingFace transformers T5.
      huggingface_repeats: Timed HuggingFace runs after its warm-up.
      memory_fraction: Share of the free memory a run may plan to use (the
        device's on an accelerator, else the host's available RAM).
      seed: Seed of parameters and inputs.
      label: Name of the shape in reports (e.g. 'large-like').
      bandwidth_mb: Buffer size of the bandwidth measurement.
      num_partitions: Model-parallel shards (T5X's `num_partitions`): with
        more than one device the parameters, caches and batch are placed on a
        (data, model) mesh of all devices by `training.partitioning` (heads
        and MLP over `model`, batch over `data`); on CPU, host devices come
        from `--cpu_devices`.
    """

    config: T5Config
    num_kv_heads: tuple[int, ...]
    input_lengths: tuple[int, ...] = (512,)
    output_lengths: tuple[int, ...] = (128,)
    batch_caps: tuple[int, ...] = (16,)
    repeats: int = 2
    huggingface: bool = True
    huggingface_repeats: int = 1
    memory_fraction: float = 0.5
    seed: int = 0
    label: str = ""
    bandwidth_mb: int | None = None
    num_partitions: int = 1


# ------------------------------------------------------------------ timing
def _block(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x.block_until_ready(), tree)


def time_variants(variants, encoded, tokens, output_length, repeats) -> list[dict[str, Any]]:
    """Times the cached greedy decoder of each (config, params) variant.

    Rounds are interleaved (round 0 warms every variant up, then each round
    times every variant once), so load from other processes hits all variants
    alike; the fastest round of each variant is kept. The decode-step kernels
    (`decoding.step_kernels`: on CPU the decoder's kernels transposed) are
    made before each timed decode and timed on their own, not in the
    decoder's time: `infer` makes them once per model, like loading it.

    Returns:
      Per variant: decoder_s (cache init + loop), cache_init_s, loop_s, steps,
      tokens, kernels_s (making the step kernels, once per model).
    """
    spec = decoding.DecodingSpec(method="greedy", max_decode_length=output_length, eos_id=None)
    key = jax.random.PRNGKey(0)

    def decoder(params: Any, fns: Any):
        def run() -> tuple[tuple[float, float, float], Any]:
            start = time.perf_counter()
            kernels = _block(decoding.step_kernels(params))  # one variant's at a time (memory)
            made = time.perf_counter()
            cache, run_tokens = _block(fns.init_cache(params, encoded, tokens))
            middle = time.perf_counter()
            result = _block(fns.run(params, cache, run_tokens, key, kernels))
            end = time.perf_counter()
            return (made - start, middle - made, end - middle), result
        return run

    runs = timing.interleaved(
        [decoder(params, decoding.compile_decoding(config, spec)) for config, params in variants], repeats)
    out = []
    for variant_runs in runs:
        t = [phases for _, (phases, _) in variant_runs]
        r = variant_runs[-1][1][1]
        out.append({"decoder_s": min(b + c for _, b, c in t), "cache_init_s": min(b for _, b, _ in t),
                    "loop_s": min(c for _, _, c in t), "steps": int(r.steps), "tokens": np.asarray(r.tokens),
                    "kernels_s": min(a for a, _, _ in t)})
    return out


def _cold_caches(batch: int, kv_heads: int, head_dim: int, kv_len: int, working_set_mb: int) -> tuple[int, int]:
    """(K + V float32 bytes of one cache, how many distinct caches fill `working_set_mb`; 2-256)."""
    one = 2 * batch * kv_heads * head_dim * kv_len * 4
    return one, int(min(256, max(2, -(-working_set_mb * 2**20 // one))))


def attention_core_bandwidth(config: T5Config, batch: int, kv_len: int, repeats: int = 5,
                             working_set_mb: int = 1024) -> float:
    """GB/s of one decode query's cross-attention core over a `kv_len` cache, cold.

    Times `decode_attention.cached_attention` (what a decode step runs, in the
    decode-cache layout, float32) alone and divides the K + V bytes it reads
    by the time: how close XLA gets to streaming the cache at this number of
    kv heads. In a decode step the cache comes from memory (the step reads
    the decoder weights and every layer's cache in between), so the timed
    pass cycles through as many distinct caches as make up `working_set_mb`
    (at least 2): timing one cache again and again would read it from the
    last-level cache and report more than memory can deliver.

    Returns:
      GB/s of K + V bytes, fastest of `repeats` passes over the caches.
    """
    g, h, d = config.num_kv_heads, config.num_heads, config.head_dim
    rng = np.random.default_rng(0)
    query = jnp.asarray(rng.random((batch, 1, h, d), np.float32))  # [batch, 1, heads, head_dim]
    one, copies = _cold_caches(batch, g, d, kv_len, working_set_mb)
    caches = [
        (jnp.asarray(rng.random((batch, g, d, kv_len), np.float32)),  # keys [batch, kv_heads, head_dim, length]
         jnp.asarray(rng.random((batch, g, kv_len, d), np.float32)))  # values [batch, kv_heads, length, head_dim]
        for _ in range(copies)
    ]
    core = jax.jit(decode_attention.cached_attention)

    def one_pass():
        for key, value in caches:
            out = core(query, key, value)
        out.block_until_ready()

    seconds, _ = timing.fastest(one_pass, repeats)
    return one * copies / seconds / _GB


def torch_attention_core_bandwidth(config: T5Config, batch: int, kv_len: int, repeats: int = 5,
                                   working_set_mb: int = 1024) -> float:
    """`attention_core_bandwidth` for the same computation in PyTorch (the peer).

    The same grouped single-query core (scores, softmax, weighted values) as
    `torch.matmul`s over `[batch, kv_heads, ...]` caches, on PyTorch's CPU
    threads, cycled through the same working set: what a multi-threaded
    batched matrix-vector product reaches on this machine.
    """
    import torch

    g, h, d = config.num_kv_heads, config.num_heads, config.head_dim
    gen = torch.Generator().manual_seed(0)
    query = torch.rand((batch, g, h // g, d), generator=gen)  # [batch, kv_heads, group, head_dim]
    one, copies = _cold_caches(batch, g, d, kv_len, working_set_mb)
    caches = [(torch.rand((batch, g, d, kv_len), generator=gen), torch.rand((batch, g, kv_len, d), generator=gen))
              for _ in range(copies)]

    def one_pass():
        with torch.inference_mode():
            for key, value in caches:
                torch.matmul(torch.softmax(torch.matmul(query, key), dim=-1), value)

    seconds, _ = timing.fastest(one_pass, repeats)
    return one * copies / seconds / _GB


def _phase(cost: roofline.PhaseCost, seconds: float, machine: dict[str, Any], prefix: str) -> dict[str, Any]:
    """`<prefix>_bound_s`, `<prefix>_roofline_fraction` (bound / measured), bytes, FLOPs, limit."""
    bw, peak = machine["bandwidth_gbs"]["best"], machine["matmul_peak_gflops"]
    bound = cost.bound_s(bw, peak)
    return {f"{prefix}_bytes": cost.bytes, f"{prefix}_flops": cost.flops, f"{prefix}_bound_s": bound,
            f"{prefix}_roofline_fraction": bound / seconds, f"{prefix}_limit": cost.limit(bw, peak)}


def _row(g, config, batch, n_in, n_out, encoder_s, ours, machine, peer: bool = False) -> dict[str, Any]:
    cache = memory.cache_bytes(config, batch, n_in, n_out)
    itemsize = jnp.dtype(config.activation_dtype).itemsize
    step_s = ours["loop_s"] / max(ours["steps"], 1)
    step = roofline.decode_step_cost(config, batch, n_in, n_out, itemsize=itemsize)
    core = attention_core_bandwidth(config, batch, n_in)
    peer_core = {}
    if peer:
        torch_core = torch_attention_core_bandwidth(config, batch, n_in)
        peer_core = {"torch_attention_core_gbs": torch_core,
                     "torch_attention_core_fraction": torch_core / machine["bandwidth_gbs"]["best"]}
    return {
        "num_kv_heads": g,
        "variant": "MQA" if g == 1 else ("MHA" if g == config.num_heads else f"GQA-{g}"),
        "input_length": n_in, "output_length": n_out, "batch": batch,
        "encoder_s": encoder_s, "decoder_s": ours["decoder_s"], "cache_init_s": ours["cache_init_s"],
        "loop_s": ours["loop_s"], "steps": ours["steps"], "step_kernels_s": ours["kernels_s"],
        "tokens_sha256": hashlib.sha256(np.ascontiguousarray(ours["tokens"], np.int32).tobytes()).hexdigest(),
        "time_per_sample_s": (encoder_s + ours["decoder_s"]) / batch,
        "encoder_per_sample_s": encoder_s / batch,
        "decoder_per_sample_s": ours["decoder_s"] / batch,
        "decoder_per_token_s": ours["decoder_s"] / (batch * n_out),
        "kv_cache_bytes_per_sample": (cache["self"] + cache["cross"]) // batch,
        "self_kv_bytes_per_sample": cache["self"] // batch,
        "cross_kv_bytes_per_sample": cache["cross"] // batch,
        "decode_step_s": step_s,
        "decoder_weight_bytes": config.parameter_dtype.itemsize * roofline.decode_step_weights(config),
        "decode_step_bytes": step.bytes,
        "achieved_bandwidth_gbs": step.bytes / step_s / _GB,
        "bandwidth_efficiency": step.bytes / step_s / _GB / machine["bandwidth_gbs"]["best"],
        **_phase(roofline.encoder_cost(config, batch, n_in, itemsize), encoder_s, machine, "encoder"),
        **_phase(roofline.cache_build_cost(config, batch, n_in, itemsize), ours["cache_init_s"], machine, "cache_build"),
        **_phase(step, step_s, machine, "decode_step"),
        "cross_attention_core_gbs": core,
        "cross_attention_core_fraction": core / machine["bandwidth_gbs"]["best"],
        **peer_core,
    }


class _Placement:
    """Puts a shape's parameters and batch on the mesh (or leaves them local).

    One device and `num_partitions=1`: plain local arrays, the single-device
    path. Otherwise T5X's layout through `training.partitioning.Partitioner`.
    """

    def __init__(self, num_partitions: int):
        self.partitioner = None
        if num_partitions > 1 or jax.device_count() > 1:
            self.partitioner = partitioning.Partitioner(num_partitions=num_partitions)

    def params(self, config: T5Config, params: Any) -> Any:
        # Stacked (scan_layers) and cast to config.param_dtype once, here.
        params = decoding.prepare_params(jax.tree_util.tree_map(jnp.asarray, params), config)
        if self.partitioner is None:
            return params
        return jax.device_put(params, self.partitioner.param_shardings(params, config))

    def batch(self, tokens: np.ndarray) -> Array:
        if self.partitioner is None:
            return jnp.asarray(tokens)
        shards = self.partitioner.data_shards
        if tokens.shape[0] % shards:
            raise ValueError(f"batch {tokens.shape[0]} does not divide over {shards} data shards "
                             f"({jax.device_count()} devices / num_partitions={self.partitioner.num_partitions}); "
                             "choose a --batch_size that is a multiple of it.")
        return jax.device_put(tokens, NamedSharding(self.partitioner.mesh, PartitionSpec(partitioning.DATA_AXIS)))


def _bench_shape(settings, base, mha_params, n_in, n_out, batch, machine, log, budget=None):
    """Rows of every kv-head variant at one shape, and the HuggingFace row.

    When every variant fits in memory at once, their timed rounds are
    interleaved (load from other processes hits all alike); otherwise each
    variant is converted, placed, timed and freed before the next, so the
    paper's XXL setting needs one variant's weights and cache at a time.
    Each phase's wall time is logged as it ends.
    """
    tokens = huggingface_peer.bench_tokens(settings.seed, base.vocab_size, batch, n_in)
    place = _Placement(settings.num_partitions)
    jtokens = place.batch(tokens)
    clock = _wall()
    placed_mha = place.params(base, mha_params)
    log(f"[bench] in={n_in} out={n_out} batch={batch}: MHA weights placed in {_wall() - clock:.1f} s")
    fns = decoding.compile_decoding(base, decoding.DecodingSpec(max_decode_length=n_out, eos_id=None))
    clock = _wall()
    encoder_s, encoded = timing.fastest(lambda: _block(fns.encode(placed_mha, jtokens)), settings.repeats)
    log(f"[bench]   encoder {encoder_s:.3f} s (compiled and timed in {_wall() - clock:.1f} s)")
    together = memory.variants_fit_together(base, settings.num_kv_heads, batch, n_in, n_out, budget)
    log(f"[bench]   timing: {'interleaved rounds of all variants' if together else 'one variant at a time (all would not fit)'}")

    def variant(g: int):
        clock = _wall()
        config, params = (base, mha_params) if g == base.num_heads else conversion.convert(base, mha_params, g)
        config = config.replace(dropout_rate=0.0)
        placed = placed_mha if g == base.num_heads else place.params(config, params)
        log(f"[bench]   kv heads {g}: converted and placed in {_wall() - clock:.1f} s")
        return config, placed

    clock = _wall()
    if together:
        variants = [variant(g) for g in settings.num_kv_heads]
        timings = time_variants(variants, encoded, jtokens, n_out, settings.repeats)
        configs = [c for c, _ in variants]
        del variants
    else:
        timings, configs = [], []
        for g in settings.num_kv_heads:
            config, placed = variant(g)
            timings += time_variants([(config, placed)], encoded, jtokens, n_out, settings.repeats)
            configs.append(config)
            del placed
            gc.collect()
    log(f"[bench]   decoders compiled and timed in {_wall() - clock:.1f} s")
    rows, mha_tokens = [], None
    for g, config, ours in zip(settings.num_kv_heads, configs, timings):
        mha_tokens = ours["tokens"] if g == base.num_heads else mha_tokens
        rows.append(_row(g, config, batch, n_in, n_out, encoder_s, ours, machine, settings.huggingface))
        r = rows[-1]
        r["timing"] = "interleaved" if together else "one at a time"
        r["roofline_warnings"] = roofline.over_roofline(r)
        log(f"[bench]   {r['variant']:>7}: {r['time_per_sample_s']:.4f} s/sample (decoder "
            f"{r['decoder_per_sample_s']:.4f}), step {1e3 * r['decode_step_s']:.1f} ms "
            f"({100 * r['decode_step_roofline_fraction']:.0f}% of roofline), "
            f"attn core {r['cross_attention_core_gbs']:.1f} GB/s"
            + (f" (PyTorch {r['torch_attention_core_gbs']:.1f})" if "torch_attention_core_gbs" in r else ""))
        for warning in r["roofline_warnings"]:
            log(f"[bench]   WARNING {r['variant']}: {warning}")
    del encoded
    placed_mha = None  # frees the placed copy before HuggingFace builds its own
    gc.collect()
    if not settings.huggingface:
        return rows, None
    hf = huggingface_peer.time_huggingface_with(base, mha_params, tokens, n_out, settings.huggingface_repeats)
    hf_row = huggingface_peer.huggingface_row(hf, n_in, n_out)
    if mha_tokens is not None:
        hf_row["greedy_token_agreement_with_ours_mha"] = float((hf["tokens"] == mha_tokens).mean())
    for row in rows:
        row["huggingface_time_per_sample_s"] = hf_row["time_per_sample_s"]
        row["speedup_vs_huggingface"] = hf_row["time_per_sample_s"] / row["time_per_sample_s"]
    log(f"[bench]   HF T5 (MHA): {hf_row['time_per_sample_s']:.4f} s/sample "
        f"(decoder {hf_row['decoder_per_sample_s']:.4f})")
    gc.collect()
    return rows, hf_row


def run_benchmark(settings: BenchSettings, log=print) -> dict[str, Any]:
    """Measures every (input length, output length, batch cap, kv heads).

    Returns:
      {'settings', 'machine', 'bandwidth_gbs', 'rows', 'huggingface', ...};
      rows hold seconds and bytes (see `_row`).
    """
    if not settings.config.uniform_kv_heads:  # The sweep varies one count for all decoder attention.
        raise ValueError(f"gqa-t5x bench sweeps one num_kv_heads over a multi-head model; the config has "
                         f"{settings.config.describe_kv_heads()} (per layer or kind): leave the per-layer kv heads unset.")
    base = settings.config.replace(num_kv_heads=None, dropout_rate=0.0)
    for g in settings.num_kv_heads:
        base.replace(num_kv_heads=g)  # validates: a divisor of num_heads
    started = time.time()
    machine = machine_info.describe()
    log(f"[bench] {settings.label or 'model'}: {machine['cpu']}, {machine['cores']} cores, "
        f"load {machine['load_average']}, {machine['memory_available_gb']} GB available")
    machine.update(roofline.measure_machine(settings.bandwidth_mb, dtype=jnp.dtype(base.activation_dtype).name))
    log(f"[bench] measured bandwidth GB/s: {machine['bandwidth_gbs']}; {machine['matmul_dtype']} matmul peak "
        f"{machine['matmul_peak_gflops']} GFLOP/s"
        + (f"; published for {machine['device_kind']}: {machine['published']}" if machine["published"] else ""))
    clock = _wall()
    budget = memory.memory_budget_bytes()  # before the weights: the estimate counts them
    budget = int(budget * settings.memory_fraction) if budget else None
    # One copy in the variants' dtype, shared by them (conversion replaces only the
    # decoder's key/value kernels), drawn a layer at a time (the whole-model program
    # would hold every float32 value at once: 104 GB at XXL).
    mha_params = initialization.init_params(base, settings.seed, dtype=base.parameter_dtype, by_layer=True)
    log(f"[bench] MHA parameters initialised in {_wall() - clock:.1f} s")
    rows, hf_rows = [], []
    for n_in, n_out, cap in itertools.product(settings.input_lengths, settings.output_lengths, settings.batch_caps):
        batch, why = memory.pick_batch(base, cap, n_in, n_out, budget, settings.num_kv_heads)
        log(f"[bench] {why}")
        reasons = [why]

        def halved(failed: int, smaller: int, first_line: str) -> None:
            reasons.append(memory.halved_batch_reason(failed, smaller, first_line))
            log(f"[bench] {reasons[-1]}")

        # The estimate is calibrated on XLA:CPU; a device that needs more halves the batch.
        (shape_rows, hf_row), batch = memory.halve_until_it_fits(
            lambda b: _bench_shape(settings, base, mha_params, n_in, n_out, b, machine, log, budget), batch, halved)
        for row in shape_rows:
            row["batch_asked"], row["batch_reason"] = cap, reasons[-1]
        rows += shape_rows
        hf_rows += [hf_row] if hf_row else []
    machine["load_average_end"] = machine_info.load_average()
    return {
        "label": settings.label,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.time() - started, 1),
        "settings": {**{k: v for k, v in dataclasses.asdict(settings).items() if k != "config"},
                     "config": base.to_dict()},
        "machine": machine, "bandwidth_gbs": machine["bandwidth_gbs"],
        "matmul_peak_gflops": machine["matmul_peak_gflops"], "rows": rows, "huggingface": hf_rows,
    }
