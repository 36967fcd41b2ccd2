"""Readers of local data files: JSON lines, TFRecords and line-aligned text.

Each reader turns files into examples holding exactly the fields a task reads
(a string, or a vector of strings for list fields). Formats:

* `jsonl`: one JSON object per line (`*.jsonl`, `*.json`); a field is found
  by its name in the files, and dotted names reach into nested objects
  ('answers.text');
* `tfrecord`: serialized `tf.train.Example`s with bytes features
  (`*.tfrecord`, `*.tfrecord-00000-of-00008`, ...);
* `text_pair`: two line-aligned text files (WMT's two sides).

A file whose name ends in `.gz` is read as gzip'd (`*.jsonl.gz`,
`*.tfrecord.gz`, `*.tfrecord-00000-of-00008.gz`); the location's
`compression` ('gzip' or 'none') overrides the names for all its files.

The first record of every file is checked before a dataset is returned, and
every later record as it is read: a missing or mistyped field, invalid JSON,
or a file that cannot be decompressed raises `DataError` naming the file, the
line and the gin binding to change (later records through `pipeline_error`,
see `errors.py`).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO, TextIO

import tensorflow as tf

from gqa_t5x.data.errors import DataError
from gqa_t5x.data.errors import pipeline_error

FORMATS = ("jsonl", "tfrecord", "text_pair")
COMPRESSIONS = ("gzip", "none")

ErrorFn = Callable[[str], DataError]


@dataclasses.dataclass(frozen=True)
class RecordSchema:
    """What the records of a data set must hold, and how to fix them.

    Attributes:
      fields: {task field: True if a list of strings, False if one string}.
      names: {task field: its name in the files} (after `field_map`).
      binding: The gin configurable of the data set's location, e.g.
        'gqa_t5x.data.tasks.cnn_dailymail_data'; messages name its arguments.
      compression: 'gzip' or 'none' for every file, or None to decide by each
        file's name ('.gz').
    """

    fields: Mapping[str, bool]
    names: Mapping[str, str]
    binding: str
    compression: str | None = None

    def is_gzip(self, path: str) -> bool:
        """Whether `path` is read through gzip."""
        if self.compression is None:
            return path.lower().endswith(".gz")
        return self.compression == "gzip"

    def tf_compression(self, path: tf.Tensor) -> tf.Tensor:
        """`compression_type` of TensorFlow's readers for a path tensor."""
        if self.compression is not None:
            return tf.constant("GZIP" if self.compression == "gzip" else "")
        gzipped = tf.strings.regex_full_match(tf.strings.lower(path), r".*\.gz")
        return tf.where(gzipped, "GZIP", "")

    def decompression_hint(self, path: str) -> str:
        """Why `path` was (not) decompressed and how to change it."""
        how = "gzip" if self.is_gzip(path) else "uncompressed"
        why = (
            "by its name ('.gz')"
            if self.compression is None
            else f"by {self.binding}.compression={self.compression!r}"
        )
        return (
            f"it was read as {how} {why}; set {self.binding}.compression to "
            f"one of {COMPRESSIONS} if that is wrong"
        )


def guess_format(pattern: str, binding: str) -> str:
    """The format of files named like `pattern` ('.gz' is ignored).

    Args:
      pattern: A file name or glob pattern.
      binding: The location's gin configurable (named in the error).

    Returns:
      'jsonl' or 'tfrecord'.
    """
    name = pattern.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if ".tfrecord" in name:
        return "tfrecord"
    raise ValueError(
        f"Cannot tell the format of {pattern!r} from its name; set "
        f"{binding}.file_format to one of {FORMATS}."
    )


def _open_binary(path: str, gzipped: bool) -> BinaryIO:
    raw = tf.io.gfile.GFile(path, "rb")  # Local or gs://.
    return gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw


def _open_text(path: str, gzipped: bool) -> TextIO:
    if gzipped:
        return io.TextIOWrapper(_open_binary(path, True), encoding="utf-8")
    return tf.io.gfile.GFile(path, "r")  # Decodes UTF-8.


def _lookup(record: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(record, dict) or part not in record:
            raise KeyError(path)
        record = record[part]
    return record


def _convert(
    record: Any, where: str, schema: RecordSchema, error: ErrorFn
) -> dict[str, Any]:
    """The task fields of one JSON record, checked."""
    out = {}
    for field, name in schema.names.items():
        try:
            value = _lookup(record, name)
        except KeyError:
            keys = sorted(record) if isinstance(record, dict) else []
            raise error(
                f"{where}: field {name!r} (task field {field!r}) is missing; "
                f"the record has {keys}. Map it with {schema.binding}.field_map."
            ) from None
        is_list = schema.fields[field]
        if is_list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, str)
        if not ok:
            kind = "a list of strings" if is_list else "a string"
            raise error(
                f"{where}: field {name!r} must be {kind}, not "
                f"{type(value).__name__}."
            )
        out[field] = value
    return out


def _jsonl_records(path: str, schema: RecordSchema, error: ErrorFn) -> Iterator[dict]:
    """Yields the checked task fields of every record of one JSON-lines file."""
    number = 0
    try:
        with _open_text(path, schema.is_gzip(path)) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise error(f"{where}: invalid JSON ({e}).") from None
                yield _convert(record, where, schema, error)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError.
        after = f" after line {number}" if number else ""
        raise error(
            f"{path}: cannot be read{after} ({e}); {schema.decompression_hint(path)}."
        ) from None
    except UnicodeDecodeError as e:
        after = f" after line {number}" if number else ""
        raise error(
            f"{path}: is not UTF-8 text{after} ({e}); {schema.decompression_hint(path)}."
        ) from None


