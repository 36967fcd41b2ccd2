"""Groupings: which source key/value heads a conversion pools together.

The model reads key/value head h // (H/G) from query head h: groups are
contiguous. A grouping other than the contiguous one is realised by
PERMUTING a layer's heads before the (unchanged) method runs, so that each
chosen group becomes a contiguous run of S/G source kv heads:

* key/value kernels `[emb, S*d]`: column block i becomes source block order[i];
* query kernel `[emb, H*d]`: source kv head s carries its r = H/S query heads,
  so query block i*r + j becomes source block order[i]*r + j;
* out kernel `[H*d, emb]`: its row blocks move with the query heads.

For a layer that is not pooled this is an exact re-parametrisation (the
same function). Relative position biases (`<stack>/relpos_bias/rel_embedding`,
`[H, buckets]`, one row per query head) are shared by every self-attention
layer of their stack, so the decoder's self-attention layers (and with
`convert_encoder` the encoder's) take ONE order for the whole stack, and the
stack's relpos rows are permuted with it; every self-attention layer of such
a stack is permuted, also one whose kv head count does not change.
Encoder-decoder attention has no bias: each converted layer has its own order.

Strategies (one table, `GROUPINGS`): `contiguous` (the default; changes
nothing) and `similarity` (groups chosen from calibration statistics, see
`pair_costs` and `partition`). A conversion's record (`Grouping.record`)
lists every converted layer's groups and the stack orders applied to relpos;
passing it back (`resolve(..., grouping=record, a record JSON or a converted
checkpoint)`) reproduces the conversion without calibration.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from gqa_t5x.conversion import calibration as calibration_stats
from gqa_t5x.conversion.alignment import split_heads
from gqa_t5x.model import param_tree

CONTIGUOUS = "contiguous"
SIMILARITY = "similarity"
RECORD_KEY = "grouping"

# Methods that rotate a group's heads before pooling: similarity compares heads up to a rotation.
ROTATION_INVARIANT_METHODS = frozenset({"align"})

# Stacks whose self-attention layers (this module) share one relative position bias.
SHARED_STACKS = {"encoder": param_tree.ENCODER_ATTENTION, "decoder": param_tree.DECODER_SELF_ATTENTION}


@dataclasses.dataclass(frozen=True)
class GroupingStrategy:
    """A named way to choose groups.

    Attributes:
      name: its name (`grouping=`, the CLI's `--grouping`, gin `GROUPING`).
      doc: one line for `--help`, `gqa-t5x list groupings` and the docs.
      needs_calibration: it reads calibration statistics.
    """

    name: str
    doc: str
    needs_calibration: bool = False


GROUPINGS: dict[str, GroupingStrategy] = {
    CONTIGUOUS: GroupingStrategy(
        CONTIGUOUS, "group g pools source kv heads g*S/G .. (g+1)*S/G-1 (the paper; default)"),
    SIMILARITY: GroupingStrategy(
        SIMILARITY, "pool the heads whose key/value kernels differ least on calibration inputs "
        "(rotation-invariant with align); needs --calibration", needs_calibration=True),
}


@dataclasses.dataclass(frozen=True)
class Grouping:
    """The head orders of one conversion.

    Attributes:
      name: the strategy that chose them ('contiguous', 'similarity').
      orders: attention prefix -> kv head order (new kv head i is source kv
        head order[i]), for every layer that is permuted or converted.
      groups: converted attention prefix -> its groups (source kv heads).
      relpos: stack ('encoder', 'decoder') -> query head order applied to the
        rows of its relative position bias.
    """

    name: str
    orders: dict[str, tuple[int, ...]]
    groups: dict[str, list[list[int]]]
    relpos: dict[str, tuple[int, ...]]

    def permutation(self, prefix: str) -> tuple[int, ...] | None:
        """The layer's kv head order, or None when the layer keeps its heads in place."""
        return _moved(self.orders.get(prefix))

    def relpos_permutation(self, stack: str) -> tuple[int, ...] | None:
        """The stack's relpos row order, or None when its rows stay in place."""
        return _moved(self.relpos.get(stack))

    def record(self) -> dict[str, Any]:
        """The JSON-able record written into the converted checkpoint's metadata."""
        return {
            "name": self.name,
            "layers": {prefix: [list(g) for g in groups] for prefix, groups in self.groups.items()},
            "relpos_permutations": {stack: list(order) for stack, order in self.relpos.items()},
        }


# ------------------------------------------------------------ permutations
def _moved(order: tuple[int, ...] | None) -> tuple[int, ...] | None:
    return None if order is None or order == tuple(range(len(order))) else order


def query_order(kv_order: tuple[int, ...] | np.ndarray, num_heads: int) -> np.ndarray:
    """The query head order that moves each kv head's r = H/S query heads with it.

    Args:
      kv_order: `[S]` a permutation of the kv heads.
      num_heads: H.

    Returns:
      `[H]` int array: new query head i*r + j is source query head kv_order[i]*r + j.
    """
    kv_order = np.asarray(kv_order, np.int64)
    r = num_heads // kv_order.size
    return (kv_order[:, None] * r + np.arange(r)[None, :]).reshape(-1)


def permute_heads(kernels: Mapping[str, np.ndarray], kv_order: tuple[int, ...], *, num_heads: int,
                  head_dim: int) -> dict[str, np.ndarray]:
    """Permutes one attention layer's heads; an exact re-parametrisation.

    Args:
      kernels: any of 'query' `[emb, H*d]`, 'key'/'value' `[emb, S*d]`, 'out'
        `[H*d, emb]`.
      kv_order: `[S]` new kv head i = source kv head kv_order[i].
      num_heads: H.
      head_dim: d.

    Returns:
      The same projections with permuted head blocks (the input dtypes).
    """
    q_order = query_order(kv_order, num_heads)
    out = {}
    for proj, kernel in kernels.items():
        kernel = np.asarray(kernel)
        if proj in ("key", "value", "query"):
            order = q_order if proj == "query" else np.asarray(kv_order)
            out[proj] = np.ascontiguousarray(split_heads(kernel, head_dim)[:, order, :].reshape(kernel.shape))
        elif proj == "out":  # [H*d, emb]: row blocks
            blocks = kernel.reshape(num_heads, head_dim, kernel.shape[-1])
            out[proj] = np.ascontiguousarray(blocks[q_order].reshape(kernel.shape))
        else:
            raise ValueError(f"permute_heads: unknown projection {proj!r}; expected {param_tree.ATTENTION_PROJECTIONS}.")
    return out


def permute_relpos(rel_embedding: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
    """Rows of a relative position bias `[H, buckets]` in query head `order`."""
    return np.ascontiguousarray(np.asarray(rel_embedding)[np.asarray(order)])


# ---------------------------------------------------------- the criterion
def pair_costs(kernels: Mapping[str, np.ndarray], moment: np.ndarray, head_dim: int, *,
               rotation_invariant: bool = False) -> np.ndarray:
    """Calibration-weighted distances between a layer's kv heads.

    D[i, j] = sum over key and value of tr((W_i - W_j)^T C (W_i - W_j)), W_i the
    `[emb, d]` block of kv head i and C the second moment of the projection's
    inputs. Rotation-invariant: min over orthogonal R of the same with W_i R,
    = tr(W_i^T C W_i) + tr(W_j^T C W_j) - 2 ||W_i^T C W_j||_* (nuclear norm),
    the pair's residual after the optimal alignment `align` looks for.

    Args:
      kernels: 'key' and 'value' `[emb, S*d]`.
      moment: C `[emb, emb]` (symmetric positive semi-definite).
      head_dim: d.
      rotation_invariant: compare heads up to an orthogonal rotation.

    Returns:
      `[S, S]` float64, symmetric, zero diagonal, non-negative.
    """
    moment = np.asarray(moment, np.float64)
    total = None
    for proj in ("key", "value"):
        w = np.asarray(kernels[proj], np.float64)  # [emb, S*d]
        s = w.shape[1] // head_dim
        gram = (w.T @ moment @ w).reshape(s, head_dim, s, head_dim).transpose(0, 2, 1, 3)  # [S, S, d, d]
        diag = np.einsum("iaa->i", gram[np.arange(s), np.arange(s)])  # [S] tr(W_i^T C W_i)
        if rotation_invariant:
            cross = np.linalg.svd(gram, compute_uv=False).sum(axis=-1)  # [S, S] nuclear norms
        else:
            cross = np.trace(gram, axis1=2, axis2=3)  # [S, S]
        dist = diag[:, None] + diag[None, :] - 2.0 * cross
        total = dist if total is None else total + dist
    total = np.maximum((total + total.T) / 2.0, 0.0)
    np.fill_diagonal(total, 0.0)
    return total


# ------------------------------------------------------------ partitioning
LayerCost = tuple[np.ndarray, int]  # (pair costs D [S, S], group size n = S/G)

# Greedy starts of `partition`: the first group seeded at heads 0 .. this - 1.
_GREEDY_STARTS = 16


def grouping_cost(order: tuple[int, ...] | np.ndarray, costs: list[LayerCost]) -> float:
    """The objective `partition` minimises, for one head order.

    A layer with group size n costs (1/n) sum over its groups of sum_{i<j in the
    group} D[i, j]: for the plain criterion exactly the calibration-weighted
    squared error of mean pooling, sum_g sum_{s in g} ||W_s - mean_g||_C^2.

    Args:
      order: `[S]` head order (group g of a layer = order[g*n:(g+1)*n]).
      costs: (D, n) of every layer that shares the order.

    Returns:
      The summed cost of all layers.
    """
    order = np.asarray(order, np.int64)
    total = 0.0
    for dist, n in costs:
        blocks = order.reshape(-1, n)
        total += float(sum(dist[np.ix_(b, b)].sum() for b in blocks)) / (2.0 * n)
    return total


def _greedy(weights: np.ndarray, n: int, first: int = 0) -> np.ndarray:
    """Groups of n built one by one from a seed head (`first`, then the lowest
    free head), adding the free head that adds the least cost to the group
    (ties: the lower index)."""
    s = weights.shape[0]
    free = np.ones(s, bool)
    order: list[int] = []
    while free.any():
        group = [first if not order else int(np.argmax(free))]
        free[group[0]] = False
        while len(group) < n:
            added = np.where(free, weights[group].sum(axis=0), np.inf)
            best = int(np.argmin(added))
            group.append(best)
            free[best] = False
        order.extend(group)
    return np.asarray(order, np.int64)


def _swap_search(order: np.ndarray, costs: list[LayerCost], max_swaps: int) -> np.ndarray:
    """Best-improvement pairwise swaps of heads in different groups until none helps.

    The change of the objective for swapping heads x (group A) and y (group B)
    of a layer is M[x,B] + M[y,A] - M[x,A] - M[y,B] - 2 D[x,y], M[h, b] the
    summed cost from h to the members of group b; all pairs are evaluated at
    once ([S, S] per layer).
    """
    s = order.size
    pos = np.empty(s, np.int64)
    pos[order] = np.arange(s)
    scale = sum(float(dist.sum()) / n for dist, n in costs)
    tolerance = 1e-12 * max(scale, 1e-300)
    upper = np.triu(np.ones((s, s), bool), 1)
    for _ in range(max_swaps):
        delta = np.zeros((s, s))
        for dist, n in costs:
            block = pos // n  # [S] group of each head
            member = block[:, None] == np.arange(s // n)[None, :]  # [S, groups]
            summed = (dist / n) @ member  # [S, groups]
            own = summed[np.arange(s), block]  # [S]
            cross = summed[:, block]  # cross[x, y] = summed[x, group of y]
            change = cross + cross.T - own[:, None] - own[None, :] - 2.0 * dist / n
            change[block[:, None] == block[None, :]] = 0.0
            delta += change
        delta = np.where(upper, delta, np.inf)
        flat = int(np.argmin(delta))
        if delta.flat[flat] >= -tolerance:
            break
        x, y = divmod(flat, s)
        pos[x], pos[y] = pos[y], pos[x]
    return np.argsort(pos, kind="stable")


def _canonical(order: np.ndarray, sizes: list[int]) -> np.ndarray:
    """The same groups at every level in a canonical order: with nested sizes (each
    divides the next) heads sorted within the smallest groups, and each level's
    groups within the next level's by their first head. Other sizes: as given."""
    levels = sorted(set(sizes))
    if any(b % a for a, b in zip(levels, levels[1:])):
        return order
    out = order.copy()
    for index, n in enumerate(levels + [out.size]):
        inner = 1 if index == 0 else levels[index - 1]
        blocks = out.reshape(-1, n // inner, inner)  # [groups, units, inner]
        firsts = blocks[:, :, 0]
        out = np.take_along_axis(blocks, np.argsort(firsts, axis=1, kind="stable")[:, :, None], axis=1).reshape(-1)
    return out


def partition(costs: list[LayerCost]) -> tuple[int, ...]:
    """A head order whose groups minimise the summed within-group cost.

    Layers sharing one order (a stack's self-attention layers) may have
    different group sizes n; the objective is `grouping_cost`. Deterministic
    starts, each improved by best-improvement pairwise swaps (`_swap_search`):
    the contiguous order, and greedy groups (`_greedy`, on the summed
    1/n-weighted costs) of each group size seeded at each of the first
    `_GREEDY_STARTS` heads; the best result wins (the contiguous one on
    ties), written canonically (`_canonical`). It is a local optimum (no swap
    of two heads improves it); with nested group sizes (always, when S is a
    power of two) it matched exhaustive search on every small case tested
    (S <= 8); with sizes that do not nest (e.g. 3 and 2 of 6) it can miss it.

    Cost: per start, the greedy groups are O(S^2 n) and a swap step is
    O(L S^2 (S/n)) for L layers (all pairs at once), at most S^2 steps (about
    S in practice); times 1 + 16 per group size. Measured for one layer with
    S = 128: 0.2-0.3 s with groups of 16 or 64, 2 s with groups of 2.

    Args:
      costs: (pair costs D [S, S], group size n) per layer sharing the order;
        every D has the same S and every n divides S.

    Returns:
      The order (new head i = source head order[i]); the identity when every
      layer pools all heads (n = S) or no heads (n = 1).
    """
    s = costs[0][0].shape[0]
    sizes = [n for _, n in costs if 1 < n < s]
    if not sizes:
        return tuple(range(s))
    identity = np.arange(s)
    weights = sum(dist / n for dist, n in costs)
    starts = [identity] + [_greedy(weights, n, first) for n in sorted(set(sizes), reverse=True)
                           for first in range(min(s, _GREEDY_STARTS))]
    results = [_swap_search(start, costs, max_swaps=s * s) for start in starts]
    values = [grouping_cost(order, costs) for order in results]
    best = results[int(np.argmin(values))]  # the first of equals: contiguous on ties
    return tuple(int(h) for h in _canonical(best, sizes))


# ------------------------------------------------------------ resolution
Reader = Callable[[str], np.ndarray]  # parameter path -> array
GroupingSpec = str | os.PathLike | Mapping[str, Any]


_KINDS = {param_tree.ENCODER_ATTENTION: "encoder", param_tree.DECODER_SELF_ATTENTION: "self",
          param_tree.DECODER_CROSS_ATTENTION: "cross"}


def _source_kv(plan: Any, prefix: str) -> int:
    """The source's kv heads of an attention prefix such as 'decoder/layers_1/self_attention'."""
    _, layer, module = prefix.split("/")
    return plan.source.kv_heads(_KINDS[module], int(layer.removeprefix("layers_")))


def shared_stack(prefix: str) -> str | None:
    """The stack whose relative position bias the layer shares, or None (cross-attention)."""
    stack, _, module = prefix.split("/")
    return stack if SHARED_STACKS.get(stack) == module else None


def _stack_layers(plan: Any, stack: str) -> list[str]:
    count = plan.source.num_encoder_layers if stack == "encoder" else plan.source.num_decoder_layers
    return [f"{stack}/layers_{i}/{SHARED_STACKS[stack]}" for i in range(count)]


def _layout(plan: Any) -> tuple[dict[str, list[str]], list[str]]:
    """(stack -> its self-attention layers, for stacks with a converted one; converted cross layers)."""
    stacks = {}
    for stack in SHARED_STACKS:
        layers = _stack_layers(plan, stack)
        if any(prefix in plan.layers for prefix in layers):
            stacks[stack] = layers
    own = [prefix for prefix in plan.layers if shared_stack(prefix) is None]
    return stacks, own


def _kv_order(q_order: np.ndarray, source_kv: int, where: str) -> tuple[int, ...]:
    """The kv head order of a layer with `source_kv` kv heads that moves queries as `q_order`."""
    r = q_order.size // source_kv
    kv = q_order[::r] // r
    if not np.array_equal(query_order(kv, q_order.size), q_order):
        raise ValueError(
            f"{where}: the relative position bias order {q_order.tolist()} does not move whole groups of "
            f"{r} query heads (this layer has {source_kv} key/value heads), so no head permutation of the layer "
            "matches it."
        )
    return tuple(int(h) for h in kv)


def _assemble(plan: Any, name: str, stack_orders: Mapping[str, np.ndarray],
              own_orders: Mapping[str, tuple[int, ...]]) -> Grouping:
    """A `Grouping` from query head orders per shared stack and kv orders of cross layers."""
    orders: dict[str, tuple[int, ...]] = {}
    relpos: dict[str, tuple[int, ...]] = {}
    for stack, q_order in stack_orders.items():
        relpos[stack] = tuple(int(h) for h in q_order)
        for prefix in _stack_layers(plan, stack):
            orders[prefix] = _kv_order(np.asarray(q_order), _source_kv(plan, prefix), prefix)
    orders.update(own_orders)
    groups = {}
    for prefix, (_, target) in plan.layers.items():
        order = orders.setdefault(prefix, tuple(range(_source_kv(plan, prefix))))
        n = len(order) // target
        groups[prefix] = [list(order[g * n:(g + 1) * n]) for g in range(target)]
    return Grouping(name, orders, groups, relpos)


def _moment(prefix: str, statistics: Mapping[str, Mapping[str, np.ndarray]], emb: int) -> np.ndarray:
    """Second moment of the layer's key/value inputs (the query inputs of self-attention)."""
    cross = shared_stack(prefix) is None
    name = calibration_stats.KEY_SECOND_MOMENT if cross else calibration_stats.QUERY_SECOND_MOMENT
    moment = (statistics.get(prefix) or {}).get(name)
    if moment is None:
        what = "the encoder output, the input of its key/value projections" if cross else "its inputs"
        raise ValueError(
            f"{prefix}: grouping='similarity' needs the calibration statistic {name!r} (the second moment "
            f"of {what}), which the calibration statistics lack (files written before it was recorded have "
            "none): recompute them on the source checkpoint with gqa_t5x.conversion.calibration."
            "collect_statistics + save_statistics, or reproduce a recorded grouping with grouping=PATH."
        )
    if np.shape(moment) != (emb, emb):
        raise ValueError(f"{prefix}: calibration statistic {name!r} has shape {np.shape(moment)}; expected ({emb}, {emb}).")
    return np.asarray(moment, np.float64)


def _similarity(plan: Any, statistics: Mapping[str, Mapping[str, np.ndarray]] | None, read: Reader) -> Grouping:
    """Chooses the groups of every converted layer from calibration statistics."""
    if not statistics:
        raise ValueError(
            "grouping='similarity' needs calibration statistics of the source model: pass --calibration PATH "
            "(API: calibration=PATH; gin: converter.convert_checkpoint.calibration), a .npz written by "
            "gqa_t5x.conversion.calibration.save_statistics."
        )
    invariant = plan.method in ROTATION_INVARIANT_METHODS
    head_dim, heads = plan.source.head_dim, plan.source.num_heads

    def layer_cost(prefix: str) -> LayerCost:
        kernels = {p: read(f"{prefix}/{p}/kernel") for p in ("key", "value")}
        moment = _moment(prefix, statistics, np.shape(kernels["key"])[0])
        source_kv, target = plan.layers[prefix]
        return pair_costs(kernels, moment, head_dim, rotation_invariant=invariant), source_kv // target

    stacks, own = _layout(plan)
    stack_orders = {}
    for stack, layers in stacks.items():
        counts = {prefix: _source_kv(plan, prefix) for prefix in layers}
        if len(set(counts.values())) > 1:
            raise ValueError(
                f"grouping='similarity': the {stack} self-attention layers share one relative position bias, "
                f"so one head order must serve them all, but their source key/value head counts differ "
                f"({counts}); use grouping='contiguous' for this source."
            )
        costs = [layer_cost(prefix) for prefix in layers if prefix in plan.layers]
        stack_orders[stack] = query_order(partition(costs), heads)
    own_orders = {prefix: partition([layer_cost(prefix)]) for prefix in own}
    return _assemble(plan, SIMILARITY, stack_orders, own_orders)


def load_record(grouping: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The grouping record ({'name', 'layers', 'relpos_permutations'}) of a
    converted checkpoint, a JSON file or a mapping (also nested under
    'conversion' and/or 'grouping', as the checkpoint metadata holds it).

    Raises:
      FileNotFoundError: no such file or checkpoint.
      ValueError: it holds no grouping record.
    """
    where = "the grouping mapping"
    if isinstance(grouping, Mapping):
        record: Any = grouping
    else:
        from gqa_t5x import checkpoints
        from gqa_t5x.storage import paths

        path = paths.as_path(grouping, name="grouping")
        where = str(path)
        if path.is_file():
            try:
                record = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"grouping={where} is not a JSON conversion record: {error}.") from None
        else:
            with checkpoints.open_checkpoint(path) as reader:
                record = dict(getattr(reader, "metadata", None) or {})
    for key in ("conversion", RECORD_KEY):
        if isinstance(record, Mapping) and isinstance(record.get(key), Mapping):
            record = record[key]
    if not isinstance(record, Mapping) or not {"name", "layers", "relpos_permutations"} <= set(record):
        raise ValueError(
            f"grouping={where} holds no grouping record (a conversion's metadata.conversion.grouping with "
            "'name', 'layers' and 'relpos_permutations'); was it written by a conversion that records groups?"
        )
    return dict(record)


def _permutation(values: Any, size: int, where: str, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or array.size != size or not np.issubdtype(array.dtype, np.integer) or \
            sorted(array.tolist()) != list(range(size)):
        raise ValueError(f"{where}: the record's {what} {values!r} is not an order of {size} heads (0..{size - 1}).")
    return array.astype(np.int64)


def _from_record(plan: Any, record: Mapping[str, Any]) -> Grouping:
    """Checks a recorded grouping against the request and rebuilds its orders."""
    layers, relpos = record["layers"], record["relpos_permutations"]
    if not isinstance(layers, Mapping) or not isinstance(relpos, Mapping):
        raise ValueError("The grouping record's 'layers' and 'relpos_permutations' must be mappings.")
    for prefix in plan.layers:
        if prefix not in layers:
            raise ValueError(
                f"{prefix}: this conversion changes the layer but the grouping record has no groups for it "
                f"(it has {sorted(layers)}); the record is of another conversion request."
            )
    for prefix in layers:
        if prefix not in plan.layers:
            raise ValueError(
                f"{prefix}: the grouping record has groups for this layer but this conversion does not change "
                "it; give the same head counts (and convert_encoder) as the recorded conversion."
            )
    orders = {}
    for prefix, (source_kv, target) in plan.layers.items():
        groups = layers[prefix]
        sizes = [len(g) for g in groups] if isinstance(groups, list) and all(isinstance(g, list) for g in groups) else None
        if sizes is None or len(groups) != target or set(sizes) != {source_kv // target}:
            raise ValueError(
                f"{prefix}: the grouping record has groups of sizes {sizes} but the request merges {source_kv} "
                f"key/value heads into {target} groups of {source_kv // target}."
            )
        orders[prefix] = tuple(int(h) for h in _permutation(sum(groups, []), source_kv, prefix, "groups"))
    stacks, own = _layout(plan)
    if extra := sorted(set(relpos) - set(stacks)):
        raise ValueError(f"The grouping record permutes the relpos bias of {extra}, whose self-attention this "
                         "conversion does not change.")
    stack_orders = {}
    for stack in stacks:
        if stack not in relpos:
            raise ValueError(f"{stack}/relpos_bias: the grouping record has no relpos permutation for this stack.")
        q_order = _permutation(relpos[stack], plan.source.num_heads, f"{stack}/relpos_bias", "relpos permutation")
        for prefix in stacks[stack]:
            if prefix in orders and not np.array_equal(query_order(orders[prefix], q_order.size), q_order):
                raise ValueError(f"{prefix}: the recorded groups do not match the recorded relpos permutation "
                                 f"of the {stack} stack.")
        stack_orders[stack] = q_order
    name = record["name"]
    if not isinstance(name, str):
        raise ValueError(f"The grouping record's name {name!r} is not a string.")
    return _assemble(plan, name, stack_orders, {prefix: orders[prefix] for prefix in own})


def check_grouping(grouping: Any) -> None:
    """Rejects (ValueError) a string that is no strategy and no existing file or directory."""
    if isinstance(grouping, Mapping) or grouping in GROUPINGS:
        return
    if isinstance(grouping, (str, os.PathLike)):
        from gqa_t5x.storage import paths

        path = paths.as_path(grouping, name="grouping")
        if paths.is_remote(path) or path.exists():
            return
    raise ValueError(
        f"Unknown grouping {grouping!r}: choose one of {list(GROUPINGS)}, or give a converted checkpoint or "
        "its conversion record (.json) to reproduce its groups (CLI --grouping; gin GROUPING); no file or "
        "directory of that name exists."
    )


def resolve(plan: Any, grouping: GroupingSpec, statistics: Mapping[str, Mapping[str, np.ndarray]] | None,
            read: Reader) -> Grouping:
    """The head orders of a conversion.

    Args:
      plan: The `ConversionPlan`.
      grouping: A strategy name (`GROUPINGS`), or a recorded grouping: a
        converted checkpoint, its record JSON, or the mapping.
      statistics: Calibration statistics (`similarity` needs them).
      read: Reads a source parameter by path (`similarity` reads the
        converted layers' key/value kernels, one layer at a time).

    Returns:
      The `Grouping` (contiguous: every order is the identity).

    Raises:
      ValueError: unknown grouping, missing statistics (naming the layer and
        the statistic), or a record that does not match the request (naming
        the layer).
    """
    check_grouping(grouping)
    if isinstance(grouping, str) and grouping in GROUPINGS:
        if grouping == SIMILARITY:
            return _similarity(plan, statistics, read)
        stacks, _ = _layout(plan)
        return _assemble(plan, CONTIGUOUS, {s: np.arange(plan.source.num_heads) for s in stacks}, {})
    return _from_record(plan, load_record(grouping))
