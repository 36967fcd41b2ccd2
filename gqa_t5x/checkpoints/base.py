"""Errors, config inference and the reader base class shared by every format.

Every reader exposes a checkpoint as canonical T5X parameter paths (see
`param_tree.py`) with float32 arrays in T5X layout. Readers index the checkpoint
when opened (names, shapes, dtypes) and load a tensor only in `read`, so a
conversion never holds more than the parameters it is working on.

The config is inferred from tensor shapes (`infer_config`) unless given. What
shapes cannot tell is taken from explicit arguments; nothing is guessed
silently:

* `vocab_size`, `emb_dim`       <- `token_embedder/embedding` [vocab, emb]
* `num_heads`, buckets          <- `encoder/relpos_bias/rel_embedding` [heads, buckets]
* `head_dim`                    <- query kernel width / num_heads
* key/value heads               <- every attention layer's key width / head_dim:
  `num_kv_heads` / `encoder_num_kv_heads` when a stack's counts agree, else
  the per-layer fields (`decoder_self_kv_heads`, ...; `canonical_kv_fields`)
* layers                        <- counting `layers_{i}`
* `mlp_dim`                     <- `mlp/wi_0/kernel` [emb, mlp] (or `mlp/wi`)
* `logits_via_embedding`        <- absence of `decoder/logits_dense/kernel`
* `mlp_activations`             <- T5 convention: `wi_0`+`wi_1` is T5.1.1
  ('gelu', 'linear'), a single `wi` is T5.0 ('relu',); formats that record
  the activation (HuggingFace `config.json`) override it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gqa_t5x.checkpoints import value_limits
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import KV_HEAD_FIELDS, T5Config, canonical_kv_fields

# Sub-layers of a T5 block in the order Mesh TensorFlow (`layer_000`, ...) and
# HuggingFace (`layer.0`, ...) number them: (T5X module, its pre-norm). Both
# formats' name maps are built on it.
SUBLAYERS: dict[str, tuple[tuple[str, str], ...]] = {
    "encoder": (
        (param_tree.ENCODER_ATTENTION, "pre_attention_layer_norm"),
        ("mlp", "pre_mlp_layer_norm"),
    ),
    "decoder": (
        (param_tree.DECODER_SELF_ATTENTION, "pre_self_attention_layer_norm"),
        (param_tree.DECODER_CROSS_ATTENTION, "pre_cross_attention_layer_norm"),
        ("mlp", "pre_mlp_layer_norm"),
    ),
}


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written as requested."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint of a known format at a path."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated, corrupted or inconsistent."""


class IncompleteCheckpointError(CorruptCheckpointError):
    """A checkpoint directory whose write never finished (or a partial copy)."""


def _first(shapes: Mapping[str, tuple[int, ...]], *candidates: str) -> tuple[str, tuple[int, ...]] | None:
    for key in candidates:
        if key in shapes:
            return key, shapes[key]
    return None


def _count_layers(shapes: Mapping[str, Any], side: str) -> int:
    found = set()
    for key in shapes:
        m = re.match(rf"{side}/layers_(\d+)/", key)
        if m:
            found.add(int(m.group(1)))
    # Layers are numbered 0..n-1; a gap surfaces later as missing parameters.
    return max(found) + 1 if found else 0


def _heads_from_width(width: int, head_dim: int, key: str, source: str) -> int:
    if width % head_dim:
        raise CheckpointError(
            f"{source}: {key} has width {width}, which is not a multiple of "
            f"head_dim={head_dim}; pass the right head_dim= or config=."
        )
    return width // head_dim


