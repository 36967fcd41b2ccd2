"""The roofline of `gqa-t5x bench`: the machine's two limits and each phase's bytes and FLOPs.

A phase cannot run faster than `max(bytes / bandwidth, FLOPs / peak)`: the
bytes it must move at the machine's measured memory bandwidth, or the
multiply-adds it must do at the measured float32 matmul peak, whichever takes
longer. The benchmark divides that bound by the measured time ("% of
roofline"). Bytes and FLOPs are the minimum the phase needs, counted from the
config (`itemsize` bytes per number, 4 for float32; with bfloat16
activations the weights could be read as bfloat16 too, so 2 bounds that case
from below; 2 FLOPs per multiply-add; norms, softmax and other element-wise
work are not counted):

* encoder: reads its weights once and writes its output; FLOPs are the
  projections, the gated MLP and the two attention contractions per layer.
* cache build: reads the encoder output and the encoder-decoder key/value
  kernels, writes the cross-attention cache.
* decode step (averaged over the `output_length` steps): reads the decoder
  weights a step uses (all but the encoder-decoder key/value kernels, plus the
  logits kernel), the whole cross-attention cache, and the self-attention
  cache positions written so far (`i + 1` at step `i`, so `(n + 1) / 2` on
  average); FLOPs are those weights times the batch plus both attentions.

Key/value widths are summed layer by layer (`T5Config.kv_heads`), so configs
whose counts differ per layer or attention kind are counted exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x.experiments import timing
from gqa_t5x.model.config import T5Config

_GB = 1e9
_F32 = 4


# Published per-chip peaks: HBM bandwidth (GB/s) and dense matmul peak (GFLOP/s)
# by dtype, from the vendors' data sheets (NVIDIA H100 SXM / H200 SXM / A100
# SXM 80 GB; Google Cloud TPU v4 / v5e / v5p). Matched against
# `jax.devices()[0].device_kind`, longest key first. Shown beside the measured
# figures; the roofline uses the measured ones.
PUBLISHED_PEAKS: dict[str, dict[str, float]] = {
    "H100": {"bandwidth_gbs": 3350.0, "bfloat16": 989_000.0, "float32": 67_000.0},
    "H200": {"bandwidth_gbs": 4800.0, "bfloat16": 989_000.0, "float32": 67_000.0},
    "A100": {"bandwidth_gbs": 2039.0, "bfloat16": 312_000.0, "float32": 19_500.0},
    "TPU v4": {"bandwidth_gbs": 1228.0, "bfloat16": 275_000.0},
    "TPU v5 lite": {"bandwidth_gbs": 819.0, "bfloat16": 197_000.0},
    "TPU v5e": {"bandwidth_gbs": 819.0, "bfloat16": 197_000.0},
    "TPU v5p": {"bandwidth_gbs": 2765.0, "bfloat16": 459_000.0},
}
# A phase measured this far above its bound means the bound is wrong.
OVER_ROOFLINE = 1.05


def published_peaks(device_kind: str) -> dict[str, float] | None:
    """The data-sheet peaks of a device kind ('NVIDIA H100 80GB HBM3', 'TPU v4'), or None."""
    for key in sorted(PUBLISHED_PEAKS, key=len, reverse=True):
        if key.lower() in device_kind.lower():
            return dict(PUBLISHED_PEAKS[key], matched=key)
    return None


def default_buffer_mb(platform: str) -> int:
    """Bandwidth buffer: 256 MB on a CPU; 1 GiB on an accelerator, far beyond its caches (a
    256 MB `jnp.sum` reached 1.77 of an H200's ~4.3 TB/s copy rate)."""
    return 256 if platform == "cpu" else 1024


def measure_memory_bandwidth(megabytes: int | None = None, repeats: int = 5) -> dict[str, float]:
    """Measured memory bandwidth in GB/s (best of `repeats`), STREAM-style.

    * `numpy_copy`: `np.copyto` of a `megabytes` buffer, counting read + write
      (host memory: on a CPU only).
    * `jax_copy`: a jitted device copy `y = x + 0` (read + write, XLA's
      threads or the accelerator's HBM).
    * `jax_scale`: a jitted `y = 1.0001 * x` (read + write).
    * `jax_read`: a jitted sum (read only).

    Args:
      megabytes: Buffer size (default `default_buffer_mb` of the platform).
      repeats: Timed runs; the fastest counts.

    Returns:
      The figures, `best` (the limit a memory-bound phase is compared
      against: the fastest figure of the device that runs the model) and
      `buffer_mb`.
    """
    platform = jax.devices()[0].platform
    megabytes = megabytes or default_buffer_mb(platform)
    n = megabytes * 2**20 // 4
    src = np.random.default_rng(0).random(n, dtype=np.float32)
    rate = lambda fn, moved: moved / timing.fastest(fn, repeats)[0] / _GB  # noqa: E731
    out = {}
    if platform == "cpu":
        dst = np.empty_like(src)
        out["numpy_copy"] = rate(lambda: np.copyto(dst, src), 2 * src.nbytes)
    x = jnp.asarray(src)
    copy = jax.jit(lambda v: v + 0)
    scale = jax.jit(lambda v: v * 1.0001)
    read = jax.jit(jnp.sum)
    out["jax_copy"] = rate(lambda: copy(x).block_until_ready(), 2 * x.nbytes)
    out["jax_scale"] = rate(lambda: scale(x).block_until_ready(), 2 * x.nbytes)
    out["jax_read"] = rate(lambda: read(x).block_until_ready(), x.nbytes)
    out["best"] = max(out.values())
    out["buffer_mb"] = float(megabytes)
    return {k: round(v, 2) for k, v in out.items()}


def measure_matmul_peak(size: int | None = None, repeats: int = 3, dtype: str = "float32") -> float:
    """GFLOP/s of a jitted `[size, 2 size] x [2 size, 2 size]` matmul in `dtype` (best of `repeats`).

    Args:
      size: Rows (default 2048 on a CPU, 8192 on an accelerator, large
        enough to fill it).
      repeats: Timed runs; the fastest counts.
      dtype: The run's dtype ('bfloat16' on accelerators: their peak is
        several times the float32 one).
    """
    size = size or (2048 if jax.devices()[0].platform == "cpu" else 8192)
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.random((size, 2 * size), np.float32), dtype)
    b = jnp.asarray(rng.random((2 * size, 2 * size), np.float32), dtype)
    matmul = jax.jit(jnp.matmul)
    seconds, _ = timing.fastest(lambda: matmul(a, b).block_until_ready(), repeats)
    return round(2 * size * (2 * size) ** 2 / seconds / _GB, 1)


