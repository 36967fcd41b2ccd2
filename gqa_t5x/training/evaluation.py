"""Evaluation with `seqio.Evaluator`: greedy decoding + the task's metrics.

Used by the trainer (fine-tuning evaluates every `eval_period` steps and keeps
the best checkpoint) and by `--run_mode=eval` (`evaluate`, bound in
`gin/runs/eval.gin`), which scores one checkpoint of any format the
checkpoints package reads.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import seqio
import tensorflow as tf

from gqa_t5x import checkpoints
from gqa_t5x.data import datasets
from gqa_t5x.data import errors
from gqa_t5x.data import vocabularies
from gqa_t5x.model import decoding
from gqa_t5x.model import layer_stack
from gqa_t5x.model import models
from gqa_t5x.model import param_tree
from gqa_t5x.storage import paths


def _batches(
    dataset: tf.data.Dataset, batch_size: int
) -> Any:
    """Yields (indices, features, real_rows) with the last batch zero-padded."""
    for indices, features in dataset.batch(batch_size).as_numpy_iterator():
        rows = len(indices)
        if rows < batch_size:
            features = {
                k: np.concatenate([v, np.zeros((batch_size - rows,) + v.shape[1:], v.dtype)])
                for k, v in features.items()
            }
        yield indices, features, rows


def make_predict_fn(
    model: models.EncoderDecoderModel,
    params: Any,
    batch_size: int,
    max_decode_length: int | None = None,
) -> Callable[..., list[tuple[int, list[int]]]]:
    """A seqio `predict_fn`: greedy decoding of an enumerated dataset.

    Args:
      model: The model.
      params: Its parameters.
      batch_size: Rows per decoding call (the last batch is padded).
      max_decode_length: Output length (default: the targets' length).

    Returns:
      fn(dataset, model_feature_shapes=None) -> [(index, token ids)].
    """

    # Greedy, the paper's; max_decode_length=None decodes to the targets' length.
    spec = decoding.DecodingSpec(max_decode_length=max_decode_length)

    def predict_fn(dataset: tf.data.Dataset, model_feature_shapes: Any = None):
        del model_feature_shapes
        out: list[tuple[int, list[int]]] = []
        for indices, features, rows in _batches(dataset, batch_size):
            tokens = model.predict_batch(params, features, spec)
            tokens = np.asarray(jax.device_get(tokens))
            # Full-length rows (0 after EOS): seqio stacks them into an array
            # and its vocabulary stops decoding at EOS.
            out.extend((int(i), t.tolist()) for i, t in zip(indices[:rows], tokens[:rows]))
        return out

    return predict_fn


def make_score_fn(
    model: models.EncoderDecoderModel, params: Any, batch_size: int
) -> Callable[..., list[tuple[int, float]]]:
    """A seqio `score_fn`: log-likelihood of each example's targets."""

    def score_fn(dataset: tf.data.Dataset, model_feature_shapes: Any = None):
        del model_feature_shapes
        out: list[tuple[int, float]] = []
        for indices, features, rows in _batches(dataset, batch_size):
            scores = np.asarray(model.score_batch(params, features))
            out.extend((int(i), float(s)) for i, s in zip(indices[:rows], scores[:rows]))
        return out

    return score_fn


def make_evaluator(
    cfg: datasets.DatasetConfig,
    output_dir: str | None,
    num_examples: int | None = None,
) -> seqio.Evaluator:
    """A `seqio.Evaluator` over `cfg`'s task and split (unpacked, in order).

    Args:
      cfg: Evaluation dataset (mixture_or_task_name, lengths, split, seed).
      output_dir: Where seqio's JSON/TensorBoard loggers write (None: no
        logs); local or gs:// (they write through tf.io.gfile).
      num_examples: Evaluate on the first N examples only.

    Returns:
      The evaluator (its datasets are read and cached at construction).

    Raises:
      DataError: the evaluation data cannot be read.
    """
    datasets.get_task_or_mixture(cfg)
    if output_dir:
        paths.makedirs(paths.as_path(output_dir, name="evaluation output_dir"))
    loggers: Sequence[type[seqio.Logger]] = (
        (seqio.JSONLogger, seqio.TensorBoardLogger) if output_dir else ()
    )
    with errors.surface_data_errors():
        return seqio.Evaluator(
            mixture_or_task_name=cfg.mixture_or_task_name,
            feature_converter=seqio.EncDecFeatureConverter(pack=False),
            eval_split=cfg.split,
            use_cached=cfg.use_cached,
            seed=cfg.seed,
            sequence_length=dict(cfg.task_feature_lengths),
            num_examples=num_examples,
            shuffle=False,
            logger_cls=loggers,
            log_dir=output_dir,
        )


def run_evaluator(
    evaluator: seqio.Evaluator,
    model: models.EncoderDecoderModel,
    params: Any,
    *,
    step: int,
    batch_size: int,
    max_decode_length: int | None = None,
) -> dict[str, dict[str, float]]:
    """Runs inference + metrics; returns {task: {metric: value}}."""
    all_metrics, _ = evaluator.evaluate(
        compute_metrics=jax.process_index() == 0,
        step=step,
        predict_fn=make_predict_fn(model, params, batch_size, max_decode_length),
        score_fn=make_score_fn(model, params, batch_size),
    )
    result = all_metrics.result() if hasattr(all_metrics, "result") else all_metrics
    return {
        task: {k: float(np.asarray(getattr(v, "value", v))) for k, v in values.items()
               if np.ndim(np.asarray(getattr(v, "value", v), dtype=object)) == 0}
        for task, values in (result or {}).items()
    }


def format_metrics(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """'task/metric = value (scale)' lines, e.g. '  gqa_cnn_dailymail/rouge1 = 44.7012 (percent, 0-100)'.

    Args:
      metrics: {task: {metric: value}}.

    Returns:
      One line per metric, sorted; the scale (`data.metrics.scale`) is left
      out for metrics that module does not compute.
    """
    from gqa_t5x.data import metrics as metric_fns

    lines = []
    for task, values in sorted(metrics.items()):
        for name, value in sorted(values.items()):
            unit = metric_fns.scale(name)
            lines.append(f"  {task}/{name} = {value:.4f}" + (f" ({unit})" if unit else ""))
    return "\n".join(lines)


def evaluate(
    *,
    model: models.EncoderDecoderModel,
    dataset_cfg: datasets.DatasetConfig,
    checkpoint_path: str,
    output_dir: str,
    num_examples: int | None = None,
    max_decode_length: int | None = None,
    allow_unusual_values: bool = False,
    on_validated: Callable[[], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluates one checkpoint (`--run_mode=eval`, T5X `eval.evaluate`).

    Args:
      model: The model (its config must match the checkpoint's shapes).
      dataset_cfg: Task, split ('validation'), lengths, batch size.
      checkpoint_path: Any checkpoint the checkpoints package reads,
        including a training checkpoint `MODEL_DIR/checkpoint_<step>`.
      output_dir: EVAL_OUTPUT_DIR, local or gs://: `metrics.json` (written
        whole or not at all, by process 0) and seqio's logs.
      num_examples: Evaluate only the first N examples.
      max_decode_length: Output length (default: the targets' length).
      allow_unusual_values: ALLOW_UNUSUAL_VALUES: evaluate a checkpoint with
        non-finite values or |x| > 1e4 (refused otherwise).
      on_validated: Called once the checkpoint is loaded and the evaluation
        data is read, before anything is decoded or written.

    Returns:
      {task: {metric: value}}.

    Raises:
      DataError: the evaluation data cannot be read.
    """
    if not checkpoint_path:
        raise ValueError("CHECKPOINT_PATH is required for --run_mode=eval.")
    metrics_file = paths.as_path(output_dir, name="EVAL_OUTPUT_DIR") / "metrics.json"
    reader = checkpoints.open_checkpoint(checkpoint_path, allow_unusual_values=allow_unusual_values)
    with reader:
        # VOCAB_PATH = None (eval.gin): the vocabulary the checkpoint records.
        vocabularies.use_checkpoint_vocabulary(
            lambda: checkpoints.vocabulary.for_checkpoint(reader, None), str(checkpoint_path))
        config = reader.config
        flat = reader.read_many()
        step = int(reader.step or 0)
    model = model.with_config(
        config.replace(dtype=model.config.dtype, dropout_rate=model.config.dropout_rate,
                       scan_layers=model.config.scan_layers, param_dtype=model.config.param_dtype)
    )
    # Stacked (SCAN_LAYERS) and cast (PARAM_DTYPE) once, on the host.
    params = layer_stack.model_params(jax.tree_util.tree_map(np.asarray, param_tree.unflatten(flat)), model.config)
    start = time.time()
    evaluator = make_evaluator(dataset_cfg, output_dir, num_examples)
    if on_validated is not None:
        on_validated()
    metrics = run_evaluator(
        evaluator, model, params, step=step,
        batch_size=datasets.host_batch_size(dataset_cfg),
        max_decode_length=max_decode_length,
    )
    if jax.process_index() == 0:
        record = {"checkpoint": str(checkpoint_path), "step": step, "metrics": metrics}
        paths.replace_file(metrics_file, json.dumps(record, indent=2))
    logging.info("Evaluated %s in %.1fs", checkpoint_path, time.time() - start)
    print(f"Evaluation of {checkpoint_path} (step {step}) in {time.time() - start:.1f}s, "
          f"written to {metrics_file}:\n{format_metrics(metrics)}", flush=True)
    return metrics
