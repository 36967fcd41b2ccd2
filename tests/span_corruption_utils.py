"""Test helper: the inverse of span corruption, to check what it produced."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import seqio


def undo_span_corruption(
    inputs: Sequence[int], targets: Sequence[int], vocabulary: seqio.Vocabulary
) -> tuple[np.ndarray, np.ndarray]:
    """Rebuilds a segment from span-corrupted inputs and targets.

    Inverse of span corruption, used to check it. Trailing EOS (id 1) is
    ignored. Sentinels must appear in order `<extra_id_0>`, `<extra_id_1>`,
    ... in both sequences.

    Args:
      inputs: Corrupted input ids.
      targets: Target ids.
      vocabulary: The vocabulary that defined the sentinels.

    Returns:
      (tokens, noise_mask): the original segment and its noise mask.
    """
    eos = vocabulary.eos_id
    first_sentinel = vocabulary.vocab_size - 1
    lowest_sentinel = vocabulary.vocab_size - vocabulary.extra_ids

    def runs(ids: Sequence[int], name: str) -> list[list[int]]:
        ids = [int(i) for i in ids]
        if ids and ids[-1] == eos:
            ids = ids[:-1]
        pieces: list[list[int]] = [[]]
        for token in ids:
            if token >= lowest_sentinel:
                expected = first_sentinel - (len(pieces) - 1)
                if token != expected:
                    raise ValueError(
                        f"{name}: sentinel {token} where {expected} was expected."
                    )
                pieces.append([])
            else:
                pieces[-1].append(token)
        return pieces

    kept = runs(inputs, "inputs")  # kept[i] precedes noise span i.
    noise = runs(targets, "targets")  # noise[0] is empty, noise[i + 1] is span i.
    if noise[0] or len(noise) != len(kept):
        raise ValueError(
            f"inputs have {len(kept) - 1} sentinels, targets "
            f"{len(noise) - 1}; they do not come from one segment."
        )
    tokens: list[int] = []
    mask: list[bool] = []
    for i, kept_run in enumerate(kept):
        tokens += kept_run
        mask += [False] * len(kept_run)
        if i + 1 < len(noise):
            tokens += noise[i + 1]
            mask += [True] * len(noise[i + 1])
    return np.asarray(tokens, np.int32), np.asarray(mask, bool)
