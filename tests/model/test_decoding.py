"""Cached decoding: greedy vs teacher forcing and HuggingFace, beam search, sampling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x.checkpoints import huggingface
from gqa_t5x.model import decoding
from gqa_t5x.model import models
from gqa_t5x.model import initialization
from gqa_t5x.model import network
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config

torch = pytest.importorskip("torch")
hf_reference = pytest.importorskip("hf_reference")

VOCAB = 48
MAX_LEN = 14
GREEDY = decoding.DecodingSpec(max_decode_length=MAX_LEN)


def _config(num_kv_heads: int | None) -> T5Config:
    return T5Config(
        vocab_size=VOCAB, dtype="float32", emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
        num_encoder_layers=1, num_decoder_layers=2, dropout_rate=0.0, num_kv_heads=num_kv_heads,
    )


def _encoder_tokens() -> np.ndarray:
    rng = np.random.default_rng(0)
    enc = rng.integers(2, VOCAB, size=(6, 10)).astype(np.int32)
    enc[1, 6:] = 0  # padded inputs
    enc[4, 3:] = 0
    return enc


def _eos_like(params, token: int, factor: float = 1.05):
    """Params whose EOS logit is `factor` x the logit of `token`.

    Random models repeat a few tokens forever; this makes EOS win wherever
    `token` would have been chosen with a positive logit, so sequences end at
    different steps.
    """
    flat = param_tree.flatten(jax.tree_util.tree_map(np.array, params))
    kernel = flat["decoder/logits_dense/kernel"]  # [emb, vocab]
    kernel[:, 1] = factor * kernel[:, token]
    return param_tree.unflatten(flat)


def _eos_candidate(config: T5Config, params, enc: np.ndarray) -> int:
    """The token whose first greedy occurrence varies most across rows."""
    plain = np.asarray(decoding.decode(config, params, enc, GREEDY).tokens)
    best, best_spread = None, -1
    for token in np.unique(plain):
        if token < 2:
            continue
        firsts = {int(np.argmax(row == token)) if (row == token).any() else -1 for row in plain}
        if len(firsts) > best_spread:
            best, best_spread = int(token), len(firsts)
    return best


def _params_with_varied_endings(config: T5Config, seed: int, enc: np.ndarray):
    """Random params plus an EOS bias chosen so that rows end at several lengths."""
    params = initialization.init_params(config, seed=seed)
    return _eos_like(params, _eos_candidate(config, params, enc))


def _model(num_kv_heads: int):
    config = _config(num_kv_heads)
    enc = _encoder_tokens()
    return config, _params_with_varied_endings(config, seed=num_kv_heads, enc=enc), enc


@pytest.fixture(scope="module")
def model():
    """GQA-2 (4 query heads, 2 kv heads), EOS-biased: the model most tests decode."""
    return _model(2)


@pytest.mark.parametrize("num_kv_heads", [pytest.param(1, marks=pytest.mark.slow), 2])  # MQA and GQA; MHA vs HuggingFace below
def test_greedy_is_the_argmax_of_teacher_forced_scoring_of_its_own_output(num_kv_heads, model):
    config, params, enc = model if num_kv_heads == 2 else _model(num_kv_heads)
    result = decoding.decode(config, params, enc, GREEDY)
    tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
    assert len(set(lengths.tolist())) >= 2, lengths  # some rows end early, not all alike
    weights = models.loss_weights_from_lengths(tokens, lengths)
    scores, log_probs = models.score_batch(
        config, params,
        {"encoder_input_tokens": enc, "decoder_target_tokens": tokens, "decoder_loss_weights": weights},
        return_token_log_probs=True,
    )
    valid = weights > 0
    np.testing.assert_array_equal(log_probs.argmax(-1)[valid], tokens[valid])
    assert (tokens[~valid] == 0).all()  # padding after EOS
    np.testing.assert_allclose(np.asarray(result.log_probs), scores, rtol=1e-5, atol=1e-4)


def _hf_generate(hf_model, enc: np.ndarray, max_new_tokens: int) -> np.ndarray:
    import transformers

    # transformers 5 sizes T5's default cache by the ENCODER depth
    # (`DynamicCache(config=...)` reads num_layers), which breaks decoders with
    # more layers; a cache without a config grows per layer.
    cache = transformers.EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())
    with torch.no_grad():
        out = hf_model.generate(
            past_key_values=cache,
            input_ids=torch.from_numpy(enc.astype(np.int64)),
            attention_mask=torch.from_numpy((enc > 0).astype(np.int64)),
            do_sample=False, num_beams=1, decoder_start_token_id=0, eos_token_id=1,
            pad_token_id=0, max_new_tokens=max_new_tokens, min_length=0,
        ).numpy()[:, 1:]  # drop the start token
    padded = np.zeros((enc.shape[0], max_new_tokens), np.int64)
    padded[:, : out.shape[1]] = out
    return padded


def test_greedy_matches_huggingface_generate_for_a_model_born_in_huggingface():
    hf_model = hf_reference.make_hf_t5(
        vocab_size=VOCAB, d_model=32, num_heads=4, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=2, seed=3,
    )
    config = hf_reference.our_config_for(hf_model)
    enc = _encoder_tokens()
    token = _eos_candidate(config, hf_reference.our_params_for(hf_model, config), enc)
    with torch.no_grad():
        hf_model.lm_head.weight[1] = 1.05 * hf_model.lm_head.weight[token]
    params = hf_reference.our_params_for(hf_model, config)
    ours = decoding.decode(config, params, enc, GREEDY)
    assert len(set(np.asarray(ours.lengths).tolist())) >= 2
    np.testing.assert_array_equal(np.asarray(ours.tokens), _hf_generate(hf_model, enc, MAX_LEN))


def test_gqa_greedy_matches_huggingface_generate_with_kv_heads_repeated(model):
    config, params, enc = model
    hf_model = hf_reference.make_hf_t5(
        vocab_size=VOCAB, d_model=32, num_heads=4, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=2,
    )
    state = hf_model.state_dict()
    for path, value in param_tree.flatten(params).items():
        name, transpose = huggingface.hf_name(path)
        value = np.asarray(value)
        if value.shape != param_tree.param_shapes(config.replace(num_kv_heads=None))[path]:
            value = huggingface.repeat_kv_heads(value, config.num_heads, config.head_dim)
        state[name] = torch.from_numpy(np.ascontiguousarray(value.T if transpose else value))
    hf_model.load_state_dict(state)
    ours = decoding.decode(config, params, enc, GREEDY)
    assert len(set(np.asarray(ours.lengths).tolist())) >= 2
    np.testing.assert_array_equal(np.asarray(ours.tokens), _hf_generate(hf_model, enc, MAX_LEN))


def test_early_exit_when_every_sequence_has_ended_and_filler_rows_do_not_block_it(model):
    config, params, enc = model
    result = decoding.decode(config, params, enc, GREEDY)
    ended = np.asarray(result.lengths) < MAX_LEN
    finished = enc[ended]
    filler = np.zeros((3, enc.shape[1]), np.int32)
    batch = np.concatenate([finished, filler])
    short = decoding.decode(config, params, batch, GREEDY)
    longest = int(np.asarray(result.lengths)[ended].max())
    assert int(short.steps) == longest < MAX_LEN
    np.testing.assert_array_equal(np.asarray(short.tokens)[: len(finished)], np.asarray(result.tokens)[ended])
    assert (np.asarray(short.tokens)[len(finished):] == 0).all()
    assert (np.asarray(short.lengths)[len(finished):] == 0).all()


def test_eos_none_decodes_exactly_max_decode_length_tokens(model):
    config, params, enc = model
    result = decoding.decode(config, params, enc[:2], decoding.DecodingSpec(max_decode_length=MAX_LEN, eos_id=None))
    assert int(result.steps) == MAX_LEN
    assert (np.asarray(result.lengths) == MAX_LEN).all()


def test_beam_size_one_equals_greedy(model):
    config, params, enc = model
    greedy = decoding.decode(config, params, enc, GREEDY)
    beam = decoding.decode(
        config, params, enc, decoding.DecodingSpec("beam", MAX_LEN, beam_size=1, alpha=0.0)
    )
    np.testing.assert_array_equal(np.asarray(beam.tokens)[:, 0], np.asarray(greedy.tokens))
    np.testing.assert_allclose(np.asarray(beam.log_probs)[:, 0], np.asarray(greedy.log_probs), atol=1e-4)


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced_log_probs(model, params, enc, dec_in):
    logits = model.apply({"params": params}, enc, dec_in, jnp.ones_like(dec_in), enable_dropout=False)
    return jax.nn.log_softmax(logits, -1)


def _reference_beam_search(config, params, enc_row, k, alpha, max_len):
    """Plain-Python beam search that re-runs the whole decoder for every prefix."""
    model = network.Transformer(config)
    next_log_probs = lambda dec_in: _teacher_forced_log_probs(  # noqa: E731
        model, params, np.repeat(enc_row[None], k, 0), dec_in
    )  # [k, max_len] -> [k, max_len, vocab]

    penalty = lambda n: ((5.0 + n) / 6.0) ** alpha  # noqa: E731
    alive, finished = [((), 0.0)], []
    for t in range(max_len):
        dec_in = np.zeros((k, max_len), np.int32)
        for i, (seq, _) in enumerate(alive):
            dec_in[i, 1 : t + 1] = seq
        log_probs = np.asarray(next_log_probs(dec_in))[:, t]
        candidates = [(seq + (v,), lp + float(log_probs[i, v])) for i, (seq, lp) in enumerate(alive) for v in range(VOCAB)]
        top = sorted(candidates, key=lambda c: -c[1])[: 2 * k]
        finished += [(seq, lp / penalty(t + 1), lp) for rank, (seq, lp) in enumerate(top) if seq[-1] == 1 and rank < k]
        finished = sorted(finished, key=lambda f: -f[1])[:k]
        alive = [c for c in top if c[0][-1] != 1][:k]
        if len(finished) == k and finished[-1][1] > alive[0][1] / penalty(max_len):
            break
    else:
        finished += [(seq, lp / penalty(max_len), lp) for seq, lp in alive]
    return sorted(finished, key=lambda f: -f[1])[:k]


@pytest.mark.slow  # compile-heavy: full suite only (fast tier under 5 minutes)
def test_beam_search_equals_plain_python_beam_search_and_log_probs_equal_score_batch(model):
    config, params, enc = model
    k, alpha = 3, 0.6
    result = decoding.decode(
        config, params, enc, decoding.DecodingSpec("beam", MAX_LEN, beam_size=k, alpha=alpha)
    )
    tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)  # [batch, beams, ...]
    flat = tokens.reshape(-1, MAX_LEN)
    scored = models.score_batch(config, params, {
        "encoder_input_tokens": np.repeat(enc, k, axis=0),
        "decoder_target_tokens": flat,
        "decoder_loss_weights": models.loss_weights_from_lengths(flat, lengths.reshape(-1)),
    }).reshape(enc.shape[0], k)
    np.testing.assert_allclose(np.asarray(result.log_probs), scored, rtol=1e-5, atol=1e-4)
    penalty = ((5.0 + lengths) / 6.0) ** alpha
    np.testing.assert_allclose(np.asarray(result.scores), scored / penalty, rtol=1e-5, atol=1e-4)
    assert len(set(lengths.reshape(-1).tolist())) >= 3  # finished and length-limited beams
    for row in range(enc.shape[0]):
        if not enc[row].any():
            continue
        expected = _reference_beam_search(config, params, enc[row], k, alpha, MAX_LEN)
        for beam, (seq, score, _) in enumerate(expected):
            np.testing.assert_array_equal(tokens[row, beam, : len(seq)], seq)
            assert (tokens[row, beam, len(seq):] == 0).all()
            assert abs(float(result.scores[row, beam]) - score) < 1e-4


@pytest.mark.slow
def test_beam_search_with_shared_cross_attention_kv_equals_beam_search_with_copies_per_beam(model):
    config, params, enc = model
    spec = decoding.DecodingSpec("beam", MAX_LEN, beam_size=3, alpha=0.6)
    fns = decoding.compile_decoding(config, spec)
    encoded = fns.encode(params, enc)
    shared_cache, run_tokens = fns.init_cache(params, encoded, enc)
    # The previous scheme: every example's encoder output repeated per beam, so
    # each beam row holds its own copy of the encoder-decoder keys/values.
    _, variables = network.Transformer(config).apply(
        {"params": params}, jnp.repeat(encoded, 3, axis=0), MAX_LEN,
        method=network.Transformer.init_decode_cache, mutable=["cache"])
    copied_cache = variables["cache"]
    cross = "decoder/layers_0/encoder_decoder_attention/cached_key"
    assert param_tree.flatten(shared_cache)[cross].shape[0] == enc.shape[0]
    assert param_tree.flatten(copied_cache)[cross].shape[0] == 3 * enc.shape[0]
    key = jax.random.PRNGKey(0)
    shared = fns.run(params, shared_cache, run_tokens, key)
    copied = fns.run(params, copied_cache, run_tokens, key)
    np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(copied.tokens))
    np.testing.assert_array_equal(np.asarray(shared.lengths), np.asarray(copied.lengths))
    np.testing.assert_allclose(np.asarray(shared.scores), np.asarray(copied.scores), atol=1e-5)
    assert int(shared.steps) == int(copied.steps)


@pytest.mark.parametrize("method", ["greedy", pytest.param("beam", marks=pytest.mark.slow)])
def test_segmented_decoding_reading_written_prefixes_equals_one_segment_over_the_whole_cache(model, method, monkeypatch):
    config, params, enc = model
    spec = decoding.DecodingSpec(method, MAX_LEN, beam_size=3)
    # MAX_LEN = 14 steps in segments of 4: the cache is resized to 4, 8, 12, 14.
    monkeypatch.setattr(decoding.decode_attention, "self_attention_segments", lambda n: (4, 8, 12, 14))
    decoding.compile_decoding.cache_clear()
    segmented = decoding.decode(config, params, enc, spec)
    monkeypatch.setattr(decoding.decode_attention, "self_attention_segments", lambda n: (n,))
    decoding.compile_decoding.cache_clear()
    whole = decoding.decode(config, params, enc, spec)
    decoding.compile_decoding.cache_clear()
    np.testing.assert_array_equal(np.asarray(segmented.tokens), np.asarray(whole.tokens))
    np.testing.assert_allclose(np.asarray(segmented.scores), np.asarray(whole.scores), atol=1e-5)
    assert int(segmented.steps) == int(whole.steps)


@pytest.mark.slow
def test_sampling_with_top_k_stays_in_the_top_k_and_is_reproducible(model):
    config, params, enc = model
    spec = decoding.DecodingSpec("sample", MAX_LEN, topk=3, temperature=2.0)
    a = decoding.decode(config, params, enc, spec, rng=7)
    b = decoding.decode(config, params, enc, spec, rng=7)
    c = decoding.decode(config, params, enc, spec, rng=8)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    tokens, lengths = np.asarray(a.tokens), np.asarray(a.lengths)
    weights = models.loss_weights_from_lengths(tokens, lengths)
    scores, log_probs = models.score_batch(
        config, params,
        {"encoder_input_tokens": enc, "decoder_target_tokens": tokens, "decoder_loss_weights": weights},
        return_token_log_probs=True,
    )
    top3 = np.argsort(-log_probs, axis=-1)[..., :3]
    valid = weights > 0
    assert (top3 == tokens[..., None]).any(-1)[valid].all()
    assert (tokens != np.asarray(decoding.decode(config, params, enc, GREEDY).tokens)).any()
    np.testing.assert_allclose(np.asarray(a.log_probs), scores, rtol=1e-5, atol=1e-4)  # untempered
    top1 = decoding.decode(config, params, enc, decoding.DecodingSpec("sample", MAX_LEN, topk=1), rng=7)
    greedy = decoding.decode(config, params, enc, GREEDY)
    np.testing.assert_array_equal(np.asarray(top1.tokens), np.asarray(greedy.tokens))


def test_new_inputs_of_a_compiled_shape_do_not_recompile(model):
    config, params, enc = model
    fns = decoding.compile_decoding(config, GREEDY)
    decoding.decode(config, params, enc, GREEDY)
    sizes = (fns.encode._cache_size(), fns.init_cache._cache_size(), fns.run._cache_size())
    rng = np.random.default_rng(1)
    for _ in range(3):
        other = rng.integers(2, VOCAB, size=enc.shape).astype(np.int32)
        decoding.decode(config, params, other, GREEDY)
    assert (fns.encode._cache_size(), fns.init_cache._cache_size(), fns.run._cache_size()) == sizes
    assert decoding.compile_decoding(config, GREEDY) is fns


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(method="nucleus"), "DecodingSpec.method='nucleus' is not one of"),
        (dict(max_decode_length=0), "DecodingSpec.max_decode_length=0 must be a positive integer"),
        (dict(method="sample", temperature=0.0), "DecodingSpec.temperature=0.0 must be > 0"),
        (dict(method="sample", topk=-1), "DecodingSpec.topk=-1"),
        (dict(method="beam", beam_size=0), "DecodingSpec.beam_size=0 must be an integer >= 1"),
        (dict(method="beam", alpha=-1.0), "DecodingSpec.alpha=-1.0"),
        (dict(eos_id=-1), "DecodingSpec.eos_id=-1 must be a token id >= 0"),
    ],
)
def test_invalid_decoding_specs_fail_when_built_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        decoding.DecodingSpec(**dict(max_decode_length=4) | fields)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(), "DecodingSpec.max_decode_length is None"),
        (dict(max_decode_length=4, method="beam", beam_size=40), "beam_size=40 must be >= 1 and at most half"),
        (dict(max_decode_length=4, method="sample", topk=49), "DecodingSpec.topk=49 must be in"),
        (dict(max_decode_length=4, eos_id=99), "DecodingSpec.eos_id=99 is outside the vocabulary"),
    ],
)
def test_specs_that_do_not_fit_the_model_are_named_before_decoding(fields, message):
    with pytest.raises(ValueError, match=message):
        decoding.decode(_config(2), {}, np.ones((1, 3), np.int32), decoding.DecodingSpec(**fields))


def test_decode_takes_a_spec_and_a_2d_integer_array():
    with pytest.raises(ValueError, match="encoder_input_tokens must be an integer array"):
        decoding.decode(_config(2), {}, np.ones((3,), np.int32), GREEDY)
    with pytest.raises(TypeError, match="spec must be a decoding.DecodingSpec"):
        decoding.decode(_config(2), {}, np.ones((1, 3), np.int32), {"max_decode_length": 4})


def test_greedy_token_is_argmax_with_ties_going_to_the_first_maximum():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((5, 37)).astype(np.float32)
    logits[1, [4, 9, 30]] = 10.0  # a three-way tie: the first wins, as in argmax
    logits[2, :] = 0.0  # all tied
    logits[3, -1] = 50.0  # the last id
    picked = np.asarray(decoding.greedy_token(jnp.asarray(logits)))
    np.testing.assert_array_equal(picked, np.argmax(logits, axis=-1))
    assert picked.dtype == np.int32 and picked[1] == 4 and picked[2] == 0 and picked[3] == 36


@pytest.mark.parametrize("method", ["greedy", pytest.param("beam", marks=pytest.mark.slow)])
def test_step_kernels_made_once_decode_every_batch_as_kernels_made_per_call(model, method):
    config, params, enc = model
    spec = decoding.DecodingSpec(method, MAX_LEN, beam_size=3)
    kernels = decoding.step_kernels(params)
    if jax.default_backend() == "cpu":  # the transposed decoder kernels, [out, in]
        flat = param_tree.flatten(kernels)
        assert flat["decoder/logits_dense/kernel"].shape == (VOCAB, config.emb_dim)
    for batch in (enc, enc[::-1]):  # two batches, one set of kernels
        once = decoding.decode(config, params, batch, spec, kernels=kernels)
        per_call = decoding.decode(config, params, batch, spec)
        np.testing.assert_array_equal(np.asarray(once.tokens), np.asarray(per_call.tokens))
        np.testing.assert_allclose(np.asarray(once.scores), np.asarray(per_call.scores), rtol=1e-6)
