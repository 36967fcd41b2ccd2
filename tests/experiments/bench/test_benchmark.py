"""`gqa-t5x bench` on a tiny model: it runs and its reports are self-consistent."""

from __future__ import annotations

import json

import pytest

from gqa_t5x.experiments.bench import benchmark
from gqa_t5x import cli
from gqa_t5x.model.config import T5Config

pytest.importorskip("matplotlib")
pytest.importorskip("transformers")

TINY = "gin/models/t5_1_1/tiny.gin"  # 2+2 layers, emb 8, 4 heads of 3, vocab 32128


def test_bench_writes_json_markdown_and_png_with_consistent_numbers(tmp_path, capsys):
    prefix = tmp_path / "reports" / "bench"
    code = cli.main([
        "bench", "--gin_file", TINY, "--num_kv_heads", "1,4", "--input_length", "12", "--output_length", "5",
        "--batch_size", "3", "--repeats", "1", "--bandwidth_mb", "8", "--output", str(prefix),
        "--gin.ACTIVATION_DTYPE='bfloat16'",  # the bench always times float32
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "HF / ours" in printed and "MQA" in printed and "MHA" in printed
    results = json.loads(prefix.with_suffix(".json").read_text())
    assert results["settings"]["config"]["dtype"] == "float32"
    rows = {row["num_kv_heads"]: row for row in results["rows"]}
    assert sorted(rows) == [1, 4] and rows[1]["variant"] == "MQA" and rows[4]["variant"] == "MHA"
    hf = results["huggingface"][0]
    bw = results["bandwidth_gbs"]["best"] * 1e9  # bytes/s
    peak = results["matmul_peak_gflops"] * 1e9  # FLOP/s
    assert peak > 0 and results["machine"]["cpu"]
    for g, row in rows.items():
        assert row["batch"] == 3 and row["input_length"] == 12 and row["output_length"] == 5
        assert row["time_per_sample_s"] == pytest.approx((row["encoder_s"] + row["decoder_s"]) / 3)
        assert 0 < row["cache_init_s"] < row["decoder_s"]
        # 2 decoder layers x (K, V) x (12 cross + 5 self positions) x g heads x 3 dims x 4 bytes.
        assert row["kv_cache_bytes_per_sample"] == 2 * 2 * (12 + 5) * g * 3 * 4
        # Read every step: per layer 3 norms, self-attention q/o (8x12) and k/v (8x3g),
        # cross-attention q/o (its k/v kernels only build the cache), gated MLP
        # (3 x 8x16); the relative bias (4x32), final norm and logits (8x32128).
        per_layer = 3 * 8 + 2 * 96 + 2 * 8 * 3 * g + 2 * 96 + 3 * 128
        assert row["decoder_weight_bytes"] == 4 * (2 * per_layer + 4 * 32 + 8 + 8 * 32128)
        # A step also reads the cross cache (2 layers x K,V x 3 rows x 3g x 12 positions),
        # the self-attention positions written so far (on average (5 + 1) / 2, plus
        # one written) and reads/writes the embedding rows and logits (3 x (8 + 32128)).
        step_numbers = 2 * per_layer + 4 * 32 + 8 + 8 * 32128 + 2 * 2 * 3 * 3 * g * (12 + 3 + 1) + 3 * (8 + 32128)
        assert row["decode_step_bytes"] == 4 * step_numbers == 4 * (355152 + 672 * g)
        # FLOPs: 2 x 3 rows x the matmul weights (no norms, no relative bias) + both attentions.
        step_flops = 2 * 3 * (2 * per_layer - 3 * 8 * 2 + 8 * 32128) + 4 * 3 * 4 * 3 * (3 + 12) * 2
        assert row["decode_step_flops"] == step_flops == 1555680 + 576 * g
        assert row["decode_step_bound_s"] == pytest.approx(max(4 * step_numbers / bw, step_flops / peak))
        assert row["decode_step_roofline_fraction"] == pytest.approx(row["decode_step_bound_s"] / row["decode_step_s"])
        assert row["decode_step_s"] == pytest.approx(row["loop_s"] / 5) and row["steps"] == 5
        # Encoder: per layer q/k/v/o (4 x 8x12) + MLP (3 x 8x16) over 3 x 12 tokens,
        # attention 2 x 2 x 3 x 4 heads x 12 x 12 x 3; 5 norms, relative bias, tokens in/out.
        enc_bytes = 4 * (2 * (4 * 96 + 384) + 5 * 8 + 4 * 32 + 2 * 36 * 8)
        enc_flops = 2 * (2 * 36 * (4 * 96 + 384) + 4 * 3 * 4 * 144 * 3)
        assert (row["encoder_bytes"], row["encoder_flops"]) == (enc_bytes, enc_flops) == (9120, 152064)
        assert row["encoder_bound_s"] == pytest.approx(max(enc_bytes / bw, enc_flops / peak))
        assert row["encoder_roofline_fraction"] == pytest.approx(row["encoder_bound_s"] / row["encoder_s"])
        # Cache build: k/v kernels (2 layers x 2 x 8x3g), the encoder output read, the cache written.
        build_bytes = 4 * (2 * 2 * 8 * 3 * g + 36 * 8 + 2 * 2 * 36 * 3 * g)
        assert row["cache_build_bytes"] == build_bytes and row["cache_build_flops"] == 2 * 36 * 2 * 2 * 8 * 3 * g
        assert row["cache_build_roofline_fraction"] == pytest.approx(
            max(build_bytes / bw, row["cache_build_flops"] / peak) / row["cache_init_s"])
        assert row["achieved_bandwidth_gbs"] == pytest.approx(row["decode_step_bytes"] / row["decode_step_s"] / 1e9)
        assert row["bandwidth_efficiency"] == pytest.approx(row["achieved_bandwidth_gbs"] / results["bandwidth_gbs"]["best"])
        assert row["speedup_vs_huggingface"] == pytest.approx(hf["time_per_sample_s"] / row["time_per_sample_s"])
        assert row["decoder_per_token_s"] == pytest.approx(row["decoder_s"] / (3 * 5))
        assert row["cross_attention_core_fraction"] == pytest.approx(row["cross_attention_core_gbs"] / results["bandwidth_gbs"]["best"])
        assert row["cross_attention_core_gbs"] > 0
        assert row["torch_attention_core_fraction"] == pytest.approx(row["torch_attention_core_gbs"] / results["bandwidth_gbs"]["best"])
        assert row["torch_attention_core_gbs"] > 0
    assert results["bandwidth_gbs"]["best"] > 0
    # HuggingFace decoded the same weights: the same greedy tokens as our MHA run.
    assert hf["greedy_token_agreement_with_ours_mha"] == 1.0
    markdown = prefix.with_suffix(".md").read_text()
    assert "| MQA | 1 | 12 | 5 | 3 |" in markdown and "HF T5 (MHA)" in markdown
    assert "step % roofline" in markdown and results["machine"]["cpu"] in markdown
    png = prefix.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_attention_core_bandwidth_reads_distinct_caches_filling_the_working_set(monkeypatch):
    # Timing one cache over and over would read it from the last-level cache;
    # the measurement must cycle through working_set_mb of distinct caches.
    config = T5Config(vocab_size=100, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128,
                      num_encoder_layers=1, num_decoder_layers=1, num_kv_heads=2)
    seen = []
    real = benchmark.decode_attention.cached_attention

    def recording(query, key, value):
        seen.append(key)
        return real(query, key, value)

    monkeypatch.setattr(benchmark.decode_attention, "cached_attention", recording)
    monkeypatch.setattr(benchmark.jax, "jit", lambda f: f)  # count calls, not traces
    one = 2 * 4 * 2 * 16 * 256 * 4  # K + V bytes: batch 4, 2 kv heads, head_dim 16, 256 positions
    gbs = benchmark.attention_core_bandwidth(config, batch=4, kv_len=256, repeats=1, working_set_mb=1)
    assert gbs > 0 and one == 2**20 // 4
    # A warm-up pass and one timed pass, each over 4 distinct caches (1 MiB).
    assert len(seen) == 8 and len({id(k) for k in seen}) == 4


def test_bench_on_a_two_device_mesh_decodes_the_same_tokens_as_one_device(tmp_path):
    # --cpu_devices must precede JAX's start-up, so each run is its own process.
    import os
    import subprocess
    import sys

    tokens = {}
    for devices in (1, 2):
        prefix = tmp_path / f"bench{devices}"
        flags = ["--cpu_devices", str(devices), "--num_partitions", str(devices)]
        subprocess.run(
            [sys.executable, "-m", "gqa_t5x.cli", "bench", "--gin_file", TINY, "--num_kv_heads", "2,4",
             "--input_length", "12", "--output_length", "4", "--batch_size", "2", "--repeats", "1",
             "--bandwidth_mb", "8", "--no_huggingface", "--output", str(prefix), *flags],
            check=True, capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
        results = json.loads(prefix.with_suffix(".json").read_text())
        assert results["settings"]["num_partitions"] == devices and len(results["machine"]["jax_devices"]) == devices
        tokens[devices] = {row["num_kv_heads"]: row["tokens_sha256"] for row in results["rows"]}
    assert sorted(tokens[1]) == [2, 4] and tokens[1] == tokens[2]


def test_batch_is_halved_until_the_memory_estimate_fits():
    config = T5Config(vocab_size=100, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128,
                      num_encoder_layers=1, num_decoder_layers=1)
    need = {b: benchmark.estimate_peak_bytes(config, b, 256, 32) for b in (1, 2, 4, 8)}
    assert need[1] < need[2] < need[4] < need[8]
    assert benchmark.pick_batch(config, 8, 256, 32, budget=None) == 8
    assert benchmark.pick_batch(config, 8, 256, 32, budget=need[4]) == 4
    assert benchmark.pick_batch(config, 8, 256, 32, budget=need[2] - 1) == 1


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--num_kv_heads", "3"], "--num_kv_heads 3 does not divide num_heads=4"),
        (["--repeats", "0"], "--repeats=0 must be >= 1"),
        (["--memory_fraction", "2"], "--memory_fraction=2.0 must be in"),
        (["--num_partitions", "3"], "--num_partitions=3 must divide the number of devices (1: cpu)"),
        (["--cpu_devices", "2"], "--cpu_devices=2: JAX's CPU backend was already initialised"),
    ],
)
def test_bad_bench_flags_are_named(flags, message, capsys):
    assert cli.main(["bench", "--gin_file", TINY, *flags]) == 2
    assert message in capsys.readouterr().err


def test_paper_preset_is_the_papers_setting_and_explicit_flags_override_it():
    args = cli.build_parser().parse_args(["bench", "--preset", "paper", "--batch_size", "8"])
    cli._resolve_bench_flags(args)
    assert args.gin_file == "gin/models/t5_1_1/xxl.gin" and args.num_encoder_layers is None
    assert (args.input_length, args.output_length, args.dtype) == ((2048,), (512,), "bfloat16")
    assert args.num_kv_heads == (1, 8, 64) and args.no_huggingface is True
    assert args.batch_size == (8,)  # given on the command line
    plain = cli.build_parser().parse_args(["bench"])
    cli._resolve_bench_flags(plain)
    assert (plain.gin_file, plain.input_length, plain.batch_size, plain.dtype, plain.no_huggingface) == (
        "gin/models/t5_1_1/large.gin", (512,), (16,), "float32", False)
