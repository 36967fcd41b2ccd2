"""Two processes on localhost train as one 8-device job, and survive a kill.

The job is launched as on a TPU pod slice: `python -m gqa_t5x.main` with
`--multi_host --coordinator_address=127.0.0.1:PORT --process_count=2
--process_index=i` (through `launch_worker.py`, which can slow the data
down), each process with 4 simulated CPU devices, so the (data, model) =
(4, 2) mesh spans both processes and JAX's collectives between them run over
gloo. A tiny GQA-2 model uptrains on the shared C4 sample, read from a data
cache written once with `gqa-t5x cache`.

The reference is the same run in ONE process with 8 devices (same mesh
shape). The two-process run is SIGKILLed in one process after a checkpoint
(the other is then killed too, as a slice restart would), relaunched, and
must end where the reference ends: parameters and optimizer state equal to
float tolerance at every checkpoint, each checkpoint complete, summaries and
progress written by process 0 only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gqa_t5x import cli
from gqa_t5x import gin_config

from paths import REPO, TESTS

# One worker runs the module's job fixture once for both tests.
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.xdist_group("multiprocess_job")]

TINY = "gin/models/t5_1_1/tiny.gin"
WORKER = TESTS / "training" / "launch_worker.py"
START, STEPS = 1000, 1008
RTOL, ATOL = 1e-4, 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        # The relaunched processes reuse what the first ones compiled.
        JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=0",
        JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **extra,
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def job(shared_dir, tmp_path_factory):
    """The run's flags (minus MODEL_DIR): a converted tiny GQA-2 model and a C4 cache."""
    from gqa_t5x import checkpoints
    from gqa_t5x import conversion
    from gqa_t5x.model import initialization

    root = tmp_path_factory.mktemp("multiprocess")
    config = gin_config.model_config_from_gin(str(REPO / TINY)).replace(dtype="float32")
    checkpoints.save(root / "mha" / "checkpoint_1000", config,
                     initialization.init_params(config, seed=0), step=START)
    conversion.convert_checkpoint(root / "mha" / "checkpoint_1000",
                                  root / "gqa" / "checkpoint_1000", 2, progress=False)
    flags = [
        f"--gin_file={TINY}", "--gin_file=gin/runs/uptrain.gin",
        "--gin_file=configs/uptrain_c4_sample.gin",
        f"--gin.VOCAB_PATH='{shared_dir / 'fixtures/t5_vocab/cc_all.32000.sentencepiece.model'}'",
        f"--gin.C4_DIR='{shared_dir / 'data/c4/en/3.0.1'}'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
        f"--gin.DATA_CACHE_DIR='{root / 'cache'}'",
        "--gin.NUM_KV_HEADS=2", "--gin.NUM_PARTITIONS=2", "--gin.BATCH_SIZE=8",
        f"--gin.INITIAL_CHECKPOINT_PATH='{root / 'gqa' / 'checkpoint_1000'}'",
        f"--gin.TRAIN_STEPS={STEPS}", "--gin.CHECKPOINT_PERIOD=4", "--gin.LOG_EVERY=1",
    ]
    import gin

    try:
        assert cli.main(["cache", *flags, "--max_rows=64"]) == 0
    finally:
        gin.clear_config()
    return root, flags


def _launch(flags: list[str], model_dir: Path, devices: int, multi: tuple[int, int] | None = None,
            **env: str) -> subprocess.Popen:
    """Starts one process of the run (output in a log file beside MODEL_DIR)."""
    args = [sys.executable, str(WORKER), *flags, f"--gin.MODEL_DIR='{model_dir}'"]
    name = "single"
    if multi is not None:
        port, index = multi
        args += ["--multi_host", f"--coordinator_address=127.0.0.1:{port}",
                 "--process_count=2", f"--process_index={index}"]
        name = f"process{index}"
    log_path = model_dir.parent / f"{model_dir.name}-{name}-{time.time_ns()}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=REPO, env=_env(devices, model_dir.parent / "jax_cache", **env),
                                stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log_path
    return proc


def _log(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()


def _pair(flags, model_dir, **env) -> list[subprocess.Popen]:
    port = _free_port()
    return [_launch(flags, model_dir, 4, (port, i), **env) for i in (0, 1)]


def _wait_for_checkpoint(victims: list[subprocess.Popen], model_dir: Path, name: str) -> None:
    """Waits (up to 400 s) until `model_dir/name` exists while both processes run."""
    deadline = time.time() + 400
    while not (model_dir / name).is_dir():
        assert all(p.poll() is None for p in victims), _log(victims[0])[-3000:]
        assert time.time() < deadline, f"no {name} within 400 s"
        time.sleep(0.05)


def _steps(model_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in model_dir.glob("checkpoint_*")
                  if p.name.split("_")[1].isdigit())


def _state(checkpoint: Path) -> dict[str, np.ndarray]:
    """Every leaf (parameters, optimizer state, step) of a training checkpoint."""
    import jax
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(checkpoint / "state").item_metadata.tree
    args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(checkpoint / "state", restore_args=args)
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(restored)}


