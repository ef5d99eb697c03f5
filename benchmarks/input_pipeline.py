"""Input-pipeline throughput on real-size JPEGs: every variant in one run, CPU ms per image.

Each variant runs in its own subprocess on the same files, one after the other:

* ``decode_floor``: ``cv2.imdecode`` alone (libjpeg-turbo) on the original JPEGs, one thread;
  no pipeline on these files can use less CPU per image;
* ``baseline`` (with ``--baseline-tree``): the loader of an older checkout of jaxrec, as is;
* ``numpy``: Pillow decode and the numpy kernels (``JAXREC_NO_OPENCV=1``) in today's loader;
* ``opencv``: the original JPEGs with the OpenCV kernels (the default path);
* ``prepared_jpeg`` / ``prepared_raw``: sets written by ``python -m jaxrec.prepare`` (224 px,
  JPEG quality 95 4:4:4 / raw pixels);
* ``prepared_floor``: ``cv2.imdecode`` alone on the prepared JPEGs.

The pipeline variants run :class:`jaxrec.data.loader.TrainLoader` with the full PP-ShiTuV2 train
chain (PK sampler, decode, resize, flip, pad, RandCropImageV2, RandomRotation, resize) and
report CPU ms per image = process CPU time (decode threads, sampler, batching: all threads) per
image, which is what a host core must spend; images/s per core is 1000 / that. The wall-clock
rate with ``--workers`` threads is printed too, but on a shared machine only CPU time is stable.
``minflt`` is minor page faults per image (the allocator cost ``configure_decoding`` removes).

The image set: ``--make-set DIR`` cuts N JPEGs from real photos (by default 26 photos shipped in
a PaddleClas checkout, ``--photos-root``): random crop of 45-100 % of the area, random flip,
resized to 760-1132 px wide with aspect 0.62-1.05 (mean about 946 x 789), quality 93, about
170 KiB each.

    python benchmarks/input_pipeline.py --make-set /tmp/jpegs500
    python benchmarks/input_pipeline.py --images /tmp/jpegs500 --json /tmp/input_pipeline.json

``--reference`` adds PaddleClas's own cv2 operators (single thread, decode + train chain) run
in the PaddleClas virtualenv (``--paddle-python``, ``--paddleclas``); ``--sampler`` times
PKSampler at the reference's scale.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Real photos in a PaddleClas checkout (product shots, street and indoor scenes, vehicles, plants).
PHOTOS = """
deploy/lite_shitu/images/demo.jpeg deploy/images/anmuxi.jpg deploy/images/coco_000000570688.jpg
deploy/images/PULC/clarity_assessment/clarity_demo.jpg
deploy/images/PULC/car_exists/objects365_00001507.jpeg
deploy/images/PULC/car_exists/objects365_00001521.jpeg deploy/images/PULC/image_orientation/0.jpg
deploy/images/PULC/image_orientation/1.jpg deploy/images/PULC/person_exists/objects365_01780782.jpg
deploy/images/PULC/person_exists/objects365_02035329.jpg deploy/paddleserving/daisy.jpg
docs/images/recognition/drink_data_demo/test_images/100.jpeg
docs/images/recognition/drink_data_demo/test_images/youjia.jpeg
docs/images/recognition/drink_data_demo/test_images/nongfu_spring.jpeg
docs/images/recognition/drink_data_demo/test_images/mosilian.jpeg
docs/images/recognition/vehicle/cars.JPG docs/images/recognition/product_demo/gallery/anmuxi/003.jpg
docs/images/recognition/product_demo/gallery/anmuxi/001.jpg
docs/images/quick_start/flowers102/image_06767.jpg
docs/images/ppshitu_application_scenarios/Boat.jpg
docs/images/ppshitu_application_scenarios/Shoes.jpeg
docs/images/ppshitu_application_scenarios/Paris.jpg
docs/images/ppshitu_application_scenarios/AnimalImageDataset.jpg
docs/images/ppshitu_application_scenarios/WildEdiblePlants.jpg
deploy/images/PULC/clarity_assessment/blured_demo.jpg
docs/images/PULC/docs/safety_helmet_data_demo.jpg
""".split()

LOADER_VARIANTS = ("numpy", "opencv", "prepared_jpeg", "prepared_raw")
MIN_IMAGES = {"numpy": 320, "opencv": 640, "prepared_jpeg": 3200, "prepared_raw": 6400}


def make_set(photos: list[str], out: str, n: int = 500, seed: int = 0, quality: int = 93) -> dict:
    """N natural JPEGs of real-photo size cut from ``photos`` (deterministic in ``seed``)."""
    from PIL import Image

    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    ims = [Image.open(p).convert("RGB") for p in photos]
    stats = []
    for i in range(n):
        im = ims[i % len(ims)]
        big_w, big_h = im.size
        w = int(rng.uniform(760, 1132))
        h = int(w * rng.uniform(0.62, 1.05))
        aspect = w / h
        frac = rng.uniform(0.45, 1.0)
        cw = min(big_w, int(np.sqrt(frac * big_w * big_h * aspect)))
        ch = min(big_h, int(cw / aspect))
        cw = int(ch * aspect)
        x0 = int(rng.integers(0, big_w - cw + 1))
        y0 = int(rng.integers(0, big_h - ch + 1))
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        path = os.path.join(out, f"{i:04d}.jpg")
        im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC).save(
            path, quality=quality
        )
        stats.append((w, h, os.path.getsize(path)))
    s = np.asarray(stats, float)
    return {
        "images": n,
        "mean_w": s[:, 0].mean(),
        "mean_h": s[:, 1].mean(),
        "kib": s[:, 2].mean() / 1024,
    }


def _describe_set(files: list[str]) -> dict:
    from PIL import Image

    dims = np.asarray([Image.open(f).size for f in files], float)
    kib = np.mean([os.path.getsize(f) for f in files]) / 1024
    return {
        "images": len(files),
        "mean_w": dims[:, 0].mean(),
        "mean_h": dims[:, 1].mean(),
        "kib": kib,
    }


def _usage() -> tuple[float, resource.struct_rusage]:
    return time.process_time(), resource.getrusage(resource.RUSAGE_SELF)


def _per_image(start, n: int, wall: float) -> dict:
    c0, r0 = start
    c1, r1 = _usage()
    cpu_ms = (c1 - c0) / n * 1e3
    return {
        "images": n,
        "cpu_ms_per_image": cpu_ms,
        "images_per_s_per_core": 1e3 / cpu_ms,
        "wall_images_per_s": n / wall,
        "user_ms": (r1.ru_utime - r0.ru_utime) / n * 1e3,
        "sys_ms": (r1.ru_stime - r0.ru_stime) / n * 1e3,
        "minflt": (r1.ru_minflt - r0.ru_minflt) / n,
    }


# ---- workers (run in subprocesses) --------------------------------------------------------------


def worker_decode(files: list[str], repeat: int) -> dict:
    import cv2

    cv2.setNumThreads(0)
    datas = [np.frombuffer(Path(f).read_bytes(), np.uint8) for f in files]
    cv2.imdecode(datas[0], cv2.IMREAD_COLOR)
    start, t = _usage(), time.perf_counter()
    for _ in range(repeat):
        for d in datas:
            cv2.imdecode(d, cv2.IMREAD_COLOR)
    return _per_image(start, len(datas) * repeat, time.perf_counter() - t)


def worker_loader(source_spec: str, workers: int, min_images: int, min_seconds: float) -> dict:
    import inspect

    from jaxrec.data import datasets, image
    from jaxrec.data.loader import TrainLoader
    from jaxrec.data.sampler import PKSampler
    from jaxrec.data.transforms import TrainTransform

    kind, path = source_spec.split(":", 1)
    if kind == "list":
        src = datasets.load_list(path, "/")
    else:
        src = datasets.load_prepared(path, size=224)
    sampler = PKSampler(src.labels, 32, 4, sample_method="id_avg_prob")
    kwargs = {"num_workers": workers, "prefetch": 4, "device_prefetch": 0}
    accepted = inspect.signature(TrainLoader).parameters  # --baseline-tree: an older loader
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    loader = TrainLoader(src, sampler, TrainTransform(), **kwargs)
    for _ in range(2):
        next(loader)
    start, t = _usage(), time.perf_counter()
    n = 0
    while n < min_images or time.perf_counter() - t < min_seconds:
        n += next(loader)["image"].shape[0]
    out = _per_image(start, n, time.perf_counter() - t)
    loader.close()
    cv2 = getattr(image, "cv2", None)
    out["opencv"] = None if cv2 is None else cv2.__version__
    return out


def worker_stages(files: list[str]) -> dict:
    """Single-thread stage costs of the default (OpenCV) path, ms per image."""
    from jaxrec.data.image import configure_decoding, decode_image
    from jaxrec.data.transforms import TrainTransform, rng_for

    configure_decoding()
    t = TrainTransform()
    datas = [Path(f).read_bytes() for f in files]
    stages = {"decode": 0.0, "resize_to_224": 0.0, "augment": 0.0}
    for i, d in enumerate(datas):
        c0 = time.process_time()
        img = decode_image(d)
        c1 = time.process_time()
        x = t.prepare(img)
        c2 = time.process_time()
        t.apply_prepared(x, t.sample(rng_for(0, 0, i)))
        c3 = time.process_time()
        stages["decode"] += c1 - c0
        stages["resize_to_224"] += c2 - c1
        stages["augment"] += c3 - c2
    return {k: v / len(datas) * 1e3 for k, v in stages.items()}


def worker_prepare(list_file: str, out: str, codec: str, workers: int) -> dict:
    from jaxrec.data.datasets import load_list
    from jaxrec.prepare import PrepareSettings, prepare

    src = load_list(list_file, "/")
    start, t = _usage(), time.perf_counter()
    prepare(src, out, PrepareSettings(224, codec), workers=workers)
    res = _per_image(start, len(src), time.perf_counter() - t)
    res["bytes_per_image"] = sum(p.stat().st_size for p in Path(out, "shards").glob("*.bin")) / len(
        src
    )
    return res


def worker_jpeg_error(list_file: str, prepared: str) -> dict:
    """How far the prepared JPEGs are from the exact prepared images (decode + 224 resize)."""
    from jaxrec.data.datasets import load_list, load_prepared
    from jaxrec.data.image import decode_image
    from jaxrec.data.transforms import TrainTransform

    exact, stored = load_list(list_file, "/"), load_prepared(prepared)
    prep = TrainTransform().prepare
    diffs = [
        np.abs(prep(decode_image(exact.read(i))).astype(int) - decode_image(stored.read(i)))
        for i in range(len(exact))
    ]
    mse = np.mean([np.mean(d.astype(float) ** 2) for d in diffs])
    return {
        "mean_abs": float(np.mean([d.mean() for d in diffs])),
        "p99_abs": float(np.mean([np.percentile(d, 99) for d in diffs])),
        "max_abs": int(max(d.max() for d in diffs)),
        "psnr_db": float(10 * np.log10(255**2 / mse)),
    }


REFERENCE_SCRIPT = r"""
import json, sys, time
import cv2
cv2.setNumThreads(1)
from ppcls.data.preprocess.ops.operators import (
    DecodeImage, Pad, RandCropImageV2, RandFlipImage, RandomRotation, ResizeImage)
