"""Cached incremental decoding: greedy, temperature / top-k sampling, beam search.

Every method drives the decoder one token per step through the cache built by
`Transformer.init_decode_cache`: decoder self-attention keys/values with each
layer's kv heads (`T5Config.kv_heads`), and encoder-decoder keys/values projected ONCE from the
encoder output. The work is split into three jit-compiled functions, compiled
once per (config, decoding spec, shapes):

* `encode(params, encoder_input_tokens) -> encoded` `[batch, enc_len, emb]`;
* `init_cache(params, encoded) -> cache` (cross-attention K/V projected here,
  once per example: beam search's beams share them);
* `run(params, cache, encoder_input_tokens, rng) -> DecodeResult`, a
  `lax.while_loop` that stops as soon as every sequence has emitted EOS. It
  runs in segments of steps, each with a self-attention cache only as long as
  its last step needs (`decode_attention.self_attention_segments`), so a step
  reads about the positions written so far; on CPU its steps multiply by the
  decoder kernels transposed once per run (`decode_step.decode_kernels`).

T5 conventions: the decoder starts from id 0 (padding), EOS is id 1, tokens
after EOS are 0. Encoder inputs are padded with 0 (masked out). Rows whose
encoder input is all padding (filler rows that keep a batch at its compiled
size) count as finished from the start, so they never delay the early exit.

The split lets the benchmark time the encoder and the decoder separately
(`gqa_t5x/experiments/bench/benchmark.py`); `decode` runs all three. What to decode
(method, length, EOS, sampling and beam settings) is one `DecodingSpec`,
validated when it is built and passed whole:

    spec = DecodingSpec(method="beam", max_decode_length=64, beam_size=4)
    result = decode(config, params, encoder_input_tokens, spec)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x.model import decode_attention
from gqa_t5x.model import decode_step
from gqa_t5x.model import layer_stack
from gqa_t5x.model import network
from gqa_t5x.model.config import T5Config

Array = jax.Array

METHODS = ("greedy", "sample", "beam")
# Finite "minus infinity" (T5X uses the same) so sums never turn into NaN.
NEG_INF = -1.0e7
DECODER_START_ID = 0
PAD_ID = 0


class DecodeResult(NamedTuple):
    """Output of a decoding run.

    Greedy / sampling: `tokens` `[batch, length]`, the others `[batch]`.
    Beam search: `tokens` `[batch, beams, length]`, the others `[batch, beams]`,
    best beam first.

    Attributes:
      tokens: Decoded ids (no start token); 0 after EOS.
      log_probs: Sum of the model's log-probabilities of the tokens up to and
        including EOS (untempered; equals `models.score_batch` of `tokens`).
      scores: Ranking score: `log_probs` for greedy/sampling; for beam search
        `log_probs / ((5 + length) / 6) ** alpha` (T5X's brevity penalty).
      lengths: Number of tokens up to and including EOS.
      steps: Scalar, decoder steps actually run (< max length on early exit).
    """

    tokens: Array
    log_probs: Array
    scores: Array
    lengths: Array
    steps: Array


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class DecodingSpec:
    """What to decode; hashable, it keys the compile cache.

    Fields are checked when the spec is built; `validate` adds the checks
    that need the model's vocabulary size.

    Attributes:
      method: 'greedy' (the paper's), 'sample' or 'beam'.
      max_decode_length: Number of tokens to decode at most. None only where
        a batch supplies it (`models.predict_batch` takes the targets'
        length); `decode` needs a number.
      eos_id: End-of-sequence id; None decodes exactly `max_decode_length`
        tokens (benchmarks use this to time a fixed output length).
      temperature: Sampling temperature (> 0), 'sample' only.
      topk: Sample among the k most likely tokens; 0 = all. 'sample' only.
      beam_size: Beams per example, 'beam' only.
      alpha: Brevity-penalty exponent (T5X default 0.6), 'beam' only.
    """

    method: str = "greedy"
    max_decode_length: int | None = None
    eos_id: int | None = 1
    temperature: float = 1.0
    topk: int = 0
    beam_size: int = 4
    alpha: float = 0.6

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"DecodingSpec.method={self.method!r} is not one of {list(METHODS)}."
            )
        length = self.max_decode_length
        if length is not None and (not _is_int(length) or length <= 0):
            raise ValueError(
                f"DecodingSpec.max_decode_length={length!r} must be a positive integer "
                "(or None to take the targets' length)."
            )
        if self.eos_id is not None and (not _is_int(self.eos_id) or self.eos_id < 0):
            raise ValueError(
                f"DecodingSpec.eos_id={self.eos_id!r} must be a token id >= 0, or None "
                "to decode max_decode_length tokens."
            )
        if self.method == "sample":
            if not self.temperature > 0:
                raise ValueError(
                    f"DecodingSpec.temperature={self.temperature} must be > 0 for sampling."
                )
            if not _is_int(self.topk) or self.topk < 0:
                raise ValueError(
                    f"DecodingSpec.topk={self.topk!r} must be an integer >= 0 (0 = no cut-off)."
                )
        if self.method == "beam":
            if not _is_int(self.beam_size) or self.beam_size < 1:
                raise ValueError(f"DecodingSpec.beam_size={self.beam_size!r} must be an integer >= 1.")
            if not self.alpha >= 0:
                raise ValueError(f"DecodingSpec.alpha={self.alpha} (brevity penalty) must be >= 0.")

    def validate(self, vocab_size: int) -> None:
        """Raises ValueError naming the field that does not fit the model.

        Args:
          vocab_size: The model's vocabulary size.
        """
        if self.max_decode_length is None:
            raise ValueError(
                "DecodingSpec.max_decode_length is None; set the number of tokens to decode."
            )
        if self.eos_id is not None and self.eos_id >= vocab_size:
            raise ValueError(
                f"DecodingSpec.eos_id={self.eos_id} is outside the vocabulary [0, {vocab_size})."
            )
        if self.method == "sample" and self.topk > vocab_size:
            raise ValueError(
                f"DecodingSpec.topk={self.topk} must be in [0, vocab_size={vocab_size}]."
            )
        if self.method == "beam" and 2 * self.beam_size > vocab_size:
            raise ValueError(
                f"DecodingSpec.beam_size={self.beam_size} must be >= 1 and at most half "
                f"the vocabulary ({vocab_size // 2})."
            )

    def normalized(self) -> "DecodingSpec":
        """The spec with the fields its method ignores reset (fewer recompiles)."""
        default = DecodingSpec()
        changes: dict[str, Any] = {}
        if self.method != "sample":
            changes.update(temperature=default.temperature, topk=default.topk)
        if self.method != "beam":
            changes.update(beam_size=default.beam_size, alpha=default.alpha)
        return dataclasses.replace(self, **changes)


class CompiledDecoding(NamedTuple):
    """The jit-compiled pieces of one (config, spec); see `compile_decoding`."""

    encode: Any
    init_cache: Any
    run: Any


@jax.jit
def _transposed_kernels(params: Any) -> Any:
    return decode_step.decode_kernels(params)


def step_kernels(params: Any, config: T5Config | None = None) -> Any:
    """The decoder kernels a decode step multiplies by, made once for many batches.

    On CPU, `decode_step.decode_kernels(params)` (the kernels transposed to
    `[out, in]`, one extra copy of the decoder's weights); elsewhere None.
    `decode` and `CompiledDecoding.run` make them per call when not given
    them, so callers that decode many batches with the same `params` (the
    `infer` loop, timing) make them once and pass them in.

    Args:
      params: The model's `params` (either tree, `layer_stack.model_params`).
      config: The model config; when given, the kernels are made from
        `model_params(params, config)` (stacked for a scanned decoder, in
        its parameter dtype). Without it they follow `params`' own tree,
        and `run` stacks or unstacks them to its config's.

    Returns:
      The `decode_kernels` tree, or None where steps read `params` directly.
    """
    if not decode_step.use_decode_kernels():
        return None
    if config is not None:
        params = prepare_params(params, config)
    return _transposed_kernels(params)


def prepare_params(params: Any, config: T5Config) -> Any:
    """`layer_stack.model_params` once, outside the compiled functions.

    `decode` and the compiled functions accept either tree (stacking or
    casting inside them copies the weights per call); callers that decode
    many batches convert once with this and pass the result.

    Args:
      params: The unstacked (checkpoint) or stacked tree.
      config: The model config (`scan_layers`, `param_dtype`).

    Returns:
      The tree and dtype the network of `config` reads.
    """
    if layer_stack.is_stacked(params) == config.scan_layers and all(
        x.dtype == config.parameter_dtype for x in jax.tree_util.tree_leaves(params)
    ):
        return params
    return _prepared(params, config)


@functools.partial(jax.jit, static_argnums=1)
def _prepared(params: Any, config: T5Config) -> Any:
    return layer_stack.model_params(params, config)


# ----------------------------------------------------------------- helpers
def greedy_token(logits: Array) -> Array:
    """`argmax(logits, -1)` (first maximum) as int32, in two plain reductions.

    A max, then the smallest index holding it: XLA:CPU runs `jnp.argmax`'s
    (value, index) reduction over a `[batch, vocab]` row 2x slower than
    these two (0.78 vs 0.41 ms at 16 x 32128), once per decoding step.
    """
    vocab = logits.shape[-1]
    best = jnp.max(logits, axis=-1, keepdims=True)  # [batch, 1]
    index = jnp.arange(vocab, dtype=jnp.int32)
    first = jnp.min(jnp.where(logits == best, index, vocab), axis=-1)  # [batch]
    return jnp.minimum(first, vocab - 1)  # a row with NaN has no maximum: the last id (argmax: the NaN's)


def brevity_penalty(alpha: float, length: Array | int) -> Array:
    """T5X / GNMT length penalty `((5 + length) / 6) ** alpha`."""
    return jnp.power((5.0 + jnp.asarray(length, jnp.float32)) / 6.0, alpha)


def _lengths(tokens: Array, eos_id: int | None, padding_row: Array) -> Array:
    """Tokens up to and including the first EOS (all of them without one).

    Args:
      tokens: `[batch, ..., length]` decoded ids.
      eos_id: End-of-sequence id or None.
      padding_row: `[batch]`, True for filler rows (length 0).

    Returns:
      Int32 lengths `[batch, ...]`.
    """
    length = tokens.shape[-1]
    if eos_id is None:
        out = jnp.full(tokens.shape[:-1], length, jnp.int32)
    else:
        is_eos = tokens == eos_id
        first = jnp.argmax(is_eos, axis=-1)
        out = jnp.where(jnp.any(is_eos, axis=-1), first + 1, length).astype(jnp.int32)
    padding_row = padding_row.reshape(padding_row.shape + (1,) * (out.ndim - 1))
    return jnp.where(padding_row, 0, out)


def _is_padding_row(encoder_input_tokens: Array) -> Array:
    return jnp.logical_not(jnp.any(encoder_input_tokens > 0, axis=-1))  # [batch]


# ------------------------------------------------------- greedy / sampling
def _sample_loop(
    step: Any,
    cache: Any,
    encoder_input_tokens: Array,
    rng: Array,
    spec: DecodingSpec,
) -> DecodeResult:
    """Greedy (argmax) or temperature / top-k sampling with early exit."""
    batch = encoder_input_tokens.shape[0]
    length = spec.max_decode_length
    greedy = spec.method == "greedy"

    def choose(logits: Array, key: Array) -> Array:
        if greedy:
            return greedy_token(logits)
        scaled = logits / spec.temperature
        if spec.topk:
            kth = jax.lax.top_k(scaled, spec.topk)[0][:, -1:]  # [batch, 1]
            scaled = jnp.where(scaled < kth, NEG_INF, scaled)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

    def cond(state):
        i, _, _, _, done, _, _ = state
        return jnp.logical_and(i < length, jnp.logical_not(jnp.all(done)))

    def body(state):
        i, cache, token, seqs, done, log_prob, key = state
        key, sub = jax.random.split(key)
        logits, cache = step(cache, token)  # [batch, vocab]
        next_token = choose(logits, sub)
        next_token = jnp.where(done, PAD_ID, next_token)  # [batch]
        token_log_prob = (jnp.take_along_axis(logits, next_token[:, None], axis=-1)[:, 0]
                          - jax.nn.logsumexp(logits, axis=-1))  # log_softmax at the token
        log_prob = log_prob + jnp.where(done, 0.0, token_log_prob)
        seqs = jax.lax.dynamic_update_slice(seqs, next_token[:, None], (0, i))
        if spec.eos_id is not None:
            done = jnp.logical_or(done, next_token == spec.eos_id)
        return i + 1, cache, next_token, seqs, done, log_prob, key

    padding_row = _is_padding_row(encoder_input_tokens)
    state = (
        jnp.array(0, jnp.int32),
        cache,
        jnp.full((batch,), DECODER_START_ID, jnp.int32),
        jnp.zeros((batch, length), jnp.int32),  # [batch, length]
        padding_row,
        jnp.zeros((batch,), jnp.float32),
        rng,
    )
    segments = decode_attention.self_attention_segments(length)
    steps, _, _, seqs, _, log_prob, _ = decode_step.segmented_while_loop(cond, body, state, segments)
    return DecodeResult(
        seqs, log_prob, log_prob, _lengths(seqs, spec.eos_id, padding_row), steps
    )


# -------------------------------------------------------------- beam search
def _beam_loop(
    step: Any,
    cache: Any,
    encoder_input_tokens: Array,
    spec: DecodingSpec,
) -> DecodeResult:
    """Beam search (T5X style, length-penalised scores, early exit).

    Each step expands every alive beam over the vocabulary and keeps the 2K
    best candidates. A candidate ending in EOS becomes a finished hypothesis
    only if it ranks among the K best (HuggingFace's rule; with K = 1 this
    makes beam search exactly greedy); the K best non-EOS candidates stay
    alive. The search stops when no alive beam can beat the worst finished one
    of its example, even at the most favourable length penalty.

    Args:
      step: The cached decoding step over `batch * beams` rows.
      cache: Cache whose self-attention leaves have `batch * beams` rows and
        whose encoder-decoder keys/values have `batch` rows (shared by beams).
      encoder_input_tokens: `[batch * beams, enc_len]`.
      spec: The decoding spec.

    Returns:
      A `DecodeResult` with `[batch, beams, ...]` arrays, best beam first.
    """
    k = spec.beam_size
    length = spec.max_decode_length
    batch = encoder_input_tokens.shape[0] // k
    eos_id = spec.eos_id
    rank = jnp.arange(2 * k)
    padding_row = _is_padding_row(encoder_input_tokens.reshape(batch, k, -1)[:, 0])
    max_penalty = brevity_penalty(spec.alpha, length)

    def cond(state):
        i, _, _, alive_lp, _, fin_scores, fin_flags = state[:7]
        best_alive = alive_lp[:, 0] / max_penalty  # [batch]
        worst_fin = jnp.min(jnp.where(fin_flags, fin_scores, NEG_INF), axis=1)
        done = jnp.logical_or(padding_row, worst_fin > best_alive)
        return jnp.logical_and(i < length, jnp.logical_not(jnp.all(done)))

    def body(state):
        i, cache, alive_seqs, alive_lp, fin_seqs, fin_scores, fin_flags, fin_lp = state
        token = jax.lax.dynamic_slice_in_dim(alive_seqs, jnp.maximum(i - 1, 0), 1, axis=2)
        token = jnp.where(i == 0, DECODER_START_ID, token[..., 0])  # [batch, k]
        logits, cache = step(cache, token.reshape(batch * k))
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(batch, k, vocab)
        candidates = (alive_lp[..., None] + log_probs).reshape(batch, k * vocab)
        top_lp, top_index = jax.lax.top_k(candidates, 2 * k)  # [batch, 2k]
        origin = top_index // vocab  # beam each candidate extends
        new_token = (top_index % vocab).astype(jnp.int32)
        top_seqs = jnp.take_along_axis(alive_seqs, origin[..., None], axis=1)
        top_seqs = jax.lax.dynamic_update_slice(
            top_seqs, new_token[..., None], (0, 0, i)
        )  # [batch, 2k, length]
        if eos_id is None:
            is_eos = jnp.zeros_like(new_token, dtype=jnp.bool_)
        else:
            is_eos = new_token == eos_id
        # Finished: EOS candidates within the best k, merged with earlier ones.
        new_fin = jnp.logical_and(is_eos, rank[None] < k)
        new_scores = jnp.where(new_fin, top_lp / brevity_penalty(spec.alpha, i + 1), NEG_INF)
        merged_scores = jnp.concatenate([fin_scores, new_scores], axis=1)  # [batch, 3k]
        _, keep = jax.lax.top_k(merged_scores, k)
        fin_seqs = jnp.take_along_axis(
            jnp.concatenate([fin_seqs, top_seqs], axis=1), keep[..., None], axis=1
        )
        fin_scores = jnp.take_along_axis(merged_scores, keep, axis=1)
        fin_flags = jnp.take_along_axis(jnp.concatenate([fin_flags, new_fin], axis=1), keep, axis=1)
        fin_lp = jnp.take_along_axis(jnp.concatenate([fin_lp, top_lp], axis=1), keep, axis=1)
        # Alive: the best k candidates that did not end.
        alive_candidates = jnp.where(is_eos, NEG_INF, top_lp)
        alive_lp, keep = jax.lax.top_k(alive_candidates, k)  # [batch, k]
        alive_seqs = jnp.take_along_axis(top_seqs, keep[..., None], axis=1)
        source = jnp.take_along_axis(origin, keep, axis=1)  # [batch, k]
        flat = (jnp.arange(batch)[:, None] * k + source).reshape(batch * k)
        cache = decode_step.gather_beams(cache, flat)
        return i + 1, cache, alive_seqs, alive_lp, fin_seqs, fin_scores, fin_flags, fin_lp

    alive_lp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))
    state = (
        jnp.array(0, jnp.int32),
        cache,
        jnp.zeros((batch, k, length), jnp.int32),  # alive sequences
        alive_lp,  # [batch, k]
        jnp.zeros((batch, k, length), jnp.int32),  # finished sequences
        jnp.full((batch, k), NEG_INF, jnp.float32),  # finished scores
        jnp.zeros((batch, k), jnp.bool_),  # finished flags
        jnp.full((batch, k), NEG_INF, jnp.float32),  # finished log-probs
    )
    state = decode_step.segmented_while_loop(cond, body, state, decode_attention.self_attention_segments(length))
    steps, _, alive_seqs, alive_lp, fin_seqs, fin_scores, fin_flags, fin_lp = state
    # Alive beams that reached the length limit compete with finished ones.
    alive_scores = jnp.where(steps >= length, alive_lp / max_penalty, NEG_INF)
    scores = jnp.concatenate([jnp.where(fin_flags, fin_scores, NEG_INF), alive_scores], axis=1)
    scores, keep = jax.lax.top_k(scores, k)
    seqs = jnp.take_along_axis(jnp.concatenate([fin_seqs, alive_seqs], axis=1), keep[..., None], axis=1)
    log_probs = jnp.take_along_axis(jnp.concatenate([fin_lp, alive_lp], axis=1), keep, axis=1)
    # Filler rows (all-padding inputs) decode to padding, as with greedy.
    seqs = jnp.where(padding_row[:, None, None], PAD_ID, seqs)
    log_probs = jnp.where(padding_row[:, None], 0.0, log_probs)
    scores = jnp.where(padding_row[:, None], 0.0, scores)
    return DecodeResult(seqs, log_probs, scores, _lengths(seqs, eos_id, padding_row), steps)


# ------------------------------------------------------------ compilation
@functools.lru_cache(maxsize=32)
def compile_decoding(config: T5Config, spec: DecodingSpec) -> CompiledDecoding:
    """Jit-compiled encode / init_cache / run for a config and spec.

    Compiled functions are cached here (and by shape inside `jax.jit`), so a
    config, spec and batch shape compile once per process.

    Args:
      config: Model config (hashable).
      spec: Decoding spec; validated against the config's vocabulary.

    Returns:
      `CompiledDecoding(encode, init_cache, run)`:
      `encode(params, enc_tokens [batch, enc_len]) -> [batch, enc_len, emb]`;
      `init_cache(params, encoded, enc_tokens) -> (cache, enc_tokens')`, where
      beam search repeats every example's tokens `beam_size` times (its
      self-attention cache has `batch * beam_size` rows; the encoder-decoder
      keys/values stay `batch` rows, shared by the beams);
      `run(params, cache, enc_tokens', rng, kernels=None) -> DecodeResult`,
      where `kernels` is `step_kernels(params)` (made inside `run` when None).
      Each takes either parameter tree (`layer_stack.model_params` stacks
      or casts it inside; `prepare_params` does it once, outside).
    """
    spec = spec.normalized()
    spec.validate(config.vocab_size)
    model = network.Transformer(config)
    beams = spec.beam_size if spec.method == "beam" else 1

    @jax.jit
    def encode(params, encoder_input_tokens):
        return model.apply(
            {"params": layer_stack.model_params(params, config)},
            encoder_input_tokens,
            enable_dropout=False,
            method=network.Transformer.encode,
        )

    @jax.jit
    def init_cache(params, encoded, encoder_input_tokens):
        # Cross-attention keys/values are projected from `encoded` once per
        # example; the beams of an example read them in place.
        _, variables = model.apply(
            {"params": layer_stack.model_params(params, config)},
            encoded,
            spec.max_decode_length,
            beams,
            method=network.Transformer.init_decode_cache,
            mutable=["cache"],
        )
        if beams > 1:
            encoder_input_tokens = jnp.repeat(encoder_input_tokens, beams, axis=0)  # [batch * beams, enc_len]
        return variables["cache"], encoder_input_tokens

    transposed = decode_step.use_decode_kernels()

    @jax.jit
    def run(params, cache, encoder_input_tokens, rng, kernels=None):
        # Stacked (scanned) or cast here, once per run, outside the step loop.
        params = layer_stack.model_params(params, config)
        if not transposed:
            kernels = None
        elif kernels is None:
            kernels = decode_step.decode_kernels(params)
        else:
            kernels = layer_stack.model_params(kernels, config)
        step = decode_step.step_fn(model, params, encoder_input_tokens, kernels)
        if spec.method == "beam":
            return _beam_loop(step, cache, encoder_input_tokens, spec)
        return _sample_loop(step, cache, encoder_input_tokens, rng, spec)

    return CompiledDecoding(encode, init_cache, run)


def _as_key(rng: Any) -> Array:
    if rng is None:
        return jax.random.PRNGKey(0)
    if isinstance(rng, (int, np.integer)):
        return jax.random.PRNGKey(int(rng))
    return rng


def decode(
    config: T5Config,
    params: Any,
    encoder_input_tokens: Any,
    spec: DecodingSpec,
    *,
    rng: Any = None,
    kernels: Any = None,
) -> DecodeResult:
    """Decodes `encoder_input_tokens` with the cached incremental decoder.

    Args:
      config: Model config.
      params: The model's `params` collection.
      encoder_input_tokens: `[batch, enc_len]` int ids, 0 = padding.
      spec: What to decode; its `max_decode_length` must be set.
      rng: PRNG key or int seed ('sample' only; default seed 0).
      kernels: `step_kernels(params)`, when decoding many batches with the
        same params (default: made for this call).

    Returns:
      A `DecodeResult` (see its docstring for shapes).
    """
    if not isinstance(spec, DecodingSpec):
        raise TypeError(
            f"spec must be a decoding.DecodingSpec, got {type(spec).__name__}; e.g. "
            "DecodingSpec(method='greedy', max_decode_length=64)."
        )
    tokens = jnp.asarray(encoder_input_tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            "encoder_input_tokens must be an integer array [batch, length]; got "
            f"shape {tokens.shape}, dtype {tokens.dtype}."
        )
    fns = compile_decoding(config, spec)
    tokens = tokens.astype(jnp.int32)
    encoded = fns.encode(params, tokens)
    cache, run_tokens = fns.init_cache(params, encoded, tokens)
    return fns.run(params, cache, run_tokens, _as_key(rng), kernels)
