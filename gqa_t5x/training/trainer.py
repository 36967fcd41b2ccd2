"""The training loop: uptraining and fine-tuning (T5X `train.train` interface).

`train` (bound by `gin/runs/{uptrain,finetune}.gin`, called by
`python -m gqa_t5x.main --run_mode=train`):

1. builds the (data, model) mesh and the shardings of every parameter and
   optimizer-state leaf (`partitioning.py`);
2. restores the newest checkpoint in MODEL_DIR if there is one (a preempted
   job just restarts), else loads INITIAL_CHECKPOINT_PATH (any format the
   checkpoints package reads; its step becomes the start step), else
   initialises randomly at step 0;
3. streams batches from seqio (`datasets.py`), skipping the batches the
   restored checkpoint already consumed;
4. runs the jit-compiled, sharded train step until TRAIN_STEPS (absolute,
   counted from the start of pre-training), logging to TensorBoard (clu) and
   the console, checking the loss for NaN/inf, saving every
   `checkpoint_period` steps (keep-N) and at the end, and optionally
   evaluating every `eval_period` steps while keeping the best checkpoint in
   MODEL_DIR/best.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow as tf
from clu import metric_writers

from gqa_t5x import checkpoints
from gqa_t5x.data import datasets
from gqa_t5x.training import evaluation
from gqa_t5x.model import models
from gqa_t5x.training import optimizers
from gqa_t5x.training import partitioning
from gqa_t5x.training import train_state as ts
from gqa_t5x.model import param_tree

# Config fields that decide parameter shapes, and the gin macro (if any)
# users set them with.
_SHAPE_FIELDS = {
    "num_kv_heads": "NUM_KV_HEADS",
    "encoder_num_kv_heads": "ENCODER_NUM_KV_HEADS",
    "num_heads": None, "head_dim": None, "emb_dim": None, "mlp_dim": None,
    "num_encoder_layers": None, "num_decoder_layers": None, "vocab_size": None,
    "logits_via_embedding": None, "mlp_activations": None,
    "relative_attention_num_buckets": None,
}


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass
class TrainSummary:
    """What a `train` call did.

    Attributes:
      start_step: Global step the run started (or resumed) at.
      end_step: Global step reached.
      losses: Per-token training loss of every step run, in order.
      final_metrics: Last logged training metrics.
      eval_metrics: {step: {task: {metric: value}}} of evaluations run.
      best: (step, value) of the best evaluation by `eval_metric`, if any.
      best_metric: Name of the metric `best` refers to.
      elapsed_s: Wall time of the loop (excluding set-up).
      tokens_per_second: Non-padding input+target tokens per second.
      resumed_from: 'model_dir', 'initial_checkpoint' or 'scratch'.
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


def uptrain_total_steps(
    initial_checkpoint_path: str | None, alpha: float = 0.05, pretrain_steps: int = 1_000_000
) -> int:
    """TRAIN_STEPS of an uptraining run: start step + alpha * pre-training steps.

    Args:
      initial_checkpoint_path: The converted checkpoint (its step, e.g.
        1,000,000 for public T5.1.1, is the start).
      alpha: UPTRAIN_ALPHA, the fraction of pre-training to continue (0.05).
      pretrain_steps: PRETRAIN_STEPS, the original pre-training length (1M).

    Returns:
      The absolute final step, e.g. 1,050,000.
    """
    if not initial_checkpoint_path:
        raise ValueError(
            "INITIAL_CHECKPOINT_PATH is required to derive TRAIN_STEPS = its step + "
            "UPTRAIN_ALPHA * PRETRAIN_STEPS; set --gin.INITIAL_CHECKPOINT_PATH or "
            "--gin.TRAIN_STEPS."
        )
    if not 0 < alpha:
        raise ValueError(f"UPTRAIN_ALPHA={alpha} must be positive.")
    return _checkpoint_step(initial_checkpoint_path) + int(round(alpha * pretrain_steps))


