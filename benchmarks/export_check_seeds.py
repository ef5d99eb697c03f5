"""The export check on freshly trained full-size models: it must pass every correct export.

    python benchmarks/export_check_seeds.py --seeds 0 1 2 --work /tmp/export_seeds

Per seed: train general_v2 (full-size PP-LCNetV2_base + BNNeck, from scratch) at 64 px for a
few steps on 9 real photos (tests/fixtures/image_files, 3 classes), export the newest
checkpoint (`python -m jaxrec.export --workdir W --which latest`: model dir, jax.export, ONNX)
with the default check images, then re-check the same export on the 9 photos. Reports per seed
the check's float32 noise estimate (eps_model), tolerance, each artifact's largest relative
error, and what the old rule (max|err| <= 1e-4 x max|ref| on synthetic images) would have said
from the same numbers. Training runs in this process, so the train step compiles once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = [
    "astronaut_cmyk.jpg",
    "camera_gray.jpg",
    "chelsea.webp",
    "chelsea_exif1.jpg",
    "chelsea_progressive.jpg",
    "coffee.tiff",
    "coffee_444_q95.jpg",
    "astronaut_palette.png",
    "chelsea_exif2.jpg",
]


def config(photos: str, list_file: str, seed: int, steps: int, size: int = 64):
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import general_v2

    c = general_v2.get_config()
    c.Global.seed = seed
    c.Global.epochs = steps
    c.Global.image_shape = (3, size, size)
    c.Global.print_batch_step = 1
    c.Optimizer.lr.warmup_epoch = 1
    c.Global.eval_during_train = False
    c.Arch.Backbone.pretrained = False
    c.Arch.Backbone.use_ssld = False
    c.Arch.Head.class_num = 3
    tr = c.DataLoader.Train
    tr.dataset.image_root = photos
    tr.dataset.cls_label_path = list_file
    tr.dataset.transform_ops = general_v2.train_transform_ops(size, padding=4)
    tr.sampler.batch_size = 6
    tr.sampler.sample_per_id = 3
    tr.sampler.id_list = ()
    tr.sampler.ratio = ()
    tr.loader.num_workers = 1
    for part in ("Query", "Gallery"):
        ev = c.DataLoader.Eval[part]
        ev.dataset.image_root = photos
        ev.dataset.cls_label_path = list_file
        ev.dataset.transform_ops = general_v2.eval_transform_ops(size)
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(5)))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--work", default="/tmp/jaxrec_export_seeds")
    ap.add_argument("--json", default=None, help="write the per-seed results here")
    args = ap.parse_args()

    import jaxrec.export as E
    from jaxrec.config import resolve
    from jaxrec.training import loop

    os.makedirs(args.work, exist_ok=True)
    photos = os.path.join(args.work, "photos")
    os.makedirs(photos, exist_ok=True)
    lines = []
    for i, name in enumerate(PHOTOS):
        shutil.copy(os.path.join(REPO, "tests", "fixtures", "image_files", name), photos)
        lines.append(f"{name} {i % 3} {i}")
    list_file = os.path.join(photos, "list.txt")
    with open(list_file, "w") as f:
        f.write("\n".join(lines) + "\n")
    results = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        wd = os.path.join(args.work, f"seed{seed}")
        out = os.path.join(args.work, f"export{seed}")
        shutil.rmtree(wd, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        loop.train(resolve(config(photos, list_file, seed, args.steps)), wd)
        rc = E.main(["--workdir", wd, "--which", "latest", "--out", out])
        default = json.load(open(os.path.join(out, E.CHECK_FILE)))
        rc_photos = E.main(["--workdir", wd, "--which", "latest", "--out", out, "--check-only",
                            "--check-images", list_file])  # fmt: skip
        real = json.load(open(os.path.join(out, E.CHECK_FILE)))
        row = {"seed": seed, "rc_default": rc, "rc_photos": rc_photos, "seconds": 0.0}
        for tag, data in (("default", default), ("photos", real)):
            row[tag] = {
                "passed": data["passed"],
                "eps_model": data["rule"]["eps_model"],
                "tolerance": data["rule"]["tolerance"],
                "max_rel_err": {r["artifact"]: r["max_rel_err"] for r in data["results"]},
                "old_rule_ok": {
                    r["artifact"]: r["max_abs_err"] <= 1e-4 * r["max_abs_ref"]
                    for r in data["results"]
                    if not r["skipped"]
                },
                "max_abs_ref": max(r["max_abs_ref"] for r in data["results"]),
            }
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(row)
        print("RESULT", json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    passed = sum(r["rc_default"] == 0 and r["rc_photos"] == 0 for r in results)
    old_fail = sum(not all(r["default"]["old_rule_ok"].values()) for r in results)
    print(f"{passed}/{len(results)} seeds pass the check (default images and photos); the old "
          f"rule would have refused {old_fail}")  # fmt: skip


if __name__ == "__main__":
    main()
