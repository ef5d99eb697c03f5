"""k-reciprocal re-ranking (Zhong et al. 2017) as PaddleClas computes it (`Global.re_ranking`).

It works on full (Q+G) x (Q+G) matrices in host memory, so it is meant for sets of up to a few
ten thousand items.
"""

from __future__ import annotations

import numpy as np

from jaxrec.evaluation import metrics as metrics_lib


def reranked_stats(qf, ql, gf, gl, qi, gi, topk) -> metrics_lib.PerQuery:
    """Per-query statistics from the re-ranked distance, evaluated as one block."""
    dist = re_ranking_distance(qf, gf, k1=20, k2=6, lambda_value=0.3)
    rel = ql[:, None] == gl[None, :]
    if qi is not None:
        keep = (ql[:, None] != gl[None, :]) | (qi[:, None] != gi[None, :])
        dist = np.where(keep, dist, dist.max() + 1)
        rel &= keep
    order = np.argsort(dist, axis=1, kind="stable")
    return metrics_lib.PerQuery.from_relevance(np.take_along_axis(rel, order, axis=1), topk)


def re_ranking_distance(
    query_feats: np.ndarray,
    gallery_feats: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    feature_normed: bool = True,
) -> np.ndarray:
    """k-reciprocal re-ranking distance (Zhong et al. 2017) as PaddleClas computes it (ref §8.5).

    Works on the full (Q+G) x (Q+G) matrices in host memory, so it is meant for sets of up to a
    few ten thousand items. The encoding V and the Jaccard distance are kept in float16 as in
    the reference. Returns the [Q, G] fused distance ``(1-lambda) * jaccard + lambda * d``.
    """
    qf = np.asarray(query_feats, np.float32)
    gf = np.asarray(gallery_feats, np.float32)
    nq = qf.shape[0]
    feats = np.concatenate([qf, gf])
    n = feats.shape[0]
    if n <= k1:
        raise ValueError(f"re-ranking needs more than k1={k1} items in query+gallery, got {n}")
    if feature_normed:
        dist = 2.0 - 2.0 * (feats @ feats.T)
    else:
        sq = np.sum(feats * feats, axis=1, keepdims=True)
        dist = sq + sq.T - 2.0 * (feats @ feats.T)
    dist = np.transpose(dist / np.max(dist, axis=0))
    rank = np.argpartition(dist, range(1, k1 + 1))
    v = np.zeros((n, n), np.float16)
    half = int(np.around(k1 / 2))

    def reciprocal(p: int, k: int) -> np.ndarray:
        forward = rank[p, : k + 1]
        back = rank[forward, : k + 1]
        return forward[np.nonzero(back == p)[0]]

    for p in range(n):
        r_p = reciprocal(p, k1)
        expanded = [r_p]
        for q in r_p:
            r_q = reciprocal(q, half)
            if np.intersect1d(r_p, r_q, assume_unique=True).size > 2 / 3 * r_q.size:
                expanded.append(r_q)
        members = np.unique(np.concatenate(expanded))
        w = np.exp(-dist[p, members])
        v[p, members] = w / np.sum(w)
    dist_q = dist[:nq]
    if k2 > 1:
        v_qe = np.zeros_like(v)
        for i in range(n):
            v_qe[i] = np.mean(v[rank[i, :k2]], axis=0)
        v = v_qe
    holders = [np.nonzero(v[:, j])[0] for j in range(n)]
    jaccard = np.zeros((nq, n), np.float16)
    for p in range(nq):
        sum_min = np.zeros((1, n), np.float16)
        for j in np.nonzero(v[p])[0]:
            rows = holders[j]
            sum_min[0, rows] += np.minimum(v[p, j], v[rows, j])
        jaccard[p] = 1 - sum_min / (2 - sum_min)
    final = (1 - lambda_value) * jaccard + lambda_value * dist_q
    return final[:, nq:]
