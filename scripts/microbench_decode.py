"""Microbenchmarks behind the decode path's design choices (XLA:CPU).

    python scripts/microbench_decode.py                 # writes docs/bench_micro.{json,md}
    python scripts/microbench_decode.py --quick         # fewer shapes, no report

Each section times one operation of a decode step in isolation, jit-compiled,
fastest of `--repeats` runs after a warm-up (the fastest, because other
processes on a shared machine only ever add time):

* `machine`: memory bandwidth (numpy copy, JAX read, scale) and the float32
  matmul peak (`roofline.measure_machine`), the roofline's two numbers.
* `attention_layout`: the single-query attention core over an encoder-length
  cache for each cache layout, at the large-like and XXL-like decode shapes,
  in GB/s of K + V bytes. Picks the decode-cache layout.
* `prefix_reads`: self-attention at step `i` of a `max_length` cache: the
  whole cache masked (what a fixed-shape step did), the segment's shorter
  cache masked (what decoding does now), and a flash-decoding style loop
  over blocks with an online softmax (the alternative XLA:CPU made slower).
* `weight_products`: `[batch, in] x [in, out]` at decode batch sizes, the
  product every decode step spends most of its time in, in GB/s of weight
  bytes, for the formulations XLA:CPU could be given (the kernel as stored,
  `[in, out]`, or transposed once to `[out, in]`).
* `memory_cores`: the same single-query attention core with its caches in
  memory, as in a decode step (the pass cycles through 1 GiB of distinct
  caches, `benchmark.attention_core_bandwidth`): XLA on every core, XLA in a
  process pinned to one core, and PyTorch's `torch.matmul` on its CPU
  threads. Shows whether XLA:CPU spreads the batched single-query products
  over the cores.
* `encoder_products`: the encoder's float32 matrix products (large-like and
  XXL-like MLP shapes) in GFLOP/s: XLA:CPU as configured, XLA:CPU with
  `--xla_cpu_use_xnnpack=true` (a child process, the flag is process-wide),
  and PyTorch's `torch.matmul` (MKL / oneDNN) on the same cores.
* `encoder_attention`: the encoder's attention (training/encoder shapes)
  through the einsums vs `jax.nn.dot_product_attention` (implementation
  'xla').
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gqa_t5x.experiments.bench import benchmark  # noqa: E402
from gqa_t5x.experiments import roofline  # noqa: E402
from gqa_t5x.experiments import machine as machine_info  # noqa: E402
from gqa_t5x.experiments import timing  # noqa: E402
from gqa_t5x.model import attention  # noqa: E402
from gqa_t5x.model import decode_attention  # noqa: E402
from gqa_t5x.model import layers  # noqa: E402

_GB = 1e9


def _best(fn, *args, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls after one warm-up call (`timing.fastest`)."""
    return timing.fastest(lambda: jax.block_until_ready(fn(*args)), repeats)[0]


def _random(rng: np.random.Generator, shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape, np.float32))


# ----------------------------------------------------------- attention layout
def _layout_fns():
    """(name, key layout, value layout, fn(q [b,g,r,d], k, v)) per candidate."""

    def current(q, k, v):  # k, v [b, L, g, d] (the training layout)
        logits = jnp.einsum("bgrd,bkgd->bgrk", q, k)
        return jnp.einsum("bgrk,bkgd->bgrd", jax.nn.softmax(logits, axis=-1), v)

    def t5x(q, k, v):  # k, v [b, g, d, L] (T5X's TPU decode layout)
        logits = jnp.einsum("bgrd,bgdk->bgrk", q, k)
        return jnp.einsum("bgrk,bgdk->bgrd", jax.nn.softmax(logits, axis=-1), v)

    def ours(q, k, v):  # k [b, g, d, L], v [b, g, L, d]
        logits = jnp.einsum("bgrd,bgdk->bgrk", q, k)
        return jnp.einsum("bgrk,bgkd->bgrd", jax.nn.softmax(logits, axis=-1), v)

    def heads_major(q, k, v):  # k, v [b, g, L, d]
        logits = jnp.einsum("bgrd,bgkd->bgrk", q, k)
        return jnp.einsum("bgrk,bgkd->bgrd", jax.nn.softmax(logits, axis=-1), v)

    return [
        ("K,V [b,L,g,d] (training layout, before)", "bLgd", "bLgd", current),
        ("K,V [b,g,d,L] (T5X decode layout)", "bgdL", "bgdL", t5x),
        ("K [b,g,d,L], V [b,g,L,d] (chosen)", "bgdL", "bgLd", ours),
        ("K,V [b,g,L,d]", "bgLd", "bgLd", heads_major),
    ]


