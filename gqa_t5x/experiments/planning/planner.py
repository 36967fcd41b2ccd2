"""`gqa-t5x plan`: predicted cost, alpha-0 quality and the Pareto front of kv-head candidates.

The model of the prediction (from `roofline.py`): one batch of `batch`
samples is encoded (`encoder_cost`), its cross-attention cache built once
(`cache_build_cost`), then `output_length` greedy decode steps run
(`decode_step_cost`, the average step); each phase takes its roofline bound
`max(bytes / bandwidth, FLOPs / peak)` on the device, and

    time per sample = (encoder + cache build + output_length x decode step) / batch.

Bytes count `itemsize` of the prediction dtype per number (float32 on the
CPU, bfloat16 on accelerators unless `dtype` says otherwise). The KV bytes
are the decoding cache of the whole batch once `output_length` tokens are
decoded (`roofline.cache_numbers` x itemsize; `bench.memory.cache_bytes`
counts the same from the cache the model allocates). The bound is
optimistic: kernel launches, the step loop's overhead and imperfect reuse
are not in it, so measured times are larger; what it ranks is the bytes.

Quality is the alpha-0 loss (no uptraining): the source checkpoint is
converted in memory to each candidate with each method
(`conversion.convert`) and the teacher-forced loss per target token of the
held-out examples is scored by `scoring.score_params`, the study's scorer.
Candidates are evaluated config by config, so the compiled scorer of one
config (`losses`' cache) serves all its methods.
"""

from __future__ import annotations

import dataclasses

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gqa_t5x.experiments import roofline
from gqa_t5x.experiments.planning import candidates as candidate_lib
from gqa_t5x.model.config import T5Config

# --device -> key of roofline.PUBLISHED_PEAKS (data-sheet peaks, sources there);
# 'cpu' is this machine, measured (roofline.measure_machine).
DEVICES: dict[str, str | None] = {"cpu": None, "h100": "H100", "h200": "H200", "a100": "A100",
                                  "tpu-v4": "TPU v4", "v5e": "TPU v5e", "v5p": "TPU v5p"}
EXAMPLE_FEATURES = ("encoder_input_tokens", "decoder_target_tokens")


@dataclasses.dataclass(frozen=True)
class Device:
    """The two ceilings a prediction divides by.

    Attributes:
      name: The `--device` preset.
      bandwidth_gbs: Memory bandwidth, GB/s.
      peak_gflops: Matmul peak in `dtype`, GFLOP/s.
      dtype: Dtype of the predicted run (sets bytes per number and the peak).
      source: Where the figures come from (measured here, or the data sheet).
    """

    name: str
    bandwidth_gbs: float
    peak_gflops: float
    dtype: str
    source: str

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bfloat16" else 4


def device_ceilings(device: str, dtype: str | None = None,
                    measure: Callable[..., Mapping[str, Any]] = roofline.measure_machine) -> Device:
    """The ceilings of a `--device` preset.

    Args:
      device: A key of `DEVICES`.
      dtype: 'float32' or 'bfloat16' (default: float32 on the CPU, bfloat16,
        T5X's inference dtype, on accelerators).
      measure: Measures this machine (`roofline.measure_machine`) for 'cpu'.

    Returns:
      The `Device`.

    Raises:
      ValueError: an unknown device or dtype, or a dtype without a published peak.
    """
    if device not in DEVICES:
        raise ValueError(f"--device={device!r} is not a device preset; choose one of {sorted(DEVICES)}.")
    dtype = dtype or ("float32" if device == "cpu" else "bfloat16")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype={dtype!r} must be float32 or bfloat16.")
    if device == "cpu":
        measured = measure(dtype=dtype)
        return Device("cpu", float(measured["bandwidth_gbs"]["best"]), float(measured["matmul_peak_gflops"]),
                      dtype, f"measured here ({measured['device_kind']}: best copy/read rate, {dtype} matmul)")
    peaks = roofline.PUBLISHED_PEAKS[DEVICES[device]]
    if dtype not in peaks:
        raise ValueError(f"--device={device} has no published {dtype} peak (it has "
                         f"{sorted(k for k in peaks if k != 'bandwidth_gbs')}); pass --dtype bfloat16.")
    return Device(device, peaks["bandwidth_gbs"], peaks[dtype], dtype,
                  f"data sheet ({DEVICES[device]}, dense {dtype}; roofline.PUBLISHED_PEAKS)")


