"""The table of checkpoint formats, and detection / opening through it.

Every format module (t5x_legacy, t5x_orbax, mesh_tf, huggingface, native)
registers one `CheckpointFormat` at import time: how to recognise it, its
reader, optionally an exporter, and a line of documentation. Nothing here
names a format; `detect_format` and `open_checkpoint` ask every registered
one, so a directory that two formats claim (a HuggingFace model copied beside
a T5X `checkpoint` file) is reported with both, instead of being read as
whichever was tried first.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from gqa_t5x.checkpoints.base import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReader,
    IncompleteCheckpointError,
)
from gqa_t5x.model.config import T5Config
from gqa_t5x.storage import atomic, paths
from gqa_t5x.storage.paths import Path, PathLike


class AmbiguousCheckpointError(CheckpointError):
    """A path holds checkpoints of more than one format."""


@dataclasses.dataclass(frozen=True)
class CheckpointFormat:
    """One checkpoint format.

    Attributes:
      name: the name used by `open_checkpoint(format=...)` and the CLI.
      doc: what detection looks for, one line (shown when nothing is found).
      detect: `detect(path) -> path to open | None`. `path` is what the user
        gave: a directory, a file inside the checkpoint, or a prefix. It
        reads only small files, and raises `CheckpointError` for a checkpoint
        of this format that cannot be opened as given (incomplete, ambiguous).
      reader: `reader(path, *, config, num_heads, head_dim)` -> a
        `CheckpointReader`, given what `detect` returned.
      exporter: `exporter(checkpoint, directory, *, overwrite, dtype,
        progress) -> directory` writing any readable checkpoint in this
        format, when the format can be written.
      supersedes: formats whose detection also fires on this format's layout
        (ours holds an Orbax tree in `state/`); when both match, this one is
        meant and the other is dropped.
    """

    name: str
    doc: str
    detect: Callable[[Path], Path | None]
    reader: Callable[..., CheckpointReader]
    exporter: Callable[..., Path] | None = None
    supersedes: tuple[str, ...] = ()


_FORMATS: dict[str, CheckpointFormat] = {}


def register_format(fmt: CheckpointFormat) -> CheckpointFormat:
    """Adds a format to the table (each name once).

    Args:
      fmt: the format.

    Returns:
      `fmt`.

    Raises:
      ValueError: the name is taken by another format, or is not an identifier.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", fmt.name):
        raise ValueError(f"Checkpoint format name {fmt.name!r} must be lower_snake_case.")
    if fmt.name in _FORMATS and _FORMATS[fmt.name] is not fmt:
        raise ValueError(f"Checkpoint format {fmt.name!r} is already registered.")
    _FORMATS[fmt.name] = fmt
    return fmt


def formats() -> tuple[CheckpointFormat, ...]:
    """The registered formats, in registration order."""
    return tuple(_FORMATS.values())


def format_names() -> tuple[str, ...]:
    """Names of the registered formats."""
    return tuple(_FORMATS)


def get_format(name: str) -> CheckpointFormat:
    """The format called `name`.

    Raises:
      CheckpointError: no such format (the message lists the known ones).
    """
    if name not in _FORMATS:
        raise CheckpointError(f"Unknown checkpoint format {name!r}; choose one of {list(_FORMATS)}.")
    return _FORMATS[name]


def _refuse_unfinished(path: Path) -> None:
    directory = path if path.is_dir() else path.parent
    writer = atomic.writer_of(directory)
    if writer is not None:
        raise IncompleteCheckpointError(
            f"{directory} is incomplete: it is still being written by {writer}, or "
            f"that write was killed. Wait for it, or rerun the conversion/export "
            f"(which removes what a killed write left)."
        )


