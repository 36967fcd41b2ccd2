"""Layers declare the logical axes of every parameter; partitioning reads them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from gqa_t5x.model import layers
from gqa_t5x.model import initialization
from gqa_t5x.model import network
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config
from gqa_t5x.training import partitioning


def _config(**changes) -> T5Config:
    base = dict(vocab_size=40, emb_dim=16, num_heads=4, head_dim=4, mlp_dim=24, num_encoder_layers=2,
                num_decoder_layers=2, dropout_rate=0.0, num_kv_heads=2, encoder_num_kv_heads=1)
    return T5Config(**{**base, **changes})


# T5X's logical axes (t5x/examples/t5/layers.py), by the last two path components.
T5X_AXES = {
    "token_embedder/embedding": ("vocab", "embed"),
    "relpos_bias/rel_embedding": ("heads", "relpos_buckets"),
    "query/kernel": ("embed", "joined_kv"),
    "key/kernel": ("embed", "kv_joined_kv"),
    "value/kernel": ("embed", "kv_joined_kv"),
    "out/kernel": ("joined_kv", "embed"),
    "wi/kernel": ("embed", "mlp"),
    "wi_0/kernel": ("embed", "mlp"),
    "wi_1/kernel": ("embed", "mlp"),
    "wo/kernel": ("mlp", "embed"),
    "logits_dense/kernel": ("embed", "vocab"),
}


@pytest.mark.parametrize(
    "changes", [{}, {"mlp_activations": ("relu",)}, {"logits_via_embedding": True, "num_kv_heads": 1}]
)
def test_every_parameter_of_the_tree_declares_t5x_logical_axes(changes):
    config = _config(**changes)
    shapes, axes = param_tree.param_shapes(config), param_tree.param_axes(config)
    assert list(axes) == list(shapes)
    for path, shape in shapes.items():
        assert len(axes[path]) == len(shape), path
        tail = "/".join(path.split("/")[-2:])
        expected = ("embed",) if path.endswith("/scale") else T5X_AXES[tail]
        assert axes[path] == expected, path


def test_init_keeps_plain_float32_params_and_puts_axes_beside_them():
    config = _config()
    variables = jax.jit(lambda rng: initialization.init_variables(config, rng))(jax.random.PRNGKey(0))  # one program
    assert set(variables) == {"params", layers.AXES_COLLECTION}
    flat = param_tree.flatten(variables["params"])
    assert {k: v.shape for k, v in flat.items()} == param_tree.param_shapes(config)
    assert all(type(v) is type(jnp.zeros(1)) and v.dtype == jnp.float32 for v in flat.values())
    axes = param_tree.flatten(variables[layers.AXES_COLLECTION])
    assert axes["decoder/layers_0/self_attention/key/kernel_axes"].names == ("embed", "kv_joined_kv")
    assert len(axes) == len(flat)


def test_applying_with_a_mutable_cache_leaves_the_axes_alone():
    config = _config()
    params = param_tree.abstract_params(config)
    model = network.Transformer(config)
    encoded = jax.ShapeDtypeStruct((1, 3, config.emb_dim), jnp.float32)
    _, state = jax.eval_shape(  # shapes only: nothing is computed
        lambda p, e: model.apply({"params": p}, e, 4, method=network.Transformer.init_decode_cache,
                                 mutable=["cache"]), params, encoded)
    assert set(state) == {"cache"}


def test_a_parameter_needs_one_axis_name_per_dimension():
    dense = layers.Dense(3, kernel_axes=("embed",))
    with pytest.raises(ValueError, match=r"Dense.kernel has shape \(2, 3\) but logical axes \('embed',\)"):
        dense.init(jax.random.PRNGKey(0), jnp.ones((1, 2)))


def test_partitioner_maps_the_declared_axes_through_its_rules():
    config = _config()
    rules = (("embed", "data"), ("vocab", "model"), ("mlp", None), ("heads", None), ("joined_kv", None),
             ("kv_joined_kv", None), ("relpos_buckets", None))
    partitioner = partitioning.Partitioner(1, logical_axis_rules=rules, devices=jax.devices()[:1])
    abstract = jax.eval_shape(lambda: initialization.init_params(config))
    specs = param_tree.flatten(partitioner.param_specs(abstract, config))
    axes = param_tree.param_axes(config)
    assert set(specs) == set(axes)
    for path, spec in specs.items():
        assert spec == PartitionSpec(*(dict(rules)[name] for name in axes[path])), path
    assert specs["token_embedder/embedding"] == PartitionSpec("model", "data")
    assert specs["encoder/encoder_norm/scale"] == PartitionSpec("data")


def test_partitioner_rejects_parameters_the_network_does_not_have():
    config = _config()
    partitioner = partitioning.Partitioner(1, devices=jax.devices()[:1])
    params = {"decoder": {"adapter": {"kernel": np.zeros((16, 4), np.float32)}}}
    with pytest.raises(ValueError, match="'decoder/adapter/kernel' is not a parameter of the network"):
        partitioner.param_specs(params, config)


def test_dense_reads_a_transposed_decode_kernel_when_one_is_supplied():
    dense = layers.Dense(5, kernel_axes=("embed", "mlp"))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 4)), jnp.float32)
    params = dense.init(jax.random.PRNGKey(0), x)["params"]
    plain = dense.apply({"params": params}, x)
    kernel_t = jnp.transpose(params["kernel"])  # [out, in]
    fast = dense.apply({"params": params, layers.DECODE_KERNELS: {"kernel": kernel_t}}, x)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(plain), atol=1e-6)
    # It is the supplied kernel that is used, not the parameter.
    doubled = dense.apply({"params": params, layers.DECODE_KERNELS: {"kernel": 2 * kernel_t}}, x)
    np.testing.assert_allclose(np.asarray(doubled), 2 * np.asarray(plain), atol=1e-5)
    with pytest.raises(ValueError, match="decode_step.decode_kernels"):
        dense.apply({"params": params, layers.DECODE_KERNELS: {"kernel": params["kernel"]}}, x)
