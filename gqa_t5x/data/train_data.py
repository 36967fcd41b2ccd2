"""The training input: the cache when DATA_CACHE_DIR is set, else the stream.

Both pipelines are positioned by a global ROW index: the run's data starts
at row `start_row` (0 for a new run; for a resumed one, the row its
checkpoint's metadata says comes next), and every step consumes BATCH_SIZE
rows. Each host yields only its rows of each global batch
(`Partitioner.host_rows`).

* cache (`cache_reader.py`): global batch k is rows [start_row + k*B, +B) of
  the cache, whatever the number of hosts and devices; resuming reads
  nothing before it (O(1) in the step).
* stream (`datasets.get_dataset`): each host reads its own seqio shard, so
  batches depend on the number of hosts, and resuming re-reads and
  re-preprocesses the rows consumed so far (skip). With one host, row r of
  the stream is row r of a one-shard cache (up to the end of the first
  pass), so a run can switch from one to the other when resumed.

Without a cache the trainer says so, with the command that writes one
(`stream_notice`): a documented choice, not a fallback. The advice is given
once per process (`advise_once`); the runs after it (a sweep's points, the
study's stages) get a one-line note.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from gqa_t5x.data import cache
from gqa_t5x.data import cache_reader
from gqa_t5x.data import datasets

STREAM = "stream"
CACHE = "cache"

# Keys of the advice already given in this process (`advise_once`).
_advised: set[str] = set()


def advise_once(key: str, advice: str, reminder: str | None = None) -> str | None:
    """`advice` the first time `key` is advised in this process, then `reminder`.

    A process that trains many runs (a sweep, the study) would otherwise
    print the same paragraph before every one of them.

    Args:
      key: What the advice is about (one key per kind of advice).
      advice: The full text.
      reminder: What later runs get instead (None: nothing).

    Returns:
      The text to print, or None.
    """
    if key in _advised:
        return reminder
    _advised.add(key)
    return advice


@dataclasses.dataclass
class TrainData:
    """An open training input.

    Attributes:
      batches: This host's rows of each global batch, from `start_row` on
        (dicts of `[rows, length]` int32 arrays; close it to stop reading).
      pipeline: 'cache' or 'stream'.
      cache_fingerprint: The cache's fingerprint (None when streaming).
      notes: Lines for the console (process 0 prints them).
      on_close: Closes the pipeline's files after `batches` is closed.
    """

    batches: Iterator[dict[str, np.ndarray]]
    pipeline: str
    cache_fingerprint: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    on_close: Callable[[], None] | None = None

    def close(self) -> None:
        """Stops the pipeline's threads and closes its files."""
        self.batches.close()
        if self.on_close is not None:
            self.on_close()


def stream_notice(cfg: datasets.DatasetConfig, consumed_rows: int) -> str:
    """What streaming means for this run, and how to prepare a cache instead."""
    hosts = jax.process_count()
    resume = (
        f"resuming re-reads and re-preprocesses the {consumed_rows} rows already consumed"
        if consumed_rows
        else "a resumed run re-reads and re-preprocesses every row consumed before"
    )
    return (
        f"[data] DATA_CACHE_DIR is not set: streaming {cfg.mixture_or_task_name} from "
        f"seqio, {hosts} host(s) each reading its own shard, so the batches depend on "
        f"the number of hosts, and {resume}. To train from a cache (same batches on "
        "any topology, O(1) resume), write it once with `gqa-t5x cache` plus this "
        "run's --gin_file/--gin flags and --gin.DATA_CACHE_DIR=\"<dir>\", then pass "
        "the same --gin.DATA_CACHE_DIR to training (docs/data.md)."
    )


