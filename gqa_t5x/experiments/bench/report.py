"""Reports of `gqa-t5x bench`: the table, markdown, JSON and the time-vs-groups plot.

Split from `benchmark.py` (which measures); this module only formats a
results dict produced by `benchmark.run_benchmark`. The markdown and JSON
hold every column; the console table holds the main ones under short
titles and fits 120 columns (`tables.fixed_width`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from gqa_t5x import storage
from gqa_t5x.experiments import figures, tables
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


# The console's columns: (row key, short title); the formatters are _COLUMNS'.
_CONSOLE_COLUMNS = [
    ("variant", "variant"), ("num_kv_heads", "kv"), ("input_length", "in"), ("output_length", "out"),
    ("batch", "batch"), ("encoder_per_sample_s", "enc s"), ("decoder_per_sample_s", "dec s"),
    ("time_per_sample_s", "total s"), ("kv_cache_bytes_per_sample", "KV MB"), ("decode_step_s", "step ms"),
    ("decode_step_roofline_fraction", "step %roof"), ("decoder_per_token_s", "ms/token"),
    ("huggingface_time_per_sample_s", "HF s"), ("speedup_vs_huggingface", "HF / ours"),
]
_CONSOLE_KEYS = 5  # variant, kv heads, in, out, batch: repeated if the table is cut into blocks
_CONSOLE_NOTE = ("Per sample: enc/dec/total s, KV MB. step %roof: roofline bound / measured step. "
                 "Every column: the .md/.json.")


def _cells(results: dict[str, Any], columns: list[tuple[str, str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [title for _, title, _ in columns]
    hf_rows = [dict(hf, variant="HF T5 (MHA)") for hf in results["huggingface"]]
    body = [[fmt(row[key]) if key in row else "-" for key, _, fmt in columns]
            for row in results["rows"] + hf_rows]
    return header, body


def format_table(results: dict[str, Any], markdown: bool = False) -> str:
    """The rows as a table: markdown with every column, or the console's.

    Args:
      results: `benchmark.run_benchmark`'s output.
      markdown: Every column as a markdown table (the .md report); else the
        main columns under short titles as a fixed-width table of at most
        `tables.CONSOLE_WIDTH` characters per line, and a note on the units.

    Returns:
      The table's text.
    """
    if markdown:
        header, body = _cells(results, _COLUMNS)
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    formats = {key: fmt for key, _, fmt in _COLUMNS}
    header, body = _cells(results, [(key, title, formats[key]) for key, title in _CONSOLE_COLUMNS])
    return tables.fixed_width(header, body, keys=_CONSOLE_KEYS) + "\n" + _CONSOLE_NOTE


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
        f"activations {cfg['dtype']}, {cfg.get('param_dtype', 'float32')} weights"
        + (f", encoder attention in blocks of {cfg['attention_query_chunk']} queries"
           if cfg.get("attention_query_chunk") else "")
        + ". Greedy, fixed output length; fastest of "
        f"{results['settings']['repeats']} timed runs after a warm-up "
        f"(HuggingFace: {results['settings'].get('huggingface_repeats', 1)}).",
        "",
        "Roofline of this machine: memory bandwidth (GB/s) "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in bw.items() if k not in ("best", "buffer_mb"))
        + f" (best {bw['best']}, buffer {bw.get('buffer_mb', '-')} MB); {machine.get('matmul_dtype', 'float32')} "
        f"matmul peak {results.get('matmul_peak_gflops', '-')} GFLOP/s"
        + (f"; published for {machine['device_kind']}: {machine['published']}" if machine.get("published") else "")
        + f". Each phase's bound is max(bytes / "
        f"{bw['best']} GB/s, FLOPs / peak) with the minimum bytes and FLOPs of the phase "
        "(gqa_t5x/experiments/roofline.py); '% roofline' = bound / measured time. A decode step's "
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
    reasons = sorted({r["batch_reason"] for r in results["rows"] if r.get("batch_reason")})
    if reasons:
        lines += ["Batch: " + "; ".join(reasons) + ".", ""]
    warnings = [f"- {r['variant']} (in {r['input_length']}, out {r['output_length']}): {w}"
                for r in results["rows"] for w in r.get("roofline_warnings", [])]
    if warnings:
        lines += ["**Roofline warnings** (these phases' '% roofline' figures are not results):", "", *warnings, ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str | os.PathLike) -> None:
    """Time per sample vs kv heads (the paper's Figure 6 style), and relative to MHA.

    Each y axis is logarithmic where its values span decades (HuggingFace's
    time against ours, a long and a short shape), else linear from 0; the
    totals carry their values.
    """
    heads = results["settings"]["config"]["num_heads"]
    fig, (ax, rel) = figures.panels(2, 5.5)
    shapes = sorted({(r["input_length"], r["output_length"], r["batch"]) for r in results["rows"]})
    plotted: list[float] = []
    relative: list[float] = []
    for n_in, n_out, batch in shapes:
        rows = sorted((r for r in results["rows"] if (r["input_length"], r["output_length"], r["batch"]) == (n_in, n_out, batch)),
                      key=lambda r: r["num_kv_heads"])
        g = [r["num_kv_heads"] for r in rows]
        total = [r["time_per_sample_s"] for r in rows]
        decoder = [r["decoder_per_sample_s"] for r in rows]
        tag = f"in {n_in}, out {n_out}, batch {batch}"
        line, = ax.plot(g, total, "o-", label=f"ours, total ({tag})")
        figures.label_values(ax, g, total, color=line.get_color())
        ax.plot(g, decoder, "s--", color=line.get_color(), alpha=0.6, label="ours, decoder only")
        plotted += total + decoder
        hf = [h for h in results["huggingface"] if (h["input_length"], h["output_length"], h["batch"]) == (n_in, n_out, batch)]
        if hf:
            hf_time = hf[0]["time_per_sample_s"]
            ax.axhline(hf_time, color=line.get_color(), linestyle=":",
                       label=f"HuggingFace T5 (no GQA): {hf_time:.3g} s")
            plotted.append(hf_time)
        mha = next((r["time_per_sample_s"] for r in rows if r["num_kv_heads"] == heads), None)
        if mha:
            ratios = [t / mha for t in total]
            rel.plot(g, ratios, "o-", color=line.get_color(), label=f"ours ({tag})")
            figures.label_values(rel, g, ratios, "{:.2f}", color=line.get_color())
            relative += ratios
    if heads == 64:
        pg = sorted(PAPER_XXL_TIME_VS_GROUPS)
        paper_ratios = [PAPER_XXL_TIME_VS_GROUPS[k] / PAPER_XXL_TIME_VS_GROUPS[64] for k in pg]
        rel.plot(pg, paper_ratios, "k^--", label="paper, XXL on TPUv4 (in 2048, out 512)")
        relative += paper_ratios
    for axis in (ax, rel):
        axis.set_xscale("log", base=2)
        ticks = sorted({r["num_kv_heads"] for r in results["rows"]}
                       | (set(PAPER_XXL_TIME_VS_GROUPS) if heads == 64 else set()))
        axis.set_xticks(ticks)
        axis.set_xticklabels([str(t) for t in ticks])
        axis.set_xlabel("GQA groups (kv heads); 1 = MQA, %d = MHA" % heads)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    scale = figures.choose_scale(ax, plotted)
    ax.set_ylabel("time per sample (s)" + (", log scale" if scale == "log" else ""))
    scale = figures.choose_scale(rel, relative)
    rel.set_ylabel("time per sample / MHA" + (", log scale" if scale == "log" else ""))
    if not results["rows"]:
        figures.no_data(ax)
        figures.no_data(rel)
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
