"""Full-size PP-ShiTuV2 model timings: eval forward (training form, fused deploy form, BN-folded),
init/compile times, and .pdparams conversion of a full-size checkpoint.

    python benchmarks/model_forward.py --batch-sizes 1 8 --repeats 10

Median wall times over `--repeats` runs after one warm-up; inputs 224x224 NHWC float32.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxrec import models
from jaxrec.models import build_model, count_params, init_variables
from jaxrec.paddle.convert import convert_pdparams
from jaxrec.paddle.naming import to_paddle_state_dict

ARCH = {
    "name": "RecModel",
    "infer_output_key": "features",
    "Backbone": {"name": "PPLCNetV2_base_ShiTu", "class_expand": 512},
    "BackboneStopLayer": {"name": "flatten"},
    "Neck": {"name": "BNNeck", "num_features": 512},
}


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, dtype {args.dtype}")
    arch = dict(ARCH, dtype=args.dtype)
    model = build_model(arch)
    t = time.perf_counter()
    v = jax.block_until_ready(init_variables(model))
    print(f"init_variables: {time.perf_counter() - t:.2f} s ({count_params(v['params']):,} params)")
    t = time.perf_counter()
    dv = models.reparameterize(v)
    print(f"reparameterize: {time.perf_counter() - t:.3f} s")
    t = time.perf_counter()
    fv = models.fold_variables(v)
    print(f"fold_variables: {time.perf_counter() - t:.3f} s ({count_params(fv):,} params)")
    dmodel = build_model(dict(arch, deploy=True))
    fmodel = build_model(models.folded_arch(arch))
    f_train_form = jax.jit(lambda v, x: model.apply(v, x)["features"])
    f_fused = jax.jit(lambda v, x: dmodel.apply(v, x)["features"])
    f_folded = jax.jit(lambda v, x: fmodel.apply(v, x)["features"])
    forms = (("multi-branch", f_train_form, v), ("fused", f_fused, dv), ("folded", f_folded, fv))
    for bs in args.batch_sizes:
        x = jax.random.normal(jax.random.PRNGKey(0), (bs, 224, 224, 3))
        for name, f, var in forms:
            t = time.perf_counter()
            f.lower(var, x).compile()
            comp = time.perf_counter() - t
            med = timed(lambda f=f, var=var, x=x: jax.block_until_ready(f(var, x)), args.repeats)
            print(
                f"eval forward bs{bs} {name}: {med * 1e3:.1f} ms median "
                f"({bs / med:.1f} img/s), compile {comp:.1f} s"
            )
    with tempfile.TemporaryDirectory() as d:
        pd = Path(d) / "full.pdparams"
        state = to_paddle_state_dict(jax.tree_util.tree_map(np.asarray, v))
        pd.write_bytes(pickle.dumps(state, protocol=4))
        t = time.perf_counter()
        _, cv, report = convert_pdparams(pd, strict=True)
        print(
            f"convert full-size .pdparams ({pd.stat().st_size / 2**20:.1f} MiB, "
            f"{len(report.loaded)} tensors): {time.perf_counter() - t:.2f} s"
        )
        same = all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(
                jax.tree_util.tree_leaves(cv), jax.tree_util.tree_leaves(v), strict=True
            )
        )
        print(f"round trip exact: {same}")


if __name__ == "__main__":
    main()
