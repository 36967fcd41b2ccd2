"""Resumable stages: the one runner under the sweeps and the study.

An experiment is a chain of stages (convert -> train -> fine-tune + evaluate
-> time). Each stage is a `launcher.Launch` of a run mode, so it is exactly
what `python -m gqa_t5x.main` would run, and `StageRunner` runs it here
(`mode='local'`) or prints its command line behind a launcher prefix
(`mode='print'`, one job per run on a cluster).

A finished stage leaves `<directory>/<stage>.done.json` (its outputs and wall
time), written whole or not at all through the storage layer (local or
gs://); a rerun reads the marker and skips the stage, and an interrupted
training stage resumes from its MODEL_DIR (the trainer restores the newest
checkpoint).

How to add a stage: a method on `StageRunner` (or on the experiment's own
driver) that returns early on `done(...)`, builds a `Launch`, calls `launch`
and ends with `mark(...)`; see `convert` for the pattern.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from gqa_t5x import launcher
from gqa_t5x.data import task_table
from gqa_t5x.storage import paths

MODES = ("local", "print")
CONVERT_GIN = "gin/runs/convert.gin"
UPTRAIN_GIN = "gin/runs/uptrain.gin"
FINETUNE_GIN = "gin/runs/finetune.gin"
EVAL_GIN = "gin/runs/eval.gin"


def gin_str(value: Any) -> str:
    """`value` as a gin string literal (paths, method names)."""
    return json.dumps(str(value))


def latest_checkpoint(directory: str | os.PathLike) -> str:
    """The newest `checkpoint_<step>` under `directory` (`checkpoints.steps.latest_checkpoint`)."""
    from gqa_t5x import checkpoints

    return checkpoints.steps.latest_checkpoint(directory)


@dataclasses.dataclass(frozen=True)
class NewestIn:
    """The newest checkpoint of a run that has not run yet (printed commands).

    Rendered as gin that resolves it when the printed job runs
    (`checkpoints.steps.latest_checkpoint`), never as a placeholder path.
    """

    model_dir: str


def checkpoint_bindings(macro: str, checkpoint: str | NewestIn | None) -> tuple[str, ...]:
    """Gin bindings setting `macro` (INITIAL_CHECKPOINT_PATH, CHECKPOINT_PATH) to `checkpoint`."""
    if isinstance(checkpoint, NewestIn):
        function = "gqa_t5x.checkpoints.steps.latest_checkpoint"
        return f"{macro}=@{function}()", f"{function}.model_dir={gin_str(checkpoint.model_dir)}"
    return (f"{macro}={gin_str(checkpoint) if checkpoint else None}",)


def train_launch(model_gin: str, run_gin: str, gin_files: Sequence[str], num_kv_heads: int,
                 model_dir: str | os.PathLike, initial: str | NewestIn | None,
                 bindings: Sequence[str] = ()) -> launcher.Launch:
    """A `--run_mode=train` launch in T5X's gin layering.

    Args:
      model_gin: The model gin (sizes).
      run_gin: The run gin (uptrain.gin, finetune.gin).
      gin_files: Experiment gins after the run gin (task, data locations, sizes).
      num_kv_heads: NUM_KV_HEADS (num_heads itself = multi-head).
      model_dir: MODEL_DIR.
      initial: INITIAL_CHECKPOINT_PATH (`NewestIn` a run's newest), or None
        to train from scratch.
      bindings: Further `MACRO=value` bindings, last (they win).

    Returns:
      The launch.
    """
    return launcher.Launch(
        run_mode="train",
        gin_files=(model_gin, run_gin, *gin_files),
        gin_bindings=(f"NUM_KV_HEADS={int(num_kv_heads)}", f"MODEL_DIR={gin_str(model_dir)}",
                      *checkpoint_bindings("INITIAL_CHECKPOINT_PATH", initial), *bindings),
    )


class StageRunner:
    """Runs (or prints) stages and keeps their markers.

    Args:
      mode: 'local' runs each launch in this process (`launcher.launch`),
        'print' prints its command line instead.
      launcher_prefix: Printed before the commands of stages that run on every
        host of a slice (e.g. `scripts/tpu_pod_run.sh POD ZONE --`).
      log: Progress messages.
      on_mark: Called after every marker is written (the study records its
        wall time there).
    """

    def __init__(self, *, mode: str = "local", launcher_prefix: str = "",
                 log: Callable[[str], None] = print, on_mark: Callable[[], None] | None = None):
        if mode not in MODES:
            raise ValueError(f"--mode={mode!r}; choose 'local' or 'print'.")
        self.mode, self.launcher_prefix, self.log, self.on_mark = mode, launcher_prefix, log, on_mark

    @property
    def printing(self) -> bool:
        return self.mode == "print"

    # ------------------------------------------------------------ markers
    def done(self, directory: str | os.PathLike, stage: str) -> dict | None:
        """The marker of a finished stage, or None."""
        path = paths.as_path(directory, name="stage directory") / f"{stage}.done.json"
        return json.loads(path.read_text()) if path.exists() else None

    def mark(self, directory: str | os.PathLike, stage: str, info: dict, started: float | None = None) -> dict:
        """Records a finished stage (with its wall time when `started` is given); returns `info`."""
        if started is not None:
            info = dict(info, wall_s=round(time.time() - started, 2))
        paths.replace_file(paths.as_path(directory, name="stage directory") / f"{stage}.done.json",
                           json.dumps(info, indent=2))
        if self.on_mark is not None:
            self.on_mark()
        return info

    def launch(self, request: launcher.Launch, *, on_every_host: bool = True) -> Any:
        """Runs `request` here, or prints it (behind the launcher prefix when the
        stage runs on every host of a slice; a conversion runs once)."""
        if self.printing:
            prefix = self.launcher_prefix if on_every_host else ""
            self.log(f"{prefix} {request.command_line()}".strip())
            return None
        return launcher.launch(request)

    # ------------------------------------------------------------- stages
    def convert(self, directory: str | os.PathLike, stage: str, *, source: str, output: str | os.PathLike,
                num_kv_heads: int, method: str, seed: int = 0, calibration: str | os.PathLike | None = None) -> str:
        """Converts `source` to `num_kv_heads` by `method` (`gin/runs/convert.gin`); returns the checkpoint.

        Args:
          directory: Where the stage's marker goes.
          stage: The marker's name.
          source: The multi-head checkpoint.
          output: The converted checkpoint's directory (replaced if present).
          num_kv_heads: Target key/value heads.
          method: A registered conversion method.
          seed: Seed of methods that draw random numbers.
          calibration: Calibration statistics for data-aware methods (lsq).
        """
        done = self.done(directory, stage)
        if done:
            return done["checkpoint"]
        started = time.time()
        bindings = [f"SOURCE={gin_str(source)}", f"OUTPUT={gin_str(output)}", f"NUM_KV_HEADS={int(num_kv_heads)}",
                    f"METHOD={gin_str(method)}", f"RANDOM_SEED={seed}", "OVERWRITE=True",
                    "converter.convert_checkpoint.progress=False"]
        if calibration is not None:
            bindings.append(f"converter.convert_checkpoint.calibration={gin_str(calibration)}")
        self.launch(launcher.Launch("convert", (CONVERT_GIN,), tuple(bindings)), on_every_host=False)
        if self.printing:
            return str(output)
        from gqa_t5x import checkpoints

        if not checkpoints.is_checkpoint(output):
            raise RuntimeError(f"The conversion to {output} left no checkpoint.")
        return self.mark(directory, stage, {"checkpoint": str(output)}, started)["checkpoint"]

    def finetune_and_eval(self, directory: str | os.PathLike, *, task: str, model_gin: str,
                          gin_files: Sequence[str], num_kv_heads: int, initial: str | NewestIn, steps: int,
                          finetune_bindings: Sequence[str] = (), eval_bindings: Sequence[str] = (),
                          final_eval: bool = True) -> float | None:
        """Fine-tunes `initial` on `task` for `steps` more steps, then scores the best checkpoint.

        The marker is `<directory>/eval_<task>.done.json`; the fine-tuning run is
        `<directory>/finetune_<task>`, the evaluation `<directory>/eval_<task>`.

        Args:
          directory: The point's directory.
          task: A task key of `data.task_table` with a gin file and a metric.
          model_gin: The model gin.
          gin_files: Experiment gins after the run/task gins.
          num_kv_heads: NUM_KV_HEADS of the model.
          initial: The checkpoint to fine-tune.
          steps: Fine-tuning steps after `initial`'s step.
          finetune_bindings: Extra bindings of the fine-tuning run.
          eval_bindings: Extra bindings of the evaluation run.
          final_eval: Re-evaluate the best checkpoint with `gin/runs/eval.gin`;
            when False, the score is the fine-tuning run's best periodic evaluation.

        Returns:
          The task's primary metric, or None when printing.
        """
        done = self.done(directory, f"eval_{task}")
        if done:
            return done["score"]
        directory = paths.as_path(directory, name="stage directory")
        spec = task_table.by_key(task)
        task_gin, metric = spec.gin_file, spec.primary_metric
        model_dir = directory / f"finetune_{task}"
        summary = self.launch(train_launch(
            model_gin, FINETUNE_GIN, (task_gin, *gin_files), num_kv_heads, model_dir, initial,
            ["TRAIN_STEPS=@gqa_t5x.training.trainer.steps_after_checkpoint()",
             "gqa_t5x.training.trainer.steps_after_checkpoint.initial_checkpoint_path=%INITIAL_CHECKPOINT_PATH",
             f"gqa_t5x.training.trainer.steps_after_checkpoint.steps={steps}",
             f"EVAL_METRIC={gin_str(metric)}", *finetune_bindings]))
        if not self.printing and not final_eval and getattr(summary, "best", None):
            step = summary.best[0]
            values = next(iter(summary.eval_metrics[step].values()))
            return self.mark(directory, f"eval_{task}", {
                "checkpoint": str(model_dir / "best" / f"checkpoint_{step}"), "metric": metric,
                "score": float(values[metric]), "all": values, "source": "fine-tuning evaluation"})["score"]
        best = model_dir / "best"
        eval_dir = directory / f"eval_{task}"
        checkpoint = NewestIn(str(best)) if self.printing else (
            latest_checkpoint(best) if best.is_dir() else latest_checkpoint(model_dir))
        metrics = self.launch(launcher.Launch(
            run_mode="eval",
            gin_files=(model_gin, EVAL_GIN, task_gin, *gin_files),
            gin_bindings=(*checkpoint_bindings("CHECKPOINT_PATH", checkpoint), f"EVAL_OUTPUT_DIR={gin_str(eval_dir)}",
                          *eval_bindings),
        ))
        if self.printing:
            return None
        values = next(iter(metrics.values())) if metrics else {}
        if metric not in values:
            raise KeyError(f"Evaluation of {task} produced metrics {sorted(values)}, not {metric!r}.")
        return self.mark(directory, f"eval_{task}", {"checkpoint": checkpoint, "metric": metric,
                                                      "score": float(values[metric]), "all": values})["score"]
