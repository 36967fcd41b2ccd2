"""MHA -> GQA conversion: the paper's mean pooling, ablations, `align`, streaming."""

from __future__ import annotations

import numpy as np
import pytest

from conversion_utils import (
    T5X_TINY,
    flat,
    our_logits,
    random_params,
    relative_logit_error,
    rotated_heads_params,
    tiny_config,
    tokens,
)
from gqa_t5x import conversion
from gqa_t5x.model import param_tree

ATTN_DEC = ("self_attention", "encoder_decoder_attention")


def _group_mean(kernel: np.ndarray, head_dim: int, groups: int) -> np.ndarray:
    """Reference: new head g = mean of columns of heads g*r .. g*r+r-1."""
    heads = kernel.shape[1] // head_dim
    r = heads // groups
    cols = [
        np.mean([kernel[:, (g * r + i) * head_dim : (g * r + i + 1) * head_dim].astype(np.float64) for i in range(r)], axis=0)
        for g in range(groups)
    ]
    return np.concatenate(cols, axis=1)


def _is_converted(path: str, config, convert_encoder=False) -> bool:
    split = conversion.split_attention_path(path)
    if not split or split[1] not in ("key", "value"):
        return False
    return any(f"/{m}" in split[0] for m in ATTN_DEC) or (convert_encoder and "/attention" in split[0])


# ------------------------------------------------------------ real T5X fixture
@pytest.fixture(scope="module")
def t5x_tiny():
    if not T5X_TINY.exists():
        pytest.skip(f"T5X fixture not found at {T5X_TINY}")
    from gqa_t5x import checkpoints

    config, params = checkpoints.load(T5X_TINY)
    return config, params


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_t5x_fixture_mean_kv_is_group_mean_and_everything_else_untouched(t5x_tiny, groups):
    config, params = t5x_tiny
    assert (config.num_heads, config.head_dim) == (4, 3)
    new_config, new_params = conversion.convert(config, params, groups)
    assert new_config.num_kv_heads == groups and new_config.encoder_num_kv_heads == 4
    src, out = flat(params), flat(new_params)
    assert set(out) == set(param_tree.param_shapes(new_config))
    for path, value in out.items():
        assert value.shape == param_tree.param_shapes(new_config)[path], path
        if _is_converted(path, config):
            np.testing.assert_allclose(value, _group_mean(src[path], 3, groups), rtol=1e-6, atol=1e-7, err_msg=path)
        else:  # queries, outs, encoder attention, norms, MLPs, relpos, embeddings
            np.testing.assert_array_equal(value, src[path], err_msg=path)


@pytest.mark.parametrize("method", conversion.METHODS)
def test_t5x_fixture_streaming_to_same_num_kv_heads_is_bit_identical(t5x_tiny, tmp_path, method):
    from gqa_t5x import checkpoints

    conversion.convert_checkpoint(T5X_TINY, tmp_path / "out", 4, method=method, progress=False)
    with checkpoints.open_checkpoint(T5X_TINY) as src, checkpoints.open_checkpoint(tmp_path / "out") as dst:
        assert dst.config.num_kv_heads == 4 and dst.keys() == src.keys()
        for key in src.keys():
            a, b = src.read(key), dst.read(key)
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), key


@pytest.mark.parametrize("method,groups", [("mean", 1), ("mean", 2), ("align", 2), ("random", 1), ("first", 2)])
def test_t5x_fixture_streaming_equals_in_memory_conversion(t5x_tiny, tmp_path, method, groups):
    from gqa_t5x import checkpoints

    config, params = t5x_tiny
    expected_config, expected = conversion.convert(config, params, groups, method=method, seed=3)
    returned = conversion.convert_checkpoint(T5X_TINY, tmp_path / "gqa", groups, method=method, seed=3, progress=False)
    with checkpoints.open_checkpoint(T5X_TINY) as src:
        source_step = src.step
    got_config, got = checkpoints.load(tmp_path / "gqa")
    assert returned == got_config
    assert got_config.num_kv_heads == expected_config.num_kv_heads == groups
    for path, value in flat(expected).items():
        np.testing.assert_array_equal(flat(got)[path], value, err_msg=path)
    with checkpoints.open_checkpoint(tmp_path / "gqa") as dst:
        assert dst.step == source_step  # TRAIN_STEPS stays absolute


