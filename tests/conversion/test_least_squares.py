"""`lsq` (least-squares pooling from calibration statistics): exactness claims,
optimality, the calibration statistics, and conversion of checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from conversion_utils import random_params, tiny_config, tokens
from gqa_t5x import conversion
from gqa_t5x.conversion import calibration, least_squares
from gqa_t5x.model import param_tree


def _heads(kernel: np.ndarray, d: int) -> list[np.ndarray]:
    return [kernel[:, i * d:(i + 1) * d] for i in range(kernel.shape[1] // d)]


def _group_mean(kernel: np.ndarray, d: int, groups: int) -> np.ndarray:
    heads = _heads(kernel, d)
    n = len(heads) // groups
    return np.concatenate([np.mean(heads[g * n:(g + 1) * n], axis=0) for g in range(groups)], axis=1)


def _orthonormal_blocks(rng, emb: int, count: int, d: int) -> list[np.ndarray]:
    """`count` [emb, d] blocks with orthonormal columns (random rotations)."""
    return [np.linalg.qr(rng.standard_normal((emb, emb)))[0][:, :d] for _ in range(count)]


def _spd(rng, n: int) -> np.ndarray:
    m = rng.standard_normal((n, n))
    return m @ m.T / n + 0.1 * np.eye(n)


def _kernels(rng, emb=12, heads=4, d=3, kv=4):
    return {
        "query": rng.standard_normal((emb, heads * d)),
        "key": rng.standard_normal((emb, kv * d)),
        "value": rng.standard_normal((emb, kv * d)),
        "out": rng.standard_normal((heads * d, emb)),
    }


@pytest.mark.parametrize("groups", [1, 2])
def test_lsq_is_the_plain_mean_under_isotropic_inputs_and_equally_scaled_heads(groups):
    rng = np.random.default_rng(0)
    emb, heads, d = 12, 4, 3
    kernels = _kernels(rng, emb, heads, d)
    # Q_h^T Q_h = 4 I and O_h O_h^T = 9 I for every head, C_q = I: all A_s, B_s equal.
    kernels["query"] = np.concatenate([2.0 * q for q in _orthonormal_blocks(rng, emb, heads, d)], axis=1)
    kernels["out"] = np.concatenate([3.0 * o.T for o in _orthonormal_blocks(rng, emb, heads, d)], axis=0)
    pooled = least_squares.least_squares_pool(kernels, np.eye(emb), num_heads=heads, head_dim=d,
                                              target_kv_heads=groups)
    for name in ("key", "value"):
        np.testing.assert_allclose(pooled[name], _group_mean(kernels[name], d, groups), atol=1e-9, err_msg=name)


def test_lsq_is_the_plain_mean_when_all_query_and_out_heads_are_equal_whatever_the_statistics():
    rng = np.random.default_rng(1)
    emb, heads, d = 10, 4, 2
    kernels = _kernels(rng, emb, heads, d)
    q, o = rng.standard_normal((emb, d)), rng.standard_normal((d, emb))
    kernels["query"] = np.concatenate([q] * heads, axis=1)
    kernels["out"] = np.concatenate([o] * heads, axis=0)
    pooled = least_squares.least_squares_pool(kernels, _spd(rng, emb), num_heads=heads, head_dim=d, target_kv_heads=1)
    for name in ("key", "value"):
        np.testing.assert_allclose(pooled[name], _group_mean(kernels[name], d, 1), atol=1e-9, err_msg=name)


def test_lsq_differs_from_the_mean_when_the_query_heads_differ_in_scale():
    rng = np.random.default_rng(2)
    kernels = _kernels(rng)
    kernels["query"][:, :3] *= 10.0  # head 0 (reading kv head 0) dominates the logits
    pooled = least_squares.least_squares_pool(kernels, np.eye(12), num_heads=4, head_dim=3, target_kv_heads=1)
    mean = _group_mean(kernels["key"], 3, 1)
    assert np.abs(pooled["key"] - mean).max() > 0.1
    # ... and moves towards the dominant head's key.
    first = kernels["key"][:, :3]
    assert np.linalg.norm(pooled["key"] - first) < np.linalg.norm(mean - first)


def test_lsq_key_kernel_is_the_brute_force_minimiser_of_the_expected_logit_error():
    rng = np.random.default_rng(3)
    emb, heads, d, kv = 6, 4, 2, 4
    kernels = _kernels(rng, emb, heads, d, kv)
    c_q, c_k = _spd(rng, emb), _spd(rng, emb)
    pooled = least_squares.least_squares_pool(kernels, c_q, num_heads=heads, head_dim=d, target_kv_heads=1)["key"]
    # Brute force: J(W) = sum_s vec(K_s - W)^T (A_s kron C_k) vec(K_s - W), minimised in closed form.
    a, _ = least_squares.head_weights(kernels, c_q, num_heads=heads, head_dim=d, source_kv_heads=kv)
    keys = _heads(kernels["key"], d)
    hessian = sum(np.kron(a[s], c_k) for s in range(kv))
    rhs = sum(np.kron(a[s], c_k) @ keys[s].reshape(-1, order="F") for s in range(kv))
    brute = np.linalg.solve(hessian, rhs).reshape(emb, d, order="F")
    np.testing.assert_allclose(pooled, brute, atol=1e-5)  # up to the 1e-6 relative ridge

    def objective(w):
        return least_squares.logit_objective(kernels, w, c_q, c_k, num_heads=heads, head_dim=d)

    best = objective(pooled)
    assert best < objective(_group_mean(kernels["key"], d, 1))
    for _ in range(5):
        assert best <= objective(pooled + 1e-3 * rng.standard_normal(pooled.shape))


def test_logit_objective_is_the_sampled_squared_logit_change():
    rng = np.random.default_rng(4)
    emb, heads, d = 6, 2, 3
    kernels = _kernels(rng, emb, heads, d, 2)
    c_q, c_k = _spd(rng, emb), _spd(rng, emb)
    pooled = _group_mean(kernels["key"], d, 1)
    n = 200_000
    x_q = rng.multivariate_normal(np.zeros(emb), c_q, size=n)
    x_k = rng.multivariate_normal(np.zeros(emb), c_k, size=n)
    sampled = 0.0
    for h in range(heads):
        q = x_q @ kernels["query"][:, h * d:(h + 1) * d]
        delta = x_k @ (kernels["key"][:, h * d:(h + 1) * d] - pooled)
        sampled += np.mean(np.sum(q * delta, axis=1) ** 2)
    expected = least_squares.logit_objective(kernels, pooled, c_q, c_k, num_heads=heads, head_dim=d)
    assert sampled == pytest.approx(expected, rel=0.03)


def test_lsq_value_kernel_minimises_the_change_after_the_out_projection():
    rng = np.random.default_rng(5)
    emb, heads, d, kv = 6, 4, 2, 2  # a source that is already GQA-2: two query heads per kv head
    kernels = _kernels(rng, emb, heads, d, kv)
    pooled = least_squares.least_squares_pool(kernels, np.eye(emb), num_heads=heads, head_dim=d,
                                              target_kv_heads=1)["value"]
    values, outs = _heads(kernels["value"], d), [kernels["out"][h * d:(h + 1) * d] for h in range(heads)]

    def error(w):  # sum_h ||(V_s(h) - W) O_h||_F^2
        return sum(np.sum(((values[h // 2] - w) @ outs[h]) ** 2) for h in range(heads))

    assert error(pooled) < error(_group_mean(kernels["value"], d, 1))
    for _ in range(5):
        assert error(pooled) <= error(pooled + 1e-3 * rng.standard_normal(pooled.shape))


def test_lsq_keeps_a_group_of_one_head_unchanged():
    rng = np.random.default_rng(6)
    kernels = _kernels(rng)
    pooled = least_squares.least_squares_pool(kernels, _spd(rng, 12), num_heads=4, head_dim=3, target_kv_heads=4)
    np.testing.assert_allclose(pooled["key"], kernels["key"], atol=1e-9)
    np.testing.assert_allclose(pooled["value"], kernels["value"], atol=1e-9)


def test_lsq_falls_back_to_the_mean_for_a_layer_whose_queries_never_fire():
    rng = np.random.default_rng(7)
    kernels = _kernels(rng)
    pooled = least_squares.least_squares_pool(kernels, np.zeros((12, 12)), num_heads=4, head_dim=3,
                                              target_kv_heads=2)
    np.testing.assert_allclose(pooled["key"], _group_mean(kernels["key"], 3, 2), atol=1e-9)


# ------------------------------------------------------- calibration statistics
def _batches(config, count=2):
    out = []
    for seed in range(count):
        enc, dec_in, tgt = tokens(seed, config.vocab_size, batch=3, enc_len=9, dec_len=7)
        out.append({"encoder_input_tokens": enc, "decoder_input_tokens": dec_in, "decoder_target_tokens": tgt})
    return out


@pytest.mark.slow
def test_collected_statistics_are_the_second_moments_of_the_layer_norm_outputs():
    from gqa_t5x.model import network

    config = tiny_config()
    params = random_params(config)
    batches = _batches(config)
    stats = calibration.collect_statistics(config, params, batches)
    assert "decoder/layers_1/encoder_decoder_attention" in stats and "encoder/layers_0/attention" in stats
    # Independently: the query inputs are the outputs of the pre-attention layer norms.
    model = network.Transformer(config)
    sums, count = 0.0, 0
    enc_sums, enc_count = 0.0, 0
    for b in batches:
        _, state = model.apply({"params": params}, b["encoder_input_tokens"], b["decoder_input_tokens"],
                               b["decoder_target_tokens"], enable_dropout=False, capture_intermediates=True,
                               mutable=["intermediates"])
        inter = state["intermediates"]
        x = np.asarray(inter["decoder"]["layers_1"]["pre_cross_attention_layer_norm"]["__call__"][0], np.float64)
        rows = x[b["decoder_target_tokens"] > 0]
        sums, count = sums + rows.T @ rows, count + len(rows)
        e = np.asarray(inter["encoder"]["layers_0"]["pre_attention_layer_norm"]["__call__"][0], np.float64)
        rows = e[b["encoder_input_tokens"] > 0]
        enc_sums, enc_count = enc_sums + rows.T @ rows, enc_count + len(rows)
    got = stats["decoder/layers_1/encoder_decoder_attention"]
    assert int(got[calibration.TOKENS]) == count == sum(int((b["decoder_target_tokens"] > 0).sum()) for b in batches)
    np.testing.assert_allclose(got[calibration.QUERY_SECOND_MOMENT], sums / count, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["encoder/layers_0/attention"][calibration.QUERY_SECOND_MOMENT],
                               enc_sums / enc_count, rtol=1e-5, atol=1e-6)


def test_statistics_round_trip_through_an_npz_file(tmp_path):
    stats = {"decoder/layers_0/self_attention": {calibration.QUERY_SECOND_MOMENT: np.eye(3),
                                                  calibration.TOKENS: np.asarray(7)}}
    path = calibration.save_statistics(tmp_path / "stats.npz", stats)
    back = calibration.load_statistics(path)
    np.testing.assert_array_equal(back["decoder/layers_0/self_attention"][calibration.QUERY_SECOND_MOMENT], np.eye(3))
    assert int(back["decoder/layers_0/self_attention"][calibration.TOKENS]) == 7
    with pytest.raises(ValueError, match=".npz"):
        calibration.save_statistics(tmp_path / "stats.json", stats)
    with pytest.raises(FileNotFoundError, match="collect_statistics"):
        calibration.load_statistics(tmp_path / "missing.npz")


# ------------------------------------------------------------- conversion
def _checkpoint(tmp_path, config, params):
    from gqa_t5x import checkpoints

    path = tmp_path / "mha"
    with checkpoints.CheckpointWriter(path, config, step=100) as writer:
        for key, value in param_tree.flatten(params).items():
            writer.write(key, np.asarray(value))
        writer.commit()
    return path


def test_lsq_converts_a_checkpoint_as_the_closed_form_on_each_layer(tmp_path):
    from gqa_t5x import checkpoints

    config = tiny_config()
    params = random_params(config)
    stats = calibration.collect_statistics(config, params, _batches(config))
    stats_path = calibration.save_statistics(tmp_path / "stats.npz", stats)
    source = _checkpoint(tmp_path, config, params)
    conversion.convert_checkpoint(source, tmp_path / "gqa", 2, method="lsq", calibration=str(stats_path),
                                  progress=False)
    got_config, got = checkpoints.load(tmp_path / "gqa")
    assert got_config.num_kv_heads == 2 and got_config.encoder_num_kv_heads == 4
    src, out = param_tree.flatten(params), param_tree.flatten(got)
    for prefix in ("decoder/layers_0/self_attention", "decoder/layers_1/encoder_decoder_attention"):
        kernels = {p: src[f"{prefix}/{p}/kernel"] for p in ("query", "key", "value", "out")}
        expected = least_squares.least_squares_pool(
            kernels, stats[prefix][calibration.QUERY_SECOND_MOMENT], num_heads=4, head_dim=8, target_kv_heads=2)
        for p in ("key", "value"):
            np.testing.assert_allclose(out[f"{prefix}/{p}/kernel"], expected[p], rtol=1e-5, atol=1e-6)
        for p in ("query", "out"):  # untouched
            np.testing.assert_array_equal(out[f"{prefix}/{p}/kernel"], src[f"{prefix}/{p}/kernel"])
    # In memory, with the statistics as a mapping, gives the same.
    _, in_memory = conversion.convert(config, params, 2, method="lsq", calibration=stats)
    for key, value in param_tree.flatten(in_memory).items():
        np.testing.assert_allclose(out[key], value, rtol=1e-6, atol=1e-7, err_msg=key)


def test_lsq_without_calibration_or_with_missing_layers_is_refused_before_writing(tmp_path):
    config = tiny_config()
    params = random_params(config)
    source = _checkpoint(tmp_path, config, params)
    assert conversion.get_method("lsq").needs_calibration and "lsq" in conversion.METHODS
    with pytest.raises(ValueError, match="needs calibration statistics"):
        conversion.convert_checkpoint(source, tmp_path / "a", 1, method="lsq", progress=False)
    stats = calibration.collect_statistics(config, params, _batches(config, 1))
    del stats["decoder/layers_1/self_attention"]
    with pytest.raises(ValueError, match="lack 1 converted layer"):
        conversion.convert_checkpoint(source, tmp_path / "b", 1, method="lsq", calibration=stats, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_cli_convert_with_calibration_flag_equals_the_api_and_without_it_is_a_usage_error(tmp_path, capsys):
    from gqa_t5x import checkpoints
    from gqa_t5x import cli

    config = tiny_config()
    params = random_params(config)
    stats_path = calibration.save_statistics(
        tmp_path / "stats.npz", calibration.collect_statistics(config, params, _batches(config, 1)))
    source = _checkpoint(tmp_path, config, params)
    base = ["convert", "--source", str(source), "--num_kv_heads", "1", "--method", "lsq", "--no_progress"]
    code = cli.main(base + ["--output", str(tmp_path / "flags"), "--calibration", str(stats_path)])
    assert code == 0, capsys.readouterr().err
    conversion.convert_checkpoint(source, tmp_path / "api", 1, method="lsq", calibration=str(stats_path),
                                  progress=False)
    _, by_flags = checkpoints.load(tmp_path / "flags")
    _, by_api = checkpoints.load(tmp_path / "api")
    for key, value in param_tree.flatten(by_api).items():
        np.testing.assert_array_equal(param_tree.flatten(by_flags)[key], value, err_msg=key)
    capsys.readouterr()
    code = cli.main(base + ["--output", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code != 0 and "needs calibration statistics" in err and "--calibration" in err
    assert not (tmp_path / "none").exists()
