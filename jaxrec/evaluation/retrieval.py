"""Exact, memory-bounded retrieval metrics on device, with PaddleClas semantics.

How :func:`retrieval_metrics` stays exact without the [Q, G] matrix:
every metric (Recall@k, mAP, mINP, Precision@k) is a function of the ranks of each query's
relevant gallery items. For a block of queries the device computes the similarities to the
whole gallery (``[block, G]``, cosine for L2-normalized features), applies the exclusion
(similarity set to 0 where label and id both match, ref §8.3), and counts for every relevant
item how many gallery items rank above it. An item ``g`` ranks above a relevant item ``j`` when
``s_g > s_j``, or ``s_g == s_j`` and ``g < j``: the stable-sort tie rule of
:mod:`jaxrec.evaluation.metrics`. Only the ``[block, M]`` rank matrix (M = most relevant items
of a query in the block) returns to the host, which turns it into per-query statistics and
aggregates them
with :func:`jaxrec.evaluation.metrics.aggregate` (PaddleClas block weighting by default).

With several devices the gallery is sharded over a 1-D ``"data"`` mesh; each device counts on
its shard and the counts are summed with ``psum``. The cost is ``O(Q * G * (D + M))``; memory
is ``O(block * G / devices)`` on device plus the features.

The jitted kernels are cached per (mesh, shapes), so repeated evaluations of a run (one per
epoch) compile them once.
"""

from __future__ import annotations

import collections
import functools
import math
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrec.evaluation import metrics as metrics_lib
from jaxrec.evaluation.rerank import reranked_stats
from jaxrec.ops import l2_normalize
from jaxrec.parallel import AXIS as DATA_AXIS
from jaxrec.parallel import make_mesh


def _as_1d(x, name: str, n: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}] (or [{n}, 1]), got {x.shape}")
    if x.dtype.kind not in "iub":
        raise ValueError(f"{name} must be integers, got dtype {x.dtype}")
    return x.astype(np.int64)


def _dense_codes(*arrays: np.ndarray) -> list[np.ndarray]:
    """Map int64 values (labels or ids) jointly to dense int32 codes (device-friendly)."""
    joint = np.concatenate(arrays)
    _, codes = np.unique(joint, return_inverse=True)
    out, start = [], 0
    for a in arrays:
        out.append(codes[start : start + a.size].astype(np.int32))
        start += a.size
    return out


def _bucket(m: int) -> int:
    return max(4, 1 << max(0, math.ceil(math.log2(max(m, 1)))))


class _PositiveFinder:
    """Relevant gallery items per query, from a label-sorted gallery (host side)."""

    def __init__(self, gallery_labels: np.ndarray, gallery_ids: np.ndarray | None) -> None:
        self.order = np.argsort(gallery_labels, kind="stable").astype(np.int32)
        uniq, starts, counts = np.unique(
            gallery_labels[self.order], return_index=True, return_counts=True
        )
        self.uniq, self.starts, self.counts = uniq, starts, counts
        self.gallery_ids = gallery_ids

    def _lookup(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.minimum(np.searchsorted(self.uniq, labels), self.uniq.size - 1)
        count = np.where(self.uniq[pos] == labels, self.counts[pos], 0)
        return pos, count

    def num_same_label(self, labels: np.ndarray) -> np.ndarray:
        return self._lookup(labels)[1]

    def __call__(self, labels: np.ndarray, ids: np.ndarray | None) -> np.ndarray:
        """[B, M] global gallery indices of relevant items, -1 padded (M a power of two)."""
        pos, count = self._lookup(labels)
        width = _bucket(int(count.max(initial=0)))
        j = np.arange(width)[None, :]
        idx = self.order[np.minimum(self.starts[pos][:, None] + j, self.order.size - 1)]
        ok = j < count[:, None]
        if ids is not None:
            ok &= self.gallery_ids[idx] != ids[:, None]
        return np.where(ok, idx, -1).astype(np.int32)


def _varying(x: jax.Array) -> jax.Array:
    """Mark a replicated value as device-varying (the loop carry becomes per-device)."""
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, (DATA_AXIS,), to="varying")
    return jax.lax.pvary(x, (DATA_AXIS,))