def test_streaming_holds_at_most_one_attention_layer(t5x_tiny, tmp_path, monkeypatch):
    """Reads and writes interleave: never more than 4 read-but-unwritten params."""
    from gqa_t5x import checkpoints

    events: list[tuple[str, str]] = []
    original_open = checkpoints.open_checkpoint

    def spying_open(path, **kw):
        reader = original_open(path, **kw)
        original_read = reader.read

        def read(key):
            events.append(("read", key))
            return original_read(key)

        reader.read = read
        return reader

    monkeypatch.setattr(checkpoints, "open_checkpoint", spying_open)
    conversion.convert_checkpoint(
        T5X_TINY, tmp_path / "o", 1, method="align", progress=False,
        on_param=lambda p: events.append(("write", p)),
    )
    pending, most = set(), 0
    for kind, key in events:
        if kind == "read":
            pending.add(key)
        else:
            pending.discard(key)
        most = max(most, len(pending))
    assert most == 4  # one layer's query/key/value/out for align
    assert not pending


# ---------------------------------------------------------------- the methods
@pytest.mark.slow  # each method's per-layer conversion stays in the fast tier
def test_first_keeps_each_groups_first_head():
    config = tiny_config()
    params = random_params(config)
    _, out = conversion.convert(config, params, 2, method="first")
    src, got = flat(params), flat(out)
    for path in got:
        if _is_converted(path, config):
            d = config.head_dim
            expected = np.concatenate([src[path][:, 0:d], src[path][:, 2 * d : 3 * d]], axis=1)
            np.testing.assert_array_equal(got[path], expected, err_msg=path)


@pytest.mark.slow
def test_random_is_seeded_fresh_t5x_init_with_fan_in_variance():
    config = tiny_config(emb_dim=256, head_dim=64, num_heads=8, num_decoder_layers=1, num_encoder_layers=1)
    params = random_params(config)
    _, a = conversion.convert(config, params, 1, method="random", seed=7)
    _, b = conversion.convert(config, params, 1, method="random", seed=7)
    _, c = conversion.convert(config, params, 1, method="random", seed=8)
    a, b, c = flat(a), flat(b), flat(c)
    key = "decoder/layers_0/self_attention/key/kernel"
    np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a[key], c[key])
    assert not np.array_equal(a[key], a["decoder/layers_0/self_attention/value/kernel"])
    # variance_scaling(1.0, 'fan_in', 'normal'): std = 1/sqrt(emb_dim).
    samples = np.concatenate([a[k].ravel() for k in a if _is_converted(k, config)])
    assert abs(samples.std() * np.sqrt(256) - 1.0) < 0.02
    assert abs(samples.mean()) < 0.01


@pytest.mark.slow
def test_two_step_mean_equals_direct_mean_and_groups_stay_contiguous():
    """8 -> 4 -> 2 heads equals 8 -> 2, and kv head g pools query heads g*H/G .. (g+1)*H/G - 1.

    Interleaved groups (head h in group h % G) would also make the two routes
    agree, so both are compared with the contiguous reference as well.
    """
    config = tiny_config(num_heads=8, head_dim=4)
    params = random_params(config)
    mid_config, mid = conversion.convert(config, params, 4)
    two_config, two = conversion.convert(mid_config, mid, 2)
    _, direct = conversion.convert(config, params, 2)
    assert two_config.num_kv_heads == 2
    src = flat(params)
    for path, value in flat(direct).items():
        np.testing.assert_allclose(flat(two)[path], value, rtol=1e-6, atol=1e-7, err_msg=path)
        if _is_converted(path, config):
            np.testing.assert_allclose(flat(mid)[path], _group_mean(src[path], 4, 4), rtol=1e-6, atol=1e-7, err_msg=path)
            np.testing.assert_allclose(value, _group_mean(src[path], 4, 2), rtol=1e-6, atol=1e-7, err_msg=path)


