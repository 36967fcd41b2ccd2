"""Plausibility limits for source values: a corrupted checkpoint stops the conversion.

A flipped bit in the exponent of a float32 turns a weight of 0.02 into ~1e36
(high bit) or ~4e17 (next bit); the file still parses, and our writer would
store the value with a fresh, valid crc32. So `convert_checkpoint` checks
every source tensor as it streams and stops, naming the parameter, on

* non-finite values (NaN, +-inf), or
* values with |x| > MAX_ABS_VALUE = 1e4.

Why 1e4: T5X initialises embeddings with std 1 and kernels with std <= 1;
trained T5.1.1 stays in the same range (google/t5-v1_1-small: embedding std
11.6, the largest tensor; lm_head 1.16; attention and MLP kernels 0.05-1.2;
relative position biases and norm scales of order 1-10). Even a 30-sigma
outlier of that embedding (~350) is 25x below the limit, while an exponent
flip of its top two bits lands 10^12 or more above it for any weight larger
than 1e-8. Smaller corruptions (low exponent or mantissa bits, or flips that
shrink a value) stay plausible and are not detected; crc32 manifests (ours)
catch corruption after writing.

`allow_unusual_values=True` (CLI: `--allow_unusual_values`) converts such a
checkpoint anyway, for models that really hold such values.
"""

from __future__ import annotations

import numpy as np

from gqa_t5x.checkpoints import CorruptCheckpointError

MAX_ABS_VALUE = 1e4


class UnusualValuesError(CorruptCheckpointError):
    """A source tensor holds non-finite or implausibly large values."""


def check_values(array: np.ndarray, *, key: str, source: str) -> None:
    """Raises unless every value of `array` is finite with |x| <= MAX_ABS_VALUE.

    One pass for min and max, no temporary array unless a value is bad.

    Args:
      array: a floating-point parameter.
      key: its parameter path, named in the error.
      source: the checkpoint, named in the error.

    Raises:
      UnusualValuesError: naming the parameter, how many values are bad, the
        first bad value and its index, and the override.
    """
    if array.size == 0:
        return
    low, high = float(array.min()), float(array.max())  # NaN propagates
    if np.isfinite(low) and np.isfinite(high) and max(-low, high) <= MAX_ABS_VALUE:
        return
    bad = ~np.isfinite(array) | (np.abs(array) > MAX_ABS_VALUE)
    count = int(bad.sum())
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), array.shape))
    value = array[index]
    kind = "non-finite" if not np.isfinite(value) else f"implausibly large (|x| > {MAX_ABS_VALUE:g})"
    raise UnusualValuesError(
        f"{source}: parameter {key!r} holds {count} {kind} value(s), the first "
        f"{float(value):.6g} at index {index}; trained T5 weights are finite and far smaller, so the checkpoint is "
        f"probably corrupted. Nothing was written. If the values are intended, pass "
        f"allow_unusual_values=True (--allow_unusual_values)."
    )
