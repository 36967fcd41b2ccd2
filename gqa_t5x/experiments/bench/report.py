"""Reports of `gqa-t5x bench`: the table, markdown, JSON and the time-vs-groups plot.

Split from `benchmark.py` (which measures); this module only formats a
results dict produced by `benchmark.run_benchmark`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from gqa_t5x import storage
from gqa_t5x.experiments import figures
from gqa_t5x.experiments.paper import TIME_VS_GROUPS as PAPER_XXL_TIME_VS_GROUPS
from gqa_t5x.storage import Path

_pct = lambda v: f"{100 * v:.0f}%"  # noqa: E731

# (row key, column title, formatter)
_COLUMNS = [
    ("variant", "variant", str), ("num_kv_heads", "kv heads", str), ("input_length", "in", str),
    ("output_length", "out", str), ("batch", "batch", str),
    ("encoder_per_sample_s", "enc s/sample", "{:.4f}".format),
    ("encoder_roofline_fraction", "enc % roofline", _pct),
    ("decoder_per_sample_s", "dec s/sample", "{:.4f}".format),
    ("time_per_sample_s", "total s/sample", "{:.4f}".format),
    ("kv_cache_bytes_per_sample", "KV MB/sample", lambda v: f"{v / 2**20:.1f}"),
    ("step_kernels_s", "step kernels s (once per model)", "{:.3f}".format),
    ("cache_init_s", "cache build s", "{:.3f}".format),
    ("cache_build_roofline_fraction", "cache build % roofline", _pct),
    ("decode_step_s", "step ms", lambda v: f"{1e3 * v:.1f}"),
    ("decode_step_bound_s", "step bound ms", lambda v: f"{1e3 * v:.1f}"),
    ("decode_step_roofline_fraction", "step % roofline", _pct),
    ("decoder_per_token_s", "dec ms/token", lambda v: f"{1e3 * v:.2f}"),
    ("cross_attention_core_gbs", "attn core GB/s", "{:.1f}".format),
    ("cross_attention_core_fraction", "attn core % of BW", _pct),
    ("torch_attention_core_gbs", "PyTorch attn core GB/s", "{:.1f}".format),
    ("huggingface_time_per_sample_s", "HF s/sample", "{:.4f}".format),
    ("speedup_vs_huggingface", "HF / ours", "{:.2f}x".format),
]


def format_table(results: dict[str, Any], markdown: bool = False) -> str:
    """The rows as a fixed-width (or markdown) table."""
    header = [title for _, title, _ in _COLUMNS]
    hf_rows = [dict(hf, variant="HF T5 (MHA)") for hf in results["huggingface"]]
    body = [[fmt(row[key]) if key in row else "-" for key, _, fmt in _COLUMNS]
            for row in results["rows"] + hf_rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def _markdown(results: dict[str, Any]) -> str:
    cfg, machine, bw = results["settings"]["config"], results["machine"], results["bandwidth_gbs"]
    lines = [
        f"# Decoding benchmark: {results['label'] or 'model'}",
        "",
        f"{results['date']}, {machine['cpu']}, {machine['cores']} cores, JAX {machine['jax']} "
        f"({', '.join(machine['jax_devices'])}), load average {machine['load_average']} at start, "
        f"{machine['load_average_end']} at end; wall {results['wall_s']} s."
        + (f" Model split over {results['settings']['num_partitions']} devices (num_partitions)."
           if results["settings"].get("num_partitions", 1) > 1 else ""),
        "",
        f"Model: emb {cfg['emb_dim']}, {cfg['num_heads']} heads x {cfg['head_dim']}, mlp {cfg['mlp_dim']}, "
        f"{cfg['num_encoder_layers']} encoder / {cfg['num_decoder_layers']} decoder layers, vocab {cfg['vocab_size']}, "
        f"activations {cfg['dtype']}, float32 weights. Greedy, fixed output length; fastest of "
        f"{results['settings']['repeats']} timed runs after a warm-up "
        f"(HuggingFace: {results['settings'].get('huggingface_repeats', 1)}).",
        "",
        f"Roofline of this machine: memory bandwidth (GB/s) numpy copy {bw['numpy_copy']}, JAX scale "
        f"{bw['jax_scale']}, JAX read {bw['jax_read']} (best {bw['best']}); float32 matmul peak "
        f"{results.get('matmul_peak_gflops', '-')} GFLOP/s. Each phase's bound is max(bytes / "
        f"{bw['best']} GB/s, FLOPs / peak) with the minimum bytes and FLOPs of the phase "
        "(gqa_t5x/experiments/bench/roofline.py); '% roofline' = bound / measured time. A decode step's "
        "bytes: the decoder weights it uses, the whole cross-attention cache and the self-attention "
        "positions written so far (averaged over the steps). 'attn core GB/s': the decoder's "
        "cross-attention core alone (decode_attention.cached_attention) for one query over the "
        "encoder-length cache, K + V bytes / time, cycling through 1 GiB of distinct caches so "
        "that they come from memory as in a decode step; '% of BW' against the best bandwidth; "
        "'PyTorch attn core' the same computation as torch.matmuls on PyTorch's CPU threads. "
        "'dec ms/token': decoder time / (batch x out). The decoder's time is the cache build plus "
        "the step loop; 'step kernels' (on CPU the decoder kernels transposed for the steps, made once "
        "per model as `infer` does) is reported apart from it.",
        "",
        format_table(results, markdown=True),
        "",
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str | os.PathLike) -> None:
    """Time per sample vs kv heads (the paper's Figure 6 style), and relative to MHA."""
    heads = results["settings"]["config"]["num_heads"]
    fig, (ax, rel) = figures.panels(2, 5.5)
    shapes = sorted({(r["input_length"], r["output_length"], r["batch"]) for r in results["rows"]})
    for n_in, n_out, batch in shapes:
        rows = sorted((r for r in results["rows"] if (r["input_length"], r["output_length"], r["batch"]) == (n_in, n_out, batch)),
                      key=lambda r: r["num_kv_heads"])
        g = [r["num_kv_heads"] for r in rows]
        total = [r["time_per_sample_s"] for r in rows]
        tag = f"in {n_in}, out {n_out}, batch {batch}"
        line, = ax.plot(g, total, "o-", label=f"ours, total ({tag})")
        ax.plot(g, [r["decoder_per_sample_s"] for r in rows], "s--", color=line.get_color(), alpha=0.6,
                label="ours, decoder only")
        hf = [h for h in results["huggingface"] if (h["input_length"], h["output_length"], h["batch"]) == (n_in, n_out, batch)]
        if hf:
            ax.axhline(hf[0]["time_per_sample_s"], color=line.get_color(), linestyle=":",
                       label="HuggingFace T5 (no GQA)")
        mha = next((r["time_per_sample_s"] for r in rows if r["num_kv_heads"] == heads), None)
        if mha:
            rel.plot(g, [t / mha for t in total], "o-", color=line.get_color(), label=f"ours ({tag})")
    if heads == 64:
        pg = sorted(PAPER_XXL_TIME_VS_GROUPS)
        rel.plot(pg, [PAPER_XXL_TIME_VS_GROUPS[k] / PAPER_XXL_TIME_VS_GROUPS[64] for k in pg], "k^--",
                 label="paper, XXL on TPUv4 (in 2048, out 512)")
    for axis in (ax, rel):
        axis.set_xscale("log", base=2)
        ticks = sorted({r["num_kv_heads"] for r in results["rows"]}
                       | (set(PAPER_XXL_TIME_VS_GROUPS) if heads == 64 else set()))
        axis.set_xticks(ticks)
        axis.set_xticklabels([str(t) for t in ticks])
        axis.set_xlabel("GQA groups (kv heads); 1 = MQA, %d = MHA" % heads)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    ax.set_ylabel("time per sample (s)")
    ax.set_ylim(bottom=0)
    rel.set_ylabel("time per sample / MHA")
    rel.set_ylim(bottom=0)
    fig.suptitle(f"{results['label'] or 'model'}: greedy decoding time vs number of GQA groups "
                 f"({results['machine']['cpu']}, {results['machine']['cores']} cores)", fontsize=9)
    figures.save_figure(fig, path, dpi=120)


def write_reports(results: dict[str, Any], prefix: str | os.PathLike) -> dict[str, Path]:
    """Writes `<prefix>.json`, `<prefix>.md` and `<prefix>.png` (local or gs://)."""
    prefix = storage.as_path(prefix, name="--output")
    files = {ext: prefix.parent / f"{prefix.name}.{ext}" for ext in ("json", "md", "png")}
    storage.replace_file(files["json"], json.dumps(results, indent=1, sort_keys=False) + "\n")
    storage.replace_file(files["md"], _markdown(results))
    plot(results, files["png"])
    return files