def predict(config: T5Config, device: Device, *, batch: int, input_length: int,
            output_length: int) -> dict[str, Any]:
    """Predicted time per sample and KV bytes of one configuration (the module's model).

    Args:
      config: The candidate's config.
      device: Its ceilings.
      batch: Samples decoded together.
      input_length: Encoder tokens per sample.
      output_length: Decoded tokens per sample.

    Returns:
      {'time_per_sample_s', 'phase_s': {'encoder', 'cache_build', 'decode_step'},
      'limit': {phase: 'memory'|'compute'}, 'kv_bytes': {'self', 'cross', 'total'} of the batch,
      'kv_bytes_per_sample'}.
    """
    itemsize = device.itemsize
    phases = {
        "encoder": roofline.encoder_cost(config, batch, input_length, itemsize),
        "cache_build": roofline.cache_build_cost(config, batch, input_length, itemsize),
        "decode_step": roofline.decode_step_cost(config, batch, input_length, output_length, itemsize=itemsize),
    }
    seconds = {k: v.bound_s(device.bandwidth_gbs, device.peak_gflops) for k, v in phases.items()}
    total = seconds["encoder"] + seconds["cache_build"] + output_length * seconds["decode_step"]
    kv = {k: v * itemsize for k, v in roofline.cache_numbers(config, batch, input_length, output_length).items()}
    kv["total"] = kv["self"] + kv["cross"]
    return {"time_per_sample_s": total / batch, "phase_s": seconds,
            "limit": {k: v.limit(device.bandwidth_gbs, device.peak_gflops) for k, v in phases.items()},
            "kv_bytes": kv, "kv_bytes_per_sample": kv["total"] / batch}


def load_examples(path: str | Path, max_examples: int | None = None) -> dict[str, np.ndarray]:
    """Span-corruption examples from a `.npz` as the study writes them (`study/data.py`).

    Args:
      path: A `.npz` with 'encoder_input_tokens' `[n, in]` and
        'decoder_target_tokens' `[n, out]` int arrays (0 = padding).
      max_examples: Keep this many rows, evenly spaced over the file (all if None or more).

    Returns:
      The two arrays (int32).

    Raises:
      FileNotFoundError / ValueError naming `path` and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--examples {path}: no such file (a .npz with {list(EXAMPLE_FEATURES)}).")
    with np.load(path) as data:
        missing = [k for k in EXAMPLE_FEATURES if k not in data]
        if missing:
            raise ValueError(f"--examples {path} lacks {missing}; it has {sorted(data)} "
                             f"(expected {list(EXAMPLE_FEATURES)}, as gqa-t5x reproduce writes them).")
        arrays = {k: np.asarray(data[k]) for k in EXAMPLE_FEATURES}
    n = arrays["encoder_input_tokens"].shape[0]
    if any(a.ndim != 2 or a.shape[0] != n or not np.issubdtype(a.dtype, np.integer) for a in arrays.values()) or n == 0:
        raise ValueError(f"--examples {path}: expected two 2-D integer arrays with the same number (> 0) of rows, "
                         f"got {({k: (a.shape, str(a.dtype)) for k, a in arrays.items()})}.")
    if max_examples is not None and max_examples < n:
        rows = np.linspace(0, n - 1, max_examples).round().astype(int)
        arrays = {k: a[rows] for k, a in arrays.items()}
    return {k: a.astype(np.int32) for k, a in arrays.items()}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which points no other point dominates (both coordinates minimised).

    A point is dominated when another is no worse in both coordinates and
    better in at least one; equal points are all on the front.

    Args:
      points: (cost, loss) pairs.

    Returns:
      One flag per point.
    """
    return [not any(a <= x and b <= y and (a < x or b < y) for a, b in points) for x, y in points]


