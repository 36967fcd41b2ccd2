"""The training loop: uptraining and fine-tuning (T5X `train.train` interface).

`train` (bound by `gin/runs/{uptrain,finetune}.gin`, called by
`python -m gqa_t5x.main --run_mode=train`):

1. builds the (data, model) mesh and the shardings of every parameter and
   optimizer-state leaf (`partitioning.py`);
2. decides where the run starts (`initial_state.find_start`): the newest
   checkpoint in MODEL_DIR if there is one (a preempted job just restarts),
   else INITIAL_CHECKPOINT_PATH (any format the checkpoints package reads;
   its step becomes the start step), else step 0; and checks TRAIN_STEPS
   against that step (`initial_state.check_train_steps`): TRAIN_STEPS is
   absolute, counted from the start of pre-training, so it must lie beyond
   the start step; a run whose MODEL_DIR already holds
   checkpoint_<TRAIN_STEPS> is finished and a rerun returns at once;
3. restores or initialises the state (`initial_state.restore_or_initialize`),
   comparing the initial checkpoint's parameter shapes with the model's; a
   run from the initial checkpoint may continue another run exactly: its
   data from INITIAL_DATA_ROW, its optimizer state from the trainer
   checkpoint INITIAL_OPTIMIZER_STATE (for parameters whose shape it keeps);
4. opens the training input at the global data row the run continues at
   (`train_data.py`): the cache in DATA_CACHE_DIR, read by row index (each
   host reads only its rows of each global batch; nothing before the row is
   read), or else the seqio stream, which skips the rows already consumed;
   and reads the first batch;
5. calls `on_validated` (the launcher writes MODEL_DIR/config.gin there),
   then runs the jit-compiled, sharded train step until TRAIN_STEPS
   (`run_loop`), logging (`train_log.py`), checking the loss for NaN/inf,
   saving every `checkpoint_period` steps (keep-N) and at the end, and
   optionally evaluating every `eval_period` steps while keeping the best
   checkpoint in MODEL_DIR/best (`evaluate_and_keep_best`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import gin
import jax
import numpy as np
import optax
from clu import metric_writers

from gqa_t5x import checkpoints
from gqa_t5x.data import datasets
from gqa_t5x.data import train_data
from gqa_t5x.model import models
from gqa_t5x.storage import paths
from gqa_t5x.storage import space
from gqa_t5x.training import best_checkpoint
from gqa_t5x.training import continuation
from gqa_t5x.training import evaluation
from gqa_t5x.training import initial_state
from gqa_t5x.training import optimizers
from gqa_t5x.training import partitioning
from gqa_t5x.training import preemption
from gqa_t5x.training import train_state as ts
from gqa_t5x.training.train_step import make_train_step
from gqa_t5x.training.train_log import TrainLog
from gqa_t5x.training.train_log import TrainSummary
from gqa_t5x.training.train_log import print_summary


def _kv_heads_text(config: Any) -> str:
    """'2/8' (kv heads / heads), or each layer's counts where they differ."""
    if config.uniform_kv_heads:
        return f"{config.num_kv_heads}/{config.num_heads}"
    return f"of {config.num_heads} heads: {config.describe_kv_heads()}"