def _stream(
    cfg: datasets.DatasetConfig, start_row: int, host_rows: np.ndarray
) -> TrainData:
    hosts = jax.process_count()
    per_host = datasets.host_batch_size(cfg)
    if len(host_rows) != per_host:
        raise ValueError(
            f"The streaming pipeline gives each of the {hosts} hosts BATCH_SIZE / hosts = "
            f"{per_host} rows, but this mesh puts {len(host_rows)} rows of each batch on "
            "this host (its data axis does not span the hosts). Train from a cache: "
            "set DATA_CACHE_DIR (docs/data.md)."
        )
    ds = datasets.get_dataset(cfg, skip_rows=start_row // hosts)
    resumed = f"; re-reading the {start_row} rows consumed before" if start_row else ""
    note = advise_once(
        "stream", stream_notice(cfg, start_row),
        reminder=f"[data] streaming {cfg.mixture_or_task_name} from seqio (no DATA_CACHE_DIR){resumed}.",
    )
    return TrainData(
        batches=datasets.numpy_batches(ds),
        pipeline=STREAM,
        notes=[note] if note else [],
    )


def _cache(
    cfg: datasets.DatasetConfig, start_row: int, host_rows: np.ndarray, end_row: int | None
) -> TrainData:
    reader = cache_reader.CacheReader(cfg.cache_dir)
    try:
        reader.check_matches(cfg)
    except Exception:
        reader.close()
        raise
    notes = [
        f"[data] reading the cache DATA_CACHE_DIR={cfg.cache_dir} ({reader.num_rows} "
        f"rows) from row {start_row}; this host reads {len(host_rows)} of every "
        f"{cfg.batch_size} rows."
    ]
    if end_row is not None:
        epochs = cache_reader.describe_epochs(reader, start_row, end_row)
        if epochs:
            notes.append(epochs)

    batches = cache_reader.host_batches(
        reader, start_row=start_row, batch_size=cfg.batch_size, host_rows=host_rows
    )
    return TrainData(batches, CACHE, reader.fingerprint, notes, on_close=reader.close)


def open_train_data(
    cfg: datasets.DatasetConfig,
    *,
    start_row: int,
    host_rows: np.ndarray,
    end_row: int | None = None,
) -> TrainData:
    """Opens the training input at global row `start_row`.

    Args:
      cfg: Training data (`cfg.cache_dir` chooses the pipeline).
      start_row: Global row of the first batch's first row.
      host_rows: Rows of each global batch this host holds
        (`Partitioner.host_rows(cfg.batch_size)`).
      end_row: Row after the run's last one (for the epoch note), if known.

    Returns:
      The open `TrainData`.

    Raises:
      CacheError: DATA_CACHE_DIR holds no complete cache, or one written for
        other settings.
      ValueError: streaming on a mesh whose data axis does not span the hosts.
    """
    if start_row < 0:
        raise ValueError(f"start_row={start_row} must be non-negative.")
    if cfg.cache_dir:
        return _cache(cfg, start_row, np.asarray(host_rows), end_row)
    return _stream(cfg, start_row, np.asarray(host_rows))


def check_resume(
    previous: Mapping[str, Any] | None, data: TrainData, cfg: datasets.DatasetConfig, row: int
) -> str | None:
    """Compares the input a checkpoint was trained on with the run's.

    Args:
      previous: The restored checkpoint's metadata (None: not resumed from
        MODEL_DIR).
      data: The run's open input.
      cfg: The run's training data.
      row: The global row the run resumes at.

    Returns:
      A console note when the run switches pipelines, else None.

    Raises:
      CacheError: the checkpoint read another cache (its rows differ, so the
        data order would not continue).
    """
    if previous is None:
        return None
    before = previous.get("data_pipeline", STREAM)
    if before == CACHE and data.pipeline == CACHE:
        if previous.get("data_cache") != data.cache_fingerprint:
            raise cache.CacheError(
                f"MODEL_DIR's checkpoint was trained from a cache with fingerprint "
                f"{previous.get('data_cache')}, but DATA_CACHE_DIR={cfg.cache_dir!r} holds "
                f"another ({data.cache_fingerprint}): its rows differ, so the run would "
                "not continue its data order. Point DATA_CACHE_DIR at the cache the run "
                "started with, or start a new MODEL_DIR."
            )
        return None
    if before == data.pipeline:
        return None
    if data.pipeline == CACHE:
        return (
            f"[data] the checkpoint was trained on the streaming pipeline; continuing from "
            f"the cache at row {row} (the rows a single-host stream reads next, within "
            "its first pass)."
        )
    return (
        f"[data] the checkpoint was trained from a cache, but DATA_CACHE_DIR is not set: "
        f"streaming from row {row} instead."
    )
