"""Tests of span corruption over a local text corpus (`gqa_corpus_span_corruption`).

Tiny gzip'd corpora are written here (no TFDS); the last test runs the
Wikipedia gin on the real sample in ../shared.
"""

from __future__ import annotations

import gzip
import json

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

from gqa_t5x.data import datasets
from gqa_t5x.data import tasks  # noqa: F401 (registers the tasks)
from gqa_t5x.data import vocabularies
from gqa_t5x.training import evaluation
from paths import REPO
from span_corruption_utils import undo_span_corruption

LENGTHS = {"inputs": 64, "targets": 14}  # span_corruption_lengths(64) == (70, 14)
WORDS = (
    "river stone light forest quiet morning bread window garden letter "
    "mountain silver thunder harbour candle meadow lantern orchard"
).split()


@pytest.fixture(autouse=True)
def vocab(shared_dir):
    gin.clear_config()
    path = shared_dir / "fixtures" / "t5_vocab" / "cc_all.32000.sentencepiece.model"
    gin.bind_parameter("gqa_t5x.data.vocabularies.vocabulary_path.path", str(path))
    yield vocabularies.get_vocabulary()
    gin.clear_config()


def _documents(count: int, seed: int) -> list[str]:
    rng = np.random.RandomState(seed)
    return [
        " ".join(rng.choice(WORDS, size=rng.randint(20, 40))).capitalize() + "."
        for _ in range(count)
    ]


def _write_jsonl_gz(path, documents, field="body") -> str:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(documents))
    return str(path)


def _write_tfrecord_gz(path, documents, field="body") -> str:
    with tf.io.TFRecordWriter(str(path), options="GZIP") as writer:
        for d in documents:
            feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[d.encode()]))
            writer.write(tf.train.Example(
                features=tf.train.Features(feature={field: feature})).SerializeToString())
    return str(path)


def _examples(split: str) -> list[dict]:
    ds = seqio.get_mixture_or_task("gqa_corpus_span_corruption").get_dataset(
        LENGTHS, split=split, shuffle=False, seed=0
    )
    return list(ds.as_numpy_iterator())


def test_corpus_task_span_corrupts_gzipped_files_like_c4(vocab, tmp_path):
    train = _documents(12, seed=0)
    validation = _documents(6, seed=1)
    gin.bind_parameter("gqa_t5x.data.tasks.corpus_data.files", {
        "train": _write_jsonl_gz(tmp_path / "train-00000-of-00001.jsonl.gz", train),
        "validation": _write_tfrecord_gz(tmp_path / "validation.tfrecord.gz", validation),
    })
    gin.bind_parameter("gqa_t5x.data.tasks.corpus_data.field_map", {"text": "body"})
    for split, documents in (("train", train), ("validation", validation)):
        examples = _examples(split)
        lengths = [(len(e["inputs"]), len(e["targets"])) for e in examples]
        # Every segment but the last is full: 70 tokens -> 64 inputs, 14 targets.
        assert lengths[:-1] == [(64, 14)] * (len(examples) - 1)
        assert lengths[-1][0] <= 64 and lengths[-1][1] <= 14
        first_sentinel = vocab.vocab_size - 1
        assert all(first_sentinel in e["inputs"] and e["targets"][0] == first_sentinel
                   for e in examples)
        # Inputs + targets give back the documents' tokens, concatenated.
        restored = np.concatenate(
            [undo_span_corruption(e["inputs"], e["targets"], vocab)[0] for e in examples])
        expected = np.concatenate([vocab.encode(d) for d in documents])
        np.testing.assert_array_equal(restored, expected)


def test_held_out_loss_of_the_corpus_validation_split_counts_every_target_token(tmp_path):
    gin.bind_parameter("gqa_t5x.data.tasks.corpus_data.files", {
        "validation": _write_jsonl_gz(tmp_path / "validation.jsonl.gz", _documents(6, seed=2),
                                      field="text"),
    })
    cfg = datasets.DatasetConfig(
        "gqa_corpus_span_corruption", LENGTHS, "validation", 4, shuffle=False
    )
    evaluator = evaluation.make_evaluator(cfg, None)

    def one_nat_per_token(dataset, model_feature_shapes=None):
        return [(int(i), -float(np.sum(f["decoder_loss_weights"])))
                for i, f in dataset.as_numpy_iterator()]

    all_metrics, _ = evaluator.evaluate(compute_metrics=True, step=0, score_fn=one_nat_per_token)
    result = all_metrics.result()["gqa_corpus_span_corruption"]
    assert result["cross_ent_loss"] == pytest.approx(1.0, abs=1e-12)
    assert result["perplexity"] == pytest.approx(np.e, abs=1e-9)


@pytest.mark.slow
def test_wikipedia_gin_reads_the_shared_sample_and_c4_validation(monkeypatch):
    if not (REPO.parent / "shared" / "data" / "wikipedia_en").is_dir():
        pytest.skip("../shared/data/wikipedia_en is not next to the repository")
    monkeypatch.chdir(REPO)
    gin.clear_config()  # The gin file sets VOCAB_PATH itself.
    gin.parse_config_file(str(REPO / "gin" / "tasks" / "wikipedia_span_corruption.gin"))
    name = gin.query_parameter("%MIXTURE_OR_TASK_NAME")
    lengths = gin.query_parameter("%TASK_FEATURE_LENGTHS")
    for task, split in ((name, "train"), (name, "validation"),
                        ("gqa_c4_span_corruption", "validation")):
        ds = seqio.get_mixture_or_task(task).get_dataset(
            lengths, split=split, shuffle=False, seed=0
        )
        (example,) = list(ds.take(1).as_numpy_iterator())
        assert (len(example["inputs"]), len(example["targets"])) == (512, 114)
