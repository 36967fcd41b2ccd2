"""Parameter names, shapes and logical axes of the T5.1.1 network (T5X's tree).

Every checkpoint reader and writer in the project agrees on one canonical
naming: T5X's parameter paths (the tree under `target/` in a T5X checkpoint),
written as '/'-joined strings such as
`decoder/layers_0/self_attention/key/kernel`. The paths, shapes and logical
axes of a config are read from the network itself (`jax.eval_shape` of
`initialization.init_variables`, cached per config), so the tree is written down in
one place: `network.py` and `layers.py`. The module names below let callers
test a path without spelling them; `tests/model/test_param_tree.py` checks
them against the network. The names other formats give these paths
(HuggingFace `transformers`, Mesh TensorFlow) live with their readers in
`gqa_t5x/checkpoints/` (`huggingface.hf_name`, `mesh_tf.mesh_tf_to_t5x`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax.linen import partitioning as nn_partitioning

from gqa_t5x.model import layers
from gqa_t5x.model import initialization
from gqa_t5x.model.config import T5Config

# Attention sub-modules and which key/value head count each one uses.
ENCODER_ATTENTION = "attention"
DECODER_SELF_ATTENTION = "self_attention"
DECODER_CROSS_ATTENTION = "encoder_decoder_attention"
ATTENTION_PROJECTIONS = ("query", "key", "value", "out")
KEY_VALUE_PROJECTIONS = ("key", "value")


def _tree(config: T5Config) -> tuple[tuple[str, tuple[int, ...], tuple[str, ...]], ...]:
    """(path, shape, logical axes) of every parameter of the UNSCANNED network.

    The on-disk tree does not depend on how the network runs (`scan_layers`)
    or on the inference parameter dtype, so those fields are reset before
    the (cached) trace.
    """
    return _unscanned_tree(config.replace(scan_layers=False, param_dtype="float32"))


@functools.lru_cache(maxsize=64)
def _unscanned_tree(config: T5Config) -> tuple[tuple[str, tuple[int, ...], tuple[str, ...]], ...]:
    """(path, shape, logical axes) of every parameter, in the network's order."""
    order: list[str] = []

    def init(rng: jax.Array) -> dict[str, Any]:
        variables = initialization.init_variables(config, rng)
        # `eval_shape` returns dicts with sorted keys ('layers_10' before
        # 'layers_2'); inside the trace they are in creation order, T5X's.
        order.extend(flatten(variables["params"]))
        return variables

    variables = jax.eval_shape(init, jax.random.PRNGKey(0))
    flat_shapes = flatten(variables["params"])
    shapes = {path: flat_shapes[path] for path in order}
    axes = flatten(nn_partitioning.get_axis_names(variables[layers.AXES_COLLECTION]))
    missing = sorted(set(shapes) - set(axes))
    if missing:
        raise ValueError(
            f"Parameters {missing} were created without logical axes; create them "
            "with layers.param_with_axes."
        )
    return tuple((path, tuple(leaf.shape), tuple(axes[path])) for path, leaf in shapes.items())


def param_shapes(config: T5Config) -> dict[str, tuple[int, ...]]:
    """Every parameter path of the network with its shape, in T5X order.

    Always the unscanned tree that checkpoints hold (`encoder/layers_0/...`),
    also for a config with `scan_layers` (`layer_stack` converts).

    Args:
      config: the model config (each layer's `config.kv_heads(kind, layer)`
        decides its key/value kernel widths).

    Returns:
      An insertion-ordered dict `path -> shape` (a new dict per call).
    """
    return {path: shape for path, shape, _ in _tree(config)}


def abstract_params(config: T5Config) -> dict[str, Any]:
    """The unscanned float32 parameter tree of `config`, shapes only (nothing allocated).

    Args:
      config: the model config.

    Returns:
      The nested tree of `jax.ShapeDtypeStruct`s, as `param_shapes` orders it
      (for `jax.eval_shape` and `.lower`).
    """
    return unflatten({path: jax.ShapeDtypeStruct(shape, jax.numpy.float32)
                      for path, shape in param_shapes(config).items()})


def param_axes(config: T5Config) -> dict[str, tuple[str, ...]]:
    """Every parameter path with the logical axis names its layer declares.

    Args:
      config: the model config.

    Returns:
      An insertion-ordered dict `path -> axes`, one name per dimension, e.g.
      `'decoder/layers_0/self_attention/key/kernel' -> ('embed', 'kv_joined_kv')`.
    """
    return {path: axes for path, _, axes in _tree(config)}


def is_cross_attention(path: str) -> bool:
    """Whether a '/'-joined parameter or cache path lies in encoder-decoder attention."""
    return DECODER_CROSS_ATTENTION in path.split("/")


def attention_projection(path: str) -> str | None:
    """'query', 'key', 'value' or 'out' for an attention kernel path, else None."""
    parts = path.split("/")
    if len(parts) >= 3 and parts[-1] == "kernel" and parts[-2] in ATTENTION_PROJECTIONS:
        if parts[-3] in (ENCODER_ATTENTION, DECODER_SELF_ATTENTION, DECODER_CROSS_ATTENTION):
            return parts[-2]
    return None


# ----------------------------------------------------------------- tree utils
def keypath_str(keypath: Sequence[Any]) -> str:
    """'/'-joined path of a `jax.tree_util` key path (dict keys, attributes, indices)."""
    parts = []
    for key in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a/b/c': leaf}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b/c': leaf} -> nested dict."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        parts = path.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out
