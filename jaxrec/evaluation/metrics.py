"""Retrieval metrics with PaddleClas semantics (ref §8.3, 8.4), in numpy for small sets.

Vocabulary:
- ``keep`` mask: ``keep[q, g] = (label_q != label_g) | (id_q != id_g)``. It only exists when ids
  (cameras / unique ids, the third list column) are given. Excluded pairs get similarity
  **0** (the similarity is multiplied by ``keep``): they still occupy a rank slot but are never
  relevant.
- ``drop_excluded=True`` (jaxrec's ``Global.drop_excluded``) removes excluded pairs from the
  ranking instead (similarity -inf), as pytorch-metric-learning and the metric-learning
  benchmarks do when the query set is its own gallery.
- Ranking: each gallery row is sorted by similarity, descending. Ties are broken by gallery
  index (lower index first, a stable sort). PaddleClas uses ``paddle.argsort``, whose tie order
  is unspecified (it is not stable on CPU), so tie cases can only be compared with this rule.
- Per-query statistics (:class:`PerQuery`): ``valid`` (at least one relevant item), the rank of
  the first relevant item, AP over the whole ranked gallery, INP and hits in the top k.

Aggregation (:func:`aggregate`): PaddleClas evaluates blocks of 64 queries and combines them as
``sum_b metric_b * n_b / Q`` (recall and mAP per block only count queries with a relevant item;
a block without one gives NaN). ``block_weighting=True`` (the **default**) reproduces this, so
numbers are comparable with PaddleClas logs and published results; ``block_weighting=False``
gives the textbook pooled values (mean over all valid queries). Both are identical when every
query has a relevant item.

MAP@R (Musgrave et al., "A Metric Learning Reality Check", 2020; pytorch-metric-learning's
``mean_average_precision_at_r``): with R the number of relevant gallery items of a query,
``MAP@R = (1/R) * sum_{i<=R} P(i) * rel(i)`` over the first R ranks (P(i) the precision at rank
i). Ranks follow the rules above (excluded pairs keep their slot, ties to the lower gallery
index), so it is exact for the evaluator's ranking and aggregated like mAP.

mINP: the standard definition is ``#relevant / rank_of_last_relevant`` (1-based). PaddleClas
divides by the 0-based position instead (``inf`` when the only relevant item is at rank 1) and
its keep-mask branch raises a NameError; ``minp_reference_quirk=True`` reproduces the former.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SIM_BLOCK_SIZE = 64


def keep_mask(
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    query_ids: np.ndarray | None,
    gallery_ids: np.ndarray | None,
) -> np.ndarray | None:
    """``(label differs) | (id differs)`` as a [Q, G] bool mask, or None without ids."""
    if query_ids is None and gallery_ids is None:
        return None
    if query_ids is None or gallery_ids is None:
        raise ValueError("give both query_ids and gallery_ids, or neither")
    ql, gl = _flat(query_labels), _flat(gallery_labels)
    qi, gi = _flat(query_ids), _flat(gallery_ids)
    return (ql[:, None] != gl[None, :]) | (qi[:, None] != gi[None, :])


def has_positive(
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    query_ids: np.ndarray | None = None,
    gallery_ids: np.ndarray | None = None,
) -> np.ndarray:
    """bool [Q]: whether a query has a relevant gallery item (same label, not excluded by the
    keep mask), without the [Q, G] matrix: label counts minus the excluded same-id pairs."""
    ql, gl = _flat(query_labels), _flat(gallery_labels)
    labels, counts = np.unique(gl, return_counts=True)
    pos = np.searchsorted(labels, ql)
    found = (pos < labels.size) & (labels[np.minimum(pos, labels.size - 1)] == ql)
    n = np.where(found, counts[np.minimum(pos, labels.size - 1)], 0)
    if query_ids is not None and gallery_ids is not None:
        pairs, pair_counts = np.unique(
            np.stack([gl, _flat(gallery_ids)], axis=1), axis=0, return_counts=True
        )
        table = {(a.item(), b.item()): c for (a, b), c in zip(pairs, pair_counts, strict=True)}
        n = n - np.array(
            [table.get((a.item(), b.item()), 0) for a, b in zip(ql, _flat(query_ids), strict=True)],
            dtype=n.dtype,
        )
    return n > 0


def blocks_without_positives(valid: np.ndarray, block_size: int = SIM_BLOCK_SIZE) -> list[int]:
    """The query blocks (0-based) in which no query has a relevant item: PaddleClas's
    block-weighted recall and mAP are NaN when there is one."""
    q = valid.size
    return [b for b, s in enumerate(range(0, q, block_size)) if not valid[s : s + block_size].any()]


def _flat(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 1:
        raise ValueError(f"labels/ids must have shape [N] or [N, 1], got {x.shape}")
    return x


def ranked_relevance(
    similarity: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    keep: np.ndarray | None = None,
    drop_excluded: bool = False,
) -> np.ndarray:
    """[Q, G] bool: is the r-th ranked gallery item relevant (same label and kept)?

    ``similarity`` is the raw similarity; when ``keep`` is given it is multiplied in first
    (``drop_excluded``: excluded pairs get -inf instead, so they rank below everything).
    """
    sim = np.asarray(similarity)
    ql, gl = _flat(query_labels), _flat(gallery_labels)
    if sim.shape != (ql.size, gl.size):
        raise ValueError(f"similarity shape {sim.shape} != (num_query, num_gallery)")
    rel = ql[:, None] == gl[None, :]
    if keep is not None:
        sim = np.where(keep, sim, -np.inf) if drop_excluded else sim * keep
        rel &= keep
    order = np.argsort(-sim, axis=1, kind="stable")
    return np.take_along_axis(rel, order, axis=1)


@dataclass
class PerQuery:
    """Per-query statistics from which every metric is aggregated."""

    valid: np.ndarray  # bool [Q]: at least one relevant gallery item
    first_rank: np.ndarray  # int [Q]: 0-based rank of the first relevant item (G if none)
    last_rank: np.ndarray  # int [Q]: 0-based rank of the last relevant item (-1 if none)
    num_rel: np.ndarray  # int [Q]
    ap: np.ndarray  # float [Q]: average precision (0 where not valid)
    map_r: np.ndarray  # float [Q]: precision averaged over the first R ranks (R = num_rel)
    hits: dict[int, np.ndarray]  # k -> int [Q]: relevant items within the top k

    @classmethod
    def from_ranks(cls, ranks: Sequence[np.ndarray], topk: Sequence[int], num_gallery: int):
        """Build from the sorted 0-based ranks of every relevant item of each query."""
        q = len(ranks)
        valid = np.zeros(q, bool)
        first = np.full(q, num_gallery, np.int64)
        last = np.full(q, -1, np.int64)
        num_rel = np.zeros(q, np.int64)
        ap = np.zeros(q, np.float64)
        map_r = np.zeros(q, np.float64)
        hits = {k: np.zeros(q, np.int64) for k in topk}
        for i, r in enumerate(ranks):
            if r.size == 0:
                continue
            valid[i], first[i], last[i], num_rel[i] = True, r[0], r[-1], r.size
            precision = np.arange(1, r.size + 1) / (r + 1.0)
            ap[i] = np.mean(precision)
            map_r[i] = np.sum(precision[r < r.size]) / r.size
            for k in topk:
                hits[k][i] = np.searchsorted(r, k)
        return cls(valid, first, last, num_rel, ap, map_r, hits)

    @classmethod
    def from_padded_ranks(cls, ranks: np.ndarray, topk: Sequence[int], num_gallery: int):
        """Vectorized :meth:`from_ranks`: [Q, M] 0-based ranks, each row ascending, padded at
        the end with any value >= ``num_gallery``."""
        ranks = np.asarray(ranks, np.int64)
        q, m = ranks.shape
        real = ranks < num_gallery
        num_rel = real.sum(1)
        valid = num_rel > 0
        first = np.where(valid, ranks[:, 0] if m else num_gallery, num_gallery)
        last_pos = np.maximum(num_rel - 1, 0)
        last = np.where(valid, ranks[np.arange(q), last_pos] if m else -1, -1)
        precision = np.arange(1, m + 1)[None, :] / (np.where(real, ranks, 0) + 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            ap = np.where(valid, np.sum(precision * real, axis=1) / num_rel, 0.0)
            within_r = real & (ranks < num_rel[:, None])
            map_r = np.where(valid, np.sum(precision * within_r, axis=1) / num_rel, 0.0)
        hits = {k: np.sum(real & (ranks < k), axis=1) for k in topk}
        return cls(valid, first, last, num_rel, ap, map_r, hits)

    @classmethod
    def concatenate(cls, parts: Sequence[PerQuery]):
        """Join per-query statistics of consecutive query blocks."""
        hits = {k: np.concatenate([p.hits[k] for p in parts]) for k in parts[0].hits}
        return cls(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in _ARRAY_FIELDS), hits=hits
        )

    def take(self, indices: np.ndarray) -> PerQuery:
        """Statistics of the queries at ``indices`` (e.g. to undo a reordering)."""
        hits = {k: v[indices] for k, v in self.hits.items()}
        return PerQuery(*(getattr(self, f)[indices] for f in _ARRAY_FIELDS), hits=hits)

    @classmethod
    def from_relevance(cls, rel: np.ndarray, topk: Sequence[int]):
        """Build from a ranked [Q, G] relevance matrix (see :func:`ranked_relevance`)."""
        ranks = [np.flatnonzero(row) for row in rel]
        return cls.from_ranks(ranks, topk, rel.shape[1])

    def inp(self, reference_quirk: bool = False) -> np.ndarray:
        """INP per query (NaN where not valid)."""
        denom = self.last_rank + (0 if reference_quirk else 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = self.num_rel / denom.astype(np.float64)
        return np.where(self.valid, out, np.nan)


_ARRAY_FIELDS = ("valid", "first_rank", "last_rank", "num_rel", "ap", "map_r")


def _check_topk(topk: Sequence[int], num_gallery: int) -> list[int]:
    if isinstance(topk, int):
        topk = [topk]
    topk = [int(k) for k in topk]
    for k in topk:
        if not 1 <= k <= num_gallery:
            raise ValueError(f"top-k value {k} must lie in [1, num_gallery={num_gallery}]")
    return topk


def aggregate(
    stats: PerQuery,
    topk: Sequence[int] = (1, 5),
    metrics: Sequence[str] = ("recall", "mAP"),
    block_size: int = SIM_BLOCK_SIZE,
    block_weighting: bool = True,
    minp_reference_quirk: bool = False,
) -> dict[str, float]:
    """Combine per-query statistics into the reported metrics.

    ``metrics`` picks from ``recall`` (keys ``recall{k}``), ``mAP``, ``mINP``, ``precision``
    (keys ``precision@{k}``, averaged over *all* queries as in PaddleClas) and ``MAP@R``; the
    output keeps that order, so the first key is the one that drives best-model selection.
    """
    q = stats.valid.size
    if q == 0:
        raise ValueError("no queries to evaluate")
    unknown = set(metrics) - {"recall", "mAP", "mINP", "precision", "MAP@R"}
    if unknown:
        raise ValueError(
            f"unknown metrics {sorted(unknown)}; use recall, mAP, mINP, precision, MAP@R"
        )
    per_query: dict[str, tuple[np.ndarray, bool]] = {}  # name -> (values, valid-only)
    for name in metrics:
        if name == "recall":
            for k in topk:
                per_query[f"recall{k}"] = ((stats.first_rank < k).astype(np.float64), True)
        elif name == "mAP":
            per_query["mAP"] = (stats.ap, True)
        elif name == "MAP@R":
            per_query["MAP@R"] = (stats.map_r, True)
        elif name == "mINP":
            per_query["mINP"] = (stats.inp(minp_reference_quirk), True)
        else:
            for k in topk:
                per_query[f"precision@{k}"] = (stats.hits[k] / float(k), False)

    if block_weighting:
        bounds = [(s, min(s + block_size, q)) for s in range(0, q, block_size)]
    else:
        bounds = [(0, q)]
    out: dict[str, float] = {}
    for key, (values, valid_only) in per_query.items():
        total = 0.0
        for s, e in bounds:
            v = values[s:e]
            if valid_only:
                v = v[stats.valid[s:e]]
            block = float(np.mean(v)) if v.size else float("nan")
            total += block * (e - s) / q
        out[key] = total
    return out


def retrieval_metrics_from_similarity(
    similarity: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    query_ids: np.ndarray | None = None,
    gallery_ids: np.ndarray | None = None,
    topk: Sequence[int] = (1, 5),
    metrics: Sequence[str] = ("recall", "mAP"),
    block_size: int = SIM_BLOCK_SIZE,
    block_weighting: bool = True,
    minp_reference_quirk: bool = False,
    drop_excluded: bool = False,
) -> dict[str, float]:
    """Metrics from a full [Q, G] similarity matrix (brute force; `retrieval.py` for big sets)."""
    sim = np.asarray(similarity)
    topk = _check_topk(topk, sim.shape[1])
    keep = keep_mask(query_labels, gallery_labels, query_ids, gallery_ids)
    rel = ranked_relevance(sim, query_labels, gallery_labels, keep, drop_excluded)
    stats = PerQuery.from_relevance(rel, topk)
    return aggregate(stats, topk, metrics, block_size, block_weighting, minp_reference_quirk)


def recall_at_k(rel: np.ndarray, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Pooled Recall@k from a ranked relevance matrix (queries without relevant items dropped)."""
    topk = _check_topk(topk, rel.shape[1])
    stats = PerQuery.from_relevance(rel, topk)
    return aggregate(stats, topk, ("recall",), block_weighting=False)


def mean_average_precision(rel: np.ndarray) -> float:
    """Pooled mAP from a ranked relevance matrix (NaN when no query has a relevant item)."""
    return aggregate(PerQuery.from_relevance(rel, []), [], ("mAP",), block_weighting=False)["mAP"]


def mean_inp(rel: np.ndarray, reference_quirk: bool = False) -> float:
    """Pooled mINP from a ranked relevance matrix (see the module docstring for the quirk)."""
    stats = PerQuery.from_relevance(rel, [])
    return aggregate(
        stats, [], ("mINP",), block_weighting=False, minp_reference_quirk=reference_quirk
    )["mINP"]


def precision_at_k(rel: np.ndarray, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Precision@k averaged over all queries (PaddleClas ``Precisionk``)."""
    topk = _check_topk(topk, rel.shape[1])
    stats = PerQuery.from_relevance(rel, topk)
    return aggregate(stats, topk, ("precision",), block_weighting=False)
