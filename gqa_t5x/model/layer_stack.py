"""Stacked (scanned) and unstacked (checkpoint) parameter trees, and parameter dtypes.

A network built with `T5Config.scan_layers` holds each stack's layers as ONE
module, `encoder/layers` / `decoder/layers`, whose parameters carry a leading
axis of one entry per layer (logical axis name `network.LAYER_AXIS`):

    unstacked (checkpoints, T5X):  encoder/layers_3/mlp/wo/kernel  [mlp, emb]
    stacked (scanned network):     encoder/layers/mlp/wo/kernel    [layers, mlp, emb]

Checkpoints, converters and the HuggingFace exporter keep the unstacked
tree (T5X's names). `stack_layers` / `unstack_layers` convert between the
two; `model_params` gives a network the tree (and the parameter dtype) its
config asks for, whichever tree it is handed (evaluation, inference,
benchmarks).

A scanned training run keeps its state STACKED and converts at checkpoint
save and restore (`unstack_tree` / `stack_tree`, used by
`TrainState.to_tree` / `from_tree`), rather than keeping it unstacked and
stacking inside the jitted step: with an unstacked state the optimizer
update is one set of operations per layer and leaf, and the XXL 24+24 train
step compiled in 45 s against 12 s stacked (its 2+2 version: 13 s). Adafactor
keeps per-layer semantics on stacked leaves (`training/optimizers.py`), so
both give the unscanned run's updates; the stacked state also saves the
per-step copy of every weight that stacking inside the step costs.

The other leaves (embedding, relative position biases, final norms, the
output projection) are shared by the layers and are the same in both trees.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x.model import network
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config

STACKS = ("encoder", "decoder")
_LAYER = re.compile(r"^layers_(\d+)$")


def _num_layers(config: T5Config, stack: str) -> int:
    return config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers


def is_stacked(params: Mapping[str, Any]) -> bool:
    """Whether a parameter (or cache) tree holds scanned stacks (`encoder/layers`)."""
    return any(
        isinstance(params.get(stack), Mapping) and network.SCANNED_LAYERS in params[stack]
        for stack in STACKS
    )


def is_stacked_path(path: str) -> bool:
    """Whether a '/'-joined parameter or cache path lies in a scanned stack.

    Its leaves then carry the layer axis first (`decoder/layers/...`), unlike
    `decoder/layers_0/...`.
    """
    parts = path.split("/")
    return network.SCANNED_LAYERS in parts[:-1]


def _stack(leaves: list[Any]) -> Any:
    if all(isinstance(x, np.ndarray) for x in leaves):
        return np.stack(leaves)  # host arrays stay on the host (checkpoint loads)
    return jnp.stack(leaves)


def stack_layers(params: Mapping[str, Any], config: T5Config) -> dict[str, Any]:
    """The unstacked (checkpoint) tree -> the scanned network's tree.

    `encoder/layers_{i}/<p>` for i < num_encoder_layers become
    `encoder/layers/<p>` `[num_encoder_layers, ...]`, and the same for the
    decoder; all other leaves are kept as they are (not copied). The layer
    counts may differ between the stacks; a stack with no layers has no
    `layers` entry.

    Args:
      params: A tree with `param_tree.param_shapes(config)`'s paths (numpy or
        jax arrays, or `jax.ShapeDtypeStruct`s under `jax.eval_shape`).
      config: The model config (its layer counts).

    Returns:
      A new nested dict; numpy inputs give numpy stacks.

    Raises:
      ValueError: `params` is already stacked, or a stack's layers are not
        exactly `layers_0 .. layers_{n-1}` of the config's depth.
    """
    if is_stacked(params):
        raise ValueError(
            "stack_layers got a tree that already holds scanned stacks (encoder/layers); "
            "pass the unstacked tree (encoder/layers_0/...) or use model_params, which "
            "accepts either."
        )
    out = dict(params)
    for stack in STACKS:
        if stack not in params:
            continue
        subtree = dict(params[stack])
        layer_keys = sorted((k for k in subtree if _LAYER.match(k)), key=lambda k: int(k[7:]))
        want = [f"layers_{i}" for i in range(_num_layers(config, stack))]
        if layer_keys != want:
            raise ValueError(
                f"{stack} has layers {layer_keys} but the config has "
                f"{len(want)} (num_{stack}_layers); pass the config the parameters were made for."
            )
        if want:
            per_layer = [subtree.pop(k) for k in want]
            subtree[network.SCANNED_LAYERS] = jax.tree_util.tree_map(lambda *xs: _stack(list(xs)), *per_layer)
        out[stack] = subtree
    return out


def unstack_layers(params: Mapping[str, Any], config: T5Config) -> dict[str, Any]:
    """The scanned network's tree -> the unstacked (checkpoint) tree.

    The inverse of `stack_layers`: `encoder/layers/<p>` `[n, ...]` becomes
    `encoder/layers_{i}/<p>` for i < n (slices of the stacked arrays).

    Args:
      params: A stacked tree (leaves with the layer axis first).
      config: The model config (its layer counts).

    Returns:
      A new nested dict with `param_tree.param_shapes(config)`'s paths.

    Raises:
      ValueError: `params` is not stacked, or a stacked leaf's layer axis
        does not have the config's depth.
    """
    if not is_stacked(params) and any(
        _num_layers(config, s) for s in STACKS if isinstance(params.get(s), Mapping)
    ):
        raise ValueError(
            "unstack_layers got a tree without scanned stacks (encoder/layers); it is "
            "already unstacked."
        )
    out = dict(params)
    for stack in STACKS:
        if not isinstance(params.get(stack), Mapping) or network.SCANNED_LAYERS not in params[stack]:
            continue
        subtree = dict(params[stack])
        stacked = subtree.pop(network.SCANNED_LAYERS)
        count = _num_layers(config, stack)
        for path, leaf in param_tree.flatten(stacked).items():
            if not isinstance(leaf, jax.sharding.Sharding) and np.shape(leaf)[:1] != (count,):
                raise ValueError(
                    f"{stack}/layers/{path} has shape {np.shape(leaf)}; its first axis should "
                    f"be num_{stack}_layers={count}."
                )
        for i in range(count):
            subtree[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: layer_slice(x, i), stacked)
        out[stack] = subtree
    return out


def layer_slice(x: Any, i: int) -> Any:
    """Layer `i` of a stacked leaf: an array, a `jax.ShapeDtypeStruct` or a sharding.

    Arrays are indexed; a `ShapeDtypeStruct` loses its first dimension (and
    its `NamedSharding` the first entry of its spec); a `NamedSharding` loses
    the first entry of its spec (the layer axis, which partitioning never
    splits); other shardings are per-device and kept.
    """
    if isinstance(x, jax.sharding.NamedSharding):
        spec = tuple(x.spec)
        return jax.sharding.NamedSharding(x.mesh, jax.sharding.PartitionSpec(*spec[1:])) if spec else x
    if isinstance(x, jax.sharding.Sharding):
        return x
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = None if x.sharding is None else layer_slice(x.sharding, i)
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)
    return x[i]


def stacked_path(path: str) -> str:
    """The scanned network's path of an unstacked one (`layers_3` -> `layers`)."""
    return "/".join(network.SCANNED_LAYERS if _LAYER.match(p) else p for p in path.split("/"))