@gin.configurable(module="gqa_t5x.training.trainer")
def steps_after_checkpoint(initial_checkpoint_path: str | None, steps: int) -> int:
    """TRAIN_STEPS of `steps` more steps after INITIAL_CHECKPOINT_PATH's step.

    For fine-tuning launched without knowing the uptrained checkpoint's step
    (e.g. commands printed by `gqa-t5x sweep --mode print`):
    `--gin.TRAIN_STEPS=@gqa_t5x.training.trainer.steps_after_checkpoint()
    --gin.gqa_t5x.training.trainer.steps_after_checkpoint.steps=20000` (registered
    explicitly so command-line bindings can name it).
    """
    if not initial_checkpoint_path:
        raise ValueError(
            "INITIAL_CHECKPOINT_PATH is required to derive TRAIN_STEPS = its step + "
            "steps; set --gin.INITIAL_CHECKPOINT_PATH or --gin.TRAIN_STEPS."
        )
    if steps <= 0:
        raise ValueError(f"trainer.steps_after_checkpoint.steps={steps} must be positive.")
    return _checkpoint_step(initial_checkpoint_path) + int(steps)


def _checkpoint_step(path: str) -> int:
    with checkpoints.open_checkpoint(path) as reader:
        return int(reader.step or 0)


def make_train_step(
    model: models.EncoderDecoderModel,
    optimizer: optax.GradientTransformation,
    learning_rate_fn: optimizers.Schedule,
    dropout_key: jax.Array,
):
    """The (un-jitted) train step `(state, batch) -> (state, metrics)`.

    Args:
      model: Provides `loss_fn`.
      optimizer: Optax transformation without learning rate.
      learning_rate_fn: Schedule of the global step.
      dropout_key: Base PRNG key; step `s` uses `fold_in(dropout_key, s)`, so
        a resumed run draws the same dropout masks.

    Returns:
      The step function; metrics are summed loss terms, `loss`,
      `learning_rate`, `grad_norm` and `param_norm`.
    """

    def train_step(state: ts.TrainState, batch: dict[str, jax.Array]):
        step_rng = jax.random.fold_in(dropout_key, state.step)
        grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)
        (loss, metrics), grads = grad_fn(state.params, batch, step_rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        learning_rate = learning_rate_fn(state.step)
        updates = optimizers.scale_updates(updates, learning_rate)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(
            metrics, loss=loss, learning_rate=learning_rate,
            grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params),
        )
        return ts.TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def _shape_value(config: Any, field: str) -> Any:
    # `num_kv_heads=None` means "num_heads": compare the head counts in effect.
    if field == "num_kv_heads":
        return config.decoder_kv_heads
    if field == "encoder_num_kv_heads":
        return config.encoder_kv_heads
    return getattr(config, field)


def _check_config(config: Any, found: Any, path: str) -> None:
    diffs = [
        (field, _shape_value(config, field), _shape_value(found, field))
        for field in _SHAPE_FIELDS
        if _shape_value(config, field) != _shape_value(found, field)
    ]
    if diffs:
        parts = []
        for field, want, have in diffs:
            macro = _SHAPE_FIELDS[field]
            hint = f" (gin macro {macro})" if macro else ""
            parts.append(f"{field}: model gin {want!r} vs checkpoint {have!r}{hint}")
        raise ValueError(
            f"INITIAL_CHECKPOINT_PATH={path!r} does not match the model gin: "
            + "; ".join(parts) + "."
        )


def _put(array: np.ndarray, sharding: jax.sharding.NamedSharding) -> jax.Array:
    array = np.asarray(array, np.float32)
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def _load_initial_params(path: str, config: Any, shardings: Any) -> tuple[Any, int]:
    """Streams a checkpoint's parameters onto their shardings; returns (params, step)."""
    flat_shardings = param_tree.flatten(shardings)
    with checkpoints.open_checkpoint(path) as reader:
        _check_config(config, reader.config, path)
        flat = {key: _put(reader.read(key), flat_shardings[key]) for key in reader.keys()}
        step = int(reader.step or 0)
    return param_tree.unflatten(flat), step


