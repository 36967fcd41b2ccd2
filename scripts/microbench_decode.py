"""Microbenchmarks behind the decode path's design choices (XLA:CPU).

    python scripts/microbench_decode.py                 # writes docs/bench_micro.{json,md}
    python scripts/microbench_decode.py --quick         # fewer shapes, no report

Each section times one operation of a decode step in isolation, jit-compiled,
fastest of `--repeats` runs after a warm-up (the fastest, because other
processes on a shared machine only ever add time):

* `machine`: memory bandwidth (numpy copy, JAX read, scale) and the float32
  matmul peak (`benchmark.measure_machine`), the roofline's two numbers.
* `attention_layout`: the single-query attention core over an encoder-length
  cache for each cache layout, at the large-like and XXL-like decode shapes,
  in GB/s of K + V bytes. Picks the decode-cache layout.
* `prefix_blocks`: self-attention at step `i` of a `max_length` cache: the
  whole cache masked (what a fixed-shape step does) vs the blocked prefix
  read (`decode_attention.prefix_attention`) at several block sizes.
* `weight_products`: `[batch, in] x [in, out]` at decode batch sizes, the
  product every decode step spends most of its time in, in GB/s of weight
  bytes, for the formulations XLA:CPU could be given.
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

from gqa_t5x.experiments import benchmark  # noqa: E402
from gqa_t5x.model import attention  # noqa: E402
from gqa_t5x.model import decode_attention  # noqa: E402

_GB = 1e9


def _best(fn, *args, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls after one warm-up call."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


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


# -------------------------------------------------------------- prefix blocks
def prefix_blocks(batch: int, heads: int, kv_heads: int, max_length: int, steps, blocks, repeats: int) -> list[dict]:
    """Self-attention of one step: whole masked cache vs prefix blocks."""
    rng = np.random.default_rng(1)
    query = _random(rng, (batch, 1, heads, 64))
    bias = _random(rng, (1, heads, 1, max_length))
    k = _random(rng, (batch, kv_heads, 64, max_length))
    v = _random(rng, (batch, kv_heads, max_length, 64))
    position_bytes = 2 * batch * kv_heads * 64 * 4  # K + V of one position

    @jax.jit
    def masked(query, k, v, bias, index):
        mask = (jnp.arange(max_length) <= index)[None, None, None, :]
        return decode_attention.cached_attention(query, k, v, bias, mask)

    rows = []
    for step in steps:
        index = jnp.asarray(step, jnp.int32)
        row = {"batch": batch, "heads": heads, "kv_heads": kv_heads, "max_length": max_length, "step": step,
               "written_bytes": (step + 1) * position_bytes,
               "masked_whole_cache_ms": 1e3 * _best(masked, query, k, v, bias, index, repeats=repeats)}
        for block in blocks:
            fn = jax.jit(lambda q, k, v, b, i, block=block: decode_attention.prefix_attention(
                q, k, v, b, i, block_size=block))
            row[f"prefix_block_{block}_ms"] = 1e3 * _best(fn, query, k, v, bias, index, repeats=repeats)
        rows.append(row)
        print(f"[prefix] L={max_length} step {step}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in row.items() if k.endswith("_ms")), flush=True)
    return rows


# ------------------------------------------------------------ weight products
def weight_products(shapes, repeats: int) -> list[dict]:
    """GB/s (weight bytes / time) of `[batch, in] x [in, out]` formulations."""
    rng = np.random.default_rng(2)
    forms = {
        "einsum x.W (layers.Dense)": lambda x, w: jnp.einsum("bi,io->bo", x, w),
        "dot_general W^T.x^T": lambda x, w: jax.lax.dot_general(w, x, (((0,), (1,)), ((), ()))).T,
        "multiply-reduce": lambda x, w: jnp.sum(x[:, :, None] * w[None], axis=1),
    }
    rows = []
    for batch, n_in, n_out in shapes:
        x = _random(rng, (batch, n_in))
        w = _random(rng, (n_in, n_out))
        row = {"batch": batch, "in": n_in, "out": n_out, "weight_mb": w.nbytes / 2**20}
        for name, fn in forms.items():
            row[name] = w.nbytes / _best(jax.jit(fn), x, w, repeats=repeats) / _GB
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


# ------------------------------------------------------------------ report
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
    rows = results["attention_layout"]
    cols = [k for k in rows[0] if k not in ("shape", "batch", "heads", "kv_heads", "length")]
    lines += ["| shape | batch | heads | kv heads | " + " | ".join(cols) + " |", "|" + "---|" * (4 + len(cols))]
    lines += [f"| {r['shape']} | {r['batch']} | {r['heads']} | {r['kv_heads']} | " + " | ".join(
        f"{r[c]:.1f}" for c in cols) + " |" for r in rows]
    lines += ["", "## Self-attention of one step: whole masked cache vs prefix blocks (ms)", ""]
    rows = results["prefix_blocks"]
    cols = [k for k in rows[0] if k.endswith("_ms")]
    lines += ["| batch | heads | kv heads | max length | step | written MB | " + " | ".join(cols) + " |",
              "|" + "---|" * (6 + len(cols))]
    lines += [f"| {r['batch']} | {r['heads']} | {r['kv_heads']} | {r['max_length']} | {r['step']} | "
              f"{r['written_bytes'] / 2**20:.1f} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |" for r in rows]
    lines += ["", "## Weight products at decode batch sizes (GB/s of weight bytes)", ""]
    rows = results["weight_products"]
    cols = [k for k in rows[0] if k not in ("batch", "in", "out", "weight_mb")]
    lines += ["| batch x in x out | weight MB | " + " | ".join(cols) + " |", "|" + "---|" * (2 + len(cols))]
    lines += [f"| {r['batch']}x{r['in']}x{r['out']} | {r['weight_mb']:.0f} | " + " | ".join(
        f"{r[c]:.1f}" for c in cols) + " |" for r in rows]
    lines += ["", "## Encoder attention: einsums vs jax.nn.dot_product_attention (ms, forward and grad)", ""]
    rows = results["encoder_attention"]
    cols = list(rows[0])
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |"
              for r in rows]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="Fewer shapes; print only.")
    parser.add_argument("--out", default=str(REPO / "docs" / "bench_micro"))
    parser.add_argument("--sections", default="layout,prefix,weights,encoder")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    started = benchmark.machine_info()
    machine = {**started, **benchmark.measure_machine()}
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
        results["prefix_blocks"] = []
        for max_length, steps in ((128, (15, 63, 127)), (512, (63, 255, 511))):
            for kv in (16, 8, 1):
                results["prefix_blocks"] += prefix_blocks(16, 16, kv, max_length, steps, (16, 32, 64, 128), args.repeats)
            if args.quick:
                break
    if "weights" in sections:
        shapes = [(16, 1024, 1024), (16, 1024, 2816), (16, 2816, 1024), (16, 1024, 32128)]
        if not args.quick:
            shapes += [(8, 4096, 4096), (8, 4096, 10240), (8, 10240, 4096), (8, 4096, 32128)]
        results["weight_products"] = weight_products(shapes, args.repeats)
    if "encoder" in sections:
        results["encoder_attention"] = encoder_attention([(16, 512, 16, 16), (4, 128, 6, 6), (4, 128, 6, 2)],
                                                         max(3, args.repeats // 4))
    results["load_average_end"] = benchmark.machine_info()["load_average"]
    if not args.quick and sections == {"layout", "prefix", "weights", "encoder"}:
        Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
        Path(args.out + ".md").write_text(_markdown(results))
        print(f"Wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
