"""Parameter initialisation: the whole-model program and the layer-by-layer one."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from gqa_t5x.model import initialization
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config


def test_layer_by_layer_initialisation_gives_the_whole_models_tree_in_the_asked_dtype():
    """The same paths, shapes and key order, the dtype asked for, and the initialisers' spreads."""
    config = T5Config(vocab_size=300, emb_dim=64, num_heads=8, head_dim=16, mlp_dim=128, num_encoder_layers=3,
                      num_decoder_layers=2, decoder_cross_kv_heads=(2, 4))
    whole = param_tree.flatten(initialization.init_params(config, seed=0))
    layered = param_tree.flatten(initialization.init_params(config, seed=0, dtype=jnp.bfloat16, by_layer=True))
    assert list(layered) == list(whole)
    for path, value in whole.items():
        ours = np.asarray(layered[path], np.float32)
        assert layered[path].dtype == jnp.bfloat16 and ours.shape == value.shape, path
        spread, expected = ours.std(), np.asarray(value).std()
        assert abs(spread - expected) <= 0.1 * expected + 1e-6, (path, spread, expected)
    layer_kernels = [layered[f"encoder/layers_{i}/mlp/wi_0/kernel"] for i in range(3)]
    assert not np.array_equal(np.asarray(layer_kernels[0]), np.asarray(layer_kernels[1]))  # own draws per layer
    scanned = initialization.init_params(config.replace(decoder_cross_kv_heads=None, scan_layers=True),
                                         by_layer=True)
    assert "layers_2" in scanned["encoder"]  # the checkpoint (unscanned) tree, as conversion reads it
