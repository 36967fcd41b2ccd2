"""Ablation sweeps: groups x uptraining proportion x conversion method.

A sweep gin (`configs/sweeps/*.gin`) binds one `gqa_t5x.experiments.sweep.SweepSpec`.
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
import re
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import gin

from gqa_t5x import gin_config, launcher
from gqa_t5x.data import task_table
from gqa_t5x.storage import paths
from gqa_t5x.storage.paths import Path

@gin.configurable(module="gqa_t5x.experiments.sweep")
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
            raise ValueError("SweepSpec.base_checkpoint is required (gin: gqa_t5x.experiments.sweep.SweepSpec.base_checkpoint).")
        for g in self.num_kv_heads:
            if g < 1 or num_heads % g:
                raise ValueError(
                    f"SweepSpec.num_kv_heads contains {g}, which does not divide "
                    f"num_heads={num_heads} of {self.model_gin}."
                )
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
    def gin_kv_heads(self) -> int | None:
        """NUM_KV_HEADS as the model gin spells it (None = multi-head)."""
        return None if self.num_kv_heads == self.num_heads else self.num_kv_heads

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


def latest_checkpoint(directory: str | os.PathLike) -> str:
    """The `checkpoint_<step>` with the largest step under `directory` (local or gs://)."""
    directory = paths.as_path(directory, name="model directory")
    found = []
    for name in paths.listdir(directory):
        m = re.fullmatch(r"checkpoint_(\d+)", name)
        if m and (directory / name).is_dir():
            found.append((int(m.group(1)), name))
    if not found:
        raise FileNotFoundError(f"No checkpoint_<step> directory in {str(directory)!r}.")
    return str(directory / max(found)[1])


def enable_compilation_cache(directory: Path) -> None:
    """JAX's persistent compilation cache, so points with the same shapes
    (e.g. every method at one G) compile their train and decode steps once.
    A cache directory the user configured is kept."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    paths.makedirs(directory)
    jax.config.update("jax_compilation_cache_dir", str(directory))  # JAX reads gs:// too (epath)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _gin_str(value: str) -> str:
    return json.dumps(str(value))


# ------------------------------------------------------------------ stages
def _train_launch(spec: SweepSpec, run_gin: str, extra_gins: Sequence[str], g: int | None,
                  model_dir: Path, initial: str, bindings: Sequence[str]) -> launcher.Launch:
    return launcher.Launch(
        run_mode="train",
        gin_files=(spec.model_gin, run_gin, *extra_gins, *spec.gin_files),
        gin_bindings=(
            f"NUM_KV_HEADS={g if g else None}",
            f"MODEL_DIR={_gin_str(model_dir)}",
            f"INITIAL_CHECKPOINT_PATH={_gin_str(initial)}",
            *bindings,
        ),
    )


class Runner:
    """Runs (or prints) the stages of sweep points under `output_dir`.

    Every stage is a `launcher.Launch`: `mode='local'` runs it in this process
    (`launcher.launch`), `mode='print'` prints its command line
    (`Launch.command_line`) behind `launcher_prefix`.
    """

    def __init__(self, spec: SweepSpec, output_dir: str | os.PathLike, *,
                 mode: str = "local", launcher: str = "", log: Callable[[str], None] = print,
                 compilation_cache: bool = True):
        if mode not in ("local", "print"):
            raise ValueError(f"--mode={mode!r}; choose 'local' or 'print'.")
        self.spec, self.mode, self.launcher_prefix, self.log = spec, mode, launcher, log
        self.out = paths.as_path(output_dir, name="--output")
        if mode == "local" and compilation_cache:
            enable_compilation_cache(self.out / ".jax_cache")

    # -- helpers
    def _done(self, run_dir: Path, stage: str) -> dict | None:
        path = run_dir / f"{stage}.done.json"
        return json.loads(path.read_text()) if path.exists() else None

    def _mark(self, run_dir: Path, stage: str, info: dict) -> dict:
        paths.replace_file(run_dir / f"{stage}.done.json", json.dumps(info, indent=2))
        return info

    def _run(self, request: launcher.Launch, *, on_every_host: bool = True) -> Any:
        """Runs `request` here, or prints it (behind the launcher prefix when the
        stage runs on every host of a slice; a conversion runs once)."""
        if self.mode == "print":
            prefix = self.launcher_prefix if on_every_host else ""
            self.log(f"{prefix} {request.command_line()}".strip())
            return None
        return launcher.launch(request)

    # -- stages
    def convert(self, point: Point, run_dir: Path) -> str:
        if point.method is None:
            return self.spec.base_checkpoint
        done = self._done(run_dir, "convert")
        if done:
            return done["checkpoint"]
        out = run_dir / "converted"
        self._run(launcher.Launch(
            run_mode="convert",
            gin_files=("gin/runs/convert.gin",),
            gin_bindings=(
                f"SOURCE={_gin_str(self.spec.base_checkpoint)}", f"OUTPUT={_gin_str(out)}",
                f"NUM_KV_HEADS={point.num_kv_heads}", f"METHOD={_gin_str(point.method)}",
                f"RANDOM_SEED={self.spec.seed}", "OVERWRITE=True", "converter.convert_checkpoint.progress=False",
            ),
        ), on_every_host=False)
        if self.mode == "print":
            return str(out)
        return self._mark(run_dir, "convert", {"checkpoint": str(out)})["checkpoint"]

    def uptrain(self, point: Point, run_dir: Path, initial: str) -> str:
        if point.alpha <= 0:
            return initial
        done = self._done(run_dir, "uptrain")
        if done:
            return done["checkpoint"]
        model_dir = run_dir / "uptrain"
        self._run(_train_launch(self.spec, "gin/runs/uptrain.gin", [], point.gin_kv_heads, model_dir, initial,
                                [f"UPTRAIN_ALPHA={point.alpha}", *self.spec.uptrain_bindings]))
        if self.mode == "print":
            return str(model_dir / "checkpoint_<final>")
        return self._mark(run_dir, "uptrain", {"checkpoint": latest_checkpoint(model_dir)})["checkpoint"]

    def finetune_and_eval(self, point: Point, run_dir: Path, initial: str, task: str) -> float | None:
        done = self._done(run_dir, f"eval_{task}")
        if done:
            return done["score"]
        spec = task_table.by_key(task)
        task_gin, metric = spec.gin_file, spec.primary_metric
        model_dir = run_dir / f"finetune_{task}"
        request = _train_launch(self.spec, "gin/runs/finetune.gin", [task_gin], point.gin_kv_heads, model_dir, initial,
                           ["TRAIN_STEPS=@gqa_t5x.training.trainer.steps_after_checkpoint()",
                            "gqa_t5x.training.trainer.steps_after_checkpoint.initial_checkpoint_path=%INITIAL_CHECKPOINT_PATH",
                            f"gqa_t5x.training.trainer.steps_after_checkpoint.steps={self.spec.finetune_steps}",
                            f"EVAL_METRIC={_gin_str(metric)}", *self.spec.finetune_bindings])
        summary = self._run(request)
        if self.mode == "local" and not self.spec.final_eval and getattr(summary, "best", None):
            step = summary.best[0]
            values = next(iter(summary.eval_metrics[step].values()))
            return self._mark(run_dir, f"eval_{task}", {
                "checkpoint": str(model_dir / "best" / f"checkpoint_{step}"), "metric": metric,
                "score": float(values[metric]), "all": values, "source": "fine-tuning evaluation"})["score"]
        best = model_dir / "best"
        eval_dir = run_dir / f"eval_{task}"
        checkpoint = str(best / "checkpoint_<best>") if self.mode == "print" else (
            latest_checkpoint(best) if best.is_dir() else latest_checkpoint(model_dir))
        metrics = self._run(launcher.Launch(
            run_mode="eval",
            gin_files=(self.spec.model_gin, "gin/runs/eval.gin", task_gin, *self.spec.gin_files),
            gin_bindings=(f"CHECKPOINT_PATH={_gin_str(checkpoint)}", f"EVAL_OUTPUT_DIR={_gin_str(eval_dir)}",
                          *self.spec.eval_bindings),
        ))
        if self.mode == "print":
            return None
        values = next(iter(metrics.values())) if metrics else {}
        if metric not in values:
            raise KeyError(f"Evaluation of {task} produced metrics {sorted(values)}, not {metric!r}.")
        return self._mark(run_dir, f"eval_{task}", {"checkpoint": checkpoint, "metric": metric,
                                                     "score": float(values[metric]), "all": values})["score"]

    def time_per_sample(self, point: Point, run_dir: Path, checkpoint: str) -> float | None:
        if self.mode == "print":
            return None
        done = self._done(run_dir, "timing")
        if done:
            return done["time_per_sample"]
        from gqa_t5x.experiments import timing

        result = timing.time_checkpoint(
            checkpoint, dtype=self.spec.timing_dtype, batch=self.spec.timing_batch,
            input_length=self.spec.timing_input_length, output_length=self.spec.timing_output_length)
        return self._mark(run_dir, "timing", result)["time_per_sample"]

    # -- driver
    def run_point(self, point: Point) -> dict | None:
        run_dir = self.out / point.name
        results_path = run_dir / "results.json"
        if results_path.exists():
            self.log(f"[{point.name}] finished earlier; skipped")
            return json.loads(results_path.read_text())
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
