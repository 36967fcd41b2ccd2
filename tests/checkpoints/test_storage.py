"""The storage layer: gs:// URLs stay URLs, and directories appear whole or not at all."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from gqa_t5x import checkpoints, storage
from gqa_t5x.checkpoints import huggingface
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config
from gqa_t5x.storage import paths

SMALL = T5Config(
    vocab_size=64, emb_dim=8, num_heads=4, head_dim=3, mlp_dim=16,
    num_encoder_layers=1, num_decoder_layers=1,
)
URL = "gs://t5-data/pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000"


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return param_tree.unflatten(
        {k: rng.standard_normal(s).astype(np.float32) for k, s in param_tree.param_shapes(SMALL).items()}
    )


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _describe(path) -> str | None:
    return checkpoints.describe_existing(path)


# --------------------------------------------------------------------- paths
def test_gs_urls_are_never_turned_into_local_paths():
    path = paths.as_path(URL)
    assert str(path) == URL and paths.is_remote(path)
    assert str(paths.absolute(URL)) == URL  # epath's resolve() would prefix the cwd
    assert str(path / "target.encoder.x.kernel") == URL + "/target.encoder.x.kernel"
    assert str(path.parent) == URL.rsplit("/", 1)[0] and path.name == "checkpoint_1000000"
    assert paths.kvstore_spec(path / "a") == {
        "driver": "gcs", "bucket": "t5-data", "path": "pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000/a",
    }
    assert paths.is_same_or_inside(URL + "/out", URL) and not paths.is_same_or_inside(URL + "_2", URL)
    assert not paths.is_same_or_inside("/gs:/t5-data", "gs://t5-data")
    assert not paths.has_atomic_rename(URL)
    with pytest.raises(paths.RemotePathError, match=f"{URL}/model.bin: reading .bin needs a local file"):
        paths.local_file(URL + "/model.bin", purpose="reading .bin")
    with pytest.raises(paths.RemotePathError, match="no atomic rename"):
        paths.rename(URL, URL + "_old")


def test_local_paths_keep_todays_behaviour(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(paths.absolute("run/checkpoint_0")) == str(tmp_path / "run" / "checkpoint_0")
    assert not paths.is_remote("run") and paths.has_atomic_rename("run")
    assert paths.kvstore_spec("run/a") == {"driver": "file", "path": str(tmp_path / "run" / "a")}
    assert paths.is_same_or_inside("run/a/../a/b", "run/a")
    paths.write_file(tmp_path / "f.txt", "text")
    assert (tmp_path / "f.txt").read_text() == "text" and paths.listdir(tmp_path) == ["f.txt"]


def test_as_path_names_the_argument_it_rejects():
    with pytest.raises(ValueError, match="--output is empty"):
        paths.as_path("  ", name="--output")
    with pytest.raises(TypeError, match="--source must be a path.*got int"):
        paths.as_path(3, name="--source")


# ------------------------------------------------------------ publish by rename
def test_rename_publishing_stages_in_a_hidden_sibling_and_writes_the_marker_last(tmp_path):
    out = tmp_path / "out"
    with storage.AtomicDirectory(out, marker="done.json", describe=_describe) as target:
        assert target.path.parent == tmp_path and target.path.name.startswith(".out" + storage.STAGING_TAG)
        assert storage.writer_of(target.path).pid == os.getpid()
        paths.write_file(target.path / "data.bin", b"123")
        assert not out.exists()
        target.publish('{"ok": true}')
    assert sorted(os.listdir(out)) == ["data.bin", "done.json"]  # writer record removed
    assert os.listdir(tmp_path) == ["out"]


def test_unpublished_or_failed_directories_leave_nothing(tmp_path):
    with storage.AtomicDirectory(tmp_path / "a", marker="m", describe=_describe) as target:
        paths.write_file(target.path / "x", "x")
    with pytest.raises(RuntimeError):
        with storage.AtomicDirectory(tmp_path / "b", marker="m", describe=_describe) as target:
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_destination_checks_never_replace_other_files_and_need_overwrite_for_checkpoints(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(storage.DestinationExistsError, match="exists and is not a directory"):
        storage.AtomicDirectory(tmp_path / "file", marker="m", describe=_describe)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("keep me")
    with pytest.raises(storage.DestinationExistsError, match="holds no checkpoint"):
        storage.AtomicDirectory(tmp_path / "notes", marker="m", describe=_describe, overwrite=True)
    checkpoints.save(tmp_path / "ckpt", SMALL, _params())
    with pytest.raises(storage.DestinationExistsError, match="already holds a gqa_t5x checkpoint.*--overwrite"):
        storage.AtomicDirectory(tmp_path / "ckpt", marker="m", describe=_describe)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "file", "notes"]


# ------------------------------------------------- object-storage publishing
def test_marker_publishing_writes_in_place_and_readers_refuse_it_until_the_marker(tmp_path):
    """What gs:// does (no atomic rename), exercised on a local directory."""
    exported = huggingface.export_huggingface(tmp_path / "export", SMALL, _params())
    out = tmp_path / "out"
    with storage.AtomicDirectory(out, marker="config.json", describe=_describe, publish_by_rename=False) as target:
        assert target.path == paths.absolute(out)
        paths.write_file(out / "model.safetensors", (exported / "model.safetensors").read_bytes())
        paths.write_file(out / "config.json", (exported / "config.json").read_bytes())  # data complete...
        with pytest.raises(checkpoints.IncompleteCheckpointError, match=f"{out} is incomplete.*pid {os.getpid()}"):
            checkpoints.open_checkpoint(out)  # ...but the writer has not published it
        assert not checkpoints.is_checkpoint(out)
        (out / "config.json").unlink()
        target.publish((exported / "config.json").read_text())
    assert storage.WRITER_FILE not in os.listdir(out)
    with checkpoints.open_checkpoint(out) as reader:
        assert reader.format == "huggingface" and reader.config == SMALL


def test_a_killed_in_place_write_is_removed_by_the_next_write_which_says_so(tmp_path, caplog):
    out = tmp_path / "out"
    storage.AtomicDirectory(out, marker="m", describe=_describe, publish_by_rename=False)
    paths.write_file(out / "half.bin", b"...")
    record = json.loads((out / storage.WRITER_FILE).read_text())
    paths.write_file(out / storage.WRITER_FILE, json.dumps(dict(record, pid=_dead_pid())))  # "killed"
    with caplog.at_level(logging.WARNING, logger="gqa_t5x.storage"):
        again = storage.AtomicDirectory(out, marker="m", describe=_describe, publish_by_rename=False)
    assert os.listdir(out) == [storage.WRITER_FILE]
    assert [r.getMessage() for r in caplog.records] == [f"Removed 1 leftover(s) of killed writes to {out}: out"]
    again.publish("{}")
    assert sorted(os.listdir(out)) == ["m"]


def test_leftovers_of_live_writers_are_kept_and_reported(tmp_path, caplog):
    live = storage.AtomicDirectory(tmp_path / "out", marker="m", describe=_describe)
    with caplog.at_level(logging.WARNING, logger="gqa_t5x.storage"):
        assert storage.remove_leftovers(tmp_path / "out") == []
    assert live.path.is_dir()
    assert len(caplog.records) == 1 and f"being written by pid {os.getpid()}" in caplog.records[0].getMessage()
    live.abort()
    assert os.listdir(tmp_path) == []
