"""README's paper-scale steps 1-4 with every path on gs://, against the emulator.

The same commands and flags as README (a tiny model, CPU-sized lengths and
batches, a few steps), with the checkpoints, MODEL_DIRs, the vocabulary (at
its gin default, gs://t5-data/...), the CNN/DailyMail sample and the
evaluation output on gs://:

1. `gqa-t5x convert` gs:// -> gs://;
2. uptraining with MODEL_DIR on gs://, run by the production gs:// clients
   (EPATH_USE_TF=true: epath and Orbax through tf.io.gfile), SIGKILLed after
   its first checkpoint, then rerun: it resumes from that checkpoint,
   ignores and removes a step directory a killed save left unmarked, and
   finishes;
3. fine-tuning from the uptrained gs:// checkpoint, keeping MODEL_DIR/best;
4. evaluation of the best checkpoint, metrics written to gs://;
and `--run_mode=infer` from gs:// inputs to gs:// predictions.

C4 stays local (`configs/uptrain_c4_sample.gin`, from ../shared).
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from conftest import GCS_TEST_BUCKET
from gqa_t5x import cli, gin_config
from gqa_t5x.experiments import stages
from gqa_t5x.storage import paths
from paths import REPO
from storage_utils import objects, save_random_checkpoint, start_blocked

pytestmark = [pytest.mark.gcs, pytest.mark.slow]

TINY = "gin/models/t5_1_1/tiny.gin"
VOCAB = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"  # the model gins' default


@pytest.fixture(scope="module")
def bucket(gcs_emulator, shared_dir) -> str:
    """gs://.../paper-<id>: a random tiny T5.1.1 at step 1000, the CNN sample;
    the T5 vocabulary at its default gs:// location."""
    root = f"gs://{GCS_TEST_BUCKET}/paper-{uuid.uuid4().hex[:6]}"
    gcs_emulator.create_bucket("t5-data")
    paths.replace_file(VOCAB, (shared_dir / "fixtures" / "t5_vocab" / "cc_all.32000.sentencepiece.model").read_bytes())
    cnn = (shared_dir / "data" / "cnn_dailymail" / "validation.jsonl").read_text().splitlines(keepends=True)
    paths.replace_file(f"{root}/data/cnn_dailymail/validation.jsonl", "".join(cnn[:24]))
    config = gin_config.model_config_from_gin(str(REPO / TINY)).replace(dtype="float32")
    save_random_checkpoint(f"{root}/t5_1_1_tiny/checkpoint_1000", config)
    return root


def _sizes(**overrides: str) -> list[str]:
    """CPU-sized lengths, batch and periods (what README's commands leave to the gins)."""
    flags = {"TASK_FEATURE_LENGTHS": "{'inputs': 32, 'targets': 8}", "BATCH_SIZE": "2",
             "ACTIVATION_DTYPE": "'float32'", "CHECKPOINT_PERIOD": "2", "LOG_EVERY": "1", **overrides}
    return [f"--gin.{k}={v}" for k, v in flags.items()]


@pytest.fixture(scope="module")
def converted(bucket) -> str:
    """README step 1: gqa-t5x convert gs:// -> gs://."""
    output = f"{bucket}/gqa2_tiny/checkpoint_1000"
    assert cli.main(["convert", "--source", f"{bucket}/t5_1_1_tiny/checkpoint_1000",
                     "--output", output, "--num_kv_heads", "2", "--method", "mean", "--no_progress"]) == 0
    return output


def _uptrain_flags(bucket: str, shared) -> list[str]:
    return [f"--gin_file={TINY}", "--gin_file=gin/runs/uptrain.gin", "--gin_file=configs/uptrain_c4_sample.gin",
            "--gin.NUM_KV_HEADS=2", f'--gin.MODEL_DIR="{bucket}/gqa2_tiny_uptrain"',
            f'--gin.INITIAL_CHECKPOINT_PATH="{bucket}/gqa2_tiny/checkpoint_1000"',
            f"--gin.C4_DIR='{shared / 'data' / 'c4' / 'en' / '3.0.1'}'", f"--gin.VOCAB_PATH='{VOCAB}'",
            *_sizes(UPTRAIN_ALPHA="0.000006"), "--run_mode=train"]


