"""Blockwise on-device retrieval kernels vs brute force (jaxrec.evaluation.metrics) and
PaddleClas; the per-run evaluator compiles its functions once."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxrec.evaluation import metrics
from jaxrec.evaluation import rerank as rerank_lib
from jaxrec.evaluation import retrieval as eval_lib
from jaxrec.ops import l2_normalize
from jaxrec.parallel import make_mesh

ALL = ("recall", "mAP", "mINP", "precision")
RERANK = np.load(Path(__file__).parent / "fixtures" / "metric_rerank.npz")


def _features(rng, labels, d=16):
    centers = rng.standard_normal((labels.max() + 1, d))
    f = centers[labels] * 0.7 + rng.standard_normal((labels.size, d))
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)


def _mesh(n):
    return make_mesh(jax.devices()[:n])


def _assert_same(got, want):
    """Same keys and values; ranks are exact, sums may differ in the last bit of a double."""
    assert list(got) == list(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=0, err_msg=key)


def _brute(qf, ql, gf, gl, qi=None, gi=None, **kw):
    sim = qf.astype(np.float64) @ gf.astype(np.float64).T
    return metrics.retrieval_metrics_from_similarity(sim, ql, gl, qi, gi, **kw)


@pytest.mark.parametrize("n_dev", [1, 8])
@pytest.mark.parametrize("block_weighting", [True, False])
def test_random_separate_sets_equal_brute_force(n_dev, block_weighting):
    rng = np.random.default_rng(0)
    ql = rng.integers(0, 40, 203)  # some labels are absent from the gallery
    gl = rng.integers(0, 35, 301)  # 301 is not a multiple of 8 devices
    qf, gf = _features(rng, ql), _features(rng, gl)
    kw = dict(topk=(1, 5, 10), metrics=ALL, block_weighting=block_weighting)
    got = eval_lib.retrieval_metrics(qf, ql, gf, gl, mesh=_mesh(n_dev), query_block=50, **kw)
    _assert_same(got, _brute(qf, ql, gf, gl, **kw))


def test_ties_follow_the_stable_rule_on_any_device_count():
    """Binary features give integer similarities with many ties (exact in float32)."""
    rng = np.random.default_rng(1)
    qf = rng.integers(0, 2, (90, 5)).astype(np.float32)
    gf = rng.integers(0, 2, (77, 5)).astype(np.float32)
    ql, gl = rng.integers(0, 6, 90), rng.integers(0, 6, 77)
    qi, gi = rng.integers(0, 3, 90), rng.integers(0, 3, 77)
    kw = dict(topk=(1, 3, 5), metrics=ALL)
    want = _brute(qf, ql, gf, gl, qi, gi, **kw)
    for n_dev in (1, 8):
        got = eval_lib.retrieval_metrics(
            qf, ql, gf, gl, qi, gi, mesh=_mesh(n_dev), query_block=32, **kw
        )
        _assert_same(got, want)
    want = _brute(qf, ql, gf, gl, **kw)
    _assert_same(eval_lib.retrieval_metrics(qf, ql, gf, gl, mesh=_mesh(8), **kw), want)


@pytest.mark.parametrize("n_dev", [1, 8])
def test_query_equals_gallery_with_unique_ids(n_dev):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 30, 150)
    labels[:3] = [100, 101, 102]  # singletons: after excluding themselves, no positive
    f = _features(rng, labels)
    ids = np.arange(150)
    kw = dict(topk=(1, 5), metrics=("recall", "mAP", "precision"))
    got, stats = eval_lib.retrieval_metrics(
        f, labels, f, labels, ids, ids, mesh=_mesh(n_dev), return_per_query=True, **kw
    )
    _assert_same(got, _brute(f, labels, f, labels, ids, ids, **kw))
    counts = np.bincount(labels)[labels]
    np.testing.assert_array_equal(stats.valid, counts > 1)
    assert not stats.valid[:3].any()
    rel = metrics.ranked_relevance(
        f.astype(np.float64) @ f.T.astype(np.float64),
        labels,
        labels,
        metrics.keep_mask(labels, labels, ids, ids),
    )
    brute = metrics.PerQuery.from_relevance(rel, (1, 5))
    np.testing.assert_array_equal(stats.first_rank, brute.first_rank)
    np.testing.assert_array_equal(stats.last_rank, brute.last_rank)
    np.testing.assert_array_equal(stats.hits[5], brute.hits[5])
    # without ids every query finds itself first
    assert eval_lib.retrieval_metrics(f, labels, f, labels, mesh=_mesh(n_dev))["recall1"] == 1.0


def test_block_without_valid_queries_gives_nan_like_paddleclas():
    rng = np.random.default_rng(3)
    ql = rng.integers(0, 10, 140)
    ql[64:128] += 50  # the second 64-query block has no relevant gallery item
    gl = rng.integers(0, 10, 60)
    qf, gf = _features(rng, ql % 50), _features(rng, gl)
    got = eval_lib.retrieval_metrics(qf, ql, gf, gl, metrics=ALL, mesh=_mesh(8))
    want = _brute(qf, ql, gf, gl, metrics=ALL)
    _assert_same(got, want)
    assert np.isnan(got["recall1"]) and np.isnan(got["mAP"])
    pooled = eval_lib.retrieval_metrics(qf, ql, gf, gl, block_weighting=False, mesh=_mesh(1))
    assert np.isfinite(pooled["mAP"])
    _assert_same(pooled, _brute(qf, ql, gf, gl, block_weighting=False))


def test_no_positive_anywhere_and_single_items():
    qf = np.eye(3, 4, dtype=np.float32)
    gf = np.eye(5, 4, dtype=np.float32)[:5]
    got = eval_lib.retrieval_metrics(qf, [7, 8, 9], gf, [0, 1, 2, 3, 4], topk=[1])
    assert np.isnan(got["recall1"]) and np.isnan(got["mAP"])
    got = eval_lib.retrieval_metrics(qf[:1], [0], gf[:1], [0], topk=[1], metrics=ALL)
    assert got == {"recall1": 1.0, "mAP": 1.0, "mINP": 1.0, "precision@1": 1.0}


def test_spec_84_example_through_features():
    """Spec 8.4 similarities built as dot products of explicit vectors (3 + 5 dims)."""
    sim = np.array(
        [[0.9, 0.8, 0.1, 0.7, 0.2], [0.1, 0.95, 0.3, 0.2, 0.6], [0.5, 0.4, 0.3, 0.2, 0.1]],
        np.float32,
    )
    qf, gf = np.eye(3, dtype=np.float32), sim.T.copy()
    ql, gl = [1, 2, 9], [1, 2, 1, 2, 2]
    got = eval_lib.retrieval_metrics(qf, ql, gf, gl)
    assert got["recall1"] == 1.0 and got["recall5"] == 1.0
    np.testing.assert_allclose(got["mAP"], 0.808333, atol=1e-6)
    got = eval_lib.retrieval_metrics(qf, ql, gf, gl, [0, 1, 2], [0, 1, 0, 3, 1], mesh=_mesh(8))
    assert got == {"recall1": 0.0, "recall5": 1.0, "mAP": 0.5}


@pytest.mark.parametrize("name", ["sep", "self_ids"])
def test_re_ranking_matches_paddleclas(name):
    meta = json.loads(str(RERANK["meta_json"]))[name]

    def get(key):
        return RERANK[f"{name}/{key}"] if f"{name}/{key}" in RERANK else None

    dist = rerank_lib.re_ranking_distance(get("qf"), get("gf"), k1=20, k2=6, lambda_value=0.3)
    ref = get("dist")
    if get("qid") is not None:  # the reference fixture has excluded pairs set to max + 1
        keep = (get("ql")[:, None] != get("gl")[None]) | (get("qid")[:, None] != get("gid")[None])
        dist = np.where(keep, dist, dist.max() + 1)
    np.testing.assert_allclose(dist, ref, atol=1e-6)
    got = eval_lib.retrieval_metrics(
        get("qf"), get("ql"), get("gf"), get("gl"), get("qid"), get("gid"), re_ranking=True
    )
    for key, value in meta["values"].items():
        np.testing.assert_allclose(got[key], value, rtol=1e-6, err_msg=key)


def test_bad_input_errors():
    f = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="query_labels must have shape"):
        eval_lib.retrieval_metrics(f, [0, 1], f, [0, 1, 2, 3], topk=[1])
    with pytest.raises(ValueError, match="features must be"):
        eval_lib.retrieval_metrics(f, [0] * 4, np.zeros((4, 2)), [0] * 4, topk=[1])
    with pytest.raises(ValueError, match="both"):
        eval_lib.retrieval_metrics(f, [0] * 4, f, [0] * 4, query_ids=[0] * 4, topk=[1])
    with pytest.raises(ValueError, match="integers"):
        eval_lib.retrieval_metrics(f, [0.5] * 4, f, [0] * 4, topk=[1])
    with pytest.raises(ValueError, match="top-k"):
        eval_lib.retrieval_metrics(f, [0] * 4, f, [0] * 4, topk=[5])


@pytest.mark.parametrize("n_dev", [1, 8])
def test_topk_neighbors_equal_stable_sort(n_dev):
    rng = np.random.default_rng(5)
    qf = rng.integers(0, 2, (37, 4)).astype(np.float32)  # integer similarities: many ties
    gf = rng.integers(0, 2, (61, 4)).astype(np.float32)
    ql, gl = rng.integers(0, 4, 37), rng.integers(0, 4, 61)
    qi, gi = rng.integers(0, 2, 37), rng.integers(0, 2, 61)
    sim = qf @ gf.T
    sim = sim * metrics.keep_mask(ql, gl, qi, gi)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :9]
    scores, idx = eval_lib.topk_neighbors(
        qf, gf, 9, ql, gl, qi, gi, query_block=16, mesh=_mesh(n_dev)
    )
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_array_equal(scores, np.take_along_axis(sim, order, axis=1))
    with pytest.raises(ValueError, match="k must"):
        eval_lib.topk_neighbors(qf, gf, 62)


def test_normalize_option():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 5, 40)
    raw = _features(rng, labels) * rng.uniform(0.1, 10, (40, 1)).astype(np.float32)
    raw[0] = 0.0  # a zero feature stays zero (eps 1e-12), as in PaddleClas
    unit = l2_normalize(raw)
    assert np.all(unit[0] == 0)
    np.testing.assert_allclose(np.linalg.norm(unit[1:], axis=1), 1.0, rtol=1e-6)
    got = eval_lib.retrieval_metrics(
        raw, labels, raw, labels, np.arange(40), np.arange(40), normalize=True, mesh=_mesh(1)
    )
    want = _brute(unit, labels, unit, labels, np.arange(40), np.arange(40))
    _assert_same(got, want)


def test_metric_config_keys_in_paddleclas_order():
    """Metric.Eval resolves to metrics/top-k/keys whose values equal brute force."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
    import general_v2

    from jaxrec.config import resolve
    from jaxrec.errors import ConfigError

    c = general_v2.get_config()
    c.Arch.Backbone.pretrained = False
    c.Metric.Eval = [{"Recallk": {"topk": [1, 5]}}, {"mAP": {}}, {"Precisionk": {"topk": [2]}}]
    ev = resolve(c).eval
    assert ev.keys == ("recall1", "recall5", "mAP", "precision@2")
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 5, 30)
    f = _features(rng, labels)
    ids = np.arange(30)
    out = eval_lib.retrieval_metrics(
        f, labels, f, labels, ids, ids, topk=ev.topk, metrics=ev.metrics, mesh=_mesh(1)
    )
    full = _brute(
        f, labels, f, labels, ids, ids, topk=(1, 5, 2), metrics=("recall", "mAP", "precision")
    )
    for key in ev.keys:
        np.testing.assert_allclose(out[key], full[key], rtol=1e-12)
    c.Metric.Eval = [{"TopkAcc": {}}]
    with pytest.raises(ConfigError, match="Metric.Eval.0..TopkAcc: is not a retrieval metric"):
        resolve(c)