files = json.loads(sys.argv[1])
datas = [open(f, "rb").read() for f in files]
dec = DecodeImage(to_rgb=True, channel_first=False)
rs = lambda: ResizeImage(size=[224, 224], return_numpy=False, interpolation="bilinear",
                         backend="cv2")
train = [rs(), RandFlipImage(flip_code=1), Pad(padding=10, backend="cv2"),
         RandCropImageV2(size=[224, 224]),
         RandomRotation(prob=0.5, degrees=90, interpolation="bilinear"), rs()]
c = time.process_time()
for d in datas:
    x = dec(d)
    for op in train:
        x = op(x)
ms = (time.process_time() - c) / len(datas) * 1e3
print(json.dumps({"cpu_ms_per_image": ms, "images_per_s_per_core": 1e3 / ms,
                  "opencv": cv2.__version__}))
"""


def _run(args: list[str], env: dict | None = None, tree: Path = ROOT) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", *args],
        env={**os.environ, "PYTHONPATH": str(tree), **(env or {})},
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise SystemExit(f"worker {args[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _worker_main(argv: list[str]) -> None:
    kind, rest = argv[0], argv[1:]
    if kind == "decode":
        res = worker_decode(json.loads(Path(rest[0]).read_text()), int(rest[1]))
    elif kind == "loader":
        res = worker_loader(rest[0], int(rest[1]), int(rest[2]), float(rest[3]))
    elif kind == "stages":
        res = worker_stages(json.loads(Path(rest[0]).read_text()))
    elif kind == "prepare":
        res = worker_prepare(rest[0], rest[1], rest[2], int(rest[3]))
    elif kind == "jpeg_error":
        res = worker_jpeg_error(rest[0], rest[1])
    else:
        raise SystemExit(f"unknown worker {kind}")
    print(json.dumps(res))


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
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return _worker_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", help="folder of JPEGs to measure on (*.jpg, recursive)")
    ap.add_argument("--make-set", metavar="DIR", help="write the benchmark image set into DIR")
    ap.add_argument("--num-images", type=int, default=500, help="with --make-set")
    ap.add_argument("--photos-root", default="/work/PaddleClas", help="with --make-set")
    ap.add_argument("--max-images", type=int, default=500)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="loader threads")
    ap.add_argument("--min-seconds", type=float, default=3.0, help="per loader variant")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over all variants; best kept")
    ap.add_argument("--variants", nargs="*", default=list(LOADER_VARIANTS))
    ap.add_argument(
        "--baseline-tree", help="checkout of an older jaxrec whose loader is measured as well"
    )
    ap.add_argument("--reference", action="store_true", help="also PaddleClas's cv2 operators")
    ap.add_argument("--paddle-python", default="/work/paddle_venv/bin/python")
    ap.add_argument("--paddleclas", default="/work/PaddleClas")
    ap.add_argument("--sampler", action="store_true", help="also time PKSampler at full scale")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()

    if args.make_set:
        photos = [os.path.join(args.photos_root, p) for p in PHOTOS]
        print(json.dumps(make_set(photos, args.make_set, args.num_images)))
        return None
    if not args.images:
        ap.error("--images DIR (or --make-set DIR first)")
    files = sorted(glob.glob(os.path.join(args.images, "**", "*.jpg"), recursive=True))
    files = files[: args.max_images]
    if not files:
        raise SystemExit(f"no *.jpg files under {args.images}")
    res: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_start": os.getloadavg(),
        "set": _describe_set(files),
        "workers": args.workers,
    }
    print(json.dumps(res["set"]))
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp, "list.txt")
        listing.write_text("".join(f"{f} {i // 5}\n" for i, f in enumerate(files)))
        Path(tmp, "files.json").write_text(json.dumps(files))
        w = str(args.workers)
        for codec in ("jpeg", "raw"):
            res[f"prepare_{codec}"] = _run(["prepare", str(listing), f"{tmp}/{codec}", codec, w])
        prepared_files = Path(tmp, "prepared_files.json")
        _export_prepared_jpegs(f"{tmp}/jpeg", Path(tmp, "prepared_jpegs"), prepared_files)
        res["stages_opencv_ms"] = _run(["stages", f"{tmp}/files.json"])
        res["prepared_jpeg_error"] = _run(["jpeg_error", str(listing), f"{tmp}/jpeg"])
        # Several rounds over all variants, keeping each one's best (least CPU per image): load
        # from other processes on shared cores then penalizes no variant systematically.
        for _ in range(args.rounds):
            runs = {
                "decode_floor": _run(["decode", f"{tmp}/files.json", "2"]),
                "prepared_floor": _run(["decode", str(prepared_files), "6"]),
            }
            if args.baseline_tree:
                runs["baseline"] = _run(
                    ["loader", f"list:{listing}", w, "320", str(args.min_seconds)],
                    tree=Path(args.baseline_tree),
                )
                runs["baseline"]["tree"] = _git_describe(args.baseline_tree)
            for v in args.variants:
                spec = f"list:{listing}" if v in ("numpy", "opencv") else f"prepared:{tmp}/{v[9:]}"
                env = {"JAXREC_NO_OPENCV": "1"} if v == "numpy" else None
                runs[v] = _run(["loader", spec, w, str(MIN_IMAGES[v]), str(args.min_seconds)], env)
            for k, r in runs.items():
                if k not in res or r["cpu_ms_per_image"] < res[k]["cpu_ms_per_image"]:
                    res[k] = r
        if args.reference and Path(args.paddle_python).exists():
            res["paddleclas_cv2"] = _reference(files[:100], args.paddle_python, args.paddleclas)
    if args.sampler:
        res["pk_sampler"] = sampler_speed()
    res["load_average_end"] = os.getloadavg()
    _print_table(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return None


def _git_describe(tree: str) -> str:
    out = subprocess.run(
        ["git", "-C", tree, "log", "-1", "--format=%h %cs"], capture_output=True, text=True
    )
    return out.stdout.strip()


def _export_prepared_jpegs(prepared: str, out: Path, listing: Path) -> None:
    """The prepared JPEGs as files, for the decode floor of the prepared set."""
    from jaxrec.data.datasets import load_prepared

    src = load_prepared(prepared)
    out.mkdir()
    names = []
    for i in range(len(src)):
        names.append(str(out / f"{i:04d}.jpg"))
        Path(names[-1]).write_bytes(src.read(i))
    listing.write_text(json.dumps(names))


def _reference(files: list[str], python: str, paddleclas: str) -> dict:
    env = dict(os.environ, PYTHONPATH=paddleclas, OMP_NUM_THREADS="1")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(REFERENCE_SCRIPT)
    try:
        out = subprocess.run(
            [python, f.name, json.dumps(files)], env=env, capture_output=True, text=True, check=True
        )
    finally:
        os.unlink(f.name)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _print_table(res: dict) -> None:
    s = res["set"]
    print(
        f"\n{s['images']} JPEGs, mean {s['mean_w']:.0f}x{s['mean_h']:.0f} px, {s['kib']:.0f} KiB; "
        f"{res['machine']}; loader threads {res['workers']}; load {res['load_average_start']}"
    )
    print(
        f"{'variant':16s} {'CPU ms/img':>10s} {'img/s/core':>10s} {'wall img/s':>10s} "
        f"{'sys ms':>7s} {'minflt':>7s}"
    )
    rows = ["decode_floor", "baseline", *LOADER_VARIANTS, "prepared_floor", "paddleclas_cv2"]
    for name in rows + ["prepare_jpeg", "prepare_raw"]:
        r = res.get(name)
        if not r:
            continue
        nan = float("nan")
        print(
            f"{name:16s} {r['cpu_ms_per_image']:10.2f} {r['images_per_s_per_core']:10.0f} "
            f"{r.get('wall_images_per_s', nan):10.0f} {r.get('sys_ms', nan):7.2f} "
            f"{r.get('minflt', nan):7.0f}"
        )
    base = res.get("baseline") or res.get("numpy")
    for name, floor in (("opencv", "decode_floor"), ("prepared_jpeg", "prepared_floor")):
        r, f = res.get(name), res[floor]
        if r and base:
            above = r["cpu_ms_per_image"] - f["cpu_ms_per_image"]
            print(
                f"{name}: {r['images_per_s_per_core'] / base['images_per_s_per_core']:.2f}x the "
                f"{'baseline' if 'baseline' in res else 'numpy path'} per core; "
                f"{above:.2f} ms/img above the decode floor "
                f"({f['cpu_ms_per_image'] / r['cpu_ms_per_image']:.0%} of its CPU is the decode)"
            )
    print("stages of the opencv path (ms, one thread):", json.dumps(res["stages_opencv_ms"]))
    print("prepared JPEG vs exact prepared image:", json.dumps(res["prepared_jpeg_error"]))


if __name__ == "__main__":
    sys.exit(main())