@functools.lru_cache(maxsize=32)
def _rank_block_fn(mesh: Mesh, has_ids: bool, drop_excluded: bool = False):
    """Jitted (query block, relevant indices, sharded gallery) -> 0-based ranks [B, M]."""

    def per_device(q, q_lab, q_id, pos_idx, g, g_lab, g_id, g_valid):
        # Padding rows of the sharded gallery (-inf) never rank above anything.
        sim = _masked_similarity(q, q_lab, q_id, g, g_lab, g_id, g_valid, has_ids, drop_excluded)
        n_local = g.shape[0]
        offset = jax.lax.axis_index(DATA_AXIS) * n_local
        local = pos_idx - offset
        mine = (pos_idx >= 0) & (local >= 0) & (local < n_local)
        picked = jnp.take_along_axis(sim, jnp.clip(local, 0, n_local - 1), axis=1)
        pos_sim = jax.lax.psum(jnp.where(mine, picked, 0.0), DATA_AXIS)
        g_index = offset + jnp.arange(n_local, dtype=jnp.int32)

        def count_one(j, counts):
            p = jax.lax.dynamic_slice_in_dim(pos_sim, j, 1, axis=1)
            idx = jax.lax.dynamic_slice_in_dim(pos_idx, j, 1, axis=1)
            # Items before the relevant one (lower index) win ties: stable-sort rule.
            above = jnp.where(g_index[None, :] < idx, sim >= p, sim > p)
            c = jnp.sum(above, axis=1, dtype=jnp.int32)
            return jax.lax.dynamic_update_slice_in_dim(counts, c[:, None], j, axis=1)

        init = _varying(jnp.zeros_like(pos_idx))
        counts = jax.lax.fori_loop(0, pos_idx.shape[1], count_one, init)
        counts = jax.lax.psum(counts, DATA_AXIS)
        return jnp.where(pos_idx >= 0, counts, jnp.int32(2**31 - 1))

    rep, shard = PartitionSpec(), PartitionSpec(DATA_AXIS)
    fn = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(rep, rep, rep, rep, shard, shard, shard, shard),
        out_specs=rep,
    )
    return jax.jit(fn)


def retrieval_metrics(
    query_feats,
    query_labels,
    gallery_feats,
    gallery_labels,
    query_ids=None,
    gallery_ids=None,
    topk: Sequence[int] = (1, 5),
    metrics: Sequence[str] = ("recall", "mAP"),
    block_weighting: bool = True,
    sim_block_size: int = metrics_lib.SIM_BLOCK_SIZE,
    query_block: int = 256,
    mesh: Mesh | None = None,
    re_ranking: bool = False,
    minp_reference_quirk: bool = False,
    progress: bool = False,
    return_per_query: bool = False,
    normalize: bool = False,
    drop_excluded: bool = False,
):
    """Exact retrieval metrics for L2-normalized features, with PaddleClas semantics.

    Args:
      query_feats, gallery_feats: [Q, D] / [G, D] float arrays (normalized by the caller;
        similarity is the dot product).
      query_labels, gallery_labels: integer [Q] / [G] (or [N, 1]).
      query_ids, gallery_ids: optional integer ids (the list's third column). Gallery items with
        the same label *and* id as the query are excluded (similarity 0, never relevant).
      topk: k values for ``recall{k}`` (and ``precision@{k}``).
      metrics: any of "recall", "mAP", "mINP", "precision", "MAP@R"; keys come out in this order.
      block_weighting: True (default) combines per-``sim_block_size`` query blocks weighted by
        size as PaddleClas does; False pools all valid queries (see `metrics.py`).
      query_block: queries per device step (memory ~ query_block * G * 4 bytes / devices).
      mesh: 1-D "data" mesh to shard the gallery over (default: all devices).
      re_ranking: k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3) on the full matrices, then
        metrics over all queries at once as PaddleClas does; only for sets that fit in memory.
      return_per_query: also return the :class:`jaxrec.evaluation.metrics.PerQuery` statistics.
      normalize: L2-normalize both feature sets first (:func:`l2_normalize`).
      drop_excluded: excluded pairs leave the ranking (similarity -inf: below every item)
        instead of PaddleClas's similarity 0 with a rank slot; with query == gallery and unique
        ids this is the removal of each query from its own ranking that pytorch-metric-learning
        and the metric-learning benchmarks use. Not with ``re_ranking``.
    """
    qf = np.asarray(query_feats, np.float32)
    gf = np.asarray(gallery_feats, np.float32)
    if normalize:
        qf, gf = l2_normalize(qf), l2_normalize(gf)
    if qf.ndim != 2 or gf.ndim != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(f"features must be [Q, D] and [G, D], got {qf.shape} and {gf.shape}")
    nq, ng = qf.shape[0], gf.shape[0]
    if nq == 0 or ng == 0:
        raise ValueError(f"need at least one query and one gallery item, got {nq} and {ng}")
    ql = _as_1d(query_labels, "query_labels", nq)
    gl = _as_1d(gallery_labels, "gallery_labels", ng)
    if (query_ids is None) != (gallery_ids is None):
        raise ValueError("give both query_ids and gallery_ids, or neither")
    has_ids = query_ids is not None
    qi = _as_1d(query_ids, "query_ids", nq) if has_ids else None
    gi = _as_1d(gallery_ids, "gallery_ids", ng) if has_ids else None
    topk = metrics_lib._check_topk(topk, ng)

    if re_ranking and drop_excluded:
        raise ValueError("drop_excluded is not implemented with re_ranking")
    if re_ranking:
        stats = reranked_stats(qf, ql, gf, gl, qi, gi, topk)
        block = nq  # PaddleClas evaluates the re-ranked matrix as one block
    else:
        stats = _blockwise_stats(
            qf, ql, gf, gl, qi, gi, topk, query_block, mesh, progress, drop_excluded
        )
        block = sim_block_size
    out = metrics_lib.aggregate(
        stats, topk, metrics, block, block_weighting, minp_reference_quirk=minp_reference_quirk
    )
    return (out, stats) if return_per_query else out


