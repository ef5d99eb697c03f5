"""Benchmark: exact retrieval evaluation, jaxrec's evaluator vs PaddleClas's block-wise loop.

    /work/venv/bin/python benchmarks/eval_retrieval.py --num 100000 --paddle-queries 2048

Synthetic PP-ShiTu-style data: query == gallery (``--num`` items, 512-d, L2-normalized, labels
from ``--classes`` classes, unique ids so that each image's self-match is excluded). Each method
runs in its own child process, which reports the evaluation time and its own peak RSS
(``ru_maxrss``, whole process: Python, libraries, data; the features alone are
num x 512 x 4 bytes).

- ``jaxrec``: ``jaxrec.evaluation.retrieval_metrics`` on the full set.
- ``paddle``: the loop of ``ppcls/engine/evaluation/retrieval.py`` (query blocks of 64,
  similarity matmul, keep mask, ``Recallk`` and ``mAP`` from ``ppcls.metric``) in the PaddleClas
  venv, on the first ``--paddle-queries`` queries against the full gallery; its time is also
  extrapolated linearly to all queries (the loop's cost is proportional to the number of blocks).
- ``jaxrec`` is also run on that same query subset so both metric values can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

PADDLE_PYTHON = "/work/paddle_venv/bin/python"
PADDLECLAS = "/work/PaddleClas"


def make_data(out_dir: str, num: int, classes: int, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, num)
    centers = rng.standard_normal((classes, dim)).astype(np.float32)
    feats = np.empty((num, dim), np.float32)
    for s in range(0, num, 10_000):
        e = min(s + 10_000, num)
        f = centers[labels[s:e]] * 0.35 + rng.standard_normal((e - s, dim)).astype(np.float32)
        feats[s:e] = f / np.linalg.norm(f, axis=1, keepdims=True)
    np.save(os.path.join(out_dir, "feats.npy"), feats)
    np.save(os.path.join(out_dir, "labels.npy"), labels.astype(np.int64))


def worker_jaxrec(data_dir: str, num_queries: int) -> dict:
    from jaxrec.evaluation import retrieval as eval_lib

    feats = np.load(os.path.join(data_dir, "feats.npy"))
    labels = np.load(os.path.join(data_dir, "labels.npy"))
    ids = np.arange(labels.size)
    nq = num_queries or labels.size
    t0 = time.perf_counter()
    out = eval_lib.retrieval_metrics(
        feats[:nq], labels[:nq], feats, labels, ids[:nq], ids, topk=(1, 5), progress=True
    )
    return {"seconds": time.perf_counter() - t0, "metrics": out}


def worker_paddle(data_dir: str, num_queries: int) -> dict:
    import paddle
    from ppcls.metric.metrics import Recallk, mAP

    paddle.set_device("cpu")
    feats = np.load(os.path.join(data_dir, "feats.npy"))
    labels = np.load(os.path.join(data_dir, "labels.npy")).reshape(-1, 1)
    ids = np.arange(labels.size).reshape(-1, 1)
    nq = num_queries or labels.size
    t0 = time.perf_counter()
    gallery = paddle.to_tensor(feats)
    g_label, g_id = paddle.to_tensor(labels), paddle.to_tensor(ids)
    recall, m_ap = Recallk(topk=[1, 5]), mAP()
    totals = {"recall1": 0.0, "recall5": 0.0, "mAP": 0.0}
    for s in range(0, nq, 64):
        e = min(s + 64, nq)
        q = paddle.to_tensor(feats[s:e])
        q_label, q_id = paddle.to_tensor(labels[s:e]), paddle.to_tensor(ids[s:e])
        dist = paddle.matmul(q, gallery, transpose_y=True)
        keep = (q_label != g_label.t()) | (q_id != g_id.t())
        dist = keep.astype("float32") * dist
        block = {}
        block.update(recall(dist, q_label, g_label, keep))
        block.update(m_ap(dist, q_label, g_label, keep))
        for key in totals:
            totals[key] += float(block[key]) * (e - s) / nq
    return {"seconds": time.perf_counter() - t0, "metrics": totals}


def run_child(method: str, data_dir: str, num_queries: int) -> dict:
    python = PADDLE_PYTHON if method == "paddle" else sys.executable
    env = dict(os.environ)
    if method == "paddle":
        env["PYTHONPATH"] = PADDLECLAS
        # ``import paddle`` sets OMP_NUM_THREADS=1 unless it is set: give it every core.
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    cmd = [python, os.path.abspath(__file__), "--worker", method, "--data", data_dir]
    cmd += ["--worker-queries", str(num_queries)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{method} worker failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(method=method, queries=num_queries, process_wall_s=wall)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=100_000, help="queries = gallery items")
    parser.add_argument("--classes", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--paddle-queries", type=int, default=2048)
    parser.add_argument("--skip-full", action="store_true", help="skip jaxrec on all queries")
    parser.add_argument("--data", default="/tmp/jaxrec_bench_eval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=["jaxrec", "paddle"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-queries", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        fn = worker_paddle if args.worker == "paddle" else worker_jaxrec
        result = fn(args.data, args.worker_queries)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    os.makedirs(args.data, exist_ok=True)
    make_data(args.data, args.num, args.classes, args.dim, args.seed)
    print(f"data: {args.num} x {args.dim}, {args.classes} classes, query == gallery, unique ids")
    print(f"load average at start: {os.getloadavg()}")
    runs = [("paddle", args.paddle_queries), ("jaxrec", args.paddle_queries)]
    if not args.skip_full:
        runs.append(("jaxrec", args.num))
    results = []
    for method, nq in runs:
        r = run_child(method, args.data, nq)
        results.append(r)
        print(json.dumps(r), flush=True)
    sub = [r for r in results if r["queries"] == args.paddle_queries]
    paddle_r = next(r for r in sub if r["method"] == "paddle")
    scale = args.num / args.paddle_queries
    print(
        f"paddle extrapolated to {args.num} queries: {paddle_r['seconds'] * scale:.0f} s "
        f"(x{scale:.1f} of the measured {paddle_r['seconds']:.1f} s)"
    )
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
