"""One command for the day a GPU or TPU is available: training step and inference on every device.

    python benchmarks/accelerator.py --json /tmp/accel.json
    python benchmarks/accelerator.py --prepared /data/shitu_224 --torch-anchor PATH/torch_anchor.py
    python benchmarks/accelerator.py --tiny          # CPU smoke run (what the test runs)

On whatever devices JAX finds (all of them, data parallel, one PK group per device as in
training), with the recipe of configs/general_v2.py (PPLCNetV2_base_ShiTu + BNNeck + FC head with
192,612 classes, CE + TripletAngularMargin, momentum SGD with L2), bfloat16 compute:

* ``train_synthetic``: the jitted training step on a device-resident uint8 batch of 256 per
  device (PK labels, 4 per id), the head replicated: the model's ceiling;
* ``train_synthetic_sharded_head``: the same step with the head's class axis split over the
  devices (`jaxrec.training.sharded_head`, the training default on several devices; skipped on
  one device);
* ``loader_only``: the host input pipeline alone (TrainLoader, all host cores, batches put on
  the devices), on ``--prepared`` (a ``python -m jaxrec.prepare`` set), ``--images`` (a JPEG
  folder) or, by default, a generated set of photo-sized JPEGs;
* ``train_loader``: the step fed by that loader, host augmentation;
* ``train_loader_device_aug``: the same with ``augment_on_device`` (host decodes only);
* ``inference``: the eval-mode forward to features, 256 per device, bfloat16;
* ``torch_anchor``: with ``--torch-anchor PATH`` and PyTorch installed, that script (the same
  network and step in PyTorch, ``compile`` mode, one card) runs first, in its own process on the
  same machine, and the table shows jaxrec's images/s per device over it. The script lives
  outside the repository; pass its path.

With ``--tiny`` (automatic when the only backend is the CPU) everything shrinks (32 px, 64
classes, 8 per device, 2 timed steps) so that a CPU can check the whole benchmark works. It
prints one table and, with ``--json``, writes every number, with the first step's losses and
gradient norm of both synthetic rows (the two head placements compute the same step) and the
shape of the inference features.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = {"size": 224, "classes": 192612, "per_device": 256, "steps": 20, "warmup": 3, "k": 4}
TINY = {"size": 32, "classes": 64, "per_device": 8, "steps": 2, "warmup": 1, "k": 4}


def torch_anchor(path: str, per_device: int, classes: int, timeout: int) -> dict:
    """Run the PyTorch anchor script (compile mode) and parse its two throughput lines."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return {"skipped": "torch is not installed"}
    cmd = [sys.executable, path, "compile", str(per_device), str(classes)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout} s"}
    if out.returncode:
        return {"skipped": f"failed: {out.stderr.strip().splitlines()[-1:]}"}
    rates = [float(m) for m in re.findall(r"throughput=(\d+(?:\.\d+)?) img/s", out.stdout)]
    if len(rates) != 2:
        return {"skipped": f"unexpected output: {out.stdout[-300:]}"}
    return {"train_images_per_s": rates[0], "inference_images_per_s": rates[1]}


def _config(size: int, classes: int, per_device: int):
    spec = importlib.util.spec_from_file_location("general_v2", ROOT / "configs" / "general_v2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config(str(size))
    cfg.Arch.Backbone.pretrained = False
    cfg.Arch.Head.class_num = classes
    cfg.AMP.use_amp = True  # bfloat16 compute, float32 parameters
    cfg.DataLoader.Train.sampler.batch_size = per_device
    return cfg


def make_jpegs(folder: Path, n: int, size: tuple[int, int], classes: int, k: int) -> Path:
    """``n`` smooth photo-like JPEGs of ``size`` (w, h) and a training list (k images per id)."""
    import cv2

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    w, h = size
    for i in range(n):
        base = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
        img = cv2.GaussianBlur(cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC), (0, 0), 2)
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
        lines.append(f"{i:05d}.jpg {(i // k) % classes}")
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    return folder / "list.txt"


def _timed_steps(step, state, batches, rng, warmup: int, steps: int):
    """(state, compile_s, step_s, first): first call, warm-up, then ``steps`` timed steps;
    ``first`` is the first step's metrics (losses, gradient norm, learning rate)."""
    import jax

    t = time.perf_counter()
    state, m = step(state, next(batches), rng)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    first = {k: float(v) for k, v in m.items()}
    for i in range(warmup):
        state, m = step(state, next(batches), jax.random.fold_in(rng, i + 1))
    jax.block_until_ready(m)
    t = time.perf_counter()
    for i in range(steps):
        state, m = step(state, next(batches), jax.random.fold_in(rng, warmup + i + 1))
    jax.block_until_ready((state.step, m))
    return state, compile_s, (time.perf_counter() - t) / steps, first


