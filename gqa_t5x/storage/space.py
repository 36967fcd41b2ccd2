"""Full disks and quotas: recognise the error, name the path, lose nothing.

A write that runs out of space fails in different clothes: an `OSError` with
errno ENOSPC (28) or EDQUOT (122) from Python, a tensorstore `ValueError`
("RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']")
from Orbax's array writes, often re-raised by another layer. `is_out_of_space`
looks through the whole chain of causes; `NoSpaceError` is the one error a
command then reports: "no space left on <path>: ...", saying what was kept.

Writers keep their output whole or absent (temporary directories renamed
into place, see `atomic.py` and `training/train_state.py`), so the previous
checkpoint survives a full disk; the callers remove the partial output of
the failed write and raise `NoSpaceError`.
"""

from __future__ import annotations

import errno
import logging
import re

from gqa_t5x.errors import ExplainedFailure

_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os_error_code='(28|122)'")


class NoSpaceError(OSError, ExplainedFailure):
    """A write failed because its filesystem (or quota) is full."""

    def __init__(self, path: str, detail: str):
        super().__init__(errno.ENOSPC, f"no space left on {path}: {detail}")

    def __str__(self) -> str:
        return str(self.strerror)


def is_out_of_space(error: BaseException | None) -> bool:
    """Whether `error`, or any exception it was raised from, is a full disk or quota."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _ERRNOS:
            return True
        if _TEXT.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


class _DropNoSpaceRecords(logging.Filter):
    """Drops the library log records of a full disk (the run's error says it once).

    Orbax writes each array in its own future; when the disk fills, every one
    of them fails with the same error, asyncio logs each unread one ("Future
    exception was never retrieved") and Orbax's writer thread logs it again:
    tens of lines that bury the one line the run ends with.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (is_out_of_space(exc) or _TEXT.search(record.getMessage()))


_FILTER = _DropNoSpaceRecords()
_LIBRARY_LOGGERS = ("asyncio", "absl")


def quiet_repeated_space_errors() -> None:
    """Installs `_DropNoSpaceRecords` on the asyncio and absl loggers (idempotent)."""
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
