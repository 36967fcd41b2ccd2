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

Counts may also differ per layer and per attention kind (issue #24):
`encoder_layer_kv_heads` (encoder self-attention), `decoder_self_kv_heads` and
`decoder_cross_kv_heads` hold one count per layer of their stack (a single
int = that count in every layer; None = the uniform field). Every consumer
reads a layer's count through `T5Config.kv_heads(kind, layer)`. The config is
kept in one canonical form (`canonical_kv_fields`), so configs describing the
same per-layer counts are equal, hash equal and serialise the same: a per-layer
tuple is only kept where counts differ from what the uniform field says.

`check_kv_heads` is the one check of a key/value head count; `T5Config.validate`
calls it for every field and entry, and code holding a count that is not in a
config yet (a conversion target, a command-line flag) calls it directly.
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


# The uniform key/value head fields (ints; None in means num_heads), the
# per-layer ones (tuples or None), and the gin macros that set them in the
# model gins (gin/models/t5_1_1/common.gin).
KV_HEAD_FIELDS = ("num_kv_heads", "encoder_num_kv_heads")
LAYER_KV_HEAD_FIELDS = ("encoder_layer_kv_heads", "decoder_self_kv_heads", "decoder_cross_kv_heads")
KV_HEAD_MACROS = {
    "num_kv_heads": "NUM_KV_HEADS",
    "encoder_num_kv_heads": "ENCODER_NUM_KV_HEADS",
    "encoder_layer_kv_heads": "ENCODER_LAYER_KV_HEADS",
    "decoder_self_kv_heads": "DECODER_SELF_KV_HEADS",
    "decoder_cross_kv_heads": "DECODER_CROSS_KV_HEADS",
}
# Attention kinds of `T5Config.kv_heads`: kind -> (per-layer field, uniform
# field it defaults to, field holding the stack's layer count).
KV_HEAD_KINDS = {
    "encoder": ("encoder_layer_kv_heads", "encoder_num_kv_heads", "num_encoder_layers"),
    "self": ("decoder_self_kv_heads", "num_kv_heads", "num_decoder_layers"),
    "cross": ("decoder_cross_kv_heads", "num_kv_heads", "num_decoder_layers"),
}


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


def _one_value(counts: Sequence[int]) -> bool:
    return len(set(counts)) == 1


def canonical_kv_fields(
    num_heads: int,
    *,
    encoder: Sequence[int],
    decoder_self: Sequence[int],
    decoder_cross: Sequence[int],
    num_kv_heads: int | None = None,
    encoder_num_kv_heads: int | None = None,
) -> dict[str, Any]:
    """The canonical key/value head fields of the given per-layer counts.

    One representation per set of counts, so equal models compare and hash
    equal:

    * decoder: every self and cross count equal to v -> `num_kv_heads=v`,
      no tuples; else the self counts equal to v -> `num_kv_heads=v` and the
      cross tuple; else the cross counts equal to v -> `num_kv_heads=v` and
      the self tuple; else both tuples and `num_kv_heads=num_heads` (unused).
    * encoder: every count equal to v -> `encoder_num_kv_heads=v`, no tuple;
      else the tuple and `encoder_num_kv_heads=num_heads` (unused).

    A stack without layers keeps the given uniform count (num_heads if None).

    Args:
      num_heads: Query heads.
      encoder: Encoder self-attention count of every encoder layer.
      decoder_self: Decoder self-attention count of every decoder layer.
      decoder_cross: Encoder-decoder attention count of every decoder layer.
      num_kv_heads: Uniform decoder count kept when the decoder has no layers.
      encoder_num_kv_heads: Uniform encoder count kept when it has no layers.

    Returns:
      The five fields (`num_kv_heads`, `encoder_num_kv_heads`,
      `encoder_layer_kv_heads`, `decoder_self_kv_heads`,
      `decoder_cross_kv_heads`).
    """
    self_counts, cross_counts, enc_counts = tuple(decoder_self), tuple(decoder_cross), tuple(encoder)
    out: dict[str, Any] = {"decoder_self_kv_heads": None, "decoder_cross_kv_heads": None,
                           "encoder_layer_kv_heads": None}
    if not self_counts and not cross_counts:
        out["num_kv_heads"] = num_heads if num_kv_heads is None else num_kv_heads
    elif _one_value(self_counts + cross_counts):
        out["num_kv_heads"] = self_counts[0]
    elif _one_value(self_counts):
        out.update(num_kv_heads=self_counts[0], decoder_cross_kv_heads=cross_counts)
    elif _one_value(cross_counts):
        out.update(num_kv_heads=cross_counts[0], decoder_self_kv_heads=self_counts)
    else:
        out.update(num_kv_heads=num_heads, decoder_self_kv_heads=self_counts, decoder_cross_kv_heads=cross_counts)
    if not enc_counts:
        out["encoder_num_kv_heads"] = num_heads if encoder_num_kv_heads is None else encoder_num_kv_heads
    elif _one_value(enc_counts):
        out["encoder_num_kv_heads"] = enc_counts[0]
    else:
        out.update(encoder_num_kv_heads=num_heads, encoder_layer_kv_heads=enc_counts)
    return out


def _layer_counts(value: Any, layers: Any) -> Any:
    """A per-layer field as given (None, one int, a list/tuple) -> None or a tuple.

    Anything else is returned unchanged for `validate` to reject by name.
    """
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if isinstance(layers, int) and not isinstance(layers, bool) and layers >= 0:
            return (int(value),) * layers
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(int(v) if isinstance(v, np.integer) else v for v in value)
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
      encoder_layer_kv_heads: Key/value heads of each encoder layer's
        self-attention (one per encoder layer; an int = every layer; None =
        `encoder_num_kv_heads`).
      decoder_self_kv_heads: Key/value heads of each decoder layer's
        self-attention (one per decoder layer; an int = every layer; None =
        `num_kv_heads`).
      decoder_cross_kv_heads: Key/value heads of each decoder layer's
        encoder-decoder attention, as `decoder_self_kv_heads`.
        The three are stored canonically (`canonical_kv_fields`): a tuple
        only where the counts are not all `num_kv_heads` /
        `encoder_num_kv_heads`. Read counts with `kv_heads(kind, layer)`.
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
      attention_query_chunk: Queries per block of full-sequence attention
        (encoder, teacher-forced decoder; not the one-token decode step):
        the attention runs block after block, so one layer holds logits of
        `[batch, heads, chunk, kv_len]` instead of `[batch, heads, q_len,
        kv_len]` (34 GB in float32 for T5.1.1-XXL at batch 32, input 2048),
        and a training step recomputes each block's logits in the backward
        pass instead of keeping them. The numerics are those of unchunked
        attention. None = one block (T5X's behaviour).
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
    encoder_layer_kv_heads: tuple[int, ...] | None = None
    decoder_self_kv_heads: tuple[int, ...] | None = None
    decoder_cross_kv_heads: tuple[int, ...] | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    scan_layers: bool = False
    param_dtype: Any = "float32"
    attention_query_chunk: int | None = None

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
        # Per-layer counts: lists (JSON, gin) and single ints become tuples.
        for field, _, layers in KV_HEAD_KINDS.values():
            object.__setattr__(self, field, _layer_counts(getattr(self, field), getattr(self, layers)))
        if isinstance(self.scan_layers, np.bool_):
            object.__setattr__(self, "scan_layers", bool(self.scan_layers))
        if isinstance(self.attention_query_chunk, np.integer):
            object.__setattr__(self, "attention_query_chunk", int(self.attention_query_chunk))
        self.validate()
        # One representation per model (equality, hashes, JSON); the counts
        # are valid here, so the canonical fields are too.
        canonical = canonical_kv_fields(
            self.num_heads,
            encoder=self.layer_kv_heads("encoder"),
            decoder_self=self.layer_kv_heads("self"),
            decoder_cross=self.layer_kv_heads("cross"),
            num_kv_heads=self.num_kv_heads,
            encoder_num_kv_heads=self.encoder_num_kv_heads,
        )
        for name, value in canonical.items():
            object.__setattr__(self, name, value)

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
        chunk = self.attention_query_chunk
        if chunk is not None and (not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool)
                                  or chunk <= 0):
            raise ValueError(
                f"T5Config.attention_query_chunk={chunk!r} must be None (one block) or a positive "
                "number of queries per block (gin: --gin.ATTENTION_QUERY_CHUNK=512)."
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
        self._validate_layer_kv_heads()

    def _validate_layer_kv_heads(self) -> None:
        """The per-layer counts: one valid count per layer; equal counts under scan."""
        for field, _, layers_field in KV_HEAD_KINDS.values():
            counts, layers = getattr(self, field), getattr(self, layers_field)
            hint = f" (gin: --gin.{KV_HEAD_MACROS[field]}=...)"
            if counts is None:
                continue
            if not isinstance(counts, tuple):
                raise ValueError(
                    f"T5Config.{field}={counts!r} must be None, one key/value head count for "
                    f"every layer, or a sequence of {layers} counts, one per layer ({layers_field}={layers})"
                    f"{hint}."
                )
            if len(counts) != layers:
                raise ValueError(
                    f"T5Config.{field}={counts!r} has {len(counts)} counts but {layers_field}={layers}: "
                    f"give one count per layer{hint}."
                )
            for i, value in enumerate(counts):
                check_kv_heads(self.num_heads, value, name=f"{field}[{i}]", hint=hint)
            if self.scan_layers and not _one_value(counts) and counts:
                raise ValueError(
                    "scan_layers stacks every layer's parameters, so every layer of a stack needs the "
                    f"same kv heads; {field}={counts} differ: set SCAN_LAYERS=False or equal counts."
                )

    # -------------------------------------------------------------- properties
    @property
    def activation_dtype(self) -> jnp.dtype:
        return resolve_dtype(self.dtype)

    @property
    def parameter_dtype(self) -> jnp.dtype:
        """`param_dtype` as a jnp dtype."""
        return resolve_dtype(self.param_dtype, field="param_dtype")

    # ------------------------------------------------------- key/value heads
    def kv_heads(self, kind: str, layer: int) -> int:
        """Key/value heads of one attention layer.

        Args:
          kind: 'encoder' (encoder self-attention), 'self' (decoder
            self-attention) or 'cross' (encoder-decoder attention).
          layer: The layer's index in its stack.

        Returns:
          The count (an int dividing num_heads).
        """
        field, uniform, layers_field = _kind_fields(kind)
        layers = getattr(self, layers_field)
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < layers:
            raise IndexError(f"layer={layer!r} is not a layer of the {kind} attention ({layers_field}={layers}).")
        counts = getattr(self, field)
        return int(counts[layer]) if counts is not None else getattr(self, uniform)

    def layer_kv_heads(self, kind: str) -> tuple[int, ...]:
        """`kv_heads(kind, layer)` of every layer of the kind's stack, in order."""
        field, uniform, layers_field = _kind_fields(kind)
        counts = getattr(self, field)
        return tuple(counts) if counts is not None else (getattr(self, uniform),) * getattr(self, layers_field)

    @property
    def uniform_kv_heads(self) -> bool:
        """Whether each stack uses one count: `num_kv_heads` in every decoder
        self- and cross-attention layer, `encoder_num_kv_heads` in every
        encoder layer (no per-layer field is set)."""
        return all(getattr(self, field) is None for field in LAYER_KV_HEAD_FIELDS)

    def describe_kv_heads(self) -> str:
        """The key/value head settings as field=value text, for messages.

        E.g. 'num_kv_heads=2, encoder_num_kv_heads=8' or, per layer,
        'decoder_self_kv_heads=(1, 2), decoder_cross_kv_heads=(4, 4),
        encoder_num_kv_heads=8'.
        """
        if self.decoder_self_kv_heads is None and self.decoder_cross_kv_heads is None:
            parts = [f"num_kv_heads={self.num_kv_heads}"]
        else:
            parts = [f"decoder_self_kv_heads={self.layer_kv_heads('self')}",
                     f"decoder_cross_kv_heads={self.layer_kv_heads('cross')}"]
        if self.encoder_layer_kv_heads is None:
            parts.append(f"encoder_num_kv_heads={self.encoder_num_kv_heads}")
        else:
            parts.append(f"encoder_layer_kv_heads={self.encoder_layer_kv_heads}")
        return ", ".join(parts)

    def replace(self, **changes: Any) -> "T5Config":
        """Returns a copy with `changes` applied (and validated).

        The key/value head counts are kept as the ints they are: to change
        `num_heads` and stay multi-head, pass `num_kv_heads=None` (and
        `encoder_num_kv_heads=None`) with it. The per-layer fields override
        the uniform ones: to make a per-layer config uniform again, pass
        them as None too.
        """
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the fields."""
        out = dataclasses.asdict(self)
        out["mlp_activations"] = list(self.mlp_activations)
        for name in LAYER_KV_HEAD_FIELDS:
            value = getattr(self, name)
            out[name] = None if value is None else list(value)
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


def _kind_fields(kind: str) -> tuple[str, str, str]:
    if kind not in KV_HEAD_KINDS:
        raise ValueError(f"kind={kind!r} is not an attention kind; choose one of {list(KV_HEAD_KINDS)}.")
    return KV_HEAD_KINDS[kind]
