"""The training data cache: written once, read by global row, checked against the run.

A cache of the synthetic task (`training_utils.py`: 64 random examples,
packed into 58 rows of 32 + 8 tokens) is written once per module; the
tests read it the way hosts of a training job do.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gqa_t5x.data import cache
from gqa_t5x.data import cache_reader
from gqa_t5x.data import train_data
from training_utils import dataset_config, register_synthetic_task

BATCH = 8


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(cache dir, the rows seqio yields in one pass, in order)."""
    register_synthetic_task()
    path = tmp_path_factory.mktemp("cache") / "c"
    cache.write_cache(dataset_config(), str(path), rows_per_file=20, progress=False)
    rows = list(cache._stream(dataset_config(), 0, 1).as_numpy_iterator())
    return str(path), rows


def _stack(rows, keys):
    return {k: np.stack([r[k] for r in rows]) for k in keys}


def _equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_permutation_is_a_seeded_bijection_of_any_size():
    for size in (1, 2, 3, 17, 64, 1000, 4097):
        for epoch in (1, 2):
            p = cache_reader.permute(np.arange(size), size, seed=7, epoch=epoch)
            assert sorted(p.tolist()) == list(range(size)), (size, epoch)
    ten = np.arange(10)
    a = cache_reader.permute(ten, 10, seed=0, epoch=1)
    assert np.array_equal(a, cache_reader.permute(ten, 10, seed=0, epoch=1))
    assert not np.array_equal(a, cache_reader.permute(ten, 10, seed=0, epoch=2))
    assert not np.array_equal(a, cache_reader.permute(ten, 10, seed=1, epoch=1))
    assert not np.array_equal(a, ten)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        cache_reader.permute(np.array([10]), 10, seed=0, epoch=1)


def test_cache_holds_the_pipelines_rows_in_order_over_several_files(written):
    path, rows = written
    spec = json.loads((cache.read_spec(path)).to_json())
    assert spec["task"] == "gqa_test_synthetic" and spec["seed"] == 7 and spec["pack"] is True
    assert [f[0] for f in spec["features"]][:1] == ["encoder_input_tokens"]
    reader = cache_reader.CacheReader(path)
    assert reader.num_rows == len(rows) == 58
    assert len(cache.read_shard_record(path, reader.spec, 0).files) == 3  # 20 + 20 + 18 rows
    got = reader.read_cache_rows(np.array([57, 0, 21, 20, 19]))
    assert _equal(got, _stack([rows[i] for i in (57, 0, 21, 20, 19)], rows[0]))
    assert all(v.dtype == np.int32 for v in got.values())
    reader.close()


def test_global_batches_are_the_same_however_hosts_split_them_and_epochs_repeat_permuted(written):
    path, rows = written
    reader = cache_reader.CacheReader(path)
    steps = 16  # 128 rows: epoch 0, epoch 1 and part of epoch 2.
    splits = {
        "1 host": [np.arange(8)],
        "2 hosts": [np.arange(0, 4), np.arange(4, 8)],
        "4 hosts": [np.arange(i, i + 2) for i in range(0, 8, 2)],
    }
    seen = {}
    for name, hosts in splits.items():
        iterators = [cache_reader.host_batches(reader, start_row=0, batch_size=BATCH, host_rows=h)
                     for h in hosts]
        batches = []
        for _ in range(steps):
            parts = [next(it) for it in iterators]
            batches.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        for it in iterators:
            it.close()
        seen[name] = batches
    for name in ("2 hosts", "4 hosts"):
        assert all(_equal(a, b) for a, b in zip(seen[name], seen["1 host"])), name
    flat = {k: np.concatenate([b[k] for b in seen["1 host"]]) for k in rows[0]}
    epoch0 = {k: v[:58] for k, v in flat.items()}
    epoch1 = {k: v[58:116] for k, v in flat.items()}
    assert _equal(epoch0, _stack(rows, rows[0]))  # Epoch 0: the cache's order.
    key = lambda batch, i: b"".join(batch[k][i].tobytes() for k in sorted(batch))  # noqa: E731
    assert sorted(key(epoch1, i) for i in range(58)) == sorted(key(epoch0, i) for i in range(58))
    assert not _equal(epoch1, epoch0)  # Epoch 1: the same rows, permuted.
    reader.close()


def test_resuming_at_a_step_reads_no_row_before_it(written, monkeypatch):
    path, _ = written
    reader = cache_reader.CacheReader(path)
    run = cache_reader.host_batches(reader, start_row=0, batch_size=BATCH, host_rows=np.arange(8))
    from_start = [next(run) for _ in range(12)]
    run.close()
    requested: list[int] = []
    read = cache_reader.CacheReader.cache_rows

    def spy(self, global_rows):
        requested.extend(np.asarray(global_rows).tolist())
        return read(self, global_rows)

    monkeypatch.setattr(cache_reader.CacheReader, "cache_rows", spy)
    for step in (3, 7, 11):
        requested.clear()
        resumed = cache_reader.host_batches(reader, start_row=step * BATCH, batch_size=BATCH,
                                            host_rows=np.arange(8))
        assert _equal(next(resumed), from_start[step])
        resumed.close()
        assert min(requested) == step * BATCH, (step, min(requested))
    reader.close()


