"""T5.1.1 encoder-decoder with grouped-query attention.

A drop-in for T5X's `t5x/examples/t5/network.py`: same `T5Config` fields, the
same `Transformer.__call__/encode/decode` signatures and exactly the same
parameter tree (names and shapes), plus configurable key/value heads
(`T5Config.num_kv_heads`, `T5Config.encoder_num_kv_heads`, and per layer and
attention kind: each attention module gets `T5Config.kv_heads(kind, layer)`).

Decoding: `Transformer.init_decode_cache` builds the cache (decoder
self-attention zeros with each layer's self-attention kv heads; encoder-decoder keys/values
projected once from the encoder output and shared by an example's beams; the
layout is `decode_attention`'s), then `decode(..., decode=True)` is fed one
token per step with `mutable=['cache']`.

`Transformer.init` returns the T5X tree of plain float32 arrays under
`params` and, under `params_axes`, every parameter's logical axis names
(`layers.param_with_axes`); `model/param_tree.py` derives the tree's paths,
shapes and axes from it.

Scanned stacks (`T5Config.scan_layers`, as T5X/Flaxformer's `scan_layers`):
each stack's layers run as one `flax.linen.scan` over parameters stacked
along a leading axis named 'layers' (`encoder/layers/attention/query/kernel`
`[num_encoder_layers, emb, heads * head_dim]`), so XLA compiles one layer
body per stack whatever the depth. The decoding cache of a scanned decoder is
stacked the same way (`decoder/layers/self_attention/cached_key`
`[layers, batch, kv_heads, head_dim, length]`) and a decode step scans over
the layers too. `layer_stack.py` converts between this tree and the
unscanned one that checkpoints hold.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import partitioning as nn_partitioning

from gqa_t5x.model import attention
from gqa_t5x.model import layers
from gqa_t5x.model import position_bias
from gqa_t5x.model.config import T5Config, resolve_dtype

Array = jax.Array

__all__ = ["T5Config", "Transformer", "Encoder", "Decoder"]

# Logical axis name of the stacked layer axis of a scanned stack's parameters
# (partitioning maps it to no mesh axis), and the module name of a scanned
# stack: `encoder/layers/...` instead of `encoder/layers_0/...`.
LAYER_AXIS = "layers"
SCANNED_LAYERS = "layers"


def scanned(layer_cls: type[nn.Module], length: int, methods: list[str] | None = None) -> Any:
    """`layer_cls` scanned `length` times over stacked parameters (axis 0).

    Parameters, decoding caches and decode-layout kernels are stacked along
    axis 0; every argument after the carry is broadcast to all layers (Python
    values such as `deterministic` stay static); each layer draws its own
    initialisation and dropout randomness. The logical axes of the stacked
    parameters gain `LAYER_AXIS` in front.

    Args:
      layer_cls: A layer whose methods return `(carry, None)` when scanned.
      length: Number of layers (> 0).
      methods: Methods to scan (default: `__call__`); all take the carry first.

    Returns:
      The scanned module class (construct it with the layer's attributes).
    """
    return nn_partitioning.scan_with_axes(
        layer_cls,
        variable_axes={"params": 0, "cache": 0, layers.DECODE_KERNELS: 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=length,
        axis_name=LAYER_AXIS,
        axes_collections=("params",),
        methods=methods,
    )


class EncoderLayer(nn.Module):
    """Pre-norm encoder layer: self-attention then gated MLP, with residuals.

    Attributes:
      config: Model hyper-parameters.
      layer: Index in the stack; picks the layer's key/value heads (a scanned
        stack builds layer 0: its layers have equal counts, `T5Config.validate`).
    """

    config: T5Config
    layer: int = 0

    @nn.compact
    def __call__(
        self, inputs: Array, encoder_mask: Array | None, bias: Array, deterministic: bool
    ) -> Array:
        cfg = self.config
        dtype = resolve_dtype(cfg.dtype)
        x = layers.LayerNorm(dtype=dtype, name="pre_attention_layer_norm")(inputs)
        x = attention.MultiHeadDotProductAttention(
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.kv_heads("encoder", self.layer),
            head_dim=cfg.head_dim,
            out_features=cfg.emb_dim,
            dtype=dtype,
            dropout_rate=cfg.dropout_rate,
            float32_logits=cfg.float32_attention_logits,
            query_chunk=cfg.attention_query_chunk,
            name="attention",
        )(x, x, encoder_mask, bias, deterministic=deterministic)
        x = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(
            x, deterministic=deterministic
        )
        x = x + inputs
        y = layers.LayerNorm(dtype=dtype, name="pre_mlp_layer_norm")(x)
        y = layers.MlpBlock(
            intermediate_dim=cfg.mlp_dim,
            activations=cfg.mlp_activations,
            intermediate_dropout_rate=cfg.dropout_rate,
            dtype=dtype,
            name="mlp",
        )(y, deterministic=deterministic)
        y = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(
            y, deterministic=deterministic
        )
        y = y + x  # [batch, length, emb]
        return (y, None) if cfg.scan_layers else y


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: self-attention, encoder-decoder attention, MLP.

    Attributes:
      config: Model hyper-parameters.
      layer: Index in the stack; picks the key/value heads of both attentions
        (a scanned stack builds layer 0, as `EncoderLayer`).
    """

    config: T5Config
    layer: int = 0

    def setup(self) -> None:
        cfg = self.config
        dtype = resolve_dtype(cfg.dtype)
        common = dict(
            num_heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            out_features=cfg.emb_dim,
            dtype=dtype,
            dropout_rate=cfg.dropout_rate,
            float32_logits=cfg.float32_attention_logits,
            query_chunk=cfg.attention_query_chunk,
        )
        self.pre_self_attention_layer_norm = layers.LayerNorm(dtype=dtype)
        self.self_attention = attention.MultiHeadDotProductAttention(
            num_kv_heads=cfg.kv_heads("self", self.layer), **common
        )
        self.pre_cross_attention_layer_norm = layers.LayerNorm(dtype=dtype)
        self.encoder_decoder_attention = attention.MultiHeadDotProductAttention(
            num_kv_heads=cfg.kv_heads("cross", self.layer), is_cross_attention=True, **common
        )
        self.pre_mlp_layer_norm = layers.LayerNorm(dtype=dtype)
        self.mlp = layers.MlpBlock(
            intermediate_dim=cfg.mlp_dim,
            activations=cfg.mlp_activations,
            intermediate_dropout_rate=cfg.dropout_rate,
            dtype=dtype,
        )
        self.dropout = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))

    def init_cache(self, batch: int, max_length: int, encoded: Array) -> None:
        """Creates both attention caches of this layer."""
        self.self_attention.init_cache(batch, max_length)
        self.encoder_decoder_attention.init_cache(batch, max_length, encoded)

    def init_scanned_cache(self, carry: Array, encoded: Array, batch: int, max_length: int) -> tuple[Array, None]:
        """`init_cache` in the scanned calling convention (carry in, carry out)."""
        self.init_cache(batch, max_length, encoded)
        return carry, None

    def __call__(
        self,
        inputs: Array,
        encoded: Array | None,
        decoder_mask: Array | None,
        encoder_decoder_mask: Array | None,
        bias: Array,
        deterministic: bool,
        decode: bool,
    ) -> Array:
        x = self.pre_self_attention_layer_norm(inputs)
        x = self.self_attention(
            x, x, decoder_mask, bias, deterministic=deterministic, decode=decode
        )
        x = self.dropout(x, deterministic=deterministic)
        x = x + inputs
        y = self.pre_cross_attention_layer_norm(x)
        y = self.encoder_decoder_attention(
            y, encoded, encoder_decoder_mask, None, deterministic=deterministic, decode=decode
        )
        y = self.dropout(y, deterministic=deterministic)
        y = y + x
        z = self.pre_mlp_layer_norm(y)
        z = self.mlp(z, deterministic=deterministic)
        z = self.dropout(z, deterministic=deterministic)
        z = z + y  # [batch, length, emb]
        return (z, None) if self.config.scan_layers else z