def run(args: argparse.Namespace, p: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxrec.config import resolve
    from jaxrec.data.datasets import load_list, load_prepared
    from jaxrec.data.device_aug import DeviceAugment
    from jaxrec.data.loader import TrainLoader
    from jaxrec.data.sampler import PKSampler
    from jaxrec.losses import build_loss
    from jaxrec.models import build_model
    from jaxrec.parallel import AXIS, data_sharding, make_mesh, replicated
    from jaxrec.training.optimizer import build_optimizer
    from jaxrec.training.sharded_head import plan_head
    from jaxrec.training.train_step import create_state, init_params, make_train_step

    mesh = make_mesh()
    ndev = mesh.devices.size
    run_ = resolve(_config(p["size"], p["classes"], p["per_device"]))
    b = p["per_device"] * ndev
    res: dict = {"devices": ndev, "device_kind": jax.devices()[0].device_kind, "batch": b}
    model = build_model(run_.arch, **run_.model_options(training=True, axis_name=AXIS))
    loss = build_loss(run_.loss)
    s = p["size"]
    params, stats = init_params(model, loss, (s, s, 3), jax.random.key(0))
    # On the host: each create_state below gets buffers of its own (the steps donate them).
    params, stats = jax.device_get((params, stats))
    res["parameters"] = int(sum(x.size for x in jax.tree.leaves(params)))
    tx, schedule = build_optimizer(run_.optim, 1000, 100, params, stats)
    dtype = jnp.dtype(run_.compute_dtype)

    def new_step(augment=None, head_plan=None):
        return make_train_step(
            model, loss, tx, mesh, pixel=run_.train.pixel, schedule=schedule,
            compute_dtype=dtype, augment=augment, head_plan=head_plan,
        )  # fmt: skip

    def rate(step_s: float) -> dict:
        return {
            "step_ms": step_s * 1e3,
            "images_per_s": b / step_s,
            "per_device": b / step_s / ndev,
        }

    # 1. Device-resident synthetic batch.
    rng = np.random.default_rng(0)
    ids = np.concatenate(
        [rng.choice(p["classes"], p["per_device"] // p["k"], replace=False) for _ in range(ndev)]
    )
    synth = {
        "image": jax.device_put(
            rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8), data_sharding(mesh)
        ),
        "label": jax.device_put(np.repeat(ids, p["k"]).astype(np.int32), data_sharding(mesh)),
    }
    step = new_step()
    state = create_state(params, stats, tx, mesh)
    forever = iter(lambda: synth, None)
    state, compile_s, dt, first = _timed_steps(
        step, state, forever, jax.random.key(1), p["warmup"], p["steps"]
    )
    res["train_synthetic"] = {"compile_s": compile_s, **rate(dt), "first_step": first}

    # 1b. The same with the class-sharded head.
    plan, why = plan_head(model, loss, ndev)
    if plan is None:
        res["train_synthetic_sharded_head"] = {"skipped": why}
    else:
        sharded_state = create_state(params, stats, tx, mesh, plan)
        sharded_state, compile_s, dt, first = _timed_steps(
            new_step(head_plan=plan), sharded_state, forever, jax.random.key(1), p["warmup"],
            p["steps"],
        )  # fmt: skip
        del sharded_state
        res["train_synthetic_sharded_head"] = {
            "compile_s": compile_s,
            **rate(dt),
            "first_step": first,
        }

    # 2-4. The real loader.
    tmp = tempfile.mkdtemp(prefix="jaxrec_accel_")
    if args.prepared:
        source = load_prepared(args.prepared, size=s)
        res["data"] = f"prepared set {args.prepared}"
    else:
        if args.images:
            listing = Path(args.images) / "list.txt"
        else:
            wh = (64, 48) if args.tiny else (946, 789)
            n = max(64, min(2 * b, 1024))
            listing = make_jpegs(Path(tmp), n, wh, p["classes"], p["k"])
        source = load_list(listing)
        res["data"] = f"{len(source)} JPEGs ({listing})"
    source_labels_ok = source.labels.max() < p["classes"]
    if not source_labels_ok:
        raise SystemExit(f"labels of {res['data']} exceed the {p['classes']} classes")

    def loader(on_host: bool) -> TrainLoader:
        sampler = PKSampler(source.labels, p["per_device"], p["k"], num_shards=ndev)
        return TrainLoader(
            source, sampler, run_.train.transform, mesh=mesh, seed=0,
            num_workers=os.cpu_count(), prefetch=4, device_prefetch=2, augment_on_host=on_host,
        )  # fmt: skip

    with loader(True) as ld:
        for _ in range(2):
            jax.block_until_ready(next(ld))
        t = time.perf_counter()
        n = max(p["steps"], 3)
        for _ in range(n):
            jax.block_until_ready(next(ld))
        res["loader_only"] = {"images_per_s": n * b / (time.perf_counter() - t)}
        state, _, dt, _ = _timed_steps(step, state, ld, jax.random.key(2), p["warmup"], p["steps"])
        res["train_loader"] = rate(dt)
    aug_step = new_step(DeviceAugment.from_transform(run_.train.transform))
    with loader(False) as ld:
        state, compile_s, dt, _ = _timed_steps(
            aug_step, state, ld, jax.random.key(3), p["warmup"], p["steps"]
        )
        res["train_loader_device_aug"] = {"compile_s": compile_s, **rate(dt)}

    # 5. Inference (eval mode, features), bfloat16.
    eval_model = build_model(run_.arch, dtype="bfloat16")
    pixel = run_.train.pixel

    def features(variables, images):
        return eval_model.apply(variables, pixel(images).astype(jnp.bfloat16), train=False)[
            "features"
        ]

    fwd = jax.jit(
        features,
        in_shardings=(replicated(mesh), data_sharding(mesh)),
        out_shardings=data_sharding(mesh),
    )
    variables = state.model_variables
    t = time.perf_counter()
    jax.block_until_ready(fwd(variables, synth["image"]))
    compile_s = time.perf_counter() - t
    for _ in range(p["warmup"]):
        out = fwd(variables, synth["image"])
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(p["steps"]):
        out = fwd(variables, synth["image"])
    jax.block_until_ready(out)
    res["inference"] = {"compile_s": compile_s, **rate((time.perf_counter() - t) / p["steps"])}
    feats = np.asarray(out, np.float32)
    res["inference"]["features"] = {
        "shape": list(feats.shape),
        "finite": bool(np.isfinite(feats).all()),
    }
    return res


def _table(res: dict) -> str:
    anchor = res.get("torch_anchor", {})
    train, infer = "train_images_per_s", "inference_images_per_s"
    rows = [("train_synthetic", train), ("train_synthetic_sharded_head", train),
            ("train_loader", train), ("train_loader_device_aug", train),
            ("inference", infer), ("loader_only", None)]  # fmt: skip
    lines = [
        f"jaxrec accelerator benchmark: {res['devices']} x {res['device_kind']}, global batch "
        f"{res['batch']}, {res['size']} px, {res['classes']} classes, bfloat16 ({res['date']})",
        f"{'measurement':26s} {'images/s':>10s} {'per device':>10s} {'step ms':>8s} "
        f"{'compile s':>9s} {'vs torch':>8s}",
    ]
    for name, key in rows:
        r = res.get(name, {})
        per = r.get("per_device", r.get("images_per_s", float("nan")) / res["devices"])
        ratio = per / anchor[key] if key and key in anchor else float("nan")
        lines.append(
            f"{name:26s} {r.get('images_per_s', float('nan')):10.1f} {per:10.1f} "
            f"{r.get('step_ms', float('nan')):8.1f} {r.get('compile_s', float('nan')):9.1f} "
            f"{ratio:8.2f}"
        )
    if anchor:
        lines.append(f"torch anchor (compile, one card): {json.dumps(anchor)}")
    lines.append(f"data for the loader rows: {res.get('data')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--prepared", help="prepared set (python -m jaxrec.prepare) to feed from")
    ap.add_argument("--images", help="folder with JPEGs and a list.txt ('name label' lines)")
    ap.add_argument("--torch-anchor", help="path of torch_anchor.py (PyTorch reference step)")
    ap.add_argument("--torch-timeout", type=int, default=900)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (default on a CPU backend)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    args = ap.parse_args(argv)
    res: dict = {}
    if args.torch_anchor:
        # Before JAX starts its backend (which takes most of the device memory).
        q = TINY if args.tiny else FULL
        anchor = torch_anchor(args.torch_anchor, q["per_device"], q["classes"], args.torch_timeout)
        if "skipped" in anchor:
            print(f"torch anchor skipped: {anchor['skipped']}", file=sys.stderr)
        res["torch_anchor" if "skipped" not in anchor else "torch_anchor_note"] = anchor
    import jax

    args.tiny = args.tiny or all(d.platform == "cpu" for d in jax.devices())
    p = dict(TINY if args.tiny else FULL)
    if args.steps:
        p["steps"] = args.steps
    res.update(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        host=f"{platform.node()} {os.cpu_count()} cores",
        jax=jax.__version__,
        backend=jax.default_backend(),
        size=p["size"],
        classes=p["classes"],
    )
    res.update(run(args, p))
    print(_table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
