"""Storage: one path layer (local paths and gs:// URLs), atomic directory writes,
and bounded waits on gs:// (`deadlines`: GQA_T5X_STORAGE_TIMEOUT_S / _RETRIES /
_BACKOFF_S; a stalled endpoint ends in a one-line `StorageTimeoutError`).

    from gqa_t5x import storage
    path = storage.as_path("gs://bucket/run/checkpoint_1000000")  # an epath.Path
    storage.replace_file(path.parent / "metrics.json", text)      # whole or not at all
    with storage.AtomicDirectory(out, marker="done.json", describe=...) as target:
        ...                      # write under target.path
        target.publish("{}")     # appears at `out` complete, or not at all
"""

from gqa_t5x.storage.atomic import (
    REPLACED_TAG,
    STAGING_TAG,
    WRITER_FILE,
    AtomicDirectory,
    DestinationExistsError,
    WriterInfo,
    check_destination,
    remove_leftovers,
    writer_of,
)
from gqa_t5x.storage.deadlines import (
    StorageCredentialsError,
    StorageError,
    StorageTimeoutError,
    StorageUnreachableError,
    check_reachable,
)
from gqa_t5x.storage.paths import (
    Path,
    PathLike,
    RemotePathError,
    absolute,
    as_path,
    configure_clients,
    emulator_host,
    has_atomic_rename,
    is_remote,
    is_same_or_inside,
    kvstore_spec,
    listdir,
    local_file,
    makedirs,
    rename,
    replace_file,
    replacing,
    rmtree,
    tensorstore_context,
    walk,
    write_file,
)

__all__ = [
    "REPLACED_TAG",
    "STAGING_TAG",
    "WRITER_FILE",
    "AtomicDirectory",
    "DestinationExistsError",
    "Path",
    "PathLike",
    "RemotePathError",
    "StorageCredentialsError",
    "StorageError",
    "StorageTimeoutError",
    "StorageUnreachableError",
    "WriterInfo",
    "absolute",
    "as_path",
    "check_destination",
    "check_reachable",
    "configure_clients",
    "emulator_host",
    "has_atomic_rename",
    "is_remote",
    "is_same_or_inside",
    "kvstore_spec",
    "listdir",
    "local_file",
    "makedirs",
    "remove_leftovers",
    "rename",
    "replace_file",
    "replacing",
    "rmtree",
    "tensorstore_context",
    "walk",
    "write_file",
    "writer_of",
]