def _blockwise_stats(qf, ql, gf, gl, qi, gi, topk, query_block, mesh, progress, drop_excluded):
    nq, ng = qf.shape[0], gf.shape[0]
    mesh = make_mesh() if mesh is None else mesh
    n_dev = mesh.devices.size
    has_ids = qi is not None
    ql_c, gl_c = _dense_codes(ql, gl)
    if has_ids:
        qi_c, gi_c = _dense_codes(qi, gi)
    else:
        qi_c, gi_c = np.zeros(nq, np.int32), np.zeros(ng, np.int32)

    g_pad = -ng % n_dev
    gallery_sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))

    def put_gallery(x, fill):
        if g_pad:
            x = np.concatenate([x, np.full((g_pad, *x.shape[1:]), fill, x.dtype)])
        return jax.device_put(x, gallery_sharding)

    g_dev = put_gallery(gf, 0.0)
    g_lab = put_gallery(gl_c, -1)
    g_id = put_gallery(gi_c, -1)
    g_valid = put_gallery(np.ones(ng, bool), False)
    replicated = NamedSharding(mesh, PartitionSpec())

    finder = _PositiveFinder(gl, gi)
    # Visit queries grouped by their number of same-label gallery items, so each block pads
    # to a small M; statistics are put back in the original order at the end.
    visit = np.argsort(finder.num_same_label(ql), kind="stable")
    rank_fn = _rank_block_fn(mesh, has_ids, drop_excluded)
    block = max(1, min(query_block, nq))
    pending: collections.deque = collections.deque()
    parts: list[metrics_lib.PerQuery] = []

    def finish():
        ranks_dev, n = pending.popleft()
        ranks = np.sort(np.asarray(ranks_dev)[:n].astype(np.int64), axis=1)
        parts.append(metrics_lib.PerQuery.from_padded_ranks(ranks, topk, ng))

    starts = range(0, nq, block)
    for i, s in enumerate(starts):
        rows = visit[s : s + block]
        n = rows.size
        pos_idx = finder(ql[rows], qi[rows] if has_ids else None)
        pad = block - n
        q = np.pad(qf[rows], ((0, pad), (0, 0)))
        q_lab = np.pad(ql_c[rows], (0, pad), constant_values=-1)
        q_id = np.pad(qi_c[rows], (0, pad), constant_values=-1)
        pos_idx = np.pad(pos_idx, ((0, pad), (0, 0)), constant_values=-1)
        args = [jax.device_put(a, replicated) for a in (q, q_lab, q_id, pos_idx)]
        pending.append((rank_fn(*args, g_dev, g_lab, g_id, g_valid), n))
        if len(pending) > 2:
            finish()
        if progress:
            print(f"\reval: {i + 1}/{len(starts)} query blocks", end="", file=sys.stderr)
    while pending:
        finish()
    if progress:
        print(file=sys.stderr)
    stats = metrics_lib.PerQuery.concatenate(parts)
    return stats.take(np.argsort(visit))


