"""Pod accounting: what the general_v2 train step costs per device on N devices, compiled only.

Compiles the real `make_train_step` (PPLCNetV2_base_ShiTu + BNNeck + FC 512 x 192,612, CE eps
0.1 + TripletAngularMarginLoss, Momentum) for N simulated CPU devices from abstract shapes
(`train_step.abstract_state`: nothing is allocated), with the replicated and the class-sharded
head, and reports per device:

* argument and temporary memory (`compiled.memory_analysis()`);
* bytes per step of each collective kind (all-reduce, all-gather, reduce-scatter, ...), summed
  over the collectives in the optimized HLO (`compiled.as_text()`), per device;
* the head's share of the step's FLOPs (`compiled.cost_analysis()`): one minus the FLOPs of the
  same step without the head and its CELoss over the FLOPs of the full step;

and a computed (not measured) table of what those collective bytes take at NVLink, InfiniBand
and TPU ICI bandwidths (ring algorithms: all-reduce moves 2 (N-1)/N of the bytes per device,
all-gather / reduce-scatter (N-1)/N).

    python benchmarks/pod_accounting.py --devices 8 [--batch_per_device 8] [--json out.json]
    python benchmarks/pod_accounting.py --devices 64

Results: BENCHMARKS.md ("Pod accounting").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Assumed per-device link bandwidths (bytes/s, one direction) for the computed table.
BANDWIDTHS = {
    "NVLink 4 (H100, 450 GB/s)": 450e9,
    "InfiniBand NDR (400 Gb/s per GPU)": 50e9,
    "TPU v5p ICI (~600 GB/s per chip)": 600e9,
}

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {
    "f32": 4,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u8": 1,
    "s8": 1,
    "pred": 1,
    "u64": 8,
}
_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|f64|s64|u8|s8|pred|u64)\[([0-9,]*)\]")


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes of each collective kind's results per device, from optimized HLO text (async
    pairs are counted once, at their `-start`)."""
    out = dict.fromkeys(_COLLECTIVES, 0)
    for line in hlo.splitlines():
        if "=" not in line:
            continue
        lhs, rhs = line.split("=", 1)
        for kind in _COLLECTIVES:
            m = re.search(rf"\s{kind}(-start)?\(", rhs)
            if m is None:
                continue
            result_type = rhs[: m.start()]
            if m.group(1):  # async start: the tuple holds (operands, results); take results
                shapes = _SHAPE.findall(result_type)
                shapes = shapes[len(shapes) // 2 :]
            else:
                shapes = _SHAPE.findall(result_type)
            for dt, dims in shapes:
                n = 1
                for d in filter(None, dims.split(",")):
                    n *= int(d)
                out[kind] += n * _DTYPE_BYTES[dt]
            break
    return out


def _setup(devices: int, batch_per_device: int, classes: int | None):
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import general_v2

    cfg = general_v2.get_config()
    cfg.Arch.Backbone.pretrained = False
    cfg.DataLoader.Train.sampler.batch_size = batch_per_device
    if classes:
        cfg.Arch.Head.class_num = classes
    return cfg


def account(
    devices: int,
    sharded: bool,
    batch_per_device: int,
    with_head: bool = True,
    classes: int | None = None,
) -> dict:
    """Compile the step for `devices` devices and return its per-device figures."""
    import jax
    import jax.numpy as jnp

    from jaxrec.config import resolve
    from jaxrec.losses import build_loss
    from jaxrec.models import build_model, count_params
    from jaxrec.parallel import AXIS, data_sharding, make_mesh, replicated
    from jaxrec.training.optimizer import build_optimizer
    from jaxrec.training.sharded_head import plan_head
    from jaxrec.training.train_step import abstract_state, init_params, make_train_step

    cfg = _setup(devices, batch_per_device, classes)
    run = resolve(cfg)
    model = build_model(run.arch, **run.model_options(training=True, axis_name=AXIS))
    loss_cfg = list(run.loss)
    if not with_head:
        model = model.clone(head=None)
        loss_cfg = [e for e in loss_cfg if e.name != "CELoss"]
    loss = build_loss(loss_cfg)
    mesh = make_mesh(jax.devices()[:devices])
    size = (run.image_size, run.image_size, 3)
    params, stats = jax.eval_shape(lambda: init_params(model, loss, size, jax.random.PRNGKey(0)))
    tx, schedule = build_optimizer(run.optim, 1000, run.loop.epochs, params, stats)
    plan = plan_head(model, loss, devices, enabled=sharded and with_head)[0]
    dtype = jnp.dtype(run.compute_dtype)
    step = make_train_step(
        model, loss, tx, mesh, pixel=run.train.pixel, schedule=schedule, compute_dtype=dtype,
        head_plan=plan,
    )  # fmt: skip
    state = abstract_state(model, loss, tx, size, mesh, plan)
    b = batch_per_device * devices
    batch = {
        "image": jax.ShapeDtypeStruct((b, *size), jnp.uint8, sharding=data_sharding(mesh)),
        "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data_sharding(mesh)),
    }
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated(mesh))
    compiled = step.lower(state, batch, rng).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "devices": devices,
        "head": ("sharded" if plan is not None else "replicated") if with_head else "none",
        "batch_per_device": batch_per_device,
        "params_total": count_params(params),
        "params_head": count_params(params["model"].get("head", {})),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "flops": float(cost.get("flops", float("nan"))),
        "collectives": collective_bytes(compiled.as_text()),
    }


def comm_seconds(kind: str, nbytes: int, devices: int, bandwidth: float) -> float:
    """Ring-algorithm time of one collective kind's bytes at `bandwidth` (computed)."""
    factor = 2 * (devices - 1) / devices if kind == "all-reduce" else (devices - 1) / devices
    return factor * nbytes / bandwidth


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--batch_per_device", type=int, default=8)
    ap.add_argument("--classes", type=int, default=None, help="override Arch.Head.class_num")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, REPO)

    rows = [
        account(args.devices, s, args.batch_per_device, classes=args.classes) for s in (False, True)
    ]
    bare = account(
        args.devices, False, args.batch_per_device, with_head=False, classes=args.classes
    )
    mib = 2**20
    print(
        f"general_v2 train step, {args.devices} simulated devices, "
        f"{args.batch_per_device} images/device, compiled (per-device figures)"
    )
    print(
        f"parameters: {rows[0]['params_total'] / 1e6:.2f} M, head "
        f"{rows[0]['params_head'] / 1e6:.2f} M"
    )
    kinds = [k for k in _COLLECTIVES if any(r["collectives"][k] for r in rows)]
    head = ["head", "args MiB", "temp MiB", *[f"{k} MiB" for k in kinds], "head FLOPs share"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        share = 1.0 - bare["flops"] / r["flops"]
        cells = [
            r["head"],
            f"{r['argument_bytes'] / mib:.1f}",
            f"{r['temp_bytes'] / mib:.1f}",
            *[f"{r['collectives'][k] / mib:.2f}" for k in kinds],
            f"{share:.1%}",
        ]
        r["head_flops_share"] = share
        print("| " + " | ".join(cells) + " |")
    print("\ncomputed (not measured): communication seconds per step, ring algorithms")
    print("| head | " + " | ".join(BANDWIDTHS) + " |")
    print("|---|" + "---|" * len(BANDWIDTHS))
    for r in rows:
        cells = []
        for bw in BANDWIDTHS.values():
            t = sum(comm_seconds(k, r["collectives"][k], args.devices, bw) for k in kinds)
            cells.append(f"{t * 1e3:.2f} ms")
        print(f"| {r['head']} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "no_head": bare}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