def _losses(event_file: Path) -> dict[int, float]:
    import tensorflow as tf

    out = {}
    for event in tf.compat.v1.train.summary_iterator(str(event_file)):
        for value in event.summary.value:
            if value.tag == "loss":
                assert event.step not in out, f"step {event.step} logged twice in {event_file}"
                out[event.step] = float(tf.make_ndarray(value.tensor))
    return out


def test_two_processes_match_one_process_and_resume_after_one_is_killed(job):
    root, flags = job
    ref_dir, mp_dir = root / "one_process", root / "two_processes"
    reference = _launch(flags, ref_dir, 8)
    victims = _pair(flags, mp_dir, GQA_TEST_SLOW_BATCH_S="0.5")
    _wait_for_checkpoint(victims, mp_dir, "checkpoint_1004")
    victims[1].send_signal(signal.SIGKILL)
    assert victims[1].wait() == -signal.SIGKILL
    try:  # Process 0 loses its peer mid-step; a slice restart kills it too.
        victims[0].wait(timeout=2)
    except subprocess.TimeoutExpired:
        victims[0].send_signal(signal.SIGKILL)
        victims[0].wait()
    killed_logs = [_log(p) for p in victims]
    done = max(_steps(mp_dir))
    assert 1004 <= done < STEPS, f"not interrupted mid-way: {_steps(mp_dir)}"

    resumed = _pair(flags, mp_dir)
    for proc in resumed:
        assert proc.wait(timeout=600) == 0, _log(proc)[-4000:]
    resumed_logs = [_log(p) for p in resumed]
    assert reference.wait(timeout=600) == 0, _log(reference)[-4000:]

    # Both processes restored the newest checkpoint; process 0 alone reports.
    assert f"checkpoint_{done}: step {done} -> {STEPS}" in resumed_logs[0]
    assert "[train] step" in killed_logs[0] and "[train] step" in resumed_logs[0]
    assert "[train] step" not in killed_logs[1] + resumed_logs[1]
    assert "reading the cache" in resumed_logs[0] and f"from row {(done - START) * 8}" in resumed_logs[0]

    # Parameters and optimizer state equal the one-process run at every checkpoint.
    common = sorted(set(_steps(mp_dir)) & set(_steps(ref_dir)))
    assert common[-1] == STEPS and any(s <= done for s in common), common
    for step in common:
        want, got = _state(ref_dir / f"checkpoint_{step}"), _state(mp_dir / f"checkpoint_{step}")
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=ATOL,
                                       err_msg=f"checkpoint_{step} {key}")

    # Checkpoints complete (no temporary directories), written once.
    assert not [p.name for p in mp_dir.iterdir() if "tmp" in p.name]
    for step in _steps(mp_dir):
        meta = json.loads((mp_dir / f"checkpoint_{step}" / "metadata" / "metadata").read_text())
        assert meta["data_pipeline"] == "cache" and meta["batch_size"] == 8
        assert (mp_dir / f"checkpoint_{step}" / "state").is_dir()
    assert sorted(p.name for p in mp_dir.glob("config*.gin")) == ["config.gin"]

    # Summaries: one event file per launch, from process 0; the resumed
    # launch logged each step after the checkpoint once, as the reference.
    pids = {str(victims[0].pid), str(resumed[0].pid)}
    events = sorted((mp_dir / "train").glob("events.out.tfevents.*"))
    assert len(events) == 2 and {e.name.split(".")[-3] for e in events} == pids, events
    reference_losses = _losses(next((ref_dir / "train").glob("events.out.tfevents.*")))
    resumed_losses = _losses(next(e for e in events if str(resumed[0].pid) in e.name))
    assert sorted(resumed_losses) == list(range(done + 1, STEPS + 1))
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(reference_losses[step], rel=1e-5)


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step_and_a_relaunch_finishes(job):
    root, flags = job
    mp_dir = root / "preempted"
    flags = [*flags, "--gin.trainer.train.preemption_check_period=2"]
    victims = _pair(flags, mp_dir, GQA_TEST_SLOW_BATCH_S="0.5")
    _wait_for_checkpoint(victims, mp_dir, "checkpoint_1004")
    victims[1].send_signal(signal.SIGTERM)  # Only process 1 is told.
    codes = [p.wait(timeout=300) for p in victims]
    logs = [_log(p) for p in victims]
    assert codes == [75, 75], logs[0][-3000:] + logs[1][-3000:]
    assert "SIGTERM received: finishing this step" in logs[1]
    stops = [re.search(r"stopped: preempted by (SIGTERM|another process's signal) at step (\d+): saved (\S+);",
                       log) for log in logs]
    assert all(stops), logs
    assert stops[0].group(1) == "another process's signal" and stops[1].group(1) == "SIGTERM"
    step = int(stops[0].group(2))
    assert step == int(stops[1].group(2)) and step % 2 == 0 and 1004 <= step < STEPS
    assert max(_steps(mp_dir)) == step and (mp_dir / f"checkpoint_{step}" / "state").is_dir()

    resumed = _pair(flags, mp_dir)
    for proc in resumed:
        assert proc.wait(timeout=600) == 0, _log(proc)[-4000:]
    assert f"checkpoint_{step}: step {step} -> {STEPS}" in _log(resumed[0])
    assert max(_steps(mp_dir)) == STEPS
