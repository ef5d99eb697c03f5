"""int8 vs float32 ONNX on this CPU: the demo model and full-size general_v2 (random weights).

    /work/main/.venv/bin/python benchmarks/int8.py --demo-export /tmp/jaxrec_demo_export \
        --photos PHOTOS_DIR [--work /tmp/jaxrec_bench_int8] [--rounds 5] [--threads 2]

1. Demo: a copy of the demo export (`python -m jaxrec.export --workdir /tmp/jaxrec_demo ...`)
   gets its int8 graph with `jaxrec.export.int8.add_int8`, calibrated on 300 of the demo's
   training images and measured on its eval list (400 images, query == gallery): feature cosine
   distribution, top-1 agreement, Recall@1/5 and mAP of both graphs.
2. Full size: PPLCNetV2_base_ShiTu + BNNeck 512 (general_v2's RecModel without the head) with
   random weights and random BN statistics, 224 px, exported with `python -m jaxrec.export`;
   quantized on 300 crops of real photos (benchmarks/input_pipeline.py's `make_set` from the
   photos in PHOTOS_DIR, e.g. scikit-image 0.26's sample photos: astronaut, camera, chelsea,
   coffee, hubble_deep_field, motorcycle_left, retina, rocket, brick, grass, gravel, moon,
   coins) and compared with float32 on 200 other crops: cosine distribution and top-1
   agreement (random weights have no meaningful Recall@1).
3. Latency: batch 1 and batch 32 of both graphs of both models, interleaved round by round,
   median and min over `--rounds`, onnxruntime CPU sessions as jaxrec runs them (`--threads`
   threads, no spinning). When int8 is not 1.5x float32's throughput at batch 32, onnxruntime's
   profiler gives the time per operator type of one batch-32 run of each graph.

Prints a JSON summary and writes it to WORK/results.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def full_size_export(work: Path) -> Path:
    """general_v2's RecModel (no head) with random weights and BN statistics, exported."""
    import jax

    from jaxrec.data.preprocess import Preprocess
    from jaxrec.export import main as export_main
    from jaxrec.models import build_model, init_variables, save_model_dir

    out = work / "full_export"
    if (out / "inference.onnx").is_file():
        return out
    arch = {
        "name": "RecModel",
        "infer_output_key": "features",
        "Backbone": {"name": "PPLCNetV2_base_ShiTu", "pretrained": False, "class_expand": 512},
        "BackboneStopLayer": {"name": "flatten"},
        "Neck": {"name": "BNNeck", "num_features": 512},
    }
    v = init_variables(build_model(arch), seed=0, image_size=64)
    rng = np.random.default_rng(0)

    def randomize(path, a):
        last = getattr(path[-1], "key", "")
        if last == "mean":
            return rng.normal(0, 0.3, a.shape).astype(np.float32)
        if last == "var":
            return rng.uniform(0.3, 2.0, a.shape).astype(np.float32)
        return np.asarray(a)

    v = jax.tree_util.tree_map_with_path(randomize, v)
    save_model_dir(work / "full_model", arch, v, preprocess=Preprocess())
    rc = export_main(["--model", str(work / "full_model"), "--out", str(out), "--platforms", "cpu"])
    if rc != 0:
        raise SystemExit(f"full-size export failed (rc {rc})")
    return out


def photo_crops(photos_dir: Path, work: Path) -> tuple[list[str], list[str]]:
    from input_pipeline import make_set

    from jaxrec.data.lists import find_images

    photos = [p for _, p in find_images(photos_dir)]
    if not photos:
        raise SystemExit(f"no photos in {photos_dir}")
    sets = []
    for name, n, seed in (("calib", 300, 0), ("held", 200, 1)):
        d = work / f"crops_{name}"
        if not d.is_dir():
            make_set(photos, str(d), n=n, seed=seed)
        sets.append(sorted(str(p) for p in d.glob("*.jpg")))
    return sets[0], sets[1]


