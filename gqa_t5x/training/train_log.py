"""What a training run reports: console progress, TensorBoard, the NaN guard.

`TrainLog` collects the per-step metrics the train step returns (device
arrays, fetched in bulk every `LOG_EVERY` steps so the loop never waits on
the device), writes TensorBoard scalars (clu), prints the progress line and
stops the run with `NonFiniteLossError` when the loss or the parameters stop
being finite. `print_summary` prints the end-of-run summary.

The progress line's rate and ETA leave out the first step's compilation:
the first `add` happens when the first (jitted) step has been compiled and
dispatched, and the first window is timed from then (its compilation time is
printed once, on its own). Its percentage runs from the run's own start
(`run_start_step`: 0 from scratch, the initial checkpoint's step when
uptraining or fine-tuning) to TRAIN_STEPS, so a resumed run shows the same
percentage at the same step as the run it continues.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from clu import metric_writers

from gqa_t5x.data import metrics


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass
class TrainSummary:
    """What a `trainer.train` call did.

    Attributes:
      start_step: Global step the run started (or resumed) at.
      end_step: Global step reached.
      losses: Per-token training loss of every step run, in order.
      final_metrics: Last logged training metrics.
      eval_metrics: {step: {task: {metric: value}}} of evaluations run.
      best: (step, value) of the best evaluation by `eval_metric`, if any.
      elapsed_s: Wall time of the loop (excluding set-up).
      tokens_per_second: Non-padding input+target tokens per second.
      resumed_from: 'model_dir', 'initial_checkpoint' or 'scratch'.
      best_metric: Name of the metric `best` refers to.
    """

    start_step: int
    end_step: int
    losses: list[float]
    final_metrics: dict[str, float]
    eval_metrics: dict[int, dict[str, dict[str, float]]]
    best: tuple[int, float] | None
    elapsed_s: float
    tokens_per_second: float
    resumed_from: str
    best_metric: str | None = None


def format_rate(x: float) -> str:
    """'12.3k' above a thousand, '12.3' below."""
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.1f}"


class TrainLog:
    """Pending step metrics -> NaN check, TensorBoard, progress line."""

    def __init__(
        self,
        *,
        summary: TrainSummary,
        writer: metric_writers.MetricWriter,
        manager: ocp.CheckpointManager,
        model_dir: str,
        total_steps: int,
        progress: bool,
        run_start_step: int | None = None,
    ):
        """Creates the log of a run starting at `summary.start_step`.

        Args:
          summary: Receives the losses and the last logged metrics.
          writer: TensorBoard writer of MODEL_DIR/train.
          manager: Checkpoints of MODEL_DIR (named when the loss is NaN).
          model_dir: MODEL_DIR.
          total_steps: TRAIN_STEPS (for the progress percentage and ETA).
          progress: Print the progress line.
          run_start_step: Global step the run began at before any resume (0
            from scratch, the initial checkpoint's step when uptraining or
            fine-tuning): the percentage runs from it to `total_steps`. None:
            `summary.start_step`, right unless the run resumed from
            MODEL_DIR, whose percentage then says "since resume".
        """
        self._summary = summary
        self._writer = writer
        self._manager = manager
        self._model_dir = model_dir
        self._total_steps = total_steps
        self._progress = progress and jax.process_index() == 0
        self._pending: list[tuple[int, dict[str, jax.Array]]] = []
        self._run_start = summary.start_step if run_start_step is None else run_start_step
        self._start_known = run_start_step is not None or summary.resumed_from != "model_dir"
        self._window_tokens = 0
        self._window_start = time.time()
        self._window_first = summary.start_step
        self._compile_s: float | None = None  # Set by the first `add`; printed once.
        self._compile_printed = False

    def add(self, step: int, metrics: dict[str, jax.Array], tokens: int) -> None:
        """Queues the metrics of `step` (not fetched yet) and its token count.

        The first call comes once the first step is compiled and dispatched:
        the time until then is compilation, left out of the rates.
        """
        if self._compile_s is None:
            now = time.time()
            self._compile_s = now - self._window_start
            self._window_start = now
        self._pending.append((step, metrics))
        self._window_tokens += tokens

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Writes other scalars (e.g. evaluation metrics) to TensorBoard."""
        self._writer.write_scalars(step, scalars)

    def _stop(self, step: int, metrics: dict[str, Any]) -> None:
        loss = float(metrics["loss"])
        param_norm = float(metrics["param_norm"])
        self._manager.wait_until_finished()
        good = self._manager.latest_step()
        where = (
            f"the last good checkpoint is {self._model_dir}/checkpoint_{good}"
            if good is not None
            else "no checkpoint was written"
        )
        what = (
            f"Training loss is {loss}"
            if not math.isfinite(loss)
            else f"Parameters became non-finite (norm {param_norm}, loss {loss:.4g})"
        )
        raise NonFiniteLossError(
            f"{what} at step {step} (learning rate "
            f"{float(metrics['learning_rate']):.3g}); stopping. Nothing after "
            f"step {good} was saved: {where}. Lower the learning rate, check "
            "the data, or use float32 activations (ACTIVATION_DTYPE='float32')."
        )

    def flush(self, step_done: int) -> None:
        """Fetches pending metrics, stops on NaN/inf, writes summaries.

        Raises:
          NonFiniteLossError: a step's loss or parameter norm is not finite.
        """
        if not self._pending:
            return
        fetched = jax.device_get([m for _, m in self._pending])
        steps = [s for s, _ in self._pending]
        self._pending = []
        for step, metrics in zip(steps, fetched):
            if not (
                math.isfinite(float(metrics["loss"]))
                and math.isfinite(float(metrics["param_norm"]))
            ):
                self._stop(step, metrics)
            tokens = max(float(metrics["num_tokens"]), 1.0)
            self._summary.losses.append(float(metrics["loss_sum"]) / tokens)
        last = fetched[-1]
        tokens = max(float(last["num_tokens"]), 1.0)
        elapsed = max(time.time() - self._window_start, 1e-9)
        scalars = {
            "loss": float(last["loss_sum"]) / tokens,
            "cross_ent_loss": float(last["cross_ent_sum"]) / tokens,
            "z_loss": float(last["z_loss_sum"]) / tokens,
            "accuracy": float(last["correct"]) / tokens,
            "learning_rate": float(last["learning_rate"]),
            "grad_norm": float(last["grad_norm"]),
            "param_norm": float(last["param_norm"]),
            "timing/steps_per_second": (step_done - self._window_first) / elapsed,
            "timing/tokens_per_second": self._window_tokens / elapsed,
        }
        self._writer.write_scalars(step_done, scalars)
        self._summary.final_metrics = scalars
        if self._progress:
            self._print_progress(step_done, scalars)
        self._window_tokens = 0
        self._window_start = time.time()
        self._window_first = step_done

    def _print_progress(self, step_done: int, scalars: dict[str, float]) -> None:
        start = self._run_start if self._start_known else self._summary.start_step
        share = 100.0 * (step_done - start) / max(self._total_steps - start, 1)
        rate = scalars["timing/steps_per_second"]
        eta = (self._total_steps - step_done) / rate if rate > 0 else float("inf")
        compiled = ""
        if self._compile_s is not None and not self._compile_printed:
            self._compile_printed = True
            compiled = f" (first step compiled in {self._compile_s:.1f}s, not in the rate)"
        print(
            f"[train] step {step_done}/{self._total_steps} ({share:5.1f}%"
            f"{'' if self._start_known else ' since resume'}) "
            f"loss {scalars['loss']:.4f} acc {scalars['accuracy']:.3f} "
            f"z {scalars['z_loss']:.2e} lr {scalars['learning_rate']:.2e} "
            f"{rate:.2f} steps/s "
            f"{format_rate(scalars['timing/tokens_per_second'])} tok/s eta {eta:.0f}s{compiled}",
            flush=True,
        )

    def close(self) -> None:
        """Flushes the TensorBoard writer."""
        self._writer.flush()


