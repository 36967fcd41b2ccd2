"""gs:// against a real GCS emulator on loopback (fake-gcs-server, see conftest).

What a user on object storage relies on: every client reaches the same
bucket (our path layer through gcsfs, tensorstore, TensorFlow), nothing is
ever written to a local `gs:` directory, checkpoints converted and exported
gs:// -> gs:// read back equal, a write killed half-way is refused by readers
and cleaned up by the next write, and sweeps and reports keep their files
on gs://.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from gqa_t5x import checkpoints, cli, storage
from gqa_t5x.storage import paths
from storage_utils import objects, save_random_checkpoint, start_blocked
from training_utils import tiny_config

pytestmark = pytest.mark.gcs

# ------------------------------------------------------------------ clients
def test_every_client_reaches_the_emulator_and_nothing_is_written_locally(gcs_emulator, gcs_dir, tmp_path, monkeypatch):
    import tensorflow as tf
    import tensorstore as ts
    from etils import epath

    monkeypatch.chdir(tmp_path)
    # STORAGE_EMULATOR_HOST switched epath's gs:// client to gcsfs.
    assert os.environ["EPATH_USE_TF"] == "false"
    assert "FileSystemSpec" in type(epath.Path(gcs_dir)._backend).__name__
    paths.replace_file(f"{gcs_dir}/ours.txt", "path layer")
    with tf.io.gfile.GFile(f"{gcs_dir}/tf.txt", "w") as f:
        f.write("tensorflow")
    store = ts.KvStore.open(paths.kvstore_spec(gcs_dir + "/")).result()  # a prefix: keys are appended
    store["ts.txt"] = b"tensorstore"
    assert objects(gcs_emulator, gcs_dir) == ["ours.txt", "tf.txt", "ts.txt"]
    assert tf.io.gfile.GFile(f"{gcs_dir}/ours.txt").read() == "path layer"
    assert paths.as_path(f"{gcs_dir}/tf.txt").read_text() == "tensorflow"
    assert bytes(store["ours.txt"]) == b"path layer"
    assert paths.listdir(gcs_dir) == ["ours.txt", "tf.txt", "ts.txt"]
    assert list(tmp_path.iterdir()) == []  # no local ./gs:/... directory


def test_files_appear_whole_or_not_at_all_on_gs(gcs_emulator, gcs_dir):
    target = f"{gcs_dir}/run/metrics.json"
    paths.replace_file(target, "old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with paths.replacing(target) as f:
            f.write("half of the new")
            raise RuntimeError("interrupted")
    assert paths.as_path(target).read_text() == "old"
    assert objects(gcs_emulator, gcs_dir) == ["run/metrics.json"]  # no temporary object left
    with paths.replacing(target) as f:
        f.write("new ")
        f.write("whole")
    assert paths.as_path(target).read_text() == "new whole"
    assert objects(gcs_emulator, gcs_dir) == ["run/metrics.json"]


# -------------------------------------------------------------- checkpoints
@pytest.mark.slow
def test_convert_gs_to_gs_reads_back_and_exports_from_gs(gcs_emulator, gcs_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    source, output, hf = f"{gcs_dir}/mha/checkpoint_1000", f"{gcs_dir}/gqa2/checkpoint_1000", f"{gcs_dir}/gqa2_hf"
    save_random_checkpoint(source, tiny_config())
    argv = ["convert", "--source", source, "--output", output, "--num_kv_heads", "2", "--no_progress"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    local = tmp_path / "local_gqa2"
    assert cli.main([*argv[:3], "--output", str(local), *argv[5:]]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local_gqa2"]  # nothing in ./gs:/...
    names = objects(gcs_emulator, output)
    assert "gqa_t5x_checkpoint.json" in names and storage.WRITER_FILE not in names
    with checkpoints.open_checkpoint(output) as remote, checkpoints.open_checkpoint(local) as reference:
        assert (remote.format, remote.step, remote.config.num_kv_heads) == ("gqa_t5x", 1000, 2)
        assert remote.manifest["params"] == reference.manifest["params"]  # every shape and crc32
        key = "decoder/layers_0/self_attention/key/kernel"  # a converted one, read (and checked) from gs://
        np.testing.assert_array_equal(remote.read(key), reference.read(key))

    export = ["export", "--checkpoint", output, "--format", "huggingface", "--no_progress", "--weights_only"]
    assert cli.main([*export, "--output", hf]) == 0
    assert cli.main([*export, "--output", str(tmp_path / "local_hf")]) == 0
    files = sorted(objects(gcs_emulator, hf))
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    for name in files:
        assert paths.as_path(f"{hf}/{name}").read_bytes() == (tmp_path / "local_hf" / name).read_bytes(), name
    with checkpoints.open_checkpoint(hf) as reader:
        assert reader.format == "huggingface" and reader.read(key).shape == (16, 16)  # kv heads repeated for HF


@pytest.mark.slow
def test_killed_convert_on_gs_is_refused_then_cleaned_by_the_rerun(gcs_emulator, gcs_dir, tmp_path, caplog, capsys):
    source, output = f"{gcs_dir}/mha/checkpoint_1000", f"{gcs_dir}/gqa2/checkpoint_1000"
    save_random_checkpoint(source, tiny_config())
    argv = ["convert", "--source", source, "--output", output, "--num_kv_heads", "2", "--no_progress"]
    command = start_blocked(tmp_path, "gqa_t5x.checkpoints.zarr_io:write_zarr", 3, "gqa-t5x", *argv)
    try:
        command.wait()
    finally:
        command.kill()
    left = objects(gcs_emulator, output)
    assert storage.WRITER_FILE in left and "gqa_t5x_checkpoint.json" not in left
    assert sum(name.endswith("/.zarray") for name in left) == 3  # killed after 3 of its arrays
    with pytest.raises(checkpoints.IncompleteCheckpointError, match="still being written by pid .* or that write was killed"):
        checkpoints.open_checkpoint(output)

    with caplog.at_level(logging.WARNING, logger="gqa_t5x.storage.atomic"):
        assert cli.main(argv) == 0, capsys.readouterr().err
    assert f"Removed 1 leftover(s) of killed writes to {output}" in caplog.text
    names = objects(gcs_emulator, output)
    assert storage.WRITER_FILE not in names and "gqa_t5x_checkpoint.json" in names
    with checkpoints.open_checkpoint(output) as reader:
        assert reader.config.num_kv_heads == 2


# ------------------------------------------------------ sweep and report
def test_sweep_and_report_keep_their_files_on_gs(gcs_emulator, gcs_dir, capsys):
    from gqa_t5x.experiments import stages
    from gqa_t5x.experiments.sweeps import sweep

    spec = sweep.SweepSpec(name="gs", model_gin="gin/models/t5_1_1/tiny.gin", base_checkpoint=f"{gcs_dir}/base",
                           num_kv_heads=(1,), methods=("mean",), alphas=(0.05,), tasks=("cnn_dailymail",))
    points = sweep.expand(spec, num_heads=4)
    runner = sweep.Runner(spec, f"{gcs_dir}/sweep", log=lambda _: None)
    for point, score in zip(points, (20.0, 18.0)):
        # Every stage finished earlier: the point only collects its markers.
        run_dir = runner.out / point.name
        paths.replace_file(run_dir / "convert.done.json", json.dumps({"checkpoint": f"{run_dir}/converted"}))
        paths.replace_file(run_dir / "uptrain.done.json", json.dumps({"checkpoint": f"{run_dir}/uptrain/checkpoint_5"}))
        paths.replace_file(run_dir / "eval_cnn_dailymail.done.json", json.dumps({"score": score}))
        paths.replace_file(run_dir / "timing.done.json", json.dumps({"time_per_sample": 0.5}))
        paths.replace_file(run_dir / "uptrain" / "checkpoint_5" / "state" / "x", "not searched for results")
    results, failed = runner.run(points)
    assert failed == [] and [r["scores"] for r in results] == [{"cnn_dailymail": 20.0}, {"cnn_dailymail": 18.0}]
    assert {n for n in objects(gcs_emulator, f"{gcs_dir}/sweep") if n.endswith("results.json")} == {
        "mha_a0/results.json", "g1_mean_a0.05/results.json"}
    assert stages.latest_checkpoint(f"{gcs_dir}/sweep/g1_mean_a0.05/uptrain") == f"{gcs_dir}/sweep/g1_mean_a0.05/uptrain/checkpoint_5"

    assert cli.main(["report", f"{gcs_dir}/sweep", "--output", f"{gcs_dir}/report"]) == 0
    printed = capsys.readouterr().out
    assert "| MHA |" in printed and "| MQA mean a=0.05 |" in printed
    assert f"table_md: {gcs_dir}/report/table1.md" in printed
    assert sorted(objects(gcs_emulator, f"{gcs_dir}/report")) == [
        "alpha.png", "methods.png", "quality_vs_time.png", "report.json", "table1.csv", "table1.md", "time_vs_groups.png"]
    report = json.loads(paths.as_path(f"{gcs_dir}/report/report.json").read_text())
    assert sorted(r["run_dir"] for r in report["runs"]) == [f"{gcs_dir}/sweep/g1_mean_a0.05", f"{gcs_dir}/sweep/mha_a0"]
