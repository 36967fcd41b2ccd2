"""Building blocks of the T5.1.1 network: dense, embedding, RMS norm, gated MLP.

Parameter names and shapes follow T5X (`t5x/examples/t5/layers.py`): kernels
are stored 2-D (`[in, out]`), norms have a `scale`, the embedding table is
`embedding`. Parameters are float32; computation runs in the config's
activation dtype.

Every parameter is created by `param_with_axes`, which also records the
parameter's logical axis names (T5X's `kernel_axes`, e.g. `('embed', 'mlp')`)
in the side collection `params_axes`, under `<name>_axes` as T5X does. The
`params` collection therefore holds plain float32 arrays (the T5X tree, as
checkpoints store it); `param_tree.param_axes` reads the axes of any config
from `jax.eval_shape` of the network's `init`, and `training/partitioning.py`
maps them to the device mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import partitioning as nn_partitioning

Array = jax.Array
Initializer = Callable[..., Array]

# Collection holding one `AxisMetadata` per parameter (T5X's name for it).
AXES_COLLECTION = "params_axes"
AXES_SUFFIX = "_axes"

# Collection of decode-layout kernels: a Dense layer finds its kernel
# transposed, `[out, in]`, under `decode_kernels/<module path>/kernel` when a
# decoding run supplies it (`decode_step.decode_kernels`).
DECODE_KERNELS = "decode_kernels"

# T5X's default initialisers.
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
mlp_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
embedding_init = nn.initializers.normal(stddev=1.0)


def param_with_axes(
    module: nn.Module,
    name: str,
    init_fn: Initializer,
    shape: tuple[int, ...],
    axes: tuple[str, ...],
) -> Array:
    """Creates (or fetches) float32 parameter `name` and records its logical axes.

    The axes go to the `params_axes` collection as `<name>_axes` when that
    collection is mutable (during `init`); `apply` only reads the parameter.

    Args:
      module: The module that owns the parameter.
      name: Parameter name (T5X's: 'kernel', 'scale', 'embedding', ...).
      init_fn: Initialiser `(rng, shape, dtype) -> array`.
      shape: Parameter shape.
      axes: One logical axis name per dimension, e.g. ('embed', 'mlp').

    Returns:
      The float32 parameter.
    """
    if len(axes) != len(shape):
        raise ValueError(
            f"{type(module).__name__}.{name} has shape {shape} but logical axes "
            f"{axes}; give one axis name per dimension."
        )
    value = module.param(name, init_fn, shape, jnp.float32)
    if module.is_mutable_collection(AXES_COLLECTION):
        module.put_variable(
            AXES_COLLECTION, name + AXES_SUFFIX, nn_partitioning.AxisMetadata(names=tuple(axes))
        )
    return value


def activation_fn(name: str) -> Callable[[Array], Array]:
    """Returns the activation called `name` ('linear' is the identity).

    T5X's 'gelu' is flax's tanh-approximated gelu, which is also what
    HuggingFace calls 'gelu_new' (T5 v1.1's `gated-gelu`).
    """
    table: dict[str, Callable[[Array], Array]] = {
        "gelu": nn.gelu,
        "gelu_new": nn.gelu,
        "relu": nn.relu,
        "linear": lambda x: x,
        "silu": nn.silu,
        "swish": nn.silu,
        "tanh": jnp.tanh,
    }
    if name not in table:
        raise ValueError(f"Unknown activation {name!r}; known: {sorted(table)}.")
    return table[name]


class Dense(nn.Module):
    """A bias-free linear map with a 2-D `kernel` `[in_features, features]`.

    Attributes:
      features: Output width.
      kernel_axes: Logical names of the kernel's (input, output) dimensions.
      dtype: Computation dtype (the kernel is cast to it).
      kernel_init: Initialiser of the float32 kernel.
    """

    features: int
    kernel_axes: tuple[str, str]
    dtype: Any = jnp.float32
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        kernel = param_with_axes(
            self, "kernel", self.kernel_init, (inputs.shape[-1], self.features), self.kernel_axes
        )  # [in, out]
        inputs = inputs.astype(self.dtype)
        if self.has_variable(DECODE_KERNELS, "kernel"):
            kernel_t = self.get_variable(DECODE_KERNELS, "kernel")  # [out, in]
            if kernel_t.shape != (self.features, inputs.shape[-1]):
                raise ValueError(
                    f"decode_kernels holds a kernel of shape {kernel_t.shape} for a Dense layer "
                    f"of {inputs.shape[-1]} -> {self.features}; build it with "
                    "decode_step.decode_kernels(params)."
                )
            return out_major_matmul(inputs, kernel_t.astype(self.dtype))
        kernel = kernel.astype(self.dtype)
        return jnp.einsum("...i,io->...o", inputs, kernel)


def out_major_matmul(inputs: Array, kernel_t: Array) -> Array:
    """`inputs [..., in] x kernel [in, out]` from the transposed kernel `[out, in]`.

    Computed as `[out, rows] = kernel_t [out, in] . inputs^T` and transposed
    back: with a few rows (a decode step's batch) XLA:CPU runs this product
    over a row-major `[out, in]` kernel 1.5-3x faster than `inputs . kernel`
    over `[in, out]` (docs/bench_micro.md, "weight products"). The
    optimization barrier keeps XLA from folding the final transpose into the
    product, which would turn it back into the slow form.

    Args:
      inputs: `[..., in]`.
      kernel_t: `[out, in]`, the kernel transposed.

    Returns:
      `[..., out]`.
    """
    lead = inputs.shape[:-1]
    rows = inputs.reshape(-1, inputs.shape[-1])  # [rows, in]
    out_t = jnp.einsum("oi,ri->or", kernel_t, rows)  # [out, rows]
    out_t = jax.lax.optimization_barrier(out_t)
    return out_t.T.reshape(*lead, kernel_t.shape[0])  # [..., out]


class Embed(nn.Module):
    """Token embedding `embedding` `[num_embeddings, features]`.

    Attributes:
      num_embeddings: Vocabulary size.
      features: Embedding width.
      dtype: Dtype of the looked-up vectors.
    """

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    embedding_init: Initializer = embedding_init

    def setup(self) -> None:
        self.embedding = param_with_axes(
            self,
            "embedding",
            self.embedding_init,
            (self.num_embeddings, self.features),
            ("vocab", "embed"),
        )  # [vocab, emb]

    def __call__(self, inputs: Array) -> Array:
        """Looks up integer ids `[...]` -> `[..., features]`."""
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"Embed expects integer token ids, got {inputs.dtype}.")
        return jnp.take(self.embedding, inputs, axis=0).astype(self.dtype)

    def attend(self, query: Array) -> Array:
        """Logits against the embedding table (tied output projection)."""
        return jnp.einsum(
            "...e,ve->...v", query.astype(self.dtype), self.embedding.astype(self.dtype)
        )


class LayerNorm(nn.Module):
    """T5's RMS norm: no mean subtraction, no bias, `scale` `[features]`.

    Statistics are computed in float32 whatever the activation dtype.
    """

    epsilon: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = x.shape[-1]
        scale = param_with_axes(self, "scale", nn.initializers.ones, (features,), ("embed",))
        x32 = jnp.asarray(x, jnp.float32)
        mean2 = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(mean2 + self.epsilon)
        return (y * scale).astype(self.dtype)


class MlpBlock(nn.Module):
    """T5.1.1 gated MLP: prod_i act_i(x W_i), dropout, then W_o.

    With one activation the input kernel is `wi`; with several they are
    `wi_0`, `wi_1`, ... (T5X naming).

    Attributes:
      intermediate_dim: Hidden width (d_ff).
      activations: One activation per input branch.
      intermediate_dropout_rate: Dropout after the gated product.
      dtype: Computation dtype.
    """

    intermediate_dim: int
    activations: Sequence[str] = ("gelu", "linear")
    intermediate_dropout_rate: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs: Array, deterministic: bool = True) -> Array:
        emb_dim = inputs.shape[-1]
        hidden = None
        for idx, act in enumerate(self.activations):
            name = "wi" if len(self.activations) == 1 else f"wi_{idx}"
            h = Dense(
                self.intermediate_dim,
                kernel_axes=("embed", "mlp"),
                dtype=self.dtype,
                kernel_init=mlp_kernel_init,
                name=name,
            )(inputs)  # [batch, length, mlp]
            h = activation_fn(act)(h)
            hidden = h if hidden is None else hidden * h
        assert hidden is not None
        hidden = nn.Dropout(
            rate=self.intermediate_dropout_rate, broadcast_dims=(-2,)
        )(hidden, deterministic=deterministic)
        return Dense(
            emb_dim,
            kernel_axes=("mlp", "embed"),
            dtype=self.dtype,
            kernel_init=mlp_kernel_init,
            name="wo",
        )(hidden)  # [batch, length, emb]