def print_summary(summary: TrainSummary, model_dir: str) -> None:
    """The end-of-run summary: steps, speed, loss, best evaluation, paths."""
    lines = [
        "[train] done.",
        f"  steps        {summary.start_step} -> {summary.end_step} "
        f"({summary.end_step - summary.start_step} run, started from "
        f"{summary.resumed_from})",
        f"  time         {summary.elapsed_s:.1f}s, "
        f"{format_rate(summary.tokens_per_second)} tokens/s",
    ]
    if summary.losses:
        lines.append(
            f"  loss         first {summary.losses[0]:.4f} -> last {summary.losses[-1]:.4f}"
        )
    if summary.final_metrics:
        lines.append(f"  accuracy     {summary.final_metrics['accuracy']:.4f}")
    if summary.best is not None:
        unit = metrics.scale(summary.best_metric) if summary.best_metric else None
        lines.append(
            f"  best         {summary.best_metric} = {summary.best[1]:.4f}"
            f"{f' ({unit})' if unit else ''} at step "
            f"{summary.best[0]} ({model_dir}/best/checkpoint_{summary.best[0]})"
        )
    lines.append(f"  checkpoints  {model_dir}/checkpoint_{summary.end_step}")
    lines.append(f"  summaries    {model_dir}/train (tensorboard --logdir {model_dir})")
    print("\n".join(lines), flush=True)