def evaluate(source: T5Config, params: Any, candidate: candidate_lib.Candidate, method: str,
             examples: Mapping[str, np.ndarray], *, seed: int = 0, calibration: Any = None) -> dict[str, float]:
    """Alpha-0 held-out loss of the source converted to one candidate with one method.

    Args:
      source: The source config.
      params: Its parameters.
      candidate: The target kv heads (and grouping).
      method: A registered conversion method.
      examples: `load_examples`' arrays.
      seed: Seed of methods that draw random numbers.
      calibration: Statistics of data-aware methods (`conversion.collect_statistics`).

    Returns:
      {'loss': per target token, 'accuracy': argmax = target per token, 'tokens', 'convert_s', 'score_s'}.
    """
    from gqa_t5x import conversion
    from gqa_t5x.experiments import scoring

    started = time.perf_counter()
    config, converted = conversion.convert(source, params, method=method, seed=seed, calibration=calibration,
                                           grouping=candidate.grouping, **candidate.targets())
    converted_at = time.perf_counter()
    scores = scoring.score_params(config, converted, examples)
    tokens = float(scores["tokens"].sum())
    return {"loss": float(scores["loss"].sum()) / tokens, "accuracy": float(scores["correct"].sum()) / tokens,
            "tokens": tokens, "convert_s": converted_at - started, "score_s": time.perf_counter() - converted_at}


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    """What `run_plan` plans for.

    Attributes:
      checkpoint: The multi-head (or any) source checkpoint.
      examples: `.npz` of held-out span-corruption examples.
      device: A key of `DEVICES`.
      input_length, output_length, batch: The decoding shape predicted.
      kv_budget_bytes: KV-cache bytes (whole batch) the per-layer family must fit.
      kv_budget_fraction: Or that share of the source's cache (one of the two; default 0.25).
      methods: Conversion methods evaluated for every candidate.
      groupings: Groupings of converted candidates.
      per_layer: Most per-layer candidates.
      max_candidates: Most candidates in all.
      max_examples: Held-out rows scored (evenly spaced over the file).
      calibration: `.npz` of examples for data-aware methods' statistics (e.g. lsq).
      dtype: Prediction dtype (None: the device's default).
      seed: Conversion seed.
    """

    checkpoint: str
    examples: str
    device: str
    input_length: int
    output_length: int
    batch: int
    kv_budget_bytes: float | None = None
    kv_budget_fraction: float | None = None
    methods: tuple[str, ...] = ("mean",)
    groupings: tuple[str, ...] = ("contiguous",)
    per_layer: int = 8
    max_candidates: int = 40
    max_examples: int | None = 512
    calibration: str | None = None
    dtype: str | None = None
    seed: int = 0

    @property
    def needs_statistics(self) -> bool:
        """Whether a method or grouping of the plan reads calibration statistics."""
        from gqa_t5x import conversion

        return (any(conversion.get_method(m).needs_calibration for m in self.methods if m in conversion.METHODS)
                or "similarity" in self.groupings)

    def validate(self) -> None:
        """Raises ValueError naming the flag of an invalid setting."""
        from gqa_t5x import conversion

        for flag in ("input_length", "output_length", "batch", "max_candidates"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag}={getattr(self, flag)} must be >= 1.")
        if self.per_layer < 0 or (self.max_examples is not None and self.max_examples < 1):
            raise ValueError(f"--per_layer={self.per_layer} must be >= 0 and --max_examples={self.max_examples} >= 1.")
        if self.kv_budget_bytes is not None and self.kv_budget_fraction is not None:
            raise ValueError("Give --kv_budget_bytes or --kv_budget_fraction, not both.")
        if self.kv_budget_bytes is not None and self.kv_budget_bytes <= 0:
            raise ValueError(f"--kv_budget_bytes={self.kv_budget_bytes} must be > 0.")
        if self.kv_budget_fraction is not None and not 0 < self.kv_budget_fraction <= 1:
            raise ValueError(f"--kv_budget_fraction={self.kv_budget_fraction} must be in (0, 1].")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods={','.join(self.methods)} must name at least one method, each once.")
        known = [m.name for m in conversion.registered_methods()]
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            raise ValueError(f"--methods: unknown method(s) {unknown}; registered: {known}.")
        if any(conversion.get_method(m).needs_calibration for m in self.methods) and not self.calibration:
            needing = [m for m in self.methods if conversion.get_method(m).needs_calibration]
            raise ValueError(f"--methods {','.join(needing)} need calibration statistics: pass --calibration "
                             "FILE.npz (examples of the training split, e.g. the study's data/calibration.npz).")
        if not self.groupings or any(g not in candidate_lib.GROUPINGS for g in self.groupings):
            raise ValueError(f"--groupings={','.join(self.groupings)}: choose from {list(candidate_lib.GROUPINGS)}.")
        if self.needs_statistics and not self.calibration:
            raise ValueError("--groupings similarity needs calibration statistics: pass --calibration FILE.npz "
                             "(examples of the training split, e.g. the study's data/calibration.npz).")
        if self.device not in DEVICES:
            raise ValueError(f"--device={self.device!r} is not a device preset; choose one of {sorted(DEVICES)}.")