def measure_machine(bandwidth_mb: int | None = None, dtype: str = "float32") -> dict[str, Any]:
    """The roofline's two measured limits, and the device's published ones.

    Args:
      bandwidth_mb: Bandwidth buffer (default `default_buffer_mb`).
      dtype: The run's compute dtype; the matmul peak is measured in it.

    Returns:
      {'bandwidth_gbs': measure_memory_bandwidth(...), 'matmul_peak_gflops',
      'matmul_dtype', 'device_kind', 'published' (data-sheet peaks or None)}.
    """
    device = jax.devices()[0]
    return {"bandwidth_gbs": measure_memory_bandwidth(bandwidth_mb),
            "matmul_peak_gflops": measure_matmul_peak(dtype=dtype), "matmul_dtype": dtype,
            "device_kind": device.device_kind, "published": published_peaks(device.device_kind)}


def over_roofline(row: dict[str, Any]) -> list[str]:
    """Warnings for the phases of a bench row measured faster than their roofline bound.

    A phase cannot beat `max(bytes / bandwidth, FLOPs / peak)`; one above
    `OVER_ROOFLINE` (105%) means the measured bandwidth or peak is too low
    for that device (a buffer that fits a cache, a float32 peak for bfloat16
    work), so the figure is not a result.

    Args:
      row: A bench row with `<phase>_roofline_fraction` / `..._core_fraction` entries.

    Returns:
      One line per such phase (empty when the roofline holds).
    """
    out = []
    for key, value in sorted(row.items()):
        if key.endswith("_fraction") and isinstance(value, (int, float)) and value > OVER_ROOFLINE:
            phase = key.removesuffix("_fraction").removesuffix("_roofline").replace("_", " ")
            out.append(f"{phase} measured at {100 * value:.0f}% of its roofline bound: the measured bandwidth "
                       "or matmul peak is below what this device reaches, so the bound (not the phase) is wrong; "
                       "not reported as a result.")
    return out