class Encoder(nn.Module):
    """The T5 encoder stack (shares `token_embedder` with the decoder)."""

    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(
        self,
        encoder_input_tokens: Array,
        encoder_mask: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        cfg = self.config
        dtype = resolve_dtype(cfg.dtype)
        length = encoder_input_tokens.shape[-1]
        # Embedding first: parameters are created in T5X's order
        # (token_embedder, then the encoder), which `param_tree` reports.
        x = self.shared_embedding(encoder_input_tokens.astype(jnp.int32))
        rel_emb = position_bias.RelativePositionBiases(
            num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance,
            num_heads=cfg.num_heads,
            dtype=dtype,
            name="relpos_bias",
        )
        bias = rel_emb(length, length, bidirectional=True)  # [1, heads, len, len]
        x = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(
            x, deterministic=deterministic
        )
        x = x.astype(dtype)
        if cfg.scan_layers and cfg.num_encoder_layers:
            stack = scanned(EncoderLayer, cfg.num_encoder_layers)(config=cfg, name=SCANNED_LAYERS)
            x, _ = stack(x, encoder_mask, bias, deterministic)  # [batch, length, emb]
        else:
            for i in range(cfg.num_encoder_layers):
                x = EncoderLayer(config=cfg, layer=i, name=f"layers_{i}")(
                    x, encoder_mask, bias, deterministic
                )
        x = layers.LayerNorm(dtype=dtype, name="encoder_norm")(x)
        return nn.Dropout(rate=cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
    """The T5 decoder stack with incremental-decoding support."""

    config: T5Config
    shared_embedding: nn.Module

    def setup(self) -> None:
        cfg = self.config
        dtype = resolve_dtype(cfg.dtype)
        self.relpos_bias = position_bias.RelativePositionBiases(
            num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance,
            num_heads=cfg.num_heads,
            dtype=dtype,
        )
        if cfg.scan_layers and cfg.num_decoder_layers:
            # One module named 'layers' whose parameters and cache are stacked.
            methods = ["__call__", "init_scanned_cache"]
            self.layers = scanned(DecoderLayer, cfg.num_decoder_layers, methods)(config=cfg)
        else:
            self.layers = [DecoderLayer(config=cfg, layer=i) for i in range(cfg.num_decoder_layers)]
        self.decoder_norm = layers.LayerNorm(dtype=dtype)
        self.dropout = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))
        self.final_dropout = nn.Dropout(rate=cfg.dropout_rate)
        if not cfg.logits_via_embedding:
            self.logits_dense = layers.Dense(
                cfg.vocab_size,
                kernel_axes=("embed", "vocab"),
                dtype=jnp.float32,
                kernel_init=layers.mlp_kernel_init,
            )

    def init_cache(self, encoded: Array, max_length: int, beam_size: int = 1) -> None:
        """Creates the decoding cache of every layer and the step counter.

        Args:
          encoded: Encoder output `[examples, enc_len, emb]`, one row per
            example (the cross-attention keys/values are projected from it).
          max_length: Decoding steps.
          beam_size: Sequences decoded per example: self-attention caches get
            `examples * beam_size` rows, cross-attention caches stay shared.
        """
        if beam_size < 1:
            raise ValueError(f"beam_size={beam_size} must be >= 1.")
        rows = encoded.shape[0] * beam_size
        if isinstance(self.layers, nn.Module):  # scanned: caches stacked per layer
            self.layers.init_scanned_cache(jnp.zeros((), jnp.int32), encoded, rows, max_length)
        else:
            for layer in self.layers:
                layer.init_cache(rows, max_length, encoded)
        self.put_variable("cache", "position", jnp.array(0, dtype=jnp.int32))
        # Its static shape tells decoding steps the self-attention cache length
        # (the decoding loop resizes both per segment of steps).
        self.put_variable("cache", "key_positions", jnp.arange(max_length, dtype=jnp.int32))

    def __call__(
        self,
        encoded: Array | None,
        decoder_input_tokens: Array,
        decoder_mask: Array | None = None,
        encoder_decoder_mask: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        max_decode_length: int | None = None,
    ) -> Array:
        cfg = self.config
        dtype = resolve_dtype(cfg.dtype)
        length = decoder_input_tokens.shape[-1]
        if decode and not self.has_variable("cache", "position"):
            # T5X's convention: the first decode=True call (usually
            # `init(..., decode=True)` on full-length inputs) creates the cache
            # and runs a normal, non-incremental pass.
            if encoded is None:
                raise ValueError(
                    "decode=True without a cache needs `encoded` to project the "
                    "encoder-decoder keys/values; call Transformer.init_decode_cache."
                )
            self.init_cache(encoded, max_decode_length or length)
            decode = False
        if decode:
            # One step: the query sits at the cached position, keys span the cache.
            position = self.get_variable("cache", "position")
            key_len = self.get_variable("cache", "key_positions").shape[0]
            bias = self.relpos_bias(
                1, key_len, bidirectional=False, query_offset=position
            )  # [1, heads, 1, max_len]
            self.put_variable("cache", "position", position + 1)
        else:
            bias = self.relpos_bias(length, length, bidirectional=False)
        y = self.shared_embedding(decoder_input_tokens.astype(jnp.int32))
        y = self.dropout(y, deterministic=deterministic)
        y = y.astype(dtype)
        if isinstance(self.layers, nn.Module):  # scanned
            y, _ = self.layers(
                y, encoded, decoder_mask, encoder_decoder_mask, bias, deterministic, decode
            )  # [batch, length, emb]
        else:
            for layer in self.layers:
                y = layer(
                    y, encoded, decoder_mask, encoder_decoder_mask, bias, deterministic, decode
                )
        y = self.decoder_norm(y)
        y = self.final_dropout(y, deterministic=deterministic)
        if cfg.logits_via_embedding:
            logits = self.shared_embedding.attend(y)
            logits = logits / jnp.sqrt(y.shape[-1]).astype(logits.dtype)
        else:
            logits = self.logits_dense(y)
        return logits  # [batch, length, vocab]


