"""Inference and vector-search benchmark: jaxrec exports vs Paddle Inference, faiss vs exact.

    /work/venv/bin/python benchmarks/inference.py [--work /tmp/jaxrec_bench_inference]
        [--paddle-python /work/paddle_venv/bin/python] [--rounds 5] [--threads 2]

1. Paddle side (a subprocess with the paddle venv running this file with --paddle-worker):
   build the full PPLCNetV2_base_ShiTu RecModel (BNNeck 512, a small FC head) with PaddleClas's
   `build_model`, give every BN random statistics/affine params (seeded), save `model.pdparams`,
   then do what `tools/export_model.py` does (eval, `re_parameterize`, `paddle.jit.save` with
   input spec [None, 3, 224, 224]) and create a Paddle Inference predictor with oneDNN
   (`enable_mkldnn`, `--threads` math threads, IR optimizations on). The worker then serves
   timing requests over stdin/stdout, so that all engines are timed interleaved, round by round.
2. jaxrec side: `python -m jaxrec.convert` turns the same `model.pdparams` into a model dir and
   `python -m jaxrec.export` writes the deploy model dir, the jax.export artifact and the ONNX
   graph (with its built-in equality check), both from the BN-folded Flax model. Features of
   Paddle Inference, onnxruntime and the jax.export artifact on the same 8 synthetic images are
   compared (cosine, max abs error).
3. Latency (batch 1) and throughput (batch 32) of the engines, interleaved in `--rounds`:
   Paddle Inference, onnxruntime (jaxrec's session: no thread spinning; and, with more than one
   thread, onnxruntime's default spinning threads), the jax.export artifact on XLA:CPU, and
   with --compare-onnx / --compare-jax-export another ONNX graph / jax.export artifact of the
   model (e.g. an earlier export's).
4. Gallery index: 100k x 512 random unit vectors, 1,000 queries, k 10, with `jaxrec.search`
   (faiss Flat, faiss HNSW32, exact numpy backend): build time, batched search time, and HNSW's
   recall@10 against exact search.

Prints a JSON summary and writes it to WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

HEAD_CLASSES = 16


def arch_config() -> dict:
    """Arch of GeneralRecognitionV2_PPLCNetV2_base.yaml with a small head and no download."""
    return {
        "name": "RecModel",
        "infer_output_key": "features",
        "infer_add_softmax": False,
        "Backbone": {
            "name": "PPLCNetV2_base_ShiTu",
            "pretrained": False,
            "use_ssld": False,
            "class_expand": 512,
        },
        "BackboneStopLayer": {"name": "flatten"},
        "Neck": {"name": "BNNeck", "num_features": 512},
        "Head": {"name": "FC", "embedding_size": 512, "class_num": HEAD_CLASSES},
    }


def bench_input(n: int, seed: int = 0) -> np.ndarray:
    """Deterministic normalized-looking NCHW float32 inputs."""
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 1.0, size=(n, 3, 224, 224)).astype(np.float32)


def timed(fn, x, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t)
    return out


# ------------------------------------------------------------------------------ paddle worker
def paddle_worker(args: argparse.Namespace) -> None:
    import paddle

    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
    )
    from paddle_ref import export_inference_model, onednn_predictor
    from paddleclas.ppcls.arch import build_model

    paddle.set_device("cpu")
    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = build_model({"Arch": arch_config(), "Global": {"device": "cpu"}})
    state = {}
    for key, t in model.state_dict().items():
        v = t.numpy()
        if key.endswith("._mean"):
            v = rng.normal(0.0, 0.2, v.shape)
        elif key.endswith("._variance"):
            v = rng.uniform(0.5, 2.0, v.shape)
        elif (".bn." in key or "feat_bn" in key) and key.endswith(".weight"):
            v = rng.uniform(0.5, 1.5, v.shape)
        elif (".bn." in key or "feat_bn" in key) and key.endswith(".bias"):
            v = rng.normal(0.0, 0.2, v.shape)
        elif key == "backbone.last_conv.bias":
            v = rng.normal(0.0, 0.1, v.shape)
        state[key] = np.asarray(v, np.float32)
    model.set_state_dict(state)
    model.eval()
    os.makedirs(args.work, exist_ok=True)
    paddle.save(model.state_dict(), os.path.join(args.work, "model.pdparams"))
    prefix = os.path.join(args.work, "paddle_inference", "inference")
    prog = export_inference_model(model, prefix)
    pred = onednn_predictor(prefix, args.threads)
    inp = pred.get_input_handle(pred.get_input_names()[0])
    out = pred.get_output_handle(pred.get_output_names()[0])

    def run(x):
        inp.reshape(x.shape)
        inp.copy_from_cpu(x)
        pred.run()
        return out.copy_to_cpu()

    x8 = bench_input(8)
    np.save(os.path.join(args.work, "paddle_infer_features.npy"), run(x8))
    info = {"paddle": paddle.__version__, "program": os.path.basename(prog)}
    print(json.dumps({"ready": info}), flush=True)
    cache = {}
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        bs, iters = int(cmd[1]), int(cmd[2])
        x = cache.setdefault(bs, bench_input(bs, seed=1))
        run(x)  # warm-up (first call at a new batch size builds oneDNN primitives)
        print(json.dumps({"times": timed(run, x, iters)}), flush=True)


class PaddleClient:
    """Talks to the paddle worker subprocess."""

    def __init__(self, python: str, work: str, threads: int, extra_env: dict | None = None):
        self.proc = subprocess.Popen(
            [python, os.path.abspath(__file__), "--paddle-worker", "--work", work,
             "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(threads), **(extra_env or {})},
        )  # fmt: skip
        self.info = self._read()["ready"]

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the paddle worker exited; see its stderr above")
            if line.startswith("{"):
                return json.loads(line)

    def times(self, bs: int, iters: int) -> list[float]:
        self.proc.stdin.write(f"run {bs} {iters}\n")
        self.proc.stdin.flush()
        return self._read()["times"]

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


def wait_for_paddle(log: str = "/work/paddle_install.log") -> None:
    while os.path.exists(log):
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - 200))
            if f.read().decode(errors="ignore").strip().endswith("done"):
                return
        print("waiting for the paddle venv to finish installing ...", flush=True)
        time.sleep(20)


# ------------------------------------------------------------------------------ jaxrec side
def _run(cmd: list[str]) -> str:
    print("+ " + " ".join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    print(res.stdout + res.stderr[-2000:], flush=True)
    if res.returncode != 0:
        raise SystemExit(f"command failed with exit code {res.returncode}: {' '.join(cmd)}")
    return res.stdout


def summarize(ts: list[float], batch: int) -> dict:
    a = np.asarray(ts)
    return {
        "median_ms": round(float(np.median(a)) * 1e3, 2),
        "p10_ms": round(float(np.percentile(a, 10)) * 1e3, 2),
        "p90_ms": round(float(np.percentile(a, 90)) * 1e3, 2),
        "images_per_s": round(batch / float(np.median(a)), 1),
        "n": int(a.size),
    }


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    cos = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    return {
        "min_cosine": float(cos.min()),
        "max_abs_err": float(np.abs(ref - got).max()),
        "max_abs_ref": float(np.abs(ref).max()),
    }


def index_bench(n: int, dim: int, nq: int, k: int, ivf: bool, threads: int) -> dict:
    from jaxrec.search import GalleryIndex, faiss_available

    if faiss_available():
        import faiss

        faiss.omp_set_num_threads(threads)

    # Clustered like real gallery features: n / 10 classes of 10 images around random centres
    # (within-class cosine about 0.8); queries are new samples of random classes.
    rng = np.random.default_rng(0)
    n_cls = max(1, n // 10)
    centres = rng.normal(size=(n_cls, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    cls = np.repeat(np.arange(n_cls), 10)[:n]
    feats = centres[cls] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    q_cls = rng.integers(0, n_cls, nq)
    q = centres[q_cls] + 0.5 * rng.normal(size=(nq, dim)).astype(np.float32) / np.sqrt(dim)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    labels = [str(c) for c in cls]
    paths = [f"g/{i}.jpg" for i in range(n)]
    res, exact_ids = {}, None
    runs = [
        ("exact numpy", "Flat", "exact", {}),
        ("faiss Flat", "Flat", "faiss", {}),
        ("faiss HNSW32 (efSearch 16, faiss default as in PP-ShiTu)", "HNSW32", "faiss", {}),
        ("faiss HNSW32, efSearch 128 (same index)", "HNSW32", "faiss", {"ef_search": 128}),
    ]
    if ivf:
        runs.append(("faiss IVF (nlist N/8, nprobe 1)", "IVF", "faiss", {}))
    idx = None
    for name, method, backend, params in runs:
        if params and idx is not None and idx.method == method:
            idx.set_search_params(**params)  # search-time knob: reuse the built index
            build = float("nan")
        else:
            idx = GalleryIndex(dim, "IP", method, backend=backend)
            t = time.perf_counter()
            idx.add(feats, labels, paths)
            build = time.perf_counter() - t
        idx.search(q[:10], k)
        t = time.perf_counter()
        _, ids = idx.search(q, k)
        search = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(50):
            idx.search(q[i : i + 1], k)
        single = (time.perf_counter() - t) / 50
        if exact_ids is None:
            exact_ids = ids
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact_ids, strict=True)])
        top1_label = float(np.mean(cls[ids[:, 0]] == q_cls))
        res[name] = {
            "build_s": None if build != build else round(build, 3),
            "search_1000_s": round(search, 3),
            "single_query_ms": round(single * 1e3, 3),
            "recall_at_10_vs_exact": round(float(recall), 4),
            "top1_label_accuracy": round(top1_label, 4),
        }
        print(name, res[name], flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", default="/tmp/jaxrec_bench_inference")
    ap.add_argument("--paddle-python", default="/work/paddle_venv/bin/python")
    ap.add_argument("--threads", type=int, default=2, help="threads for ORT and Paddle")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters1", type=int, default=20, help="batch-1 runs per engine per round")
    ap.add_argument("--iters32", type=int, default=2, help="batch-32 runs per engine per round")
    ap.add_argument("--index-n", type=int, default=100_000)
    ap.add_argument("--skip-paddle", action="store_true")
    ap.add_argument("--skip-index", action="store_true")
    ap.add_argument(
        "--paddle-passive",
        action="store_true",
        help="also time Paddle with OMP_WAIT_POLICY=PASSIVE (no spinning threads)",
    )
    ap.add_argument("--skip-engines", action="store_true", help="only the index benchmark")
    ap.add_argument(
        "--ivf", action="store_true", help="also IVF (k-means with N/8 centroids: minutes at 100k)"
    )
    ap.add_argument(
        "--compare-onnx",
        default=None,
        help="also time this ONNX graph (same input/output names; e.g. an earlier export of "
        "the same model) interleaved with the others, and compare its features",
    )
    ap.add_argument(
        "--compare-jax-export",
        default=None,
        help="also time this jax.export artifact (NHWC input) interleaved with the others",
    )
    ap.add_argument("--paddle-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.paddle_worker:
        paddle_worker(args)
        return

    import jax

    os.makedirs(args.work, exist_ok=True)
    summary: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join(sys.argv),
        "jax": jax.__version__,
        "threads": args.threads,
    }
    summary["loadavg_start"] = loadavg()
    path = os.path.join(args.work, "results.json")
    if not args.skip_engines:
        engine_bench(args, summary)
        summary["loadavg_after_engines"] = loadavg()
        save(summary, path)
    if not args.skip_index:
        summary["index"] = {
            "n": args.index_n, "dim": 512, "queries": 1000, "k": 10,
            "results": index_bench(args.index_n, 512, 1000, 10, args.ivf, args.threads),
        }  # fmt: skip
        summary["loadavg_end"] = loadavg()
        save(summary, path)
    print(json.dumps(summary, indent=1))


def loadavg() -> list[str] | None:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[:3]
    except OSError:
        return None


def save(summary: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)


def engine_bench(args: argparse.Namespace, summary: dict) -> None:
    """Export the model, check fidelity against Paddle Inference, time all engines."""
    import jax

    from jaxrec import export as E

    engines = {}
    paddle = None
    if not args.skip_paddle:
        wait_for_paddle()
        paddle = PaddleClient(args.paddle_python, args.work, args.threads)
        summary["paddle"] = paddle.info
        engines["paddle_inference_onednn"] = paddle.times
        if args.paddle_passive:
            passive = PaddleClient(
                args.paddle_python,
                os.path.join(args.work, "paddle_passive"),
                args.threads,
                {"OMP_WAIT_POLICY": "PASSIVE"},
            )
            engines["paddle_inference_onednn_omp_passive"] = passive.times
    pd = os.path.join(args.work, "model.pdparams")
    model_dir, out = os.path.join(args.work, "jaxrec_model"), os.path.join(args.work, "export")
    py = sys.executable
    if os.path.exists(pd):
        _run([py, "-m", "jaxrec.convert", "--pdparams", pd, "--out", model_dir, "--overwrite"])
    else:  # no paddle: a random full-size model, fed as a converted PaddleClas model
        from jaxrec.config import resolve_arch
        from jaxrec.data.preprocess import INFERENCE_REC
        from jaxrec.models import build_model, init_variables, save_model_dir

        arch = arch_config()
        model = build_model(resolve_arch(arch))
        variables = init_variables(model)
        save_model_dir(model_dir, arch, model, variables, preprocess=INFERENCE_REC, overwrite=True)
    t = time.perf_counter()
    _run([py, "-m", "jaxrec.export", "--model", model_dir, "--out", out, "--overwrite"])
    summary["export_seconds"] = round(time.perf_counter() - t, 1)
    summary["export_check"] = json.load(open(os.path.join(out, E.CHECK_FILE)))["results"]

    exp = jax.export.deserialize(bytearray(open(os.path.join(out, E.JAX_EXPORT_FILE), "rb").read()))
    call = jax.jit(exp.call)
    sess = E.onnx_session(os.path.join(out, E.ONNX_FILE), threads=args.threads)
    sess_spin = E.onnx_session(os.path.join(out, E.ONNX_FILE), threads=args.threads, spinning=True)

    def jax_run(x_nchw):
        return np.asarray(call(np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))))

    def ort_run(x_nchw):
        return sess.run(["features"], {"x": x_nchw})[0]

    def ort_spin_run(x_nchw):
        return sess_spin.run(["features"], {"x": x_nchw})[0]

    if args.compare_onnx:  # another ONNX graph of the same model, e.g. an earlier export's
        sess_other = E.onnx_session(args.compare_onnx, threads=args.threads)
        ref8 = ort_run(bench_input(8))
        other8 = sess_other.run(["features"], {"x": bench_input(8)})[0]
        summary["compare_onnx"] = {"path": args.compare_onnx, **compare(ref8, other8)}

    # Fidelity against Paddle Inference on the same inputs.
    x8 = bench_input(8)
    if paddle is not None:
        ref = np.load(os.path.join(args.work, "paddle_infer_features.npy"))
        summary["vs_paddle_inference"] = {
            "onnxruntime": compare(ref, ort_run(x8)),
            "jax_export": compare(ref, jax_run(x8)),
        }
        print(json.dumps(summary["vs_paddle_inference"], indent=1), flush=True)

    cache = {1: bench_input(1, seed=1), 32: bench_input(32, seed=1)}

    def local(fn):
        def times(bs, iters):
            x = cache[bs]
            fn(x)  # warm-up / compile for this batch size
            return timed(fn, x, iters)

        return times

    engines["onnxruntime"] = local(ort_run)
    if args.compare_onnx:
        engines["onnxruntime_compare_onnx"] = local(
            lambda x: sess_other.run(["features"], {"x": x})[0]
        )
    if args.compare_jax_export:
        with open(args.compare_jax_export, "rb") as f:
            call_other = jax.jit(jax.export.deserialize(bytearray(f.read())).call)
        engines["jax_export_xla_compare"] = local(
            lambda x: np.asarray(call_other(np.ascontiguousarray(x.transpose(0, 2, 3, 1))))
        )
    if args.threads > 1:
        engines["onnxruntime_spinning"] = local(ort_spin_run)
    engines["jax_export_xla"] = local(jax_run)
    collected = {(e, bs): [] for e in engines for bs in (1, 32)}
    for r in range(args.rounds):
        for bs, iters in ((1, args.iters1), (32, args.iters32)):
            for name, fn in engines.items():
                collected[(name, bs)] += fn(bs, iters)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    if paddle is not None:
        paddle.close()
    if args.paddle_passive:
        passive.close()
    summary["latency"] = {
        name: {f"batch{bs}": summarize(collected[(name, bs)], bs) for bs in (1, 32)}
        for name in engines
    }
    print(json.dumps(summary["latency"], indent=1), flush=True)


if __name__ == "__main__":
    main()
