"""Publishing a directory all at once, or not at all: the one atomic-write helper.

Our checkpoint writer and the HuggingFace export both fill a staging
directory through `AtomicDirectory` and then `publish` it:

* Local filesystem: the staging directory is a hidden sibling of the
  destination, `.<name>.gqa_t5x-tmp-<id>`. `publish` writes the completion
  marker (the format's own last file: our manifest, HuggingFace's
  config.json), then renames the staging directory into place. A destination
  replaced with `overwrite=True` is moved aside (`.<name>.gqa_t5x-old-<id>`)
  only at that moment and deleted after the rename.
* Object storage (gs://), which has no atomic rename: the staging directory
  is the destination itself and `publish` writes the completion marker LAST.
  Replacing an existing checkpoint there deletes it before writing (said in a
  log line); there is no atomic replace on object storage.

While it is written, a staging directory holds `WRITER_FILE` (host, process id
and start time of the writer). A directory holding it is incomplete: readers
refuse it (`writer_of`), and the next write to the same destination removes
it once its writer is dead (`remove_leftovers`), logging one line. Leftovers
of writers on other hosts, or still alive, are kept and reported.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any

from gqa_t5x.storage import paths
from gqa_t5x.storage import space
from gqa_t5x.storage.paths import Path, PathLike

STAGING_TAG = ".gqa_t5x-tmp-"
REPLACED_TAG = ".gqa_t5x-old-"
WRITER_FILE = ".gqa_t5x-writer.json"

logger = logging.getLogger(__name__)


class DestinationExistsError(FileExistsError):
    """The destination of a write holds something that must not be replaced."""


def _process_start(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot (Linux), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces, so split after ')'.
    return stat.rsplit(")", 1)[-1].split()[19]


@dataclasses.dataclass(frozen=True)
class WriterInfo:
    """Who writes (or wrote) a staging directory.

    Attributes:
      host: host name of the writing process ('' when the record is unreadable).
      pid: its process id (0 when unreadable).
      process_start: its start time from /proc (tells a reused pid apart).
      started: when the write began (ISO 8601).
    """

    host: str
    pid: int
    process_start: str | None
    started: str

    @classmethod
    def current(cls) -> WriterInfo:
        """The record of this process."""
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            process_start=_process_start(os.getpid()),
            started=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        )

    def is_alive(self) -> bool | None:
        """False for a dead writer, True for a live one, None if on another host."""
        if self.pid <= 0:
            return False
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # alive, owned by another user
        current = _process_start(self.pid)
        return not (self.process_start and current and current != self.process_start)

    def __str__(self) -> str:
        if self.pid <= 0:
            return "an unknown writer (unreadable record)"
        return f"pid {self.pid} on {self.host} (started {self.started})"


def writer_of(directory: PathLike | Path) -> WriterInfo | None:
    """The writer of an unfinished directory, or None for a finished one.

    Args:
      directory: a directory (a missing one has no writer).

    Returns:
      The `WriterInfo` recorded in its `WRITER_FILE`; a record that cannot be
      parsed (its writer was killed while writing it) gives pid 0.
    """
    record = paths.as_path(directory) / WRITER_FILE
    try:
        if not record.is_file():
            return None
        fields = json.loads(record.read_text())
        return WriterInfo(
            host=str(fields["host"]),
            pid=int(fields["pid"]),
            process_start=fields.get("process_start"),
            started=str(fields.get("started", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return WriterInfo(host="", pid=0, process_start=None, started="")


def _siblings(destination: Path, tag: str) -> list[Path]:
    prefix = f".{destination.name}{tag}"
    return [destination.parent / n for n in paths.listdir(destination.parent) if n.startswith(prefix)]


def remove_leftovers(destination: PathLike | Path) -> list[Path]:
    """Removes what killed writes to `destination` left behind; logs one line.

    Removed: staging siblings (`.<name>.gqa_t5x-tmp-*`) whose writer is dead
    or unrecorded; the destination itself when it holds the `WRITER_FILE` of a
    dead writer (in-place writing, as on object storage); replaced checkpoints
    moved aside (`.<name>.gqa_t5x-old-*`) when the destination exists (the
    rename that superseded them finished). Kept, with a log line: leftovers of live writers or of
    writers on other hosts, and a moved-aside checkpoint whose replacement
    never arrived (the only copy left).

    Args:
      destination: the directory about to be written.

    Returns:
      The paths removed.
    """
    destination = paths.absolute(destination)
    removed: list[Path] = []
    kept: list[str] = []
    for staging in [*_siblings(destination, STAGING_TAG), destination]:
        writer = writer_of(staging)
        if staging == destination and writer is None:
            continue  # a finished directory (or nothing) at the destination
        alive = writer.is_alive() if writer is not None else False
        if alive is False:
            paths.rmtree(staging)
            removed.append(staging)
        else:
            kept.append(f"{staging} (being written by {writer})")
    for old in _siblings(destination, REPLACED_TAG):
        if destination.exists():
            paths.rmtree(old)
            removed.append(old)
        else:
            kept.append(
                f"{old} (the checkpoint an interrupted overwrite was replacing; move it "
                f"back to {destination} or delete it)"
            )
    if removed:
        logger.warning(
            "Removed %d leftover(s) of killed writes to %s: %s",
            len(removed), destination, ", ".join(p.name for p in removed),
        )
    if kept:
        logger.warning("Kept leftover(s) next to %s: %s", destination, "; ".join(kept))
    return removed


def check_destination(
    destination: PathLike | Path,
    *,
    overwrite: bool,
    describe: Callable[[Path], str | None],
) -> None:
    """Errors unless `destination` may be written (absent, empty or replaceable).

    Args:
      destination: the directory to write.
      overwrite: whether an existing checkpoint there may be replaced.
      describe: says what a non-empty directory holds ('a gqa_t5x checkpoint'),
        or None when it is not a checkpoint; such directories are never
        replaced, with or without `overwrite`.

    Raises:
      DestinationExistsError: the destination is a file, holds something
        other than a checkpoint, is being written by another process, or
        holds a checkpoint and `overwrite` is False.
      StorageError: a gs:// destination's storage does not answer in time
        (`deadlines`).
    """
    destination = paths.as_path(destination)
    paths.check_reachable(destination)  # gs://: fail within the storage timeout, not in a client
    if not destination.exists():
        return
    if not destination.is_dir():
        raise DestinationExistsError(f"{destination} exists and is not a directory; choose a directory path.")
    if not paths.listdir(destination):
        return
    writer = writer_of(destination)
    if writer is not None:
        raise DestinationExistsError(
            f"{destination} is being written by {writer}; wait for that write to "
            f"finish or choose another destination."
        )
    what = describe(destination)
    if what is None:
        raise DestinationExistsError(
            f"{destination} is a non-empty directory that holds no checkpoint; "
            f"refusing to replace it (choose another directory)."
        )
    if not overwrite:
        raise DestinationExistsError(
            f"{destination} already holds {what}; pass overwrite=True (--overwrite) to replace it."
        )


def _sync_directory(directory: Path) -> None:
    """Flushes a local directory's entries (renames, new files) to disk."""
    fd = os.open(os.fspath(directory), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicDirectory:
    """A directory that appears complete at its destination, or not at all.

    Usage:
      with AtomicDirectory(out, marker="manifest.json", describe=..., overwrite=False) as target:
        write files under target.path
        target.publish(manifest_text)    # the marker, written last
      # an exception in the block (or leaving it unpublished) deletes target.path

    Args:
      destination: where the directory must appear (local path or gs:// URL).
      marker: name of the completion marker, the file `publish` writes last.
      describe: as for `check_destination`.
      overwrite: replace a checkpoint already at `destination`.
      publish_by_rename: stage in a hidden sibling and rename (default on a
        local filesystem) or write in place with the marker last (default on
        object storage). Setting False locally gives object-storage behaviour.

    Raises:
      DestinationExistsError: see `check_destination`.
      ValueError: `marker` is not a plain file name, or rename publishing was
        requested on object storage.
    """

    def __init__(
        self,
        destination: PathLike | Path,
        *,
        marker: str,
        describe: Callable[[Path], str | None],
        overwrite: bool = False,
        publish_by_rename: bool | None = None,
    ) -> None:
        if not marker or "/" in marker or marker in (".", "..", WRITER_FILE):
            raise ValueError(f"marker={marker!r} must be a plain file name.")
        self.destination = paths.absolute(paths.as_path(destination, name="destination"))
        by_rename = paths.has_atomic_rename(self.destination) if publish_by_rename is None else publish_by_rename
        if by_rename and not paths.has_atomic_rename(self.destination):
            raise ValueError(f"{self.destination}: object storage cannot publish by rename.")
        self.marker = marker
        self._by_rename = by_rename
        self._describe = describe
        self._overwrite = overwrite
        self._done = False
        remove_leftovers(self.destination)
        check_destination(self.destination, overwrite=overwrite, describe=describe)
        if by_rename:
            self.path = self.destination.parent / f".{self.destination.name}{STAGING_TAG}{uuid.uuid4().hex[:12]}"
            paths.makedirs(self.destination.parent)
            self.path.mkdir()
        else:
            if paths.listdir(self.destination):  # a checkpoint `overwrite` allows replacing
                logger.warning(
                    "Deleting the existing checkpoint at %s before writing the new one "
                    "(object storage has no atomic replace).", self.destination,
                )
                paths.rmtree(self.destination)
            paths.makedirs(self.destination)
            self.path = self.destination
        paths.write_file(self.path / WRITER_FILE, json.dumps(dataclasses.asdict(WriterInfo.current())))

    def publish(self, marker_data: str | bytes) -> Path:
        """Writes the completion marker last and makes the directory appear.

        Args:
          marker_data: contents of the marker file.

        Returns:
          The destination.

        Raises:
          DestinationExistsError: something appeared at the destination
            meanwhile that may not be replaced (the staging directory is kept
            until `abort`).
        """
        if self._done:
            raise ValueError(f"{self.destination}: already published or aborted.")
        (self.path / WRITER_FILE).unlink()
        paths.write_file(self.path / self.marker, marker_data)
        if not self._by_rename:
            self._done = True
            return self.destination
        _sync_directory(self.path)
        check_destination(self.destination, overwrite=self._overwrite, describe=self._describe)
        old = None
        if self.destination.exists():
            old = self.destination.parent / f".{self.destination.name}{REPLACED_TAG}{uuid.uuid4().hex[:12]}"
            paths.rename(self.destination, old)
        try:
            paths.rename(self.path, self.destination)
        except OSError:
            if old is not None:
                paths.rename(old, self.destination)
            raise
        self._done = True
        _sync_directory(self.destination.parent)
        if old is not None:
            paths.rmtree(old)
        return self.destination

    def abort(self) -> None:
        """Deletes everything staged; a published destination is untouched."""
        if not self._done:
            self._done = True
            paths.rmtree(self.path)

    @property
    def done(self) -> bool:
        """True once published or aborted."""
        return self._done

    def __enter__(self) -> AtomicDirectory:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, traceback: Any) -> None:
        published = self._done
        self.abort()
        if exc is not None and not published and space.is_out_of_space(exc):
            raise space.NoSpaceError(
                str(self.destination), "the write was stopped and its partial output removed; nothing at "
                "the destination changed (a checkpoint already there is intact). Free space and rerun."
            ) from exc
