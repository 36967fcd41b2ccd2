"""The T5.1.1 network: parity with HuggingFace, GQA semantics, cached decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x.model import initialization
from gqa_t5x.model import network
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config

hf_reference = pytest.importorskip("hf_reference")


def _tokens(rng: np.random.Generator, batch: int, length: int, vocab: int, pad_to: list[int] | None = None) -> np.ndarray:
    """Random ids in [2, vocab); row i is padded with 0 after pad_to[i] tokens."""
    out = rng.integers(2, vocab, size=(batch, length)).astype(np.int32)
    if pad_to is not None:
        for i, n in enumerate(pad_to):
            out[i, n:] = 0
    return out


def _shift_right(targets: np.ndarray) -> np.ndarray:
    inputs = np.zeros_like(targets)
    inputs[:, 1:] = targets[:, :-1]
    return inputs


def _logits(config, params, enc, dec_in, dec_tgt, **kwargs):
    """Teacher-forced logits, as one jitted program (eager dispatch of each op costs seconds)."""
    model = network.Transformer(config)
    run = jax.jit(lambda p, e, i, t: model.apply({"params": p}, e, i, t, enable_dropout=False, **kwargs))
    return np.asarray(run(params, enc, dec_in, dec_tgt))


PARITY_CONFIGS = [
    # name, HF kwargs, encoder length, decoder length, padding of encoder/decoder rows
    ("square", dict(vocab_size=97, d_model=32, num_heads=4, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2), 12, 7, None, None),
    ("inner_ne_emb_padded", dict(vocab_size=61, d_model=24, num_heads=3, d_kv=12, d_ff=40, num_layers=3, num_decoder_layers=2), 10, 9, [10, 6, 3], [9, 5, 2]),
    ("long_distances", dict(vocab_size=50, d_model=16, num_heads=2, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=3), 150, 70, [150, 131], [70, 40]),
    ("tied_logits", dict(vocab_size=40, d_model=16, num_heads=4, d_kv=6, d_ff=24, num_layers=2, num_decoder_layers=1, tie_word_embeddings=True), 9, 6, [9, 4], None),
]


@pytest.mark.parametrize("name,hf_kwargs,enc_len,dec_len,enc_pad,dec_pad", [  # "square" in the fast tier
    pytest.param(*c, id=c[0], marks=() if c[0] == "square" else pytest.mark.slow) for c in PARITY_CONFIGS])
def test_logits_match_huggingface_t5_v1_1(name, hf_kwargs, enc_len, dec_len, enc_pad, dec_pad):
    hf_model = hf_reference.make_hf_t5(seed=len(name), **hf_kwargs)
    config = hf_reference.our_config_for(hf_model)
    params = hf_reference.our_params_for(hf_model, config)
    rng = np.random.default_rng(len(name))
    batch = len(enc_pad) if enc_pad else 2
    enc = _tokens(rng, batch, enc_len, config.vocab_size, enc_pad)
    tgt = _tokens(rng, batch, dec_len, config.vocab_size, dec_pad)
    dec_in = _shift_right(tgt)

    ours = _logits(config, params, enc, dec_in, tgt)
    ref = hf_reference.hf_logits(hf_model, enc, dec_in, tgt)
    valid = tgt > 0  # padded decoder positions are masked out in both models
    diff = np.abs(ours - ref)[valid]
    assert diff.max() <= 1e-4, f"max |ours - HF| = {diff.max():.3g}"
    assert np.abs(ref[valid]).max() > 1e-2  # the comparison is not vacuous


@pytest.mark.parametrize("chunk", [4, 1])
def test_attention_in_query_blocks_matches_huggingface_t5_v1_1(chunk):
    """Blocks of 4 queries (dividing neither length 10 nor 9) or of one, with padded rows."""
    name, hf_kwargs, enc_len, dec_len, enc_pad, dec_pad = PARITY_CONFIGS[1]
    hf_model = hf_reference.make_hf_t5(seed=len(name), **hf_kwargs)
    config = hf_reference.our_config_for(hf_model).replace(attention_query_chunk=chunk)
    params = hf_reference.our_params_for(hf_model, config)
    rng = np.random.default_rng(len(name))
    enc = _tokens(rng, len(enc_pad), enc_len, config.vocab_size, enc_pad)
    tgt = _tokens(rng, len(enc_pad), dec_len, config.vocab_size, dec_pad)
    dec_in = _shift_right(tgt)

    ours = _logits(config, params, enc, dec_in, tgt)
    ref = hf_reference.hf_logits(hf_model, enc, dec_in, tgt)
    valid = tgt > 0
    assert np.abs(ours - ref)[valid].max() <= 1e-4
    assert np.abs(ref[valid]).max() > 1e-2


def _small_config(num_kv_heads: int | None, **kw) -> T5Config:
    base = dict(vocab_size=64, dtype="float32", emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
                num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0)
    base.update(kw)
    return T5Config(num_kv_heads=num_kv_heads, **base)


@pytest.mark.slow  # the fast tier: the same property of the attention (test_attention.py) and HF parity above
@pytest.mark.parametrize("scan_layers", [False, True])
def test_query_blocks_give_the_same_training_gradients_with_dropout(scan_layers):
    """A training step's gradients (dropout on: its masks are the whole attention's) do not see the blocks."""
    config = _small_config(2, dropout_rate=0.3, scan_layers=scan_layers, num_encoder_layers=1, num_decoder_layers=1)
    rng = np.random.default_rng(3)
    enc, tgt = _tokens(rng, 2, 11, config.vocab_size, [11, 7]), _tokens(rng, 2, 9, config.vocab_size, [9, 4])
    weights = jnp.asarray(rng.standard_normal((2, 9, config.vocab_size)), jnp.float32)
    params = initialization.init_params(config.replace(scan_layers=False), seed=1)
    if scan_layers:
        from gqa_t5x.model import layer_stack

        params = layer_stack.stack_layers(params, config)

    def grads(chunk):
        model = network.Transformer(config.replace(attention_query_chunk=chunk))

        def loss(p):
            logits = model.apply({"params": p}, enc, _shift_right(tgt), tgt, enable_dropout=True,
                                 rngs={"dropout": jax.random.PRNGKey(4)})
            return jnp.sum(jnp.tanh(logits) * weights)

        return jax.jit(jax.value_and_grad(loss))(params)

    (whole_loss, whole), (block_loss, blocks) = grads(None), grads(4)
    np.testing.assert_allclose(float(block_loss), float(whole_loss), rtol=1e-6)
    for path, value in param_tree.flatten(whole).items():
        np.testing.assert_allclose(np.asarray(param_tree.flatten(blocks)[path]), np.asarray(value), atol=2e-5,
                                   err_msg=path)


def _repeat_kv_to_mha(config: T5Config, params) -> dict:
    """MHA params whose key/value kernels repeat each GQA kv head per group."""
    group = config.num_heads // config.num_kv_heads
    flat = param_tree.flatten(jax.tree_util.tree_map(np.asarray, params))
    out = {}
    for path, value in flat.items():
        if path.startswith("decoder/layers_") and ("/key/" in path or "/value/" in path):
            emb = value.shape[0]
            heads = value.reshape(emb, config.num_kv_heads, config.head_dim)
            value = np.repeat(heads, group, axis=1).reshape(emb, config.num_heads * config.head_dim)
        out[path] = value
    return param_tree.unflatten(out)


@pytest.mark.slow  # the same property per attention layer: tests/model/test_attention.py
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_gqa_equals_mha_with_kv_heads_repeated_per_group(num_kv_heads):
    config = _small_config(num_kv_heads)
    params = initialization.init_params(config, seed=3)
    mha_config = config.replace(num_kv_heads=None)
    mha_params = _repeat_kv_to_mha(config, params)
    rng = np.random.default_rng(0)
    enc = _tokens(rng, 2, 11, 64, [11, 7])
    tgt = _tokens(rng, 2, 6, 64, [6, 4])
    gqa = _logits(config, params, enc, _shift_right(tgt), tgt)
    mha = _logits(mha_config, mha_params, enc, _shift_right(tgt), tgt)
    np.testing.assert_allclose(gqa, mha, atol=1e-5, rtol=0)


def test_gqa_key_value_kernels_have_kv_heads_width():
    config = _small_config(2, encoder_num_kv_heads=1)
    flat = param_tree.flatten(initialization.init_params(config))
    assert flat["decoder/layers_0/self_attention/key/kernel"].shape == (32, 2 * 8)
    assert flat["decoder/layers_1/encoder_decoder_attention/value/kernel"].shape == (32, 2 * 8)
    assert flat["decoder/layers_0/self_attention/query/kernel"].shape == (32, 4 * 8)
    assert flat["encoder/layers_0/attention/key/kernel"].shape == (32, 1 * 8)
    assert set(flat) == set(param_tree.param_shapes(config))


def _decode_step_by_step(config, params, enc, tgt):
    model = network.Transformer(config)
    dec_in = _shift_right(tgt)
    encoded = model.apply({"params": params}, enc, enable_dropout=False, method=network.Transformer.encode)
    _, variables = model.apply(
        {"params": params}, encoded, tgt.shape[1], method=network.Transformer.init_decode_cache, mutable=["cache"]
    )
    cache = variables["cache"]

    @jax.jit
    def step(cache, token):
        logits, new_vars = model.apply(
            {"params": params, "cache": cache}, None, enc, token, token,
            enable_dropout=False, decode=True, method=network.Transformer.decode, mutable=["cache"],
        )
        return logits[:, 0], new_vars["cache"]

    out = []
    for t in range(tgt.shape[1]):
        logits, cache = step(cache, dec_in[:, t : t + 1])
        out.append(np.asarray(logits))
    return np.stack(out, axis=1), cache


@pytest.mark.parametrize("num_kv_heads", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(4, marks=pytest.mark.slow)])
def test_cached_decoding_reproduces_teacher_forced_logits(num_kv_heads):
    config = _small_config(num_kv_heads)
    params = initialization.init_params(config, seed=5)
    rng = np.random.default_rng(1)
    enc = _tokens(rng, 2, 9, 64, [9, 5])
    tgt = _tokens(rng, 2, 7, 64)
    forced = _logits(config, params, enc, _shift_right(tgt), tgt)
    stepped, _ = _decode_step_by_step(config, params, enc, tgt)
    np.testing.assert_allclose(stepped, forced, atol=1e-5, rtol=0)


def _cache_bytes(cache) -> dict[str, int]:
    flat = param_tree.flatten(jax.tree_util.tree_map(np.asarray, cache))
    sizes = {"self": 0, "cross": 0}
    for path, value in flat.items():
        if path.endswith(("cached_key", "cached_value")):
            sizes["cross" if param_tree.is_cross_attention(path) else "self"] += value.nbytes
    return sizes


@pytest.mark.slow
def test_decoding_cache_holds_kv_heads_and_cross_attention_kv_once():
    rng = np.random.default_rng(2)
    enc = _tokens(rng, 2, 9, 64)
    tgt = _tokens(rng, 2, 5, 64)
    sizes = {}
    for g in (1, 2, 4):
        config = _small_config(g)
        _, cache = _decode_step_by_step(config, initialization.init_params(config), enc, tgt)
        sizes[g] = _cache_bytes(cache)
        layer = cache["decoder"]["layers_0"]
        assert layer["self_attention"]["cached_key"].shape == (2, g, 8, 5)  # [batch, kv_heads, head_dim, max_len]
        assert layer["self_attention"]["cached_value"].shape == (2, g, 5, 8)  # [batch, kv_heads, max_len, head_dim]
        assert layer["encoder_decoder_attention"]["cached_key"].shape == (2, g, 8, 9)  # [batch, kv_heads, head_dim, enc_len]
        assert layer["encoder_decoder_attention"]["cached_value"].shape == (2, g, 9, 8)
    for g in (1, 2):
        assert sizes[g]["self"] * 4 == sizes[4]["self"] * g
        assert sizes[g]["cross"] * 4 == sizes[4]["cross"] * g


@pytest.mark.slow
def test_cross_attention_keys_are_not_recomputed_during_decoding():
    """After the cache is built, decoding steps never touch the encoder output."""
    config = _small_config(2)
    params = initialization.init_params(config, seed=7)
    rng = np.random.default_rng(3)
    enc = _tokens(rng, 1, 6, 64)
    tgt = _tokens(rng, 1, 4, 64)
    stepped, cache = _decode_step_by_step(config, params, enc, tgt)  # steps pass encoded=None
    # The cached cross keys equal a projection of the encoder output.
    model = network.Transformer(config)
    encoded = model.apply({"params": params}, enc, enable_dropout=False, method=network.Transformer.encode)
    kernel = params["decoder"]["layers_0"]["encoder_decoder_attention"]["key"]["kernel"]
    expected = np.einsum("ble,ek->blk", np.asarray(encoded), np.asarray(kernel)).reshape(1, 6, 2, 8)
    np.testing.assert_allclose(  # cached as [batch, kv_heads, head_dim, enc_len]
        np.asarray(cache["decoder"]["layers_0"]["encoder_decoder_attention"]["cached_key"]),
        expected.transpose(0, 2, 3, 1), atol=1e-5,
    )
    assert np.isfinite(stepped).all()


@pytest.mark.slow
def test_packed_segments_give_the_same_logits_as_separate_examples():
    config = _small_config(2)
    params = initialization.init_params(config, seed=11)
    rng = np.random.default_rng(4)
    enc_a, enc_b = _tokens(rng, 1, 5, 64), _tokens(rng, 1, 4, 64)
    tgt_a, tgt_b = _tokens(rng, 1, 3, 64), _tokens(rng, 1, 4, 64)
    sep_a = _logits(config, params, enc_a, _shift_right(tgt_a), tgt_a)
    sep_b = _logits(config, params, enc_b, _shift_right(tgt_b), tgt_b)

    enc = np.concatenate([enc_a, enc_b, np.zeros((1, 2), np.int32)], axis=1)
    tgt = np.concatenate([tgt_a, tgt_b, np.zeros((1, 1), np.int32)], axis=1)
    dec_in = np.concatenate([_shift_right(tgt_a), _shift_right(tgt_b), np.zeros((1, 1), np.int32)], axis=1)
    enc_seg = np.array([[1] * 5 + [2] * 4 + [0] * 2], np.int32)
    dec_seg = np.array([[1] * 3 + [2] * 4 + [0]], np.int32)
    enc_pos = np.array([list(range(5)) + list(range(4)) + [0, 0]], np.int32)
    dec_pos = np.array([list(range(3)) + list(range(4)) + [0]], np.int32)
    packed = _logits(
        config, params, enc, dec_in, tgt,
        encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg,
        encoder_positions=enc_pos, decoder_positions=dec_pos,
    )
    np.testing.assert_allclose(packed[:, :3], sep_a, atol=1e-5)
    np.testing.assert_allclose(packed[:, 3:7], sep_b, atol=1e-5)
    # Positions are accepted for T5X compatibility and unused (relative bias).
    shuffled = _logits(
        config, params, enc, dec_in, tgt,
        encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg,
        encoder_positions=enc_pos[:, ::-1], decoder_positions=dec_pos[:, ::-1],
    )
    np.testing.assert_array_equal(shuffled, packed)


@pytest.mark.slow
def test_bfloat16_activations_with_float32_params_track_float32():
    config = _small_config(2)
    params = initialization.init_params(config, seed=13)
    rng = np.random.default_rng(5)
    enc = _tokens(rng, 2, 8, 64)
    tgt = _tokens(rng, 2, 6, 64)
    f32 = _logits(config, params, enc, _shift_right(tgt), tgt)
    model = network.Transformer(config.replace(dtype="bfloat16"))
    bf16 = model.apply({"params": params}, enc, _shift_right(tgt), tgt, enable_dropout=False)
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32
    bf16 = np.asarray(bf16, np.float32)
    assert np.isfinite(bf16).all()
    rel = np.abs(bf16 - f32).max() / np.abs(f32).max()
    assert rel < 0.05, rel
    assert (bf16.argmax(-1) == f32.argmax(-1)).mean() > 0.9


@pytest.mark.slow
def test_dropout_changes_outputs_only_when_enabled():
    config = _small_config(2, dropout_rate=0.3)
    params = initialization.init_params(config)
    rng = np.random.default_rng(6)
    enc, tgt = _tokens(rng, 2, 8, 64), _tokens(rng, 2, 5, 64)
    model = network.Transformer(config)
    a = model.apply({"params": params}, enc, _shift_right(tgt), tgt, enable_dropout=False)
    b = model.apply({"params": params}, enc, _shift_right(tgt), tgt, enable_dropout=False)
    c = model.apply({"params": params}, enc, _shift_right(tgt), tgt, enable_dropout=True, rngs={"dropout": jax.random.PRNGKey(0)})
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


# ------------------------------------------- key/value heads per layer and attention kind
_KINDS = {"attention": "encoder", "self_attention": "self", "encoder_decoder_attention": "cross"}


def _repeat_each_layers_kv_to_mha(config: T5Config, params) -> dict:
    """MHA params whose key/value kernels repeat each layer's kv heads per group of that layer."""
    out = {}
    for path, value in param_tree.flatten(jax.tree_util.tree_map(np.asarray, params)).items():
        parts = path.split("/")
        if parts[-2] in ("key", "value") and parts[-3] in _KINDS:
            g = config.kv_heads(_KINDS[parts[-3]], int(parts[1].removeprefix("layers_")))
            heads = value.reshape(value.shape[0], g, config.head_dim)
            value = np.repeat(heads, config.num_heads // g, axis=1).reshape(value.shape[0], -1)
        out[path] = value
    return param_tree.unflatten(out)


def test_per_layer_counts_that_are_all_equal_give_the_uniform_models_logits():
    uniform = _small_config(2, encoder_num_kv_heads=1)
    layered = _small_config(None, decoder_self_kv_heads=[2, 2], decoder_cross_kv_heads=2,
                            encoder_layer_kv_heads=(1, 1))
    assert layered == uniform and hash(layered) == hash(uniform)
    assert param_tree.param_shapes(layered) == param_tree.param_shapes(uniform)
    params = initialization.init_params(uniform, seed=3)
    rng = np.random.default_rng(8)
    enc, tgt = _tokens(rng, 2, 7, 64, [7, 4]), _tokens(rng, 2, 5, 64)
    np.testing.assert_array_equal(_logits(layered, params, enc, _shift_right(tgt), tgt),
                                  _logits(uniform, params, enc, _shift_right(tgt), tgt))


@pytest.mark.slow  # the fast tier checks the shapes and decoding below
def test_per_layer_model_has_per_layer_kernels_and_computes_mha_with_each_layers_kv_heads_repeated():
    config = _small_config(None, decoder_self_kv_heads=(1, 2), decoder_cross_kv_heads=(4, 1),
                           encoder_layer_kv_heads=(2, 1))
    shapes = param_tree.param_shapes(config)
    widths = {path.rsplit("/", 2)[0]: shape for path, shape in shapes.items() if path.endswith("/key/kernel")}
    assert widths == {  # [emb, kv_heads * head_dim] per layer and kind
        "encoder/layers_0/attention": (32, 2 * 8), "encoder/layers_1/attention": (32, 1 * 8),
        "decoder/layers_0/self_attention": (32, 1 * 8), "decoder/layers_1/self_attention": (32, 2 * 8),
        "decoder/layers_0/encoder_decoder_attention": (32, 4 * 8),
        "decoder/layers_1/encoder_decoder_attention": (32, 1 * 8),
    }
    assert all(shapes[p.replace("/key/", "/value/")] == shapes[p] for p in shapes if "/key/" in p)
    params = initialization.init_params(config, seed=4)
    assert {p: tuple(v.shape) for p, v in param_tree.flatten(params).items()} == shapes
    rng = np.random.default_rng(9)
    enc, tgt = _tokens(rng, 2, 9, 64, [9, 6]), _tokens(rng, 2, 6, 64, [6, 3])
    ours = _logits(config, params, enc, _shift_right(tgt), tgt)
    mha = _logits(config.replace(num_kv_heads=None, encoder_num_kv_heads=None, decoder_self_kv_heads=None,
                                 decoder_cross_kv_heads=None, encoder_layer_kv_heads=None),
                  _repeat_each_layers_kv_to_mha(config, params), enc, _shift_right(tgt), tgt)
    assert np.isfinite(ours).all() and np.abs(ours).max() > 0.1
    np.testing.assert_allclose(ours, mha, atol=1e-5, rtol=0)


def test_per_layer_decode_cache_has_each_layers_kv_heads_and_reproduces_teacher_forcing():
    config = _small_config(None, decoder_self_kv_heads=(1, 2), decoder_cross_kv_heads=(4, 1))
    params = initialization.init_params(config, seed=6)
    flat = param_tree.flatten(params)
    assert [flat[f"decoder/layers_{i}/{m}/value/kernel"].shape for i in (0, 1)
            for m in ("self_attention", "encoder_decoder_attention")] == [(32, 8), (32, 32), (32, 16), (32, 8)]
    assert flat["encoder/layers_1/attention/key/kernel"].shape == (32, 32)  # encoder stays multi-head
    rng = np.random.default_rng(10)
    enc, tgt = _tokens(rng, 2, 9, 64, [9, 5]), _tokens(rng, 2, 5, 64)
    stepped, cache = _decode_step_by_step(config, params, enc, tgt)
    shapes = {path: tuple(np.shape(v)) for path, v in param_tree.flatten(cache).items()
              if path.endswith(("cached_key", "cached_value"))}
    assert shapes == {  # keys [batch, kv_heads, head_dim, len], values [batch, kv_heads, len, head_dim]
        "decoder/layers_0/self_attention/cached_key": (2, 1, 8, 5),
        "decoder/layers_0/self_attention/cached_value": (2, 1, 5, 8),
        "decoder/layers_1/self_attention/cached_key": (2, 2, 8, 5),
        "decoder/layers_1/self_attention/cached_value": (2, 2, 5, 8),
        "decoder/layers_0/encoder_decoder_attention/cached_key": (2, 4, 8, 9),
        "decoder/layers_0/encoder_decoder_attention/cached_value": (2, 4, 9, 8),
        "decoder/layers_1/encoder_decoder_attention/cached_key": (2, 1, 8, 9),
        "decoder/layers_1/encoder_decoder_attention/cached_value": (2, 1, 9, 8),
    }
    np.testing.assert_allclose(stepped, _logits(config, params, enc, _shift_right(tgt), tgt), atol=1e-5, rtol=0)
