"""Retrieval metrics against PaddleClas (fixtures from tools/golden_metrics.py) and ref §8.4."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxrec.evaluation import metrics

GOLDEN = np.load(Path(__file__).parent / "fixtures" / "metric_golden.npz")
META = json.loads(str(GOLDEN["meta_json"]))


def _get(name, key):
    full = f"{name}/{key}"
    return GOLDEN[full] if full in GOLDEN else None


def _ours(name, **kw):
    topk = META[name]["topk"]
    has_ids = _get(name, "qid") is not None
    wanted = ("recall", "mAP", "precision") + (() if has_ids else ("mINP",))
    return metrics.retrieval_metrics_from_similarity(
        _get(name, "sim"),
        _get(name, "ql"),
        _get(name, "gl"),
        _get(name, "qid"),
        _get(name, "gid"),
        topk=topk,
        metrics=wanted,
        minp_reference_quirk=True,
        **kw,
    )


@pytest.mark.parametrize("name", sorted(META))
def test_matches_paddleclas(name):
    """Equal to PaddleClas up to its float32 arithmetic; NaN where PaddleClas gives NaN."""
    ours = _ours(name)
    ref = META[name]["values"]
    assert list(ours)[0] == "recall1"
    assert set(ours) == set(ref)
    for key, value in ref.items():
        np.testing.assert_allclose(ours[key], value, rtol=2e-7, atol=1e-7, err_msg=key)


def test_spec_84_worked_example():
    sim = np.array(
        [[0.9, 0.8, 0.1, 0.7, 0.2], [0.1, 0.95, 0.3, 0.2, 0.6], [0.5, 0.4, 0.3, 0.2, 0.1]]
    )
    ql, gl = np.array([1, 2, 9]), np.array([1, 2, 1, 2, 2])
    out = metrics.retrieval_metrics_from_similarity(sim, ql, gl)
    assert out["recall1"] == 1.0 and out["recall5"] == 1.0
    # Query 3 (label 9) has no relevant item: it is left out of the denominators, but the
    # single block still has weight 3/3. AP values 0.7 and 0.91667.
    np.testing.assert_allclose(out["mAP"], (0.7 + 11 / 12) / 2, rtol=1e-12)
    np.testing.assert_allclose(out["mAP"], 0.808333, atol=1e-6)
    rel = metrics.ranked_relevance(sim, ql, gl)
    stats = metrics.PerQuery.from_relevance(rel, [1])
    np.testing.assert_allclose(stats.ap[:2], [0.7, 11 / 12])
    masked = metrics.retrieval_metrics_from_similarity(
        sim, ql, gl, np.array([0, 1, 2]), np.array([0, 1, 0, 3, 1])
    )
    assert masked == {"recall1": 0.0, "recall5": 1.0, "mAP": 0.5}


def test_block_weighting_vs_pooled():
    """Blocks of 64 weighted by size (PaddleClas, default) differ from pooled when some queries
    have no relevant item; both agree when every query has one."""
    rng = np.random.default_rng(0)
    sim = rng.standard_normal((100, 50))
    gl = rng.integers(0, 10, 50)
    ql = rng.integers(0, 10, 100)
    ql[:30] = 99  # 30 queries of the first block have no relevant item
    blocked = metrics.retrieval_metrics_from_similarity(sim, ql, gl, topk=(1, 5))
    pooled = metrics.retrieval_metrics_from_similarity(
        sim, ql, gl, topk=(1, 5), block_weighting=False
    )
    rel = metrics.ranked_relevance(sim, ql, gl)
    valid = rel.any(1)
    hit1 = rel[:, 0]
    np.testing.assert_allclose(pooled["recall1"], hit1[valid].mean())
    expected = hit1[:64][valid[:64]].mean() * 64 / 100 + hit1[64:][valid[64:]].mean() * 36 / 100
    np.testing.assert_allclose(blocked["recall1"], expected)
    assert blocked["recall1"] != pooled["recall1"]
    ql[:30] = 3
    a = metrics.retrieval_metrics_from_similarity(sim, ql, gl)
    b = metrics.retrieval_metrics_from_similarity(sim, ql, gl, block_weighting=False)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-12)


def test_tie_rule_is_lower_gallery_index_first():
    sim = np.array([[0.5, 0.5, 0.5, 0.1]])
    assert (
        metrics.retrieval_metrics_from_similarity(sim, [1], [0, 1, 1, 1], topk=[1])["recall1"]
        == 0.0
    )
    assert (
        metrics.retrieval_metrics_from_similarity(sim, [1], [1, 0, 0, 0], topk=[1])["recall1"]
        == 1.0
    )
    # AP: relevant at ranks 2 and 3 -> (1/2 + 2/3) / 2
    out = metrics.retrieval_metrics_from_similarity(sim, [1], [0, 1, 1, 0], topk=[1])
    np.testing.assert_allclose(out["mAP"], (1 / 2 + 2 / 3) / 2)


def test_excluded_items_keep_a_rank_slot():
    """An excluded item gets similarity 0: it can still push relevant items down."""
    sim = np.array([[0.9, 0.2, -0.5]])
    ql, gl = [1], [1, 0, 1]
    out = metrics.retrieval_metrics_from_similarity(sim, ql, gl, [7], [7, 8, 9], topk=[1])
    # item 0 (self) -> sim 0, now ranked after item 1 (0.2) and before item 2 (-0.5)
    assert out["recall1"] == 0.0
    np.testing.assert_allclose(out["mAP"], 1 / 3)


def test_minp_standard_and_quirk_and_small_helpers():
    rel = np.array([[True, False, True, False], [False, True, False, False]])
    # standard INP: num_rel / (1-based rank of last relevant) -> [2/3, 1/2]
    np.testing.assert_allclose(metrics.mean_inp(rel), (2 / 3 + 1 / 2) / 2)
    # PaddleClas divides by the 0-based index -> [2/2, 1/1]
    np.testing.assert_allclose(metrics.mean_inp(rel, reference_quirk=True), 1.0)
    only_first = np.array([[True, False]])
    assert metrics.mean_inp(only_first, reference_quirk=True) == np.inf
    assert metrics.recall_at_k(rel, [1, 2]) == {"recall1": 0.5, "recall2": 1.0}
    np.testing.assert_allclose(metrics.mean_average_precision(rel), ((1 + 2 / 3) / 2 + 1 / 2) / 2)
    assert metrics.precision_at_k(rel, [1, 3]) == {"precision@1": 0.5, "precision@3": 0.5}


def test_bad_input_errors():
    with pytest.raises(ValueError, match="top-k"):
        metrics.retrieval_metrics_from_similarity(np.zeros((2, 3)), [0, 1], [0, 1, 1], topk=[5])
    with pytest.raises(ValueError, match="both"):
        metrics.retrieval_metrics_from_similarity(
            np.zeros((2, 3)), [0, 1], [0, 1, 1], [0, 1], topk=[1]
        )
    with pytest.raises(ValueError, match="shape"):
        metrics.retrieval_metrics_from_similarity(np.zeros((2, 2)), [0, 1], [0, 1, 1], topk=[1])
    with pytest.raises(ValueError, match="unknown metrics"):
        metrics.retrieval_metrics_from_similarity(
            np.zeros((2, 3)), [0, 1], [0, 1, 1], topk=[1], metrics=["auc"]
        )


@pytest.mark.parametrize("with_ids", [False, True])
def test_has_positive_equals_the_ranked_relevance(with_ids):
    """`has_positive` (label counts) says exactly which queries the [Q, G] relevance calls
    valid, with and without the same-id exclusion; blocks without one are the NaN blocks."""
    from jaxrec.evaluation.metrics import (
        PerQuery,
        blocks_without_positives,
        has_positive,
        keep_mask,
        ranked_relevance,
    )

    rs = np.random.RandomState(0)
    ql, gl = rs.randint(0, 9, 40), rs.randint(0, 6, 30)
    qi = gl_i = None
    if with_ids:
        qi, gl_i = rs.randint(0, 4, 40), rs.randint(0, 4, 30)
    keep = keep_mask(ql, gl, qi, gl_i)
    rel = ranked_relevance(rs.normal(size=(40, 30)), ql, gl, keep, False)
    want = PerQuery.from_relevance(rel, (1,)).valid
    got = has_positive(ql, gl, qi, gl_i)
    np.testing.assert_array_equal(got, want)
    assert 0 < got.sum() < 40
    valid = np.ones(10, bool)
    valid[4:8] = False
    assert blocks_without_positives(valid, 4) == [1]
    assert blocks_without_positives(valid, 3) == []
