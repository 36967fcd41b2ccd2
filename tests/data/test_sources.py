"""Tests of gqa_t5x/data/sources.py: how local files are read and shuffled."""

from __future__ import annotations

import json
from pathlib import Path

import gin
import pytest

from gqa_t5x.data import tasks  # noqa: F401 (registers the tasks)
from gqa_t5x.data.sources import ConfigurableDataSource, DataLocation, SourceSpec


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _corpus(tmp_path: Path, files: int = 4, docs: int = 60) -> str:
    for f in range(files):
        rows = [json.dumps({"text": f"file{f} doc{d}"}) for d in range(docs)]
        (tmp_path / f"train-{f:05d}.jsonl").write_text("\n".join(rows) + "\n")
    return str(tmp_path / "train-*.jsonl")


def _source(pattern: str, **location) -> ConfigurableDataSource:
    spec = SourceSpec(location="corpus_data", fields={"text": False}, splits=("train",))
    return ConfigurableDataSource(spec, lambda: DataLocation(files={"train": pattern}, **location),
                                  "gqa_t5x.data.tasks.corpus_data")


def _texts(source: ConfigurableDataSource, shuffle: bool, seed: int, n: int | None = None) -> list[str]:
    ds = source.get_dataset("train", shuffle=shuffle, seed=seed)
    texts = [x["text"].decode() for x in ds.as_numpy_iterator()]
    return texts[:n] if n else texts


def test_unshuffled_files_are_read_round_robin_one_document_at_a_time(tmp_path):
    texts = _texts(_source(_corpus(tmp_path, files=3, docs=5)), shuffle=False, seed=0)
    assert texts[:4] == ["file0 doc0", "file1 doc0", "file2 doc0", "file0 doc1"]
    assert len(texts) == 15


def test_each_seed_starts_with_other_documents_from_all_over_the_files(tmp_path):
    source = _source(_corpus(tmp_path))
    first = {seed: _texts(source, shuffle=True, seed=seed, n=40) for seed in (0, 1, 2)}
    for seed, texts in first.items():
        docs = [int(t.split("doc")[1]) for t in texts]
        # Not only the first documents of each file (the old cycle-16 / block-16 reading).
        assert max(docs) > 30, (seed, docs)
    overlap = len(set(first[0]) & set(first[1]))
    assert overlap < 20, overlap  # 40 of 240 documents each: ~7 shared by chance
    assert first[0] == _texts(source, shuffle=True, seed=0, n=40)  # deterministic per seed


def test_a_shuffled_pass_still_reads_every_document_once(tmp_path):
    texts = _texts(_source(_corpus(tmp_path)), shuffle=True, seed=3)
    assert sorted(texts) == sorted(f"file{f} doc{d}" for f in range(4) for d in range(60))


def test_shuffle_buffer_zero_shuffles_only_the_file_order(tmp_path):
    source = _source(_corpus(tmp_path, files=3, docs=5), shuffle_buffer_size=0)
    texts = _texts(source, shuffle=True, seed=0)
    assert [int(t.split("doc")[1]) for t in texts[:3]] == [0, 0, 0]


def test_a_negative_shuffle_buffer_is_refused_naming_the_binding(tmp_path):
    source = _source(_corpus(tmp_path, files=1, docs=2), shuffle_buffer_size=-1)
    with pytest.raises(ValueError, match=r"corpus_data\.shuffle_buffer_size=-1"):
        source.get_dataset("train", shuffle=True, seed=0)
