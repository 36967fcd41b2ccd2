"""Reads the training data cache by global row index (see `cache.py`).

The global batch of a step is a function of the step alone:

    batch rows = [row0 + (step - step0) * BATCH_SIZE, ... + BATCH_SIZE)

where (step0, row0) is where the run's data started (the checkpoint
metadata's `data_start_step` / `data_start_row`). Global row g is cache
row `epoch_order(g mod R)` of epoch e = g // R (R = the cache's rows): epoch
0 reads the cache in its own order (the seqio stream's), every later epoch
in a seeded pseudo-random permutation of it (`permute`), as a streaming
pipeline reshuffles each repetition.

Each host reads only the rows of the global batch its devices hold
(`Partitioner.host_rows`), so the global batch is the same whatever the
number of hosts and devices, and resuming at step s reads nothing before it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
from collections.abc import Iterator

import numpy as np

from gqa_t5x import storage
from gqa_t5x.data import cache
from gqa_t5x.data import datasets

_READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


# ----------------------------------------------------------- permutation
def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of uint64 values."""
    x = x.astype(np.uint64)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _round_keys(seed: int, epoch: int, rounds: int) -> list[np.uint64]:
    base = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xD1B54A32D192ED03) & 0xFFFFFFFFFFFFFFFF
    keys = _mix64(np.arange(1, rounds + 1, dtype=np.uint64) + np.uint64(base))
    return [np.uint64(k) for k in keys]


def _feistel(x: np.ndarray, half_bits: int, keys: list[np.uint64]) -> np.ndarray:
    """A balanced Feistel network: a bijection of [0, 4**half_bits)."""
    mask = np.uint64((1 << half_bits) - 1)
    shift = np.uint64(half_bits)
    left, right = x >> shift, x & mask
    for key in keys:
        left, right = right, left ^ (_mix64(right ^ key) & mask)
    return (left << shift) | right


