"""Where a task's raw examples come from: TFDS or local files, chosen in gin.

Each data set a task reads has a gin-configurable location
(`gqa_t5x.data.tasks.<location>`, made by `tasks.define_location`; the
built-in ones are module-level names of `tasks.py`) taking:

* `tfds_data_dir`: a local/gs:// TFDS data dir holding the prepared dataset
  (T5X's `--tfds_data_dir` / `seqio.set_tfds_data_dir_override` also works);
* `tfds_builder_dir`: one prepared dataset version directory
  (`dataset_info.json` + tfrecords), read with `tfds.builder_from_directory`;
* `files`: {split: file pattern} of JSON-lines or TFRecord (tf.train.Example)
  files, or for text pairs {split: [source file, target file]};
* `file_format`: 'jsonl', 'tfrecord' or 'text_pair' (default: from the name);
* `compression`: 'gzip' or 'none' (default: gzip for names ending in '.gz');
* `field_map`: {task field: field name in the files} (dotted paths such as
  'answers.text' reach into JSON objects);
* `shuffle_buffer_size`: records (documents) shuffled with the split's seed
  when the split is read shuffled (training), before any preprocessing
  (default 16384; 0 shuffles only the order of the files). Files are read
  round-robin, one record at a time, so a different seed starts the stream
  with different documents; without it every seed would begin with the
  first documents of each file (seqio's own buffer of 1,000 preprocessed
  examples holds only a few long documents).

`ConfigurableDataSource` resolves the location each time a dataset is built,
so bindings parsed after the tasks were registered apply. The file formats
are read by `readers.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import seqio
import tensorflow as tf

from gqa_t5x.data import preprocessors
from gqa_t5x.data import readers
from gqa_t5x.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class DataLocation:
    """Where one data set is read from; see the module docstring."""

    tfds_data_dir: str | None = None
    tfds_builder_dir: str | None = None
    files: Mapping[str, Any] | None = None
    file_format: str | None = None
    compression: str | None = None
    field_map: Mapping[str, str] | None = None
    shuffle_buffer_size: int = 16384


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """What a task reads.

    Attributes:
      location: Name of the gin-configurable location,
        `gqa_t5x.data.tasks.<location>` (e.g. 'cnn_dailymail_data').
      fields: {field: True if a list of strings, False if one string}; the
        examples the source yields have exactly these fields.
      splits: Splits the data set offers.
      tfds_name: TFDS dataset, or None when the data set is not in TFDS (then
        `files` must be set).
      from_tfds: Maps a TFDS example to `fields`.
      text_pair_fields: The two fields filled from line-aligned text files,
        or None when the data set is not read as text pairs.
    """

    location: str
    fields: Mapping[str, bool]
    splits: tuple[str, ...] = ("train", "validation", "test")
    tfds_name: str | None = None
    from_tfds: Callable[[dict], dict] | None = None
    text_pair_fields: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if not self.location.isidentifier():
            raise ValueError(
                f"SourceSpec.location={self.location!r} must be a Python "
                "identifier (it becomes the gin configurable "
                "gqa_t5x.data.tasks.<location>)."
            )
        if not self.fields or not self.splits:
            raise ValueError(
                f"SourceSpec {self.location!r} needs at least one field and split."
            )
        if self.text_pair_fields is not None and not set(self.text_pair_fields) <= set(
            self.fields
        ):
            raise ValueError(
                f"SourceSpec {self.location!r}: text_pair_fields "
                f"{self.text_pair_fields} must be among the fields {list(self.fields)}."
            )


class ConfigurableDataSource(seqio.DataSource):
    """A seqio DataSource reading TFDS or local files, chosen through gin.

    Bad locations raise errors naming the gin binding to change, bad records
    raise `DataError`; no dataset is ever silently empty.
    """

    def __init__(
        self, spec: SourceSpec, location_fn: Callable[[], DataLocation], binding: str
    ):
        """Creates the source.

        Args:
          spec: What the task reads.
          location_fn: The gin-configurable location (returns a DataLocation).
          binding: Its gin name, e.g. 'gqa_t5x.data.tasks.cnn_dailymail_data'.
        """
        self._spec = spec
        self._location_fn = location_fn
        self._binding = binding
        super().__init__(splits=spec.splits)

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"ConfigurableDataSource({self._binding})"

    def _where(self, argument: str) -> str:
        return f"{self._binding}.{argument}"

    def location(self) -> DataLocation:
        """Returns the validated location from the gin configuration."""
        loc = self._location_fn()
        chosen = [
            name
            for name in ("tfds_data_dir", "tfds_builder_dir", "files")
            if getattr(loc, name) is not None
        ]
        if len(chosen) > 1:
            raise ValueError(f"Set only one of {[self._where(n) for n in chosen]}.")
        if self._spec.tfds_name is None and chosen in ([], ["tfds_data_dir"]):
            raise ValueError(
                f"{self._spec.location} is not in TFDS: set {self._where('files')}"
                " = {'validation': '/path/to/*.jsonl', ...} (or 'tfrecord' "
                "files)."
            )
        if loc.files is not None:
            unknown = set(loc.files) - set(self._spec.splits)
            if unknown:
                raise ValueError(
                    f"{self._where('files')} names unknown split(s) "
                    f"{sorted(unknown)}; this data set has {list(self._spec.splits)}."
                )
        if loc.file_format is not None and loc.file_format not in readers.FORMATS:
            raise ValueError(
                f"{self._where('file_format')}={loc.file_format!r}; use one of "
                f"{readers.FORMATS}."
            )
        if not isinstance(loc.shuffle_buffer_size, int) or loc.shuffle_buffer_size < 0:
            raise ValueError(
                f"{self._where('shuffle_buffer_size')}={loc.shuffle_buffer_size!r} must be "
                "a non-negative integer (records; 0 shuffles only the files)."
            )
        if loc.compression is not None and loc.compression not in readers.COMPRESSIONS:
            raise ValueError(
                f"{self._where('compression')}={loc.compression!r}; use one of "
                f"{readers.COMPRESSIONS} (or None: gzip for names ending in '.gz')."
            )
        unknown = set(loc.field_map or {}) - set(self._spec.fields)
        if unknown:
            raise ValueError(
                f"{self._where('field_map')} maps unknown field(s) "
                f"{sorted(unknown)}; the task reads {sorted(self._spec.fields)}."
            )
        return loc

    def _check_split(self, split: str) -> None:
        if split not in self._spec.splits:
            raise ValueError(
                f"Unknown split {split!r} for {self._spec.location}; use one "
                f"of {list(self._spec.splits)}."
            )

    def _tfds_loader(self, loc: DataLocation) -> seqio.utils.LazyTfdsLoader:
        if loc.tfds_builder_dir is not None:
            loader = seqio.utils.LazyTfdsLoader(None, read_only=True)
            loader.override_data_dir(loc.tfds_builder_dir)  # Not --tfds_data_dir.
            return loader
        return seqio.utils.LazyTfdsLoader(
            self._spec.tfds_name,
            data_dir=loc.tfds_data_dir,
            read_only=loc.tfds_data_dir is not None,
        )

    def num_input_examples(self, split: str) -> int | None:
        loc = self.location()
        if loc.files is not None:
            return None
        try:
            return self._tfds_loader(loc).size(split)
        except (KeyError, ValueError):
            return None

    def list_shards(self, split: str) -> Sequence[str]:
        self._check_split(split)
        loc = self.location()
        if loc.files is not None:
            files, file_format = self._match_files(loc, split)
            return files[:1] if file_format == "text_pair" else files
        return [f.filename for f in self._tfds_loader(loc).files(split)]

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed: int | None = None,
        shard_info: seqio.ShardInfo | None = None,
        *,
        sequence_length: Mapping[str, int] | None = None,
        use_cached: bool = False,
        num_epochs: int | None = 1,
    ) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs  # Handled by the Task.
        self._check_split(split)
        loc = self.location()
        if loc.files is not None:
            return self._read_files(loc, split, shuffle, seed, shard_info)
        return self._read_tfds(loc, split, shuffle, seed, shard_info)

    def _read_tfds(self, loc, split, shuffle, seed, shard_info) -> tf.data.Dataset:
        where = loc.tfds_builder_dir or loc.tfds_data_dir or "the default data dir"
        try:
            ds = self._tfds_loader(loc).load(split, shuffle, seed, shard_info)
            empty = not list(ds.take(1))
        except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
            raise FileNotFoundError(
                f"Cannot read {self._spec.location} split {split!r} from TFDS "
                f"({where}): {str(e).rstrip('.')}. Prepare the dataset or point "
                f"{self._where('tfds_data_dir')} / {self._where('files')} at "
                "local data."
            ) from e
        if empty:
            raise DataError(
                f"Split {split!r} of {self._spec.location} in {where} is empty."
            )
        if self._spec.from_tfds is not None:
            ds = ds.map(self._spec.from_tfds, num_parallel_calls=tf.data.AUTOTUNE)
        preprocessors.require_features(ds, self._spec.fields, self._spec.location)
        return ds.map(lambda x: {k: x[k] for k in self._spec.fields})

    # ----------------------------- local files ------------------------------

    def _format(self, loc: DataLocation, pattern: Any) -> str:
        if loc.file_format is not None:
            return loc.file_format
        if not isinstance(pattern, str):
            return "text_pair"
        return readers.guess_format(pattern, self._binding)

    def _match_files(self, loc: DataLocation, split: str) -> tuple[list[str], str]:
        if split not in loc.files:
            raise ValueError(
                f"No files for split {split!r}: {self._where('files')} has "
                f"only {sorted(loc.files)}."
            )
        pattern = loc.files[split]
        file_format = self._format(loc, pattern)
        if file_format == "text_pair":
            pair = not isinstance(pattern, str) and len(pattern) == 2
            if self._spec.text_pair_fields is None or not pair:
                raise ValueError(
                    f"{self._where('files')}[{split!r}] = {pattern!r}: only "
                    "text-pair data sets (WMT) read two line-aligned files, "
                    "given as [source file, target file]; the others take one "
                    "pattern per split."
                )
            files = [tf.io.gfile.glob(p) for p in pattern]
            if any(len(f) != 1 for f in files):
                raise FileNotFoundError(
                    f"{self._where('files')}[{split!r}]: each of {pattern} must "
                    f"match exactly one file, matched {[len(f) for f in files]}."
                )
            return [f[0] for f in files], file_format
        if not isinstance(pattern, str):
            raise ValueError(
                f"{self._where('files')}[{split!r}] = {pattern!r} must be one "
                f"file pattern for {self._where('file_format')}={file_format!r}."
            )
        files = sorted(tf.io.gfile.glob(pattern))
        if not files:
            raise FileNotFoundError(
                f"{self._where('files')}[{split!r}] = {pattern!r} matches no file."
            )
        return files, file_format

    def _schema(self, loc: DataLocation) -> readers.RecordSchema:
        return readers.RecordSchema(
            fields=self._spec.fields,
            names={f: (loc.field_map or {}).get(f, f) for f in self._spec.fields},
            binding=self._binding,
            compression=loc.compression,
        )

    def _read_files(self, loc, split, shuffle, seed, shard_info) -> tf.data.Dataset:
        files, file_format = self._match_files(loc, split)
        schema = self._schema(loc)
        if file_format == "text_pair":
            ds = readers.text_pair_dataset(
                files, split, self._spec.text_pair_fields, schema
            )
            return (
                ds.shard(shard_info.num_shards, shard_info.index) if shard_info else ds
            )
        make_reader = {"jsonl": readers.jsonl_reader, "tfrecord": readers.tfrecord_reader}
        reader = make_reader[file_format](files, schema)
        ds = tf.data.Dataset.from_tensor_slices(files)
        if shard_info:
            if len(files) < shard_info.num_shards:
                raise ValueError(
                    f"{len(files)} file(s) for split {split!r} cannot be "
                    f"sharded {shard_info.num_shards} ways; give "
                    f"{self._where('files')} at least one file per host."
                )
            ds = ds.shard(shard_info.num_shards, shard_info.index)
        if shuffle:
            ds = ds.shuffle(len(files), seed=seed)
        # Round-robin over every file, one record at a time (deterministic).
        ds = ds.interleave(reader, cycle_length=max(1, len(files)), block_length=1)
        if shuffle and loc.shuffle_buffer_size:
            ds = ds.shuffle(loc.shuffle_buffer_size, seed=seed, reshuffle_each_iteration=True)
        return ds