def model_param_axes(config: T5Config, stacked: bool | None = None) -> dict[str, tuple[str, ...]]:
    """Logical axes of every parameter of the network `config` builds.

    `param_tree.param_axes(config)` when unscanned; with `scan_layers`, the
    stacked paths with `network.LAYER_AXIS` in front of each layer's axes.

    Args:
      config: The model config.
      stacked: The tree to describe (default: `config.scan_layers`'s).
    """
    axes = param_tree.param_axes(config)
    if not (config.scan_layers if stacked is None else stacked):
        return axes
    out: dict[str, tuple[str, ...]] = {}
    for path, names in axes.items():
        key = stacked_path(path)
        out[key] = (network.LAYER_AXIS, *names) if key != path else names
    return out


def cast_params(params: Any, dtype: Any) -> Any:
    """`params` with every floating leaf cast to `dtype` (others kept).

    Casting is skipped (the leaf returned as is) where it already has `dtype`.
    """
    dtype = jnp.dtype(dtype)

    def cast(x: Any) -> Any:
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        return x.astype(dtype)

    return jax.tree_util.tree_map(cast, params)


def model_params(params: Mapping[str, Any], config: T5Config, *, cast: bool = True) -> Any:
    """The parameters in the tree and dtype the network of `config` reads.

    Stacks unstacked trees for a scanned config, unstacks stacked trees for
    an unscanned one, and casts floating leaves to `config.param_dtype`
    (float32 unless inference asked for bfloat16). A tree already in the
    right form is returned unchanged, so callers that prepare parameters
    once (an inference run, a benchmark) pay nothing per call.

    Args:
      params: Either tree.
      config: The model config.
      cast: Cast to `config.param_dtype` (training passes False: its
        gradients are taken with respect to float32 master weights).

    Returns:
      The tree to pass to `network.Transformer(config).apply`.
    """
    stacked = is_stacked(params)
    if config.scan_layers and not stacked:
        params = stack_layers(params, config)
    elif stacked and not config.scan_layers:
        params = unstack_layers(params, config)
    return cast_params(params, config.parameter_dtype) if cast else params


