"""Before/after table of two `gqa-t5x bench` runs made in one sitting.

    python scripts/bench_compare.py --before /tmp/before_large.json --after docs/bench_decode_large.json \
        --out docs/bench_decode_compare_large.md [--longer docs/bench_decode_large_out512.json]

`--before` may come from the checkout before the speed work
(`python -m gqa_t5x.benchmark ...` in the old flat layout, no roofline
fields): its "% roofline" divides the `--after` run's bound for the same
shape (the same `roofline.py` counts, the machine numbers measured by the
`--after` run) by its step time, so both columns share one roofline. Both runs
are compared with the `--after` run's HuggingFace measurement when the
`--before` run skipped HuggingFace.

`--longer`: a run of the same shape at a longer output length; the table
then gives each variant's decoder time per token at both lengths and the
growth the self-attention cache bytes explain: per step, the extra written
positions read on average, at the measured bandwidth.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path



def _rows(results: dict) -> dict[int, dict]:
    return {r["num_kv_heads"]: r for r in results["rows"]}


def compare(before: dict, after: dict, longer: dict | None = None) -> str:
    """The markdown comparison."""
    machine = after["machine"]
    bw = machine["bandwidth_gbs"]["best"]
    hf_after = after["huggingface"][0] if after["huggingface"] else None
    hf_before = before["huggingface"][0] if before["huggingface"] else hf_after
    old, new = _rows(before), _rows(after)
    lines = [
        f"# Before / after: {after['label']}",
        "",
        f"One sitting on {machine['cpu']}, {machine['cores']} cores: the code before the speed work "
        f"({before['date']}, load {before['machine']['load_average']} -> {before['machine'].get('load_average_end')}) "
        f"and after it ({after['date']}, load {machine['load_average']} -> {machine.get('load_average_end')}). "
        f"Roofline of this machine (measured by the after run): bandwidth {bw} GB/s "
        f"(numpy copy {machine['bandwidth_gbs']['numpy_copy']}, JAX read {machine['bandwidth_gbs']['jax_read']}), "
        f"float32 matmul peak {machine['matmul_peak_gflops']} GFLOP/s; both columns use it and the same "
        "byte/FLOP counts (gqa_t5x/experiments/roofline.py). 'attn core' is each version's own decode "
        "cross-attention core (before: the training layout, timed over one cache again and again as that "
        "version's benchmark did, so partly from the last-level cache; after: the decode layout, timed "
        "over 1 GiB of distinct caches so that they come from memory as in a decode step); 'PyTorch' "
        "the same core as torch.matmuls, timed like the after column. HF = HuggingFace "
        f"`generate` on the same weights: {hf_before['time_per_sample_s']:.3f} s/sample in the before run, "
        f"{hf_after['time_per_sample_s']:.3f} in the after run." if hf_after else "",
        "",
        "| variant | step ms before | step ms after | step bound ms | % roofline before | % roofline after "
        "| attn core GB/s before | after | after % of BW | PyTorch attn core GB/s | total s/sample before | after "
        "| HF / ours before | after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in sorted(new):
        a, b = new[g], old.get(g)
        bound = a["decode_step_bound_s"]
        if b is None:
            continue
        frac_before = bound / b["decode_step_s"]
        hf_b = hf_before["time_per_sample_s"] / b["time_per_sample_s"] if hf_before else float("nan")
        hf_a = hf_after["time_per_sample_s"] / a["time_per_sample_s"] if hf_after else float("nan")
        peer = f"{a['torch_attention_core_gbs']:.1f}" if "torch_attention_core_gbs" in a else "-"
        lines.append(
            f"| {a['variant']} | {1e3 * b['decode_step_s']:.1f} | {1e3 * a['decode_step_s']:.1f} | {1e3 * bound:.1f} | "
            f"{100 * frac_before:.0f}% | {100 * a['decode_step_roofline_fraction']:.0f}% | "
            f"{b['cross_attention_core_gbs']:.1f} | {a['cross_attention_core_gbs']:.1f} | "
            f"{100 * a['cross_attention_core_fraction']:.0f}% | {peer} | {b['time_per_sample_s']:.3f} | "
            f"{a['time_per_sample_s']:.3f} | {hf_b:.2f}x | {hf_a:.2f}x |")
    if hf_after:
        lines += ["", f"HuggingFace (after run): encoder {hf_after['encoder_per_sample_s']:.3f} s/sample, decoder "
                  f"{hf_after['decoder_per_sample_s']:.3f} s/sample ({1e3 * hf_after['decoder_s'] / a['output_length']:.1f} ms "
                  f"per step); ours: encoder {a['encoder_per_sample_s']:.3f} s/sample "
                  f"({100 * a['encoder_roofline_fraction']:.0f}% of its roofline)."]
    if longer:
        lines += ["", f"## Output length {a['output_length']} vs {longer['rows'][0]['output_length']}", "",
                  "Decoder time per token and per step at both lengths. 'explained' = the step time at the "
                  "short length plus the extra self-attention bytes an average step reads at the long length "
                  f"(written positions only) at {bw} GB/s.", "",
                  "| variant | dec ms/token short | long | step ms short | long | long explained by cache bytes "
                  "| extra self-cache MB/step |",
                  "|---|---|---|---|---|---|---|"]
        for g, c in sorted(_rows(longer).items()):
            s = new.get(g)
            if s is None:
                continue
            extra = c["decode_step_bytes"] - s["decode_step_bytes"]
            explained = s["decode_step_s"] + extra / (bw * 1e9)
            lines.append(
                f"| {c['variant']} | {1e3 * s['decoder_per_token_s']:.2f} | {1e3 * c['decoder_per_token_s']:.2f} | "
                f"{1e3 * s['decode_step_s']:.1f} | {1e3 * c['decode_step_s']:.1f} | {1e3 * explained:.1f} | "
                f"{extra / 2**20:.0f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", required=True)
    parser.add_argument("--longer", help="The after code's run of the same shape at a longer output length.")
    parser.add_argument("--out", required=True, help="Markdown file to write.")
    args = parser.parse_args(argv)
    load = lambda p: json.loads(Path(p).read_text())  # noqa: E731
    text = compare(load(args.before), load(args.after), load(args.longer) if args.longer else None)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
