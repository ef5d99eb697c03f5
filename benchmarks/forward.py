"""Eval-mode forward speed of the full-size PP-ShiTuV2 model: jaxrec vs Paddle Inference.

    /work/venv/bin/python benchmarks/forward.py [--paddle-python /work/paddle_venv/bin/python]

Measures, on the default JAX backend, the jitted eval forward of the PPLCNetV2_base_ShiTu RecModel
(BNNeck features, no head) on float32 224x224 input:
  * latency at batch 1 (median of --bs1-iters calls, each waited for),
  * throughput at batch 32 (images/s from the median of --bs32-iters calls),
for the training form (multi-branch rep blocks), the re-parameterized deploy form and the
BN-folded form (`jaxrec.models.fold_variables`, what `jaxrec.export` lowers). Depthwise convs
use the platform's lowering (`jaxrec.ops.depthwise`); `--depthwise-micro` also compares both.
With --paddle-python, the same model is built by PaddleClas in that interpreter, exported as
tools/export_model.py does (eval, re_parameterize, paddle.jit.save) and run with Paddle Inference
(oneDNN, --threads CPU threads, IR optimizations on), same batch sizes and iteration counts, in
a subprocess after the JAX part (never at the same time). Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ARCH = {
    "name": "RecModel",
    "infer_output_key": "features",
    "Backbone": {"name": "PPLCNetV2_base_ShiTu", "class_expand": 512},
    "BackboneStopLayer": {"name": "flatten"},
    "Neck": {"name": "BNNeck", "num_features": 512},
}


def _median_seconds(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def jax_side(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxrec import models
    from jaxrec.config import resolve_arch

    results = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
    }
    model = models.build_model(resolve_arch(ARCH))
    variables = models.init_variables(model, seed=0, image_size=224)
    forms = {"train_form": (model, variables)}
    deploy_model = models.build_model(resolve_arch(ARCH), deploy=True)
    forms["deploy_form"] = (deploy_model, models.reparameterize(variables))
    forms["folded_form"] = (
        models.build_model(resolve_arch(ARCH), deploy=True, fold_bn=True),
        models.fold_variables(variables),
    )
    rng = np.random.default_rng(0)
    for form, (m, v) in forms.items():
        fwd = jax.jit(lambda v, x, m=m: m.apply(v, x, train=False)["features"])
        for bs, iters, key in ((1, args.bs1_iters, "bs1"), (32, args.bs32_iters, "bs32")):
            x = jnp.asarray(rng.standard_normal((bs, 224, 224, 3), dtype=np.float32))
            t0 = time.perf_counter()
            fwd(v, x).block_until_ready()
            compile_s = time.perf_counter() - t0
            for _ in range(args.warmup):
                fwd(v, x).block_until_ready()
            med = _median_seconds(lambda f=fwd, v=v, x=x: f(v, x).block_until_ready(), iters)
            results[f"{form}_{key}_median_ms"] = med * 1e3
            results[f"{form}_{key}_images_per_s"] = bs / med
            results[f"{form}_{key}_first_call_s"] = compile_s
            print(
                f"jax {form} bs{bs}: median {med * 1e3:.1f} ms ({bs / med:.1f} img/s)", flush=True
            )
    return results


def depthwise_micro(iters: int) -> dict:
    """XLA's grouped (depthwise) convolution vs a sum of k*k shifted multiplies, at batch 32.

    Shapes are the model's depthwise layers (stem, stage 1, stage 3 at stride 2 and 1).
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    rng = np.random.default_rng(0)
    out = {}
    for n, h, c, k, s in [(32, 112, 32, 3, 1), (32, 56, 128, 3, 1), (32, 28, 256, 5, 2),
                          (32, 14, 512, 5, 1)]:  # fmt: skip
        x = jnp.asarray(rng.standard_normal((n, h, h, c), dtype=np.float32))
        w = jnp.asarray(rng.standard_normal((k, k, 1, c), dtype=np.float32))
        p = (k - 1) // 2
        ho = (h + 2 * p - k) // s + 1

        def grouped(x, w, s=s, p=p, c=c):
            dn = ("NHWC", "HWIO", "NHWC")
            pad = ((p, p), (p, p))
            return lax.conv_general_dilated(
                x, w, (s, s), pad, dimension_numbers=dn, feature_group_count=c
            )

        def shifted(x, w, s=s, p=p, k=k, ho=ho):
            xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
            acc = 0.0
            for i in range(k):
                for j in range(k):
                    win = xp[:, i : i + s * (ho - 1) + 1 : s, j : j + s * (ho - 1) + 1 : s, :]
                    acc = acc + win * w[i, j, 0]
            return acc

        name = f"dw{k}x{k}_s{s}_{h}x{h}x{c}"
        for label, f in (("grouped_conv", jax.jit(grouped)), ("shifted_sum", jax.jit(shifted))):
            f(x, w).block_until_ready()
            med = _median_seconds(lambda f=f, x=x, w=w: f(x, w).block_until_ready(), iters)
            out[f"{name}_{label}_ms"] = med * 1e3
        print(
            f"{name}: grouped conv {out[f'{name}_grouped_conv_ms']:.1f} ms, "
            f"shifted sum {out[f'{name}_shifted_sum_ms']:.1f} ms",
            flush=True,
        )
    return out


