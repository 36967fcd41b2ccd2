"""One path layer for every path gqa_t5x accepts or writes (local or gs://).

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

Single files that must never be seen half-written (config.gin, metrics,
results, sweep markers, predictions) are written with `replace_file` /
`replacing`: locally a temporary sibling renamed into place, on object
storage one upload (an object appears whole or not at all).

Which client serves gs:// (`configure_clients`, run at import): epath uses
tf.io.gfile when TensorFlow is installed, gcsfs when EPATH_USE_TF=false.
tf.io.gfile cannot be pointed at an emulator, so when STORAGE_EMULATOR_HOST
is set the defaults switch epath to gcsfs (see docs/training.md, "Storage").

Bounded waits (`deadlines`): on gs:// the functions here first check, once
per bucket, that storage answers (`check_reachable`), and run their requests
with the timeout and retries of GQA_T5X_STORAGE_TIMEOUT_S / _RETRIES /
_BACKOFF_S; a stall ends in `StorageTimeoutError` naming the URL. The
clients' own timeouts carry the same policy (`configure_clients`). Local
paths are untouched by all of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

from etils import epath

from gqa_t5x.storage import deadlines
from gqa_t5x.storage.deadlines import check_reachable

Path = epath.Path
PathLike = str | os.PathLike
T = TypeVar("T")

_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)
_GCS = re.compile(r"gs://([^/]+)/?(.*)", re.DOTALL)

EMULATOR_HOST_VAR = "STORAGE_EMULATOR_HOST"
# Values `configure_clients` set (it replaces them, not the user's, when the
# policy changes): environment variables, and fsspec's gcs options. The
# variables are listed in APPLIED_VAR for child processes, which inherit
# them and must still tell them from the user's.
APPLIED_VAR = "GQA_T5X_STORAGE_CLIENT_DEFAULTS"
_applied_environ: dict[str, str] = {}
_applied_gcs_options: dict[str, Any] = {}
# Set (unless the user set them) when STORAGE_EMULATOR_HOST names an emulator.
_EMULATOR_DEFAULTS = {
    # epath's gs:// client: gcsfs, which honours STORAGE_EMULATOR_HOST
    # (tf.io.gfile talks to googleapis.com only). Read once per process.
    "EPATH_USE_TF": "false",
    # gcsfs would probe every bucket over gRPC for zonal/HNS features first.
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
}


class RemotePathError(ValueError):
    """An operation that needs a local file was given an object-storage URL."""


def emulator_host() -> str | None:
    """The GCS emulator named by STORAGE_EMULATOR_HOST, or None for real GCS."""
    host = os.environ.get(EMULATOR_HOST_VAR, "")
    return None if host in ("", "default") else host


def _set_default(values: dict[str, Any], target: dict[str, Any], applied: dict[str, Any]) -> dict[str, Any]:
    """Sets each of `values` in `target` unless set there by someone else.

    Returns:
      The entries set or changed.
    """
    changed = {}
    for key, value in values.items():
        current = target.get(key)
        if current is None or (key in applied and applied[key] == current and current != value):
            target[key] = applied[key] = changed[key] = value
    return changed


def configure_clients() -> dict[str, str]:
    """Sets the gs:// clients' defaults; runs when this module is imported.

    Always: gcsfs (epath's gs:// client when EPATH_USE_TF=false) does not
    cache directory listings, since tensorstore, Orbax and other hosts write
    the same directories and a cached listing would hide their files.

    Always, unless set otherwise: the clients' timeouts and retries follow
    GQA_T5X_STORAGE_TIMEOUT_S / _RETRIES / _BACKOFF_S (`deadlines`): gcsfs's
    `requests_timeout`, and tf.io.gfile's and tensorstore's variables
    (`deadlines.client_environment`). An invalid GQA_T5X_STORAGE_* value
    leaves them at the clients' defaults here; the first gs:// access then
    reports it.

    With STORAGE_EMULATOR_HOST set, unless set otherwise: EPATH_USE_TF=false
    (epath uses gcsfs, which honours the emulator; tf.io.gfile cannot),
    TENSORSTORE_GCS_HTTP_URL=the emulator (array data goes there too, not
    to real GCS), GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, and anonymous
    gcsfs access. epath and gcsfs read their variables once per process, so
    this must run before the first gs:// access (call it again after setting
    STORAGE_EMULATOR_HOST or GQA_T5X_STORAGE_* at run time). The variables
    set are listed in GQA_T5X_STORAGE_CLIENT_DEFAULTS, so that a child
    process with another policy replaces them.

    Returns:
      The environment variables this call set.
    """
    import fsspec

    gcs_options = fsspec.config.conf.setdefault("gcs", {})
    gcs_options.setdefault("use_listings_cache", False)
    environ: dict[str, str] = {}
    try:
        policy = deadlines.Policy.from_environment()
    except ValueError:
        policy = None
    if policy is not None:
        _set_default(deadlines.gcsfs_options(policy), gcs_options, _applied_gcs_options)
        environ.update(deadlines.client_environment(policy))
    url = deadlines.emulator_url()
    if url is not None:
        gcs_options.setdefault("token", "anon")
        environ.update({**_EMULATOR_DEFAULTS, "TENSORSTORE_GCS_HTTP_URL": url})
    try:
        inherited = json.loads(os.environ.get(APPLIED_VAR, "{}"))
    except ValueError:
        inherited = {}
    if isinstance(inherited, dict):
        for key, value in inherited.items():
            if os.environ.get(key) == value:
                _applied_environ.setdefault(key, value)
    current = dict(os.environ)
    applied = _set_default(environ, current, _applied_environ)
    os.environ.update(applied)
    if _applied_environ:
        os.environ[APPLIED_VAR] = json.dumps(_applied_environ, sort_keys=True)
    return applied


def _bounded(path: Path, what: str, call: Callable[[], T], *, retry: bool = True) -> T:
    """`call()` for a local path; on gs:// after `check_reachable`, with a deadline."""
    if not deadlines.is_gcs(path):
        return call()
    url = os.fspath(path)
    check_reachable(url)
    return deadlines.bounded(call, url=url, what=what, retry=retry)


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

    def names() -> list[str]:
        if not directory.is_dir():
            return []
        return sorted(child.name for child in directory.iterdir())

    return _bounded(directory, "listing a directory", names)


