"""Model hyper-parameters of a T5.1.1 encoder-decoder with grouped key/value heads.

`T5Config` carries T5X's fields (`t5x/examples/t5/network.py`) plus the two
numbers that make grouped-query attention configurable:

* `num_kv_heads`: key/value heads of decoder self-attention AND of
  encoder-decoder attention (the layers the paper converts).
* `encoder_num_kv_heads`: key/value heads of encoder self-attention (the paper
  leaves it multi-head).

Both are ints inside the code: `1` is multi-query attention, `num_heads`
multi-head attention, any other divisor of `num_heads` grouped-query attention.
Query head `h` reads key/value head `h // (num_heads // num_kv_heads)`
(contiguous groups). For T5X compatibility the constructor (and so the gin
macros `NUM_KV_HEADS` / `ENCODER_NUM_KV_HEADS` and config.json files that
recorded `null`) also accepts `None`, which `__post_init__` replaces by
`num_heads`: `T5Config(num_heads=8, num_kv_heads=None)` and
`T5Config(num_heads=8, num_kv_heads=8)` are the same config (equal, same hash,
same JSON).

`check_kv_heads` is the one check of a key/value head count; `T5Config.validate`
calls it for both fields, and code holding a count that is not in a config yet
(a conversion target, a command-line flag) calls it directly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}

_ACTIVATIONS = ("gelu", "relu", "linear", "silu", "swish", "gelu_new", "tanh")


# The key/value head fields and the gin macros that set them in the model gins
# (gin/models/t5_1_1/common.gin).
KV_HEAD_FIELDS = ("num_kv_heads", "encoder_num_kv_heads")
KV_HEAD_MACROS = {"num_kv_heads": "NUM_KV_HEADS", "encoder_num_kv_heads": "ENCODER_NUM_KV_HEADS"}


def divisors(n: int) -> list[int]:
    """The divisors of n, ascending (the valid key/value head counts for n heads)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def check_kv_heads(num_heads: int, num_kv_heads: Any, *, name: str = "num_kv_heads", hint: str = "") -> int:
    """Checks a key/value head count against `num_heads`; returns it as an int.

    The one place that decides which counts are valid: a positive integer that
    divides `num_heads` (1 = multi-query, `num_heads` = multi-head).

    Args:
      num_heads: Query heads (a positive int).
      num_kv_heads: The count to check (an int or numpy integer; not None:
        only `T5Config` maps None to `num_heads`).
      name: What the count is called where the user sets it (a config field,
        a flag, an argument); named in the error.
      hint: Appended to the error before its final period, e.g.
        " (gin: --gin.NUM_KV_HEADS=...)".

    Returns:
      `num_kv_heads` as a Python int.

    Raises:
      ValueError: not a positive integer, or not a divisor of `num_heads`; the
        message names `name` and lists the divisors to choose from.
    """
    choices = f"choose a divisor of {num_heads}: {divisors(num_heads)}{hint}."
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, (int, np.integer)) or num_kv_heads <= 0:
        raise ValueError(
            f"{name}={num_kv_heads!r} must be a positive integer (1 = multi-query, "
            f"{num_heads} = multi-head); {choices}"
        )
    value = int(num_kv_heads)
    if value > num_heads:
        raise ValueError(f"{name}={value} exceeds num_heads={num_heads}; {choices}")
    if num_heads % value:
        raise ValueError(f"num_heads={num_heads} is not divisible by {name}={value}; {choices}")
    return value