def attention_layout(shapes, repeats: int) -> list[dict]:
    """GB/s (K + V bytes / time) of the single-query attention core per layout."""
    rng = np.random.default_rng(0)
    rows = []
    for label, batch, heads, kv_heads, length in shapes:
        group = heads // kv_heads
        q = _random(rng, (batch, kv_heads, group, 64))
        dims = {"b": batch, "L": length, "g": kv_heads, "d": 64}
        row = {"shape": label, "batch": batch, "heads": heads, "kv_heads": kv_heads, "length": length}
        kv_bytes = 2 * batch * length * kv_heads * 64 * 4
        for name, k_layout, v_layout, fn in _layout_fns():
            k = _random(rng, tuple(dims[c] for c in k_layout))
            v = _random(rng, tuple(dims[c] for c in v_layout))
            row[name] = kv_bytes / _best(jax.jit(fn), q, k, v, repeats=repeats) / _GB
        # The function the decoder calls (grouping reshapes included).
        query = _random(rng, (batch, 1, heads, 64))
        k = _random(rng, (batch, kv_heads, 64, length))
        v = _random(rng, (batch, kv_heads, length, 64))
        row["decode_attention.cached_attention"] = kv_bytes / _best(
            jax.jit(decode_attention.cached_attention), query, k, v, repeats=repeats) / _GB
        rows.append(row)
        print(f"[layout] {label} kv={kv_heads}: " + ", ".join(
            f"{k.split(' (')[0]} {v:.1f}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return rows


# ---------------------------------------------------------------- prefix reads
def blockwise_online_softmax(query, key, value, bias, index, block):
    """Flash-decoding style alternative: a loop over cache blocks 0..index // block
    (traced trip count), merged with an online softmax. Query `[b, 1, h, d]`,
    key `[b, g, d, L]`, value `[b, g, L, d]`, bias `[1, h, 1, L]`."""
    batch, _, heads, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    bias = bias.reshape(1, kv_heads, heads // kv_heads, -1)
    offsets = jnp.arange(block)

    def step(i, carry):
        top, total, acc = carry
        start = i * block
        k = jax.lax.dynamic_slice_in_dim(key, start, block, axis=3)  # a copy on XLA:CPU
        v = jax.lax.dynamic_slice_in_dim(value, start, block, axis=2)
        logits = jnp.einsum("bgrd,bgdk->bgrk", q, k) + jax.lax.dynamic_slice_in_dim(bias, start, block, axis=3)
        logits = jnp.where(start + offsets <= index, logits, -1e10)
        new_top = jnp.maximum(top, logits.max(-1))
        scale = jnp.exp(top - new_top)
        probs = jnp.exp(logits - new_top[..., None])
        return (new_top, total * scale + probs.sum(-1),
                acc * scale[..., None] + jnp.einsum("bgrk,bgkd->bgrd", probs, v))

    init = (jnp.full(q.shape[:3], -1e30), jnp.zeros(q.shape[:3]), jnp.zeros(q.shape))
    _, total, acc = jax.lax.fori_loop(0, index // block + 1, step, init)
    return (acc / total[..., None]).reshape(batch, 1, heads, dim)


def prefix_reads(batch: int, heads: int, kv_heads: int, max_length: int, steps, repeats: int) -> list[dict]:
    """Self-attention of one step at position `step`: ms of
    * the whole `max_length` cache read in one masked pass (before),
    * the segment's cache (`self_attention_segments`: as long as the segment
      holding `step`) read in one masked pass (what decoding does),
    * blocks of 32 up to `step` merged by an online softmax (rejected)."""
    rng = np.random.default_rng(1)
    query = _random(rng, (batch, 1, heads, 64))
    bias = _random(rng, (1, heads, 1, max_length))
    k = _random(rng, (batch, kv_heads, 64, max_length))
    v = _random(rng, (batch, kv_heads, max_length, 64))
    ends = decode_attention.self_attention_segments(max_length)

    def masked(query, k, v, bias, index):
        mask = (jnp.arange(k.shape[3]) <= index)[None, None, None, :]
        return decode_attention.cached_attention(query, k, v, bias, mask)

    fn = jax.jit(masked)
    blocks = jax.jit(blockwise_online_softmax, static_argnums=5)
    rows = []
    for step in steps:
        end = next(e for e in ends if e > step)
        index = jnp.asarray(step, jnp.int32)
        seg = (query, k[..., :end] + 0, v[:, :, :end] + 0, bias[..., :end] + 0, index)
        row = {"batch": batch, "heads": heads, "kv_heads": kv_heads, "max_length": max_length, "step": step,
               "segment_end": end,
               "whole cache, masked (before) ms": 1e3 * _best(fn, query, k, v, bias, index, repeats=repeats),
               "segment cache, masked (now) ms": 1e3 * _best(fn, *seg, repeats=repeats),
               "blocks of 32, online softmax ms": 1e3 * _best(blocks, query, k, v, bias, index, 32, repeats=repeats)}
        rows.append(row)
        print(f"[prefix] L={max_length} kv={kv_heads} step {step}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in row.items() if k.endswith("ms")), flush=True)
    return rows


# ------------------------------------------------------------ weight products
def weight_products(shapes, repeats: int) -> list[dict]:
    """GB/s (weight bytes / time) of `[batch, in] x [in, out]` formulations.

    Variants are timed in interleaved rounds (load from other processes falls
    on all alike), fastest round kept. 'transpose once' is the one-time cost
    of the `[out, in]` copy (`decode_step.decode_kernels`), in ms.
    """
    rng = np.random.default_rng(2)
    forms = {
        "x . W[in,out] (before)": lambda x, w, wt: jnp.einsum("bi,io->bo", x, w),
        "W^T[out,in] . x^T, out-major (layers.out_major_matmul)": lambda x, w, wt: layers.out_major_matmul(x, wt),
        "W[in,out] as lhs, out-major": lambda x, w, wt: jax.lax.dot_general(w, x, (((0,), (1,)), ((), ()))),
        "multiply-reduce over W^T": lambda x, w, wt: jnp.sum(wt[:, None, :] * x[None], axis=-1).T,
    }
    rows = []
    for batch, n_in, n_out in shapes:
        x = _random(rng, (batch, n_in))
        w = _random(rng, (n_in, n_out))
        wt = jnp.asarray(np.ascontiguousarray(np.asarray(w).T))
        fns = {name: jax.jit(fn) for name, fn in forms.items()}
        best = {name: float("inf") for name in fns}
        for fn in fns.values():
            jax.block_until_ready(fn(x, w, wt))
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(x, w, wt))
                best[name] = min(best[name], time.perf_counter() - start)
        row = {"batch": batch, "in": n_in, "out": n_out, "weight_mb": w.nbytes / 2**20}
        row.update({name: w.nbytes / seconds / _GB for name, seconds in best.items()})
        row["transpose once (ms)"] = 1e3 * _best(jax.jit(jnp.transpose), w, repeats=max(2, repeats // 4))
        rows.append(row)
        print(f"[weights] {batch}x{n_in}x{n_out}: " + ", ".join(
            f"{k} {v:.1f}" for k, v in row.items() if isinstance(v, float) and k != "weight_mb"), flush=True)
    return rows


# ---------------------------------------------------------- encoder attention
def encoder_attention(shapes, repeats: int) -> list[dict]:
    """Milliseconds of the einsum core vs `jax.nn.dot_product_attention` (xla)."""
    rng = np.random.default_rng(3)
    rows = []
    for batch, length, heads, kv_heads in shapes:
        q = _random(rng, (batch, length, heads, 64))
        k = _random(rng, (batch, length, kv_heads, 64))
        v = _random(rng, (batch, length, kv_heads, 64))
        bias = _random(rng, (1, heads, length, length))
        mask = jnp.ones((batch, 1, length, length), jnp.float32)
        einsum = jax.jit(attention.grouped_dot_product_attention)
        fused = jax.jit(attention.dot_product_attention)
        row = {"batch": batch, "length": length, "heads": heads, "kv_heads": kv_heads,
               "einsum_ms": 1e3 * _best(einsum, q, k, v, bias, mask, repeats=repeats),
               "jax.nn.dot_product_attention_ms": 1e3 * _best(fused, q, k, v, bias, mask, repeats=repeats)}
        grad = lambda f: jax.jit(jax.grad(lambda q, k, v, b, m: jnp.sum(f(q, k, v, b, m)), argnums=(0, 1, 2, 3)))  # noqa: E731
        row["einsum_grad_ms"] = 1e3 * _best(grad(attention.grouped_dot_product_attention), q, k, v, bias, mask, repeats=repeats)
        row["fused_grad_ms"] = 1e3 * _best(grad(attention.dot_product_attention), q, k, v, bias, mask, repeats=repeats)
        rows.append(row)
        print(f"[encoder] {row}", flush=True)
    return rows


# --------------------------------------------------------- child processes
def _child(flag: str, shapes, repeats: int, preexec_fn=None, **env: str) -> list[float]:
    """Runs this script's `flag` mode on `shapes` in a fresh process (for settings
    fixed at JAX start-up: CPU affinity, XLA_FLAGS); returns its list of numbers."""
    import subprocess

    child = subprocess.run(
        [sys.executable, __file__, flag, json.dumps(shapes), "--repeats", str(repeats)],
        preexec_fn=preexec_fn, capture_output=True, text=True, check=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
    return json.loads(child.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------- encoder products
ENCODER_PRODUCTS = ((8192, 1024, 2816), (8192, 2816, 1024), (4096, 4096, 10240), (4096, 10240, 4096))


def _xla_products(shapes, repeats: int) -> list[float]:
    rng = np.random.default_rng(4)
    out = []
    for m, k, n in shapes:
        a, b = _random(rng, (m, k)), _random(rng, (k, n))
        out.append(2 * m * k * n / _best(jax.jit(jnp.matmul), a, b, repeats=repeats) / 1e9)
    return out


def encoder_products(shapes, repeats: int) -> list[dict]:
    """GFLOP/s of `[m, k] x [k, n]` float32 products: XLA, XLA + XNNPACK, PyTorch."""

    import torch

    xnnpack = _child("--products_child", shapes, repeats,
                     XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_xnnpack=true").strip())
    rows = []
    for (m, k, n), xla, xnn in zip(shapes, _xla_products(shapes, repeats), xnnpack):
        gen = torch.Generator().manual_seed(4)
        a, b = torch.randn((m, k), generator=gen), torch.randn((k, n), generator=gen)
        with torch.inference_mode():
            peer = 2 * m * k * n / timing.fastest(lambda: torch.matmul(a, b), repeats)[0] / 1e9
        rows.append({"m x k x n": f"{m}x{k}x{n}", "XLA:CPU": xla, "XLA:CPU --xla_cpu_use_xnnpack=true": xnn,
                     f"PyTorch torch.matmul, {torch.get_num_threads()} threads": peer})
        print(f"[products] {m}x{k}x{n}: XLA {xla:.0f}, XLA+XNNPACK {xnn:.0f}, PyTorch {peer:.0f} GFLOP/s",
              flush=True)
    return rows


# ------------------------------------------------------------ memory cores
def _core_config(heads: int, kv_heads: int):
    from gqa_t5x.model.config import T5Config

    return T5Config(vocab_size=128, emb_dim=64, num_heads=heads, head_dim=64, mlp_dim=64,
                    num_encoder_layers=1, num_decoder_layers=1, num_kv_heads=kv_heads)


def _xla_cores(shapes, repeats: int) -> list[float]:
    return [benchmark.attention_core_bandwidth(_core_config(h, g), b, n, repeats=repeats)
            for _, b, h, g, n in shapes]


def memory_cores(shapes, repeats: int) -> list[dict]:
    """GB/s of the decode cross-attention core over caches that come from memory."""

    cpu = sorted(os.sched_getaffinity(0))[0]
    one_core = _child("--one_core_child", shapes, repeats, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    rows = []
    for (label, b, h, g, n), xla, pinned in zip(shapes, _xla_cores(shapes, repeats), one_core):
        peer = benchmark.torch_attention_core_bandwidth(_core_config(h, g), b, n, repeats=repeats)
        rows.append({"shape": label, "batch": b, "heads": h, "kv_heads": g, "length": n,
                     "XLA, all cores": xla, "XLA, process pinned to one core": pinned,
                     f"PyTorch torch.matmul, {_torch_threads()} threads": peer})
        print(f"[cores] {label} kv={g}: XLA {xla:.1f}, XLA one core {pinned:.1f}, PyTorch {peer:.1f} GB/s",
              flush=True)
    return rows


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# ------------------------------------------------------------------ report
def _core_table(rows: list[dict]) -> list[str]:
    """Markdown rows of an attention-core table: the shape columns, then GB/s per method."""
    cols = [k for k in rows[0] if k not in ("shape", "batch", "heads", "kv_heads", "length")]
    lines = ["| shape | batch | heads | kv heads | " + " | ".join(cols) + " |", "|" + "---|" * (4 + len(cols))]
    return lines + [f"| {r['shape']} | {r['batch']} | {r['heads']} | {r['kv_heads']} | " + " | ".join(
        f"{r[c]:.1f}" for c in cols) + " |" for r in rows]


def _plain_table(rows: list[dict], number: str) -> list[str]:
    """Markdown rows of every field, floats formatted with `number`."""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return lines + ["| " + " | ".join(number.format(r[c]) if isinstance(r[c], float) else str(r[c]) for c in cols)
                    + " |" for r in rows]


def _markdown(results: dict) -> str:
    m, bw = results["machine"], results["machine"]["bandwidth_gbs"]
    lines = [
        "# Decode-path microbenchmarks (XLA:CPU)",
        "",
        f"{results['date']}, {m['cpu']}, {m['cores']} cores, JAX {m['jax']}; load average "
        f"{m['load_average']} at start, {results['load_average_end']} at end. "
        f"`python scripts/microbench_decode.py` (fastest of {results['repeats']} runs after a warm-up).",
        "",
        f"Roofline numbers of this machine: bandwidth (GB/s) numpy copy {bw['numpy_copy']}, JAX read "
        f"{bw['jax_read']}, JAX scale {bw['jax_scale']} (best {bw['best']}); float32 matmul peak "
        f"{results['machine']['matmul_peak_gflops']} GFLOP/s.",
        "",
        "## Attention core by cache layout (GB/s of K + V, single query, length = encoder length)",
        "",
    ]
    lines += _core_table(results["attention_layout"])
    lines += ["", "## Prefix reads: self-attention of one step at position `step` (ms)", ""]
    rows = results["prefix_reads"]
    cols = [k for k in rows[0] if k.endswith("ms")]
    lines += ["| batch | heads | kv heads | max length | step | segment end | " + " | ".join(cols) + " |",
              "|" + "---|" * (6 + len(cols))]
    lines += [f"| {r['batch']} | {r['heads']} | {r['kv_heads']} | {r['max_length']} | {r['step']} | "
              f"{r['segment_end']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |" for r in rows]
    lines += ["", "## Weight products at decode batch sizes (GB/s of weight bytes)", ""]
    rows = results["weight_products"]
    cols = [k for k in rows[0] if k not in ("batch", "in", "out", "weight_mb")]
    lines += ["| batch x in x out | weight MB | " + " | ".join(cols) + " |", "|" + "---|" * (2 + len(cols))]
    lines += [f"| {r['batch']}x{r['in']}x{r['out']} | {r['weight_mb']:.0f} | " + " | ".join(
        f"{r[c]:.1f}" for c in cols) + " |" for r in rows]
    lines += ["", "## Attention core with its caches in memory (GB/s of K + V; 1 GiB of distinct caches per pass)", ""]
    lines += _core_table(results["memory_cores"])
    lines += ["", "## Encoder products: float32 `[m, k] x [k, n]` (GFLOP/s)", ""]
    lines += _plain_table(results["encoder_products"], "{:.0f}")
    lines += ["", "## Encoder attention: einsums vs jax.nn.dot_product_attention (ms, forward and grad)", ""]
    lines += _plain_table(results["encoder_attention"], "{:.2f}")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="Fewer shapes; print only.")
    parser.add_argument("--out", default=str(REPO / "docs" / "bench_micro"))
    parser.add_argument("--sections", default="layout,prefix,weights,cores,products,encoder")
    parser.add_argument("--one_core_child", help=argparse.SUPPRESS)  # JSON shapes; set by memory_cores
    parser.add_argument("--products_child", help=argparse.SUPPRESS)  # JSON shapes; set by encoder_products
    args = parser.parse_args(argv)
    if args.products_child:
        print(json.dumps(_xla_products([tuple(s) for s in json.loads(args.products_child)], args.repeats)))
        return 0
    if args.one_core_child:
        print(json.dumps(_xla_cores([tuple(s) for s in json.loads(args.one_core_child)], args.repeats)))
        return 0
    sections = set(args.sections.split(","))
    started = machine_info.describe()
    machine = {**started, **roofline.measure_machine()}
    print(f"[machine] {machine['cpu']}: bandwidth {machine['bandwidth_gbs']}, "
          f"matmul peak {machine['matmul_peak_gflops']} GFLOP/s", flush=True)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "repeats": args.repeats, "machine": machine}
    layout_shapes = [("large-like", 16, 16, g, 512) for g in (1, 8, 16)]
    if not args.quick:
        layout_shapes += [("XXL-like", 8, 64, g, 512) for g in (1, 8, 64)]
    if "layout" in sections:
        results["attention_layout"] = attention_layout(layout_shapes, args.repeats)
    if "prefix" in sections:
        results["prefix_reads"] = []
        for max_length, steps in ((128, (15, 63, 127)), (512, (63, 255, 511))):
            for kv in (16, 8, 1):
                results["prefix_reads"] += prefix_reads(16, 16, kv, max_length, steps, args.repeats)
            if args.quick:
                break
    if "weights" in sections:
        shapes = [(16, 1024, 1024), (16, 1024, 2816), (16, 2816, 1024), (16, 1024, 32128)]
        if not args.quick:
            shapes += [(8, 4096, 4096), (8, 4096, 10240), (8, 10240, 4096), (8, 4096, 32128)]
        results["weight_products"] = weight_products(shapes, args.repeats)
    if "cores" in sections:
        results["memory_cores"] = memory_cores(layout_shapes, max(3, args.repeats // 4))
    if "products" in sections:
        results["encoder_products"] = encoder_products(ENCODER_PRODUCTS[:1] if args.quick else ENCODER_PRODUCTS,
                                                       max(3, args.repeats // 4))
    if "encoder" in sections:
        results["encoder_attention"] = encoder_attention([(16, 512, 16, 16), (4, 128, 6, 6), (4, 128, 6, 2)],
                                                         max(3, args.repeats // 4))
    results["load_average_end"] = machine_info.load_average()
    if not args.quick and sections == {"layout", "prefix", "weights", "cores", "products", "encoder"}:
        Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
        Path(args.out + ".md").write_text(_markdown(results))
        print(f"Wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
