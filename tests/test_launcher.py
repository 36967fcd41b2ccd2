"""The launcher: gin layering, required macros, and real uptrain/finetune/eval.

The end-to-end tests run `python -m gqa_t5x.main` in subprocesses on the real
data samples in ../shared (skipped when absent): a tiny T5.1.1 converted to
GQA-2 uptrains on C4 span corruption, is fine-tuned on CNN/DailyMail with
ROUGE evaluation, and its checkpoint is evaluated with --run_mode=eval.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gqa_t5x import cli, gin_config

REPO = Path(__file__).resolve().parents[1]
TINY = "gin/models/t5_1_1/tiny.gin"
# One worker builds the module's converted / uptrained / fine-tuned runs (subprocess launches) once.
pytestmark = pytest.mark.xdist_group("launcher")


def launch(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "gqa_t5x.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------- configuration
def test_missing_required_macro_is_named(capsys, tmp_path):
    code = cli.launcher_main([f"--gin_file={TINY}", "--gin_file=gin/runs/uptrain.gin",
                          "--gin.INITIAL_CHECKPOINT_PATH='/nowhere'", "--run_mode=train"])
    assert code == 2
    err = capsys.readouterr().err
    assert "MODEL_DIR" in err and "--gin.MODEL_DIR" in err


def test_gqa_t5x_train_subcommand_forwards_to_the_launcher(capsys):
    from gqa_t5x import cli

    code = cli.main(["train", f"--gin_file={TINY}", "--gin_file=gin/runs/uptrain.gin"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("gqa-t5x train: error: Required gin macro(s) not set")
    assert "INITIAL_CHECKPOINT_PATH" in err and "MODEL_DIR" in err


def test_finetune_requires_train_steps_and_initial_checkpoint(capsys, tmp_path):
    code = cli.launcher_main([f"--gin_file={TINY}", "--gin_file=gin/runs/finetune.gin",
                          f"--gin.MODEL_DIR='{tmp_path}'", "--run_mode=train"])
    assert code == 2
    err = capsys.readouterr().err
    assert "INITIAL_CHECKPOINT_PATH" in err and "TRAIN_STEPS" in err
    assert not (tmp_path / "config.gin").exists()


def test_gin_search_paths_find_experiment_gins_outside_the_repo(capsys, tmp_path):
    (tmp_path / "exp.gin").write_text("MODEL_DIR = None\nBATCH_SIZE = 4\n")
    code = cli.launcher_main([f"--gin_file={TINY}", "--gin_file=gin/runs/finetune.gin",
                          "--gin_file=exp.gin", f"--gin_search_paths={tmp_path}",
                          "--gin.TRAIN_STEPS=10", "--run_mode=train"])
    assert code == 2  # INITIAL_CHECKPOINT_PATH is still required.
    assert "INITIAL_CHECKPOINT_PATH" in capsys.readouterr().err
    code = cli.launcher_main([f"--gin_file={TINY}", "--gin_file=missing_experiment.gin"])
    assert code == 2
    assert "missing_experiment.gin" in capsys.readouterr().err


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def converted(shared_dir, tmp_path_factory):
    """A random tiny T5.1.1 at step 1000, converted to GQA-2 (mean pooling)."""
    from gqa_t5x import checkpoints
    from gqa_t5x import conversion
    from gqa_t5x.model import initialization

    root = tmp_path_factory.mktemp("e2e")
    config = gin_config.model_config_from_gin(str(REPO / TINY)).replace(dtype="float32")
    checkpoints.save(root / "mha" / "checkpoint_1000", config, initialization.init_params(config, seed=0), step=1000)
    conversion.convert_checkpoint(root / "mha" / "checkpoint_1000", root / "gqa" / "checkpoint_1000", 2,
                                  progress=False)
    return root


def _data_flags(shared: Path) -> list[str]:
    """Points the experiment gins at `shared` (GQA_T5X_SHARED) instead of ../shared."""
    return [
        f"--gin.VOCAB_PATH='{shared / 'fixtures' / 't5_vocab' / 'cc_all.32000.sentencepiece.model'}'",
        f"--gin.C4_DIR='{shared / 'data' / 'c4' / 'en' / '3.0.1'}'",
        f"--gin.CNN_FILE='{shared / 'data' / 'cnn_dailymail' / 'validation.jsonl'}'",
    ]


def _scalars(event_dir: Path) -> dict[str, list[tuple[int, float]]]:
    import tensorflow as tf

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(event_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
                out.setdefault(value.tag, []).append((event.step, number))
    return out


@pytest.fixture(scope="module")
def uptrained(converted, shared_dir):
    model_dir = converted / "uptrain"
    proc = launch(f"--gin_file={TINY}", "--gin_file=gin/runs/uptrain.gin",
                  "--gin_file=configs/uptrain_c4_sample.gin", *_data_flags(shared_dir)[:2],
                  "--gin.NUM_KV_HEADS=2",
                  f"--gin.INITIAL_CHECKPOINT_PATH='{converted / 'gqa' / 'checkpoint_1000'}'",
                  f"--gin.MODEL_DIR='{model_dir}'", "--gin.UPTRAIN_ALPHA=0.00004",
                  "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
                  "--gin.LOG_EVERY=5", "--gin.CHECKPOINT_PERIOD=20", "--run_mode=train")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return model_dir, proc


@pytest.mark.slow
def test_uptrain_on_c4_sample_from_converted_checkpoint_lowers_the_loss(uptrained):
    model_dir, proc = uptrained
    assert "checkpoint_1000: step 1000 -> 1040" in proc.stdout
    assert sorted(p.name for p in model_dir.glob("checkpoint_*")) == ["checkpoint_1020", "checkpoint_1040"]
    config = (model_dir / "config.gin").read_text()
    assert "UPTRAIN_ALPHA = 4e-05" in config and "NUM_KV_HEADS = 2" in config
    scalars = _scalars(model_dir / "train")
    for tag in ("loss", "accuracy", "z_loss", "learning_rate", "timing/tokens_per_second",
                "timing/steps_per_second"):
        assert tag in scalars, sorted(scalars)
    losses = [v for _, v in scalars["loss"]]
    assert [s for s, _ in scalars["loss"]][-1] == 1040
    assert losses[-1] < losses[0] - 0.5, losses
    assert scalars["learning_rate"][0][1] == pytest.approx(0.01)  # 1/sqrt(max(1000, 1e4))


@pytest.fixture(scope="module")
def finetuned(uptrained, shared_dir):
    model_dir = uptrained[0].parent / "finetune"
    proc = launch(f"--gin_file={TINY}", "--gin_file=gin/runs/finetune.gin",
                  "--gin_file=configs/finetune_cnn_sample.gin", _data_flags(shared_dir)[0],
                  _data_flags(shared_dir)[2], "--gin.NUM_KV_HEADS=2",
                  f"--gin.INITIAL_CHECKPOINT_PATH='{uptrained[0] / 'checkpoint_1040'}'",
                  f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=1050",
                  "--gin.EVAL_PERIOD=5", "--gin.NUM_EVAL_EXAMPLES=8", "--run_mode=train")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return model_dir, proc


@pytest.mark.slow
def test_finetune_on_cnn_sample_writes_rouge_and_keeps_the_best_checkpoint(finetuned):
    model_dir, proc = finetuned
    lines = (model_dir / "eval" / "gqa_cnn_dailymail-metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1045, 1050]
    assert all("rouge1" in r and "rougeLsum" in r for r in records)
    best = list((model_dir / "best").glob("checkpoint_*"))
    assert len(best) == 1
    assert "DROPOUT_RATE = 0.1" in (model_dir / "config.gin").read_text()
    assert "[eval] step 1050" in proc.stdout
    assert "best         gqa_cnn_dailymail/rouge1" in proc.stdout


@pytest.mark.slow
def test_eval_run_mode_scores_a_training_checkpoint(finetuned, shared_dir, tmp_path):
    model_dir, _ = finetuned
    cnn = shared_dir / "data" / "cnn_dailymail" / "validation.jsonl"
    proc = launch(f"--gin_file={TINY}", "--gin_file=gin/runs/eval.gin", _data_flags(shared_dir)[0],
                  f"--gin.tasks.cnn_dailymail_data.files={{'validation': '{cnn}'}}",
                  f"--gin.CHECKPOINT_PATH='{model_dir / 'checkpoint_1050'}'",
                  f"--gin.EVAL_OUTPUT_DIR='{tmp_path}'", "--gin.NUM_EVAL_EXAMPLES=4",
                  "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 32}",
                  "--gin.BATCH_SIZE=4", "--run_mode=eval")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["step"] == 1050
    assert set(result["metrics"]["gqa_cnn_dailymail"]) >= {"rouge1", "rouge2", "rougeLsum"}
    assert (tmp_path / "config.gin").exists()


# ------------------------------------------------------- records and errors
def _train_in_process(model_dir: Path, initial: Path, shared: Path, *flags: str) -> int:
    return cli.launcher_main([
        f"--gin_file={TINY}", "--gin_file=gin/runs/uptrain.gin", "--gin_file=configs/uptrain_c4_sample.gin",
        *_data_flags(shared)[:2], "--gin.NUM_KV_HEADS=2", f"--gin.INITIAL_CHECKPOINT_PATH='{initial}'",
        f"--gin.MODEL_DIR='{model_dir}'", "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
        "--gin.BATCH_SIZE=2", "--gin.LOG_EVERY=1", *flags, "--run_mode=train",
    ])


@pytest.mark.slow
def test_train_refuses_an_initial_checkpoint_with_a_huge_value_in_one_line_and_the_flag_accepts_it(
        converted, shared_dir, tmp_path, capsys):
    from gqa_t5x import checkpoints

    config, params = checkpoints.load(converted / "gqa" / "checkpoint_1000")
    params["encoder"]["relpos_bias"]["rel_embedding"][0, 0] = 2e4
    initial = tmp_path / "bad" / "checkpoint_1000"
    checkpoints.save(initial, config, params, step=1000)
    code = _train_in_process(tmp_path / "run", initial, shared_dir, "--gin.TRAIN_STEPS=1001")
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("python -m gqa_t5x.main")]
    assert code == 2 and len(ours) == 1, err
    assert "parameter 'encoder/relpos_bias/rel_embedding' holds 1 implausibly large" in ours[0]
    assert "--allow_unusual_values" in ours[0]
    assert not (tmp_path / "run" / "config.gin").exists()
    code = _train_in_process(tmp_path / "run", initial, shared_dir, "--gin.TRAIN_STEPS=1001",
                             "--allow_unusual_values")
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoint_1001").is_dir()


@pytest.mark.slow
def test_rejected_relaunch_keeps_the_record_and_accepted_ones_keep_history(converted, shared_dir, tmp_path, capsys):
    model_dir = tmp_path / "run"
    initial = converted / "gqa" / "checkpoint_1000"
    assert _train_in_process(model_dir, initial, shared_dir, "--gin.TRAIN_STEPS=1001") == 0
    first = (model_dir / "config.gin").read_text()
    assert "TRAIN_STEPS = 1001" in first
    capsys.readouterr()
    # Invalid head count: refused before anything is written.
    assert _train_in_process(model_dir, initial, shared_dir, "--gin.TRAIN_STEPS=1002", "--gin.NUM_KV_HEADS=3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m gqa_t5x.main: error:") and "num_kv_heads=3" in err[-1], err
    assert (model_dir / "config.gin").read_text() == first
    assert sorted(p.name for p in model_dir.glob("config*.gin")) == ["config.gin"]
    # A valid relaunch records its own configuration and keeps the earlier one.
    assert _train_in_process(model_dir, initial, shared_dir, "--gin.TRAIN_STEPS=1002") == 0
    assert "TRAIN_STEPS = 1002" in (model_dir / "config.gin").read_text()
    kept = [p for p in model_dir.glob("config-*.gin")]
    assert len(kept) == 1 and kept[0].read_text() == first


@pytest.mark.parametrize("flag,needle", [
    ("--gin.MIXTURE_OR_TASK_NAME='no_such_task'", "no_such_task"),
    ("--gin.VOCAB_PATH='/nowhere/spiece.model'", "/nowhere/spiece.model"),
    ("--gin.CHECKPOINT_PERIODD=5", "did you mean --gin.CHECKPOINT_PERIOD?"),
])
def test_configuration_errors_are_one_line_with_exit_status_2(converted, shared_dir, tmp_path, capsys, flag, needle):
    code = _train_in_process(tmp_path / "run", converted / "gqa" / "checkpoint_1000", shared_dir,
                             "--gin.TRAIN_STEPS=1001", flag)
    err = capsys.readouterr().err
    assert code == 2, err
    ours = [line for line in err.splitlines() if line.startswith("python -m gqa_t5x.main")]
    assert len(ours) == 1 and needle in ours[0] and "Traceback" not in err, err
    assert not (tmp_path / "run" / "config.gin").exists()


@pytest.mark.slow
def test_python_dash_m_main_reports_a_bad_head_count_in_one_line(converted, tmp_path):
    proc = launch(f"--gin_file={TINY}", "--gin_file=gin/runs/uptrain.gin", "--gin.NUM_KV_HEADS=3",
                  f"--gin.INITIAL_CHECKPOINT_PATH='{converted / 'gqa' / 'checkpoint_1000'}'",
                  f"--gin.MODEL_DIR='{tmp_path}'", "--run_mode=train", timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "python -m gqa_t5x.main: error: num_heads=4 is not divisible by num_kv_heads=3"), proc.stderr


@pytest.mark.parametrize("fault", ["missing_field", "not_json"])
@pytest.mark.slow
def test_a_data_error_ends_the_process_promptly_every_time(converted, shared_dir, tmp_path, fault):
    """Six fine-tunes on a broken JSONL each exit non-zero within 45 s, with one message.

    About 9 s each in one process, 18 s on average beside the other test worker on
    2 cores (one took 30.5 s there); a hang meets the 60 s timeout instead. (Ten runs
    until 2026-12-08; three per fault keep the repetition for an intermittent hang at
    60% of the cost.)

    The bad record sits after good ones, so it is met inside the running
    tf.data pipeline (not by the up-front check of each file's first record),
    which used to leave the process hanging or aborting at exit.
    """
    import time

    good = {"article": "The cat sat on the mat. It was warm.", "highlights": "A cat sat."}
    lines = [json.dumps(good)] * 6
    lines.insert(4, json.dumps({"article": "no summary here"}) if fault == "missing_field" else "{not json")
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    spm = shared_dir / "fixtures" / "t5_vocab" / "cc_all.32000.sentencepiece.model"
    for attempt in range(3):  # 3 runs per fault kind: 6 in a row
        start = time.time()
        proc = launch(f"--gin_file={TINY}", "--gin_file=gin/runs/finetune.gin", "--gin_file=gin/tasks/cnn_dailymail.gin",
                      f"--gin.VOCAB_PATH='{spm}'", f"--gin.tasks.cnn_dailymail_data.files={{'train': '{data}'}}",
                      f"--gin.INITIAL_CHECKPOINT_PATH='{converted / 'gqa' / 'checkpoint_1000'}'",
                      "--gin.NUM_KV_HEADS=2", f"--gin.MODEL_DIR='{tmp_path / f'run{attempt}'}'",
                      "--gin.TRAIN_STEPS=1050", "--gin.BATCH_SIZE=2", "--gin.EVAL_PERIOD=None",
                      "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--run_mode=train", timeout=60)
        elapsed = time.time() - start
        assert proc.returncode in (1, 2), (attempt, proc.returncode, proc.stderr[-2000:])
        assert elapsed < 45, (attempt, elapsed)
        ours = [line for line in proc.stderr.splitlines() if line.startswith("python -m gqa_t5x.main:")]
        assert ours and f"{data}:5" in ours[0], proc.stderr[-2000:]
        assert "terminate called" not in proc.stderr and "Traceback" not in proc.stderr
