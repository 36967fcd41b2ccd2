"""`experiments/roofline.py`: bytes and FLOPs of each phase against an independent count.

Weight numbers are summed from the network's real parameter tree
(`param_tree.param_shapes`), cache numbers from the decoding cache the network
allocates (`memory.cache_bytes`, abstract shapes), matmul FLOPs as 2 x the
kernel's numbers per token it is applied to, attention FLOPs as 2 x the
multiply-adds of the `q k^T` and `p v` contractions written out per step.
The machine measurements are checked with a fake timer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gqa_t5x.experiments.bench import memory
from gqa_t5x.experiments import roofline
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config


def _config(**changes) -> T5Config:
    base = dict(vocab_size=37, dtype="float32", emb_dim=16, num_heads=4, head_dim=4, mlp_dim=24,
                num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0)
    base.update(changes)
    return T5Config(**base)


CONFIGS = {
    "mha": _config(),
    "gqa2": _config(num_kv_heads=2),
    "mqa_gqa_encoder": _config(num_kv_heads=1, encoder_num_kv_heads=2),
    # H * d (18) != emb (16), one MLP branch, logits tied to the embedding, 3 + 1 layers.
    "odd": _config(head_dim=6, num_heads=3, mlp_activations=("relu",), logits_via_embedding=True,
                   num_encoder_layers=3, num_decoder_layers=1, relative_attention_num_buckets=8),
    # Counts per layer and attention kind (issue #24): every sum is taken layer by layer.
    "per_layer": _config(num_encoder_layers=2, num_decoder_layers=3, encoder_layer_kv_heads=(2, 4),
                         decoder_self_kv_heads=(1, 2, 4), decoder_cross_kv_heads=(4, 1, 2)),
}


def _numbers(cfg: T5Config, keep) -> int:
    return sum(math.prod(shape) for path, shape in param_tree.param_shapes(cfg).items() if keep(path))


def _is_cross_kv(path: str) -> bool:
    return "/encoder_decoder_attention/" in path and path.split("/")[-2] in ("key", "value")


def _decode_step_numbers(cfg: T5Config, kernels_only: bool) -> int:
    """Decoder parameters a step reads: all but the cross-attention k/v, plus the
    embedding when it is the logits kernel."""
    def keep(path):
        if kernels_only and not path.endswith("/kernel"):
            return False
        return path.startswith("decoder/") and not _is_cross_kv(path)
    tied = _numbers(cfg, lambda p: p == "token_embedder/embedding") if cfg.logits_via_embedding else 0
    return _numbers(cfg, keep) + tied


def _attention_flops(batch: int, heads: int, head_dim: int, q_len: int, kv_len: int) -> int:
    """q k^T and p v: two contractions of batch x heads x q_len x kv_len x head_dim multiply-adds."""
    return 2 * (2 * batch * heads * q_len * kv_len * head_dim)


# ---------------------------------------------------------------- PhaseCost
@pytest.mark.parametrize("nbytes,flops,bw,peak,bound,limit", [
    (3e9, 1e9, 2.0, 4.0, 1.5, "memory"),  # 3 GB at 2 GB/s = 1.5 s; 1 GFLOP at 4 GFLOP/s = 0.25 s
    (1e9, 8e9, 10.0, 2.0, 4.0, "compute"),  # 0.1 s vs 4 s
    (2e9, 2e9, 1.0, 1.0, 2.0, "memory"),  # a tie counts as memory-bound
    (0.0, 5e6, 100.0, 50.0, 1e-4, "compute"),
])
def test_bound_is_the_slower_of_moving_the_bytes_and_doing_the_flops(nbytes, flops, bw, peak, bound, limit):
    cost = roofline.PhaseCost(bytes=nbytes, flops=flops)
    assert cost.bound_s(bw, peak) == pytest.approx(bound)
    assert cost.limit(bw, peak) == limit


@pytest.mark.parametrize("bw,peak", [(0.0, 1.0), (1.0, 0.0), (-2.0, 3.0)])
def test_bound_refuses_non_positive_machine_figures(bw, peak):
    with pytest.raises(ValueError, match="must be > 0"):
        roofline.PhaseCost(1.0, 1.0).bound_s(bw, peak)


# ---------------------------------------------------------------- encoder
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encoder_bytes_are_its_parameters_plus_tokens_in_and_out(name):
    cfg = CONFIGS[name]
    batch, length = 3, 7
    weights = _numbers(cfg, lambda p: p.startswith("encoder/"))  # layers, norms, relative bias
    cost = roofline.encoder_cost(cfg, batch, length)
    assert cost.bytes == 4 * (weights + 2 * batch * length * cfg.emb_dim)
    assert roofline.encoder_cost(cfg, batch, length, itemsize=2).bytes == cost.bytes / 2


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encoder_flops_are_every_kernel_per_token_plus_both_attention_contractions(name):
    cfg = CONFIGS[name]
    batch, length = 2, 5
    kernels = _numbers(cfg, lambda p: p.startswith("encoder/") and p.endswith("/kernel"))
    attention = cfg.num_encoder_layers * _attention_flops(batch, cfg.num_heads, cfg.head_dim, length, length)
    assert roofline.encoder_cost(cfg, batch, length).flops == 2 * batch * length * kernels + attention


def test_encoder_cost_of_a_hand_sized_model():
    # 1 layer, emb 2, 1 head of 2, mlp 3 (gated: 2 inputs), 4 buckets; batch 1, 2 tokens.
    cfg = T5Config(vocab_size=10, emb_dim=2, num_heads=1, head_dim=2, mlp_dim=3, num_encoder_layers=1,
                   num_decoder_layers=1, relative_attention_num_buckets=4, dtype="float32")
    # q, k, v, o: 4 x 2x2 = 16; MLP 3 x 2x3 = 18; norms 2 x 2 + final 2 = 6; bias 1 x 4.
    weights = 16 + 18 + 6 + 4
    cost = roofline.encoder_cost(cfg, 1, 2)
    assert cost.bytes == 4 * (weights + 2 * 2 * 2)  # + 2 tokens of 2 numbers in and out
    # Projections: 2 tokens x 34 multiply-adds; attention: 2 x (1 x 2 x 2 x 2) multiply-adds.
    assert cost.flops == 2 * (2 * 34 + 2 * 8)


# ---------------------------------------------------------------- cache build
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cache_build_reads_the_cross_kv_kernels_and_encoding_and_writes_the_cache_the_network_allocates(name):
    cfg = CONFIGS[name]
    batch, length = 3, 6
    kernels = _numbers(cfg, _is_cross_kv)
    cross_cache = memory.cache_bytes(cfg, batch, length, 4)["cross"]  # bytes, float32
    cost = roofline.cache_build_cost(cfg, batch, length)
    assert cost.bytes == 4 * (kernels + batch * length * cfg.emb_dim) + cross_cache
    assert cost.flops == 2 * batch * length * kernels


# ---------------------------------------------------------------- decode step
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_step_weights_are_the_decoder_parameters_a_step_reads(name):
    cfg = CONFIGS[name]
    assert roofline.decode_step_weights(cfg) == _decode_step_numbers(cfg, kernels_only=False)


def test_tied_logits_read_the_embedding_and_untied_the_logits_kernel():
    untied, tied = _config(), _config(logits_via_embedding=True)
    # Same decoder otherwise: the difference is nothing, as both are emb x vocab.
    assert roofline.decode_step_weights(untied) == roofline.decode_step_weights(tied)
    assert "decoder/logits_dense/kernel" not in param_tree.param_shapes(tied)
    # MQA reads 2 layers x 2 (k, v) x emb x (4 - 1) x head_dim fewer numbers than MHA.
    assert roofline.decode_step_weights(untied) - roofline.decode_step_weights(_config(num_kv_heads=1)) == 2 * 2 * 16 * 3 * 4


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("beam", [1, 3])
def test_decode_step_bytes_average_the_cache_positions_read_over_the_steps(name, beam):
    cfg = CONFIGS[name]
    batch, n_in, n_out = 2, 5, 4
    rows = batch * beam
    # The network's self-attention cache holds n_out positions per row; its cross cache n_in per example.
    self_per_position = memory.cache_bytes(cfg, rows, n_in, n_out)["self"] / n_out
    cross = memory.cache_bytes(cfg, batch, n_in, n_out)["cross"]
    # Step i reads positions 0..i (i + 1 of them) and writes one.
    self_bytes = np.mean([(i + 1 + 1) * self_per_position for i in range(n_out)])
    weights = 4 * _decode_step_numbers(cfg, kernels_only=False)
    activations = 4 * rows * (cfg.emb_dim + cfg.vocab_size)  # embedding rows in, logits out
    cost = roofline.decode_step_cost(cfg, batch, n_in, n_out, beam_size=beam)
    assert cost.bytes == pytest.approx(weights + self_bytes + cross + activations, rel=1e-12)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_step_flops_are_the_matmul_weights_per_row_plus_both_attentions(name):
    cfg = CONFIGS[name]
    batch, beam, n_in, n_out = 2, 2, 5, 6
    rows = batch * beam
    per_step = []
    for i in range(n_out):
        attention = cfg.num_decoder_layers * (_attention_flops(rows, cfg.num_heads, cfg.head_dim, 1, i + 1)
                                              + _attention_flops(rows, cfg.num_heads, cfg.head_dim, 1, n_in))
        per_step.append(2 * rows * _decode_step_numbers(cfg, kernels_only=True) + attention)
    cost = roofline.decode_step_cost(cfg, batch, n_in, n_out, beam_size=beam)
    assert cost.flops == pytest.approx(np.mean(per_step), rel=1e-12)


# ---------------------------------------------------------------- forward / train
def _forward_flops(cfg: T5Config, batch: int, n_in: int, n_out: int) -> float:
    enc, dec = batch * n_in, batch * n_out
    shapes = param_tree.param_shapes(cfg)
    total = 0
    for path, shape in shapes.items():
        if not path.endswith("/kernel"):
            continue
        tokens = enc if path.startswith("encoder/") or _is_cross_kv(path) else dec
        total += 2 * tokens * math.prod(shape)
    if cfg.logits_via_embedding:
        total += 2 * dec * math.prod(shapes["token_embedder/embedding"])
    h, d = cfg.num_heads, cfg.head_dim
    total += cfg.num_encoder_layers * _attention_flops(batch, h, d, n_in, n_in)
    total += cfg.num_decoder_layers * (_attention_flops(batch, h, d, n_out, n_out) + _attention_flops(batch, h, d, n_out, n_in))
    return total


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_and_train_step_flops(name):
    cfg = CONFIGS[name]
    expected = _forward_flops(cfg, 3, 7, 5)
    assert roofline.forward_flops(cfg, 3, 7, 5) == expected
    assert roofline.train_step_flops(cfg, 3, 7, 5) == 3 * expected  # backward = 2 x forward


# ---------------------------------------------------------------- machine
class _FakeFastest:
    """`timing.fastest` that runs each function once and reports a fixed time."""

    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, []

    def __call__(self, fn, repeats):
        out = fn()
        self.calls.append((repeats, out))
        return self.seconds, out


def test_matmul_peak_counts_two_flops_per_multiply_add(monkeypatch):
    fake = _FakeFastest(1e-9)
    monkeypatch.setattr(roofline.timing, "fastest", fake)
    # size 4: [4, 8] x [8, 8] = 4 * 8 * 8 = 256 multiply-adds = 512 FLOPs in 1 ns = 512 GFLOP/s.
    assert roofline.measure_matmul_peak(size=4, repeats=7) == 512.0
    (repeats, out), = fake.calls
    assert repeats == 7 and out.shape == (4, 8)


def test_memory_bandwidth_counts_read_and_write_for_copies_and_read_only_for_the_sum(monkeypatch):
    fake = _FakeFastest(1e-3)
    monkeypatch.setattr(roofline.timing, "fastest", fake)
    got = roofline.measure_memory_bandwidth(megabytes=1, repeats=4)
    # 1 MiB = 1048576 bytes: copied (read + write) in 1 ms = 2.097 GB/s; read in 1 ms = 1.049 GB/s.
    assert got == {"numpy_copy": 2.1, "jax_copy": 2.1, "jax_scale": 2.1, "jax_read": 1.05, "best": 2.1,
                   "buffer_mb": 1.0}
    assert [r for r, _ in fake.calls] == [4, 4, 4, 4]


def test_an_accelerator_gets_a_buffer_beyond_its_caches_and_no_host_copy(monkeypatch):
    assert roofline.default_buffer_mb("cpu") == 256 and roofline.default_buffer_mb("gpu") == 1024

    class _Gpu:
        platform, device_kind = "gpu", "NVIDIA H200"

    fake = _FakeFastest(1e-3)
    monkeypatch.setattr(roofline.timing, "fastest", fake)
    monkeypatch.setattr(roofline.jax, "devices", lambda: [_Gpu()])
    got = roofline.measure_memory_bandwidth(megabytes=1, repeats=2)
    assert "numpy_copy" not in got and got["best"] == got["jax_copy"] == 2.1


def test_the_matmul_peak_is_measured_in_the_runs_dtype(monkeypatch):
    fake = _FakeFastest(1e-9)
    monkeypatch.setattr(roofline.timing, "fastest", fake)
    assert roofline.measure_matmul_peak(size=4, repeats=1, dtype="bfloat16") == 512.0
    (_, out), = fake.calls
    assert out.dtype == "bfloat16"


def test_published_peaks_match_device_kinds_and_unknown_ones_are_none():
    assert roofline.published_peaks("NVIDIA H100 80GB HBM3")["bandwidth_gbs"] == 3350.0
    assert roofline.published_peaks("NVIDIA H200")["bfloat16"] == 989_000.0
    assert roofline.published_peaks("TPU v5 lite")["matched"] == "TPU v5 lite"
    assert roofline.published_peaks("cpu") is None


def test_a_phase_above_its_roofline_is_flagged_not_reported():
    row = {"encoder_roofline_fraction": 3.41, "decode_step_roofline_fraction": 0.38,
           "cross_attention_core_fraction": 1.81, "label": "x"}
    warnings = roofline.over_roofline(row)
    assert len(warnings) == 2
    assert warnings[0].startswith("cross attention core measured at 181% of its roofline bound")
    assert warnings[1].startswith("encoder measured at 341% of its roofline bound")
    assert roofline.over_roofline({"encoder_roofline_fraction": 1.02}) == []


def test_measure_machine_reports_the_measured_and_published_figures(monkeypatch):
    monkeypatch.setattr(roofline, "measure_memory_bandwidth", lambda mb: {"best": float(mb)})
    monkeypatch.setattr(roofline, "measure_matmul_peak", lambda dtype: 12.5 if dtype == "bfloat16" else 1.0)
    got = roofline.measure_machine(64, dtype="bfloat16")
    assert got["bandwidth_gbs"] == {"best": 64.0} and got["matmul_peak_gflops"] == 12.5
    assert got["matmul_dtype"] == "bfloat16" and got["published"] is None


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_cache_numbers_equal_the_bytes_of_the_cache_the_model_allocates(kv_heads):
    cfg = T5Config(vocab_size=64, emb_dim=16, num_heads=4, num_kv_heads=kv_heads, head_dim=4, mlp_dim=32,
                   num_encoder_layers=1, num_decoder_layers=2, dtype="float32")
    numbers = roofline.cache_numbers(cfg, 3, 10, 5)
    allocated = memory.cache_bytes(cfg, 3, 10, 5)
    assert {k: 4 * v for k, v in numbers.items()} == allocated


def test_cache_numbers_of_per_layer_counts_equal_the_allocated_cache_and_a_hand_count():
    cfg = _config(num_decoder_layers=3, decoder_self_kv_heads=(1, 2, 4), decoder_cross_kv_heads=(4, 1, 1))
    batch, input_length, output_length = 3, 10, 5
    numbers = roofline.cache_numbers(cfg, batch, input_length, output_length)
    # keys + values, head_dim 4: self 7 kv heads over the layers, cross 6.
    assert numbers == {"self": 2 * batch * 7 * 4 * output_length, "cross": 2 * batch * 6 * 4 * input_length}
    allocated = memory.cache_bytes(cfg, batch, input_length, output_length)
    assert {k: 4 * v for k, v in numbers.items()} == allocated
