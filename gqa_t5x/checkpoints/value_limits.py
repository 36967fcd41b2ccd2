"""Plausibility limits for checkpoint values: a corrupted checkpoint is refused.

A flipped bit in the exponent of a float32 turns a weight of 0.02 into ~1e36
(high bit) or ~4e17 (next bit); the file still parses, and our writer would
store the value with a fresh, valid crc32. So every reader checks each
tensor as it is read (`CheckpointReader.read`: conversion, export, eval,
infer and a training run's INITIAL_CHECKPOINT_PATH), and a training run
resuming from its own Orbax checkpoint checks the restored parameters on
their devices (`check_tree`); either stops, naming the parameter, on

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

`allow_unusual_values=True` (CLI: `--allow_unusual_values` of convert,
export, train, eval and infer; gin: `ALLOW_UNUSUAL_VALUES = True`) reads such
a checkpoint anyway, for models that really hold such values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MAX_ABS_VALUE = 1e4
OVERRIDE = "--allow_unusual_values (gin: ALLOW_UNUSUAL_VALUES = True)"


class UnusualValuesError(ValueError):
    """A checkpoint tensor holds non-finite or implausibly large values.

    A ValueError (exit status 2, as the other checkpoint errors): the
    checkpoint given cannot be used as it is.
    """


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
    raise _error(source, key, count, float(array[index]), index)


def _error(source: str, key: str, count: int, value: float | None, index: tuple[int, ...]) -> UnusualValuesError:
    large = f"implausibly large (|x| > {MAX_ABS_VALUE:g})"
    if value is None:  # Held partly by other hosts: no value to show.
        found = f"{count} non-finite or {large} value(s)"
    else:
        kind = "non-finite" if not np.isfinite(value) else large
        found = f"{count} {kind} value(s), the first {value:.6g} at index {index}"
    return UnusualValuesError(
        f"{source}: parameter {key!r} holds {found}; trained T5 weights are finite and far smaller, so the "
        f"checkpoint is probably corrupted. Nothing was written. If the values are intended, "
        f"pass {OVERRIDE}."
    )


@jax.jit
def _bad_counts(leaves: list[jax.Array]) -> list[jax.Array]:
    return [jnp.sum(~jnp.isfinite(x) | (jnp.abs(x) > MAX_ABS_VALUE)) for x in leaves]


def check_tree(tree: Mapping[str, Any], *, source: str) -> None:
    """`check_values` for a tree of (possibly sharded, multi-host) jax arrays.

    The counts are reduced where the arrays live (one jitted program for the
    whole tree, a scalar per parameter comes back), so nothing is gathered
    to the host unless a parameter is bad.

    Args:
      tree: nested parameters (e.g. a restored `TrainState.params`).
      source: the checkpoint, named in the error.

    Raises:
      UnusualValuesError: naming the first bad parameter (T5X path).
    """
    flat = [(k, v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
            if jnp.issubdtype(jnp.result_type(v), jnp.floating)]
    if not flat:
        return
    counts = jax.device_get(_bad_counts([v for _, v in flat]))
    for (path, value), count in zip(flat, counts):
        if int(count):
            key = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
            host = np.asarray(jax.device_get(value)) if value.is_fully_addressable else None
            if host is None:  # Another host holds part of it: name it without the value.
                raise _error(source, key, int(count), None, ())
            check_values(host, key=key, source=source)
