"""Produce retrieval-metric fixtures with PaddleClas's metric classes (run in the paddle venv).

    PYTHONPATH=/work/PaddleClas /work/paddle_venv/bin/python tools/golden_metrics.py \
        --out tests/fixtures/metric_golden.npz

Each case stores a similarity matrix, labels, optional ids and the metrics that PaddleClas
reports. The evaluation loop follows ``ppcls/engine/evaluation/retrieval.py``: query blocks of
64, similarity multiplied by the keep mask when ids exist, per-block ``Recallk``, ``mAP``,
``Precisionk`` (and ``mINP`` without ids, its keep-mask branch is broken), combined with weights
``block_size / num_query``. Tie cases run with ``paddle.argsort(..., stable=True)`` patched in:
PaddleClas's unstable CPU argsort has no defined tie order, the stable one matches jaxrec's rule.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

TOPK = [1, 5, 10]


def reference_eval(paddle, metrics_mod, sim, ql, gl, qid, gid, with_minp, topk):
    recall = metrics_mod.Recallk(topk=topk)
    m_ap = metrics_mod.mAP()
    prec = metrics_mod.Precisionk(topk=topk)
    minp = metrics_mod.mINP()
    num_query = sim.shape[0]
    out = defaultdict(float)
    g_label = paddle.to_tensor(gl.reshape(-1, 1))
    for s in range(0, num_query, 64):
        e = min(s + 64, num_query)
        dist = paddle.to_tensor(sim[s:e])
        q_label = paddle.to_tensor(ql[s:e].reshape(-1, 1))
        keep = None
        if qid is not None:
            keep = (q_label != g_label.t()) | (
                paddle.to_tensor(qid[s:e].reshape(-1, 1)) != paddle.to_tensor(gid.reshape(1, -1))
            )
            dist = keep.astype("float32") * dist
        block = {}
        block.update(recall(dist, q_label, g_label, keep))
        block.update(m_ap(dist, q_label, g_label, keep))
        # Precisionk divides float32 by an int64 arange, which Paddle 3 rejects (Paddle 2
        # promoted it); hand it a float32 arange, the value Paddle 2 computed.
        arange = paddle.arange
        paddle.arange = lambda *a, _f=arange, **kw: _f(*a, **kw).astype("float32")
        try:
            block.update(prec(dist, q_label, g_label, keep))
        finally:
            paddle.arange = arange
        if with_minp:
            block.update(minp(dist, q_label, g_label, keep))
        for key, value in block.items():
            out[key] += float(value) * (e - s) / num_query
    return dict(out)


def rerank_fixture(paddle, metrics_mod, rng, out_path):
    """Re-ranking: PaddleClas's compute_re_ranking_dist and the metrics on -distmat."""
    from ppcls.engine.evaluation.retrieval import compute_re_ranking_dist

    arrays, meta = {}, {}
    for name, same in (("sep", False), ("self_ids", True)):
        nq, ng, d = (40, 40, 8) if same else (30, 50, 8)
        gl = rng.integers(0, 8, ng)
        centers = rng.standard_normal((8, d))
        gf = centers[gl] + 0.8 * rng.standard_normal((ng, d))
        gf = (gf / np.linalg.norm(gf, axis=1, keepdims=True)).astype(np.float32)
        if same:
            ql, qf = gl, gf
            qid = gid = np.arange(ng)
        else:
            ql = rng.integers(0, 8, nq)
            qf = centers[ql] + 0.8 * rng.standard_normal((nq, d))
            qf = (qf / np.linalg.norm(qf, axis=1, keepdims=True)).astype(np.float32)
            qid = gid = None
        dist = compute_re_ranking_dist(paddle.to_tensor(qf), paddle.to_tensor(gf), True, 20, 6, 0.3)
        q_label = paddle.to_tensor(ql.reshape(-1, 1).astype(np.int64))
        g_label = paddle.to_tensor(gl.reshape(-1, 1).astype(np.int64))
        keep = None
        if same:
            cam_q = paddle.to_tensor(qid.reshape(-1, 1).astype(np.int64))
            cam_g = paddle.to_tensor(gid.reshape(-1, 1).astype(np.int64))
            keep = (q_label != g_label.t()) | (cam_q != cam_g.t())
            dist = keep.astype("float32") * dist + (~keep).astype("float32") * (dist.max() + 1)
        values = {}
        values.update(metrics_mod.Recallk(topk=[1, 5])(-dist, q_label, g_label, keep))
        values.update(metrics_mod.mAP()(-dist, q_label, g_label, keep))
        values = {k: float(v) for k, v in values.items()}
        arrays[f"{name}/qf"], arrays[f"{name}/gf"] = qf, gf
        arrays[f"{name}/ql"], arrays[f"{name}/gl"] = ql, gl
        arrays[f"{name}/dist"] = dist.numpy()
        if same:
            arrays[f"{name}/qid"], arrays[f"{name}/gid"] = qid, gid
        meta[name] = {"values": values}
        print("rerank", name, values)
    arrays["meta_json"] = np.array(json.dumps(meta))
    np.savez_compressed(out_path, **arrays)
    print("wrote", out_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/fixtures/metric_golden.npz")
    parser.add_argument("--rerank-out", default="tests/fixtures/metric_rerank.npz")
    args = parser.parse_args()

    import paddle
    from ppcls.metric import metrics as metrics_mod
    from ppcls.utils import logger

    logger.init_logger()

    paddle.set_device("cpu")
    rng = np.random.default_rng(8_4)
    cases = {}

    def add(name, sim, ql, gl, qid=None, gid=None, ties=False):
        cases[name] = dict(sim=sim.astype(np.float32), ql=ql, gl=gl, qid=qid, gid=gid, ties=ties)

    # Spec 8.4 worked example.
    sim = np.array(
        [[0.9, 0.8, 0.1, 0.7, 0.2], [0.1, 0.95, 0.3, 0.2, 0.6], [0.5, 0.4, 0.3, 0.2, 0.1]]
    )
    ql, gl = np.array([1, 2, 9]), np.array([1, 2, 1, 2, 2])
    add("spec84_nomask", sim, ql, gl)
    add("spec84_mask", sim, ql, gl, np.array([0, 1, 2]), np.array([0, 1, 0, 3, 1]))

    def features(n, labels, d=16):
        centers = rng.standard_normal((labels.max() + 1, d))
        f = centers[labels] * 0.7 + rng.standard_normal((n, d))
        return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)

    # Separate query / gallery, some query labels absent from the gallery, 3 blocks (64, 64, 22).
    ql = rng.integers(0, 40, 150)
    gl = rng.integers(0, 35, 300)
    qf, gf = features(150, ql), features(300, gl)
    add("random_sep", qf @ gf.T, ql, gl)

    # Query == gallery with unique ids (self-match excluded), as the PP-ShiTu eval set.
    labels = rng.integers(0, 50, 200)
    f = features(200, labels)
    ids = np.arange(200)
    add("random_self_ids", f @ f.T, labels, labels, ids, ids)

    # Camera-style ids (several items share one id) and a whole block without valid queries.
    ql = rng.integers(0, 30, 140)
    ql[64:128] += 1000  # block 2 has no relevant gallery item -> NaN recall/mAP
    gl = rng.integers(0, 30, 120)
    qf, gf = features(140, ql % 1000 + 0), features(120, gl)
    add("random_nan_block", qf @ gf.T, ql, gl)
    add("random_cams", qf @ gf.T, ql % 1000, gl, rng.integers(0, 3, 140), rng.integers(0, 3, 120))

    # Ties: similarities quantized to 0.1 steps.
    ql = rng.integers(0, 10, 100)
    gl = rng.integers(0, 10, 80)
    sim = np.round(rng.uniform(-1, 1, (100, 80)), 1)
    add("ties_nomask", sim, ql, gl, ties=True)
    add("ties_mask", sim, ql, gl, rng.integers(0, 2, 100), rng.integers(0, 2, 80), ties=True)

    arrays, meta = {}, {}
    original_argsort = paddle.argsort
    for name, c in cases.items():
        if c["ties"]:
            paddle.argsort = lambda x, axis=-1, descending=False, **kw: original_argsort(
                x, axis=axis, descending=descending, stable=True
            )
        else:
            # Exact comparisons need rows without ties among relevant/irrelevant items.
            for row in c["sim"]:
                vals = row[row != 0]
                assert np.unique(vals).size == vals.size, name
        topk = TOPK if c["sim"].shape[1] >= max(TOPK) else [1, 5]
        try:
            values = reference_eval(
                paddle,
                metrics_mod,
                c["sim"],
                c["ql"].astype(np.int64),
                c["gl"].astype(np.int64),
                None if c["qid"] is None else c["qid"].astype(np.int64),
                None if c["gid"] is None else c["gid"].astype(np.int64),
                with_minp=c["qid"] is None,
                topk=topk,
            )
        finally:
            paddle.argsort = original_argsort
        for key in ("sim", "ql", "gl", "qid", "gid"):
            if c[key] is not None:
                arrays[f"{name}/{key}"] = c[key]
        meta[name] = {"values": values, "ties": c["ties"], "topk": topk}
        print(name, values)
    arrays["meta_json"] = np.array(json.dumps(meta))
    np.savez_compressed(args.out, **arrays)
    print("wrote", args.out)
    rerank_fixture(paddle, metrics_mod, np.random.default_rng(85), args.rerank_out)


if __name__ == "__main__":
    main()
