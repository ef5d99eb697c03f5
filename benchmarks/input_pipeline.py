"""Input-pipeline throughput: jaxrec (Pillow + numpy) beside PaddleClas's cv2 operators.

Measures images/s on one core for the same real JPEG files, in the same run:

* ``decode``: encoded bytes -> uint8 RGB;
* ``eval``: decode + 224x224 bilinear resize (spec 6.4);
* ``train``: decode + the PP-ShiTuV2 train chain (resize, flip, pad, RandCropImageV2,
  RandomRotation, resize; spec 6.3), fresh random parameters per image.

The reference runs PaddleClas's own operator classes (``ppcls.data.preprocess.ops.operators``)
in the PaddleClas virtualenv as a subprocess, with ``cv2.setNumThreads(1)``. jaxrec runs
single-threaded for the per-core figure, then through :class:`jaxrec.data.loader.TrainLoader`
with several decode threads for the loader figure.

    python benchmarks/input_pipeline.py --images /work/PaddleClas/deploy/images --repeat 3
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REFERENCE_SCRIPT = r"""
import glob, json, os, sys, time
import cv2
import numpy as np
cv2.setNumThreads(1)
from ppcls.data.preprocess.ops.operators import (
    DecodeImage, Pad, RandCropImageV2, RandFlipImage, RandomRotation, ResizeImage)
files, repeat = json.loads(sys.argv[1]), int(sys.argv[2])
datas = [open(f, "rb").read() for f in files]
dec = DecodeImage(to_rgb=True, channel_first=False)
rs = lambda: ResizeImage(size=[224, 224], return_numpy=False, interpolation="bilinear",
                         backend="cv2")
train = [rs(), RandFlipImage(flip_code=1), Pad(padding=10, backend="cv2"),
         RandCropImageV2(size=[224, 224]),
         RandomRotation(prob=0.5, degrees=90, interpolation="bilinear"), rs()]
ev = [rs()]
def run(chain):
    t = time.perf_counter()
    for _ in range(repeat):
        for d in datas:
            x = dec(d)
            for op in chain:
                x = op(x)
    return len(datas) * repeat / (time.perf_counter() - t)
run(train)  # warm-up
print(json.dumps({"decode": run([]), "eval": run(ev), "train": run(train),
                  "cv2": cv2.__version__}))
