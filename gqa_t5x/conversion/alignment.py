"""Orthogonal head alignment: the maths behind the `align` conversion method.

For any orthogonal R, S (d x d), an attention head computes the same function
after Q_h -> Q_h R, K_s -> K_s R (logits Q_h K_s^T unchanged) and
V_s -> V_s S, O_h -> S^T O_h (outputs A V_s O_h unchanged), where K_s, V_s are
the `[emb, d]` column blocks of kv head s and Q_h, O_h those of every query
head h reading it. T5 has no rotary embeddings, unscaled dot-product logits,
additive relative position biases and no biases, so this is exact.

`align_rotations` picks, per group of kv heads that will be merged, the
rotations that make the heads agree (generalised orthogonal Procrustes),
`rotate_heads` applies them, and `attention_error` measures how far a
converted layer's per-head bilinear maps are from the source's.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import threadpoolctl

# Generalised Procrustes: stop when a sweep improves the objective by less
# than this fraction of the total energy, or after this many sweeps.
_GPA_TOLERANCE = 1e-6
_GPA_MAX_SWEEPS = 30


def split_heads(kernel: np.ndarray, head_dim: int) -> np.ndarray:
    """[emb, n*head_dim] -> [emb, n, head_dim] (head-major columns)."""
    emb, width = kernel.shape
    return kernel.reshape(emb, width // head_dim, head_dim)


def _polar(m: np.ndarray) -> np.ndarray:
    """Orthogonal factor U V^T of m = U S V^T (batched over leading axes)."""
    u, _, vt = np.linalg.svd(m)
    return u @ vt


def _gpa(gram: np.ndarray, init: np.ndarray) -> tuple[np.ndarray, float]:
    """Generalised Procrustes on blocks X_i given their joint Gram matrix.

    Minimises sum_i ||X_i R_i - T||^2 with T = mean_j X_j R_j, alternating
    the mean and per-block Procrustes steps (neither can increase it).

    Args:
      gram: [n*d, n*d], X^T X for X = [X_0 | X_1 | ...] (block (i, j) is
        X_i^T X_j).
      init: [n, d, d] starting rotations.

    Returns:
      (rotations [n, d, d], objective).
    """
    n, d, _ = init.shape
    total = float(np.trace(gram))  # sum_i ||X_i||^2

    def step(rots: np.ndarray) -> tuple[np.ndarray, float]:
        # cross_i = X_i^T T = (1/n) sum_j X_i^T X_j R_j        # [n, d, d]
        cross = (gram @ rots.reshape(n * d, d)).reshape(n, d, d) / n
        # objective = sum ||X_i||^2 - n ||T||^2 = total - sum_i tr(R_i^T cross_i)
        return cross, total - float(np.einsum("iab,iab->", rots, cross))

    rots = np.array(init, dtype=np.float64)
    cross, best = step(rots)
    for _ in range(_GPA_MAX_SWEEPS):
        new = _polar(cross)
        new_cross, value = step(new)
        if value > best:  # only numerical noise can do this; keep the better
            break
        improvement = best - value
        rots, cross, best = new, new_cross, value
        if improvement <= _GPA_TOLERANCE * max(total, 1e-30):
            break
    return rots, best


def group_rotations(blocks: np.ndarray) -> np.ndarray:
    """Orthogonal R_i that make the blocks X_i R_i agree (generalised Procrustes).

    Starts from "rotate every block onto block 0"; if that local optimum is
    worse than plain averaging (the identity rotations), restarts from the
    identity, so the result is never worse than plain averaging in
    sum_i ||X_i R_i - mean||^2.

    Args:
      blocks: [n, emb, d] key (or value) heads of one group.

    Returns:
      [n, d, d] orthogonal matrices.
    """
    n, emb, d = blocks.shape
    if n == 1:
        return np.eye(d)[None]
    x = np.asarray(blocks, np.float64).transpose(1, 0, 2).reshape(emb, n * d)
    gram = x.T @ x  # [n*d, n*d]
    identity = np.broadcast_to(np.eye(d), (n, d, d))
    heads = x.reshape(emb, n, d)
    plain_mean = float(((heads - heads.mean(axis=1, keepdims=True)) ** 2).sum())
    # The sweeps are many tiny SVDs and GEMMs: BLAS threads only add overhead
    # (20x slower on a busy 2-core machine), so run them on one thread.
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        rots, value = _gpa(gram, _polar(gram[:, :d].reshape(n, d, d)))  # X_i onto X_0
        if value > plain_mean:
            rots, value = _gpa(gram, identity)
    return rots


def align_rotations(
    kernels: Mapping[str, np.ndarray], target_kv_heads: int, head_dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-kv-head key and value rotations that align the heads of each group.

    Args:
      kernels: 'key' and 'value' kernels `[emb, S*head_dim]`.
      target_kv_heads: G; groups are contiguous runs of S/G source kv heads.
      head_dim: Head width d.

    Returns:
      (key_rotations, value_rotations), each `[S, d, d]` orthogonal.
    """
    rotations = []
    for proj in ("key", "value"):
        heads = split_heads(np.asarray(kernels[proj], np.float64), head_dim)  # [emb, S, d]
        n = heads.shape[1] // target_kv_heads
        per_group = [
            group_rotations(heads[:, g * n : (g + 1) * n, :].transpose(1, 0, 2))
            for g in range(target_kv_heads)
        ]
        rotations.append(np.concatenate(per_group, axis=0))
    return rotations[0], rotations[1]


