"""Conversion methods: how the key/value heads of a group become one head.

Every method is a function registered under a name in one table; the plan,
the converters, the CLI's choices and their validation all read the table.
Adding a method is one function and one registration:

    def last(kernels, layer):
        # keep each group's last key/value head
        return {p: merge_heads(group_heads(kernels[p], layer)[:, :, -1, :])
                for p in KEY_VALUE}

    register_method(ConversionMethod(
        "last", last, projections=KEY_VALUE, doc="keep each group's last head"))

A method receives the source kernels of one attention layer that its
`projections` name (`[emb, S*d]` key/value with S source kv heads; `[emb,
H*d]` query, `[H*d, emb]` out) and an `AttentionLayer` describing it, and
returns new kernels for exactly those projections: key/value `[emb, G*d]`
(groups are contiguous: group g holds source heads g*S/G .. (g+1)*S/G - 1),
query/out in their source shapes. `convert_attention` checks both sides.
Methods are only called for layers whose kv head count changes.

A data-aware method (`needs_calibration=True`, e.g. `lsq`) also reads
`layer.statistics`: the layer's calibration statistics
(`calibration.collect_statistics`), which the converters pass from their
`calibration=` argument.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

from gqa_t5x.conversion.alignment import align_rotations, rotate_heads, split_heads
from gqa_t5x.conversion.least_squares import least_squares_pool
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import divisors

KEY_VALUE: tuple[str, ...] = ("key", "value")
ALL_PROJECTIONS: tuple[str, ...] = param_tree.ATTENTION_PROJECTIONS  # query, key, value, out


@dataclasses.dataclass(frozen=True)
class AttentionLayer:
    """The attention layer a method converts.

    Attributes:
      path: its parameter prefix, e.g. 'decoder/layers_0/self_attention'.
      num_heads: H, query heads.
      head_dim: d.
      source_kv_heads: S, key/value heads of the source kernels.
      target_kv_heads: G, a divisor of S.
      seed: the conversion's seed (for methods that draw random numbers).
      statistics: the layer's calibration statistics ({'query_second_moment':
        [emb, emb], 'tokens': count}), or None; given to every method when
        the conversion has them, required by `needs_calibration` methods.
    """

    path: str
    num_heads: int
    head_dim: int
    source_kv_heads: int
    target_kv_heads: int
    seed: int
    statistics: Mapping[str, np.ndarray] | None = None


MethodFunction = Callable[[Mapping[str, np.ndarray], AttentionLayer], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class ConversionMethod:
    """A registered conversion method.

    Attributes:
      name: its name (`method=` and the CLI's `--method`).
      convert: `convert(kernels, layer) -> kernels`, see the module docstring.
      projections: the kernels it reads and rewrites: `KEY_VALUE`, or
        `ALL_PROJECTIONS` for methods that also change query/out (align).
      doc: one line for `--help` and the docs.
      needs_calibration: the method reads `layer.statistics` (calibration
        statistics of the source model), so a conversion must pass them.
    """

    name: str
    convert: MethodFunction
    projections: tuple[str, ...]
    doc: str
    needs_calibration: bool = False

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"Conversion method name {self.name!r} must be an identifier.")
        if not {"key", "value"} <= set(self.projections) <= set(ALL_PROJECTIONS):
            raise ValueError(
                f"Conversion method {self.name!r}: projections={self.projections} must "
                f"include 'key' and 'value' and be among {ALL_PROJECTIONS}."
            )
        if not callable(self.convert):
            raise ValueError(f"Conversion method {self.name!r}: convert must be callable.")


_REGISTRY: dict[str, ConversionMethod] = {}


def register_method(method: ConversionMethod) -> ConversionMethod:
    """Adds a method to the table (a name may be registered once).

    Returns:
      `method`.

    Raises:
      ValueError: the name is taken by another method.
    """
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"Conversion method {method.name!r} is already registered.")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> ConversionMethod:
    """The method called `name`.

    Raises:
      ValueError: unknown name (the message lists the registered ones).
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown conversion method {name!r}; choose one of {list(_REGISTRY)}.")
    return _REGISTRY[name]


def registered_methods() -> tuple[ConversionMethod, ...]:
    """Every registered method, in registration order."""
    return tuple(_REGISTRY.values())


class _MethodNames(Sequence[str]):
    """The registered method names as a live, read-only sequence."""

    def __getitem__(self, index):  # type: ignore[override]
        return tuple(_REGISTRY)[index]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_REGISTRY))

    def __repr__(self) -> str:
        return repr(tuple(_REGISTRY))