def resolve_dtype(dtype: Any, field: str = "dtype") -> jnp.dtype:
    """Returns the jnp dtype named by `dtype` (a string or a dtype).

    Args:
      dtype: 'float32', 'bfloat16', 'float16' or a numpy/jax dtype.
      field: The config field it came from, named in the error.

    Returns:
      The corresponding `jnp.dtype`.
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(
                f"T5Config.{field}={dtype!r} is not supported; use one of "
                f"{sorted(_DTYPES)}."
            )
        return jnp.dtype(_DTYPES[dtype])
    return jnp.dtype(dtype)


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Global hyper-parameters of the T5.1.1 network (T5X field names).

    Attributes:
      vocab_size: Size of the (padded) vocabulary, 32128 for T5.1.1.
      dtype: Activation dtype ('float32' or 'bfloat16'); parameters stay float32.
      emb_dim: Model width (d_model).
      num_heads: Number of query heads.
      num_encoder_layers: Encoder depth.
      num_decoder_layers: Decoder depth.
      head_dim: Width of one attention head (d_kv).
      mlp_dim: Hidden width of the gated MLP (d_ff).
      mlp_activations: Activations of the MLP's input branches; T5.1.1 uses
        ('gelu', 'linear'): gelu(x W_0) * (x W_1).
      dropout_rate: Dropout rate after embeddings, attention and MLP blocks.
      logits_via_embedding: Tie the output projection to the embedding (T5.1.1:
        False).
      float32_attention_logits: Compute attention logits/softmax in float32.
      num_kv_heads: Key/value heads of decoder self-attention and
        encoder-decoder attention, a divisor of num_heads: num_heads = MHA,
        1 = MQA. Always an int once constructed; None is accepted as input
        and means num_heads.
      encoder_num_kv_heads: Key/value heads of encoder self-attention, as
        `num_kv_heads` (None = num_heads).
      relative_attention_num_buckets: Relative position buckets (T5: 32).
      relative_attention_max_distance: Maximum distance of the buckets (128).
      scan_layers: Run each stack's layers as one `flax.linen.scan` over
        stacked parameters (T5X/Flaxformer `scan_layers`): XLA compiles one
        layer per stack, so a 24+24-layer model compiles about as fast as a
        2+2-layer one. The network's parameter tree then holds
        `encoder/layers/...` with a leading 'layers' axis; checkpoints keep
        the unscanned names (`layer_stack.stack_layers` / `unstack_layers`
        convert). The numerics are those of the unscanned network.
      param_dtype: Dtype the parameters are kept in for inference and
        benchmarks ('float32' or 'bfloat16'; T5X restores inference
        parameters in bfloat16). Training keeps float32 master weights
        whatever this says; `layer_stack.model_params` casts restored
        parameters to it.
    """

    vocab_size: int = 32128
    dtype: Any = "float32"
    emb_dim: int = 512
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    head_dim: int = 64
    mlp_dim: int = 2048
    mlp_activations: Sequence[str] = ("gelu", "linear")
    dropout_rate: float = 0.1
    logits_via_embedding: bool = False
    float32_attention_logits: bool = True
    num_kv_heads: int | None = None
    encoder_num_kv_heads: int | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    scan_layers: bool = False
    param_dtype: Any = "float32"

    def __post_init__(self) -> None:
        # Normalise sequences coming from gin (lists) into tuples so the config
        # stays hashable (flax modules need hashable attributes).
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
        # None (T5X's "as many as num_heads") becomes num_heads, and numpy
        # integers Python ints, so every consumer, equality, hash and JSON
        # sees one int whichever way the config was written.
        for name in KV_HEAD_FIELDS:
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, self.num_heads)
            elif isinstance(value, np.integer):
                object.__setattr__(self, name, int(value))
        if isinstance(self.scan_layers, np.bool_):
            object.__setattr__(self, "scan_layers", bool(self.scan_layers))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raises ValueError naming the field to change for invalid settings."""
        positive = (
            "vocab_size",
            "emb_dim",
            "num_heads",
            "head_dim",
            "mlp_dim",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"T5Config.{name}={value!r} must be a positive integer."
                )
        for name in ("num_encoder_layers", "num_decoder_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(
                    f"T5Config.{name}={value!r} must be a non-negative integer."
                )
        if not 0.0 <= float(self.dropout_rate) < 1.0:
            raise ValueError(
                f"T5Config.dropout_rate={self.dropout_rate!r} must be in [0, 1)."
            )
        resolve_dtype(self.dtype)
        if not isinstance(self.scan_layers, (bool, np.bool_)):
            raise ValueError(
                f"T5Config.scan_layers={self.scan_layers!r} must be True or False "
                "(gin: --gin.SCAN_LAYERS=True)."
            )
        param_dtype = resolve_dtype(self.param_dtype, field="param_dtype")
        if param_dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(
                f"T5Config.param_dtype={self.param_dtype!r} is not supported; use "
                "'float32' or 'bfloat16' (gin: --gin.PARAM_DTYPE=\"'bfloat16'\")."
            )
        if not self.mlp_activations:
            raise ValueError("T5Config.mlp_activations must name at least one activation.")
        for act in self.mlp_activations:
            if act not in _ACTIVATIONS:
                raise ValueError(
                    f"T5Config.mlp_activations contains {act!r}; supported "
                    f"activations are {list(_ACTIVATIONS)}."
                )
        for name in KV_HEAD_FIELDS:
            check_kv_heads(
                self.num_heads, getattr(self, name), name=name,
                hint=f" (gin: --gin.{KV_HEAD_MACROS[name]}=...)",
            )

    # -------------------------------------------------------------- properties
    @property
    def activation_dtype(self) -> jnp.dtype:
        return resolve_dtype(self.dtype)

    @property
    def parameter_dtype(self) -> jnp.dtype:
        """`param_dtype` as a jnp dtype."""
        return resolve_dtype(self.param_dtype, field="param_dtype")

    def replace(self, **changes: Any) -> "T5Config":
        """Returns a copy with `changes` applied (and validated).

        The key/value head counts are kept as the ints they are: to change
        `num_heads` and stay multi-head, pass `num_kv_heads=None` (and
        `encoder_num_kv_heads=None`) with it.
        """
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the fields."""
        out = dataclasses.asdict(self)
        out["mlp_activations"] = list(self.mlp_activations)
        out["scan_layers"] = bool(self.scan_layers)
        for name in ("dtype", "param_dtype"):
            if not isinstance(getattr(self, name), str):
                out[name] = jnp.dtype(getattr(self, name)).name
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "T5Config":
        """Builds a config from `to_dict` output; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"Unknown T5Config field(s) {unknown}; known fields are "
                f"{sorted(names)}."
            )
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "T5Config":
        return cls.from_dict(json.loads(text))

    def to_gin(self) -> str:
        """Gin bindings that rebuild this config (`network.T5Config.*`).

        The text uses gin's dynamic registration, as the model gins under
        `gin/models/` do, so `gin.parse_config` of it binds this config.
        """
        lines = ["from __gin__ import dynamic_registration", "from gqa_t5x.model import network", ""]
        for key, value in self.to_dict().items():
            if isinstance(value, str):
                rendered = repr(value)
            elif isinstance(value, list):
                rendered = "(" + ", ".join(repr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
            else:
                rendered = repr(value)
            lines.append(f"network.T5Config.{key} = {rendered}")
        return "\n".join(lines) + "\n"