@dataclasses.dataclass(frozen=True)
class PhaseCost:
    """Minimum bytes moved and FLOPs done by one phase.

    Attributes:
      bytes: Bytes read or written from memory.
      flops: Floating-point operations (2 per multiply-add).
    """

    bytes: float
    flops: float

    def bound_s(self, bandwidth_gbs: float, peak_gflops: float) -> float:
        """Roofline time: `max(bytes / bandwidth, FLOPs / peak)` in seconds."""
        if bandwidth_gbs <= 0 or peak_gflops <= 0:
            raise ValueError(
                f"bandwidth_gbs={bandwidth_gbs} and peak_gflops={peak_gflops} must be > 0."
            )
        return max(self.bytes / (bandwidth_gbs * _GB), self.flops / (peak_gflops * _GB))

    def limit(self, bandwidth_gbs: float, peak_gflops: float) -> str:
        """'memory' or 'compute', whichever term of the bound is larger."""
        memory = self.bytes / bandwidth_gbs >= self.flops / peak_gflops
        return "memory" if memory else "compute"


def _attention_weights(cfg: T5Config, kv_heads: int) -> int:
    """Numbers in one attention layer's q, k, v, o kernels."""
    return 2 * cfg.emb_dim * cfg.num_heads * cfg.head_dim + 2 * cfg.emb_dim * kv_heads * cfg.head_dim


def _kv_width(cfg: T5Config, kind: str) -> int:
    """Key (or value) projection width summed over a stack's layers of one attention
    kind ('encoder', 'self', 'cross'): each layer's kv heads times head_dim."""
    return sum(cfg.layer_kv_heads(kind)) * cfg.head_dim


def _mlp_weights(cfg: T5Config) -> int:
    return (len(cfg.mlp_activations) + 1) * cfg.emb_dim * cfg.mlp_dim


def _logits_weights(cfg: T5Config) -> int:
    return cfg.emb_dim * cfg.vocab_size


def encoder_cost(cfg: T5Config, batch: int, input_length: int, itemsize: int = _F32) -> PhaseCost:
    """Bytes and FLOPs of encoding `batch` inputs of `input_length` tokens."""
    tokens = batch * input_length
    layer_weights = sum(_attention_weights(cfg, g) + _mlp_weights(cfg) for g in cfg.layer_kv_heads("encoder"))
    norms = (2 * cfg.num_encoder_layers + 1) * cfg.emb_dim
    relpos = cfg.num_heads * cfg.relative_attention_num_buckets
    weights = layer_weights + norms + relpos
    activations = 2 * tokens * cfg.emb_dim  # embedding rows in, encoded out
    attention_flops = 4 * batch * cfg.num_heads * input_length**2 * cfg.head_dim
    flops = 2 * tokens * layer_weights + cfg.num_encoder_layers * attention_flops
    return PhaseCost(bytes=itemsize * (weights + activations), flops=flops)


def cache_build_cost(cfg: T5Config, batch: int, input_length: int, itemsize: int = _F32) -> PhaseCost:
    """Bytes and FLOPs of projecting the cross-attention keys/values once."""
    kv_width = _kv_width(cfg, "cross")  # summed over the decoder layers
    kernels = 2 * cfg.emb_dim * kv_width
    encoded = batch * input_length * cfg.emb_dim
    cache = 2 * batch * input_length * kv_width
    flops = 2 * batch * input_length * kernels
    return PhaseCost(bytes=itemsize * (kernels + encoded + cache), flops=flops)


def cache_numbers(cfg: T5Config, batch: int, input_length: int, output_length: int) -> dict[str, int]:
    """Numbers in the decoding cache once `output_length` tokens are decoded.

    Returns:
      {'self': decoder self-attention keys and values, 'cross':
      encoder-decoder keys and values} for the whole batch (times the
      activation itemsize for bytes; `bench.memory.cache_bytes` counts the
      same from the cache's abstract shapes). Each layer counts with its own
      kv heads of that kind.
    """
    return {"self": 2 * batch * _kv_width(cfg, "self") * output_length,
            "cross": 2 * batch * _kv_width(cfg, "cross") * input_length}