def _require_records(found: bool, files: Sequence[str]) -> None:
    if not found:
        raise DataError(f"{list(files)} hold no records: the split is empty.")


def jsonl_reader(
    files: Sequence[str], schema: RecordSchema
) -> Callable[[tf.Tensor], tf.data.Dataset]:
    """Checks the first record of every file; returns path -> dataset.

    Args:
      files: The JSON-lines files of one split.
      schema: Fields to read.

    Returns:
      A function from a scalar string path tensor to the dataset of that
      file's records.
    """
    found = False
    for path in files:
        records = _jsonl_records(path, schema, DataError)
        found = next(records, None) is not None or found
        records.close()
    _require_records(found, files)
    signature = {
        field: tf.TensorSpec([None] if is_list else [], tf.string)
        for field, is_list in schema.fields.items()
    }
    return lambda path: tf.data.Dataset.from_generator(
        lambda p: _jsonl_records(p.decode(), schema, pipeline_error),
        output_signature=signature,
        args=(path,),
    )


def _check_example(raw: bytes, path: str, schema: RecordSchema) -> None:
    """Checks that the first record of `path` holds every field, typed right."""
    try:
        features = tf.train.Example.FromString(raw).features.feature
    except Exception as e:  # protobuf's DecodeError is not exported stably.
        raise DataError(
            f"{path}: record 1 is not a serialized tf.train.Example ({e})."
        ) from None
    for field, name in schema.names.items():
        if name not in features:
            raise DataError(
                f"{path}: tf.train.Example feature {name!r} (task field "
                f"{field!r}) is missing; it has {sorted(features)}. Map it "
                f"with {schema.binding}.field_map."
            )
        feature = features[name]
        count = len(feature.bytes_list.value)
        if feature.WhichOneof("kind") != "bytes_list" or (
            not schema.fields[field] and count != 1
        ):
            kind = "bytes (strings)" if schema.fields[field] else "exactly one bytes value"
            raise DataError(
                f"{path}: record 1: feature {name!r} must hold {kind}; it "
                f"holds {feature.WhichOneof('kind')} of "
                f"{count or 'other'} value(s)."
            )


def tfrecord_reader(
    files: Sequence[str], schema: RecordSchema
) -> Callable[[tf.Tensor], tf.data.Dataset]:
    """Checks the first record of every file; returns path -> dataset.

    Args:
      files: The TFRecord files of one split.
      schema: Fields to read (bytes features).

    Returns:
      A function from a scalar string path tensor to the dataset of that
      file's parsed records.
    """
    found = False
    for path in files:
        records = tf.data.TFRecordDataset(path, schema.tf_compression(tf.constant(path)))
        try:
            first = [raw.numpy() for raw in records.take(1)]
        except tf.errors.OpError as e:
            raise DataError(
                f"{path}: cannot be read as TFRecords ({e.message}); "
                f"{schema.decompression_hint(path)}."
            ) from None
        for raw in first:
            _check_example(raw, path, schema)
            found = True
    _require_records(found, files)
    description = {
        name: (
            tf.io.VarLenFeature(tf.string)
            if schema.fields[field]
            else tf.io.FixedLenFeature([], tf.string)
        )
        for field, name in schema.names.items()
    }

    def parse(raw: tf.Tensor) -> dict[str, tf.Tensor]:
        example = tf.io.parse_single_example(raw, description)
        return {
            field: (
                tf.sparse.to_dense(example[name])
                if schema.fields[field]
                else example[name]
            )
            for field, name in schema.names.items()
        }

    return lambda path: tf.data.TFRecordDataset(
        path, schema.tf_compression(path)
    ).map(parse)


def _count_lines(path: str, schema: RecordSchema) -> int:
    try:
        with _open_binary(path, schema.is_gzip(path)) as f:  # Lines as TextLineDataset.
            return sum(1 for _ in f)
    except (OSError, EOFError) as e:
        raise DataError(
            f"{path}: cannot be read ({e}); {schema.decompression_hint(path)}."
        ) from None


def text_pair_dataset(
    files: Sequence[str], split: str, fields: tuple[str, str], schema: RecordSchema
) -> tf.data.Dataset:
    """Pairs line i of `files[0]` with line i of `files[1]`.

    Args:
      files: [source side file, target side file].
      split: The split (named in errors).
      fields: The task fields the two files fill, in the order of `files`.
      schema: Compression and the binding named in errors.

    Returns:
      Dataset of {source field, target field} strings.
    """
    counts = [_count_lines(path, schema) for path in files]
    if counts[0] != counts[1]:
        raise DataError(
            f"{files[0]} has {counts[0]} lines but {files[1]} has {counts[1]}; "
            "text pairs must be line-aligned."
        )
    if counts[0] == 0:
        raise DataError(f"{list(files)} are empty: split {split!r} has no pairs.")
    source, target = fields
    sides = [
        tf.data.TextLineDataset(path, schema.tf_compression(tf.constant(path)))
        for path in files
    ]
    return tf.data.Dataset.zip(*sides).map(lambda s, t: {source: s, target: t})
