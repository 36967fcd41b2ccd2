"""The errors a command reports in one line, and the exit status of each.

* `UsageError` (and the built-in exceptions in `CONFIG_ERRORS` raised before
  a run has validated its inputs): the user asked for something impossible
  (a flag, a gin macro, a path, a head count). Exit status 2.
* `RunError`: a run that had validated its inputs failed while running (bad
  data deep in a file, a full disk, a diverged loss). Exit status 1.
* `Preempted`: a training run stopped on SIGTERM/SIGINT after saving a
  checkpoint at an agreed step; rerunning the command resumes it. Exit
  status 75 (EX_TEMPFAIL of sysexits.h: a temporary failure, retry).
* Anything else is a bug or an environment failure. Exit status 1.

Library code raises the most specific built-in or project exception; only the
command line (`gqa_t5x.cli`) turns them into messages and exit statuses.
"""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130

_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): ")

# Exceptions that mean "the request cannot be carried out as given".
CONFIG_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


class UsageError(ValueError):
    """A command-line or gin-configuration error (exit status 2)."""


class ExplainedFailure(Exception):
    """A failure of the environment whose message says all (exit status 1).

    A full disk, for example: the one line names the path and what was kept,
    so no exception type and no traceback hint are printed with it.
    """


class RunError(RuntimeError):
    """A run failed after its inputs were validated (exit status 1).

    Attributes:
      cause: The exception that stopped the run.
    """

    def __init__(self, cause: BaseException):
        super().__init__(describe(cause))
        self.cause = cause


class Preempted(Exception):
    """A run stopped on a preemption signal after saving (exit status 75)."""


def describe(error: BaseException) -> str:
    """The first non-empty line of an exception's message (or its type).

    TensorFlow reports an exception raised while tracing a `tf.data` function
    as "in user code:" followed by a traceback; the error at its end is what
    the user needs to see.
    """
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0] == "in user code:":
        raised = [line for line in lines if _RAISED.match(line)]
        if raised:
            return raised[-1]
    return lines[0]


def exit_status(error: BaseException) -> int:
    """The exit status a command ends with after `error`."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, Preempted):
        return EXIT_PREEMPTED
    if isinstance(error, RunError):
        return EXIT_FAILURE
    if isinstance(error, (UsageError, *CONFIG_ERRORS)):
        return EXIT_USAGE
    return EXIT_FAILURE