def latency(sessions: dict, inputs: dict, rounds: int) -> dict:
    """Median and min ms per run of every (name, batch), interleaved round by round (on a shared
    CPU the min is the least disturbed figure)."""
    times = collections.defaultdict(list)
    for sess_name, sess in sessions.items():  # warm-up
        for x in inputs[sess_name.split("/")[0]].values():
            sess.run(None, {"x": x})
    for _ in range(rounds):
        for sess_name, sess in sessions.items():
            for b, x in inputs[sess_name.split("/")[0]].items():
                n = max(1, int(8 // b) + 1) if b == 1 else 2
                t = time.perf_counter()
                for _ in range(n):
                    sess.run(None, {"x": x})
                times[(sess_name, b)].append((time.perf_counter() - t) / n * 1000)
    return {
        f"{k[0]}@{k[1]}": {"median": float(np.median(v)), "min": float(np.min(v))}
        for k, v in times.items()
    }


def op_profile(path: str, x: np.ndarray, threads: int) -> dict[str, float]:
    """ms per operator type in one run (onnxruntime's profiler)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "prof")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    sess.run(None, {"x": x})
    sess.run(None, {"x": x})
    prof = sess.end_profiling()
    events = json.load(open(prof))
    per = collections.Counter()
    runs = [e for e in events if e.get("name") == "model_run"]
    last_start = runs[-1]["ts"] if runs else 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last_start:
            per[e["args"]["op_name"]] += e["dur"] / 1000
    return {k: round(v, 2) for k, v in per.most_common(8)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo-export", required=True)
    ap.add_argument("--work", default="/tmp/jaxrec_bench_int8")
    ap.add_argument("--photos", required=True, help="a folder of real photos")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import onnxruntime as ort

    from jaxrec.export import int8
    from jaxrec.export.artifacts import onnx_session
    from jaxrec.models.modeldir import read_specs

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "loadavg_before": open("/proc/loadavg").read().split()[:3],
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": next(
            (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if "model name" in ln),
            "?",
        ),
        "cpu_flags": sorted(
            f
            for f in open("/proc/cpuinfo").read().split()
            if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
        ),
        "onnxruntime": ort.__version__,
        "threads": args.threads,
    }
    # 1. demo
    demo = work / "demo_export"
    if demo.exists():
        shutil.rmtree(demo)
    shutil.copytree(args.demo_export, demo)
    demo_pre = read_specs(demo)[0]
    ok, rep = int8.add_int8(
        demo,
        demo_pre,
        str(ROOT / "data/demo/train_list.txt"),
        str(ROOT / "data/demo/query_gallery_list.txt"),
    )
    res["demo"] = {k: rep[k] for k in ("ok", "reason", "calibration", "eval")}
    # 2. full size
    full = full_size_export(work)
    full_pre = read_specs(full)[0]
    calib, held = photo_crops(Path(args.photos), work)
    xc = int8.load_nchw(calib, full_pre)
    xh = int8.load_nchw(held, full_pre)
    t = time.time()
    int8.quantize(full / "inference.onnx", full / int8.INT8_FILE, xc)
    f32 = int8.run_onnx(full / "inference.onnx", xh)
    i8 = int8.run_onnx(full / int8.INT8_FILE, xh)
    res["full"] = {
        "quantize_seconds": round(time.time() - t, 1),
        "held_out_crops": len(xh),
        "cosine": int8.cosine_stats(f32, i8),
        "top1_agreement": int8.top1_agreement(f32, i8),
    }
    # 3. latency
    sessions, inputs = {}, {}
    for name, d, x in (("demo", demo, None), ("full", full, xh)):
        if x is None:
            files, _, _ = int8.read_eval_list(str(ROOT / "data/demo/query_gallery_list.txt"))
            x = int8.load_nchw(files[:32], demo_pre)
        inputs[name] = {1: np.ascontiguousarray(x[:1]), 32: np.ascontiguousarray(x[:32])}
        sessions[f"{name}/float32"] = onnx_session(str(d / "inference.onnx"), args.threads)
        sessions[f"{name}/int8"] = onnx_session(str(d / int8.INT8_FILE), args.threads)
    lat = latency(sessions, inputs, args.rounds)
    res["latency_ms"] = lat
    res["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    for name, d in (("demo", demo), ("full", full)):
        for b in (1, 32):
            f, q = lat[f"{name}/float32@{b}"], lat[f"{name}/int8@{b}"]
            res[name][f"speedup_batch{b}"] = {k: round(f[k] / q[k], 3) for k in ("median", "min")}
        if min(res[name]["speedup_batch32"].values()) < 1.5:
            x = inputs[name][32]
            res[name]["profile_ms_batch32"] = {
                "float32": op_profile(str(d / "inference.onnx"), x, args.threads),
                "int8": op_profile(str(d / int8.INT8_FILE), x, args.threads),
            }
    print(json.dumps(res, indent=1))
    (work / "results.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