def test_convert_encoder_converts_encoder_attention_only_when_asked():
    config = tiny_config()
    params = random_params(config)
    new_config, out = conversion.convert(config, params, 2, convert_encoder=True, encoder_num_kv_heads=1)
    assert (new_config.num_kv_heads, new_config.encoder_num_kv_heads) == (2, 1)
    key = "encoder/layers_1/attention/value/kernel"
    np.testing.assert_allclose(flat(out)[key], _group_mean(flat(params)[key], 8, 1), rtol=1e-6, atol=1e-7)
    default_config, default = conversion.convert(config, params, 2)
    assert default_config.encoder_num_kv_heads == 4
    np.testing.assert_array_equal(flat(default)[key], flat(params)[key])


@pytest.mark.parametrize(
    "kwargs,needles",
    [
        (dict(num_kv_heads=3), ["num_kv_heads=3", "num_heads=4", "[1, 2, 4]"]),
        (dict(num_kv_heads=8), ["num_kv_heads=8", "4", "[1, 2, 4]"]),
        (dict(num_kv_heads=0), ["num_kv_heads=0", "positive"]),
        (dict(num_kv_heads=2, method="median"), ["median", "mean", "align"]),
        (dict(num_kv_heads=2, encoder_num_kv_heads=1), ["convert_encoder"]),
        (dict(num_kv_heads=2, convert_encoder=True, encoder_num_kv_heads=3), ["encoder_num_kv_heads=3"]),
    ],
)
def test_invalid_requests_raise_errors_naming_the_problem(kwargs, needles):
    config = tiny_config()
    with pytest.raises(ValueError) as info:
        conversion.convert(config, random_params(config), **kwargs)
    for needle in needles:
        assert needle in str(info.value)


def test_more_kv_heads_than_a_gqa_source_is_refused():
    config = tiny_config(num_heads=8, head_dim=4, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"num_kv_heads=4 is more key/value heads than the source has \(2"):
        conversion.plan_conversion(config, 4)


# ---------------------------------------------------------------------- align
@pytest.mark.slow
def test_align_rotation_step_alone_leaves_mha_logits_unchanged():
    config = tiny_config()
    params = random_params(config, seed=1)
    batch = tokens(1, config.vocab_size)
    reference = our_logits(config, params, batch)
    p = flat(params)
    rng = np.random.default_rng(0)
    for path in list(p):
        split = conversion.split_attention_path(path)
        if not split or split[1] != "key":
            continue  # encoder, self- and cross-attention all rotated
        kernels = {x: p[f"{split[0]}/{x}/kernel"] for x in ("query", "key", "value", "out")}
        # Once with the rotations align picks, once with random orthogonal ones.
        key_rot, value_rot = conversion.align_rotations(kernels, 1, config.head_dim)
        if "encoder_decoder" in path:
            key_rot = np.stack([np.linalg.qr(rng.standard_normal((8, 8)))[0] for _ in range(4)])
        rotated = conversion.rotate_heads(kernels, key_rot, value_rot, config.head_dim)
        assert not np.allclose(rotated["key"], kernels["key"], atol=1e-3)
        for x, value in rotated.items():
            p[f"{split[0]}/{x}/kernel"] = value.astype(np.float32)
    got = our_logits(config, param_tree.unflatten(p), batch)
    assert np.abs(got - reference).max() <= 1e-5 * max(1.0, np.abs(reference).max())


