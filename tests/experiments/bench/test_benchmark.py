"""`gqa-t5x bench` on a tiny model: it runs, and its reports match a scripted clock
(every timed interval known in advance) and byte/FLOP counts made by hand or
summed from the parameter arrays it decoded with."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from gqa_t5x.experiments.bench import benchmark
from gqa_t5x import cli
from gqa_t5x.model.config import T5Config

pytest.importorskip("matplotlib")
pytest.importorskip("transformers")

TINY = "gin/models/t5_1_1/tiny.gin"  # 2+2 layers, emb 8, 4 heads of 3, vocab 32128


class _Clock:
    """A `time` module whose perf_counter advances by `steps[i % len(steps)]` between calls."""

    def __init__(self, *steps: float):
        self.steps, self.calls, self.now = steps, 0, 1000.0

    def perf_counter(self) -> float:
        value = self.now
        self.now += self.steps[self.calls % len(self.steps)]
        self.calls += 1
        return value

    @staticmethod
    def time() -> float:
        return time.time()


# Every call timed by `timing.interleaved` (encoder, bandwidth, matmul peak, attention cores,
# HuggingFace) takes 0.25 s: its start and end readings are 0.25 apart, then a 7 s gap.
TIMED_S = 0.25
# A decoder run reads the clock 4 times: making the step kernels 0.125 s, the cache 0.5 s,
# the loop 2 s; then 1 s until the next run starts.
KERNELS_S, CACHE_S, LOOP_S = 0.125, 0.5, 2.0


def _decoder_bytes(params) -> int:
    """Bytes of the decoder arrays a decode step reads: all but the cross-attention k/v kernels."""
    from gqa_t5x.model import param_tree

    total = 0
    for path, value in param_tree.flatten(params).items():
        cross_kv = "/encoder_decoder_attention/" in path and path.split("/")[-2] in ("key", "value")
        if path.startswith("decoder/") and not cross_kv:
            total += np.asarray(value).nbytes
    return total


@pytest.mark.slow
def test_bench_writes_json_markdown_and_png_with_consistent_numbers(tmp_path, capsys, monkeypatch):
    from gqa_t5x.experiments import timing

    monkeypatch.setattr(timing, "time", _Clock(TIMED_S, 7.0))
    monkeypatch.setattr(benchmark, "time", _Clock(KERNELS_S, CACHE_S, LOOP_S, 1.0))
    decoded = {}  # num_kv_heads -> the parameter arrays the bench decoded with
    real_init, real_convert = benchmark.initialization.init_params, benchmark.conversion.convert

    def init_params(config, *args, **kw):
        decoded[config.num_heads] = real_init(config, *args, **kw)
        return decoded[config.num_heads]

    def convert(config, params, groups, *args, **kw):
        new_config, new_params = real_convert(config, params, groups, *args, **kw)
        decoded[groups] = new_params
        return new_config, new_params

    monkeypatch.setattr(benchmark.initialization, "init_params", init_params)
    monkeypatch.setattr(benchmark.conversion, "convert", convert)
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
    assert sorted(decoded) == [1, 4]
    hf = results["huggingface"][0]
    # 8 MiB copied (read + write) in 0.25 s: 0.0671 GB/s, rounded to 0.07; summed (read only): 0.03.
    assert results["bandwidth_gbs"] == {"numpy_copy": 0.07, "jax_copy": 0.07, "jax_scale": 0.07, "jax_read": 0.03,
                                        "best": 0.07, "buffer_mb": 8.0}
    # [2048, 4096] x [4096, 4096]: 2 x 2048 x 4096^2 FLOPs in 0.25 s = 274.9 GFLOP/s.
    assert results["matmul_peak_gflops"] == 274.9
    bw, peak = 0.07e9, 274.9e9  # bytes/s, FLOP/s
    assert results["machine"]["cpu"]
    # HuggingFace: encoder 0.25 s + generate 0.25 s for 3 samples.
    assert hf["time_per_sample_s"] == pytest.approx(0.5 / 3) and hf["decode_step_s"] == pytest.approx(0.25 / 5)
    for g, row in rows.items():
        assert row["batch"] == 3 and row["input_length"] == 12 and row["output_length"] == 5
        # Encoder 0.25 s (shared by the variants) + decoder 0.5 + 2 s (the step kernels are not counted).
        assert (row["encoder_s"], row["decoder_s"], row["cache_init_s"], row["loop_s"], row["step_kernels_s"]) == (
            TIMED_S, CACHE_S + LOOP_S, CACHE_S, LOOP_S, KERNELS_S)
        assert row["time_per_sample_s"] == pytest.approx(2.75 / 3)
        assert row["encoder_per_sample_s"] == pytest.approx(0.25 / 3)
        assert row["decoder_per_sample_s"] == pytest.approx(2.5 / 3)
        assert row["decoder_per_token_s"] == pytest.approx(2.5 / 15)  # 3 samples x 5 tokens
        assert row["decode_step_s"] == pytest.approx(2.0 / 5) and row["steps"] == 5
        # 2 decoder layers x (K, V) x (12 cross + 5 self positions) x g heads x 3 dims x 4 bytes.
        assert row["kv_cache_bytes_per_sample"] == 2 * 2 * (12 + 5) * g * 3 * 4
        assert row["self_kv_bytes_per_sample"] == 2 * 2 * 5 * g * 3 * 4
        assert row["cross_kv_bytes_per_sample"] == 2 * 2 * 12 * g * 3 * 4
        # Read every step: the decoder arrays the bench decoded with, but for the cross-attention
        # k/v kernels (they only build the cache); the logits kernel is among them (untied).
        assert row["decoder_weight_bytes"] == _decoder_bytes(decoded[g])
        # By hand: per layer 3 norms, self-attention q/o (8x12) and k/v (8x3g), cross-attention
        # q/o, gated MLP (3 x 8x16); the relative bias (4x32), final norm and logits (8x32128).
        per_layer = 3 * 8 + 2 * 96 + 2 * 8 * 3 * g + 2 * 96 + 3 * 128
        assert row["decoder_weight_bytes"] == 4 * (2 * per_layer + 4 * 32 + 8 + 8 * 32128)
        # A step also reads the cross cache (2 layers x K,V x 3 rows x 3g x 12 positions),
        # the self-attention positions written so far (on average (5 + 1) / 2, plus
        # one written) and reads/writes the embedding rows and logits (3 x (8 + 32128)).
        step_numbers = 2 * per_layer + 4 * 32 + 8 + 8 * 32128 + 2 * 2 * 3 * 3 * g * (12 + 3 + 1) + 3 * (8 + 32128)
        assert row["decode_step_bytes"] == 4 * step_numbers
        # FLOPs: 2 x 3 rows x the matmul weights (no norms, no relative bias) + both attentions.
        step_flops = 2 * 3 * (2 * per_layer - 3 * 8 * 2 + 8 * 32128) + 4 * 3 * 4 * 3 * (3 + 12) * 2
        assert row["decode_step_flops"] == step_flops
        # A 1.4 MB step at 0.07 GB/s (20 ms) is memory-bound; it took 0.4 s.
        assert row["decode_step_limit"] == "memory"
        assert row["decode_step_bound_s"] == pytest.approx(4 * step_numbers / bw)
        assert row["decode_step_roofline_fraction"] == pytest.approx(4 * step_numbers / bw / 0.4)
        assert row["achieved_bandwidth_gbs"] == pytest.approx(4 * step_numbers / 0.4 / 1e9)
        assert row["bandwidth_efficiency"] == pytest.approx(4 * step_numbers / 0.4 / bw)
        # Encoder: per layer q/k/v/o (4 x 8x12) + MLP (3 x 8x16) over 3 x 12 tokens,
        # attention 2 x 2 x 3 x 4 heads x 12 x 12 x 3; 5 norms, relative bias, tokens in/out.
        enc_bytes = 4 * (2 * (4 * 96 + 384) + 5 * 8 + 4 * 32 + 2 * 36 * 8)
        enc_flops = 2 * (2 * 36 * (4 * 96 + 384) + 4 * 3 * 4 * 144 * 3)
        assert (row["encoder_bytes"], row["encoder_flops"]) == (enc_bytes, enc_flops)
        assert row["encoder_bound_s"] == pytest.approx(max(enc_bytes / bw, enc_flops / peak))
        assert row["encoder_roofline_fraction"] == pytest.approx(max(enc_bytes / bw, enc_flops / peak) / 0.25)
        # Cache build: k/v kernels (2 layers x 2 x 8x3g), the encoder output read, the cache written.
        build_bytes = 4 * (2 * 2 * 8 * 3 * g + 36 * 8 + 2 * 2 * 36 * 3 * g)
        build_flops = 2 * 36 * 2 * 2 * 8 * 3 * g
        assert row["cache_build_bytes"] == build_bytes and row["cache_build_flops"] == build_flops
        assert row["cache_build_roofline_fraction"] == pytest.approx(max(build_bytes / bw, build_flops / peak) / 0.5)
        assert row["speedup_vs_huggingface"] == pytest.approx(0.5 / 2.75)
        assert row["huggingface_time_per_sample_s"] == pytest.approx(0.5 / 3)
        # Attention cores: K + V of 3 rows x g heads x 12 positions x 3 dims (864 g bytes), cycled
        # through 256 distinct caches (the most; 1 GiB would take more), one pass in 0.25 s.
        core = 864 * g * 256 / 0.25 / 1e9
        assert row["cross_attention_core_gbs"] == pytest.approx(core)
        assert row["cross_attention_core_fraction"] == pytest.approx(core / 0.07)
        assert row["torch_attention_core_gbs"] == pytest.approx(core)
        assert row["torch_attention_core_fraction"] == pytest.approx(core / 0.07)
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
    monkeypatch.setattr(benchmark.timing, "time", _Clock(0.5, 3.0))  # every timed pass takes 0.5 s
    # K + V bytes of one cache: batch 4 x 2 kv heads x head_dim 16 x 256 positions x 4 bytes = 256 KiB,
    # so 4 caches fill the 1 MiB working set; 1 MiB read in 0.5 s.
    gbs = benchmark.attention_core_bandwidth(config, batch=4, kv_len=256, repeats=1, working_set_mb=1)
    assert gbs == pytest.approx(2**20 / 0.5 / 1e9)
    # A warm-up pass and one timed pass, each over 4 distinct caches (1 MiB).
    assert len(seen) == 8 and len({id(k) for k in seen}) == 4


@pytest.mark.slow
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


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--num_kv_heads", "3"], "num_heads=4 is not divisible by --num_kv_heads=3; choose a divisor of 4: [1, 2, 4]"),
        (["--repeats", "0"], "--repeats=0 must be >= 1"),
        (["--memory_fraction", "2"], "--memory_fraction=2.0 must be in"),
        (["--attention_query_chunk", "-1"], "--attention_query_chunk=-1 must be >= 0 (0 = one block)"),
        (["--num_partitions", "3"], "--num_partitions=3 must divide the number of devices (1: cpu)"),
        (["--cpu_devices", "2"], "--cpu_devices=2: JAX's CPU backend was already initialised"),
    ],
)
def test_bad_bench_flags_are_named(flags, message, capsys):
    assert cli.main(["bench", "--gin_file", TINY, *flags]) == 2
    assert message in capsys.readouterr().err


def test_paper_preset_is_the_papers_setting_and_explicit_flags_override_it():
    args = cli.build_parser().parse_args(["bench", "--preset", "paper", "--batch_size", "8"])
    cli.experiments.resolve_bench_flags(args)
    assert args.gin_file == "gin/models/t5_1_1/xxl.gin" and args.num_encoder_layers is None
    assert (args.input_length, args.output_length, args.dtype) == ((2048,), (512,), "bfloat16")
    assert args.num_kv_heads == (1, 8, 64) and args.no_huggingface is True
    assert args.batch_size == (8,)  # given on the command line
    plain = cli.build_parser().parse_args(["bench"])
    cli.experiments.resolve_bench_flags(plain)
    assert (plain.gin_file, plain.input_length, plain.batch_size, plain.dtype, plain.no_huggingface) == (
        "gin/models/t5_1_1/large.gin", (512,), (16,), "float32", False)


def _fake_bench(monkeypatch, fits_up_to: int, error: str):
    """`run_benchmark` with the machine measurement and the shape's timing replaced: a shape at a
    batch above `fits_up_to` raises `error` (as XLA does when a device runs out of memory)."""
    from gqa_t5x.experiments import roofline

    monkeypatch.setattr(roofline, "measure_machine", lambda *a, **k: {
        "bandwidth_gbs": {"best": 10.0}, "matmul_dtype": "float32", "matmul_peak_gflops": 100.0, "published": None})
    tried = []

    def bench_shape(settings, base, mha_params, n_in, n_out, batch, machine, log, budget=None):
        tried.append(batch)
        if batch > fits_up_to:
            raise RuntimeError(error)
        return [{"variant": "MHA", "batch": batch}], None

    monkeypatch.setattr(benchmark, "_bench_shape", bench_shape)
    return tried


def test_a_batch_that_runs_out_of_device_memory_is_halved_and_the_report_says_why(monkeypatch):
    from gqa_t5x import gin_config

    tried = _fake_bench(monkeypatch, 2, "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17.2GiB.\nmore")
    config = gin_config.model_config_from_gin(TINY)
    settings = benchmark.BenchSettings(config=config, num_kv_heads=(4,), input_lengths=(16,), output_lengths=(4,),
                                       batch_caps=(8,), huggingface=False)
    logged = []
    results = benchmark.run_benchmark(settings, log=logged.append)
    assert tried == [8, 4, 2]
    (row,) = results["rows"]
    assert row["batch"] == 2 and row["batch_asked"] == 8
    assert row["batch_reason"] == ("batch 2: batch 4 passed the memory estimate but ran out of memory "
                                   "(RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17.2GiB.); halved")
    assert "[bench] batch 4: batch 8 passed the memory estimate but ran out of memory" in "\n".join(logged)


def test_an_error_other_than_out_of_memory_is_raised_at_the_batch_asked(monkeypatch):
    from gqa_t5x import gin_config

    tried = _fake_bench(monkeypatch, 2, "INVALID_ARGUMENT: shapes do not match")
    settings = benchmark.BenchSettings(config=gin_config.model_config_from_gin(TINY), num_kv_heads=(4,),
                                       input_lengths=(16,), output_lengths=(4,), batch_caps=(8,), huggingface=False)
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        benchmark.run_benchmark(settings, log=lambda _: None)
    assert tried == [8]
