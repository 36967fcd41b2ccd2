"""Training: resumption after SIGKILL, NaN guard, step budget, checks, data errors.

Training runs happen in subprocesses (the launcher as users run it, or
`training_utils.py` on a synthetic task) with XLA's backend optimisation
turned down, which keeps compilation short on CPU without changing what is
computed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x import checkpoints
from gqa_t5x.data import cache
from gqa_t5x.data import datasets
from gqa_t5x.data import tasks  # noqa: F401 (registers the tasks)
from gqa_t5x.data.errors import DataError
from gqa_t5x.model import models
from gqa_t5x.model import network
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config
from gqa_t5x.training import best_checkpoint
from gqa_t5x.training import evaluation
from gqa_t5x.training import initial_state
from gqa_t5x.training import optimizers
from gqa_t5x.training import train_state as ts
from gqa_t5x.training import trainer
from training_utils import TASK, dataset_config, read_checkpoint_params, register_synthetic_task
from training_utils import tiny_config

from paths import REPO, TESTS


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3", **extra,
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_worker(model_dir: Path, out: Path, steps: int, **kw) -> subprocess.CompletedProcess:
    args = [sys.executable, str(TESTS / "training_utils.py"), "--model_dir", str(model_dir),
            "--steps", str(steps), "--out", str(out)]
    for key, value in kw.items():
        args += [f"--{key}", str(value)]
    return subprocess.run(args, env=worker_env(), capture_output=True, text=True, timeout=600)


# ------------------------------------------------------------------ preemption
@pytest.mark.parametrize("pipeline", ["stream", "cache"])
@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkilled_run_resumes_to_bit_identical_parameters(tmp_path, monkeypatch, pipeline):
    steps = 8
    killed_dir = tmp_path / "killed"
    # The three processes compile the same train step: share a compilation cache.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    data: dict[str, str] = {}
    slow = {"GQA_TEST_SLOW_EXAMPLE_S": "0.015"}
    if pipeline == "cache":  # A cache of the synthetic task, read by row index.
        register_synthetic_task()
        cache.write_cache(dataset_config(), str(tmp_path / "cache"), progress=False)
        data = {"cache_dir": str(tmp_path / "cache")}
        slow = {"GQA_TEST_SLOW_BATCH_S": "0.3"}
    data_flags = [a for k, v in data.items() for a in (f"--{k}", v)]
    # The uninterrupted reference runs alongside the run that gets killed.
    reference = subprocess.Popen(
        [sys.executable, str(TESTS / "training_utils.py"), "--model_dir", str(tmp_path / "ref"),
         "--steps", str(steps), "--checkpoint_period", "2", "--out", str(tmp_path / "ref.json"),
         *data_flags],
        env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    victim = subprocess.Popen(
        [sys.executable, str(TESTS / "training_utils.py"), "--model_dir", str(killed_dir),
         "--steps", str(steps), "--checkpoint_period", "2", "--out", str(tmp_path / "victim.json"),
         *data_flags],
        env=worker_env(**slow), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed_dir / "checkpoint_4").is_dir():
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint_4 within 300 s"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = sorted(int(p.name.split("_")[1]) for p in killed_dir.glob("checkpoint_*") if p.name.split("_")[1].isdigit())
    assert done and max(done) < steps, f"not interrupted mid-way: {done}"

    resumed = run_worker(killed_dir, tmp_path / "resumed.json", steps, checkpoint_period=2, **data)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
    got = json.loads((tmp_path / "resumed.json").read_text())["runs"]["0:1,1"]
    want = json.loads((tmp_path / "ref.json").read_text())["runs"]["0:1,1"]
    assert got["start_step"] == max(done) and got["end_step"] == steps
    assert got["digest"] == want["digest"]
    # The resumed run saw the same batches: its losses are the reference's tail.
    np.testing.assert_array_equal(got["losses"], want["losses"][max(done):])


# ------------------------------------------------------------------- NaN guard
@pytest.mark.slow
def test_nonfinite_update_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    proc = run_worker(tmp_path / "nan", tmp_path / "nan.json", 8, checkpoint_period=2,
                      inf_lr_from_step=3)
    assert proc.returncode != 0
    assert "NonFiniteLossError" in proc.stderr
    assert "at step 3" in proc.stderr and "checkpoint_2" in proc.stderr
    saved = sorted(p.name for p in (tmp_path / "nan").glob("checkpoint_*"))
    assert saved == ["checkpoint_2"]
    params = read_checkpoint_params(str(tmp_path / "nan" / "checkpoint_2"))
    assert all(np.isfinite(v).all() for v in params.values())


# ---------------------------------------------------------------- step budget
def _save_checkpoint(path: Path, config: T5Config, step: int) -> str:
    params = param_tree.unflatten(
        {k: np.zeros(s, np.float32) for k, s in param_tree.param_shapes(config).items()})
    checkpoints.save(path, config, params, step=step)
    return str(path)


def test_uptrain_total_steps_adds_alpha_of_pretraining_to_the_checkpoint_step(tmp_path):
    path = _save_checkpoint(tmp_path / "checkpoint_1000000", tiny_config(2), 1_000_000)
    assert trainer.uptrain_total_steps(path) == 1_050_000
    assert trainer.uptrain_total_steps(path, 0.1, 500_000) == 1_050_000
    assert trainer.uptrain_total_steps(path, 1.0, 1000) == 1_001_000
    with pytest.raises(ValueError, match="INITIAL_CHECKPOINT_PATH"):
        trainer.uptrain_total_steps(None)


@pytest.mark.parametrize("alpha", [2, 0, -0.05])
def test_uptrain_alpha_outside_zero_to_one_is_an_error(tmp_path, alpha):
    path = _save_checkpoint(tmp_path / "checkpoint_1000000", tiny_config(2), 1_000_000)
    with pytest.raises(ValueError, match=rf"UPTRAIN_ALPHA={alpha} must be in \(0, 1\].*TRAIN_STEPS"):
        trainer.uptrain_total_steps(path, alpha)


def _model(config: T5Config) -> models.EncoderDecoderModel:
    return models.EncoderDecoderModel(network.Transformer(config))


def _train(model_dir: Path, total_steps: int, **kw) -> trainer.TrainSummary:
    register_synthetic_task()
    kw.setdefault("model", _model(tiny_config()))
    kw.setdefault("train_dataset_cfg", dataset_config())
    return trainer.train(model_dir=str(model_dir), total_steps=total_steps, log_every=1, **kw)


def _never_called():
    raise AssertionError("on_validated was called")


def test_train_steps_not_beyond_the_initial_checkpoint_is_an_error_naming_its_step(tmp_path):
    initial = _save_checkpoint(tmp_path / "uptrained" / "checkpoint_1000", tiny_config(), 1000)
    for total_steps in (1000, 200):  # The uptrained step itself; a relative count.
        with pytest.raises(ValueError) as raised:
            _train(tmp_path / "finetune", total_steps, initial_checkpoint_path=initial,
                   on_validated=_never_called)
        message = str(raised.value)
        assert f"TRAIN_STEPS={total_steps} is not beyond step 1000" in message
        assert "absolute, counted from the start of pre-training" in message
        assert f"e.g. {1000 + total_steps}" in message
    assert not list((tmp_path / "finetune").glob("checkpoint_*"))


@pytest.fixture
def finished_run(tmp_path) -> Path:
    """MODEL_DIR of a run that ended at step 3 (a real training checkpoint)."""
    config = tiny_config()
    params = _model(config).get_initial_params(jax.random.PRNGKey(0))
    state = ts.TrainState(step=jnp.asarray(3, jnp.int32), params=params,
                          opt_state=optimizers.adafactor().init(params))
    manager = ts.checkpoint_manager(tmp_path / "run", async_save=False)
    ts.save(manager, state, ts.metadata_for(config, data_start_step=0, batch_size=8, task=TASK, seed=7))
    manager.close()
    return tmp_path / "run"


def test_rerunning_a_finished_run_is_a_no_op_and_a_lower_train_steps_an_error(finished_run, capsys):
    summary = _train(finished_run, 3, on_validated=_never_called)
    assert (summary.start_step, summary.end_step, summary.losses) == (3, 3, [])
    assert "the run is already finished, nothing to do" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"TRAIN_STEPS=2 is below the step of MODEL_DIR's newest "
                                         r"checkpoint .*checkpoint_3: TRAIN_STEPS is absolute"):
        _train(finished_run, 2, on_validated=_never_called)
    assert sorted(p.name for p in finished_run.glob("checkpoint_*")) == ["checkpoint_3"]


# ------------------------------------------------------- values on restore
def _with_value(params, key: str, value: float):
    flat = param_tree.flatten(jax.tree_util.tree_map(np.asarray, params))
    flat[key] = flat[key].copy()
    flat[key].flat[0] = value
    return param_tree.unflatten(flat)


def _run_at_step_3(model_dir: Path, key: str, value: float) -> Path:
    config = tiny_config()
    params = _with_value(_model(config).get_initial_params(jax.random.PRNGKey(0)), key, value)
    state = ts.TrainState(step=jnp.asarray(3, jnp.int32), params=params,
                          opt_state=optimizers.adafactor().init(params))
    manager = ts.checkpoint_manager(model_dir, async_save=False)
    ts.save(manager, state, ts.metadata_for(config, data_start_step=0, batch_size=8, task=TASK, seed=7))
    manager.close()
    return model_dir


def test_resuming_from_a_checkpoint_holding_a_nan_is_refused_naming_the_parameter(tmp_path):
    run = _run_at_step_3(tmp_path / "run", "decoder/layers_0/mlp/wo/kernel", np.nan)
    with pytest.raises(checkpoints.UnusualValuesError) as raised:
        _train(run, 5, on_validated=_never_called)
    assert str(raised.value).startswith(
        f"{run}/checkpoint_3: parameter 'decoder/layers_0/mlp/wo/kernel' holds 1 non-finite value(s)")
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_3"]


@pytest.mark.slow
def test_the_override_resumes_from_a_checkpoint_with_a_huge_value(tmp_path):
    run = _run_at_step_3(tmp_path / "run", "encoder/relpos_bias/rel_embedding", 2e4)
    with pytest.raises(checkpoints.UnusualValuesError, match="implausibly large"):
        _train(run, 4, on_validated=_never_called)
    summary = _train(run, 4, allow_unusual_values=True)
    assert (summary.start_step, summary.end_step) == (3, 4)


def test_an_initial_checkpoint_holding_a_nan_is_refused_before_anything_is_written(tmp_path):
    config = tiny_config()
    params = _with_value(param_tree.unflatten(
        {k: np.zeros(s, np.float32) for k, s in param_tree.param_shapes(config).items()}),
        "token_embedder/embedding", np.inf)
    initial = tmp_path / "converted" / "checkpoint_1000"
    checkpoints.save(initial, config, params, step=1000)
    with pytest.raises(checkpoints.UnusualValuesError, match="parameter 'token_embedder/embedding' holds 1 non-finite"):
        _train(tmp_path / "run", 1002, initial_checkpoint_path=str(initial), on_validated=_never_called)
    assert not (tmp_path / "run").exists()  # A refused run leaves no MODEL_DIR behind.


def test_a_missing_initial_checkpoint_is_refused_without_creating_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _train(tmp_path / "run", 1002, initial_checkpoint_path=str(tmp_path / "nowhere"),
               on_validated=_never_called)
    assert not (tmp_path / "run").exists()


class _Stop(Exception):
    pass


def test_on_validated_runs_after_restoring_and_before_the_first_step(finished_run, capsys):
    calls = []

    def on_validated():
        calls.append(capsys.readouterr().out)
        raise _Stop

    with pytest.raises(_Stop):
        _train(finished_run, 5, on_validated=on_validated)
    assert len(calls) == 1 and "resumed from" in calls[0] and "step 3 -> 5" in calls[0]
    assert sorted(p.name for p in finished_run.glob("checkpoint_*")) == ["checkpoint_3"]


@pytest.mark.slow
def test_a_bad_jsonl_record_reaches_the_caller_as_one_data_error(shared_dir, tmp_path):
    vocab = shared_dir / "fixtures" / "t5_vocab" / "cc_all.32000.sentencepiece.model"
    path = tmp_path / "cnn.jsonl"
    path.write_text(json.dumps({"article": "An article.", "highlights": "A summary."})
                    + "\n{not json\n")
    gin.clear_config()
    gin.bind_parameter("gqa_t5x.data.vocabularies.vocabulary_path.path", str(vocab))
    gin.bind_parameter("gqa_t5x.data.tasks.cnn_dailymail_data.files", {"train": str(path)})
    cfg = datasets.DatasetConfig("gqa_cnn_dailymail", {"inputs": 16, "targets": 8}, "train", 2,
                                 pack=False)
    try:
        with pytest.raises(DataError) as raised:
            _train(tmp_path / "run", 4, model=_model(tiny_config(vocab_size=32128)),
                   train_dataset_cfg=cfg, on_validated=_never_called)
    finally:
        gin.clear_config()
    assert type(raised.value) is DataError
    assert str(raised.value).startswith(f"{path}:2: invalid JSON (")
    assert "Traceback" not in str(raised.value) and raised.value.__cause__ is None


def test_evaluate_calls_on_validated_after_loading_and_before_writing(shared_dir, tmp_path):
    config = tiny_config(vocab_size=32128)
    checkpoint = _save_checkpoint(tmp_path / "ckpt" / "checkpoint_7", config, 7)
    path = tmp_path / "cnn.jsonl"
    path.write_text(json.dumps({"article": "An article.", "highlights": "A summary."}) + "\n")
    vocab = shared_dir / "fixtures" / "t5_vocab" / "cc_all.32000.sentencepiece.model"
    gin.clear_config()
    gin.bind_parameter("gqa_t5x.data.vocabularies.vocabulary_path.path", str(vocab))
    gin.bind_parameter("gqa_t5x.data.tasks.cnn_dailymail_data.files", {"validation": str(path)})
    cfg = datasets.DatasetConfig("gqa_cnn_dailymail", {"inputs": 16, "targets": 8}, "validation",
                                 2, shuffle=False)
    calls = []

    def on_validated():
        calls.append(sorted(p.name for p in tmp_path.iterdir()))
        raise _Stop

    try:
        with pytest.raises(checkpoints.CheckpointNotFoundError):
            evaluation.evaluate(model=_model(config), dataset_cfg=cfg,
                                checkpoint_path=str(tmp_path / "none"),
                                output_dir=str(tmp_path / "eval"), on_validated=_never_called)
        with pytest.raises(_Stop):
            evaluation.evaluate(model=_model(config), dataset_cfg=cfg, checkpoint_path=checkpoint,
                                output_dir=str(tmp_path / "eval"), on_validated=on_validated)
    finally:
        gin.clear_config()
    assert len(calls) == 1
    assert not (tmp_path / "eval" / "metrics.json").exists()


# ------------------------------------------- continuing a run exactly
def _saved_state(path: Path) -> dict:
    """The whole saved tree of a training checkpoint (`{'target', 'state'}`) and its metadata."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    stored = checkpointer.metadata(path / ts.STATE_ITEM).item_metadata.tree
    as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored)
    tree = checkpointer.restore(path / ts.STATE_ITEM, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    return {**tree, "metadata": json.loads((path / ts.METADATA_ITEM / "metadata").read_text())}


@pytest.mark.slow  # five short training runs (40-55 s on 2 CPUs)
def test_a_new_run_with_the_optimizer_state_and_data_row_of_a_checkpoint_continues_it_bit_for_bit(tmp_path):
    k, batch = 2, dataset_config().batch_size
    _train(tmp_path / "a", 2 * k, progress=False)  # the uninterrupted run
    _train(tmp_path / "b", k, progress=False)  # its first half
    middle = str(tmp_path / "b" / f"checkpoint_{k}")
    options = dict(initial_checkpoint_path=middle, initial_optimizer_state=middle,
                   initial_data_row=k * batch, progress=False)
    # A new MODEL_DIR from that checkpoint, interrupted after one step and
    # relaunched with the same options, which the resume ignores.
    _train(tmp_path / "c", k + 1, **options)
    _train(tmp_path / "c", 2 * k, **options)
    want = read_checkpoint_params(str(tmp_path / "a" / f"checkpoint_{2 * k}"))
    got = read_checkpoint_params(str(tmp_path / "c" / f"checkpoint_{2 * k}"))
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    first, last = (_saved_state(tmp_path / "c" / f"checkpoint_{s}") for s in (k + 1, 2 * k))
    # The optimizer's counter went on from the restored k; the data from row k * batch.
    assert int(first["state"]["param_states"][0]["count"]) == k + 1
    assert int(last["state"]["param_states"][0]["count"]) == 2 * k
    assert (first["metadata"]["data_start_step"], first["metadata"]["data_start_row"]) == (k, k * batch)
    assert (last["metadata"]["data_start_step"], last["metadata"]["data_start_row"]) == (k + 1, (k + 1) * batch)
    # Without INITIAL_OPTIMIZER_STATE the state starts fresh: its counter is the steps trained.
    _train(tmp_path / "d", k + 1, initial_checkpoint_path=middle, progress=False)
    assert int(_saved_state(tmp_path / "d" / f"checkpoint_{k + 1}")["state"]["param_states"][0]["count"]) == 1


def test_a_negative_initial_data_row_is_refused_before_model_dir_is_made(tmp_path):
    with pytest.raises(ValueError, match=r"INITIAL_DATA_ROW \(gqa_t5x\.training\.trainer\.train\."
                                         r"initial_data_row\)=-8 must be a non-negative integer"):
        _train(tmp_path / "run", 3, initial_data_row=-8, on_validated=_never_called)
    assert not (tmp_path / "run").exists()


def test_initial_optimizer_state_without_an_initial_checkpoint_is_refused(tmp_path):
    state = str(tmp_path / "pretrain" / "checkpoint_3")
    with pytest.raises(ValueError,
                       match=r"INITIAL_OPTIMIZER_STATE \(.*\)='.*checkpoint_3' needs INITIAL_CHECKPOINT_PATH"):
        _train(tmp_path / "run", 3, initial_optimizer_state=state, on_validated=_never_called)
    assert not (tmp_path / "run").exists()


def test_a_missing_initial_optimizer_state_is_refused_naming_the_option_and_path(tmp_path):
    initial = _save_checkpoint(tmp_path / "converted" / "checkpoint_10", tiny_config(), 10)
    missing = str(tmp_path / "pretrain" / "checkpoint_10")
    with pytest.raises(checkpoints.CheckpointNotFoundError) as raised:
        _train(tmp_path / "run", 12, initial_checkpoint_path=initial, initial_optimizer_state=missing,
               on_validated=_never_called)
    assert str(raised.value).startswith(
        "INITIAL_OPTIMIZER_STATE (gqa_t5x.training.trainer.train.initial_optimizer_state)="
        f"{missing!r} does not exist")
    with pytest.raises(checkpoints.CheckpointError, match="is not a training checkpoint written by this trainer"):
        _train(tmp_path / "run", 12, initial_checkpoint_path=initial, initial_optimizer_state=initial,
               on_validated=_never_called)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------ initial checks
def test_best_checkpoint_metric_defaults_to_the_task_tables_primary_metric():
    assert best_checkpoint.default_eval_metric(["gqa_cnn_dailymail"]) == "gqa_cnn_dailymail/rouge1"
    assert best_checkpoint.default_eval_metric(["gqa_wmt14_ende"]) == "gqa_wmt14_ende/bleu"
    assert best_checkpoint.default_eval_metric(["gqa_triviaqa"]) == "gqa_triviaqa/f1"
    with pytest.raises(ValueError, match="runs 2 tasks.*set EVAL_METRIC='task/metric'"):
        best_checkpoint.default_eval_metric(["gqa_cnn_dailymail", "gqa_triviaqa"])
    with pytest.raises(ValueError, match="register_task"):
        best_checkpoint.default_eval_metric([TASK])
    with pytest.raises(ValueError, match="has no primary metric"):
        best_checkpoint.default_eval_metric(["gqa_c4_span_corruption"])
    lookup = best_checkpoint.lookup_metric
    assert lookup({"gqa_triviaqa": {"em": 1.0, "f1": 2.0}}, "gqa_triviaqa/f1") == 2.0
    assert lookup({"qa": {"em": 1.0, "f1": 2.0}}, "em") == 1.0
    with pytest.raises(KeyError, match="EVAL_METRIC='rougeL'"):
        lookup({"cnn": {"rouge1": 3.0}}, "rougeL")


def test_best_checkpoint_and_its_evaluation_survive_a_restart(tmp_path):
    def state(step):
        return ts.TrainState(step=jnp.asarray(step, jnp.int32), params={"w": jnp.full((2,), float(step))},
                             opt_state={"v": jnp.zeros((2,))})

    manager = ts.checkpoint_manager(tmp_path, max_to_keep=1, best_metric="score", async_save=False)
    for step, score in ((10, 2.0), (20, 5.0), (30, 3.0)):
        results = {"cnn": {"rouge1": score}}
        ts.save(manager, state(step), {"eval_metric": "rouge1", "eval_score": score,
                                       "eval_results": results}, metrics={"score": score})
    manager.close()
    reopened = ts.checkpoint_manager(tmp_path, max_to_keep=1, best_metric="score", async_save=False)
    best = ts.best_so_far(reopened)
    assert reopened.all_steps() == [20]
    assert best["step"] == 20 and best["eval_score"] == 5.0
    assert best["eval_results"] == {"cnn": {"rouge1": 5.0}}


class _ShapesOnly:
    """A reader's shape index, as `check_param_shapes` uses it."""

    def __init__(self, config: T5Config):
        self.config = config
        self._shapes = param_tree.param_shapes(config)

    def keys(self):
        return list(self._shapes)

    def shape(self, key):
        return self._shapes[key]


def test_parameter_shapes_are_compared_and_the_differing_field_and_macro_named():
    mha_implicit = T5Config(num_heads=4, num_kv_heads=None)
    # The same model (4 kv heads of 4), however written; dtype/dropout do not matter.
    initial_state.check_param_shapes(T5Config(num_heads=4, num_kv_heads=4, dropout_rate=0.0),
                                     _ShapesOnly(mha_implicit), "ckpt")
    with pytest.raises(ValueError) as raised:
        initial_state.check_param_shapes(T5Config(num_heads=4, num_kv_heads=2),
                                         _ShapesOnly(mha_implicit), "ckpt")
    message = str(raised.value)
    assert "num_kv_heads: model gin 2 vs checkpoint 4 (= num_heads, multi-head) (gin macro NUM_KV_HEADS)" in message
    assert "decoder/layers_0/self_attention/key/kernel: model (512, 128) vs checkpoint (512, 256)" in message
    with pytest.raises(ValueError, match=r"mlp_dim: model gin 1024 vs checkpoint 2048(?! \(gin)"):
        initial_state.check_param_shapes(T5Config(num_heads=4, mlp_dim=1024),
                                         _ShapesOnly(mha_implicit), "ckpt")


@pytest.mark.slow  # 18 s: two lowerings and a compilation of a train step with dropout
def test_the_compiled_step_takes_the_dropout_key_as_an_argument_so_runs_of_other_seeds_share_its_program():
    from gqa_t5x.training import partitioning

    config = tiny_config(dropout_rate=0.3)  # dropout on: the key must change the step's result
    model = models.EncoderDecoderModel(network.Transformer(config))
    optimizer = optimizers.adafactor()
    partitioner = partitioning.Partitioner(num_partitions=1)
    params = model.get_initial_params(jax.random.PRNGKey(0))

    def fresh_state() -> ts.TrainState:
        copied = jax.tree_util.tree_map(jnp.copy, params)  # the step donates its state
        return ts.TrainState(step=jnp.asarray(0, jnp.int32), params=copied, opt_state=optimizer.init(copied))

    shardings = jax.tree_util.tree_map(lambda _: partitioner.replicated, fresh_state())
    step = trainer.compile_train_step(model, optimizer, optimizers.constant_schedule(0.01), shardings, partitioner)
    rng = np.random.default_rng(0)
    targets = rng.integers(2, config.vocab_size, (2, 5)).astype(np.int32)
    batch = {"encoder_input_tokens": rng.integers(2, config.vocab_size, (2, 7)).astype(np.int32),
             "decoder_target_tokens": targets,
             "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
             "decoder_loss_weights": np.ones((2, 5), np.float32)}
    seed_1, seed_2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    # One program for every seed: the persistent compilation cache serves the second run.
    assert step.lower(fresh_state(), batch, seed_1).as_text() == step.lower(fresh_state(), batch, seed_2).as_text()
    losses = [float(step(fresh_state(), batch, key)[1]["loss"]) for key in (seed_1, seed_2, seed_1)]
    assert losses[0] != losses[1] and losses[0] == losses[2]


def test_a_later_run_with_an_equal_model_and_the_same_optimizer_settings_reuses_the_compiled_step():
    from gqa_t5x.training import partitioning

    partitioner = partitioning.Partitioner(num_partitions=1)
    shardings = {"params": partitioner.replicated}

    def step_of(config: T5Config, learning_rate: float = 0.01, decay_rate: float = 0.8):
        model = models.EncoderDecoderModel(network.Transformer(config))  # a new model object per run
        return trainer.compile_train_step(model, optimizers.adafactor(decay_rate=decay_rate),
                                          optimizers.constant_schedule(learning_rate), shardings, partitioner)

    first = step_of(tiny_config())
    assert step_of(tiny_config()) is first  # traced and compiled once for both runs
    assert step_of(tiny_config(num_kv_heads=2)) is not first
    assert step_of(tiny_config(), learning_rate=0.02) is not first
    assert step_of(tiny_config(), decay_rate=0.7) is not first
    assert optimizers.adafactor() is optimizers.adafactor() and optimizers.rsqrt_schedule() is optimizers.rsqrt_schedule()
