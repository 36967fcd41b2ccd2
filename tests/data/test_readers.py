"""Tests of the local-file readers: gzip'd JSON lines, TFRecords and text pairs.

They read through the registered tasks' data sources (raw fields, before
tokenization), so no vocabulary is needed.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import gin
import pytest
import seqio
import tensorflow as tf

from gqa_t5x.data import errors
from gqa_t5x.data import tasks  # noqa: F401 (registers the tasks)
from gqa_t5x.data.errors import DataError

ROWS = [{"article": f"Article {i}.", "highlights": f"Summary {i}."} for i in range(5)]


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _bind(location: str, **arguments) -> None:
    for argument, value in arguments.items():
        gin.bind_parameter(f"gqa_t5x.data.tasks.{location}.{argument}", value)


def _raw(task: str, split: str = "validation") -> list[dict]:
    source = seqio.get_mixture_or_task(task).source
    with errors.surface_data_errors():
        return [
            {k: v.decode() if isinstance(v, bytes) else [x.decode() for x in v]
             for k, v in ex.items()}
            for ex in source.get_dataset(split, shuffle=False).as_numpy_iterator()
        ]


def _jsonl_text(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _write_gzip(path: Path, text: str) -> str:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def _example(**fields: list[bytes]) -> bytes:
    return tf.train.Example(features=tf.train.Features(feature={
        name: tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
        for name, values in fields.items()
    })).SerializeToString()


def _write_tfrecords(path: Path, records: list[bytes], compression: str = "") -> str:
    with tf.io.TFRecordWriter(str(path), options=compression or None) as writer:
        for record in records:
            writer.write(record)
    return str(path)


def test_gzipped_jsonl_is_read_by_its_extension(tmp_path):
    path = _write_gzip(tmp_path / "validation-00000-of-00001.jsonl.gz", _jsonl_text(ROWS))
    _bind("cnn_dailymail_data", files={"validation": path})
    assert _raw("gqa_cnn_dailymail") == ROWS


def test_gzipped_tfrecord_shards_are_read_by_their_extension(tmp_path):
    records = [_example(utt=[b"Hi.", b"Yo."], speaker=[b"A", b"B"], summary=[b"Hello."])]
    for name in ("a.tfrecord.gz", "b.tfrecord-00000-of-00001.gz"):
        _write_tfrecords(tmp_path / name, records, "GZIP")
    _bind("mediasum_data", files={"validation": str(tmp_path / "*.tfrecord*.gz")})
    expected = {"utt": ["Hi.", "Yo."], "speaker": ["A", "B"], "summary": "Hello."}
    assert _raw("gqa_mediasum") == [expected, expected]


def test_gin_compression_and_file_format_read_files_whose_names_say_nothing(tmp_path):
    path = _write_gzip(tmp_path / "part-0", _jsonl_text(ROWS))
    _bind("cnn_dailymail_data", files={"validation": path}, file_format="jsonl",
          compression="gzip")
    assert _raw("gqa_cnn_dailymail") == ROWS


def test_gzipped_tfrecords_without_gz_in_the_name_are_read_with_gin_compression(tmp_path):
    path = _write_tfrecords(
        tmp_path / "c4.tfrecord", [_example(text=[b"Some text."])], "GZIP"
    )
    _bind("c4_data", files={"train": path}, compression="gzip")
    assert _raw("gqa_c4_span_corruption", "train") == [{"text": "Some text."}]


def test_gzipped_text_pairs_are_line_aligned(tmp_path):
    en = _write_gzip(tmp_path / "en.txt.gz", "Hello.\nThanks.\n")
    de = _write_gzip(tmp_path / "de.txt.gz", "Hallo.\nDanke.\n")
    _bind("wmt14_ende_data", files={"validation": [en, de]})
    assert _raw("gqa_wmt14_ende") == [
        {"en": "Hello.", "de": "Hallo."},
        {"en": "Thanks.", "de": "Danke."},
    ]


def test_a_plain_file_named_gz_is_an_error_naming_the_compression_binding(tmp_path):
    path = tmp_path / "cnn.jsonl.gz"
    path.write_text(_jsonl_text(ROWS))
    _bind("cnn_dailymail_data", files={"validation": str(path)})
    with pytest.raises(DataError, match=r"cnn\.jsonl\.gz.*read as gzip.*cnn_dailymail_data\.compression"):
        _raw("gqa_cnn_dailymail")


def test_a_gzipped_tfrecord_read_uncompressed_is_an_error_naming_the_binding(tmp_path):
    path = _write_tfrecords(tmp_path / "c4.tfrecord", [_example(text=[b"t"])], "GZIP")
    _bind("c4_data", files={"train": path})
    with pytest.raises(DataError, match=r"c4\.tfrecord: cannot be read as TFRecords.*c4_data\.compression"):
        _raw("gqa_c4_span_corruption", "train")


def test_unknown_compression_is_rejected_with_the_choices(tmp_path):
    _bind("cnn_dailymail_data", files={"validation": str(tmp_path / "x.jsonl")},
          compression="zip")
    with pytest.raises(ValueError, match=r"cnn_dailymail_data\.compression='zip'.*'gzip', 'none'"):
        _raw("gqa_cnn_dailymail")


def test_missing_field_in_a_later_gzipped_record_is_one_data_error_with_its_line(tmp_path):
    rows = [*ROWS[:3], {"article": "No summary."}]
    path = _write_gzip(tmp_path / "cnn.jsonl.gz", _jsonl_text(rows))
    _bind("cnn_dailymail_data", files={"validation": path})
    with pytest.raises(DataError) as raised:
        _raw("gqa_cnn_dailymail")
    message = str(raised.value)
    assert message.startswith(f"{path}:4: field 'highlights' (task field 'highlights') is missing")
    assert "gqa_t5x.data.tasks.cnn_dailymail_data.field_map" in message
    assert "Traceback" not in message and type(raised.value) is DataError


def test_tfrecord_feature_of_the_wrong_kind_is_an_error(tmp_path):
    record = tf.train.Example(features=tf.train.Features(feature={
        "text": tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
    })).SerializeToString()
    path = _write_tfrecords(tmp_path / "c4.tfrecord", [record])
    _bind("c4_data", files={"train": path})
    with pytest.raises(DataError, match=r"feature 'text' must hold exactly one bytes value"):
        _raw("gqa_c4_span_corruption", "train")