def test_readme_steps_1_to_4_on_gs(gcs_emulator, bucket, converted, shared_dir, tmp_path, capsys):
    # Step 2, first launch: killed once its first checkpoint is complete.
    model_dir = f"{bucket}/gqa2_tiny_uptrain"
    first = start_blocked(tmp_path, "gqa_t5x.training.train_state:save", 1, "main",
                          *_uptrain_flags(bucket, shared_dir), env={"EPATH_USE_TF": "true"})
    try:
        printed = first.wait()
        assert "BLOCKED save 1 _TfBackend" in printed  # the production client: tf.io.gfile
        assert f"initial_checkpoint {converted}: step 1000 -> 1006" in printed
        for _ in range(600):  # Orbax commits in the background: wait for its marker.
            if "checkpoint_1002/commit_success.txt" in objects(gcs_emulator, model_dir):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"checkpoint_1002 was never committed: {objects(gcs_emulator, model_dir)}")
    finally:
        first.kill()
    assert "config.gin" in objects(gcs_emulator, model_dir)
    # What a save killed half-way leaves on object storage: a step directory without its marker.
    paths.replace_file(f"{model_dir}/checkpoint_1004/state/_METADATA", "{half-written")

    # Step 2, rerun: resumes from checkpoint_1002, finishes at 1000 + 0.000006 * 1M.
    capsys.readouterr()
    assert cli.launcher_main(_uptrain_flags(bucket, shared_dir)) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"resumed from {model_dir}/checkpoint_1002: step 1002 -> 1006" in out
    names = objects(gcs_emulator, model_dir)
    assert {"checkpoint_1004/commit_success.txt", "checkpoint_1006/commit_success.txt"} <= set(names)
    assert paths.as_path(f"{model_dir}/checkpoint_1004/state/_METADATA").read_text() != "{half-written"
    assert any(n.startswith("train/events.out.tfevents") for n in names)  # TensorBoard, through tf.io.gfile
    uptrained = stages.latest_checkpoint(model_dir)
    assert uptrained == f"{model_dir}/checkpoint_1006"

    # Step 3: fine-tune on CNN/DailyMail (its sample on gs://), keeping the best checkpoint.
    cnn_dir, cnn_file = f"{bucket}/gqa2_tiny_cnn", f"{bucket}/data/cnn_dailymail/validation.jsonl"
    assert cli.launcher_main([
        f"--gin_file={TINY}", "--gin_file=gin/runs/finetune.gin", "--gin_file=gin/tasks/cnn_dailymail.gin",
        "--gin_file=configs/finetune_cnn_sample.gin", "--gin.NUM_KV_HEADS=2",
        f'--gin.INITIAL_CHECKPOINT_PATH="{uptrained}"', "--gin.TRAIN_STEPS=1008", f'--gin.MODEL_DIR="{cnn_dir}"',
        f"--gin.CNN_FILE='{cnn_file}'", f"--gin.VOCAB_PATH='{VOCAB}'",
        # No dropout: its RNG takes ~20 s to compile on CPU, and storage does not care.
        *_sizes(EVAL_PERIOD="2", NUM_EVAL_EXAMPLES="2", DROPOUT_RATE="0.0"), "--run_mode=train",
    ]) == 0, capsys.readouterr().err
    best = stages.latest_checkpoint(f"{cnn_dir}/best")
    assert best == f"{cnn_dir}/best/checkpoint_1008"
    logged = [json.loads(line) for line in paths.as_path(f"{cnn_dir}/eval/gqa_cnn_dailymail-metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1008] and "rouge1" in logged[0]

    # Step 4: evaluate the best checkpoint, metrics to gs://.
    assert cli.launcher_main([
        f"--gin_file={TINY}", "--gin_file=gin/runs/eval.gin", "--gin_file=gin/tasks/cnn_dailymail.gin",
        f'--gin.CHECKPOINT_PATH="{best}"', f'--gin.EVAL_OUTPUT_DIR="{cnn_dir}/eval"',
        f"--gin.tasks.cnn_dailymail_data.files={{'validation': '{cnn_file}'}}",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.BATCH_SIZE=2",
        "--gin.NUM_EVAL_EXAMPLES=2", "--run_mode=eval",
    ]) == 0, capsys.readouterr().err
    result = json.loads(paths.as_path(f"{cnn_dir}/eval/metrics.json").read_text())
    assert result["checkpoint"] == best and result["step"] == 1008
    assert {"rouge1", "rouge2", "rougeLsum"} <= set(result["metrics"]["gqa_cnn_dailymail"])
    assert "config.gin" in objects(gcs_emulator, f"{cnn_dir}/eval")

    # And inference (--run_mode=infer): inputs from gs://, predictions to gs://.
    inputs = f"{bucket}/infer/inputs.jsonl"
    paths.replace_file(inputs, "".join(json.dumps({"inputs": t, "id": i}) + "\n" for i, t in enumerate(["a b c", "d e"])))
    assert cli.main(["infer", "--gin_file=gin/runs/infer.gin", f'--gin.CHECKPOINT_PATH="{best}"',
                     f'--gin.INPUT_FILE="{inputs}"', f'--gin.INFER_OUTPUT_DIR="{bucket}/infer/out"',
                     "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.BATCH_SIZE=2"]) == 0, \
        capsys.readouterr().err
    predictions = paths.as_path(f"{bucket}/infer/out/inputs-predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in predictions] == [0, 1]
    assert sorted(objects(gcs_emulator, f"{bucket}/infer/out")) == ["config.gin", "inputs-predictions.jsonl"]