class Transformer(nn.Module):
    """The T5.1.1 encoder-decoder (T5X `network.Transformer` interface).

    Attributes:
      config: Model hyper-parameters.
    """

    config: T5Config

    def setup(self) -> None:
        cfg = self.config
        self.token_embedder = layers.Embed(
            num_embeddings=cfg.vocab_size,
            features=cfg.emb_dim,
            dtype=resolve_dtype(cfg.dtype),
        )
        self.encoder = Encoder(config=cfg, shared_embedding=self.token_embedder)
        self.decoder = Decoder(config=cfg, shared_embedding=self.token_embedder)

    def encode(
        self,
        encoder_input_tokens: Array,
        encoder_segment_ids: Array | None = None,
        encoder_positions: Array | None = None,
        *,
        enable_dropout: bool = True,
    ) -> Array:
        """Encodes `[batch, enc_len]` tokens (0 = padding) to `[batch, enc_len, emb]`.

        `encoder_positions` is accepted for T5X compatibility; as in T5X the
        relative position bias is computed from array offsets, which equals the
        per-segment positions for packed examples because the segment mask
        keeps attention within a segment.
        """
        del encoder_positions
        if encoder_input_tokens.ndim != 2:
            raise ValueError(
                "encoder_input_tokens must be [batch, length]; got shape "
                f"{encoder_input_tokens.shape}."
            )
        encoder_mask = attention.make_attention_mask(
            encoder_input_tokens > 0, encoder_input_tokens > 0
        )
        if encoder_segment_ids is not None:
            encoder_mask = attention.combine_masks(
                encoder_mask,
                attention.make_attention_mask(
                    encoder_segment_ids, encoder_segment_ids, jnp.equal
                ),
            )
        return self.encoder(
            encoder_input_tokens, encoder_mask, deterministic=not enable_dropout
        )

    def decode(
        self,
        encoded: Array | None,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        decoder_positions: Array | None = None,
        *,
        enable_dropout: bool = True,
        decode: bool = False,
        max_decode_length: int | None = None,
    ) -> Array:
        """Decoder logits `[batch, dec_len, vocab]` (T5X signature).

        With `decode=True` and an existing cache, feed one token per step
        (`decoder_input_tokens` `[batch, 1]`); `encoded` may then be None because
        the encoder-decoder keys/values are read from the cache.

        `decoder_positions` is accepted for T5X compatibility and unused: as in
        T5X, the relative position bias comes from array offsets (the cache
        position when decoding), which equal the per-segment positions of
        packed examples because the segment mask keeps attention within a
        segment.
        """
        del decoder_positions
        if decode:
            decoder_mask = None
            encoder_decoder_mask = attention.make_attention_mask(
                jnp.ones_like(decoder_target_tokens), encoder_input_tokens > 0
            )
        else:
            decoder_mask = attention.combine_masks(
                attention.make_causal_mask(decoder_target_tokens),
                attention.make_attention_mask(
                    decoder_target_tokens > 0, decoder_target_tokens > 0
                ),
            )
            if decoder_segment_ids is not None:
                decoder_mask = attention.combine_masks(
                    decoder_mask,
                    attention.make_attention_mask(
                        decoder_segment_ids, decoder_segment_ids, jnp.equal
                    ),
                )
            encoder_decoder_mask = attention.make_attention_mask(
                decoder_target_tokens > 0, encoder_input_tokens > 0
            )
            if encoder_segment_ids is not None:
                if decoder_segment_ids is None:
                    raise ValueError(
                        "encoder_segment_ids were given without decoder_segment_ids; "
                        "packed examples need both."
                    )
                encoder_decoder_mask = attention.combine_masks(
                    encoder_decoder_mask,
                    attention.make_attention_mask(
                        decoder_segment_ids, encoder_segment_ids, jnp.equal
                    ),
                )
        return self.decoder(
            encoded,
            decoder_input_tokens,
            decoder_mask=decoder_mask,
            encoder_decoder_mask=encoder_decoder_mask,
            deterministic=not enable_dropout,
            decode=decode,
            max_decode_length=max_decode_length,
        )

    def init_decode_cache(self, encoded: Array, max_decode_length: int, beam_size: int = 1) -> None:
        """Creates the decoding cache (call with `mutable=['cache']`).

        Decoder self-attention caches (keys `[batch * beam_size, kv_heads,
        head_dim, max_decode_length]`, values `[batch * beam_size, kv_heads,
        max_decode_length, head_dim]`) start at zero; encoder-decoder keys/values (`[batch, kv_heads,
        head_dim, enc_len]` / `[batch, kv_heads, enc_len, head_dim]`) are
        projected here, once, from `encoded`, and shared by an example's beams.
        `kv_heads` is each layer's count of that attention kind
        (`T5Config.kv_heads`).

        Args:
          encoded: `[batch, enc_len, emb]`, one row per example.
          max_decode_length: Decoding steps.
          beam_size: Sequences decoded per example (steps then feed
            `batch * beam_size` rows, example-major).
        """
        self.decoder.init_cache(encoded, max_decode_length, beam_size)

    def __call__(
        self,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        encoder_positions: Array | None = None,
        decoder_positions: Array | None = None,
        *,
        enable_dropout: bool = True,
        decode: bool = False,
        max_decode_length: int | None = None,
    ) -> Array:
        """Teacher-forced logits `[batch, dec_len, vocab]` (T5X signature)."""
        encoded = self.encode(
            encoder_input_tokens,
            encoder_segment_ids=encoder_segment_ids,
            encoder_positions=encoder_positions,
            enable_dropout=enable_dropout,
        )
        return self.decode(
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            decoder_target_tokens,
            encoder_segment_ids=encoder_segment_ids,
            decoder_segment_ids=decoder_segment_ids,
            decoder_positions=decoder_positions,
            enable_dropout=enable_dropout,
            decode=decode,
            max_decode_length=max_decode_length,
        )
