"""Before/after the package redesign, in one run: training step, evaluation time, compiles.

    python benchmarks/redesign_ab.py --old /work/wt_old --rounds 2

`--old` is a checkout of jaxrec before the redesign (commit 6d87f8f, which has
`jaxrec/train_lib.py`); the new code is this repository. Each measurement runs in a child
process with that checkout first on PYTHONPATH, alternating old/new `--rounds` times:

- train step: full-size PPLCNetV2_base_ShiTu + BNNeck + FC (1,000 classes), batch 32, 224 px,
  one CPU device, median of `--steps` steps after the compiling one;
- evaluation: the demo config's eval set (400 images of data/demo at 48 px, query == gallery)
  with the demo model at init, three evaluations in one process (as three epochs of a run):
  wall time and number of XLA compilations of each (`jax.monitoring` backend-compile events).

Prints one table and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compiles() -> list:
    from jax import monitoring

    events: list = []
    monitoring.register_event_duration_secs_listener(
        lambda name, _d, **_k: (
            events.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
        )
    )
    return events


def child_step(steps: int) -> dict:
    import jax
    import numpy as np

    sys.path.insert(0, os.path.join(os.getcwd(), "configs"))
    import general_v2

    cfg = general_v2.get_config()
    cfg.Arch.Backbone.pretrained = False
    cfg.Arch.Head.class_num = 1000
    rs = np.random.RandomState(0)
    local = {
        "image": rs.randint(0, 256, (32, 224, 224, 3)).astype(np.uint8),
        "label": np.repeat(np.arange(8), 4).astype(np.int32),
    }
    try:
        from jaxrec import train_lib as tl  # before the redesign
    except ImportError:
        tl = None
    if tl is not None:
        mesh = tl.make_mesh(jax.devices()[:1])
        model, loss = tl.build_model_from_config(cfg), tl.build_loss_from_config(cfg)
        hold = {}

        def builder(params, stats):
            tx, hold["s"] = tl.optimizer_from_config(cfg, 1000, tl.param_labels(params, stats))
            return tx

        state, tx = tl.init_train_state(
            model, loss, builder, (224, 224, 3), jax.random.PRNGKey(0), mesh
        )
        step = tl.make_train_step(model, loss, tx, mesh, schedule=hold["s"])
        batch = tl.global_batch(mesh, local)
    else:
        from jaxrec.config import resolve
        from jaxrec.losses import build_loss
        from jaxrec.models import build_model
        from jaxrec.parallel import global_batch, make_mesh
        from jaxrec.training import optimizer as optim
        from jaxrec.training import train_step as step_lib

        run = resolve(cfg)
        mesh = make_mesh(jax.devices()[:1])
        model, loss = build_model(run.model_arch(training=True)), build_loss(list(run.loss))
        params, stats = step_lib.init_params(model, loss, (224, 224, 3), jax.random.PRNGKey(0))
        tx, sched = optim.build_optimizer(run.optim, 1000, run.loop.epochs, params, stats)
        state = step_lib.create_state(params, stats, tx, mesh)
        step = step_lib.make_train_step(
            model, loss, tx, mesh, pixel=run.train.pixel, schedule=sched
        )
        batch = global_batch(mesh, local)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        state, m = step(state, batch, jax.random.PRNGKey(i))
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return {"step_ms": 1000 * statistics.median(times[1:]), "compile_step_s": times[0]}


def child_eval() -> dict:
    import jax

    events = _compiles()
    sys.path.insert(0, os.path.join(os.getcwd(), "configs"))
    import demo

    cfg = demo.get_config()
    try:
        from jaxrec import train_lib as tl
    except ImportError:
        tl = None
    out = []
    if tl is not None:
        from jaxrec.models import init_variables

        mesh = tl.make_mesh()
        model = tl.build_model_from_config(cfg, for_training=False)
        variables = init_variables(model, seed=0, image_size=48)
        data = tl.EvalData.from_config(cfg, mesh)

        def evaluate():
            return tl.evaluate_retrieval(cfg, model, variables, mesh, data)
    else:
        from jaxrec.config import resolve
        from jaxrec.evaluation import RetrievalEvaluator
        from jaxrec.models import build_model, init_variables
        from jaxrec.parallel import make_mesh

        run = resolve(cfg)
        mesh = make_mesh()
        model = build_model(run.model_arch(training=False))
        variables = init_variables(model, seed=0, image_size=48)
        evaluator = RetrievalEvaluator.for_model(run.eval, model, mesh)

        def evaluate():
            return evaluator.evaluate(variables)

    for _ in range(3):
        n0, t0 = len(events), time.perf_counter()
        metrics = evaluate()
        out.append({"seconds": time.perf_counter() - t0, "compiles": len(events) - n0})
    jax.effects_barrier()
    return {"evals": out, "metrics": metrics}


def _run(checkout: str, what: str, steps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=checkout, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    p = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", what, "--steps", str(steps)],
        env=env,
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if p.returncode != 0:
        raise RuntimeError(f"{checkout} {what}:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", help="checkout of jaxrec before the redesign (required)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="/tmp/redesign_ab.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = child_step(args.steps) if args.child == "step" else child_eval()
        print(json.dumps(res))
        return
    if not args.old:
        ap.error("--old is required")
    results: dict = {"old": [], "new": []}
    for r in range(args.rounds):
        for name, checkout in (("old", args.old), ("new", REPO)):
            res = {"step": _run(checkout, "step", args.steps), "eval": _run(checkout, "eval", 0)}
            results[name].append(res)
            ev = res["eval"]["evals"]
            print(
                f"round {r + 1} {name}: step {res['step']['step_ms']:.0f} ms; evaluations "
                + ", ".join(f"{e['seconds']:.2f} s ({e['compiles']} compiles)" for e in ev),
                flush=True,
            )
    print("\n| code | train step (median ms) | eval 1 | eval 2 | eval 3 | compiles per eval |")
    print("|---|---|---|---|---|---|")
    for name in ("old", "new"):
        rows = results[name]
        step = statistics.median(x["step"]["step_ms"] for x in rows)
        evs = [statistics.median(x["eval"]["evals"][i]["seconds"] for x in rows) for i in range(3)]
        comp = [rows[0]["eval"]["evals"][i]["compiles"] for i in range(3)]
        print(
            f"| {name} | {step:.0f} | {evs[0]:.2f} s | {evs[1]:.2f} s | {evs[2]:.2f} s | "
            f"{comp[0]}, {comp[1]}, {comp[2]} |"
        )
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