def decode_step_weights(cfg: T5Config) -> int:
    """Numbers of the weights every decode step reads.

    Per decoder layer: three norms, self-attention q/k/v/o, cross-attention q/o
    (its k/v kernels only build the cache), the gated MLP; then the decoder
    relative position bias, the final norm and the logits kernel (the
    embedding table when logits are tied to it). The embedding rows a step
    gathers are counted with the activations.
    """
    e, hd = cfg.emb_dim, cfg.num_heads * cfg.head_dim
    layer_weights = sum(3 * e + _attention_weights(cfg, g) + 2 * e * hd + _mlp_weights(cfg)
                        for g in cfg.layer_kv_heads("self"))
    relpos = cfg.num_heads * cfg.relative_attention_num_buckets
    return layer_weights + relpos + e + _logits_weights(cfg)


def decode_step_cost(cfg: T5Config, batch: int, input_length: int, output_length: int,
                     beam_size: int = 1, itemsize: int = _F32) -> PhaseCost:
    """Bytes and FLOPs of one decode step, averaged over `output_length` steps.

    Args:
      cfg: Model config.
      batch: Examples decoded together.
      input_length: Encoder length (the cross-attention cache length).
      output_length: Steps; step `i` reads `i + 1` self-attention positions.
      beam_size: Sequences per example (they share the cross-attention cache).
      itemsize: Bytes per number.

    Returns:
      The average step's cost.
    """
    rows = batch * beam_size
    layers = cfg.num_decoder_layers
    mean_self = (output_length + 1) / 2
    # Each layer's caches with its own kv heads (widths summed over the layers).
    self_cache = 2 * rows * _kv_width(cfg, "self") * (mean_self + 1)  # read the prefix, write one position
    cross_cache = 2 * batch * _kv_width(cfg, "cross") * input_length
    activations = rows * cfg.emb_dim + rows * cfg.vocab_size  # embedding rows in, logits out
    weights = decode_step_weights(cfg)
    matmul_weights = weights - cfg.num_heads * cfg.relative_attention_num_buckets - (3 * layers + 1) * cfg.emb_dim
    attention_flops = 4 * rows * cfg.num_heads * cfg.head_dim * (mean_self + input_length) * layers
    return PhaseCost(bytes=itemsize * (weights + self_cache + cross_cache + activations),
                     flops=2 * rows * matmul_weights + attention_flops)


def forward_flops(cfg: T5Config, batch: int, input_length: int, target_length: int) -> float:
    """FLOPs of one teacher-forced forward pass (encoder + decoder + logits).

    Matmul FLOPs only (2 per multiply-add): every projection and MLP kernel
    times the tokens it is applied to, the encoder-decoder key/value kernels
    times the encoder tokens, both contractions of every attention (full
    `q_len x kv_len` products, as the dense kernels compute them) and the
    logits.

    Args:
      cfg: Model config.
      batch: Examples.
      input_length: Encoder tokens per example.
      target_length: Decoder tokens per example.

    Returns:
      FLOPs.
    """
    enc_tokens, dec_tokens = batch * input_length, batch * target_length
    q_o = 2 * cfg.emb_dim * cfg.num_heads * cfg.head_dim
    self_kv = 2 * cfg.emb_dim * _kv_width(cfg, "self")  # summed over the decoder layers
    cross_kv = 2 * cfg.emb_dim * _kv_width(cfg, "cross")
    encoder = encoder_cost(cfg, batch, input_length).flops
    layers = cfg.num_decoder_layers
    decoder = (2 * dec_tokens * (layers * (2 * q_o + _mlp_weights(cfg)) + self_kv)  # self q/k/v/o, cross q/o, MLP
               + 2 * enc_tokens * cross_kv  # cross k/v from the encoder output
               + layers * 4 * batch * cfg.num_heads * cfg.head_dim * target_length * (target_length + input_length))
    logits = 2 * dec_tokens * _logits_weights(cfg)
    return encoder + decoder + logits


def train_step_flops(cfg: T5Config, batch: int, input_length: int, target_length: int) -> float:
    """Model FLOPs of a training step: 3x the forward pass (backward = 2x forward).

    The usual MFU convention (PaLM, appendix B): rematerialisation and the
    optimizer are not counted.
    """
    return 3 * forward_flops(cfg, batch, input_length, target_length)
