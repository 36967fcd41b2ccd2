"""Training: resumption after SIGKILL, NaN guard, uptraining and fine-tuning.

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

import numpy as np
import pytest

from gqa_t5x import checkpoints
from gqa_t5x.training import trainer
from gqa_t5x.model import param_tree
from training_utils import read_checkpoint_params, tiny_config

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
def test_sigkilled_run_resumes_to_bit_identical_parameters(tmp_path, monkeypatch):
    steps = 8
    killed_dir = tmp_path / "killed"
    # The three processes compile the same train step: share a compilation cache.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    # The uninterrupted reference runs alongside the run that gets killed.
    reference = subprocess.Popen(
        [sys.executable, str(TESTS / "training_utils.py"), "--model_dir", str(tmp_path / "ref"),
         "--steps", str(steps), "--checkpoint_period", "2", "--out", str(tmp_path / "ref.json")],
        env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    victim = subprocess.Popen(
        [sys.executable, str(TESTS / "training_utils.py"), "--model_dir", str(killed_dir),
         "--steps", str(steps), "--checkpoint_period", "2", "--out", str(tmp_path / "victim.json")],
        env=worker_env(GQA_TEST_SLOW_EXAMPLE_S="0.015"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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

    resumed = run_worker(killed_dir, tmp_path / "resumed.json", steps, checkpoint_period=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
    got = json.loads((tmp_path / "resumed.json").read_text())["runs"]["0:1,1"]
    want = json.loads((tmp_path / "ref.json").read_text())["runs"]["0:1,1"]
    assert got["start_step"] == max(done) and got["end_step"] == steps
    assert got["digest"] == want["digest"]
    # The resumed run saw the same batches: its losses are the reference's tail.
    np.testing.assert_array_equal(got["losses"], want["losses"][max(done):])


# ------------------------------------------------------------------- NaN guard
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
def test_uptrain_total_steps_adds_alpha_of_pretraining_to_the_checkpoint_step(tmp_path):
    config = tiny_config(num_kv_heads=2)
    params = param_tree.unflatten(
        {k: np.zeros(s, np.float32) for k, s in param_tree.param_shapes(config).items()})
    checkpoints.save(tmp_path / "checkpoint_1000000", config, params, step=1_000_000)
    assert trainer.uptrain_total_steps(str(tmp_path / "checkpoint_1000000")) == 1_050_000
    assert trainer.uptrain_total_steps(str(tmp_path / "checkpoint_1000000"), 0.1, 500_000) == 1_050_000
    with pytest.raises(ValueError, match="INITIAL_CHECKPOINT_PATH"):
        trainer.uptrain_total_steps(None)


def test_best_checkpoint_metric_defaults_to_the_tasks_primary_metric():
    lookup = trainer._lookup_metric
    assert lookup({"cnn": {"rouge2": 1.0, "rouge1": 3.0}}, None) == ("rouge1", 3.0)
    assert lookup({"wmt": {"bleu": 20.0}}, None) == ("bleu", 20.0)
    assert lookup({"qa": {"em": 1.0, "f1": 2.0}}, None) == ("f1", 2.0)
    assert lookup({"qa": {"em": 1.0, "f1": 2.0}}, "qa/em") == ("qa/em", 1.0)
    with pytest.raises(KeyError, match="EVAL_METRIC='rougeL'"):
        lookup({"cnn": {"rouge1": 3.0}}, "rougeL")
    with pytest.raises(KeyError, match="EVAL_METRIC=None"):
        lookup({"x": {"accuracy": 3.0}}, None)


def test_best_checkpoint_and_its_evaluation_survive_a_restart(tmp_path):
    import jax.numpy as jnp

    from gqa_t5x.training import train_state as ts

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


def test_initial_checkpoint_check_compares_kv_heads_in_effect_and_names_the_macro():
    from gqa_t5x.training import trainer
    from gqa_t5x.model.config import T5Config

    mha_implicit = T5Config(num_heads=4, num_kv_heads=None)
    mha_explicit = T5Config(num_heads=4, num_kv_heads=4)
    trainer._check_config(mha_explicit, mha_implicit, "ckpt")  # the same model
    with pytest.raises(ValueError, match="num_kv_heads: model gin 2 vs checkpoint 4 \\(gin macro NUM_KV_HEADS\\)"):
        trainer._check_config(T5Config(num_heads=4, num_kv_heads=2), mha_implicit, "ckpt")
