"""The training data cache: a task's model-ready rows, written once, read by index.

`write_cache` runs the deterministic seqio pipeline of a training
`DatasetConfig` ONCE, globally (no per-host sharding), with the run's seed:

    seqio.get_dataset(task, TASK_FEATURE_LENGTHS, split, shuffle, seed,
                      num_epochs=1, feature_converter=EncDecFeatureConverter(pack))

and stores every converted row (the `[length]` int32 features the model
trains on, e.g. `encoder_input_tokens`, `decoder_target_tokens`, segment ids
and positions when packed) as one ArrayRecord record, so a reader can fetch
any row by its index without reading the others (`cache_reader.py`).

Layout of DATA_CACHE_DIR (local or gs://):

    cache_spec.json                          what was cached (`CacheSpec`)
    shard-00000-of-00004.part-00000.array_record
    shard-00000-of-00004.part-00001.array_record
    shard-00000-of-00004.json                written last: the shard is complete
    ...

A cache may be written by several workers at once (`num_shards`, each one
`shard_index`): worker s runs the pipeline on seqio shard s of the input
files. The cache's global row g is row g // num_shards of shard
g % num_shards, so the order is fixed by the cache, not by whoever trains
on it. With one shard (the default) the cache holds exactly the stream a
single-host training run reads, row for row, except near the end of the
pass (the streaming pipeline repeats before it shuffles and packs).

A record is the row's features, in `CacheSpec.features` order, as
little-endian int32 bytes, concatenated. Records are written with group size
1 (one record per chunk, what random access needs) and zstd compression.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from gqa_t5x import storage
from gqa_t5x.data import datasets
from gqa_t5x.data import errors

FORMAT = "gqa_t5x.data.cache/1"
SPEC_FILE = "cache_spec.json"
ROW_DTYPE = np.dtype("<i4")
WRITER_OPTIONS = "group_size:1,zstd:3"
DEFAULT_ROWS_PER_FILE = 100_000
CACHE_COMMAND = "gqa-t5x cache"


class CacheError(errors.DataError):
    """A data cache is missing, incomplete, or does not match the run."""


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """What a cache holds (`cache_spec.json`).

    Attributes:
      task: MIXTURE_OR_TASK_NAME.
      split: Data split.
      task_feature_lengths: TASK_FEATURE_LENGTHS.
      pack: PACK.
      shuffle: Whether seqio shuffled the examples.
      seed: RANDOM_SEED the pipeline ran with.
      use_cached: USE_CACHED_TASKS (read seqio's own offline cache).
      vocabularies: {feature: {'type', 'size', 'sha256'}} of the task's
        vocabularies (the SentencePiece model's bytes are hashed).
      features: ((name, length), ...) of a row, in record order.
      num_shards: Workers that write the cache (row g is in shard g % n).
      max_rows: Rows requested (None: one pass over the split).
      rows_per_file: Rows of each ArrayRecord file of a shard.
      format: Layout version.
    """

    task: str
    split: str
    task_feature_lengths: Mapping[str, int]
    pack: bool
    shuffle: bool
    seed: int | None
    use_cached: bool
    vocabularies: Mapping[str, Mapping[str, Any]]
    features: tuple[tuple[str, int], ...]
    num_shards: int = 1
    max_rows: int | None = None
    rows_per_file: int = DEFAULT_ROWS_PER_FILE
    format: str = FORMAT

    def to_json(self) -> str:
        """Canonical JSON (sorted keys), so equal specs are equal text."""
        record = dataclasses.asdict(self)
        record["task_feature_lengths"] = dict(self.task_feature_lengths)
        record["features"] = [list(f) for f in self.features]
        return json.dumps(record, sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "CacheSpec":
        record = json.loads(text)
        if record.get("format") != FORMAT:
            raise CacheError(
                f"{SPEC_FILE} has format {record.get('format')!r}, this version reads "
                f"{FORMAT!r}; rewrite the cache with `{CACHE_COMMAND}`."
            )
        record["features"] = tuple((str(n), int(n_len)) for n, n_len in record["features"])
        return cls(**record)

    @property
    def row_length(self) -> int:
        """int32 values in one record."""
        return sum(length for _, length in self.features)

    def shard_name(self, shard: int) -> str:
        """'shard-00002-of-00004' (prefix of the shard's files)."""
        return f"shard-{shard:05d}-of-{self.num_shards:05d}"


# Spec fields compared with the run, and the gin setting that changes each.
_RUN_SETTINGS = {
    "task": "MIXTURE_OR_TASK_NAME",
    "split": "train/datasets.DatasetConfig.split",
    "task_feature_lengths": "TASK_FEATURE_LENGTHS",
    "pack": "PACK",
    "shuffle": "train/datasets.DatasetConfig.shuffle",
    "seed": "RANDOM_SEED",
    "use_cached": "USE_CACHED_TASKS",
    "vocabularies": "VOCAB_PATH",
}


def vocabulary_fingerprint(vocabulary: seqio.Vocabulary) -> dict[str, Any]:
    """{'type', 'size', 'sha256'} identifying a vocabulary by its contents.

    A SentencePiece vocabulary is hashed by its model bytes (so the same
    model read from another path matches); others by type and size.
    """
    model = getattr(vocabulary, "sp_model", None)
    identity = model if model else f"{type(vocabulary).__name__}:{vocabulary.vocab_size}".encode()
    return {
        "type": type(vocabulary).__name__,
        "size": int(vocabulary.vocab_size),
        "sha256": hashlib.sha256(identity).hexdigest(),
    }


def _vocabularies(cfg: datasets.DatasetConfig) -> dict[str, dict[str, Any]]:
    task = datasets.get_task_or_mixture(cfg)
    return {
        name: vocabulary_fingerprint(feature.vocabulary)
        for name, feature in sorted(task.output_features.items())
    }


def _stream(cfg: datasets.DatasetConfig, shard: int, num_shards: int) -> tf.data.Dataset:
    """One pass of seqio shard `shard` of `num_shards`, converted, unbatched."""
    datasets.get_task_or_mixture(cfg)
    return seqio.get_dataset(
        mixture_or_task_name=cfg.mixture_or_task_name,
        task_feature_lengths=dict(cfg.task_feature_lengths),
        dataset_split=cfg.split,
        shuffle=cfg.shuffle,
        num_epochs=1,
        feature_converter=seqio.EncDecFeatureConverter(pack=cfg.pack),
        shard_info=seqio.ShardInfo(shard, num_shards) if num_shards > 1 else None,
        use_cached=cfg.use_cached,
        seed=cfg.seed,
    )


def spec_for(
    cfg: datasets.DatasetConfig,
    *,
    num_shards: int = 1,
    max_rows: int | None = None,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
) -> CacheSpec:
    """The spec of a cache of `cfg`'s training rows (builds no data).

    Args:
      cfg: The run's training `DatasetConfig`.
      num_shards: Workers writing the cache.
      max_rows: Rows to cache (None: one pass over the split).
      rows_per_file: Rows per ArrayRecord file.

    Returns:
      The spec; its `features` come from the feature converter's output.
    """
    if num_shards < 1:
        raise ValueError(f"--num_shards={num_shards} must be >= 1.")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"--max_rows={max_rows} must be positive.")
    if rows_per_file < 1:
        raise ValueError(f"--rows_per_file={rows_per_file} must be positive.")
    element_spec = _stream(cfg, 0, 1).element_spec
    features = tuple((name, int(spec.shape[0])) for name, spec in element_spec.items())
    return CacheSpec(
        task=cfg.mixture_or_task_name,
        split=cfg.split,
        task_feature_lengths={k: int(v) for k, v in sorted(cfg.task_feature_lengths.items())},
        pack=bool(cfg.pack),
        shuffle=bool(cfg.shuffle),
        seed=cfg.seed,
        use_cached=bool(cfg.use_cached),
        vocabularies=_vocabularies(cfg),
        features=features,
        num_shards=num_shards,
        max_rows=max_rows,
        rows_per_file=rows_per_file,
    )


def check_spec_matches(spec: CacheSpec, cfg: datasets.DatasetConfig, cache_dir: str) -> None:
    """Raises `CacheError` when the cache was written for other settings.

    Compares task, split, feature lengths, packing, shuffling, seed,
    USE_CACHED_TASKS and the vocabularies' contents.
    """
    run = dataclasses.asdict(spec_for_comparison(cfg))
    cached = dataclasses.asdict(spec)
    differing = [
        f"{_RUN_SETTINGS[key]}: cache {cached[key]!r} vs run {run[key]!r}"
        for key in _RUN_SETTINGS
        if _normalise(cached[key]) != _normalise(run[key])
    ]
    if differing:
        raise CacheError(
            f"DATA_CACHE_DIR={cache_dir!r} was written for other settings than this "
            f"run: {'; '.join(differing)}. Write a cache for this run into a new "
            f"directory (`{CACHE_COMMAND}` with the run's --gin_file/--gin flags and "
            "--gin.DATA_CACHE_DIR=...), or set DATA_CACHE_DIR=None to stream."
        )


def spec_for_comparison(cfg: datasets.DatasetConfig) -> CacheSpec:
    """The run's side of `check_spec_matches` (no features, no data read)."""
    return CacheSpec(
        task=cfg.mixture_or_task_name,
        split=cfg.split,
        task_feature_lengths=dict(cfg.task_feature_lengths),
        pack=bool(cfg.pack),
        shuffle=bool(cfg.shuffle),
        seed=cfg.seed,
        use_cached=bool(cfg.use_cached),
        vocabularies=_vocabularies(cfg),
        features=(),
    )


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


def encode_row(row: Mapping[str, np.ndarray], features: tuple[tuple[str, int], ...]) -> bytes:
    """One record: the features in `features` order as little-endian int32."""
    parts = []
    for name, length in features:
        value = np.asarray(row[name])
        if value.shape != (length,):
            raise ValueError(f"Row feature {name!r} has shape {value.shape}, expected ({length},).")
        parts.append(value.astype(ROW_DTYPE).tobytes())
    return b"".join(parts)


def read_spec(cache_dir: str) -> CacheSpec:
    """The spec of the cache in `cache_dir`.

    Raises:
      CacheError: there is no cache there (the message gives the command
        that writes one).
    """
    path = storage.as_path(cache_dir, name="DATA_CACHE_DIR") / SPEC_FILE
    if not path.exists():
        raise CacheError(
            f"DATA_CACHE_DIR={cache_dir!r} holds no data cache ({SPEC_FILE} is missing). "
            f"Write it once with `{CACHE_COMMAND}` and the run's --gin_file/--gin flags "
            "(docs/data.md), or set DATA_CACHE_DIR=None to stream from seqio."
        )
    return CacheSpec.from_json(path.read_text())


@dataclasses.dataclass(frozen=True)
class ShardRecord:
    """A complete shard (`shard-*.json`, written after its files).

    Attributes:
      rows: Rows the shard holds.
      files: Its ArrayRecord file names, in order (rows_per_file rows each,
        the last one possibly fewer).
      spec_sha256: sha256 of the spec it was written for.
    """

    rows: int
    files: tuple[str, ...]
    spec_sha256: str


def spec_digest(spec: CacheSpec) -> str:
    return hashlib.sha256(spec.to_json().encode()).hexdigest()


def read_shard_record(cache_dir: str, spec: CacheSpec, shard: int) -> ShardRecord | None:
    """The completion record of `shard`, or None while it is not complete."""
    path = storage.as_path(cache_dir) / f"{spec.shard_name(shard)}.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return ShardRecord(int(record["rows"]), tuple(record["files"]), record["spec_sha256"])


def _write_local_or_remote(target: storage.Path, write: Any) -> None:
    """Calls `write(local_path)` and publishes the file at `target` whole.

    A local target is written next to it and renamed; a gs:// one is staged
    in a local temporary file and copied up (an object appears complete).
    """
    if storage.is_remote(target):
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, target.name)
            write(local)
            storage.as_path(local).copy(target, overwrite=True)
        return
    tmp = f"{os.fspath(target)}.tmp-{os.getpid()}"
    write(tmp)
    storage.rename(tmp, target)


def _write_text(target: storage.Path, text: str) -> None:
    def write(local: str) -> None:
        storage.write_file(local, text)

    _write_local_or_remote(target, write)


def _write_spec(cache_dir: storage.Path, spec: CacheSpec) -> None:
    """Writes `cache_spec.json`, or checks the one there is the same."""
    path = cache_dir / SPEC_FILE
    if path.exists():
        found = path.read_text()
        if found != spec.to_json():
            raise CacheError(
                f"{os.fspath(cache_dir)} already holds a cache written for other settings "
                f"({SPEC_FILE} differs: {os.fspath(path)}). Choose another "
                "DATA_CACHE_DIR, or delete that one to rewrite it."
            )
        return
    _write_text(path, spec.to_json())


def _rows(ds: tf.data.Dataset, limit: int | None) -> Iterator[dict[str, np.ndarray]]:
    iterator = ds.as_numpy_iterator()
    count = 0
    while limit is None or count < limit:
        with errors.surface_data_errors():
            row = next(iterator, None)
        if row is None:
            return
        count += 1
        yield row


def _write_part(local_path: str, records: list[bytes]) -> None:
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(local_path, WRITER_OPTIONS)
    try:
        for record in records:
            writer.write(record)
    finally:
        writer.close()


def write_shard(
    cfg: datasets.DatasetConfig, cache_dir: str, spec: CacheSpec, shard: int, *, progress: bool = True
) -> ShardRecord:
    """Writes shard `shard` of the cache (skipped when already complete).

    Args:
      cfg: The run's training data.
      cache_dir: DATA_CACHE_DIR.
      spec: From `spec_for(cfg, ...)`.
      shard: Which shard (0 <= shard < spec.num_shards).
      progress: Print a line per file written.

    Returns:
      The shard's completion record.
    """
    if not 0 <= shard < spec.num_shards:
        raise ValueError(f"--shard_index={shard} must be in [0, {spec.num_shards}).")
    root = storage.as_path(cache_dir, name="DATA_CACHE_DIR")
    digest = spec_digest(spec)
    done = read_shard_record(cache_dir, spec, shard)
    if done is not None and done.spec_sha256 == digest:
        if progress:
            print(f"[cache] {spec.shard_name(shard)}: already complete ({done.rows} rows).", flush=True)
        return done
    limit = None if spec.max_rows is None else -(-spec.max_rows // spec.num_shards)
    files: list[str] = []
    buffer: list[bytes] = []
    rows = 0
    start = time.time()

    def flush() -> None:
        name = f"{spec.shard_name(shard)}.part-{len(files):05d}.array_record"
        records = list(buffer)
        _write_local_or_remote(root / name, lambda local: _write_part(local, records))
        files.append(name)
        buffer.clear()
        if progress:
            rate = rows / max(time.time() - start, 1e-9)
            print(f"[cache] {name}: {rows} rows so far ({rate:.0f} rows/s)", flush=True)

    for row in _rows(_stream(cfg, shard, spec.num_shards), limit):
        buffer.append(encode_row(row, spec.features))
        rows += 1
        if len(buffer) == spec.rows_per_file:
            flush()
    if buffer:
        flush()
    if rows == 0:
        raise CacheError(
            f"{cfg.mixture_or_task_name} split {cfg.split!r} (seqio shard {shard} of "
            f"{spec.num_shards}) yields no rows: nothing to cache."
        )
    record = ShardRecord(rows, tuple(files), digest)
    _write_text(
        root / f"{spec.shard_name(shard)}.json",
        json.dumps({"rows": rows, "files": list(files), "spec_sha256": digest}, indent=1),
    )
    return record


def configured_dataset() -> datasets.DatasetConfig:
    """The training `DatasetConfig` the parsed gin configures (`trainer.train.train_dataset_cfg`).

    Raises:
      ValueError: the gin configures no training run, or no DATA_CACHE_DIR.
    """
    import gin

    try:
        reference = gin.query_parameter("gqa_t5x.training.trainer.train.train_dataset_cfg")
    except ValueError:
        raise ValueError("The gin files configure no training run: include gin/runs/uptrain.gin "
                         "or gin/runs/finetune.gin, as the training command does.") from None
    cfg = reference.scoped_configurable_fn()
    if not cfg.cache_dir:
        raise ValueError('DATA_CACHE_DIR is not set: pass --gin.DATA_CACHE_DIR=\\"/path/or/gs/url\\" '
                         "(and the same flag to training).")
    return cfg


def write_cache(
    cfg: datasets.DatasetConfig,
    cache_dir: str,
    *,
    num_shards: int = 1,
    shard_index: int | None = None,
    max_rows: int | None = None,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    progress: bool = True,
) -> dict[int, ShardRecord]:
    """Writes (part of) the cache of `cfg`'s training rows into `cache_dir`.

    Rerunning it is safe: complete shards are skipped, so a preempted cache
    job resumes by rerunning the same command.

    Args:
      cfg: The run's training `DatasetConfig` (task, lengths, packing, seed).
      cache_dir: DATA_CACHE_DIR (local or gs://).
      num_shards: Workers writing the cache in parallel (fixes the row order).
      shard_index: This worker's shard; None writes every shard here.
      max_rows: Rows to cache in all (None: one pass over the split); a run
        needs (TRAIN_STEPS - start step) * BATCH_SIZE rows to see each once.
      rows_per_file: Rows per ArrayRecord file.
      progress: Print progress lines.

    Returns:
      {shard: completion record} of the shards written (or found complete).

    Raises:
      CacheError: `cache_dir` holds a cache of other settings.
    """
    spec = spec_for(cfg, num_shards=num_shards, max_rows=max_rows, rows_per_file=rows_per_file)
    root = storage.as_path(cache_dir, name="DATA_CACHE_DIR")
    root.mkdir(parents=True, exist_ok=True)
    _write_spec(root, spec)
    shards = range(num_shards) if shard_index is None else [shard_index]
    return {s: write_shard(cfg, cache_dir, spec, s, progress=progress) for s in shards}