def _masked_similarity(
    q, q_lab, q_id, g, g_lab, g_id, g_valid, has_ids: bool, drop_excluded: bool = False
):
    """[B, G_local] similarities; excluded pairs (same label and id) 0 (-inf when dropped),
    padding rows -inf."""
    sim = jnp.dot(q, g.T, precision=jax.lax.Precision.HIGHEST)
    if has_ids:
        keep = (q_lab[:, None] != g_lab[None, :]) | (q_id[:, None] != g_id[None, :])
        sim = jnp.where(keep, sim, -jnp.inf if drop_excluded else 0.0)
    return jnp.where(g_valid[None, :], sim, -jnp.inf)


@functools.lru_cache(maxsize=32)
def _topk_fn(mesh: Mesh, has_ids: bool, k: int, k_local: int):
    """Jitted (query block, sharded gallery) -> (top-k scores, global indices)."""

    def per_device(q, q_lab, q_id, g, g_lab, g_id, g_valid):
        sim = _masked_similarity(q, q_lab, q_id, g, g_lab, g_id, g_valid, has_ids)
        val, idx = jax.lax.top_k(sim, k_local)
        idx = idx + jax.lax.axis_index(DATA_AXIS) * g.shape[0]
        val = jax.lax.all_gather(val, DATA_AXIS, axis=1, tiled=True)
        idx = jax.lax.all_gather(idx, DATA_AXIS, axis=1, tiled=True)
        best, pos = jax.lax.top_k(val, k)
        return best, jnp.take_along_axis(idx, pos, axis=1)

    rep, dat = PartitionSpec(), PartitionSpec(DATA_AXIS)
    return jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(rep, rep, rep, dat, dat, dat, dat),
            out_specs=(rep, rep),
            check_vma=False,
        )
    )


def topk_neighbors(
    query_feats,
    gallery_feats,
    k: int,
    query_labels=None,
    gallery_labels=None,
    query_ids=None,
    gallery_ids=None,
    query_block: int = 256,
    mesh: Mesh | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery items per query: (scores [Q, k] float32, indices [Q, k] int64).

    Same ranking as :func:`retrieval_metrics`: dot-product similarity, excluded pairs (same label
    and same id, when labels and ids are given) at similarity 0, ties to the lower gallery index.
    Computed block-wise on device with the gallery sharded over ``mesh``.
    """
    qf = np.asarray(query_feats, np.float32)
    gf = np.asarray(gallery_feats, np.float32)
    nq, ng = qf.shape[0], gf.shape[0]
    if not 1 <= k <= ng:
        raise ValueError(f"k must lie in [1, num_gallery={ng}], got {k}")
    has_ids = query_ids is not None and gallery_ids is not None
    if has_ids and (query_labels is None or gallery_labels is None):
        raise ValueError("exclusion by ids also needs query_labels and gallery_labels")
    mesh = make_mesh() if mesh is None else mesh
    n_dev = mesh.devices.size
    if has_ids:
        ql_c, gl_c = _dense_codes(
            _as_1d(query_labels, "query_labels", nq), _as_1d(gallery_labels, "gallery_labels", ng)
        )
        qi_c, gi_c = _dense_codes(
            _as_1d(query_ids, "query_ids", nq), _as_1d(gallery_ids, "gallery_ids", ng)
        )
    else:
        ql_c = qi_c = np.zeros(nq, np.int32)
        gl_c = gi_c = np.zeros(ng, np.int32)
    g_pad = -ng % n_dev
    n_local = (ng + g_pad) // n_dev
    k_local = min(k, n_local)
    shard = NamedSharding(mesh, PartitionSpec(DATA_AXIS))

    def put(x, fill):
        if g_pad:
            x = np.concatenate([x, np.full((g_pad, *x.shape[1:]), fill, x.dtype)])
        return jax.device_put(x, shard)

    fn = _topk_fn(mesh, has_ids, k, k_local)
    g_args = (put(gf, 0.0), put(gl_c, -1), put(gi_c, -1), put(np.ones(ng, bool), False))
    replicated = NamedSharding(mesh, PartitionSpec())
    block = max(1, min(query_block, nq))
    scores, indices = [], []
    for s in range(0, nq, block):
        e = min(s + block, nq)
        pad = block - (e - s)
        q_args = [
            jax.device_put(np.pad(a[s:e], [(0, pad)] + [(0, 0)] * (a.ndim - 1)), replicated)
            for a in (qf, ql_c, qi_c)
        ]
        val, idx = fn(*q_args, *g_args)
        scores.append(np.asarray(val)[: e - s])
        indices.append(np.asarray(idx)[: e - s].astype(np.int64))
    return np.concatenate(scores), np.concatenate(indices)
