"""seqio tasks of the GQA paper, registered on import (see docs/data.md).

Tasks: `gqa_c4_span_corruption` (uptraining), `gqa_cnn_dailymail`,
`gqa_arxiv`, `gqa_pubmed`, `gqa_mediasum`, `gqa_multi_news` (ROUGE),
`gqa_wmt14_ende` (BLEU), `gqa_triviaqa` (F1/EM), and the mixture
`gqa_eval_mixture` of the seven evaluation tasks (equal rates).
`FEATURE_LENGTHS` holds the paper's lengths (use them as
`TASK_FEATURE_LENGTHS`); `gin/tasks/*.gin` sets both macros per task.

Where each data set is read from is decided when a dataset is built, by a
gin-configurable function per data set (`c4_data`, `cnn_dailymail_data`,
`arxiv_data`, `pubmed_data`, `mediasum_data`, `multi_news_data`,
`wmt14_ende_data`, `triviaqa_data`), each taking:

* `tfds_data_dir`: a local/gs:// TFDS data dir holding the prepared dataset
  (T5X's `--tfds_data_dir` / `seqio.set_tfds_data_dir_override` also works);
* `tfds_builder_dir`: one prepared dataset version directory
  (`dataset_info.json` + tfrecords), read with `tfds.builder_from_directory`;
* `files`: {split: file pattern} of JSON-lines or TFRecord (tf.train.Example)
  files, or for WMT {split: [English file, German file]} of line-aligned text;
* `file_format`: 'jsonl', 'tfrecord' or 'text_pair' (default: from the name);
* `field_map`: {task field: field name in the files} (dotted paths such as
  'answers.text' reach into JSON objects).

Example (gin): `gqa_t5x.data.tasks.cnn_dailymail_data.files =
{"validation": "/data/cnn_dailymail/validation.jsonl"}`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import seqio
import tensorflow as tf

from gqa_t5x.data import metrics
from gqa_t5x.data import preprocessors
from gqa_t5x.data import vocabularies

FEATURE_LENGTHS: dict[str, dict[str, int]] = {
    "gqa_c4_span_corruption": {"inputs": 512, "targets": 114},
    "gqa_cnn_dailymail": {"inputs": 512, "targets": 256},
    "gqa_arxiv": {"inputs": 2048, "targets": 512},
    "gqa_pubmed": {"inputs": 2048, "targets": 512},
    "gqa_mediasum": {"inputs": 2048, "targets": 512},
    "gqa_multi_news": {"inputs": 2048, "targets": 512},
    "gqa_wmt14_ende": {"inputs": 512, "targets": 256},
    "gqa_triviaqa": {"inputs": 2048, "targets": 32},
}
EVAL_TASKS = tuple(n for n in FEATURE_LENGTHS if n != "gqa_c4_span_corruption")
EVAL_MIXTURE = "gqa_eval_mixture"
_FORMATS = ("jsonl", "tfrecord", "text_pair")


@dataclasses.dataclass(frozen=True)
class DataLocation:
    """Where one data set is read from; see the module docstring."""

    tfds_data_dir: str | None = None
    tfds_builder_dir: str | None = None
    files: Mapping[str, Any] | None = None
    file_format: str | None = None
    field_map: Mapping[str, str] | None = None


def _location_configurable(gin_name: str, dataset: str) -> Callable[..., DataLocation]:
    """Creates the gin-configurable function `gqa_t5x.data.tasks.<gin_name>`."""

    def location(
        tfds_data_dir: str | None = None,
        tfds_builder_dir: str | None = None,
        files: Mapping[str, Any] | None = None,
        file_format: str | None = None,
        field_map: Mapping[str, str] | None = None,
    ) -> DataLocation:
        return DataLocation(
            tfds_data_dir, tfds_builder_dir, files, file_format, field_map
        )

    location.__name__ = location.__qualname__ = gin_name
    location.__doc__ = (
        f"Returns where {dataset} is read from (bind the arguments in gin); "
        "see the module docstring for what each argument means."
    )
    return gin.configurable(gin_name, module="gqa_t5x.data.tasks")(location)


c4_data = _location_configurable("c4_data", "C4")
cnn_dailymail_data = _location_configurable("cnn_dailymail_data", "CNN/DailyMail")
arxiv_data = _location_configurable("arxiv_data", "arXiv")
pubmed_data = _location_configurable("pubmed_data", "PubMed")
mediasum_data = _location_configurable("mediasum_data", "MediaSum")
multi_news_data = _location_configurable("multi_news_data", "Multi-News")
wmt14_ende_data = _location_configurable("wmt14_ende_data", "WMT14 En-De")
triviaqa_data = _location_configurable("triviaqa_data", "TriviaQA")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """What a task reads.

    Attributes:
      gin_name: Name of the location configurable (`gqa_t5x.data.tasks.<gin_name>`).
      location_fn: That configurable.
      splits: Splits the task offers.
      fields: {field: True if a list of strings, False if one string}; the
        examples the source yields have exactly these fields.
      tfds_name: TFDS dataset, or None when the data set is not in TFDS.
      from_tfds: Maps a TFDS example to `fields`.
      text_pair_fields: Fields filled from two line-aligned text files.
    """

    gin_name: str
    location_fn: Callable[[], DataLocation]
    splits: tuple[str, ...]
    fields: Mapping[str, bool]
    tfds_name: str | None = None
    from_tfds: Callable[[dict], dict] | None = None
    text_pair_fields: tuple[str, str] | None = None


def _lookup(record: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(record, dict) or part not in record:
            raise KeyError(path)
        record = record[part]
    return record


class ConfigurableDataSource(seqio.DataSource):
    """A seqio DataSource reading TFDS or local files, chosen through gin.

    The location is resolved on every `get_dataset` call, so gin bindings
    parsed after the tasks were registered apply. Bad locations raise errors
    naming the gin binding to change; no dataset is ever silently empty.
    """

    def __init__(self, spec: SourceSpec):
        self._spec = spec
        super().__init__(splits=spec.splits)

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"ConfigurableDataSource({self._spec.gin_name})"

    def _where(self, argument: str) -> str:
        return f"gqa_t5x.data.tasks.{self._spec.gin_name}.{argument}"

    def location(self) -> DataLocation:
        """Returns the validated location from the gin configuration."""
        loc = self._spec.location_fn()
        chosen = [
            name
            for name in ("tfds_data_dir", "tfds_builder_dir", "files")
            if getattr(loc, name) is not None
        ]
        if len(chosen) > 1:
            raise ValueError(f"Set only one of {[self._where(n) for n in chosen]}.")
        if self._spec.tfds_name is None and chosen in ([], ["tfds_data_dir"]):
            raise ValueError(
                f"{self._spec.gin_name} is not in TFDS: set {self._where('files')}"
                " = {'validation': '/path/to/*.jsonl', ...} (or 'tfrecord' "
                "files)."
            )
        if loc.files is not None:
            unknown = set(loc.files) - set(self._spec.splits)
            if unknown:
                raise ValueError(
                    f"{self._where('files')} names unknown split(s) "
                    f"{sorted(unknown)}; this task has {list(self._spec.splits)}."
                )
        if loc.file_format is not None and loc.file_format not in _FORMATS:
            raise ValueError(
                f"{self._where('file_format')}={loc.file_format!r}; use one of "
                f"{_FORMATS}."
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
                f"Unknown split {split!r} for {self._spec.gin_name}; use one "
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
        where = loc.tfds_builder_dir or loc.tfds_data_dir or "the default data dir"
        try:
            ds = self._tfds_loader(loc).load(split, shuffle, seed, shard_info)
            empty = not list(ds.take(1))
        except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
            raise FileNotFoundError(
                f"Cannot read {self._spec.gin_name} split {split!r} from TFDS "
                f"({where}): {str(e).rstrip('.')}. Prepare the dataset or point "
                f"{self._where('tfds_data_dir')} / {self._where('files')} at "
                "local data."
            ) from e
        if empty:
            raise ValueError(
                f"Split {split!r} of {self._spec.gin_name} in {where} is empty."
            )
        if self._spec.from_tfds is not None:
            ds = ds.map(self._spec.from_tfds, num_parallel_calls=tf.data.AUTOTUNE)
        preprocessors.require_features(ds, self._spec.fields, self._spec.gin_name)
        return ds.map(lambda x: {k: x[k] for k in self._spec.fields})

    # ----------------------------- local files ------------------------------

    def _format(self, loc: DataLocation, pattern: Any) -> str:
        if loc.file_format is not None:
            return loc.file_format
        if not isinstance(pattern, str):
            return "text_pair"
        name = pattern.lower()
        if ".jsonl" in name or name.endswith(".json"):
            return "jsonl"
        if ".tfrecord" in name:
            return "tfrecord"
        raise ValueError(
            f"Cannot tell the format of {pattern!r} from its name; set "
            f"{self._where('file_format')} to one of {_FORMATS}."
        )

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
                    "wmt14_ende_data reads text pairs, given as [English file, "
                    "German file]; other data sets take one pattern per split."
                )
            files = [tf.io.gfile.glob(p) for p in pattern]
            if any(len(f) != 1 for f in files):
                raise FileNotFoundError(
                    f"{self._where('files')}[{split!r}]: each of {pattern} must "
                    f"match exactly one file, matched {[len(f) for f in files]}."
                )
            return [f[0] for f in files], file_format
        files = sorted(tf.io.gfile.glob(pattern))
        if not files:
            raise FileNotFoundError(
                f"{self._where('files')}[{split!r}] = {pattern!r} matches no file."
            )
        return files, file_format

    def _names(self, loc: DataLocation) -> dict[str, str]:
        return {f: (loc.field_map or {}).get(f, f) for f in self._spec.fields}

    def _read_files(self, loc, split, shuffle, seed, shard_info) -> tf.data.Dataset:
        files, file_format = self._match_files(loc, split)
        if file_format == "text_pair":
            ds = self._read_text_pair(files, split)
            return (
                ds.shard(shard_info.num_shards, shard_info.index) if shard_info else ds
            )
        reader = {"jsonl": self._jsonl_reader, "tfrecord": self._tfrecord_reader}[
            file_format
        ](files, loc)
        ds = tf.data.Dataset.from_tensor_slices(files)
        if shard_info:
            if len(files) < shard_info.num_shards:
                raise ValueError(
                    f"{len(files)} file(s) for split {split!r} cannot be "
                    f"sharded {shard_info.num_shards} ways."
                )
            ds = ds.shard(shard_info.num_shards, shard_info.index)
        if shuffle:
            ds = ds.shuffle(len(files), seed=seed)
        return ds.interleave(reader, cycle_length=16, block_length=16)

    def _jsonl_reader(self, files: list[str], loc: DataLocation):
        names = self._names(loc)
        is_list = self._spec.fields

        def convert(record: Any, where: str) -> dict[str, Any]:
            out = {}
            for field, name in names.items():
                try:
                    value = _lookup(record, name)
                except KeyError:
                    keys = sorted(record) if isinstance(record, dict) else []
                    raise ValueError(
                        f"{where}: field {name!r} (task field {field!r}) is "
                        f"missing; the record has {keys}. Map it with "
                        f"{self._where('field_map')}."
                    ) from None
                ok = (
                    isinstance(value, list) and all(isinstance(v, str) for v in value)
                    if is_list[field]
                    else isinstance(value, str)
                )
                if not ok:
                    kind = "a list of strings" if is_list[field] else "a string"
                    raise TypeError(f"{where}: field {name!r} must be {kind}.")
                out[field] = value
            return out

        def records(path: str):
            with tf.io.gfile.GFile(path) as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        where = f"{path}:{number}"
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{where}: invalid JSON ({e}).") from e
                        yield convert(record, where)

        # Validate up front: the first record of every file.
        if not [r for path in files for r in itertools.islice(records(path), 1)]:
            raise ValueError(
                f"{files} hold no records for {self._spec.gin_name}: the split "
                "is empty."
            )
        signature = {
            f: tf.TensorSpec([None] if is_list[f] else [], tf.string) for f in names
        }
        return lambda path: tf.data.Dataset.from_generator(
            lambda p: records(p.decode()), output_signature=signature, args=(path,)
        )

    def _tfrecord_reader(self, files: list[str], loc: DataLocation):
        names = self._names(loc)
        is_list = self._spec.fields
        found = False
        for path in files:
            for raw in tf.data.TFRecordDataset(path).take(1):
                found = True
                features = tf.train.Example.FromString(raw.numpy()).features.feature
                for field, name in names.items():
                    if name not in features:
                        raise ValueError(
                            f"{path}: tf.train.Example feature {name!r} (task "
                            f"field {field!r}) is missing; it has "
                            f"{sorted(features)}. Map it with "
                            f"{self._where('field_map')}."
                        )
        if not found:
            raise ValueError(
                f"{files} hold no records for {self._spec.gin_name}: the split "
                "is empty."
            )
        description = {
            name: (
                tf.io.VarLenFeature(tf.string)
                if is_list[field]
                else tf.io.FixedLenFeature([], tf.string)
            )
            for field, name in names.items()
        }

        def parse(raw):
            example = tf.io.parse_single_example(raw, description)
            return {
                field: (
                    tf.sparse.to_dense(example[name])
                    if is_list[field]
                    else example[name]
                )
                for field, name in names.items()
            }

        return lambda path: tf.data.TFRecordDataset(path).map(parse)

    def _read_text_pair(self, files: list[str], split: str) -> tf.data.Dataset:
        counts = []
        for path in files:
            with tf.io.gfile.GFile(path, "rb") as f:  # lines as TextLineDataset
                counts.append(sum(1 for _ in f))
        if counts[0] != counts[1]:
            raise ValueError(
                f"{files[0]} has {counts[0]} lines but {files[1]} has "
                f"{counts[1]}; text pairs must be line-aligned."
            )
        if counts[0] == 0:
            raise ValueError(f"{files} are empty: split {split!r} has no pairs.")
        source, target = self._spec.text_pair_fields
        return tf.data.Dataset.zip(
            tf.data.TextLineDataset(files[0]), tf.data.TextLineDataset(files[1])
        ).map(lambda s, t: {source: s, target: t})


# ------------------------------ task definitions -----------------------------


def _triviaqa_from_tfds(x: dict) -> dict:
    """TFDS trivia_qa/rc -> question, evidence context, acceptable answers."""
    wiki = tf.strings.reduce_join(x["entity_pages"]["wiki_context"], separator="\n")
    search = tf.strings.reduce_join(
        x["search_results"]["search_context"], separator="\n"
    )
    return {
        "question": x["question"],
        "context": tf.strings.join([wiki, search], separator="\n"),
        "answers": tf.concat([[x["answer"]["value"]], x["answer"]["aliases"]], 0),
    }


def qa_postprocess(
    output: str, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> Any:
    """Targets become the example's list of answers (T5's `qa` postprocessor)."""
    if is_target:
        return [tf.compat.as_text(a) for a in example["answers"]]
    return output


_EVAL_SPLITS = ("train", "validation", "test")
# task: (location configurable, TFDS name, document field, summary field)
_CNN = ("cnn_dailymail_data", "cnn_dailymail:3.4.0", "article", "highlights")
_ARXIV = ("arxiv_data", "scientific_papers/arxiv:1.1.1", "article", "abstract")
_PUBMED = ("pubmed_data", "scientific_papers/pubmed:1.1.1", "article", "abstract")
_MULTI_NEWS = ("multi_news_data", "multi_news:2.1.0", "document", "summary")
_SUMMARIZATION = {
    "gqa_cnn_dailymail": _CNN,
    "gqa_arxiv": _ARXIV,
    "gqa_pubmed": _PUBMED,
    "gqa_multi_news": _MULTI_NEWS,
}


def _add_task(
    name: str,
    spec: SourceSpec,
    task_preprocessors: Sequence[Callable[..., tf.data.Dataset]],
    metric_fns: Sequence[Callable[..., Mapping[str, float]]],
    postprocess_fn: Callable[..., Any] | None = None,
) -> None:
    """Registers `name`: raw examples -> `task_preprocessors` -> tokens + EOS."""
    vocabulary = vocabularies.get_vocabulary()
    pretraining = name == "gqa_c4_span_corruption"
    seqio.TaskRegistry.add(
        name,
        source=ConfigurableDataSource(spec),
        preprocessors=[
            *task_preprocessors[:1],
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            *task_preprocessors[1:],
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features={
            "inputs": seqio.Feature(vocabulary, add_eos=True, required=not pretraining),
            "targets": seqio.Feature(vocabulary, add_eos=True),
        },
        postprocess_fn=postprocess_fn,
        metric_fns=list(metric_fns),
    )


def register_tasks() -> None:
    """Registers every task and `gqa_eval_mixture` (replacing earlier ones)."""
    for name in (*FEATURE_LENGTHS, EVAL_MIXTURE):
        seqio.TaskRegistry.remove(name)
        seqio.MixtureRegistry.remove(name)

    def spec(gin_name, fields, tfds_name=None, splits=_EVAL_SPLITS, **kwargs):
        return SourceSpec(
            gin_name, globals()[gin_name], splits, fields, tfds_name, **kwargs
        )

    _add_task(
        "gqa_c4_span_corruption",
        spec("c4_data", {"text": False}, "c4/en:3.1.0", ("train", "validation")),
        [
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            preprocessors.span_corruption,
        ],
        metric_fns=[],
    )
    for name, (gin_name, tfds_name, document, summary) in _SUMMARIZATION.items():
        _add_task(
            name,
            spec(gin_name, {document: False, summary: False}, tfds_name),
            [
                functools.partial(
                    preprocessors.summarize, article_key=document, summary_key=summary
                )
            ],
            [metrics.rouge],
        )
    _add_task(
        "gqa_mediasum",
        spec("mediasum_data", {"utt": True, "speaker": True, "summary": False}),
        [preprocessors.summarize_dialogue],
        [metrics.rouge],
    )
    _add_task(
        "gqa_wmt14_ende",
        spec(
            "wmt14_ende_data",
            {"en": False, "de": False},
            "wmt14_translate/de-en:1.0.0",
            text_pair_fields=("en", "de"),
        ),
        [preprocessors.translate],
        [metrics.bleu],
    )
    _add_task(
        "gqa_triviaqa",
        spec(
            "triviaqa_data",
            {"question": False, "context": False, "answers": True},
            "trivia_qa/rc:1.1.0",
            ("train", "validation"),
            from_tfds=_triviaqa_from_tfds,
        ),
        [preprocessors.question_answering],
        [metrics.trivia_qa],
        postprocess_fn=qa_postprocess,
    )
    seqio.MixtureRegistry.add(EVAL_MIXTURE, [(t, 1.0) for t in EVAL_TASKS])


def feature_lengths(task_or_mixture: str) -> dict[str, int]:
    """Returns the paper's feature lengths for a task (max over a mixture).

    Args:
      task_or_mixture: A task name from `FEATURE_LENGTHS` or `gqa_eval_mixture`.

    Returns:
      {'inputs': int, 'targets': int}.
    """
    if task_or_mixture == EVAL_MIXTURE:
        return {
            k: max(FEATURE_LENGTHS[t][k] for t in EVAL_TASKS)
            for k in ("inputs", "targets")
        }
    if task_or_mixture not in FEATURE_LENGTHS:
        raise KeyError(
            f"Unknown task {task_or_mixture!r}; known: "
            f"{[*FEATURE_LENGTHS, EVAL_MIXTURE]}."
        )
    return dict(FEATURE_LENGTHS[task_or_mixture])


register_tasks()