@pytest.mark.slow
def test_align_beats_mean_when_heads_are_rotations_of_each_other():
    config = tiny_config()
    params = rotated_heads_params(config)
    batch = tokens(2, config.vocab_size)
    for groups in (1, 2):
        mean_err = relative_logit_error(config, params, groups, "mean", batch)
        align_err = relative_logit_error(config, params, groups, "align", batch)
        assert align_err < 0.25 * mean_err, (groups, mean_err, align_err)
        layer = "decoder/layers_0/self_attention"
        src = {x: flat(params)[f"{layer}/{x}/kernel"] for x in ("query", "key", "value", "out")}
        errs = {}
        for method in ("mean", "align"):
            converted = dict(src)
            converted.update(conversion.convert_attention(src, num_heads=4, head_dim=8, target_kv_heads=groups, method=method))
            errs[method] = conversion.attention_error(src, converted, num_heads=4, head_dim=8)
        assert errs["align"]["qk"] < 0.05 * errs["mean"]["qk"]
        assert errs["align"]["ov"] < 0.05 * errs["mean"]["ov"]


@pytest.mark.slow
def test_align_never_increases_within_group_kv_dispersion_on_random_model():
    """Guaranteed by construction: the identity start of Procrustes is plain mean."""
    config = tiny_config(num_heads=8, head_dim=4)
    p = flat(random_params(config, seed=5))
    d = config.head_dim
    for layer in ("decoder/layers_0/self_attention", "decoder/layers_1/encoder_decoder_attention"):
        kernels = {x: p[f"{layer}/{x}/kernel"] for x in ("query", "key", "value", "out")}
        for groups in (1, 2, 4):
            key_rot, value_rot = conversion.align_rotations(kernels, groups, d)
            rotated = conversion.rotate_heads(kernels, key_rot, value_rot, d)
            for proj in ("key", "value"):
                def dispersion(kernel):
                    h = kernel.reshape(kernel.shape[0], groups, -1, d)
                    return float(((h - h.mean(axis=2, keepdims=True)) ** 2).sum())

                assert dispersion(rotated[proj]) <= dispersion(kernels[proj].astype(np.float64)) + 1e-9


# -------------------------------------------------------- the method registry
def _last_head(kernels, layer):
    """Toy method: keep each group's last key/value head."""
    return {p: conversion.merge_heads(conversion.group_heads(kernels[p], layer)[:, :, -1, :]) for p in conversion.KEY_VALUE}


@pytest.fixture
def scratch_registry(monkeypatch):
    """Methods registered by a test are forgotten after it."""
    from gqa_t5x.conversion import methods

    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))


@pytest.mark.slow
def test_a_method_registered_through_the_public_registry_converts_a_checkpoint(scratch_registry, tmp_path):
    from gqa_t5x import checkpoints

    conversion.register_method(conversion.ConversionMethod(
        "last", _last_head, conversion.KEY_VALUE, "keep each group's last head"))
    assert "last" in conversion.METHODS and conversion.get_method("last").doc == "keep each group's last head"
    config = tiny_config()
    params = random_params(config, seed=3)
    checkpoints.save(tmp_path / "mha", config, params, step=9)
    returned = conversion.convert_checkpoint(tmp_path / "mha", tmp_path / "gqa", 2, method="last", progress=False)
    gqa_config, gqa = checkpoints.load(tmp_path / "gqa")
    assert returned == gqa_config == config.replace(num_kv_heads=2)
    src, out, d = flat(params), flat(gqa), config.head_dim
    for path, value in out.items():
        if _is_converted(path, config):  # heads 1 and 3 of groups {0, 1} and {2, 3}
            expected = np.concatenate([src[path][:, d : 2 * d], src[path][:, 3 * d : 4 * d]], axis=1)
            np.testing.assert_array_equal(value, expected, err_msg=path)
        else:
            np.testing.assert_array_equal(value, src[path], err_msg=path)
    # The same function as multi-head attention whose every head reads its group's last head.
    mha_equivalent = dict(src)
    for path in out:
        if _is_converted(path, config):
            last = [src[path][:, h * d : (h + 1) * d] for h in (1, 1, 3, 3)]
            mha_equivalent[path] = np.concatenate(last, axis=1)
    batch = tokens(4, config.vocab_size)
    np.testing.assert_allclose(
        our_logits(gqa_config, gqa, batch),
        our_logits(config, param_tree.unflatten(mha_equivalent), batch),
        rtol=1e-5, atol=1e-5,
    )
    with checkpoints.open_checkpoint(tmp_path / "gqa") as reader:
        assert reader.metadata["conversion"]["method"] == "last" and reader.step == 9