# ------------------------------------------------ trees that mirror parameters
def _rebuild(node: Any, children: list[Any]) -> Any:
    if isinstance(node, Mapping):
        return dict(zip(node.keys(), children))
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # a NamedTuple (optax states)
        return type(node)(*children)
    return type(node)(children)


def _children(node: Any) -> list[Any] | None:
    if isinstance(node, Mapping):
        return list(node.values())
    if isinstance(node, (tuple, list)):
        return list(node)
    return None


def _mirrors_stacked_params(node: Any) -> bool:
    return isinstance(node, Mapping) and is_stacked(node)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x)) if not isinstance(x, jax.ShapeDtypeStruct) else tuple(x.shape)


def layer_counts(params: Mapping[str, Any]) -> dict[str, int]:
    """Layers of each scanned stack of a stacked parameter tree (`{'encoder': 24, ...}`).

    Read from the leading axis of the stack's leaves (arrays or
    `jax.ShapeDtypeStruct`s); stacks that are not scanned are absent.
    """
    counts = {}
    for stack in STACKS:
        node = params.get(stack) if isinstance(params, Mapping) else None
        if isinstance(node, Mapping) and network.SCANNED_LAYERS in node:
            leaves = jax.tree_util.tree_leaves(node[network.SCANNED_LAYERS])
            counts[stack] = _shape(leaves[0])[0] if leaves else 0
    return counts


def unstack_tree(tree: Any, counts: Mapping[str, int]) -> Any:
    """`unstack_layers` wherever a (possibly nested) tree mirrors stacked parameters.

    For training states: the parameters, and every sub-tree of an optimizer
    state that mirrors them (Adafactor's `v_row`, `v_col`, `v`; Adam's moments).
    A leaf of such a sub-tree with a layer axis (two or more dimensions) is
    sliced per layer; a leaf of one dimension or none is not per layer
    (optax's `[1]` placeholders of statistics a leaf does not keep) and is
    given to every layer as it is. Leaves may be arrays or
    `jax.ShapeDtypeStruct`s (whose `NamedSharding` loses the layer axis).
    Trees without stacked sub-trees are returned as they are (not copied).

    Args:
      tree: Any pytree of dicts, tuples, named tuples and lists.
      counts: `layer_counts` of the stacked parameters the tree mirrors.

    Returns:
      The tree with each `encoder/layers` / `decoder/layers` replaced by
      `layers_0 ...`.
    """
    if _mirrors_stacked_params(tree):
        out = dict(tree)
        for stack in STACKS:
            if not isinstance(tree.get(stack), Mapping) or network.SCANNED_LAYERS not in tree[stack]:
                continue
            subtree = dict(tree[stack])
            stacked = subtree.pop(network.SCANNED_LAYERS)
            for i in range(counts[stack]):
                subtree[f"layers_{i}"] = jax.tree_util.tree_map(
                    lambda x, i=i: layer_slice(x, i) if len(_shape(x)) > 1 else x, stacked
                )
            out[stack] = subtree
        return out
    children = _children(tree)
    if not children:
        return tree
    new = [unstack_tree(c, counts) for c in children]
    if all(a is b for a, b in zip(new, children)):
        return tree
    return _rebuild(tree, new)


def stack_tree(tree: Any, like: Any) -> Any:
    """The inverse of `unstack_tree`, shaped after a stacked tree `like`.

    Where `like` mirrors stacked parameters, the per-layer leaves of `tree`
    (`layers_0 ...`) are stacked for leaves whose `like` counterpart has a
    layer axis; the other leaves (optax's `[1]` placeholders) are taken from
    `layers_0`. Elsewhere `tree` is kept.

    Args:
      tree: An unstacked tree (e.g. a restored training state).
      like: The stacked tree it should become (arrays or
        `jax.ShapeDtypeStruct`s; only shapes are read).

    Returns:
      `tree` with `like`'s stacked sub-trees.
    """
    if _mirrors_stacked_params(like):
        out = dict(tree)
        for stack in STACKS:
            if not isinstance(like.get(stack), Mapping) or network.SCANNED_LAYERS not in like[stack]:
                continue
            template = like[stack][network.SCANNED_LAYERS]
            subtree = dict(tree[stack])
            count = sum(1 for k in subtree if _LAYER.match(k))
            per_layer = [subtree.pop(f"layers_{i}") for i in range(count)]
            subtree[network.SCANNED_LAYERS] = jax.tree_util.tree_map(
                lambda t, *xs: _stack(list(xs)) if len(_shape(t)) > 1 else xs[0], template, *per_layer
            )
            out[stack] = subtree
        return out
    children, like_children = _children(tree), _children(like)
    if not children or like_children is None:
        return tree
    return _rebuild(tree, [stack_tree(c, lc) for c, lc in zip(children, like_children)])