def permute(indices: np.ndarray, size: int, seed: int, epoch: int) -> np.ndarray:
    """A seeded pseudo-random permutation of [0, size), evaluated at `indices`.

    Needs O(1) memory whatever `size` (no table): a 4-round Feistel network
    on the smallest even-bit power of two >= size, cycle-walking values that
    land outside [0, size) until they fall inside (fewer than 4 steps
    expected).

    Args:
      indices: Positions in [0, size).
      size: Domain size (rows of the cache).
      seed: Seed of the permutation (RANDOM_SEED).
      epoch: Epoch (a different permutation for each).

    Returns:
      The permuted positions, an int64 array shaped like `indices`.
    """
    x = np.asarray(indices, dtype=np.uint64)
    if size < 1 or (x.size and int(x.max()) >= size):
        raise ValueError(f"permute: indices must lie in [0, {size}).")
    half_bits = max(1, (max(size - 1, 1).bit_length() + 1) // 2)
    keys = _round_keys(seed, epoch, rounds=4)
    y = _feistel(x, half_bits, keys)
    outside = y >= np.uint64(size)
    while outside.any():
        y[outside] = _feistel(y[outside], half_bits, keys)
        outside = y >= np.uint64(size)
    return y.astype(np.int64)


# ---------------------------------------------------------------- reader
@dataclasses.dataclass(frozen=True)
class _Shard:
    files: tuple[str, ...]
    rows: int


class CacheReader:
    """Random access to the rows of a complete cache.

    Attributes:
      cache_dir: DATA_CACHE_DIR.
      spec: Its `CacheSpec`.
      num_rows: R, the rows one epoch has: num_shards * the smallest
        shard's rows (shards are interleaved row by row).
      fingerprint: sha256 of the spec and the shards' row counts; stored in
        checkpoints so a resumed run reads the same cache.
    """

    def __init__(self, cache_dir: str):
        """Opens the cache (reads the spec and the shard records only).

        Raises:
          CacheError: no cache there, or some shards are not complete (the
            message lists them and the command that writes them).
        """
        self.cache_dir = os.fspath(cache_dir)
        self.spec = cache.read_spec(self.cache_dir)
        digest = cache.spec_digest(self.spec)
        shards, missing = [], []
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:  # gs:// latency
            records = list(pool.map(
                lambda s: cache.read_shard_record(self.cache_dir, self.spec, s),
                range(self.spec.num_shards),
            ))
        for s, record in enumerate(records):
            if record is None or record.spec_sha256 != digest:
                missing.append(s)
            else:
                shards.append(_Shard(record.files, record.rows))
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise cache.CacheError(
                f"DATA_CACHE_DIR={self.cache_dir!r} is incomplete: shard(s) {shown} of "
                f"{self.spec.num_shards} are not written. Run `{cache.CACHE_COMMAND}` with "
                f"the run's gin flags and --num_shards={self.spec.num_shards} "
                "--shard_index=<each missing shard> (or without --shard_index to write "
                "them all); complete shards are kept."
            )
        self._shards = shards
        self.num_rows = self.spec.num_shards * min(s.rows for s in shards)
        counts = ",".join(str(s.rows) for s in shards)
        self.fingerprint = hashlib.sha256(f"{digest}:{counts}".encode()).hexdigest()
        self._offsets = np.cumsum([0] + [length for _, length in self.spec.features])
        self._readers: dict[tuple[int, int], object] = {}
        root = storage.as_path(self.cache_dir)
        self._paths = [[os.fspath(root / name) for name in s.files] for s in shards]

    def check_matches(self, cfg: datasets.DatasetConfig) -> None:
        """Raises `CacheError` unless the cache was written for `cfg`."""
        cache.check_spec_matches(self.spec, cfg, self.cache_dir)

    def cache_rows(self, global_rows: np.ndarray) -> np.ndarray:
        """Cache row of each global row index (the epoch rule, module doc)."""
        g = np.asarray(global_rows, dtype=np.int64)
        if g.size and g.min() < 0:
            raise ValueError("Global row indices must be non-negative.")
        epoch, index = np.divmod(g, self.num_rows)
        out = index.copy()
        seed = self.spec.seed or 0
        for e in np.unique(epoch):
            if e == 0:
                continue
            where = epoch == e
            out[where] = permute(index[where], self.num_rows, seed, int(e))
        return out

    def _reader(self, shard: int, part: int):
        key = (shard, part)
        if key not in self._readers:
            from array_record.python import array_record_module

            self._readers[key] = array_record_module.ArrayRecordReader(
                self._paths[shard][part], _READER_OPTIONS
            )
        return self._readers[key]

    def read_cache_rows(
        self, rows: np.ndarray, pool: concurrent.futures.Executor | None = None
    ) -> dict[str, np.ndarray]:
        """The features of cache rows `rows`, stacked: {name: [n, length] int32}.

        Args:
          rows: Cache row indices in [0, num_rows).
          pool: Reads the files concurrently when given.
        """
        rows = np.asarray(rows, dtype=np.int64)
        in_shard, shard = np.divmod(rows, self.spec.num_shards)  # shard r % n, row r // n
        part, position = np.divmod(in_shard, self.spec.rows_per_file)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, key in enumerate(zip(shard.tolist(), part.tolist())):
            groups.setdefault(key, []).append(i)
        self._open_all(groups)
        records: list[bytes] = [b""] * len(rows)

        def read(key: tuple[int, int]) -> None:
            wanted = groups[key]
            found = self._readers[key].read([int(position[i]) for i in wanted])
            for i, record in zip(wanted, found):
                records[i] = record

        if pool is None or len(groups) == 1:
            for key in groups:
                read(key)
        else:
            list(pool.map(read, groups))
        flat = np.frombuffer(b"".join(records), dtype=cache.ROW_DTYPE)
        flat = flat.reshape(len(rows), self.spec.row_length).astype(np.int32)
        return {
            name: flat[:, self._offsets[i] : self._offsets[i + 1]]
            for i, (name, _) in enumerate(self.spec.features)
        }

    def _open_all(self, groups: dict[tuple[int, int], list[int]]) -> None:
        for shard, part in groups:
            self._reader(shard, part)

    def close(self) -> None:
        """Closes the open ArrayRecord readers."""
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


def host_batches(
    reader: CacheReader,
    *,
    start_row: int,
    batch_size: int,
    host_rows: np.ndarray,
    prefetch: int = 2,
) -> Iterator[dict[str, np.ndarray]]:
    """This host's rows of successive global batches, read ahead in threads.

    Args:
      reader: The open cache.
      start_row: Global row index of the first batch's first row.
      batch_size: Global BATCH_SIZE.
      host_rows: Rows of the global batch this host holds (sorted;
        `Partitioner.host_rows`).
      prefetch: Batches read ahead.

    Yields:
      {feature: [len(host_rows), length] int32} for batch 0, 1, ...
      Closing the generator stops the reading threads.
    """
    host_rows = np.asarray(host_rows, dtype=np.int64)
    if host_rows.size == 0 or host_rows.max() >= batch_size:
        raise ValueError(f"host_rows must be rows of a batch of {batch_size}.")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="cache_read")
    fetch = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache_batch")

    def batch(k: int) -> dict[str, np.ndarray]:
        global_rows = start_row + k * batch_size + host_rows
        return reader.read_cache_rows(reader.cache_rows(global_rows), pool)

    pending = [fetch.submit(batch, k) for k in range(prefetch + 1)]
    k = prefetch + 1
    try:
        while True:
            yield pending.pop(0).result()
            pending.append(fetch.submit(batch, k))
            k += 1
    finally:
        for future in pending:
            future.cancel()
        fetch.shutdown(wait=True)
        pool.shutdown(wait=True)


def describe_epochs(reader: CacheReader, first_row: int, last_row: int) -> str | None:
    """A note when rows [first_row, last_row) go past the cache's first epoch."""
    if last_row <= reader.num_rows:
        return None
    epochs = -(-last_row // reader.num_rows)
    return (
        f"[data] the cache holds {reader.num_rows} rows; this run reads rows "
        f"{first_row}..{last_row - 1}, i.e. up to {epochs} epochs: rows after the "
        "first epoch repeat in a seeded permutation per epoch."
    )
