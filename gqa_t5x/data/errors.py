"""`DataError`: data that does not match what its task reads, as one exception.

The file readers raise `DataError` with a precise message: the file and line,
the field, and the gin binding to change. Raised inside a `tf.data`
generator, TensorFlow would hand the caller a `tf.errors.InvalidArgumentError`
whose text is a Python traceback around that message. So readers raise such
errors through `pipeline_error`, which remembers the message, and whoever
iterates a dataset does so inside `surface_data_errors()`, which turns the
TensorFlow error back into one `DataError` carrying the original message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import tensorflow as tf


class DataError(ValueError):
    """The data cannot be read as its task expects (bad record, field, split)."""


# Messages of DataErrors raised inside tf.data and not yet surfaced.
_RAISED_IN_PIPELINE: set[str] = set()


def pipeline_error(message: str) -> DataError:
    """A `DataError` to raise inside a `tf.data` generator.

    Args:
      message: The precise message (file:line, field, gin binding).

    Returns:
      The error; its message is remembered so that `surface_data_errors` can
      recognise it inside the TensorFlow error that wraps it.
    """
    _RAISED_IN_PIPELINE.add(message)
    return DataError(message)


@contextlib.contextmanager
def surface_data_errors() -> Iterator[None]:
    """Re-raises a TensorFlow error wrapping a `pipeline_error` as that DataError.

    Other errors pass through unchanged.

    Raises:
      DataError: with the message the reader gave, without the wrapping
        TensorFlow traceback text.
    """
    try:
        yield
    except tf.errors.OpError as e:
        text = str(e)
        message = next((m for m in _RAISED_IN_PIPELINE if m in text), None)
        if message is None:
            raise
        _RAISED_IN_PIPELINE.discard(message)
        raise DataError(message) from None
