"""Random initialisation of the network's parameters (T5X's initialisers).

`init_variables` is the network's own `init`; `init_params` returns its
`params` collection in a chosen dtype, either from one compiled program or
one layer at a time (`by_layer`), which bounds the memory a large model's
initialisation needs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gqa_t5x.model import network
from gqa_t5x.model.config import T5Config

Array = jax.Array


def init_variables(config: T5Config, rng: Array, batch: int = 1, length: int = 8) -> dict[str, Any]:
    """`Transformer(config).init` on dummy all-ones tokens.

    Args:
      config: Model config.
      rng: PRNG key of the initialisers.
      batch: Batch size of the dummy inputs (shapes do not depend on it).
      length: Sequence length of the dummy inputs.

    Returns:
      {'params': the T5X tree of float32 arrays, 'params_axes': logical axes};
      with `config.scan_layers` the stacked tree (`layer_stack.py`).
    """
    tokens = jnp.ones((batch, length), jnp.int32)
    return network.Transformer(config).init(rng, tokens, tokens, tokens, enable_dropout=False)


def init_params(config: T5Config, seed: int = 0, batch: int = 1, length: int = 8,
                dtype: Any = jnp.float32, by_layer: bool = False) -> Any:
    """Randomly initialised parameters (T5X initialisers) for `config`.

    Args:
      config: Model config.
      seed: PRNG seed.
      batch: Batch size of the dummy inputs used to trace shapes.
      length: Sequence length of the dummy inputs.
      dtype: Dtype of the returned leaves; the values are drawn in float32
        and cast inside the compiled program.
      by_layer: Initialise one layer per compiled program (the unscanned
        tree; the same initialisers, other draws than the whole-model
        program). One program for a whole model holds every parameter's
        random bits and float32 values at once: for T5.1.1-XXL, XLA:CPU's
        buffer assignment needs 104 GB (59.6 GB of temporaries beside the
        44.5 GB of float32 output; 81.9 + 22.3 GB cast to bfloat16), more
        than an 80 GB chip; layer by layer the peak is the output in `dtype`
        plus one layer's temporaries.

    Returns:
      The `params` collection (nested dict of `dtype` arrays).
    """
    dtype = jnp.dtype(dtype)

    def cast(tree: Any) -> Any:
        return jax.tree_util.tree_map(lambda x: x.astype(dtype), tree)

    if by_layer:
        return _init_params_by_layer(config.replace(scan_layers=False), jax.random.PRNGKey(seed), cast)
    return jax.jit(lambda rng: cast(init_variables(config, rng, batch, length)["params"]))(
        jax.random.PRNGKey(seed))


def _init_params_by_layer(config: T5Config, rng: Array, cast: Any) -> dict[str, Any]:
    """`init_params(..., by_layer=True)`: the model without layers, then each layer alone."""
    shell_config = config.replace(num_encoder_layers=0, num_decoder_layers=0, encoder_layer_kv_heads=None,
                                  decoder_self_kv_heads=None, decoder_cross_kv_heads=None)
    params = jax.jit(lambda r: cast(init_variables(shell_config, r)["params"]))(jax.random.fold_in(rng, 0))
    params = {name: dict(tree) for name, tree in params.items()}
    x = jnp.ones((1, 2, config.emb_dim), config.activation_dtype)  # [batch, length, emb]
    bias = jnp.zeros((1, config.num_heads, 2, 2), config.activation_dtype)
    programs: dict[tuple, Any] = {}  # one compiled program per distinct layer shape

    def layer_program(stack: str, layer: int, heads: tuple[int, ...]) -> Any:
        """Layer `layer`'s initialisation, compiled once per stack and key/value heads."""
        if (stack, heads) not in programs:
            if stack == "encoder":
                module = network.EncoderLayer(config=config, layer=layer)
                init = lambda r: module.init(r, x, None, bias, True)  # noqa: E731
            else:
                module = network.DecoderLayer(config=config, layer=layer)
                init = lambda r: module.init(r, x, x, None, None, bias, True, False)  # noqa: E731
            programs[stack, heads] = jax.jit(lambda r: cast(init(r)["params"]))
        return programs[stack, heads]

    for i in range(config.num_encoder_layers):
        program = layer_program("encoder", i, (config.kv_heads("encoder", i),))
        params["encoder"][f"layers_{i}"] = program(jax.random.fold_in(rng, 1000 + i))
    for i in range(config.num_decoder_layers):
        program = layer_program("decoder", i, (config.kv_heads("self", i), config.kv_heads("cross", i)))
        params["decoder"][f"layers_{i}"] = program(jax.random.fold_in(rng, 2000 + i))
    return {name: dict(sorted(tree.items())) for name, tree in params.items()}  # flax's key order
