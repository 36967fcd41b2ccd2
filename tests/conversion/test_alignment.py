"""`conversion.alignment`: the orthogonal head alignment behind the `align` method.

Expectations come from hand-made cases (sign flips, a 90 degree rotation),
from heads built as exact rotated copies of each other (where the right
rotations are known), and from re-deriving every per-head bilinear map
Q_h K_s^T and V_s O_h explicitly with numpy.
"""

from __future__ import annotations

import numpy as np
import pytest

from gqa_t5x.conversion import alignment


def _orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _assert_orthogonal(rots: np.ndarray) -> None:
    d = rots.shape[-1]
    for r in rots:
        np.testing.assert_allclose(r.T @ r, np.eye(d), atol=1e-10)


def _dispersion(blocks: np.ndarray, rots: np.ndarray) -> float:
    """sum_i ||X_i R_i - mean_j X_j R_j||^2 (what plain averaging loses)."""
    aligned = np.stack([x @ r for x, r in zip(blocks, rots)])
    return float(((aligned - aligned.mean(axis=0)) ** 2).sum())


def _maps(kernels: dict, num_heads: int, d: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per query head h: Q_h K_s^T and V_s O_h, with s the kv head h reads."""
    q, k, v, o = (np.asarray(kernels[p], np.float64) for p in ("query", "key", "value", "out"))
    kv_heads = k.shape[1] // d
    qk, ov = [], []
    for h in range(num_heads):
        s = h // (num_heads // kv_heads)
        qh, oh = q[:, h * d:(h + 1) * d], o[h * d:(h + 1) * d, :]
        ks, vs = k[:, s * d:(s + 1) * d], v[:, s * d:(s + 1) * d]
        qk.append(qh @ ks.T)
        ov.append(vs @ oh)
    return qk, ov


def _relative(src: list[np.ndarray], conv: list[np.ndarray]) -> float:
    return sum(np.sum((a - b) ** 2) for a, b in zip(src, conv)) / sum(np.sum(a ** 2) for a in src)


def _layer(rng, emb=12, heads=4, kv=4, d=3) -> dict[str, np.ndarray]:
    return {"query": rng.standard_normal((emb, heads * d)), "key": rng.standard_normal((emb, kv * d)),
            "value": rng.standard_normal((emb, kv * d)), "out": rng.standard_normal((heads * d, emb))}


# ------------------------------------------------------------------ split_heads
def test_split_heads_is_head_major_column_blocks():
    kernel = np.arange(2 * 6).reshape(2, 6)  # emb 2, 3 heads of 2
    heads = alignment.split_heads(kernel, 2)
    assert heads.shape == (2, 3, 2)
    for h in range(3):
        np.testing.assert_array_equal(heads[:, h, :], kernel[:, 2 * h:2 * h + 2])


# ------------------------------------------------------------- group_rotations
def test_a_single_head_group_gets_the_identity():
    blocks = np.random.default_rng(0).standard_normal((1, 5, 3))
    np.testing.assert_array_equal(alignment.group_rotations(blocks), np.eye(3)[None])


def test_opposite_one_dimensional_heads_are_flipped_so_their_mean_is_lossless():
    # d = 1: the only rotations are +1 and -1. Heads v and -v average to 0
    # without alignment; aligned, one of them is flipped and they agree.
    v = np.array([[1.0], [2.0], [-3.0]])
    blocks = np.stack([v, -v])
    rots = alignment.group_rotations(blocks)
    assert rots.shape == (2, 1, 1)
    assert sorted(np.round(rots.ravel(), 12).tolist()) == [-1.0, 1.0]
    aligned = [blocks[i] @ rots[i] for i in range(2)]
    np.testing.assert_allclose(aligned[0], aligned[1], atol=1e-12)
    assert _dispersion(blocks, np.ones((2, 1, 1))) == pytest.approx(2 * 14.0)  # ||v||^2 = 14 each
    assert _dispersion(blocks, rots) == pytest.approx(0.0, abs=1e-20)


def test_a_quarter_turn_between_two_heads_is_undone():
    # Head 1 is head 0 turned by 90 degrees: X_1 = X_0 J with J = [[0, -1], [1, 0]].
    x0 = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    turn = np.array([[0.0, -1.0], [1.0, 0.0]])
    rots = alignment.group_rotations(np.stack([x0, x0 @ turn]))
    _assert_orthogonal(rots)
    # X_0 R_0 = X_1 R_1 = X_0 J R_1  =>  J R_1 R_0^T = I  =>  R_1 R_0^T = J^T.
    np.testing.assert_allclose(rots[1] @ rots[0].T, turn.T, atol=1e-9)
    np.testing.assert_allclose(x0 @ rots[0], x0 @ turn @ rots[1], atol=1e-9)


def test_exact_rotated_copies_recover_the_rotations_and_pool_losslessly():
    rng = np.random.default_rng(1)
    n, emb, d = 4, 20, 5
    x0 = rng.standard_normal((emb, d))
    truth = [np.eye(d)] + [_orthogonal(rng, d) for _ in range(n - 1)]
    blocks = np.stack([x0 @ q for q in truth])
    rots = alignment.group_rotations(blocks)
    assert rots.shape == (n, d, d)
    _assert_orthogonal(rots)
    # Aligned heads agree (so their mean loses nothing) ...
    aligned = np.stack([b @ r for b, r in zip(blocks, rots)])
    np.testing.assert_allclose(aligned, np.broadcast_to(aligned[0], aligned.shape), atol=1e-8)
    assert _dispersion(blocks, rots) < 1e-12 * (blocks ** 2).sum()
    # ... and each rotation relative to head 0's undoes the one it was built with.
    for q, r in zip(truth, rots):
        np.testing.assert_allclose(r @ rots[0].T, q.T, atol=1e-8)


def test_rotations_are_orthogonal_and_never_worse_than_plain_averaging_on_random_heads():
    rng = np.random.default_rng(2)
    for n, emb, d in ((2, 8, 3), (3, 16, 4), (4, 6, 6)):  # emb == d: a square case too
        blocks = rng.standard_normal((n, emb, d))
        rots = alignment.group_rotations(blocks)
        _assert_orthogonal(rots)
        identity = np.broadcast_to(np.eye(d), (n, d, d))
        assert _dispersion(blocks, rots) <= _dispersion(blocks, identity) + 1e-9


def test_noisy_rotated_copies_align_close_to_the_noise_level():
    rng = np.random.default_rng(3)
    n, emb, d, noise = 3, 40, 4, 1e-3
    x0 = rng.standard_normal((emb, d))
    blocks = np.stack([x0 @ _orthogonal(rng, d) + noise * rng.standard_normal((emb, d)) for _ in range(n)])
    rots = alignment.group_rotations(blocks)
    plain = _dispersion(blocks, np.broadcast_to(np.eye(d), (n, d, d)))
    # Noise energy is about n * emb * d * noise^2 = 4.8e-4; plain averaging loses O(n * ||x0||^2).
    assert _dispersion(blocks, rots) < 1e-3 < 0.1 * plain


# ------------------------------------------------------------- align_rotations
def test_align_rotations_treats_contiguous_groups_separately():
    rng = np.random.default_rng(4)
    emb, d = 10, 3
    a, b = rng.standard_normal((emb, d)), rng.standard_normal((emb, d))
    qa, qb, sa, sb = (_orthogonal(rng, d) for _ in range(4))
    # kv heads 0,1 (group 0) are rotated copies of a; heads 2,3 (group 1) of b.
    key = np.concatenate([a, a @ qa, b, b @ qb], axis=1)
    value = np.concatenate([b, b @ sa, a, a @ sb], axis=1)
    key_rot, value_rot = alignment.align_rotations({"key": key, "value": value}, 2, d)
    assert key_rot.shape == value_rot.shape == (4, d, d)
    _assert_orthogonal(key_rot)
    _assert_orthogonal(value_rot)
    for rots, kernel in ((key_rot, key), (value_rot, value)):
        heads = [kernel[:, s * d:(s + 1) * d] @ rots[s] for s in range(4)]
        np.testing.assert_allclose(heads[0], heads[1], atol=1e-8)
        np.testing.assert_allclose(heads[2], heads[3], atol=1e-8)
    np.testing.assert_allclose(key_rot[1] @ key_rot[0].T, qa.T, atol=1e-8)
    np.testing.assert_allclose(value_rot[3] @ value_rot[2].T, sb.T, atol=1e-8)


def test_align_rotations_are_identities_when_nothing_is_merged():
    kernels = _layer(np.random.default_rng(5))
    key_rot, value_rot = alignment.align_rotations(kernels, 4, 3)
    np.testing.assert_array_equal(key_rot, np.broadcast_to(np.eye(3), (4, 3, 3)))
    np.testing.assert_array_equal(value_rot, np.broadcast_to(np.eye(3), (4, 3, 3)))


# ---------------------------------------------------------------- rotate_heads
@pytest.mark.parametrize("kv", [4, 2, 1])
def test_rotate_heads_leaves_every_heads_logit_and_output_maps_unchanged(kv):
    rng = np.random.default_rng(6)
    heads, d = 4, 3
    kernels = _layer(rng, heads=heads, kv=kv, d=d)
    key_rot = np.stack([_orthogonal(rng, d) for _ in range(kv)])
    value_rot = np.stack([_orthogonal(rng, d) for _ in range(kv)])
    rotated = alignment.rotate_heads(kernels, key_rot, value_rot, d)
    assert {p: rotated[p].shape for p in rotated} == {p: kernels[p].shape for p in kernels}
    src_qk, src_ov = _maps(kernels, heads, d)
    new_qk, new_ov = _maps(rotated, heads, d)
    for a, b in zip(src_qk + src_ov, new_qk + new_ov):
        np.testing.assert_allclose(a, b, atol=1e-10)
    # The kernels themselves did change (the rotations are not identities).
    assert not np.allclose(rotated["key"], kernels["key"])


def test_rotate_heads_rotates_each_query_head_with_the_key_rotation_of_its_group():
    rng = np.random.default_rng(7)
    d = 2
    kernels = _layer(rng, emb=5, heads=4, kv=2, d=d)
    key_rot = np.stack([_orthogonal(rng, d) for _ in range(2)])
    value_rot = np.stack([_orthogonal(rng, d) for _ in range(2)])
    rotated = alignment.rotate_heads(kernels, key_rot, value_rot, d)
    q, o = kernels["query"], kernels["out"]
    for h, s in ((0, 0), (1, 0), (2, 1), (3, 1)):  # query heads 0,1 read kv head 0; 2,3 read 1
        np.testing.assert_allclose(rotated["query"][:, h * d:(h + 1) * d], q[:, h * d:(h + 1) * d] @ key_rot[s])
        np.testing.assert_allclose(rotated["out"][h * d:(h + 1) * d], value_rot[s].T @ o[h * d:(h + 1) * d])
    for s in range(2):
        np.testing.assert_allclose(rotated["key"][:, s * d:(s + 1) * d], kernels["key"][:, s * d:(s + 1) * d] @ key_rot[s])
        np.testing.assert_allclose(rotated["value"][:, s * d:(s + 1) * d],
                                   kernels["value"][:, s * d:(s + 1) * d] @ value_rot[s])


# ------------------------------------------------------------- attention_error
def _mean_pool(kernel: np.ndarray, d: int, groups: int) -> np.ndarray:
    emb, width = kernel.shape
    return kernel.reshape(emb, groups, width // d // groups, d).mean(axis=2).reshape(emb, groups * d)


def test_attention_error_is_zero_for_an_unchanged_or_merely_rotated_layer():
    rng = np.random.default_rng(8)
    kernels = _layer(rng)
    assert alignment.attention_error(kernels, kernels, num_heads=4, head_dim=3) == pytest.approx(
        {"qk": 0.0, "ov": 0.0}, abs=1e-12)
    rots = np.stack([_orthogonal(rng, 3) for _ in range(4)])
    rotated = alignment.rotate_heads(kernels, rots, rots[::-1], 3)
    assert alignment.attention_error(kernels, rotated, num_heads=4, head_dim=3) == pytest.approx(
        {"qk": 0.0, "ov": 0.0}, abs=1e-12)


@pytest.mark.parametrize("groups", [1, 2])
def test_attention_error_equals_the_explicit_per_head_map_error(groups):
    rng = np.random.default_rng(9)
    d = 3
    kernels = _layer(rng, emb=7, heads=4, kv=4, d=d)
    converted = dict(kernels, key=_mean_pool(kernels["key"], d, groups),
                     value=_mean_pool(kernels["value"], d, groups))
    got = alignment.attention_error(kernels, converted, num_heads=4, head_dim=d)
    src_qk, src_ov = _maps(kernels, 4, d)
    new_qk, new_ov = _maps(converted, 4, d)
    assert got["qk"] == pytest.approx(_relative(src_qk, new_qk), rel=1e-9)
    assert got["ov"] == pytest.approx(_relative(src_ov, new_ov), rel=1e-9)
    assert 0.1 < got["qk"] < 2 and 0.1 < got["ov"] < 2  # random heads: mean pooling is lossy


def test_attention_error_of_a_zeroed_layer_is_one():
    kernels = _layer(np.random.default_rng(10))
    zero = {p: np.zeros_like(v) for p, v in kernels.items()}
    assert alignment.attention_error(kernels, zero, num_heads=4, head_dim=3) == pytest.approx({"qk": 1.0, "ov": 1.0})


def test_aligning_rotated_copies_then_mean_pooling_is_lossless_while_plain_mean_is_not():
    rng = np.random.default_rng(11)
    emb, heads, d = 16, 4, 4
    q0, k0, v0, o0 = (rng.standard_normal(s) for s in ((emb, d), (emb, d), (emb, d), (d, emb)))
    rs = [_orthogonal(rng, d) for _ in range(heads)]
    ss = [_orthogonal(rng, d) for _ in range(heads)]
    kernels = {"query": np.concatenate([q0 @ r for r in rs], 1), "key": np.concatenate([k0 @ r for r in rs], 1),
               "value": np.concatenate([v0 @ s for s in ss], 1), "out": np.concatenate([s.T @ o0 for s in ss], 0)}
    for groups in (1, 2):
        key_rot, value_rot = alignment.align_rotations(kernels, groups, d)
        rotated = alignment.rotate_heads(kernels, key_rot, value_rot, d)
        aligned = dict(rotated, key=_mean_pool(rotated["key"], d, groups), value=_mean_pool(rotated["value"], d, groups))
        plain = dict(kernels, key=_mean_pool(kernels["key"], d, groups), value=_mean_pool(kernels["value"], d, groups))
        aligned_err = alignment.attention_error(kernels, aligned, num_heads=heads, head_dim=d)
        plain_err = alignment.attention_error(kernels, plain, num_heads=heads, head_dim=d)
        assert aligned_err["qk"] < 1e-12 and aligned_err["ov"] < 1e-12, groups
        assert plain_err["qk"] > 0.05 and plain_err["ov"] > 0.05, groups