def test_methods_are_checked_when_registered_and_when_they_return(scratch_registry):
    with pytest.raises(ValueError, match="must include 'key' and 'value'"):
        conversion.ConversionMethod("q_only", _last_head, ("query",), "x")
    conversion.register_method(conversion.ConversionMethod("last", _last_head, conversion.KEY_VALUE, "x"))
    with pytest.raises(ValueError, match="'last' is already registered"):
        conversion.register_method(conversion.ConversionMethod("last", _first_of_all, conversion.KEY_VALUE, "x"))
    conversion.register_method(conversion.ConversionMethod("wrong", _first_of_all, conversion.KEY_VALUE, "x"))
    config = tiny_config()
    with pytest.raises(ValueError, match=r"'wrong' returned decoder/layers_0/self_attention/key/kernel with shape \(32, 32\); expected \(32, 16\)"):
        conversion.convert(config, random_params(config), 2, method="wrong")


def _first_of_all(kernels, layer):
    """A broken method: returns the kernels unchanged (S heads, not G)."""
    return {p: kernels[p] for p in conversion.KEY_VALUE}


# ------------------------------------------------------------------------ gin
@pytest.mark.slow
def test_convert_gin_binds_convert_checkpoint_like_the_python_call(tmp_path):
    import gin

    from gqa_t5x import checkpoints, gin_config
    from gqa_t5x.conversion import converter

    config = tiny_config()
    checkpoints.save(tmp_path / "mha", config, random_params(config, seed=5))
    gin_config.parse_gin(["gin/runs/convert.gin"], [
        f'SOURCE="{tmp_path / "mha"}"', f'OUTPUT="{tmp_path / "gin"}"', "NUM_KV_HEADS=2", "METHOD='first'",
    ])
    gin.get_configurable(converter.convert_checkpoint)(progress=False)
    conversion.convert_checkpoint(tmp_path / "mha", tmp_path / "py", 2, method="first", progress=False)
    config_gin, by_gin = checkpoints.load(tmp_path / "gin")
    config_py, by_py = checkpoints.load(tmp_path / "py")
    assert config_gin == config_py and config_gin.num_kv_heads == 2
    for path, value in flat(by_py).items():
        np.testing.assert_array_equal(flat(by_gin)[path], value, err_msg=path)
    with pytest.raises(ValueError, match="SOURCE"):
        gin_config.parse_gin(["gin/runs/convert.gin"], ["NUM_KV_HEADS=2"])


# ------------------------------------------------- targets per layer and attention kind
PER_LAYER_TARGETS = dict(decoder_self_kv_heads=(1, 2), decoder_cross_kv_heads=(4, 1), encoder_layer_kv_heads=(2, 1))


def _synthetic_statistics(config, seed: int = 0) -> dict:
    """Deterministic calibration statistics (SPD second moments) for every attention layer."""
    rng = np.random.default_rng(seed)
    stats = {}
    for i in range(config.num_encoder_layers):
        stats[f"encoder/layers_{i}/attention"] = None
    for i in range(config.num_decoder_layers):
        for module in ATTN_DEC:
            stats[f"decoder/layers_{i}/{module}"] = None
    for prefix in stats:
        a = rng.standard_normal((config.emb_dim, config.emb_dim))
        stats[prefix] = {"query_second_moment": a @ a.T / config.emb_dim + np.eye(config.emb_dim),
                         "tokens": np.asarray(100)}
    return stats


