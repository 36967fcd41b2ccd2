"""Parameter names and shapes of the T5.1.1 network in T5X, HuggingFace and Mesh TF.

Every checkpoint reader and writer in the project agrees on one canonical
naming: T5X's parameter paths (the tree under `target/` in a T5X checkpoint),
written as '/'-joined strings such as
`decoder/layers_0/self_attention/key/kernel`. This module enumerates them for a
config, with their shapes, and maps each to the HuggingFace `transformers` and
Mesh TensorFlow (original T5) variable names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gqa_t5x.model.config import T5Config

# Attention sub-modules and which key/value head count each one uses.
ENCODER_ATTENTION = "attention"
DECODER_SELF_ATTENTION = "self_attention"
DECODER_CROSS_ATTENTION = "encoder_decoder_attention"
ATTENTION_PROJECTIONS = ("query", "key", "value", "out")


def param_shapes(config: T5Config) -> dict[str, tuple[int, ...]]:
    """Every parameter path of the network with its shape, in T5X order.

    Args:
      config: the model config (num_kv_heads decides key/value kernel widths).

    Returns:
      An insertion-ordered dict `path -> shape`.
    """
    emb, heads, hd = config.emb_dim, config.num_heads, config.head_dim
    mlp, vocab, buckets = config.mlp_dim, config.vocab_size, config.relative_attention_num_buckets
    n_mlp_in = len(config.mlp_activations)
    shapes: dict[str, tuple[int, ...]] = {}
    shapes["token_embedder/embedding"] = (vocab, emb)

    def attention(prefix: str, kv_heads: int) -> None:
        shapes[f"{prefix}/query/kernel"] = (emb, heads * hd)
        shapes[f"{prefix}/key/kernel"] = (emb, kv_heads * hd)
        shapes[f"{prefix}/value/kernel"] = (emb, kv_heads * hd)
        shapes[f"{prefix}/out/kernel"] = (heads * hd, emb)

    def mlp_block(prefix: str) -> None:
        if n_mlp_in == 1:
            shapes[f"{prefix}/wi/kernel"] = (emb, mlp)
        else:
            for i in range(n_mlp_in):
                shapes[f"{prefix}/wi_{i}/kernel"] = (emb, mlp)
        shapes[f"{prefix}/wo/kernel"] = (mlp, emb)

    shapes["encoder/relpos_bias/rel_embedding"] = (heads, buckets)
    for i in range(config.num_encoder_layers):
        p = f"encoder/layers_{i}"
        shapes[f"{p}/pre_attention_layer_norm/scale"] = (emb,)
        attention(f"{p}/{ENCODER_ATTENTION}", config.encoder_kv_heads)
        shapes[f"{p}/pre_mlp_layer_norm/scale"] = (emb,)
        mlp_block(f"{p}/mlp")
    shapes["encoder/encoder_norm/scale"] = (emb,)

    shapes["decoder/relpos_bias/rel_embedding"] = (heads, buckets)
    for i in range(config.num_decoder_layers):
        p = f"decoder/layers_{i}"
        shapes[f"{p}/pre_self_attention_layer_norm/scale"] = (emb,)
        attention(f"{p}/{DECODER_SELF_ATTENTION}", config.decoder_kv_heads)
        shapes[f"{p}/pre_cross_attention_layer_norm/scale"] = (emb,)
        attention(f"{p}/{DECODER_CROSS_ATTENTION}", config.decoder_kv_heads)
        shapes[f"{p}/pre_mlp_layer_norm/scale"] = (emb,)
        mlp_block(f"{p}/mlp")
    shapes["decoder/decoder_norm/scale"] = (emb,)
    if not config.logits_via_embedding:
        shapes["decoder/logits_dense/kernel"] = (emb, vocab)
    return shapes


# ----------------------------------------------------------------- tree utils
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
