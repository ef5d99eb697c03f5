"""Recall@k for the benchmarks' k (2, 4, 8) and MAP@R against a brute-force reference written
from the definitions, ties and query == gallery exclusion included, on the host metrics and the
device kernels (1 and 8 devices), with the evaluator's tie rule (lower gallery index first;
excluded pairs at similarity 0 keep their rank slot, or leave the ranking with drop_excluded)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxrec.evaluation import metrics
from jaxrec.evaluation import retrieval as eval_lib
from jaxrec.ops import l2_normalize
from jaxrec.parallel import make_mesh

TOPK = (1, 2, 4, 8)


def brute_force(sim, ql, gl, qi=None, gi=None, drop=False) -> dict[str, float]:
    """Pooled Recall@k and MAP@R over queries with a relevant item, one query at a time;
    ``drop``: excluded gallery items are removed from the query's ranking altogether."""
    recall = {k: [] for k in TOPK}
    map_r = []
    for q in range(sim.shape[0]):
        s = sim[q].astype(np.float64).copy()
        rel = gl == ql[q]
        excluded = np.zeros_like(rel)
        if qi is not None:
            excluded = rel & (gi == qi[q])
            s[excluded] = 0.0
            rel &= ~excluded
        # Stable ranking: by similarity descending, ties to the lower gallery index.
        order = sorted(range(s.size), key=lambda g: (-s[g], g))
        if drop:
            order = [g for g in order if not excluded[g]]
        ranked = rel[order]
        r = int(ranked.sum())
        if r == 0:
            continue
        for k in TOPK:
            recall[k].append(float(ranked[:k].any()))
        hits, total = 0, 0.0
        for i in range(r):  # the first R ranks only
            if ranked[i]:
                hits += 1
                total += hits / (i + 1)
        map_r.append(total / r)
    out = {f"recall{k}": float(np.mean(v)) for k, v in recall.items()}
    out["MAP@R"] = float(np.mean(map_r))
    return out


def _tied_features(rs, n, dim=3, levels=3):
    """Few distinct feature vectors, so many similarities tie exactly."""
    base = l2_normalize(rs.randint(-levels, levels + 1, size=(levels * 2, dim)).astype(np.float32))
    return base[rs.randint(0, base.shape[0], size=n)]


def test_map_at_r_worked_example():
    # Relevant items at ranks 1, 3 and 6 (R = 3): only ranks 1..3 count, P(1)=1, P(3)=2/3.
    rel = np.zeros((1, 8), bool)
    rel[0, [0, 2, 5]] = True
    stats = metrics.PerQuery.from_relevance(rel, [])
    assert stats.map_r[0] == pytest.approx((1 + 2 / 3) / 3)
    padded = metrics.PerQuery.from_padded_ranks(np.array([[0, 2, 5, 99]]), [], 8)
    assert padded.map_r[0] == pytest.approx((1 + 2 / 3) / 3)


@pytest.mark.parametrize("n_dev", [1, 8])
@pytest.mark.parametrize("same", [False, True])
@pytest.mark.parametrize("drop", [False, True])
def test_recall_k_and_map_at_r_equal_brute_force_with_ties(n_dev, same, drop):
    rs = np.random.RandomState(7 + same)
    gf = _tied_features(rs, 90)
    gl = rs.randint(0, 6, size=90)
    if same:  # query == gallery with unique ids: each image excluded from its own ranking
        qf, ql, qi, gi = gf, gl, np.arange(90), np.arange(90)
    else:
        qf, ql, qi, gi = _tied_features(rs, 40), rs.randint(0, 8, size=40), None, None
    sim = qf @ gf.T
    want = brute_force(sim, ql, gl, qi, gi, drop)
    names = ("recall", "MAP@R")
    host = metrics.retrieval_metrics_from_similarity(
        sim, ql, gl, qi, gi, topk=TOPK, metrics=names, block_weighting=False, drop_excluded=drop
    )
    mesh = make_mesh(jax.devices()[:n_dev])
    dev = eval_lib.retrieval_metrics(
        qf, ql, gf, gl, qi, gi, topk=TOPK, metrics=names, block_weighting=False,
        query_block=16, mesh=mesh, drop_excluded=drop,
    )  # fmt: skip
    assert list(dev) == ["recall1", "recall2", "recall4", "recall8", "MAP@R"]
    for key, value in want.items():
        assert host[key] == pytest.approx(value, abs=1e-12), key
        assert dev[key] == pytest.approx(value, abs=1e-9), key
    # Ties really occur (otherwise the tie rule would be untested).
    assert any(np.unique(row).size < row.size for row in sim)
    if same:  # negative similarities exist, so keeping the self slot at 0 changes ranks
        assert (sim < 0).any()
        kept = brute_force(sim, ql, gl, qi, gi, not drop)
        assert kept != want


def test_map_at_r_is_aggregated_like_map_and_reranking_keeps_it():
    rs = np.random.RandomState(3)
    f = l2_normalize(rs.randn(130, 5).astype(np.float32))
    lab = rs.randint(0, 4, size=130)
    ids = np.arange(130)
    weighted = eval_lib.retrieval_metrics(f, lab, f, lab, ids, ids, metrics=("MAP@R", "mAP"))
    _, stats = eval_lib.retrieval_metrics(
        f, lab, f, lab, ids, ids, metrics=("MAP@R",), return_per_query=True
    )
    # Blocks of 64 queries weighted by size (PaddleClas's rule for mAP), over valid queries.
    blocks = [(0, 64), (64, 128), (128, 130)]
    want = sum(stats.map_r[s:e][stats.valid[s:e]].mean() * (e - s) / 130 for s, e in blocks)
    assert weighted["MAP@R"] == pytest.approx(want, abs=1e-12)
    rr = eval_lib.retrieval_metrics(f, lab, f, lab, ids, ids, metrics=("MAP@R",), re_ranking=True)
    assert 0.0 < rr["MAP@R"] <= 1.0