@pytest.mark.parametrize("method", conversion.METHODS)
def test_per_layer_targets_convert_each_layer_as_a_uniform_conversion_to_its_count(method):
    config = tiny_config()
    params = random_params(config, seed=2)
    stats = _synthetic_statistics(config)
    target, out = conversion.convert(config, params, method=method, seed=5, convert_encoder=True,
                                     calibration=stats, **PER_LAYER_TARGETS)
    assert target == config.replace(**PER_LAYER_TARGETS) and not target.uniform_kv_heads
    out = flat(out)
    assert {p: v.shape for p, v in out.items()} == param_tree.param_shapes(target)
    uniform = {g: flat(conversion.convert(config, params, g, method=method, seed=5, convert_encoder=True,
                                          calibration=stats)[1]) for g in (1, 2)}
    kinds = {"encoder": ("encoder", "attention"), "self": ("decoder", "self_attention"),
             "cross": ("decoder", "encoder_decoder_attention")}
    for kind, (stack, module) in kinds.items():
        for i in range(2):
            g = target.kv_heads(kind, i)
            expected = flat(params) if g == 4 else uniform[g]  # 4 = the source's: copied as is
            for proj in ("query", "key", "value", "out"):
                path = f"{stack}/layers_{i}/{module}/{proj}/kernel"
                np.testing.assert_array_equal(out[path], expected[path], err_msg=f"{method} {path}")
    for path, value in out.items():  # everything else is the source's
        if not conversion.split_attention_path(path):
            np.testing.assert_array_equal(value, flat(params)[path], err_msg=path)


def test_per_layer_streaming_conversion_records_the_per_layer_config_and_equals_in_memory(tmp_path):
    from gqa_t5x import checkpoints

    config = tiny_config()
    params = random_params(config, seed=3)
    checkpoints.save(tmp_path / "mha", config, params)
    written = conversion.convert_checkpoint(tmp_path / "mha", tmp_path / "gqa", 2, method="mean", progress=False,
                                            decoder_self_kv_heads=[1, 2])
    expected_config, expected = conversion.convert(config, params, 2, decoder_self_kv_heads=(1, 2))
    got_config, got = checkpoints.load(tmp_path / "gqa")
    assert written == got_config == expected_config
    assert got_config.layer_kv_heads("self") == (1, 2) and got_config.layer_kv_heads("cross") == (2, 2)
    for path, value in flat(expected).items():
        np.testing.assert_array_equal(flat(got)[path], value, err_msg=path)
    with checkpoints.open_checkpoint(tmp_path / "gqa") as reader:
        record = reader.metadata["conversion"]
    assert record["decoder_self_kv_heads"] == [1, 2] and record["source_decoder_self_kv_heads"] is None
    assert record["num_kv_heads"] == 2


@pytest.mark.slow
def test_a_per_layer_source_is_converted_further_layer_by_layer():
    config = tiny_config(decoder_self_kv_heads=(2, 4), decoder_cross_kv_heads=(4, 2))
    params = random_params(config, seed=4)
    target, out = conversion.convert(config, params, 1, decoder_cross_kv_heads=(2, 2))
    assert target.layer_kv_heads("self") == (1, 1) and target.layer_kv_heads("cross") == (2, 2)
    key = "decoder/layers_1/self_attention/key/kernel"
    np.testing.assert_allclose(flat(out)[key], _group_mean(flat(params)[key], 8, 1), rtol=1e-6, atol=1e-7)
    unchanged = "decoder/layers_1/encoder_decoder_attention/key/kernel"  # 2 -> 2: copied
    np.testing.assert_array_equal(flat(out)[unchanged], flat(params)[unchanged])
    with pytest.raises(ValueError, match=r"decoder_self_kv_heads\[0\]=4 is more key/value heads than the source "
                                         r"has \(2 in decoder/layers_0/self_attention"):
        conversion.convert(config, params, decoder_self_kv_heads=(4, 4))
