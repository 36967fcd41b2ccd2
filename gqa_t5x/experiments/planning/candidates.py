"""Candidate key/value-head configurations of `gqa-t5x plan`.

A candidate fixes the kv heads of every decoder self-attention and every
encoder-decoder attention layer (the layers whose keys and values are
cached while decoding); the encoder stays as the source has it (the paper's
choice: its keys and values are not cached). Four families:

* `uniform`: one count G in every decoder layer of both kinds, for every G
  the source allows (G = the source's count is the source itself).
* `self-cross`: G_self != G_cross, each the same in every layer: every
  ordered pair of allowed counts.
* `per-layer`: one count per decoder layer and kind ("slot") whose KV cache
  fits a byte budget. For a search space of at most `ENUMERATE_LIMIT`
  assignments (the study's 2+2-layer model has 5^4 = 625) every assignment
  is listed; those within the budget that are maximal (raising any slot to
  its next count would exceed the budget) are ranked by the data-free
  proxy below and the best `limit` kept. Larger spaces are searched
  greedily: from the source's counts, repeatedly lower the slot whose next
  lower count costs the least proxy per cache number saved until the budget
  holds, then raise slots (most proxy gained per number first) while it
  still holds; that one assignment is the family.
  Assignments whose counts are equal within each kind belong to the first
  two families and are left out here.

An allowed count of a slot divides the source's count there (a conversion
merges whole groups). The proxy of a slot at G is the relative squared
error of mean-pooling its key and value kernels into G heads,
`sum ||W - mean_group(W)||^2 / sum ||W||^2` over key and value: how much of
the projections a conversion to G must throw away, before any data is
seen. The search uses it only to choose which assignments to evaluate; the
held-out loss decides. Cache numbers are linear in each slot's count, so a
slot costs `2 x batch x head_dim x length` numbers per kv head (length =
output length for self-attention, input length for cross-attention), as
`roofline.cache_numbers` counts them.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gqa_t5x.conversion.grouping import GROUPINGS as conversion_groupings
from gqa_t5x.experiments import roofline
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config, divisors

KINDS = ("self", "cross")
GROUPINGS = tuple(conversion_groupings)  # the conversion's table: 'contiguous', 'similarity'
FAMILIES = ("uniform", "per-layer", "self-cross")  # in the order `generate` lists them
ENUMERATE_LIMIT = 100_000
_ATTENTION = {"self": "self_attention", "cross": "encoder_decoder_attention"}

Slot = tuple[str, int]  # (kind, decoder layer)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One kv-head configuration of the decoder.

    Attributes:
      family: 'uniform', 'self-cross' or 'per-layer'.
      self_kv: kv heads of each decoder layer's self-attention.
      cross_kv: kv heads of each decoder layer's encoder-decoder attention.
      grouping: How query heads are grouped when converting ('contiguous', the
        paper's; 'similarity' where the conversion offers it).
    """

    family: str
    self_kv: tuple[int, ...]
    cross_kv: tuple[int, ...]
    grouping: str = "contiguous"

    @property
    def name(self) -> str:
        """A short label: 'G=4', 'self=1,cross=8' or 'self=(1,2),cross=(4,4)' (+ ' sim')."""
        if self.family == "uniform":
            label = f"G={self.self_kv[0]}"
        elif self.family == "self-cross":
            label = f"self={self.self_kv[0]},cross={self.cross_kv[0]}"
        else:
            label = f"self=({','.join(map(str, self.self_kv))}),cross=({','.join(map(str, self.cross_kv))})"
        return label + (" sim" if self.grouping == "similarity" else "")

    def targets(self) -> dict[str, tuple[int, ...]]:
        """The per-kind targets of `conversion.convert` / `T5Config.replace`."""
        return {"decoder_self_kv_heads": self.self_kv, "decoder_cross_kv_heads": self.cross_kv}

    def config(self, source: T5Config) -> T5Config:
        """The converted model's config (canonical: equal counts become the uniform field)."""
        return source.replace(**self.targets())

    def is_source(self, source: T5Config) -> bool:
        """Whether the candidate keeps every decoder count of `source` (nothing to convert)."""
        return self.self_kv == source.layer_kv_heads("self") and self.cross_kv == source.layer_kv_heads("cross")


def slots(source: T5Config) -> list[Slot]:
    """Every decoder (kind, layer): self-attention layers first, then cross-attention."""
    return [(kind, layer) for kind in KINDS for layer in range(source.num_decoder_layers)]


