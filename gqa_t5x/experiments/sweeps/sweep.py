"""Ablation sweeps: groups x uptraining proportion x conversion method.

A sweep gin (`configs/sweeps/*.gin`) binds one `gqa_t5x.experiments.sweeps.sweep.SweepSpec`.
`gqa-t5x sweep SWEEP_GIN --output DIR` expands it into points and runs, for
each point, the paper's pipeline:

    convert (G kv heads, method) -> uptrain (alpha of pre-training)
      -> fine-tune on each task -> evaluate the best checkpoint
      -> time greedy decoding -> DIR/<point>/results.json

DIR may be local or gs:// (every file goes through `gqa_t5x.storage` and is
written whole or not at all). Each stage leaves `<stage>.done.json` in the
point's directory, so a rerun
skips finished stages and finished points (a point with `results.json`); the
trainer itself resumes an interrupted stage from MODEL_DIR. A failing point is
recorded in `failed.json` and the sweep goes on with the others.

`--mode print` prints the stages as `python -m gqa_t5x.main ...` commands (one
per run, prefixed by `--launcher`, e.g. the TPU-pod script) instead of running
them, for cluster users who launch each run as its own job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import gin

from gqa_t5x import gin_config
from gqa_t5x.data import task_table
from gqa_t5x.experiments import stages
from gqa_t5x.model.config import check_kv_heads
from gqa_t5x.storage import paths
from gqa_t5x.storage.paths import Path

@gin.configurable(module="gqa_t5x.experiments.sweeps.sweep")
@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """What a sweep varies and how each point is trained.

    Attributes:
      name: Sweep name (used in run names).
      model_gin: Model gin of the multi-head source (e.g. xxl.gin).
      base_checkpoint: The multi-head checkpoint every point starts from.
      num_kv_heads: Values of G; num_heads itself is the MHA point.
      methods: Conversion methods (mean, first, random, align).
      alphas: Uptraining proportions (0 = convert and fine-tune directly).
      tasks: Fine-tuning/evaluation task keys (`gqa_t5x.data.task_table`).
      gin_files: Extra gin files for every training/eval stage (data
        locations, CPU-sized lengths, ...), after the run gin.
      uptrain_bindings: Extra bindings of the uptraining stage.
      finetune_bindings: Extra bindings of the fine-tuning stage.
      eval_bindings: Extra bindings of the evaluation stage.
      finetune_steps: Fine-tuning steps after the uptrained checkpoint's step.
      mha_alpha: Also uptrain the MHA point by this alpha (paper: 0, i.e. the
        public checkpoint is fine-tuned as it is).
      timing_batch: Batch size of the time-per-sample measurement.
      timing_input_length: Encoder tokens per timed sample (paper: 2048).
      timing_output_length: Decoding steps per timed sample (paper: 512).
      timing_dtype: Activation dtype of the timing ('bfloat16' on TPU).
      final_eval: Re-evaluate the best fine-tuned checkpoint with
        `gin/runs/eval.gin` (+ `eval_bindings`, e.g. the whole dev set). When
        False, the score is the best periodic evaluation of the fine-tuning
        run (the same checkpoint, on NUM_EVAL_EXAMPLES of the dev set).
      seed: Seed of the `random` conversion.
    """

    name: str = "sweep"
    model_gin: str = "gin/models/t5_1_1/large.gin"
    base_checkpoint: str = ""
    num_kv_heads: Sequence[int] = (1, 8)
    methods: Sequence[str] = ("mean",)
    alphas: Sequence[float] = (0.05,)
    tasks: Sequence[str] = ("cnn_dailymail",)
    gin_files: Sequence[str] = ()
    uptrain_bindings: Sequence[str] = ()
    finetune_bindings: Sequence[str] = ()
    eval_bindings: Sequence[str] = ()
    finetune_steps: int = 10_000
    mha_alpha: float = 0.0
    timing_batch: int = 8
    timing_input_length: int = 2048
    timing_output_length: int = 512
    timing_dtype: str = "bfloat16"
    final_eval: bool = True
    seed: int = 0

    def validate(self, num_heads: int) -> None:
        from gqa_t5x import conversion

        if not self.base_checkpoint:
            raise ValueError("SweepSpec.base_checkpoint is required (gin: gqa_t5x.experiments.sweeps.sweep.SweepSpec.base_checkpoint).")
        for g in self.num_kv_heads:
            check_kv_heads(num_heads, g, name="SweepSpec.num_kv_heads",
                           hint=f" ({self.model_gin} has num_heads={num_heads})")
        unknown = sorted(set(self.methods) - set(conversion.METHODS))
        if unknown:
            raise ValueError(f"SweepSpec.methods has unknown method(s) {unknown}; known: {list(conversion.METHODS)}.")
        known = [spec.key for spec in task_table.task_specs() if spec.primary_metric and spec.gin_file]
        unknown = sorted(set(self.tasks) - set(known))
        if unknown:
            raise ValueError(f"SweepSpec.tasks has unknown task(s) {unknown}; known: {known}.")
        if any(a < 0 for a in self.alphas):
            raise ValueError(f"SweepSpec.alphas must be >= 0; got {list(self.alphas)}.")


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the sweep."""

    num_heads: int
    num_kv_heads: int
    method: str | None  # None: the MHA source, not converted
    alpha: float

    @property
    def name(self) -> str:
        if self.method is None:
            return f"mha_a{self.alpha:g}"
        return f"g{self.num_kv_heads}_{self.method}_a{self.alpha:g}"

    @property
    def label(self) -> str:
        if self.method is None:
            return "MHA" + (f" a={self.alpha:g}" if self.alpha else "")
        kind = "MQA" if self.num_kv_heads == 1 else f"GQA-{self.num_kv_heads}"
        return f"{kind} {self.method} a={self.alpha:g}"