# The paper's metric per task family, in order of preference, used when
# EVAL_METRIC is None: ROUGE-1 (summarization), BLEU (WMT), F1 (TriviaQA).
PRIMARY_METRICS = ("rouge1", "bleu", "f1")


def _lookup_metric(metrics: Mapping[str, Mapping[str, float]], name: str | None) -> tuple[str, float]:
    """Returns (metric name, value) of `name` ('metric' or 'task/metric')."""
    available = [f"{t}/{k}" for t, v in metrics.items() for k in v]
    if name is None:
        for candidate in PRIMARY_METRICS:
            for values in metrics.values():
                if candidate in values:
                    return candidate, float(values[candidate])
        raise KeyError(
            f"EVAL_METRIC=None but the evaluation metrics {available} contain none of "
            f"{PRIMARY_METRICS}; set EVAL_METRIC."
        )
    if "/" in name:
        task, key = name.split("/", 1)
        if key in metrics.get(task, {}):
            return name, float(metrics[task][key])
    else:
        for values in metrics.values():
            if name in values:
                return name, float(values[name])
    raise KeyError(f"EVAL_METRIC={name!r} is not among the evaluation metrics {available}.")


def _format_rate(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.1f}"


def train(
    *,
    model: models.EncoderDecoderModel,
    train_dataset_cfg: datasets.DatasetConfig,
    model_dir: str,
    total_steps: int,
    learning_rate_fn: optimizers.Schedule | None = None,
    optimizer: optax.GradientTransformation | None = None,
    partitioner: partitioning.Partitioner | None = None,
    initial_checkpoint_path: str | None = None,
    checkpoint_period: int = 1000,
    keep_checkpoints: int | None = 3,
    async_checkpointing: bool = True,
    eval_period: int | None = None,
    infer_eval_dataset_cfg: datasets.DatasetConfig | None = None,
    eval_metric: str | None = None,
    num_eval_examples: int | None = None,
    max_decode_length: int | None = None,
    random_seed: int = 0,
    log_every: int = 10,
    progress: bool = True,
) -> TrainSummary:
    """Trains until the global step reaches `total_steps` (see module docstring).

    Args:
      model: The model (network config from the model gin).
      train_dataset_cfg: Training data (task, lengths, batch size, packing).
      model_dir: MODEL_DIR: checkpoints, summaries, config.gin.
      total_steps: TRAIN_STEPS, absolute (includes the initial step).
      learning_rate_fn: Schedule of the global step (default rsqrt).
      optimizer: Optax transformation WITHOUT learning rate (default T5's
        Adafactor).
      partitioner: Mesh and shardings (default: 1 model shard).
      initial_checkpoint_path: INITIAL_CHECKPOINT_PATH, used when MODEL_DIR
        has no checkpoint yet.
      checkpoint_period: Save every N steps (and always at the end).
      keep_checkpoints: Keep the newest N periodic checkpoints (None: all).
      async_checkpointing: Write checkpoints in a background thread.
      eval_period: Evaluate every N steps (needs `infer_eval_dataset_cfg`).
      infer_eval_dataset_cfg: Evaluation data (greedy decoding + metrics).
      eval_metric: 'metric' or 'task/metric' whose maximum picks the best
        checkpoint (kept in MODEL_DIR/best); None = the task's primary metric
        (the first of `PRIMARY_METRICS` it reports).
      num_eval_examples: Evaluate on the first N examples only.
      max_decode_length: Decoding length (default: the targets' length).
      random_seed: RANDOM_SEED: initialisation and dropout.
      log_every: Summaries, console line and NaN check every N steps.
      progress: Print the console progress line.

    Returns:
      A `TrainSummary`.

    Raises:
      NonFiniteLossError: the loss became NaN/inf (nothing after the last
        good checkpoint is saved).
    """
    if not model_dir:
        raise ValueError("MODEL_DIR is required (--gin.MODEL_DIR=\"/path/to/model_dir\").")
    if checkpoint_period <= 0 or log_every <= 0:
        raise ValueError(
            f"checkpoint_period={checkpoint_period} and log_every={log_every} must be positive."
        )
    if eval_period and infer_eval_dataset_cfg is None:
        raise ValueError("eval_period is set but infer_eval_dataset_cfg (the evaluation data) is not.")
    learning_rate_fn = learning_rate_fn or optimizers.rsqrt_schedule()
    optimizer = optimizer or optimizers.adafactor()
    partitioner = partitioner or partitioning.Partitioner()
    partitioner.check_batch_size(train_dataset_cfg.batch_size)
    config = model.config
    is_chief = jax.process_index() == 0
    tf.io.gfile.makedirs(model_dir)  # Local or gs://.

    # ------------------------------------------------------------ shardings
    rng = jax.random.PRNGKey(random_seed)
    abstract_params = jax.eval_shape(model.get_initial_params, rng)
    param_shardings = partitioner.param_shardings(abstract_params, config)
    if partitioner.replicated_params:
        logging.info("Replicated (not split over 'model'): %s", partitioner.replicated_params)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    opt_shardings = partitioner.opt_state_shardings(abstract_opt, abstract_params, param_shardings)
    state_shardings = ts.TrainState(
        step=partitioner.replicated, params=param_shardings, opt_state=opt_shardings
    )
    init_opt = jax.jit(optimizer.init, out_shardings=opt_shardings)

    # --------------------------------------------------------- initial state
    manager = ts.checkpoint_manager(
        model_dir, max_to_keep=keep_checkpoints, async_save=async_checkpointing
    )
    latest = manager.latest_step()
    if latest is not None:
        template = ts.TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt
        )
        state, meta = ts.restore(manager, latest, template, state_shardings)
        data_start_step = int(meta["data_start_step"])
        if meta.get("batch_size") != train_dataset_cfg.batch_size:
            logging.warning(
                "BATCH_SIZE changed from %s to %s since the checkpoint: the data "
                "stream is resumed by batch count, not by example.",
                meta.get("batch_size"), train_dataset_cfg.batch_size,
            )
        resumed_from = "model_dir"
    else:
        if initial_checkpoint_path:
            params, start = _load_initial_params(initial_checkpoint_path, config, param_shardings)
            resumed_from = "initial_checkpoint"
        else:
            params = jax.jit(model.get_initial_params, out_shardings=param_shardings)(rng)
            start = 0
            resumed_from = "scratch"
        state = ts.TrainState(
            step=jax.device_put(jnp.asarray(start, jnp.int32), partitioner.replicated),
            params=params,
            opt_state=init_opt(params),
        )
        data_start_step = start
    start_step = int(jax.device_get(state.step))
    metadata = ts.metadata_for(
        config, data_start_step=data_start_step, batch_size=train_dataset_cfg.batch_size,
        task=train_dataset_cfg.mixture_or_task_name, seed=train_dataset_cfg.seed,
    )
    if is_chief:
        origin = {
            "model_dir": f"resumed from {model_dir}/checkpoint_{start_step}",
            "initial_checkpoint": f"initial_checkpoint {initial_checkpoint_path}",
            "scratch": "scratch (random initialisation)",
        }[resumed_from]
        print(
            f"[train] {origin}: step {start_step} -> {total_steps} "
            f"({max(total_steps - start_step, 0)} steps), mesh "
            f"{dict(partitioner.mesh.shape)}, batch {train_dataset_cfg.batch_size}, "
            f"kv heads {config.decoder_kv_heads}/{config.num_heads}",
            flush=True,
        )
    if start_step >= total_steps:
        manager.close()
        return TrainSummary(start_step, start_step, [], {}, {}, None, 0.0, 0.0, resumed_from)

    # ------------------------------------------------------------ train step
    train_step = make_train_step(model, optimizer, learning_rate_fn, jax.random.fold_in(rng, 1))
    p_train_step = jax.jit(
        train_step,
        in_shardings=(state_shardings, partitioner.data_sharding),
        out_shardings=(state_shardings, partitioner.replicated),
        donate_argnums=(0,),
    )

    # ------------------------------------------------------------------ loop
    skip = start_step - data_start_step
    dataset = datasets.get_dataset(train_dataset_cfg, skip_batches=skip)
    batches = datasets.numpy_batches(dataset)
    writer = metric_writers.create_default_writer(
        os.path.join(model_dir, "train"), just_logging=not is_chief, asynchronous=False
    )
    best_manager = None
    evaluator = None
    if eval_period:
        evaluator = evaluation.make_evaluator(
            infer_eval_dataset_cfg, os.path.join(model_dir, "eval"), num_eval_examples
        )
        # MODEL_DIR/best keeps the checkpoint with the best evaluation metric.
        best_manager = ts.checkpoint_manager(
            os.path.join(model_dir, "best"), max_to_keep=1, best_metric="score", async_save=False
        )
    summary = TrainSummary(start_step, start_step, [], {}, {}, None, 0.0, 0.0, resumed_from)
    previous_best = ts.best_so_far(best_manager) if best_manager is not None else None
    if previous_best is not None:  # Resumed: the best evaluation so far.
        summary.best = (int(previous_best["step"]), float(previous_best["eval_score"]))
        summary.best_metric = previous_best["eval_metric"]
        summary.eval_metrics[summary.best[0]] = previous_best["eval_results"]
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    window_tokens = 0
    total_tokens = 0
    window_start = loop_start = time.time()
    window_first = start_step

    def flush(step_done: int) -> None:
        """Fetches pending metrics, stops on NaN/inf, writes summaries."""
        nonlocal pending, window_tokens, window_start, window_first
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        steps = [s for s, _ in pending]
        pending = []
        for s, m in zip(steps, fetched):
            loss = float(m["loss"])
            param_norm = float(m["param_norm"])
            if not (math.isfinite(loss) and math.isfinite(param_norm)):
                manager.wait_until_finished()
                good = manager.latest_step()
                where = (
                    f"the last good checkpoint is {model_dir}/checkpoint_{good}"
                    if good is not None else "no checkpoint was written"
                )
                what = (
                    f"Training loss is {loss}" if not math.isfinite(loss)
                    else f"Parameters became non-finite (norm {param_norm}, loss {loss:.4g})"
                )
                raise NonFiniteLossError(
                    f"{what} at step {s} (learning rate "
                    f"{float(m['learning_rate']):.3g}); stopping. Nothing after "
                    f"step {good} was saved: {where}. Lower the learning rate, "
                    "check the data, or use float32 activations "
                    "(ACTIVATION_DTYPE='float32')."
                )
            tokens = max(float(m["num_tokens"]), 1.0)
            summary.losses.append(float(m["loss_sum"]) / tokens)
        last = fetched[-1]
        tokens = max(float(last["num_tokens"]), 1.0)
        elapsed = max(time.time() - window_start, 1e-9)
        n_steps = step_done - window_first
        scalars = {
            "loss": float(last["loss_sum"]) / tokens,
            "cross_ent_loss": float(last["cross_ent_sum"]) / tokens,
            "z_loss": float(last["z_loss_sum"]) / tokens,
            "accuracy": float(last["correct"]) / tokens,
            "learning_rate": float(last["learning_rate"]),
            "grad_norm": float(last["grad_norm"]),
            "param_norm": float(last["param_norm"]),
            "timing/steps_per_second": n_steps / elapsed,
            "timing/tokens_per_second": window_tokens / elapsed,
        }
        writer.write_scalars(step_done, scalars)
        summary.final_metrics = scalars
        if progress and is_chief:
            done = step_done - start_step
            todo = total_steps - start_step
            rate = scalars["timing/steps_per_second"]
            eta = (total_steps - step_done) / rate if rate > 0 else float("inf")
            print(
                f"[train] step {step_done}/{total_steps} ({100.0 * done / todo:5.1f}%) "
                f"loss {scalars['loss']:.4f} acc {scalars['accuracy']:.3f} "
                f"z {scalars['z_loss']:.2e} lr {scalars['learning_rate']:.2e} "
                f"{rate:.2f} steps/s {_format_rate(scalars['timing/tokens_per_second'])} tok/s "
                f"eta {eta:.0f}s",
                flush=True,
            )
        window_tokens = 0
        window_start = time.time()
        window_first = step_done

    try:
        for step in range(start_step, total_steps):
            try:
                host_batch = next(batches)
            except StopIteration:
                raise RuntimeError(
                    f"The training data ({train_dataset_cfg.mixture_or_task_name}, split "
                    f"{train_dataset_cfg.split!r}) ran out at step {step}."
                ) from None
            n_tok = int(np.count_nonzero(host_batch["encoder_input_tokens"])
                        + np.count_nonzero(host_batch["decoder_target_tokens"]))
            n_tok *= jax.process_count()
            window_tokens += n_tok
            total_tokens += n_tok
            batch = partitioner.host_local_to_global(host_batch)
            state, metrics = p_train_step(state, batch)
            pending.append((step, metrics))
            done = step + 1
            is_last = done == total_steps
            save_now = done % checkpoint_period == 0 or is_last
            eval_now = bool(eval_period) and (done % eval_period == 0 or is_last)
            if done % log_every == 0 or save_now or eval_now:
                flush(done)
            if save_now:
                ts.save(manager, state, metadata)
            if eval_now:
                results = evaluation.run_evaluator(
                    evaluator, model, state.params, step=done,
                    batch_size=datasets.host_batch_size(infer_eval_dataset_cfg),
                    max_decode_length=max_decode_length,
                )
                summary.eval_metrics[done] = results
                flat = {f"eval/{t}/{k}": v for t, vals in results.items() for k, v in vals.items()}
                writer.write_scalars(done, flat)
                if is_chief:
                    print(f"[eval] step {done}:\n{evaluation.format_metrics(results)}", flush=True)
                if best_manager is not None:
                    metric_name, score = _lookup_metric(results, eval_metric)
                    if summary.best is None or score > summary.best[1]:
                        summary.best = (done, score)
                        summary.best_metric = metric_name
                    best_meta = dict(metadata, eval_metric=metric_name, eval_score=score,
                                     eval_results=results)
                    ts.save(best_manager, state, best_meta, metrics={"score": score})
            summary.end_step = done
        flush(summary.end_step)
    finally:
        manager.wait_until_finished()
        manager.close()
        if best_manager is not None:
            best_manager.wait_until_finished()
            best_manager.close()
        writer.flush()
    summary.elapsed_s = time.time() - loop_start
    summary.tokens_per_second = total_tokens / max(summary.elapsed_s, 1e-9)
    if is_chief:
        _print_summary(summary, model_dir)
    return summary


def _print_summary(summary: TrainSummary, model_dir: str) -> None:
    lines = [
        "[train] done.",
        f"  steps        {summary.start_step} -> {summary.end_step} "
        f"({summary.end_step - summary.start_step} run, started from {summary.resumed_from})",
        f"  time         {summary.elapsed_s:.1f}s, {_format_rate(summary.tokens_per_second)} tokens/s",
    ]
    if summary.losses:
        lines.append(f"  loss         first {summary.losses[0]:.4f} -> last {summary.losses[-1]:.4f}")
    if summary.final_metrics:
        lines.append(f"  accuracy     {summary.final_metrics['accuracy']:.4f}")
    if summary.best is not None:
        lines.append(
            f"  best         {summary.best_metric} = {summary.best[1]:.4f} at step {summary.best[0]} "
            f"({model_dir}/best/checkpoint_{summary.best[0]})"
        )
    lines.append(f"  checkpoints  {model_dir}/checkpoint_{summary.end_step}")
    lines.append(f"  summaries    {model_dir}/train (tensorboard --logdir {model_dir})")
    print("\n".join(lines), file=sys.stdout, flush=True)