def detect_format(path: PathLike | Path, *, format: str | None = None) -> tuple[str, str] | None:
    """Identifies the checkpoint at `path`.

    Args:
      path: a checkpoint directory, a file in it that names it (the T5X
        `checkpoint` file, a TF `.index` file or prefix, a HuggingFace
        `config.json` or weights file, our manifest), or a gs:// URL.
      format: only consider this format (to choose between several).

    Returns:
      (format name, path to open) or None when nothing is recognised.

    Raises:
      IncompleteCheckpointError: the directory is unfinished (being written,
        or left by a killed write) or lacks its completion marker.
      AmbiguousCheckpointError: several formats are present; the message
        lists them and how to choose one.
      CheckpointError: unknown `format`, or a format-specific ambiguity.
      StorageError: a gs:// endpoint does not answer in time, or refuses
        access without credentials (`storage.deadlines`).
    """
    path = paths.as_path(path)
    paths.check_reachable(path)  # gs://: a stalled endpoint fails here, within the storage timeout
    candidates = (get_format(format),) if format is not None else formats()
    _refuse_unfinished(path)
    found = {}
    for fmt in candidates:
        resolved = fmt.detect(path)
        if resolved is not None:
            found[fmt.name] = resolved
    for name in list(found):
        for dropped in _FORMATS[name].supersedes:
            found.pop(dropped, None)
    if not found:
        return None
    if len(found) > 1:
        listing = "; ".join(f"{name} ({where})" for name, where in found.items())
        raise AmbiguousCheckpointError(
            f"{path} holds checkpoints of {len(found)} formats: {listing}. Choose one "
            f"with open_checkpoint(path, format=...) (CLI: --source_format "
            f"{next(iter(found))}), "
            f"or move the other files away."
        )
    name, resolved = next(iter(found.items()))
    return name, str(resolved)


def describe_existing(path: PathLike | Path) -> str | None:
    """What a directory holds, for destination checks: 'a <format> checkpoint',
    'an unreadable checkpoint (...)', or None when it holds no checkpoint."""
    try:
        found = detect_format(path)
    except CheckpointError as e:
        return f"an incomplete or unreadable checkpoint ({str(e).splitlines()[0]})"
    except paths.deadlines.StorageError:
        raise  # storage did not answer: nothing is known about the directory
    except OSError:
        return None
    return f"a {found[0]} checkpoint" if found else None


def not_found_message(path: PathLike | Path, *, format: str | None = None) -> str:
    """Error text for a path holding no recognised checkpoint."""
    path = paths.as_path(path)
    looked_for = "; ".join(
        f"{f.name}: {f.doc}" for f in ((get_format(format),) if format else formats())
    )
    hint = ""
    if path.is_dir():
        steps = sorted(
            (int(m.group(1)), name)
            for name in paths.listdir(path)
            if (m := re.fullmatch(r"checkpoint_(\d+)", name)) and (path / name).is_dir()
        )
        if steps:
            hint = (
                f" It holds {len(steps)} step directories; pass one of them, e.g. the "
                f"latest {path / steps[-1][1]}."
            )
    elif not path.exists():
        hint = " The path does not exist."
    return f"No checkpoint found at {path}: looked for {looked_for}.{hint}"


def open_checkpoint(
    path: PathLike | Path,
    *,
    format: str | None = None,
    config: T5Config | None = None,
    head_dim: int | None = None,
    num_heads: int | None = None,
    allow_unusual_values: bool = False,
) -> CheckpointReader:
    """Opens a checkpoint of any registered format for lazy reading.

    Args:
      path: checkpoint directory (or a file naming it: T5X `checkpoint`, a TF
        prefix or `.index`, HuggingFace `config.json`, our manifest); a local
        path or a gs:// URL.
      format: the format to read it as, when `path` holds several (see
        `format_names()`); detected when None.
      config: the expected config; tensor shapes are checked against it
        instead of inferring one.
      head_dim: width of an attention head, for checkpoints whose head count
        cannot be read from the tensors.
      num_heads: number of query heads, likewise.
      allow_unusual_values: read non-finite values and values with
        |x| > 1e4 without complaint (otherwise `read` refuses them,
        `value_limits`).

    Returns:
      A `CheckpointReader` (index read, no tensor loaded yet).

    Raises:
      CheckpointNotFoundError: nothing recognised at `path`.
      AmbiguousCheckpointError: several formats at `path` and no `format`.
      IncompleteCheckpointError: an unfinished or unmarked directory.
      CheckpointError: config/shape mismatch, missing or unexpected parameters.
      CorruptCheckpointError: unreadable or truncated files (named).
    """
    found = detect_format(path, format=format)
    if found is None:
        raise CheckpointNotFoundError(not_found_message(path, format=format))
    name, resolved = found
    reader = _FORMATS[name].reader(resolved, config=config, num_heads=num_heads, head_dim=head_dim)
    reader.check_values = not allow_unusual_values
    return reader