"""


def reference(files: list[str], repeat: int, python: str, paddleclas: str) -> dict:
    env = dict(os.environ, PYTHONPATH=paddleclas, OMP_NUM_THREADS="1")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(REFERENCE_SCRIPT)
    try:
        out = subprocess.run(
            [python, f.name, json.dumps(files), str(repeat)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        os.unlink(f.name)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ours(files: list[str], repeat: int) -> dict:
    from jaxrec.data.image import decode_image
    from jaxrec.data.transforms import EvalTransform, TrainTransform, rng_for

    datas = [open(f, "rb").read() for f in files]
    train, ev = TrainTransform(), EvalTransform()

    def run(fn) -> float:
        t = time.perf_counter()
        n = 0
        for r in range(repeat):
            for i, d in enumerate(datas):
                fn(decode_image(d), r * len(datas) + i)
                n += 1
        return n / (time.perf_counter() - t)

    run(lambda x, i: train(x, rng_for(0, 0, i)))  # warm-up
    res = {
        "decode": run(lambda x, i: x),
        "eval": run(lambda x, i: ev(x)),
        "train": run(lambda x, i: train(x, rng_for(0, 0, i))),
    }
    # Stage split of the train chain (per image, ms) on decoded images.
    imgs = [decode_image(d) for d in datas]
    from jaxrec.data.image import resize_bilinear
    from jaxrec.data.transforms import AugParams, rotate

    t = time.perf_counter()
    small = [resize_bilinear(x, (224, 224)) for x in imgs]
    res["ms_resize_to_224"] = (time.perf_counter() - t) / len(imgs) * 1e3
    t = time.perf_counter()
    for x in small:
        rotate(x, 33.0)
    res["ms_rotate_224"] = (time.perf_counter() - t) / len(imgs) * 1e3
    t = time.perf_counter()
    for x in small:
        train.apply(x, AugParams(True, 21, 3, False, 0.0))
    res["ms_flip_pad_crop_resize223"] = (time.perf_counter() - t) / len(imgs) * 1e3
    return res


def loader_throughput(files: list[str], workers: int, batches: int) -> float:
    from jaxrec.data.datasets import Source
    from jaxrec.data.loader import TrainLoader
    from jaxrec.data.sampler import PKSampler

    labels = np.arange(len(files)) // 2
    src = Source(
        name="bench",
        paths=files,
        labels=labels.astype(np.int64),
        reader=lambda i: open(files[i], "rb").read(),
    )
    sampler = PKSampler(labels, 16, 2, sample_method="id_avg_prob")
    loader = TrainLoader(src, sampler, num_workers=workers, prefetch=2)
    next(loader)
    t = time.perf_counter()
    for _ in range(batches):
        next(loader)
    rate = batches * 16 / (time.perf_counter() - t)
    loader.close()
    return rate


def sampler_speed() -> dict:
    """PKSampler at the reference scale: ~5.59 M labels over 192,612 ids, the config's id_list."""
    from jaxrec.data.sampler import PKSampler

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(192612), rng.integers(1, 58, 192612))
    t = time.perf_counter()
    s = PKSampler(
        labels,
        256,
        4,
        sample_method="id_avg_prob",
        id_list=[50030, 80700, 92019, 96015],
        ratio=[4, 4],
        num_shards=8,
    )
    init = time.perf_counter() - t
    t = time.perf_counter()
    for step in range(20):
        s.batch(0, step, step % 8)
    return {
        "images": int(labels.size),
        "init_s": init,
        "ms_per_device_batch": (time.perf_counter() - t) / 20 * 1e3,
        "steps_per_epoch": s.steps_per_epoch,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default="/work/PaddleClas/deploy/images", help="folder of JPEGs")
    ap.add_argument("--pattern", default="*.jpg", help="file pattern, searched recursively")
    ap.add_argument("--max-images", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; best is kept")
    ap.add_argument("--paddle-python", default="/work/paddle_venv/bin/python")
    ap.add_argument("--paddleclas", default="/work/PaddleClas")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--loader-batches", type=int, default=10)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--sampler", action="store_true", help="also time PKSampler at full scale")
    args = ap.parse_args()

    files = sorted(glob.glob(os.path.join(args.images, "**", args.pattern), recursive=True))
    files = files[: args.max_images]
    if not files:
        raise SystemExit(f"no {args.pattern} files under {args.images}")
    sizes = [os.path.getsize(f) for f in files]
    from PIL import Image

    dims = [Image.open(f).size for f in files]
    print(
        f"{len(files)} files, mean {np.mean(sizes) / 1024:.0f} KiB, mean "
        f"{np.mean([d[0] for d in dims]):.0f}x{np.mean([d[1] for d in dims]):.0f} px, "
        f"repeat {args.repeat}"
    )
    res: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.ctime()}
    # Alternate the two pipelines for several rounds and keep each one's best round, so load
    # from other processes on shared cores penalizes neither side systematically.
    for _ in range(args.rounds):
        runs = {"jaxrec": ours(files, args.repeat)}
        if Path(args.paddle_python).exists():
            runs["paddleclas_cv2"] = reference(
                files, args.repeat, args.paddle_python, args.paddleclas
            )
        for name, r in runs.items():
            best = res.setdefault(name, r)
            for k, v in r.items():
                if k in ("decode", "eval", "train"):
                    best[k] = max(best[k], v)
                elif k.startswith("ms_"):
                    best[k] = min(best[k], v)
    res["jaxrec_loader"] = {
        "workers": args.workers,
        "train_images_per_s": loader_throughput(files, args.workers, args.loader_batches),
    }
    if args.sampler:
        res["pk_sampler"] = sampler_speed()
    for k in ("decode", "eval", "train"):
        ref = res.get("paddleclas_cv2", {}).get(k, float("nan"))
        mine = res["jaxrec"][k]
        print(f"{k:7s} images/s per core: jaxrec {mine:7.1f}   PaddleClas/cv2 {ref:7.1f}")
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.exit(main())