# ----------------------------------------------------------------- step budget
def uptrain_total_steps(
    initial_checkpoint_path: str | None, alpha: float = 0.05, pretrain_steps: int = 1_000_000
) -> int:
    """TRAIN_STEPS of an uptraining run: start step + alpha * pre-training steps.

    Args:
      initial_checkpoint_path: The converted checkpoint (its step, e.g.
        1,000,000 for public T5.1.1, is the start).
      alpha: UPTRAIN_ALPHA, the fraction of pre-training to continue, in
        (0, 1] (paper: 0.05).
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
    if not 0 < alpha <= 1:
        raise ValueError(
            f"UPTRAIN_ALPHA={alpha} must be in (0, 1]: it is the fraction of the "
            f"PRETRAIN_STEPS={pretrain_steps} pre-training steps to continue for "
            "(paper: 0.05). For a longer run set --gin.TRAIN_STEPS to the final "
            "absolute step instead."
        )
    if not isinstance(pretrain_steps, int) or pretrain_steps <= 0:
        raise ValueError(f"PRETRAIN_STEPS={pretrain_steps!r} must be a positive integer.")
    return initial_state.checkpoint_step(initial_checkpoint_path) + int(round(alpha * pretrain_steps))


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
    return initial_state.checkpoint_step(initial_checkpoint_path) + int(steps)


# ----------------------------------------------------------------------- loop


def run_loop(
    *,
    state: ts.TrainState,
    train_step: Callable[[ts.TrainState, Any], tuple[ts.TrainState, Any]],
    batches: Iterator[dict[str, np.ndarray]],
    partitioner: partitioning.Partitioner,
    batch_size: int,
    total_steps: int,
    manager: Any,
    metadata: Mapping[str, Any],
    log: TrainLog,
    summary: TrainSummary,
    checkpoint_period: int,
    log_every: int,
    eval_period: int | None = None,
    evaluate: Callable[[ts.TrainState, int], None] | None = None,
    guard: preemption.PreemptionGuard | None = None,
) -> tuple[ts.TrainState, int]:
    """Runs steps `summary.start_step` .. `total_steps`.

    Args:
      state: The start state.
      train_step: The jitted, sharded step.
      batches: This host's rows (`partitioner.host_rows`) of each batch.
      partitioner: Turns host batches into global arrays.
      batch_size: BATCH_SIZE (global).
      total_steps: TRAIN_STEPS.
      manager: Checkpoints of MODEL_DIR.
      metadata: Stored beside each checkpoint.
      log: Metrics log (flushed every `log_every` steps, before saving and
        evaluating).
      summary: Receives `end_step`.
      checkpoint_period: Save every N steps and at the end.
      log_every: Flush the log every N steps.
      eval_period: Call `evaluate(state, step)` every N steps and at the end.
      evaluate: The evaluation hook.
      guard: Preemption signals; when the processes agree on a stop after a
        step (not the last), that step is saved and `Preempted` raised.

    Returns:
      (final state, non-padding tokens trained on).

    Raises:
      Preempted: a stop signal arrived; the checkpoint of the step reached
        is saved (and complete) when it is raised.
    """
    total_tokens = 0
    for step in range(summary.start_step, total_steps):
        host_batch = next(batches, None)
        if host_batch is None:
            raise RuntimeError(
                f"The training data ({metadata['mixture_or_task_name']}) ran out at "
                f"step {step}."
            )
        n_tok = int(np.count_nonzero(host_batch["encoder_input_tokens"])
                    + np.count_nonzero(host_batch["decoder_target_tokens"]))
        n_tok = n_tok * batch_size // len(host_batch["decoder_target_tokens"])
        total_tokens += n_tok
        state, metrics = train_step(
            state, partitioner.host_local_to_global(host_batch, batch_size)
        )
        log.add(step, metrics, n_tok)
        done = step + 1
        is_last = done == total_steps
        save_now = done % checkpoint_period == 0 or is_last
        eval_now = bool(eval_period) and (done % eval_period == 0 or is_last)
        if done % log_every == 0 or save_now or eval_now:
            log.flush(done)
        if save_now:
            ts.save(manager, state, metadata)
        if eval_now:
            evaluate(state, done)
        summary.end_step = done
        if guard is not None and not is_last and guard.stop_agreed(done):
            log.flush(done)
            manager.wait_until_finished()  # A periodic save of this step may be running.
            ts.save(manager, state, metadata)
            manager.wait_until_finished()
            raise preemption.preempted_error(
                done, f"{manager.directory}/{ts.STEP_PREFIX}_{done}", guard.signal_name
            )
    log.flush(summary.end_step)
    return state, total_tokens


# ---------------------------------------------------------------------- train


def _close(manager: Any) -> None:
    manager.wait_until_finished()
    manager.close()


# Compiled train steps of this process, by what they are traced from (see
# `compile_train_step`); a few, as a process trains a few configurations.
_STEP_PROGRAMS: dict[tuple, tuple[Callable, tuple]] = {}
_MAX_STEP_PROGRAMS = 8


def compile_train_step(model: models.EncoderDecoderModel, optimizer: optax.GradientTransformation,
                       learning_rate_fn: optimizers.Schedule, shardings: Any, partitioner: partitioning.Partitioner,
                       ) -> Callable[[ts.TrainState, Any, jax.Array], tuple[ts.TrainState, Any]]:
    """The jitted, sharded train step `(state, batch, dropout_key) -> (state, metrics)`.

    The dropout key is an argument of the compiled program, not a constant in
    it: runs with dropout that differ only in their seed (fine-tuning repeats,
    a sweep's seeds) lower to the same program, so the persistent compilation
    cache serves every run after the first. (Without dropout the key is
    unused and the program never depended on it.)

    A later run in the same process (a study's or a sweep's next run) with an
    equal model (type, network config, loss settings), the same optimizer and
    schedule objects (`optimizers.adafactor` and the schedules return one
    object per setting) and equal shardings gets the step already traced and
    compiled, instead of tracing it again.

    Args:
      model: Provides `loss_fn`.
      optimizer: Optax transformation without learning rate.
      learning_rate_fn: Schedule of the global step.
      shardings: Shardings of the train state.
      partitioner: Gives the batch's and the replicated sharding.

    Returns:
      The step; `dropout_key` is the run's base key (`make_train_step`). The
      state is donated.
    """
    leaves, treedef = jax.tree_util.tree_flatten(shardings)
    key = (type(model), model.config, model.z_loss, model.label_smoothing, model.loss_normalizing_factor,
           id(optimizer), id(learning_rate_fn), treedef, tuple(leaves), partitioner.data_sharding,
           partitioner.replicated)
    if key in _STEP_PROGRAMS:
        return _STEP_PROGRAMS[key][0]

    def keyed_step(state: ts.TrainState, batch: Any, dropout_key: jax.Array):
        return make_train_step(model, optimizer, learning_rate_fn, dropout_key)(state, batch)

    step = jax.jit(keyed_step, in_shardings=(shardings, partitioner.data_sharding, partitioner.replicated),
                   out_shardings=(shardings, partitioner.replicated), donate_argnums=(0,))
    if len(_STEP_PROGRAMS) >= _MAX_STEP_PROGRAMS:
        _STEP_PROGRAMS.pop(next(iter(_STEP_PROGRAMS)))
    # The optimizer and schedule stay referenced, so their ids in the key stay theirs.
    _STEP_PROGRAMS[key] = (step, (optimizer, learning_rate_fn))
    return step


def _finished_run(start: initial_state.StartInfo, model_dir: str) -> TrainSummary:
    """The summary of a rerun of a finished run (nothing is trained)."""
    summary = TrainSummary(start.step, start.step, [], {}, {}, None, 0.0, 0.0, "model_dir")
    best_dir = paths.as_path(model_dir, name="MODEL_DIR") / "best"
    if best_dir.is_dir():
        best_manager = ts.checkpoint_manager(
            best_dir, max_to_keep=1, best_metric="score", async_save=False
        )
        best_checkpoint.previous_best(best_manager, summary)
        _close(best_manager)
    if jax.process_index() == 0:
        print(
            f"[train] {model_dir}/checkpoint_{start.step} is at TRAIN_STEPS="
            f"{start.step}: the run is already finished, nothing to do.",
            flush=True,
        )
    return summary


def _vocabulary_record(model: models.EncoderDecoderModel) -> dict[str, Any] | None:
    """The record of the model's SentencePiece vocabulary, stored in each checkpoint."""
    vocab = model.input_vocabulary
    path = getattr(vocab, "sentencepiece_model_file", None)
    if not path:
        return None
    return checkpoints.vocabulary.record(path, extra_ids=int(getattr(vocab, "extra_ids", 0)))


def _no_space(model_dir: str, model_path: paths.Path) -> space.NoSpaceError:
    """The error of a run whose checkpoint write found the disk full (partial output removed)."""
    removed = [ts.remove_partial_checkpoints(d) for d in (model_path, model_path / "best")]
    failed = ", ".join(n.split(ts.TMP_MARK)[0] for n in sum(removed, [])) or "a checkpoint"
    kept = checkpoints.steps.complete_steps(model_path)
    intact = (f"the newest complete checkpoint, {ts.STEP_PREFIX}_{kept[-1]}, is intact and a rerun "
              "resumes from it" if kept else "no earlier checkpoint existed")
    return space.NoSpaceError(
        model_dir, f"{failed} could not be written and its partial output was removed; {intact}. "
        "Free space (or raise the quota) and rerun the same command."
    )


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
    preemption_check_period: int = 10,
    allow_unusual_values: bool = False,
    initial_data_row: int | None = None,
    initial_optimizer_state: str | None = None,
    on_validated: Callable[[], None] | None = None,
) -> TrainSummary:
    """Trains until the global step reaches `total_steps` (see module docstring).

    Args:
      model: The model (network config from the model gin).
      train_dataset_cfg: Training data (task, lengths, batch size, packing).
      model_dir: MODEL_DIR: checkpoints, summaries, config.gin.
      total_steps: TRAIN_STEPS, absolute (counted from the start of
        pre-training, so it includes the initial checkpoint's step).
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
        checkpoint (kept in MODEL_DIR/best); None = the evaluated task's
        primary metric in the task table (rouge1 / bleu / f1).
      num_eval_examples: Evaluate on the first N examples only.
      max_decode_length: Decoding length (default: the targets' length).
      random_seed: RANDOM_SEED: initialisation and dropout.
      log_every: Summaries, console line and NaN check every N steps.
      progress: Print the console progress line.
      preemption_check_period: With several processes, how often (steps)
        they agree on a preemption stop (`preemption.PreemptionGuard`); one
        process checks every step.
      allow_unusual_values: ALLOW_UNUSUAL_VALUES: start from restored
        parameters even if they are non-finite or have |x| > 1e4 (refused
        otherwise, naming the parameter: `checkpoints.value_limits`).
      initial_data_row: INITIAL_DATA_ROW: the global row of the training
        data a run not resumed from MODEL_DIR reads first (None: row 0), e.g.
        step * BATCH_SIZE of the pre-training run it continues; recorded as
        the checkpoints' `data_start_row`, so a resume continues from it.
      initial_optimizer_state: INITIAL_OPTIMIZER_STATE: a trainer checkpoint
        (`MODEL_DIR/checkpoint_<step>` of another run) whose optimizer state a
        run from INITIAL_CHECKPOINT_PATH continues with, for every parameter
        whose shape is unchanged (others start fresh); None: fresh state.
        A MODEL_DIR resume ignores both.
      on_validated: Called once the configuration is checked, the state is
        restored or initialised, and the first batch and the evaluation data
        are read, right before the first step. Not called when the run is
        already finished (MODEL_DIR at TRAIN_STEPS) or a check fails.

    Returns:
      A `TrainSummary`.

    Raises:
      ValueError: a setting is invalid, e.g. TRAIN_STEPS not beyond the start
        checkpoint's step.
      DataError: the training or evaluation data cannot be read.
      train_log.NonFiniteLossError: the loss became NaN/inf (nothing after
        the last good checkpoint is saved).
      Preempted: SIGTERM or SIGINT arrived during the steps; the step reached
        is saved and a rerun resumes from it.
    """
    if not model_dir:
        raise ValueError("MODEL_DIR is required (--gin.MODEL_DIR=\"/path/to/model_dir\").")
    if checkpoint_period <= 0 or log_every <= 0:
        raise ValueError(
            f"checkpoint_period={checkpoint_period} and log_every={log_every} must be positive."
        )
    if eval_period and infer_eval_dataset_cfg is None:
        raise ValueError("eval_period is set but infer_eval_dataset_cfg (the evaluation data) is not.")
    guard = preemption.PreemptionGuard(check_period=preemption_check_period)
    learning_rate_fn = learning_rate_fn or optimizers.rsqrt_schedule()
    optimizer = optimizer or optimizers.adafactor()
    partitioner = partitioner or partitioning.Partitioner()
    partitioner.check_batch_size(train_dataset_cfg.batch_size)
    continuation.check_initial_options(initial_data_row, initial_optimizer_state, initial_checkpoint_path)
    model_path = paths.absolute(paths.as_path(model_dir, name="MODEL_DIR"))  # Local (made absolute) or gs://.

    def make_manager() -> Any:
        return ts.checkpoint_manager(model_path, max_to_keep=keep_checkpoints, async_save=async_checkpointing)

    # A local MODEL_DIR is created only once the run is validated (a refused
    # run leaves no trace); gs:// has no directories, only a bucket to reach.
    remote = paths.is_remote(model_path)
    if remote:
        paths.makedirs(model_path)
    manager = make_manager() if remote or model_path.is_dir() else None
    managers = [manager] if manager is not None else []
    data: train_data.TrainData | None = None
    space.quiet_repeated_space_errors()
    try:
        try:
            start = initial_state.find_start(manager.latest_step() if manager else None, initial_checkpoint_path)
            if initial_state.check_train_steps(total_steps, start, model_dir, initial_checkpoint_path):
                return _finished_run(start, model_dir)
            metric = None
            if eval_period:
                metric = eval_metric or best_checkpoint.default_eval_metric(
                    best_checkpoint.eval_task_names(infer_eval_dataset_cfg))
            rng = jax.random.PRNGKey(random_seed)
            state, shardings, start = initial_state.restore_or_initialize(
                start=start, model=model, optimizer=optimizer, partitioner=partitioner,
                manager=manager, initial_checkpoint_path=initial_checkpoint_path,
                batch_size=train_dataset_cfg.batch_size, rng=rng,
                allow_unusual_values=allow_unusual_values, initial_data_row=initial_data_row,
                initial_optimizer_state=initial_optimizer_state,
            )
            if jax.process_index() == 0:
                origin = {
                    "model_dir": f"resumed from {model_dir}/checkpoint_{start.step}",
                    "initial_checkpoint": f"initial_checkpoint {initial_checkpoint_path}",
                    "scratch": "scratch (random initialisation)",
                }[start.resumed_from]
                print(
                    f"[train] {origin}: step {start.step} -> {total_steps} "
                    f"({total_steps - start.step} steps), mesh "
                    f"{dict(partitioner.mesh.shape)}, batch {train_dataset_cfg.batch_size}, "
                    f"kv heads {_kv_heads_text(model.config)}",
                    *start.notes, sep="\n", flush=True,
                )
            keyed_step = compile_train_step(model, optimizer, learning_rate_fn, shardings, partitioner)
            dropout_key = jax.device_put(jax.random.fold_in(rng, 1), partitioner.replicated)
            train_step = lambda state, batch: keyed_step(state, batch, dropout_key)  # noqa: E731
            batch_size = train_dataset_cfg.batch_size
            data = train_data.open_train_data(
                train_dataset_cfg, start_row=start.data_row,
                host_rows=partitioner.host_rows(batch_size),
                end_row=start.data_row + (total_steps - start.step) * batch_size,
            )
            switched = train_data.check_resume(
                start.restored_metadata, data, train_dataset_cfg, start.data_row
            )
            if jax.process_index() == 0:
                print("\n".join([*data.notes, *([switched] if switched else [])]), flush=True)
            # The step this run began at before any resume (progress is counted from it).
            run_start = (start.step if start.resumed_from != "model_dir"
                         else (start.restored_metadata or {}).get("run_start_step"))
            metadata = ts.metadata_for(
                model.config, data_start_step=start.step, data_start_row=start.data_row,
                batch_size=batch_size, task=train_dataset_cfg.mixture_or_task_name,
                seed=train_dataset_cfg.seed, data_pipeline=data.pipeline,
                data_cache=data.cache_fingerprint, vocabulary=_vocabulary_record(model),
                run_start_step=run_start,
            )
            first = next(data.batches, None)
            if first is None:
                raise RuntimeError(
                    f"The training data ({train_dataset_cfg.mixture_or_task_name}, split "
                    f"{train_dataset_cfg.split!r}) yields no batch of {train_dataset_cfg.batch_size}."
                )
            summary = TrainSummary(start.step, start.step, [], {}, {}, None, 0.0, 0.0, start.resumed_from)
            setup = None
            evaluator = None
            if eval_period:
                evaluator = evaluation.make_evaluator(
                    infer_eval_dataset_cfg, str(model_path / "eval"), num_eval_examples
                )
            if manager is None:  # Everything is checked: now MODEL_DIR is made.
                paths.makedirs(model_path)
                manager = make_manager()
                managers.append(manager)
            if eval_period:
                # MODEL_DIR/best keeps the checkpoint with the best evaluation metric.
                best_manager = ts.checkpoint_manager(
                    model_path / "best", max_to_keep=1, best_metric="score",
                    async_save=False,
                )
                managers.append(best_manager)
                setup = best_checkpoint.EvalSetup(
                    evaluator=evaluator,
                    dataset_cfg=infer_eval_dataset_cfg,
                    metric=metric,
                    best_manager=best_manager,
                    max_decode_length=max_decode_length,
                )
                best_checkpoint.previous_best(best_manager, summary)  # Resumed: the best evaluation so far.
            if on_validated is not None:
                on_validated()
            log = TrainLog(
                summary=summary,
                writer=metric_writers.create_default_writer(
                    str(model_path / "train"),  # TensorBoard (tf.io.gfile)
                    just_logging=jax.process_index() != 0, asynchronous=False,
                ),
                manager=manager, model_dir=model_dir, total_steps=total_steps, progress=progress,
                run_start_step=run_start,
            )
            loop_start = time.time()
            try:
                with guard:
                    _, tokens = run_loop(
                        state=state, train_step=train_step,
                        batches=itertools.chain([first], data.batches), partitioner=partitioner,
                        batch_size=batch_size, total_steps=total_steps, manager=manager,
                        metadata=metadata, log=log, summary=summary,
                        checkpoint_period=checkpoint_period, log_every=log_every,
                        eval_period=eval_period,
                        evaluate=lambda s, step: best_checkpoint.evaluate_and_keep_best(
                            setup, model, s, step, metadata, summary, log
                        ),
                        guard=guard,
                    )
            finally:
                log.close()
        finally:
            if data is not None:
                data.close()  # Stops the input pipeline's threads now.
            for m in managers:
                _close(m)
    except Exception as error:
        if not space.is_out_of_space(error):
            raise
        raise _no_space(model_dir, model_path) from error
    summary.elapsed_s = time.time() - loop_start
    summary.tokens_per_second = tokens / max(summary.elapsed_s, 1e-9)
    if jax.process_index() == 0:
        print_summary(summary, model_dir)
    return summary
