"""One path layer for every path the checkpoints and conversion read or write.

Paths are `etils.epath.Path` objects (what Orbax and T5X use), so a local
path and an object-storage URL such as `gs://bucket/run/checkpoint_1000000`
are handled by the same code: `as_path(p)` / `p / 'name'` / `p.exists()` /
`p.is_dir()` / `p.open()` / `listdir(p)` / `rmtree(p)`. A URL is never turned
into a local path: `pathlib.Path('gs://b/x')` is the local `gs:/b/x`, and
even `epath.Path('gs://b/x').resolve()` prefixes the working directory, which
is why `absolute` exists here.

What object storage lacks is said where it matters: `rename` is atomic only
on a local filesystem (`has_atomic_rename`), and libraries that need an OS
file (mmap, torch's mmap loader) get one from `local_file`, which names the
operation when the path is remote.
"""

from __future__ import annotations

import os
import re
from typing import Any

from etils import epath

Path = epath.Path
PathLike = str | os.PathLike

_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)
_GCS = re.compile(r"gs://([^/]+)/?(.*)", re.DOTALL)


class RemotePathError(ValueError):
    """An operation that needs a local file was given an object-storage URL."""


def as_path(path: PathLike | Path, *, name: str = "path") -> Path:
    """Validates `path` and returns it as an `epath.Path` (URLs kept as URLs).

    Args:
      path: a local path (str / os.PathLike) or a URL such as 'gs://bucket/dir'.
      name: how the caller calls this argument (e.g. '--output'), for errors.

    Returns:
      The `epath.Path`.

    Raises:
      TypeError: `path` is not a string or path object.
      ValueError: `path` is empty.
    """
    if isinstance(path, Path):
        return path
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path or a gs:// URL string, got {type(path).__name__}: {path!r}.")
    text = os.fspath(path)
    if isinstance(text, bytes):
        raise TypeError(f"{name} must be a str path, got bytes {text!r}.")
    if not text.strip():
        raise ValueError(f"{name} is empty; pass a directory path or a gs:// URL.")
    return epath.Path(text)


def is_remote(path: PathLike | Path) -> bool:
    """True for object-storage URLs (any 'scheme://'), False for local paths."""
    return _URL.match(os.fspath(path)) is not None


def has_atomic_rename(path: PathLike | Path) -> bool:
    """Whether directories at `path` can be published by an atomic rename."""
    return not is_remote(path)


def absolute(path: PathLike | Path) -> Path:
    """The absolute form of a local path; a URL unchanged (never made local)."""
    path = as_path(path)
    if is_remote(path):
        return path
    return epath.Path(os.path.abspath(os.fspath(path)))


def is_same_or_inside(path: PathLike | Path, directory: PathLike | Path) -> bool:
    """True when `path` is `directory` or lies below it (no filesystem access).

    Local paths are compared in absolute, normalised form; URLs as strings
    ending at a '/' boundary. A local path is never inside a URL.
    """
    a, b = os.fspath(absolute(path)).rstrip("/"), os.fspath(absolute(directory)).rstrip("/")
    if is_remote(a) != is_remote(b):
        return False
    return a == b or a.startswith(b + "/")


def listdir(directory: PathLike | Path) -> list[str]:
    """Sorted names of the entries of a directory (empty if it does not exist)."""
    directory = as_path(directory)
    if not directory.is_dir():
        return []
    return sorted(child.name for child in directory.iterdir())


def rename(source: PathLike | Path, target: PathLike | Path) -> None:
    """Atomically renames a local file or directory.

    Raises:
      RemotePathError: either path is on object storage, which has no atomic
        rename (publish with a completion marker instead, see `atomic`).
    """
    if is_remote(source) or is_remote(target):
        raise RemotePathError(
            f"cannot rename {os.fspath(source)} to {os.fspath(target)} atomically: "
            f"object storage has no atomic rename."
        )
    os.rename(os.fspath(source), os.fspath(target))


def rmtree(path: PathLike | Path) -> None:
    """Deletes a directory tree (or file); a missing path is not an error."""
    path = as_path(path)
    if path.is_dir():
        path.rmtree(missing_ok=True)
    elif path.exists():
        path.unlink()


def write_file(path: PathLike | Path, data: str | bytes) -> None:
    """Writes a whole file; on a local filesystem it is flushed to disk (fsync).

    Args:
      path: the file (its directory must exist).
      data: text (UTF-8) or bytes.
    """
    path = as_path(path)
    payload = data.encode() if isinstance(data, str) else data
    with path.open("wb") as f:
        f.write(payload)
        if not is_remote(path):
            f.flush()
            os.fsync(f.fileno())


def local_file(path: PathLike | Path, *, purpose: str) -> str:
    """The OS path of a local file, for libraries that need one.

    Args:
      path: the file.
      purpose: what needs the local file, named in the error.

    Raises:
      RemotePathError: `path` is an object-storage URL.
    """
    if is_remote(path):
        raise RemotePathError(
            f"{os.fspath(path)}: {purpose} needs a local file; copy it to local "
            f"disk first (e.g. gsutil -m cp -r)."
        )
    return os.fspath(path)


def _split_gcs(url: str) -> tuple[str, str]:
    """Splits 'gs://bucket/a/b' into ('bucket', 'a/b').

    Raises:
      RemotePathError: `url` is not a gs:// URL.
    """
    m = _GCS.fullmatch(url)
    if m is None:
        raise RemotePathError(f"Not a gs:// URL: {url!r}.")
    return m.group(1), m.group(2)


def kvstore_spec(path: PathLike | Path) -> dict[str, Any]:
    """A tensorstore kvstore spec for a local directory or a gs:// URL.

    Raises:
      RemotePathError: a URL of a scheme tensorstore is not set up for here.
    """
    text = os.fspath(path)
    if is_remote(text):
        if not text.startswith("gs://"):
            raise RemotePathError(
                f"{text}: only local paths and gs:// URLs are supported for array data."
            )
        bucket, key = _split_gcs(text)
        return {"driver": "gcs", "bucket": bucket, "path": key}
    return {"driver": "file", "path": os.path.abspath(text)}
