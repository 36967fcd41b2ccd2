"""Evaluation during training, and the best checkpoint it keeps (MODEL_DIR/best).

With `eval_period`, the trainer decodes the evaluation data greedily every N
steps (`evaluate_and_keep_best`), logs the metrics and saves the state to
MODEL_DIR/best when EVAL_METRIC (by default the task table's primary metric
of the evaluated task: `default_eval_metric`) is the highest so far. A
resumed run reads the best evaluation of its earlier part back
(`previous_best`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import seqio

from gqa_t5x.data import datasets
from gqa_t5x.data import task_table
from gqa_t5x.model import models
from gqa_t5x.training import evaluation
from gqa_t5x.training import train_state as ts
from gqa_t5x.training.train_log import TrainLog
from gqa_t5x.training.train_log import TrainSummary


def default_eval_metric(task_names: Sequence[str]) -> str:
    """'task/metric' of the task table's primary metric of the evaluated task.

    Args:
      task_names: seqio tasks the evaluation runs (one, or a mixture's).

    Raises:
      ValueError: several tasks (which one should pick the best checkpoint?),
        a task outside the table, or one without a primary metric.
    """
    if len(task_names) != 1:
        raise ValueError(
            f"EVAL_METRIC=None but the evaluation runs {len(task_names)} tasks "
            f"{list(task_names)}; set EVAL_METRIC='task/metric' (e.g. "
            f"'{task_names[0]}/rouge1') to pick the best checkpoint."
        )
    (name,) = task_names
    try:
        metric = task_table.by_name(name).primary_metric
    except KeyError as e:
        raise ValueError(f"EVAL_METRIC=None: {e.args[0]} Or set EVAL_METRIC.") from None
    if metric is None:
        raise ValueError(
            f"EVAL_METRIC=None but task {name!r} has no primary metric in the "
            "task table; set EVAL_METRIC to a metric it reports (the best "
            "checkpoint is the one where it is highest)."
        )
    return f"{name}/{metric}"


def lookup_metric(metrics: Mapping[str, Mapping[str, float]], name: str) -> float:
    """The value of `name` ('metric' or 'task/metric') in evaluation results."""
    available = [f"{t}/{k}" for t, v in metrics.items() for k in v]
    if "/" in name:
        task, key = name.split("/", 1)
        if key in metrics.get(task, {}):
            return float(metrics[task][key])
    else:
        for values in metrics.values():
            if name in values:
                return float(values[name])
    raise KeyError(f"EVAL_METRIC={name!r} is not among the evaluation metrics {available}.")


@dataclasses.dataclass
class EvalSetup:
    """What `evaluate_and_keep_best` needs, built once before the loop.

    Attributes:
      evaluator: The seqio evaluator (datasets cached).
      dataset_cfg: The evaluation data (batch size).
      metric: 'task/metric' or 'metric' whose maximum picks the best checkpoint.
      best_manager: Checkpoint manager of MODEL_DIR/best.
      max_decode_length: Decoding length (None: the targets' length).
    """

    evaluator: seqio.Evaluator
    dataset_cfg: datasets.DatasetConfig
    metric: str
    best_manager: Any
    max_decode_length: int | None


def previous_best(best_manager: Any, summary: TrainSummary) -> None:
    """Puts the best evaluation of an earlier part of the run into `summary`."""
    previous = ts.best_so_far(best_manager)
    if previous is not None:
        summary.best = (int(previous["step"]), float(previous["eval_score"]))
        summary.best_metric = previous["eval_metric"]
        summary.eval_metrics[summary.best[0]] = previous["eval_results"]


def evaluate_and_keep_best(
    setup: EvalSetup,
    model: models.EncoderDecoderModel,
    state: ts.TrainState,
    step: int,
    metadata: Mapping[str, Any],
    summary: TrainSummary,
    log: TrainLog,
) -> None:
    """Evaluates `state`, logs the metrics, saves it to MODEL_DIR/best if best.

    The best manager keeps one checkpoint, the one with the highest metric.
    """
    results = evaluation.run_evaluator(
        setup.evaluator, model, state.params, step=step,
        batch_size=datasets.host_batch_size(setup.dataset_cfg),
        max_decode_length=setup.max_decode_length,
    )
    summary.eval_metrics[step] = results
    log.write_scalars(step, {f"eval/{t}/{k}": v for t, vals in results.items() for k, v in vals.items()})
    if jax.process_index() == 0:
        print(f"[eval] step {step}:\n{evaluation.format_metrics(results)}", flush=True)
    score = lookup_metric(results, setup.metric)
    if summary.best is None or score > summary.best[1]:
        summary.best = (step, score)
        summary.best_metric = setup.metric
    best_meta = dict(metadata, eval_metric=setup.metric, eval_score=score,
                     eval_results=results)
    ts.save(setup.best_manager, state, best_meta, metrics={"score": score})


def eval_task_names(cfg: datasets.DatasetConfig) -> list[str]:
    task = datasets.get_task_or_mixture(cfg)
    if isinstance(task, seqio.Mixture):
        return [t.name for t in task.tasks]
    return [task.name]