def run_plan(settings: PlanSettings, log: Callable[[str], None] = print,
             measure: Callable[..., Mapping[str, Any]] = roofline.measure_machine) -> dict[str, Any]:
    """Lists candidates, predicts their cost, scores their alpha-0 loss and marks the Pareto fronts.

    Args:
      settings: The plan.
      log: Progress lines.
      measure: Measures this machine for `--device cpu`.

    Returns:
      {'settings', 'source' (config dict), 'device', 'budget', 'examples', 'candidates_info',
      'rows': [one per candidate and method: names, counts, prediction, loss, flags
      'front_time' / 'front_kv' (Pareto over (time per sample, loss) / (KV bytes, loss)),
      'within_budget'], 'wall_s'}.
    """
    from gqa_t5x import checkpoints, conversion

    settings.validate()
    started = time.perf_counter()
    device = device_ceilings(settings.device, settings.dtype, measure)
    log(f"device {device.name}: {device.bandwidth_gbs:g} GB/s, {device.peak_gflops:g} GFLOP/s "
        f"({device.dtype}; {device.source})")
    examples = load_examples(settings.examples, settings.max_examples)
    source, params = checkpoints.load(settings.checkpoint)
    top = max(int(a.max()) for a in examples.values())
    if top >= source.vocab_size:
        raise ValueError(f"--examples {settings.examples} holds token id {top}, outside the checkpoint's "
                         f"vocabulary (vocab_size={source.vocab_size}); were they made with its vocabulary?")
    shape = dict(batch=settings.batch, input_length=settings.input_length, output_length=settings.output_length)
    source_pred = predict(source, device, **shape)
    per_head = candidate_lib.numbers_per_head(source, **shape)
    source_numbers = source_pred["kv_bytes"]["total"] / device.itemsize
    budget_bytes = (settings.kv_budget_bytes if settings.kv_budget_bytes is not None
                    else (settings.kv_budget_fraction or 0.25) * source_pred["kv_bytes"]["total"])
    found, info = candidate_lib.generate(
        source, params, **shape, budget_numbers=budget_bytes / device.itemsize, groupings=settings.groupings,
        per_layer=settings.per_layer, max_candidates=settings.max_candidates)
    calibration = None
    if settings.needs_statistics:
        calibration_examples = load_examples(settings.calibration, settings.max_examples)
        calibration = conversion.collect_statistics(source, params, [calibration_examples])
    log(f"{len(found)} candidates x {len(settings.methods)} method(s) on {examples['encoder_input_tokens'].shape[0]} "
        f"held-out examples" + (f" ({info['dropped']} more cut by --max_candidates)" if info["dropped"] else ""))
    rows = []
    source_scores: dict[str, float] | None = None
    for index, candidate in enumerate(found):
        config = candidate.config(source)
        pred = predict(config, device, **shape)
        numbers = candidate_lib.kv_numbers(candidate, per_head)
        for method in settings.methods:
            if candidate.is_source(source):  # nothing converted: one score serves every method
                source_scores = source_scores or evaluate(source, params, candidate, method, examples,
                                                          seed=settings.seed, calibration=calibration)
                scores = source_scores
            else:
                scores = evaluate(source, params, candidate, method, examples, seed=settings.seed,
                                  calibration=calibration)
            rows.append({
                "candidate": candidate.name, "family": candidate.family, "grouping": candidate.grouping,
                "method": method, "self_kv": list(candidate.self_kv), "cross_kv": list(candidate.cross_kv),
                "config": config.describe_kv_heads(), **pred, **scores,
                "kv_fraction": numbers / source_numbers,
                "within_budget": pred["kv_bytes"]["total"] <= budget_bytes * (1 + 1e-12),
                "speedup": source_pred["time_per_sample_s"] / pred["time_per_sample_s"],
            })
            log(f"[{index + 1}/{len(found)}] {candidate.name:<28} {method:<6} loss {scores['loss']:.4f}  "
                f"predicted {1e3 * pred['time_per_sample_s']:.3f} ms/sample  KV {pred['kv_bytes']['total'] / 2**20:.1f} MiB")
    for row in rows:  # the source's loss is known when the source itself is a candidate (G = its count)
        row["loss_vs_source"] = row["loss"] - source_scores["loss"] if source_scores else None
    for key, cost in (("front_time", lambda r: r["time_per_sample_s"]), ("front_kv", lambda r: r["kv_bytes"]["total"])):
        for row, flag in zip(rows, pareto_front([(cost(r), r["loss"]) for r in rows])):
            row[key] = flag
    return {"settings": dataclasses.asdict(settings), "source": source.to_dict(),
            "device": dataclasses.asdict(device), "itemsize": device.itemsize,
            "budget": {"kv_bytes": budget_bytes, "fraction_of_source": budget_bytes / source_pred["kv_bytes"]["total"]},
            "source_prediction": source_pred, "examples": int(examples["encoder_input_tokens"].shape[0]),
            "candidates_info": info, "rows": rows, "wall_s": time.perf_counter() - started}
