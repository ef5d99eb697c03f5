"""Training-step time of the full PP-ShiTuV2 recipe: jaxrec vs PaddleClas on this CPU.

Full-size PPLCNetV2_base_ShiTu + BNNeck + FC head with 1,000 classes, 224x224 inputs, batch 32
(8 ids x 4 images), CE(eps 0.1) + TripletAngularMarginLoss, Momentum 0.9 with L2 1e-5. The jaxrec
step is the jitted `jaxrec.training.train_step.make_train_step` (uint8 input normalized on device,
one device);
the reference step is PaddleClas dygraph forward + backward + Momentum step, run in the paddle
venv as a subprocess with the same thread count.

    python benchmarks/train_step.py [--steps 5] [--no-paddle] [--threads 2]

Prints median milliseconds per step for each (after warm-up / compilation).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PADDLE_PY = "/work/paddle_venv/bin/python"
PADDLECLAS = "/work/PaddleClas"
YAML = "ppcls/configs/GeneralRecognitionV2/GeneralRecognitionV2_PPLCNetV2_base.yaml"

PADDLE_SCRIPT = r"""
import json, sys, time
import numpy as np, yaml, paddle
sys.path.insert(0, {clas!r})
from ppcls.arch import build_model
from ppcls.loss import build_loss
from ppcls.utils import logger
logger.init_logger()
steps, bs, classes = {steps}, {bs}, {classes}
paddle.set_device("cpu")
cfg = yaml.safe_load(open({yaml!r}))
cfg["Arch"]["Backbone"]["pretrained"] = False
cfg["Arch"]["Head"]["class_num"] = classes
model = build_model(cfg)
model.train()
loss_fn = build_loss(cfg["Loss"]["Train"])
opt = paddle.optimizer.Momentum(learning_rate=0.06, momentum=0.9,
    parameters=model.parameters(), weight_decay=paddle.regularizer.L2Decay(1e-5))
rs = np.random.RandomState(0)
x = paddle.to_tensor(rs.randn(bs, 3, 224, 224).astype("float32"))
y = paddle.to_tensor(np.repeat(np.arange(bs // 4), 4).reshape(-1, 1).astype("int64"))
times = []
for i in range(steps + 2):
    t = time.perf_counter()
    out = model(x, y)
    loss = loss_fn(out, y)["loss"]
    loss.backward()
    opt.step()
    opt.clear_grad()
    float(loss)
    times.append(time.perf_counter() - t)
print(json.dumps({{"times": times[2:]}}))
"""


def jaxrec_step(steps: int, bs: int, classes: int) -> dict:
    import jax
    import numpy as np

    sys.path.insert(0, os.path.join(REPO, "configs"))
    import general_v2

    from jaxrec.config import resolve
    from jaxrec.losses import build_loss
    from jaxrec.models import build_model
    from jaxrec.parallel import global_batch, make_mesh
    from jaxrec.training import optimizer as optim
    from jaxrec.training import train_step as step_lib

    cfg = general_v2.get_config()
    cfg.Arch.Backbone.pretrained = False
    cfg.Arch.Head.class_num = classes
    run = resolve(cfg)
    mesh = make_mesh(jax.devices()[:1])
    model = build_model(run.model_arch(training=True))
    loss = build_loss(list(run.loss))
    t0 = time.perf_counter()
    params, stats = step_lib.init_params(model, loss, (224, 224, 3), jax.random.PRNGKey(0))
    tx, schedule = optim.build_optimizer(run.optim, 1000, run.loop.epochs, params, stats)
    state = step_lib.create_state(params, stats, tx, mesh)
    init_s = time.perf_counter() - t0
    step = step_lib.make_train_step(model, loss, tx, mesh, pixel=run.train.pixel, schedule=schedule)
    rs = np.random.RandomState(0)
    batch = global_batch(
        mesh,
        {
            "image": rs.randint(0, 256, (bs, 224, 224, 3)).astype(np.uint8),
            "label": np.repeat(np.arange(bs // 4), 4).astype(np.int32),
        },
    )
    t0 = time.perf_counter()
    state, m = step(state, batch, jax.random.PRNGKey(0))
    jax.block_until_ready(m)
    first_s = time.perf_counter() - t0
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, batch, jax.random.PRNGKey(i + 1))
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return {"times": times, "init_s": init_s, "first_step_s": first_s, "loss": float(m["loss"])}


def paddle_step(steps: int, bs: int, classes: int, threads: int) -> dict:
    script = PADDLE_SCRIPT.format(
        clas=PADDLECLAS, steps=steps, bs=bs, classes=classes, yaml=os.path.join(PADDLECLAS, YAML)
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(
        [PADDLE_PY, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=PADDLECLAS,
        timeout=3600,
    )
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after warm-up)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2, help="OMP threads for paddle")
    ap.add_argument("--no-paddle", action="store_true", help="skip the PaddleClas step")
    args = ap.parse_args()
    import statistics

    res = {}
    if not args.no_paddle and os.path.exists(PADDLE_PY):
        pd = paddle_step(args.steps, args.batch, args.classes, args.threads)
        res["paddle_ms"] = 1000 * statistics.median(pd["times"])
        print(
            f"PaddleClas dygraph step: median {res['paddle_ms']:.0f} ms "
            f"({[round(1000 * t) for t in pd['times']]})",
            flush=True,
        )
    jx = jaxrec_step(args.steps, args.batch, args.classes)
    res["jaxrec_ms"] = 1000 * statistics.median(jx["times"])
    print(
        f"jaxrec step: median {res['jaxrec_ms']:.0f} ms "
        f"({[round(1000 * t) for t in jx['times']]}); init {jx['init_s']:.1f} s, "
        f"first step (compile) {jx['first_step_s']:.1f} s, loss {jx['loss']:.4f}"
    )
    if "paddle_ms" in res:
        print(f"speed-up vs PaddleClas: {res['paddle_ms'] / res['jaxrec_ms']:.2f}x")


if __name__ == "__main__":
    main()