def depthwise_lowerings(args: argparse.Namespace) -> dict:
    """The whole model (train form, bs32) with each depthwise lowering of jaxrec.ops.depthwise:
    "conv" (XLA grouped conv, what GPUs run) vs "shift" (sum of shifted slices, the CPU
    lowering), forced with `forced_lowering` (it acts at trace time, so each gets its own jit);
    both run in this process, alternating."""
    import jax
    import jax.numpy as jnp

    from jaxrec import models
    from jaxrec.config import resolve_arch
    from jaxrec.ops.depthwise import forced_lowering

    model = models.build_model(resolve_arch(ARCH))
    variables = models.init_variables(model, seed=0, image_size=224)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((32, 224, 224, 3), dtype=np.float32))
    fns, outs = {}, {}
    for impl in ("conv", "shift"):
        with forced_lowering(impl):
            fns[impl] = jax.jit(lambda v, x: model.apply(v, x, train=False)["features"])
            outs[impl] = fns[impl](variables, x).block_until_ready()
    times: dict[str, list[float]] = {"conv": [], "shift": []}
    for _ in range(args.bs32_iters):
        for impl, f in fns.items():
            t0 = time.perf_counter()
            f(variables, x).block_until_ready()
            times[impl].append(time.perf_counter() - t0)
    out = {
        "dw_impl_conv_bs32_median_ms": statistics.median(times["conv"]) * 1e3,
        "dw_impl_shift_bs32_median_ms": statistics.median(times["shift"]) * 1e3,
        "dw_impl_max_abs_diff": float(jnp.abs(outs["conv"] - outs["shift"]).max()),
        "dw_impl_ref_abs_max": float(jnp.abs(outs["conv"]).max()),
    }
    print(
        f"bs32 train form: depthwise lowering conv {out['dw_impl_conv_bs32_median_ms']:.0f} ms, "
        f"shift {out['dw_impl_shift_bs32_median_ms']:.0f} ms "
        f"(max |diff| {out['dw_impl_max_abs_diff']:.2e})",
        flush=True,
    )
    return out


def paddle_side(args: argparse.Namespace) -> dict:
    import paddle

    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
    )
    from paddle_ref import export_inference_model, onednn_predictor
    from paddleclas.ppcls.arch import build_model

    paddle.set_device("cpu")
    paddle.seed(0)
    arch = {k: v for k, v in ARCH.items()}
    arch["Backbone"] = {**ARCH["Backbone"], "pretrained": False}
    model = build_model({"Arch": arch, "Global": {"device": "cpu"}})
    model.eval()
    results = {"paddle": paddle.__version__}
    rng = np.random.default_rng(0)

    # dygraph eval (training form), the way Engine's retrieval eval runs the model
    for bs, iters, key in ((1, args.bs1_iters, "bs1"), (32, args.bs32_iters, "bs32")):
        if args.skip_dygraph:
            break
        x = paddle.to_tensor(rng.standard_normal((bs, 3, 224, 224), dtype=np.float32))
        with paddle.no_grad():
            for _ in range(args.warmup + 1):
                model(x)["features"].numpy()
            med = _median_seconds(lambda x=x: model(x)["features"].numpy(), iters)
        results[f"dygraph_{key}_median_ms"] = med * 1e3
        results[f"dygraph_{key}_images_per_s"] = bs / med
        print(f"paddle dygraph bs{bs}: median {med * 1e3:.1f} ms", flush=True)

    with tempfile.TemporaryDirectory() as d:
        prefix = os.path.join(d, "inference")
        export_inference_model(model, prefix)
        pred = onednn_predictor(prefix, args.threads)
        inp = pred.get_input_handle(pred.get_input_names()[0])
        out = pred.get_output_handle(pred.get_output_names()[0])

        def run(x):
            inp.copy_from_cpu(x)
            pred.run()
            return out.copy_to_cpu()

        for bs, iters, key in ((1, args.bs1_iters, "bs1"), (32, args.bs32_iters, "bs32")):
            x = rng.standard_normal((bs, 3, 224, 224), dtype=np.float32)
            for _ in range(args.warmup + 1):
                run(x)
            med = _median_seconds(lambda x=x: run(x), iters)
            results[f"inference_onednn_{key}_median_ms"] = med * 1e3
            results[f"inference_onednn_{key}_images_per_s"] = bs / med
            print(f"paddle inference oneDNN bs{bs}: median {med * 1e3:.1f} ms", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bs1-iters", type=int, default=20)
    ap.add_argument("--bs32-iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="Paddle Inference CPU threads")
    ap.add_argument("--paddle-python", default=None, help="interpreter with paddle + paddleclas")
    ap.add_argument("--skip-jax", action="store_true")
    ap.add_argument("--skip-dygraph", action="store_true", help="skip Paddle dygraph timings")
    ap.add_argument("--json", default=None, help="also write the summary here")
    ap.add_argument(
        "--depthwise-micro",
        action="store_true",
        help="also time XLA's grouped conv vs a shifted-slice sum for the depthwise layer shapes, "
        "and the whole model with each depthwise lowering (jaxrec.ops.depthwise.forced_lowering)",
    )
    ap.add_argument("--paddle-side", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.paddle_side:
        print("PADDLE_JSON " + json.dumps(paddle_side(args)), flush=True)
        return

    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    if not args.skip_jax:
        summary.update(jax_side(args))
    if args.depthwise_micro:
        summary.update(depthwise_micro(args.bs32_iters))
        summary.update(depthwise_lowerings(args))
    if args.paddle_python:
        cmd = [args.paddle_python, os.path.abspath(__file__), "--paddle-side",
               "--bs1-iters", str(args.bs1_iters), "--bs32-iters", str(args.bs32_iters),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]  # fmt: skip
        if args.skip_dygraph:
            cmd.append("--skip-dygraph")
        r = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("PADDLE_JSON ")]
        if r.returncode != 0 or not lines:
            sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
            raise SystemExit(f"paddle side failed (exit {r.returncode})")
        for ln in r.stdout.splitlines():
            if ln.startswith("paddle "):
                print(ln, flush=True)
        summary.update(json.loads(lines[-1][len("PADDLE_JSON ") :]))
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