def allowed_counts(source: T5Config, slot: Slot) -> list[int]:
    """kv heads a slot may be converted to: the divisors of its source count, ascending."""
    return divisors(source.kv_heads(*slot))


def numbers_per_head(source: T5Config, batch: int, input_length: int, output_length: int) -> dict[str, float]:
    """Cache numbers one kv head of one layer costs, per kind (`roofline.cache_numbers` / kv heads)."""
    totals = roofline.cache_numbers(source, batch, input_length, output_length)
    return {kind: totals[kind] / sum(source.layer_kv_heads(kind)) for kind in KINDS}


def kv_numbers(candidate: Candidate, per_head: Mapping[str, float]) -> float:
    """Cache numbers of a candidate: each slot's kv heads times its kind's per-head cost."""
    return per_head["self"] * sum(candidate.self_kv) + per_head["cross"] * sum(candidate.cross_kv)


def pooling_errors(source: T5Config, params: Mapping[str, Any]) -> dict[Slot, dict[int, float]]:
    """The proxy: relative squared error of mean-pooling each slot's key and value kernels.

    Args:
      source: The source config.
      params: Its parameters (nested dict).

    Returns:
      {slot: {allowed count G: error}}; 0 at the source's own count.
    """
    flat = param_tree.flatten(params)
    out: dict[Slot, dict[int, float]] = {}
    for kind, layer in slots(source):
        have = source.kv_heads(kind, layer)
        kernels = [np.asarray(flat[f"decoder/layers_{layer}/{_ATTENTION[kind]}/{p}/kernel"], np.float64)
                   for p in ("key", "value")]
        total = sum(float(np.sum(w**2)) for w in kernels)
        errors = {}
        for g in allowed_counts(source, (kind, layer)):
            lost = 0.0
            for w in kernels:
                heads = w.reshape(w.shape[0], g, have // g, source.head_dim)  # [emb, g, r, head_dim]
                lost += float(np.sum((heads - heads.mean(axis=2, keepdims=True)) ** 2))
            errors[g] = lost / total if total > 0 else 0.0
        out[(kind, layer)] = errors
    return out


def _candidate(source: T5Config, counts: Mapping[Slot, int], family: str) -> Candidate:
    layers = range(source.num_decoder_layers)
    return Candidate(family, tuple(counts[("self", i)] for i in layers), tuple(counts[("cross", i)] for i in layers))


def uniform_candidates(source: T5Config) -> list[Candidate]:
    """One candidate per count every decoder slot allows, largest first."""
    common = set.intersection(*(set(allowed_counts(source, s)) for s in slots(source)))
    layers = source.num_decoder_layers
    return [Candidate("uniform", (g,) * layers, (g,) * layers) for g in sorted(common, reverse=True)]


def self_cross_candidates(source: T5Config, proxy: Mapping[Slot, Mapping[int, float]]) -> list[Candidate]:
    """Every G_self != G_cross pair allowed in all layers, lowest summed proxy first (ties: counts)."""
    layers = source.num_decoder_layers
    allowed = {kind: sorted(set.intersection(*(set(allowed_counts(source, (kind, i))) for i in range(layers))))
               for kind in KINDS}
    pairs = [(s, c) for s in allowed["self"] for c in allowed["cross"] if s != c]

    def error(pair: tuple[int, int]) -> float:
        return sum(proxy[(kind, i)][g] for kind, g in zip(KINDS, pair) for i in range(layers))

    pairs.sort(key=lambda pair: (round(error(pair), 12), -pair[0], -pair[1]))
    return [Candidate("self-cross", (s,) * layers, (c,) * layers) for s, c in pairs]


def per_layer_candidates(source: T5Config, proxy: Mapping[Slot, Mapping[int, float]], per_head: Mapping[str, float],
                         budget_numbers: float, limit: int) -> list[Candidate]:
    """Per-layer assignments within `budget_numbers` cache numbers (see the module docstring).

    Args:
      source: The source config.
      proxy: `pooling_errors` of the source.
      per_head: `numbers_per_head`.
      budget_numbers: Most cache numbers a candidate may hold (whole batch).
      limit: Most candidates returned.

    Returns:
      Candidates of family 'per-layer', best proxy first, each within the budget.
    """
    order = slots(source)
    options = [allowed_counts(source, s) for s in order]
    cost = [per_head[kind] for kind, _ in order]

    def numbers(assignment: Sequence[int]) -> float:
        return sum(c * g for c, g in zip(cost, assignment))

    def error(assignment: Sequence[int]) -> float:
        return sum(proxy[s][g] for s, g in zip(order, assignment))

    if math.prod(len(o) for o in options) <= ENUMERATE_LIMIT:
        found = []
        for assignment in itertools.product(*options):
            if numbers(assignment) > budget_numbers:
                continue
            raisable = any(
                g != o[-1] and numbers(assignment) + c * (o[o.index(g) + 1] - g) <= budget_numbers
                for g, o, c in zip(assignment, options, cost))
            if not raisable:
                found.append(assignment)
        found.sort(key=lambda a: (round(error(a), 12), -numbers(a), tuple(-g for g in a)))
    else:
        found = [_greedy(options, cost, error, numbers, budget_numbers)]
        found = [a for a in found if a is not None]
    out = []
    for assignment in found:
        counts = dict(zip(order, assignment))
        candidate = _candidate(source, counts, "per-layer")
        if len(set(candidate.self_kv)) == 1 and len(set(candidate.cross_kv)) == 1:
            continue  # a uniform or self-cross configuration: its own family
        out.append(candidate)
        if len(out) == limit:
            break
    return out


def _greedy(options: list[list[int]], cost: list[float], error: Any, numbers: Any,
            budget: float) -> tuple[int, ...] | None:
    """Greedy descent to the budget, then raises while it holds (None if even the smallest counts exceed it)."""
    current = [o[-1] for o in options]
    while numbers(current) > budget:
        moves = []
        for i, o in enumerate(options):
            position = o.index(current[i])
            if position:
                lower = current[:i] + [o[position - 1]] + current[i + 1:]
                saved = cost[i] * (current[i] - o[position - 1])
                moves.append(((error(lower) - error(current)) / saved, i, lower))
        if not moves:
            return None
        current = min(moves, key=lambda m: (m[0], m[1]))[2]
    while True:
        moves = []
        for i, o in enumerate(options):
            position = o.index(current[i])
            if position + 1 < len(o):
                higher = current[:i] + [o[position + 1]] + current[i + 1:]
                if numbers(higher) <= budget:
                    added = cost[i] * (o[position + 1] - current[i])
                    moves.append(((error(higher) - error(current)) / added, i, higher))
        if not moves:
            return tuple(current)
        current = min(moves, key=lambda m: (m[0], m[1]))[2]


def generate(source: T5Config, params: Mapping[str, Any], *, batch: int, input_length: int, output_length: int,
             budget_numbers: float, groupings: Sequence[str] = ("contiguous",), per_layer: int = 8,
             max_candidates: int = 40) -> tuple[list[Candidate], dict[str, Any]]:
    """The candidates of a plan, in order: uniform, per-layer, self-cross; each per grouping.

    Args:
      source: The source config.
      params: Its parameters (for the proxy).
      batch, input_length, output_length: The decoding shape (cache numbers).
      budget_numbers: Cache numbers the per-layer family must fit (whole batch).
      groupings: Groupings to list each converted candidate with (the source
        itself, which converts nothing, appears once, as 'contiguous').
      per_layer: Most per-layer assignments.
      max_candidates: Most candidates in all; the list is cut in the order above.

    Returns:
      (candidates, {'proxy': {'kind/layer': {G: error}}, 'generated': count before the cut,
      'dropped': candidates cut by max_candidates}).
    """
    unknown = [g for g in groupings if g not in GROUPINGS]
    if unknown or not groupings:
        raise ValueError(f"groupings={list(groupings)}: choose from {list(GROUPINGS)}.")
    if per_layer < 0 or max_candidates < 1:
        raise ValueError(f"per_layer={per_layer} must be >= 0 and max_candidates={max_candidates} >= 1.")
    proxy = pooling_errors(source, params)
    per_head = numbers_per_head(source, batch, input_length, output_length)
    structural = [*uniform_candidates(source),
                  *per_layer_candidates(source, proxy, per_head, budget_numbers, per_layer),
                  *self_cross_candidates(source, proxy)]
    out: list[Candidate] = []
    for candidate in structural:
        for grouping in groupings:
            if grouping != "contiguous" and candidate.is_source(source):
                continue
            out.append(dataclasses.replace(candidate, grouping=grouping))
    info = {"proxy": {f"{kind}/{layer}": errors for (kind, layer), errors in proxy.items()},
            "generated": len(out), "dropped": max(0, len(out) - max_candidates)}
    return out[:max_candidates], info