def test_a_cache_of_other_settings_or_missing_shards_is_an_error_naming_what_to_change(written, tmp_path):
    path, _ = written
    reader = cache_reader.CacheReader(path)
    reader.check_matches(dataset_config())
    with pytest.raises(cache.CacheError, match="RANDOM_SEED: cache 7 vs run 8"):
        reader.check_matches(dataset_config(seed=8))
    with pytest.raises(cache.CacheError, match="PACK: cache True vs run False"):
        reader.check_matches(dataset_config(pack=False))
    reader.close()
    with pytest.raises(cache.CacheError, match="holds no data cache.*gqa-t5x cache"):
        cache_reader.CacheReader(str(tmp_path / "nothing"))
    with pytest.raises(cache.CacheError, match="already holds a cache written for other settings"):
        cache.write_cache(dataset_config(seed=8), path, progress=False)
    half = str(tmp_path / "half")
    cache.write_cache(dataset_config(), half, num_shards=2, shard_index=0, progress=False)
    with pytest.raises(cache.CacheError, match=r"shard\(s\) 1 of 2 are not written.*--num_shards=2"):
        cache_reader.CacheReader(half)


@pytest.mark.slow
def test_shards_written_apart_interleave_row_by_row(written, tmp_path, capsys):
    _, _ = written
    path = str(tmp_path / "sharded")
    for shard in (1, 0):  # Any order, e.g. two workers.
        cache.write_cache(dataset_config(), path, num_shards=2, shard_index=shard, progress=False)
    cache.write_cache(dataset_config(), path, num_shards=2)  # Complete: nothing rewritten.
    assert capsys.readouterr().out.count("already complete") == 2
    streams = [list(cache._stream(dataset_config(), s, 2).as_numpy_iterator()) for s in (0, 1)]
    reader = cache_reader.CacheReader(path)
    assert reader.num_rows == 2 * min(map(len, streams))
    got = reader.read_cache_rows(np.arange(6))
    want = _stack([streams[g % 2][g // 2] for g in range(6)], streams[0][0])
    assert _equal(got, want)
    reader.close()


def test_training_input_opens_the_cache_when_set_and_says_so_when_streaming(written, monkeypatch):
    path, rows = written
    monkeypatch.setattr(train_data, "_advised", set())  # the streaming advice is given once per process
    data = train_data.open_train_data(dataset_config(cache_dir=path), start_row=16,
                                      host_rows=np.arange(4, 8), end_row=200)
    assert data.pipeline == "cache" and data.cache_fingerprint
    assert "from row 16" in data.notes[0] and "up to 4 epochs" in data.notes[1]
    assert _equal(next(data.batches), _stack(rows[20:24], rows[0]))
    data.close()
    stream = train_data.open_train_data(dataset_config(), start_row=16, host_rows=np.arange(8))
    assert stream.pipeline == "stream" and stream.cache_fingerprint is None
    assert "DATA_CACHE_DIR is not set" in stream.notes[0] and "gqa-t5x cache" in stream.notes[0]
    assert "re-reads and re-preprocesses the 16 rows" in stream.notes[0]
    stream.close()
    with pytest.raises(ValueError, match="set DATA_CACHE_DIR"):
        train_data.open_train_data(dataset_config(), start_row=0, host_rows=np.arange(4))
    previous = {"data_pipeline": "cache", "data_cache": "another"}
    data = train_data.open_train_data(dataset_config(cache_dir=path), start_row=0, host_rows=np.arange(8))
    with pytest.raises(cache.CacheError, match="Point DATA_CACHE_DIR at the cache the run started with"):
        train_data.check_resume(previous, data, dataset_config(cache_dir=path), 0)
    note = train_data.check_resume({"data_pipeline": "stream"}, data, dataset_config(cache_dir=path), 40)
    assert "continuing from the cache at row 40" in note
    data.close()


@pytest.mark.slow
def test_a_one_shard_c4_cache_holds_the_rows_a_single_host_stream_reads(shared_dir, tmp_path):
    import gin

    from gqa_t5x.data import datasets
    from gqa_t5x.data import tasks  # noqa: F401 (registers the C4 task)

    gin.clear_config()
    gin.bind_parameter("gqa_t5x.data.vocabularies.vocabulary_path.path",
                       str(shared_dir / "fixtures/t5_vocab/cc_all.32000.sentencepiece.model"))
    gin.bind_parameter("gqa_t5x.data.tasks.c4_data.tfds_builder_dir",
                       str(shared_dir / "data/c4/en/3.0.1"))
    cfg = datasets.DatasetConfig("gqa_c4_span_corruption", {"inputs": 32, "targets": 8}, "train",
                                 BATCH, seed=0, pack=True)
    try:
        cache.write_cache(cfg, str(tmp_path / "c4"), max_rows=48, progress=False)
        stream = datasets.numpy_batches(datasets.get_dataset(cfg))
        streamed = [next(stream) for _ in range(6)]
        stream.close()
    finally:
        gin.clear_config()
    reader = cache_reader.CacheReader(str(tmp_path / "c4"))
    assert reader.num_rows == 48
    for k, batch in enumerate(streamed):
        assert _equal(reader.read_cache_rows(np.arange(k * BATCH, (k + 1) * BATCH)), batch), k
    reader.close()


def test_cache_command_needs_a_training_gin_and_data_cache_dir(capsys):
    import gin

    from gqa_t5x import cli

    try:
        assert cli.main(["cache", "--gin_file=gin/models/t5_1_1/tiny.gin",
                         "--gin_file=gin/runs/uptrain.gin"]) == 2
        assert "DATA_CACHE_DIR is not set: pass --gin.DATA_CACHE_DIR=" in capsys.readouterr().err
        gin.clear_config()
        assert cli.main(["cache", "--gin_file=gin/models/t5_1_1/tiny.gin"]) == 2
        assert "configure no training run: include gin/runs/uptrain.gin" in capsys.readouterr().err
    finally:
        gin.clear_config()