# Usable as argparse `choices=`; follows later registrations.
METHODS: Sequence[str] = _MethodNames()


# ------------------------------------------------------------ for methods
def group_heads(kernel: np.ndarray, layer: AttentionLayer) -> np.ndarray:
    """[emb, S*d] -> [emb, G, S/G, d]: the source heads of each group."""
    heads = split_heads(np.asarray(kernel), layer.head_dim)  # [emb, S, d]
    emb, s, d = heads.shape
    return heads.reshape(emb, layer.target_kv_heads, s // layer.target_kv_heads, d)


def merge_heads(heads: np.ndarray) -> np.ndarray:
    """[emb, G, d] -> a float32 kernel [emb, G*d]."""
    emb, g, d = heads.shape
    return np.ascontiguousarray(heads.reshape(emb, g * d), dtype=np.float32)


# ---------------------------------------------------------------- built-ins
def _mean(kernels: Mapping[str, np.ndarray], layer: AttentionLayer) -> dict[str, np.ndarray]:
    return {p: merge_heads(group_heads(kernels[p], layer).astype(np.float64).mean(axis=2)) for p in KEY_VALUE}


def _first(kernels: Mapping[str, np.ndarray], layer: AttentionLayer) -> dict[str, np.ndarray]:
    return {p: merge_heads(group_heads(kernels[p], layer)[:, :, 0, :]) for p in KEY_VALUE}


def _random(kernels: Mapping[str, np.ndarray], layer: AttentionLayer) -> dict[str, np.ndarray]:
    """T5X's key/value initialiser, keyed by (seed, parameter path)."""
    import jax

    shape = (np.shape(kernels["key"])[0], layer.target_kv_heads * layer.head_dim)
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    out = {}
    for p in KEY_VALUE:
        name = f"{layer.path}/{p}/kernel"
        key = jax.random.fold_in(jax.random.PRNGKey(layer.seed), zlib.crc32(name.encode()))
        out[p] = np.asarray(init(key, shape, np.float32), dtype=np.float32)
    return out


def _align(kernels: Mapping[str, np.ndarray], layer: AttentionLayer) -> dict[str, np.ndarray]:
    key_rot, value_rot = align_rotations(kernels, layer.target_kv_heads, layer.head_dim)
    rotated = rotate_heads(kernels, key_rot, value_rot, layer.head_dim)
    out = _mean(rotated, layer)
    out["query"] = rotated["query"].astype(np.float32)
    out["out"] = rotated["out"].astype(np.float32)
    return out


def _lsq(kernels: Mapping[str, np.ndarray], layer: AttentionLayer) -> dict[str, np.ndarray]:
    pooled = least_squares_pool(
        dict(kernels), layer.statistics["query_second_moment"], num_heads=layer.num_heads,
        head_dim=layer.head_dim, target_kv_heads=layer.target_kv_heads)
    return {"query": kernels["query"], "key": pooled["key"], "value": pooled["value"], "out": kernels["out"]}


register_method(ConversionMethod(
    "mean", _mean, KEY_VALUE, "mean of the group's key (value) heads (the paper)"))
register_method(ConversionMethod(
    "first", _first, KEY_VALUE, "the group's first key (value) head (paper ablation)"))
register_method(ConversionMethod(
    "random", _random, KEY_VALUE, "fresh T5X initialisation, seeded (paper ablation)"))
register_method(ConversionMethod(
    "align", _align, ALL_PROJECTIONS,
    "rotate heads into a common basis (query/out too), then mean (beyond the paper)"))
register_method(ConversionMethod(
    "lsq", _lsq, ALL_PROJECTIONS,
    "least-squares pooling weighted by calibration query statistics (keys) and the "
    "out projection (values); needs calibration (beyond the paper)",
    needs_calibration=True))


# ------------------------------------------------------------ one layer
def _check_statistics(statistics: Mapping[str, np.ndarray] | None, path: str, method: str,
                      emb: int | None) -> None:
    if statistics is None:
        raise ValueError(
            f"{path}: method {method!r} needs calibration statistics of the source model "
            "(calibration=PATH of gqa_t5x.conversion.calibration.save_statistics; gin: "
            "converter.convert_checkpoint.calibration); none were given for this layer."
        )
    moment = statistics.get("query_second_moment")
    if moment is None or (emb is not None and np.shape(moment) != (emb, emb)):
        raise ValueError(
            f"{path}: the calibration statistics for method {method!r} need a "
            f"'query_second_moment' of shape ({emb}, {emb}); got "
            f"{None if moment is None else np.shape(moment)}."
        )


def convert_attention(
    kernels: Mapping[str, np.ndarray],
    *,
    num_heads: int,
    head_dim: int,
    target_kv_heads: int,
    method: str = "mean",
    seed: int = 0,
    path: str = "",
    statistics: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Converts one attention layer's kernels to `target_kv_heads` kv heads.

    Args:
      kernels: the kernels the method's `projections` name: 'key' and 'value'
        `[emb, S*head_dim]`; 'query' `[emb, H*head_dim]` and 'out'
        `[H*head_dim, emb]` too for methods such as `align`.
      num_heads: H (query heads).
      head_dim: d.
      target_kv_heads: G, a divisor of S.
      method: a registered method name (see `METHODS`).
      seed: Seed of methods that draw random numbers.
      path: The layer's prefix; keys the random stream and names errors.
      statistics: The layer's calibration statistics (required by methods
        with `needs_calibration`, e.g. `lsq`).

    Returns:
      Float32 kernels for exactly the method's projections.

    Raises:
      ValueError: unknown method, kernels missing or misshapen, G not a
        divisor of S, calibration statistics missing or misshapen for a
        method that needs them, or a method returning other kernels or shapes.
    """
    chosen = get_method(method)
    if chosen.needs_calibration:
        _check_statistics(statistics, path, method, np.shape(kernels["key"])[0] if "key" in kernels else None)
    missing = [p for p in chosen.projections if p not in kernels]
    if missing:
        raise ValueError(f"{path}: method {method!r} needs the {missing} kernel(s) too.")
    inputs = {p: np.asarray(kernels[p]) for p in chosen.projections}
    key = inputs["key"]
    source_kv = key.shape[1] // head_dim if key.ndim == 2 else 0
    if key.ndim != 2 or source_kv == 0 or key.shape[1] != source_kv * head_dim or num_heads % source_kv:
        raise ValueError(
            f"{path}/key/kernel has shape {key.shape}, which is not "
            f"[emb, kv_heads*{head_dim}] with kv_heads dividing num_heads={num_heads}."
        )
    if target_kv_heads <= 0 or source_kv % target_kv_heads:
        raise ValueError(
            f"{path}: cannot merge {source_kv} key/value heads into "
            f"{target_kv_heads}; choose one of {divisors(source_kv)}."
        )
    emb = key.shape[0]
    expected = {"key": (emb, target_kv_heads * head_dim), "value": (emb, target_kv_heads * head_dim)}
    for p, shape in {"value": key.shape, "query": (emb, num_heads * head_dim), "out": (num_heads * head_dim, emb)}.items():
        if p in inputs and inputs[p].shape != shape:
            raise ValueError(f"{path}/{p}/kernel has shape {inputs[p].shape}; expected {shape}.")
        if p in ("query", "out"):
            expected[p] = shape
    layer = AttentionLayer(path, num_heads, head_dim, source_kv, target_kv_heads, int(seed), statistics)
    result = chosen.convert(inputs, layer)
    if set(result) != set(chosen.projections):
        raise ValueError(
            f"Conversion method {method!r} returned kernels {sorted(result)} for {path}; "
            f"it must return exactly {list(chosen.projections)}."
        )
    out = {}
    for p in chosen.projections:
        array = np.ascontiguousarray(result[p], dtype=np.float32)
        if array.shape != expected[p]:
            raise ValueError(
                f"Conversion method {method!r} returned {path}/{p}/kernel with shape "
                f"{array.shape}; expected {expected[p]}."
            )
        out[p] = array
    return out