def rotate_heads(
    kernels: Mapping[str, np.ndarray],
    key_rotations: np.ndarray,
    value_rotations: np.ndarray,
    head_dim: int,
) -> dict[str, np.ndarray]:
    """Applies per-kv-head orthogonal rotations; the layer's function is unchanged.

    Key head s: K_s -> K_s R_s and Q_h -> Q_h R_s for every query head h reading
    s, so Q_h K_s^T is unchanged. Value head s: V_s -> V_s S_s and
    O_h -> S_s^T O_h, so V_s O_h is unchanged.

    Args:
      kernels: 'query' `[emb, H*d]`, 'key'/'value' `[emb, S*d]`, 'out' `[H*d, emb]`.
      key_rotations: `[S, d, d]` orthogonal.
      value_rotations: `[S, d, d]` orthogonal.
      head_dim: d.

    Returns:
      The rotated kernels in float64.
    """
    query = split_heads(np.asarray(kernels["query"], np.float64), head_dim)  # [emb, H, d]
    key = split_heads(np.asarray(kernels["key"], np.float64), head_dim)  # [emb, S, d]
    value = split_heads(np.asarray(kernels["value"], np.float64), head_dim)  # [emb, S, d]
    out = np.asarray(kernels["out"], np.float64)
    num_heads, num_kv = query.shape[1], key.shape[1]
    out = out.reshape(num_heads, head_dim, out.shape[-1])  # [H, d, emb]
    kv_of_head = np.arange(num_heads) // (num_heads // num_kv)  # [H]
    emb = key.shape[0]

    def right(heads: np.ndarray, rots: np.ndarray) -> np.ndarray:
        # [emb, n, d] x [n, d, d] -> [emb, n*d], as a batched matmul over heads.
        return np.matmul(heads.transpose(1, 0, 2), rots).transpose(1, 0, 2).reshape(emb, -1)

    return {
        "query": right(query, key_rotations[kv_of_head]),
        "key": right(key, key_rotations),
        "value": right(value, value_rotations),
        # O_h -> S_s^T O_h: [H, d, d]^T x [H, d, emb]
        "out": np.matmul(value_rotations[kv_of_head].transpose(0, 2, 1), out).reshape(
            num_heads * head_dim, -1
        ),
    }


def attention_error(
    source: Mapping[str, np.ndarray],
    converted: Mapping[str, np.ndarray],
    *,
    num_heads: int,
    head_dim: int,
) -> dict[str, float]:
    """Relative error of a converted layer's per-head bilinear maps (data-free).

    For query head h reading kv head s, the layer computes with the matrices
    W_qk^h = Q_h K_s^T (attention logits) and W_ov^h = V_s O_h (value -> output).
    This returns sum_h ||W^h_src - W^h_conv||_F^2 / sum_h ||W^h_src||_F^2 for
    both, computed with d x d Gram matrices.

    Args:
      source: The layer's 'query', 'key', 'value', 'out' kernels before.
      converted: The same after conversion (kv kernels with fewer heads).
      num_heads: H.
      head_dim: d.

    Returns:
      {'qk': relative error of the logit maps, 'ov': of the value-output maps}.
    """

    def per_head(kern: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        q = split_heads(np.asarray(kern["query"], np.float64), head_dim)  # [emb, H, d]
        k = split_heads(np.asarray(kern["key"], np.float64), head_dim)  # [emb, S, d]
        v = split_heads(np.asarray(kern["value"], np.float64), head_dim)
        o = np.asarray(kern["out"], np.float64).reshape(num_heads, head_dim, -1)
        kv = np.arange(num_heads) // (num_heads // k.shape[1])
        # Each map is A_h B_h^T with A, B: [emb, H, d].
        return q, k[:, kv], v[:, kv], o.transpose(2, 0, 1)

    def rel(a1, b1, a2, b2) -> float:
        def cross(a, b, c, e):  # sum_h tr(a_h^T c_h  e_h^T b_h) = sum_h <a_h b_h^T, c_h e_h^T>
            return np.einsum("ehx,ehy,fhy,fhx->", a, c, e, b, optimize=True)

        ref = cross(a1, b1, a1, b1)
        diff = ref - 2 * cross(a1, b1, a2, b2) + cross(a2, b2, a2, b2)
        return float(max(diff, 0.0) / ref)

    q1, k1, v1, o1 = per_head(source)
    q2, k2, v2, o2 = per_head(converted)
    return {"qk": rel(q1, k1, q2, k2), "ov": rel(v1, o1, v2, o2)}