def infer_config(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    source: str,
    num_heads: int | None = None,
    head_dim: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T5Config:
    """Infers a `T5Config` from canonical parameter shapes.

    Args:
      shapes: canonical T5X path -> shape (in T5X layout).
      source: the checkpoint's path, named in errors.
      num_heads: query heads, required only when the checkpoint has no
        relative position bias to read them from.
      head_dim: width of one head; an alternative to `num_heads`.
      overrides: config fields known from the checkpoint's own metadata (e.g.
        a HuggingFace config.json); shape-derived fields must agree with them.

    Returns:
      The inferred config (validated).

    Raises:
      CheckpointError: a needed tensor is absent, shapes are inconsistent, or
        an ambiguity needs an explicit argument (the message names it).
    """
    overrides = dict(overrides or {})
    if num_heads is None:
        num_heads = overrides.get("num_heads")
    if head_dim is None:
        head_dim = overrides.get("head_dim")
    emb_entry = _first(shapes, "token_embedder/embedding")
    if emb_entry is None:
        raise CheckpointError(
            f"{source}: missing parameter 'token_embedder/embedding' [vocab, emb]; "
            f"cannot infer the model config (is this a T5 checkpoint?)."
        )
    vocab, emb = emb_entry[1]
    rel = _first(shapes, "encoder/relpos_bias/rel_embedding", "decoder/relpos_bias/rel_embedding")
    query = _first(
        shapes,
        "encoder/layers_0/attention/query/kernel",
        "decoder/layers_0/self_attention/query/kernel",
    )
    if query is None:
        raise CheckpointError(
            f"{source}: no attention query kernel "
            f"('encoder/layers_0/attention/query/kernel'); cannot infer the config."
        )
    q_key, (q_in, q_width) = query
    if q_in != emb:
        raise CheckpointError(
            f"{source}: {q_key} has shape {(q_in, q_width)} but the embedding "
            f"width is {emb}."
        )
    buckets = overrides.pop("relative_attention_num_buckets", None)
    if rel is not None:
        rel_heads, rel_buckets = rel[1]
        if num_heads is not None and num_heads != rel_heads:
            raise CheckpointError(
                f"{source}: num_heads={num_heads} was passed but {rel[0]} has "
                f"shape {rel[1]} ({rel_heads} heads)."
            )
        num_heads = rel_heads
        buckets = rel_buckets if buckets is None else buckets
    elif num_heads is None:
        if head_dim is None:
            raise CheckpointError(
                f"{source}: cannot tell the number of attention heads (no "
                f"relpos_bias/rel_embedding; query width {q_width} = heads * "
                f"head_dim is ambiguous). Pass num_heads= or head_dim= (or config=)."
            )
        num_heads = _heads_from_width(q_width, head_dim, q_key, source)
    if q_width % num_heads:
        raise CheckpointError(
            f"{source}: {q_key} width {q_width} is not divisible by "
            f"num_heads={num_heads}."
        )
    inferred_head_dim = q_width // num_heads
    if head_dim is not None and head_dim != inferred_head_dim:
        raise CheckpointError(
            f"{source}: head_dim={head_dim} was passed but {q_key} has width "
            f"{q_width} for {num_heads} heads (head_dim {inferred_head_dim})."
        )
    head_dim = inferred_head_dim

    n_enc = _count_layers(shapes, "encoder")
    n_dec = _count_layers(shapes, "decoder")

    def kv_heads(side: str, module: str, layers: int) -> tuple[int, ...]:
        # Each layer's key kernel width / head_dim; a missing kernel (named
        # later by `check_shapes`) counts as num_heads.
        keys = [f"{side}/layers_{i}/{module}/key/kernel" for i in range(layers)]
        return tuple(_heads_from_width(shapes[k][-1], head_dim, k, source) if k in shapes else num_heads
                     for k in keys)

    # Canonical: per-layer tuples only where counts differ.
    kv = canonical_kv_fields(
        num_heads,
        encoder=kv_heads("encoder", param_tree.ENCODER_ATTENTION, n_enc),
        decoder_self=kv_heads("decoder", param_tree.DECODER_SELF_ATTENTION, n_dec),
        decoder_cross=kv_heads("decoder", param_tree.DECODER_CROSS_ATTENTION, n_dec),
    )
    mlp_side = "encoder" if n_enc else "decoder"
    wi = sorted(
        k for k in shapes if re.fullmatch(rf"{mlp_side}/layers_0/mlp/wi(_\d+)?/kernel", k)
    )
    if not wi:
        raise CheckpointError(
            f"{source}: no MLP input kernel ('{mlp_side}/layers_0/mlp/wi_0/kernel' "
            f"or '.../mlp/wi/kernel'); cannot infer mlp_dim."
        )
    mlp_dim = shapes[wi[0]][-1]
    if wi == [f"{mlp_side}/layers_0/mlp/wi/kernel"]:
        activations: tuple[str, ...] = ("relu",)
    elif len(wi) == 2:
        activations = ("gelu", "linear")
    else:
        activations = ()
    activations = tuple(overrides.pop("mlp_activations", activations))
    if len(activations) != len(wi):
        raise CheckpointError(
            f"{source}: the MLP has {len(wi)} input kernel(s) {wi} but the "
            f"activations are {activations or 'unknown'}; pass config= with "
            f"the right mlp_activations."
        )

    fields: dict[str, Any] = dict(
        vocab_size=vocab,
        emb_dim=emb,
        num_heads=num_heads,
        head_dim=head_dim,
        num_encoder_layers=n_enc,
        num_decoder_layers=n_dec,
        mlp_dim=mlp_dim,
        mlp_activations=activations,
        logits_via_embedding="decoder/logits_dense/kernel" not in shapes,
        **kv,
    )
    if buckets is not None:
        fields["relative_attention_num_buckets"] = buckets
    for name, value in overrides.items():
        if name in KV_HEAD_FIELDS and value is None:  # T5X's None: as many as num_heads
            value = num_heads
        if name in fields and fields[name] != value:
            raise CheckpointError(
                f"{source}: the checkpoint's metadata says {name}={value!r} but its "
                f"tensors imply {name}={fields[name]!r}."
            )
        fields[name] = value
    try:
        return T5Config(**fields)
    except ValueError as e:
        raise CheckpointError(f"{source}: inferred an invalid config: {e}") from e


def _first_few(keys: list[str], count: int = 5) -> str:
    """The first `count` keys, and '...' when there are more."""
    return f"{keys[:count]}{' ...' if len(keys) > count else ''}"


def check_shapes(
    shapes: Mapping[str, tuple[int, ...]], config: T5Config, *, source: str
) -> None:
    """Checks that a checkpoint holds exactly `param_shapes(config)`.

    Args:
      shapes: canonical path -> shape found in the checkpoint.
      config: the config the checkpoint must match.
      source: the checkpoint's path, named in errors.

    Raises:
      CheckpointError: a parameter is missing, unexpected or has another shape.
    """
    expected = param_tree.param_shapes(config)
    for key, shape in expected.items():
        if key in shapes and tuple(shapes[key]) != tuple(shape):
            raise CheckpointError(
                f"{source}: parameter {key!r} has shape {tuple(shapes[key])} in the "
                f"checkpoint but the config needs {tuple(shape)}."
            )
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise CheckpointError(
            f"{source}: missing parameter(s) {_first_few(missing)} ({len(missing)} in all) "
            f"needed by the config (e.g. {missing[0]!r} with shape {expected[missing[0]]})."
        )
    unexpected = [k for k in shapes if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected parameter(s) {_first_few(unexpected)} not in the "
            f"config's parameters; the checkpoint does not match a T5.1.1 network "
            f"of this config."
        )


def to_float32(array: Any, *, key: str, source: str) -> np.ndarray:
    """Casts a floating array (float16/bfloat16/float32/float64) to float32."""
    array = np.asarray(array)
    kind = array.dtype.kind
    if kind != "f" and array.dtype.name != "bfloat16":
        raise CorruptCheckpointError(
            f"{source}: parameter {key!r} has dtype {array.dtype}, not a floating "
            f"point type."
        )
    return np.asarray(array, dtype=np.float32, order="C")


class CheckpointReader:
    """Lazy, per-parameter view of a checkpoint in canonical T5X param_tree.

    Subclasses index their files in `__init__`, then call `_setup` with the
    canonical shapes they found; `_load(key)` reads one tensor in T5X layout.

    Attributes:
      format: the registered format name (see `registry.format_names()`).
      path: the checkpoint's path (local or gs:// URL) as resolved by
        `open_checkpoint`.
      config: the model config (inferred or given).
      step: training step recorded in the checkpoint, if any.
      check_values: `read` refuses non-finite or implausibly large values
        (`value_limits`).
      metadata: the JSON our writers store beside the parameters (our
        format's manifest, a training checkpoint's `metadata` item); {} for
        other formats.
    """

    format: str = ""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.check_values = True  # `open_checkpoint(allow_unusual_values=True)` turns it off.
        self.metadata: dict[str, Any] = {}  # What our writers record (e.g. the vocabulary).
        self.config: T5Config | None = None
        self.step: int | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._closed = False

    # ------------------------------------------------------------ subclasses
    def _setup(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        config: T5Config | None,
        num_heads: int | None,
        head_dim: int | None,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        """Infers or checks the config against `shapes` and fixes `keys()`."""
        if config is None:
            config = infer_config(
                shapes,
                source=self.path,
                num_heads=num_heads,
                head_dim=head_dim,
                overrides=overrides,
            )
        else:
            if num_heads is not None and num_heads != config.num_heads:
                raise CheckpointError(
                    f"{self.path}: num_heads={num_heads} disagrees with "
                    f"config.num_heads={config.num_heads}."
                )
            if head_dim is not None and head_dim != config.head_dim:
                raise CheckpointError(
                    f"{self.path}: head_dim={head_dim} disagrees with "
                    f"config.head_dim={config.head_dim}."
                )
        check_shapes(shapes, config, source=self.path)
        self.config = config
        self._shapes = dict(param_tree.param_shapes(config))

    def _load(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def _close(self) -> None:
        pass

    # ---------------------------------------------------------------- public
    def keys(self) -> list[str]:
        """Canonical T5X paths of the model parameters, in `param_shapes` order."""
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of parameter `key` in T5X layout (no data is read)."""
        if key not in self._shapes:
            raise KeyError(f"{self.path}: no parameter {key!r} in this checkpoint.")
        return self._shapes[key]

    def read(self, key: str) -> np.ndarray:
        """Reads one parameter.

        Args:
          key: a canonical T5X path from `keys()`.

        Returns:
          A float32 numpy array in T5X layout with shape `shape(key)`.

        Raises:
          UnusualValuesError: with `check_values`, a non-finite value or
            one with |x| > 1e4 (`value_limits`), naming the parameter.
        """
        if self._closed:
            raise CheckpointError(f"{self.path}: reader is closed.")
        return self._checked(key, self._load(key))

    def read_many(self, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Reads several parameters at once, each exactly as `read` would.

        A format whose storage serves many arrays in one request (Orbax:
        one partial restore instead of one per parameter) overrides
        `_load_many`; the others read one key after another.

        Args:
          keys: Canonical T5X paths from `keys()` (default: all of them).

        Returns:
          `{key: array}` in the order of `keys`.
        """
        if self._closed:
            raise CheckpointError(f"{self.path}: reader is closed.")
        keys = self.keys() if keys is None else list(keys)
        for key in keys:
            self.shape(key)  # names an unknown key before anything is read
        raw = self._load_many(keys)
        return {key: self._checked(key, raw[key]) for key in keys}

    def _load_many(self, keys: list[str]) -> dict[str, np.ndarray]:
        """Raw arrays of `keys` (as `_load`); formats override to batch requests."""
        return {key: self._load(key) for key in keys}

    def _checked(self, key: str, raw: Any) -> np.ndarray:
        """A raw array of `key` as float32 in T5X layout, shape- and value-checked."""
        expected = self.shape(key)
        array = to_float32(raw, key=key, source=self.path)
        if not array.flags.writeable:  # e.g. a view of a memory-mapped file
            array = array.copy()
        if tuple(array.shape) != tuple(expected):
            raise CorruptCheckpointError(
                f"{self.path}: parameter {key!r} read with shape {tuple(array.shape)} "
                f"but its index says {tuple(expected)}."
            )
        if self.check_values:
            value_limits.check_values(array, key=key, source=self.path)
        return array

    def close(self) -> None:
        """Releases open files; further reads fail."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(format={self.format!r}, path={self.path!r}, "
            f"step={self.step}, params={len(self._shapes)})"
        )