def expand(spec: SweepSpec, num_heads: int) -> list[Point]:
    """All points of a sweep: one MHA point plus G x method x alpha."""
    points = [Point(num_heads, num_heads, None, spec.mha_alpha)]
    for g in spec.num_kv_heads:
        if g == num_heads:
            continue
        for method in spec.methods:
            for alpha in spec.alphas:
                points.append(Point(num_heads, g, method, float(alpha)))
    return points


def load_spec(sweep_gin: str, bindings: Sequence[str] = ()) -> SweepSpec:
    """Parses a sweep gin (+ bindings) and returns its SweepSpec."""
    gin_config.parse_gin([sweep_gin], bindings)
    return gin.get_configurable(SweepSpec)()


class Runner:
    """Runs (or prints) the stages of sweep points under `output_dir`.

    Every stage is a `launcher.Launch` run by the shared `stages.StageRunner`:
    `mode='local'` runs it in this process, `mode='print'` prints its command
    line (`Launch.command_line`) behind `launcher`. Markers live in each
    point's directory.
    """

    def __init__(self, spec: SweepSpec, output_dir: str | os.PathLike, *,
                 mode: str = "local", launcher: str = "", log: Callable[[str], None] = print):
        self.spec, self.log = spec, log
        self.stages = stages.StageRunner(mode=mode, launcher_prefix=launcher, log=log)
        self.mode = mode
        self.out = paths.as_path(output_dir, name="--output")

    # -- stages
    def convert(self, point: Point, run_dir: Path) -> str:
        if point.method is None:
            return self.spec.base_checkpoint
        return self.stages.convert(run_dir, "convert", source=self.spec.base_checkpoint, output=run_dir / "converted",
                                   num_kv_heads=point.num_kv_heads, method=point.method, seed=self.spec.seed)

    def uptrain(self, point: Point, run_dir: Path, initial: str) -> str | stages.NewestIn:
        if point.alpha <= 0:
            return initial
        done = self.stages.done(run_dir, "uptrain")
        if done:
            return done["checkpoint"]
        started = time.time()
        model_dir = run_dir / "uptrain"
        self.stages.launch(stages.train_launch(
            self.spec.model_gin, stages.UPTRAIN_GIN, self.spec.gin_files, point.num_kv_heads, model_dir, initial,
            [f"UPTRAIN_ALPHA={point.alpha}", *self.spec.uptrain_bindings]))
        if self.stages.printing:
            return stages.NewestIn(str(model_dir))  # Resolved when the printed fine-tuning job runs.
        return self.stages.mark(run_dir, "uptrain", {"checkpoint": stages.latest_checkpoint(model_dir)},
                                started)["checkpoint"]

    def finetune_and_eval(self, point: Point, run_dir: Path, initial: str | stages.NewestIn, task: str) -> float | None:
        spec = self.spec
        return self.stages.finetune_and_eval(
            run_dir, task=task, model_gin=spec.model_gin, gin_files=spec.gin_files,
            num_kv_heads=point.num_kv_heads, initial=initial, steps=spec.finetune_steps,
            finetune_bindings=spec.finetune_bindings, eval_bindings=spec.eval_bindings, final_eval=spec.final_eval)

    def time_per_sample(self, point: Point, run_dir: Path, checkpoint: str) -> float | None:
        if self.stages.printing:
            return None
        done = self.stages.done(run_dir, "timing")
        if done:
            return done["time_per_sample"]
        from gqa_t5x.experiments import timing

        result = timing.time_checkpoint(
            checkpoint, dtype=self.spec.timing_dtype, batch=self.spec.timing_batch,
            input_length=self.spec.timing_input_length, output_length=self.spec.timing_output_length)
        return self.stages.mark(run_dir, "timing", result)["time_per_sample"]

    # -- driver
    def run_point(self, point: Point) -> dict | None:
        run_dir = self.out / point.name
        results_path = run_dir / "results.json"
        if results_path.exists():
            self.log(f"[{point.name}] finished earlier; skipped")
            return json.loads(results_path.read_text())
        if self.mode != "print":  # Printing writes nothing.
            paths.makedirs(run_dir)
        self.log(f"[{point.name}] {point.label}")
        start = time.time()
        converted = self.convert(point, run_dir)
        uptrained = self.uptrain(point, run_dir, converted)
        scores = {}
        for task in self.spec.tasks:
            score = self.finetune_and_eval(point, run_dir, uptrained, task)
            if score is not None:
                scores[task] = score
        timed = self.time_per_sample(point, run_dir, uptrained)
        if self.mode == "print":
            return None
        result = {
            "name": point.label, "sweep": self.spec.name,
            "model": os.path.splitext(os.path.basename(self.spec.model_gin))[0],
            "num_heads": point.num_heads, "num_kv_heads": point.num_kv_heads, "method": point.method,
            "alpha": point.alpha, "time_per_sample": timed, "scores": scores,
            "wall_s": round(time.time() - start, 1),
        }
        paths.replace_file(results_path, json.dumps(result, indent=2))
        (run_dir / "failed.json").unlink(missing_ok=True)
        return result

    def run(self, points: Sequence[Point]) -> tuple[list[dict], list[str]]:
        results, failed = [], []
        for point in points:
            try:
                result = self.run_point(point)
                if result is not None:
                    results.append(result)
            except Exception as err:  # noqa: BLE001 - one failed point must not stop the sweep
                if self.mode == "print":
                    raise
                failed.append(point.name)
                run_dir = self.out / point.name
                paths.replace_file(run_dir / "failed.json", json.dumps(
                    {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}, indent=2))
                self.log(f"[{point.name}] FAILED: {type(err).__name__}: {err} (see {run_dir / 'failed.json'})")
        return results, failed
