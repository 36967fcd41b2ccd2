"""seqio task -> feature converter -> per-host batches: the streaming pipeline.

`DatasetConfig` carries T5X's `utils.DatasetConfig` fields (plus
`cache_dir`, DATA_CACHE_DIR). `get_dataset` builds the deterministic pipeline
T5X uses for training:

    seqio.get_dataset(task, lengths, split, shuffle, seed, shard_info=host,
                      feature_converter=EncDecFeatureConverter(pack=...))
      -> skip(rows this host already consumed)
      -> batch(global_batch / hosts, drop_remainder=True)

With a fixed seed the stream is a pure function of the configuration and of
the number of hosts (each reads its own seqio shard), so a restarted run
that skips the rows its checkpoint says were consumed sees exactly the
examples an uninterrupted run would have seen, after re-reading them. The
training data cache (`cache.py`, `cache_reader.py`, chosen in
`train_data.py`) removes both limits.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator, Mapping

import jax
import numpy as np
import seqio
import tensorflow as tf

from gqa_t5x.data import errors


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """What to read (T5X `utils.DatasetConfig` field names).

    Attributes:
      mixture_or_task_name: Registered seqio task or mixture.
      task_feature_lengths: {'inputs': int, 'targets': int}.
      split: Data split.
      batch_size: GLOBAL batch size (all hosts).
      shuffle: Shuffle the examples.
      seed: Seed of shuffling and random preprocessing (required for
        deterministic resumption).
      use_cached: Read the task's offline cache.
      pack: Pack several examples per row (EncDecFeatureConverter(pack=True)).
      module: Python module to import first (registers the task).
      cache_dir: DATA_CACHE_DIR: the training data cache to read instead of
        streaming (`gqa-t5x cache` writes it); None streams.
    """

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    split: str
    batch_size: int
    shuffle: bool = True
    seed: int | None = 0
    use_cached: bool = False
    pack: bool = False
    module: str | None = "gqa_t5x.data.tasks"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.mixture_or_task_name:
            raise ValueError("DatasetConfig needs MIXTURE_OR_TASK_NAME.")
        if self.batch_size <= 0:
            raise ValueError(f"BATCH_SIZE={self.batch_size} must be positive.")
        for key in ("inputs", "targets"):
            if key not in self.task_feature_lengths:
                raise ValueError(
                    f"TASK_FEATURE_LENGTHS={dict(self.task_feature_lengths)} lacks "
                    f"{key!r}; use e.g. {{'inputs': 512, 'targets': 114}}."
                )


def get_task_or_mixture(cfg: DatasetConfig) -> seqio.Task | seqio.Mixture:
    """Imports `cfg.module` and returns the registered task or mixture.

    Its vocabularies are loaded here, so a missing vocabulary file is reported
    as itself (naming VOCAB_PATH) before any tf.data function is traced,
    rather than wrapped in TensorFlow's staging error.
    """
    if cfg.module:
        importlib.import_module(cfg.module)
    try:
        task = seqio.get_mixture_or_task(cfg.mixture_or_task_name)
    except ValueError as e:
        raise ValueError(
            f"MIXTURE_OR_TASK_NAME={cfg.mixture_or_task_name!r} is not a registered "
            f"seqio task or mixture (module {cfg.module!r} was imported): {e}"
        ) from e
    for subtask in seqio.get_subtasks(task):
        for feature in subtask.output_features.values():
            feature.vocabulary.vocab_size  # noqa: B018 - loads the model file
    return task


def host_batch_size(cfg: DatasetConfig) -> int:
    """This host's share of the global batch."""
    hosts = jax.process_count()
    if cfg.batch_size % hosts:
        raise ValueError(f"BATCH_SIZE={cfg.batch_size} must be divisible by {hosts} hosts.")
    return cfg.batch_size // hosts


def get_dataset(
    cfg: DatasetConfig,
    *,
    num_epochs: int | None = None,
    skip_rows: int = 0,
    feature_converter_cls: type[seqio.FeatureConverter] = seqio.EncDecFeatureConverter,
) -> tf.data.Dataset:
    """The host-local, batched and converted dataset.

    Args:
      cfg: What to read.
      num_epochs: None repeats forever (training).
      skip_rows: Rows (of this host's shard) to drop from the start, before
        batching (resumption).
      feature_converter_cls: T5X feature converter class.

    Returns:
      A `tf.data.Dataset` of dicts of `[host_batch, length]` int32 tensors
      with T5X's feature names.
    """
    get_task_or_mixture(cfg)
    shard_info = seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())
    ds = seqio.get_dataset(
        mixture_or_task_name=cfg.mixture_or_task_name,
        task_feature_lengths=dict(cfg.task_feature_lengths),
        dataset_split=cfg.split,
        shuffle=cfg.shuffle,
        num_epochs=num_epochs,
        feature_converter=feature_converter_cls(pack=cfg.pack),
        shard_info=shard_info if jax.process_count() > 1 else None,
        use_cached=cfg.use_cached,
        seed=cfg.seed,
    )
    if skip_rows:
        ds = ds.skip(skip_rows)
    ds = ds.batch(host_batch_size(cfg), drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def numpy_batches(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    """Iterates a batched dataset as dicts of int32 numpy arrays.

    Raises:
      DataError: a record could not be read (the reader's message, not the
        TensorFlow error wrapping it).
    """
    iterator = ds.as_numpy_iterator()
    while True:
        with errors.surface_data_errors():
            batch = next(iterator, None)
        if batch is None:
            return
        yield {k: np.asarray(v, np.int32) for k, v in batch.items()}

