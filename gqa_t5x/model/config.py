"""Model hyper-parameters of a T5.1.1 encoder-decoder with grouped key/value heads.

`T5Config` carries T5X's fields (`t5x/examples/t5/network.py`) plus the two
numbers that make grouped-query attention configurable:

* `num_kv_heads`: key/value heads of decoder self-attention AND of
  encoder-decoder attention (the layers the paper converts).
* `encoder_num_kv_heads`: key/value heads of encoder self-attention (the paper
  leaves it multi-head).

`None` means "as many as `num_heads`" (multi-head attention). `1` is
multi-query attention. Query head `h` reads key/value head
`h // (num_heads // num_kv_heads)` (contiguous groups).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}

_ACTIVATIONS = ("gelu", "relu", "linear", "silu", "swish", "gelu_new", "tanh")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """Returns the jnp dtype named by `dtype` (a string or a dtype).

    Args:
      dtype: 'float32', 'bfloat16', 'float16' or a numpy/jax dtype.

    Returns:
      The corresponding `jnp.dtype`.
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(
                f"T5Config.dtype={dtype!r} is not supported; use one of "
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
        encoder-decoder attention. None = num_heads (MHA); 1 = MQA.
      encoder_num_kv_heads: Key/value heads of encoder self-attention.
        None = num_heads.
      relative_attention_num_buckets: Relative position buckets (T5: 32).
      relative_attention_max_distance: Maximum distance of the buckets (128).
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

    def __post_init__(self) -> None:
        # Normalise sequences coming from gin (lists) into tuples so the config
        # stays hashable (flax modules need hashable attributes).
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
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
        if not self.mlp_activations:
            raise ValueError("T5Config.mlp_activations must name at least one activation.")
        for act in self.mlp_activations:
            if act not in _ACTIVATIONS:
                raise ValueError(
                    f"T5Config.mlp_activations contains {act!r}; supported "
                    f"activations are {list(_ACTIVATIONS)}."
                )
        macros = {"num_kv_heads": "NUM_KV_HEADS", "encoder_num_kv_heads": "ENCODER_NUM_KV_HEADS"}
        for name in ("num_kv_heads", "encoder_num_kv_heads"):
            hint = f" (gin: --gin.{macros[name]}=...)"
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"T5Config.{name}={value!r} must be a positive integer "
                    f"(1 = multi-query, {self.num_heads} = multi-head) or None{hint}."
                )
            if value > self.num_heads:
                raise ValueError(
                    f"T5Config.{name}={value} exceeds num_heads={self.num_heads}; "
                    f"choose a divisor of {self.num_heads}: "
                    f"{_divisors(self.num_heads)}{hint}."
                )
            if self.num_heads % value:
                raise ValueError(
                    f"num_heads={self.num_heads} is not divisible by "
                    f"{name}={value}; choose a divisor of {self.num_heads}: "
                    f"{_divisors(self.num_heads)}{hint}."
                )

    # -------------------------------------------------------------- properties
    @property
    def decoder_kv_heads(self) -> int:
        """Key/value heads of decoder self- and encoder-decoder attention."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def encoder_kv_heads(self) -> int:
        """Key/value heads of encoder self-attention."""
        return (
            self.num_heads
            if self.encoder_num_kv_heads is None
            else self.encoder_num_kv_heads
        )

    @property
    def activation_dtype(self) -> jnp.dtype:
        return resolve_dtype(self.dtype)

    def replace(self, **changes: Any) -> "T5Config":
        """Returns a copy with `changes` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the fields."""
        out = dataclasses.asdict(self)
        out["mlp_activations"] = list(self.mlp_activations)
        if not isinstance(self.dtype, str):
            out["dtype"] = jnp.dtype(self.dtype).name
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