def makedirs(directory: PathLike | Path) -> Path:
    """Creates a local directory and its parents (existing ones are fine).

    On object storage directories are implicit (a prefix exists once an
    object lies under it), so nothing is created: no placeholder objects,
    and never a bucket (gcsfs would create a missing one). A gs:// bucket is
    checked to answer (`check_reachable`), so that a run writing there fails
    at once, not in the middle.

    Returns:
      The directory, as a `Path`.

    Raises:
      StorageTimeoutError: storage does not answer (see `deadlines`).
    """
    directory = as_path(directory)
    if not is_remote(directory):
        directory.mkdir(parents=True, exist_ok=True)
    else:
        check_reachable(directory)
    return directory


def walk(directory: PathLike | Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """`os.walk` (top-down) for a local directory or a gs:// prefix.

    Yields:
      (directory, subdirectory names, file names); removing names from the
      subdirectory list skips them, as with `os.walk`. Directories are
      `Path`s, URLs for a URL (epath's gcsfs walk drops the scheme).
    """
    directory = as_path(directory)
    scheme = _URL.match(os.fspath(directory))
    steps = directory.walk(top_down=True)
    while True:  # each step (one directory listed) bounded on gs://
        step = _bounded(directory, "listing a directory tree", lambda: next(steps, None))
        if step is None:
            return
        root, dirs, files = step
        text = os.fspath(root)
        if scheme and not is_remote(text):
            text = scheme.group(0) + text.lstrip("/")
        yield as_path(text), dirs, files


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
    """Deletes a directory tree (or file); a missing path is not an error.

    On gs:// the checks are bounded as a whole; the deletion, whose length
    grows with the tree, by the clients' per-request timeouts.
    """
    path = as_path(path)

    def kind() -> str | None:
        return "directory" if path.is_dir() else "file" if path.exists() else None

    found = _bounded(path, "checking a path", kind)
    if found == "directory":
        path.rmtree(missing_ok=True)
    elif found == "file":
        path.unlink()


def write_file(path: PathLike | Path, data: str | bytes) -> None:
    """Writes a whole file; on a local filesystem it is flushed to disk (fsync).

    Meant for small files (metadata, markers): on gs:// the write is bounded
    as a whole by the storage timeout (`deadlines`).

    Args:
      path: the file (its directory must exist).
      data: text (UTF-8) or bytes.
    """
    path = as_path(path)
    payload = data.encode() if isinstance(data, str) else data

    def write() -> None:
        with path.open("wb") as f:
            f.write(payload)
            if not is_remote(path):
                f.flush()
                os.fsync(f.fileno())

    _bounded(path, "writing a file", write)


class _Utf8Writer:
    """Text writes encoded as UTF-8 onto a binary file (any client, any locale)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw

    def write(self, text: str) -> int:
        self._raw.write(text.encode("utf-8"))
        return len(text)


def _staging_name(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"


def replace_file(path: PathLike | Path, data: str | bytes) -> None:
    """Writes a whole file that readers see complete or not at all.

    Local: a temporary sibling, flushed to disk, renamed over `path`.
    Object storage: one upload, which publishes the object whole when it
    completes (a killed upload leaves the previous object, or nothing);
    bounded as a whole on gs:// (`deadlines`), so meant for small files.

    Args:
      path: the file (its directory is created if needed).
      data: text (UTF-8) or bytes.
    """
    path = as_path(path)
    makedirs(path.parent)
    if is_remote(path):
        payload = data.encode() if isinstance(data, str) else data
        _bounded(path, "writing a file", lambda: path.write_bytes(payload))
        return
    tmp = _staging_name(path)
    try:
        write_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def replacing(path: PathLike | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Streams a file that appears at `path` whole when the block ends cleanly.

    Usage:
      with paths.replacing(out) as f:
        for line in lines: f.write(line)

    The file is written under a temporary name beside `path` (a hidden
    sibling locally, a hidden object on object storage) and renamed over
    `path` at the end (on object storage a server-side copy, which publishes
    the object whole). An exception in the block deletes the temporary file
    and leaves `path` as it was. On gs:// the streamed upload is bounded by
    the clients' per-request timeouts, the publishing copy as a whole.

    Args:
      path: the file (its directory is created if needed).
      mode: 'w' (text, UTF-8) or 'wb'.

    Yields:
      The open file.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r}: use 'w' or 'wb'.")
    path = as_path(path)
    makedirs(path.parent)
    tmp = _staging_name(path)
    try:
        with tmp.open("wb") as f:
            yield _Utf8Writer(f) if mode == "w" else f
            if not is_remote(path):
                f.flush()
                os.fsync(f.fileno())
        if is_remote(path):
            _bounded(path, "publishing a file", lambda: tmp.replace(path), retry=False)
        else:
            os.replace(tmp, path)
    except BaseException as error:
        # After a storage timeout, cleaning up would wait as long again.
        if not isinstance(error, deadlines.StorageError) and _bounded(tmp, "checking a path", tmp.exists):
            tmp.unlink()
        raise


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


def tensorstore_context() -> Any:
    """The tensorstore context to open `kvstore_spec`s with (a `ts.Context`).

    It holds the gs:// retry policy (`gcs_request_retries`, from
    GQA_T5X_STORAGE_RETRIES / _BACKOFF_S, see `deadlines`); with an invalid
    value, the default policy's (the path layer's first gs:// access reports
    the value).
    """
    import tensorstore as ts

    try:
        policy = deadlines.Policy.from_environment()
    except ValueError:
        policy = deadlines.Policy()
    return ts.Context({"gcs_request_retries": deadlines.tensorstore_retries(policy)})


def kvstore_spec(path: PathLike | Path) -> dict[str, Any]:
    """A tensorstore kvstore spec for a local directory or a gs:// URL.

    Open it with `tensorstore_context()`, which carries the retry policy.

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


configure_clients()
