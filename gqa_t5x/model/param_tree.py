"""Parameter names and shapes of the T5.1.1 network in T5X, HuggingFace and Mesh TF.

Every checkpoint reader and writer in the project agrees on one canonical
naming: T5X's parameter paths (the tree under `target/` in a T5X checkpoint),
written as '/'-joined strings such as
`decoder/layers_0/self_attention/key/kernel`. The paths, shapes and logical
axes of a config are read from the network itself (`jax.eval_shape` of
`network.init_variables`, cached per config), so the tree is written down in
one place: `network.py` and `layers.py`. The module names below let callers
test a path without spelling them; `tests/model/test_param_tree.py` checks
them against the network. This module also maps each path to the
HuggingFace `transformers` and Mesh TensorFlow (original T5) variable names.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax.linen import partitioning as nn_partitioning

from gqa_t5x.model import layers
from gqa_t5x.model import network
from gqa_t5x.model.config import T5Config

# Attention sub-modules and which key/value head count each one uses.
ENCODER_ATTENTION = "attention"
DECODER_SELF_ATTENTION = "self_attention"
DECODER_CROSS_ATTENTION = "encoder_decoder_attention"
ATTENTION_PROJECTIONS = ("query", "key", "value", "out")
KEY_VALUE_PROJECTIONS = ("key", "value")


@functools.lru_cache(maxsize=64)
def _tree(config: T5Config) -> tuple[tuple[str, tuple[int, ...], tuple[str, ...]], ...]:
    """(path, shape, logical axes) of every parameter, in the network's order."""
    order: list[str] = []

    def init(rng: jax.Array) -> dict[str, Any]:
        variables = network.init_variables(config, rng)
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

    Args:
      config: the model config (num_kv_heads decides key/value kernel widths).

    Returns:
      An insertion-ordered dict `path -> shape` (a new dict per call).
    """
    return {path: shape for path, shape, _ in _tree(config)}


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


# ----------------------------------------------------------------- HuggingFace
_HF_PROJ = {"query": "q", "key": "k", "value": "v", "out": "o"}
_HF_PROJ_INV = {v: k for k, v in _HF_PROJ.items()}


def hf_name(path: str) -> tuple[str, bool]:
    """Maps a T5X path to (HuggingFace state-dict name, needs_transpose).

    HuggingFace `nn.Linear` weights are `[out, in]`, the transpose of T5X
    kernels; the relative position bias is `[buckets, heads]`.
    """
    if path == "token_embedder/embedding":
        return "shared.weight", False
    if path == "decoder/logits_dense/kernel":
        return "lm_head.weight", True
    if path == "encoder/encoder_norm/scale":
        return "encoder.final_layer_norm.weight", False
    if path == "decoder/decoder_norm/scale":
        return "decoder.final_layer_norm.weight", False
    m = re.fullmatch(r"(encoder|decoder)/relpos_bias/rel_embedding", path)
    if m:
        side = m.group(1)
        return f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True
    m = re.fullmatch(r"encoder/layers_(\d+)/(.+)", path)
    if m:
        i, rest = m.group(1), m.group(2)
        table = {
            "pre_attention_layer_norm/scale": ("layer.0.layer_norm.weight", False),
            "pre_mlp_layer_norm/scale": ("layer.1.layer_norm.weight", False),
        }
        if rest in table:
            name, t = table[rest]
            return f"encoder.block.{i}.{name}", t
        m2 = re.fullmatch(r"attention/(query|key|value|out)/kernel", rest)
        if m2:
            return f"encoder.block.{i}.layer.0.SelfAttention.{_HF_PROJ[m2.group(1)]}.weight", True
        m2 = re.fullmatch(r"mlp/(wi|wi_\d+|wo)/kernel", rest)
        if m2:
            return f"encoder.block.{i}.layer.1.DenseReluDense.{m2.group(1)}.weight", True
    m = re.fullmatch(r"decoder/layers_(\d+)/(.+)", path)
    if m:
        i, rest = m.group(1), m.group(2)
        table = {
            "pre_self_attention_layer_norm/scale": ("layer.0.layer_norm.weight", False),
            "pre_cross_attention_layer_norm/scale": ("layer.1.layer_norm.weight", False),
            "pre_mlp_layer_norm/scale": ("layer.2.layer_norm.weight", False),
        }
        if rest in table:
            name, t = table[rest]
            return f"decoder.block.{i}.{name}", t
        m2 = re.fullmatch(r"self_attention/(query|key|value|out)/kernel", rest)
        if m2:
            return f"decoder.block.{i}.layer.0.SelfAttention.{_HF_PROJ[m2.group(1)]}.weight", True
        m2 = re.fullmatch(r"encoder_decoder_attention/(query|key|value|out)/kernel", rest)
        if m2:
            return f"decoder.block.{i}.layer.1.EncDecAttention.{_HF_PROJ[m2.group(1)]}.weight", True
        m2 = re.fullmatch(r"mlp/(wi|wi_\d+|wo)/kernel", rest)
        if m2:
            return f"decoder.block.{i}.layer.2.DenseReluDense.{m2.group(1)}.weight", True
    raise KeyError(f"No HuggingFace name for T5X parameter {path!r}.")


def params_from_hf_state_dict(
    state_dict: Mapping[str, Any], config: T5Config
) -> dict[str, Any]:
    """Builds our nested parameter tree from a HuggingFace T5 state dict.

    Args:
      state_dict: name -> array-like (numpy arrays or torch tensors).
      config: the config whose `param_shapes` the result must have.

    Returns:
      Nested dict of float32 numpy arrays with T5X names.
    """
    flat = {}
    for path, shape in param_shapes(config).items():
        name, transpose = hf_name(path)
        if name not in state_dict:
            raise KeyError(
                f"HuggingFace state dict lacks {name!r} (needed for {path!r})."
            )
        value = state_dict[name]
        if hasattr(value, "detach"):  # torch tensor
            value = value.detach().cpu().float().numpy()
        value = np.asarray(value)
        if transpose:
            value = value.T
        if tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"HuggingFace tensor {name!r} has shape {tuple(value.shape)} but "
                f"{path!r} needs {tuple(shape)} for this config."
            )
        flat[path] = np.ascontiguousarray(value)
    return unflatten(flat)


# ----------------------------------------------------------------- Mesh TF
_MTF_PROJ = {"query": "q", "key": "k", "value": "v", "out": "o"}


def mesh_tf_name(path: str) -> str:
    """Maps a T5X path to the Mesh TensorFlow (original T5) variable name."""
    if path == "token_embedder/embedding":
        return "shared/embedding"
    if path == "decoder/logits_dense/kernel":
        return "decoder/logits/kernel"
    if path == "encoder/encoder_norm/scale":
        return "encoder/rms_norm/scale"
    if path == "decoder/decoder_norm/scale":
        return "decoder/rms_norm/scale"
    m = re.fullmatch(r"(encoder|decoder)/relpos_bias/rel_embedding", path)
    if m:
        return f"{m.group(1)}/block_000/layer_000/SelfAttention/relative_attention_bias"
    m = re.fullmatch(r"(encoder|decoder)/layers_(\d+)/(.+)", path)
    if m:
        side, i, rest = m.group(1), int(m.group(2)), m.group(3)
        block = f"{side}/block_{i:03d}"
        if side == "encoder":
            norms = {"pre_attention_layer_norm/scale": 0, "pre_mlp_layer_norm/scale": 1}
            mlp_layer = 1
            attn = {ENCODER_ATTENTION: (0, "SelfAttention")}
        else:
            norms = {
                "pre_self_attention_layer_norm/scale": 0,
                "pre_cross_attention_layer_norm/scale": 1,
                "pre_mlp_layer_norm/scale": 2,
            }
            mlp_layer = 2
            attn = {
                DECODER_SELF_ATTENTION: (0, "SelfAttention"),
                DECODER_CROSS_ATTENTION: (1, "EncDecAttention"),
            }
        if rest in norms:
            return f"{block}/layer_{norms[rest]:03d}/rms_norm/scale"
        m2 = re.fullmatch(r"(\w+)/(query|key|value|out)/kernel", rest)
        if m2 and m2.group(1) in attn:
            layer, mod = attn[m2.group(1)]
            return f"{block}/layer_{layer:03d}/{mod}/{_MTF_PROJ[m2.group(2)]}"
        m2 = re.fullmatch(r"mlp/(wi|wi_\d+|wo)/kernel", rest)
        if m2:
            return f"{block}/layer_{mlp_layer:03d}/DenseReluDense/{m2.group(1)}/kernel"
    raise KeyError(f"No Mesh TensorFlow name for T5X parameter {path!r}.")


# ------------------------------------------------------------ reverse maps
_ENC_HF_NORMS = {"0": "pre_attention_layer_norm", "1": "pre_mlp_layer_norm"}
_DEC_HF_NORMS = {"0": "pre_self_attention_layer_norm", "1": "pre_cross_attention_layer_norm", "2": "pre_mlp_layer_norm"}


def hf_to_t5x(name: str) -> tuple[str, bool] | None:
    """Maps a HuggingFace T5 state-dict name to (T5X path, needs_transpose).

    The inverse of `hf_name`. Returns None for names without a T5X parameter
    (e.g. the tied aliases `encoder.embed_tokens.weight`).
    """
    fixed = {
        "shared.weight": ("token_embedder/embedding", False),
        "lm_head.weight": ("decoder/logits_dense/kernel", True),
        "encoder.final_layer_norm.weight": ("encoder/encoder_norm/scale", False),
        "decoder.final_layer_norm.weight": ("decoder/decoder_norm/scale", False),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (
            "encoder/relpos_bias/rel_embedding", True),
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (
            "decoder/relpos_bias/rel_embedding", True),
    }
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d)\.(.+)\.weight", name)
    if m is None:
        return None
    side, i, sub, rest = m.groups()
    prefix = f"{side}/layers_{i}"
    if rest == "layer_norm":
        norm = (_ENC_HF_NORMS if side == "encoder" else _DEC_HF_NORMS).get(sub)
        return (f"{prefix}/{norm}/scale", False) if norm else None
    m2 = re.fullmatch(r"(SelfAttention|EncDecAttention)\.([qkvo])", rest)
    if m2:
        if side == "encoder" and (sub, m2.group(1)) == ("0", "SelfAttention"):
            module = ENCODER_ATTENTION
        elif side == "decoder" and (sub, m2.group(1)) == ("0", "SelfAttention"):
            module = DECODER_SELF_ATTENTION
        elif side == "decoder" and (sub, m2.group(1)) == ("1", "EncDecAttention"):
            module = DECODER_CROSS_ATTENTION
        else:
            return None
        return f"{prefix}/{module}/{_HF_PROJ_INV[m2.group(2)]}/kernel", True
    m2 = re.fullmatch(r"DenseReluDense\.(wi|wi_\d+|wo)", rest)
    if m2 and sub == ("1" if side == "encoder" else "2"):
        return f"{prefix}/mlp/{m2.group(1)}/kernel", True
    return None


_MTF_PROJ_INV = {v: k for k, v in _MTF_PROJ.items()}


def mesh_tf_to_t5x(name: str) -> str | None:
    """Maps a Mesh TensorFlow variable name to its T5X path (inverse of
    `mesh_tf_name`); None for variables that are not model parameters."""
    fixed = {
        "shared/embedding": "token_embedder/embedding",
        "decoder/logits/kernel": "decoder/logits_dense/kernel",
        "encoder/rms_norm/scale": "encoder/encoder_norm/scale",
        "decoder/rms_norm/scale": "decoder/decoder_norm/scale",
        "encoder/block_000/layer_000/SelfAttention/relative_attention_bias": "encoder/relpos_bias/rel_embedding",
        "decoder/block_000/layer_000/SelfAttention/relative_attention_bias": "decoder/relpos_bias/rel_embedding",
    }
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"(encoder|decoder)/block_(\d{3})/layer_(\d{3})/(.+)", name)
    if m is None:
        return None
    side, block, layer, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    prefix = f"{side}/layers_{block}"
    if rest == "rms_norm/scale":
        norm = (_ENC_HF_NORMS if side == "encoder" else _DEC_HF_NORMS).get(str(layer))
        return f"{prefix}/{norm}/scale" if norm else None
    m2 = re.fullmatch(r"(SelfAttention|EncDecAttention)/([qkvo])", rest)
    if m2:
        module = {
            ("encoder", 0, "SelfAttention"): ENCODER_ATTENTION,
            ("decoder", 0, "SelfAttention"): DECODER_SELF_ATTENTION,
            ("decoder", 1, "EncDecAttention"): DECODER_CROSS_ATTENTION,
        }.get((side, layer, m2.group(1)))
        return f"{prefix}/{module}/{_MTF_PROJ_INV[m2.group(2)]}/kernel" if module else None
    m2 = re.fullmatch(r"DenseReluDense/(wi|wi_\d+|wo)/kernel", rest)
    if m2 and layer == (1 if side == "encoder" else 2):
        return f"{prefix}/mlp/{m2.group(1)}/kernel"
    return None
