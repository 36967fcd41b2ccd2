"""Least-squares pooling: the maths behind the `lsq` conversion method.

Mean pooling treats every key (value) head of a group alike. `lsq` instead
picks the pooled kernel that changes the layer's computation least, in
expectation over real inputs.

Keys. Query head h reads kv head s; its logits are q_h . k_s with
q_h = x_q Q_h and k_s = x_k K_s (Q_h, K_s the `[emb, d]` blocks of the
kernels). Replacing every K_s of group g by one W changes them by
x_q Q_h (K_s - W)^T x_k^T. With x_q and x_k independent, second moments
C_q = E[x_q^T x_q] and C_k = E[x_k^T x_k], the expected squared change summed
over the heads of the group is

    J(W) = sum_s tr( (K_s - W)^T C_k (K_s - W) A_s ),
    A_s  = sum_{h reads s} Q_h^T C_q Q_h                      ([d, d]).

Setting the gradient to zero, C_k sum_s (W - K_s) A_s = 0, so for any
invertible C_k

    W = (sum_s K_s A_s) (sum_s A_s)^-1.

Only the query side's statistics enter (from calibration data, see
`calibration.py`).

Values. Head h adds a_h x_v V_s O_h to the layer's output (a_h its attention
weights, O_h the `[d, emb]` block of the out kernel). Holding the attention
weights fixed and summing the per-head errors, the same algebra gives

    W = (sum_s V_s B_s) (sum_s B_s)^-1,   B_s = sum_{h reads s} O_h O_h^T,

which needs no data.

When every A_s (B_s) is the same matrix, for instance isotropic inputs
(C_q = I) and query heads with equal Gram matrices Q_h^T Q_h, both reduce to
the plain mean; with one source head per group they return it unchanged.
A ridge of `RIDGE` times the average eigenvalue pulls towards the plain mean
when sum_s A_s is (nearly) singular.
"""

from __future__ import annotations

import numpy as np

from gqa_t5x.conversion.alignment import split_heads

# Relative ridge towards the plain mean: lambda = RIDGE * trace(sum A) / d.
RIDGE = 1e-6


def pooled_heads(heads: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(sum_s X_s M_s)(sum_s M_s)^-1 for one group, with a ridge to the mean.

    Args:
      heads: `[n, emb, d]` the group's key (or value) heads X_s.
      weights: `[n, d, d]` symmetric positive semi-definite M_s.

    Returns:
      `[emb, d]` the pooled head.
    """
    heads = np.asarray(heads, np.float64)
    weights = np.asarray(weights, np.float64)
    n, _, d = heads.shape
    if weights.shape != (n, d, d):
        raise ValueError(f"weights must be [{n}, {d}, {d}] for heads {heads.shape}; got {weights.shape}.")
    total = weights.sum(axis=0)
    ridge = RIDGE * max(float(np.trace(total)) / d, 1e-30)
    # sum_s X_s (M_s + ridge/n I) = W (sum_s M_s + ridge I); the matrix is symmetric.
    numerator = np.einsum("sed,sdf->ef", heads, weights + (ridge / n) * np.eye(d))
    return np.linalg.solve(total + ridge * np.eye(d), numerator.T).T


def head_weights(
    kernels: dict[str, np.ndarray],
    query_second_moment: np.ndarray,
    *,
    num_heads: int,
    head_dim: int,
    source_kv_heads: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The per-source-head weight matrices A_s (keys) and B_s (values).

    Args:
      kernels: 'query' `[emb, H*d]` and 'out' `[H*d, emb]`.
      query_second_moment: C_q `[emb, emb]`, E[x^T x] of the query projection's
        inputs.
      num_heads: H.
      head_dim: d.
      source_kv_heads: S; query head h reads kv head h // (H/S).

    Returns:
      (A `[S, d, d]`, B `[S, d, d]`).
    """
    query = split_heads(np.asarray(kernels["query"], np.float64), head_dim)  # [emb, H, d]
    out = np.asarray(kernels["out"], np.float64).reshape(num_heads, head_dim, -1)  # [H, d, emb]
    c_q = np.asarray(query_second_moment, np.float64)
    emb = query.shape[0]
    if c_q.shape != (emb, emb):
        raise ValueError(f"The query second moment must be [{emb}, {emb}]; got {c_q.shape}.")
    per_query_a = np.einsum("ehd,ef,hfk->hdk", query, c_q, query.transpose(1, 0, 2))  # Q_h^T C Q_h
    per_query_b = np.einsum("hde,hke->hdk", out, out)  # O_h O_h^T
    group = num_heads // source_kv_heads
    a = per_query_a.reshape(source_kv_heads, group, head_dim, head_dim).sum(axis=1)
    b = per_query_b.reshape(source_kv_heads, group, head_dim, head_dim).sum(axis=1)
    return a, b


def least_squares_pool(
    kernels: dict[str, np.ndarray],
    query_second_moment: np.ndarray,
    *,
    num_heads: int,
    head_dim: int,
    target_kv_heads: int,
) -> dict[str, np.ndarray]:
    """Pooled key and value kernels of one layer (contiguous groups).

    Args:
      kernels: 'query' `[emb, H*d]`, 'key'/'value' `[emb, S*d]`, 'out' `[H*d, emb]`.
      query_second_moment: C_q `[emb, emb]`.
      num_heads: H.
      head_dim: d.
      target_kv_heads: G, a divisor of S.

    Returns:
      {'key': `[emb, G*d]`, 'value': `[emb, G*d]`} in float64.
    """
    key = split_heads(np.asarray(kernels["key"], np.float64), head_dim)  # [emb, S, d]
    value = split_heads(np.asarray(kernels["value"], np.float64), head_dim)
    source = key.shape[1]
    a, b = head_weights(kernels, query_second_moment, num_heads=num_heads, head_dim=head_dim,
                        source_kv_heads=source)
    n = source // target_kv_heads
    out = {}
    for name, heads, weights in (("key", key, a), ("value", value, b)):
        pooled = [
            pooled_heads(heads[:, g * n:(g + 1) * n].transpose(1, 0, 2), weights[g * n:(g + 1) * n])
            for g in range(target_kv_heads)
        ]
        out[name] = np.concatenate(pooled, axis=1)  # [emb, G*d]
    return out


def logit_objective(
    kernels: dict[str, np.ndarray],
    pooled_key: np.ndarray,
    query_second_moment: np.ndarray,
    key_second_moment: np.ndarray,
    *,
    num_heads: int,
    head_dim: int,
) -> float:
    """J: the expected squared change of every head's logits (independent x_q, x_k).

    Args:
      kernels: 'query' `[emb, H*d]` and 'key' `[emb, S*d]` of the source.
      pooled_key: `[emb, G*d]` the converted key kernel.
      query_second_moment: C_q `[emb, emb]`.
      key_second_moment: C_k `[emb, emb]`.
      num_heads: H.
      head_dim: d.

    Returns:
      sum_h tr((K_s(h) - W_g(h))^T C_k (K_s(h) - W_g(h)) Q_h^T C_q Q_h).
    """
    query = split_heads(np.asarray(kernels["query"], np.float64), head_dim)
    key = split_heads(np.asarray(kernels["key"], np.float64), head_dim)
    pooled = split_heads(np.asarray(pooled_key, np.float64), head_dim)
    total = 0.0
    for h in range(num_heads):
        s = h // (num_heads // key.shape[1])
        g = h // (num_heads // pooled.shape[1])
        delta = key[:, s] - pooled[:, g]
        a = query[:, h].T @ query_second_moment @ query[:, h]
        total += float(np.trace(delta.T @ key_second_moment @ delta @ a))
    return total
