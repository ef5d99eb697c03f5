"""The demo's retrieval results over several seeds: the range the README quotes.

    python benchmarks/demo_seeds.py --seeds 0 1 2 3 4 --work /tmp/demo_seeds

Runs the README's demo (`train.py --config configs/demo.py`, then `evaluate.py`) once per seed
(`--config.Global.seed=S`), and reports per seed the untrained network's and the best
checkpoint's Recall@1 / mAP (from the run's TensorBoard events and evaluate.py's JSON), then the
min / median / max over seeds. XLA:CPU's floating-point results differ between CPU models, so a
single run is not reproducible across machines: the spread over seeds is the honest figure.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_seed(seed: int, work: str) -> dict:
    from jaxrec.training import tensorboard as logging_lib

    wd = os.path.join(work, f"seed{seed}")
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config",
            "configs/demo.py",
            "--workdir",
            wd,
            f"--config.Global.seed={seed}",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    train_s = time.perf_counter() - t0
    p = subprocess.run(
        [sys.executable, "evaluate.py", "--workdir", wd, "--num_visualize", "0"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    best = json.load(open(sorted(glob.glob(os.path.join(wd, "eval", "eval_step*.json")))[-1]))
    (events,) = glob.glob(os.path.join(wd, "tensorboard", "events.out.tfevents.*"))
    scalars = logging_lib.read_scalars(events)
    at0 = {tag: v for step, tag, v in scalars if step == 0 and tag.startswith("eval/")}
    return {
        "seed": seed,
        "untrained": {"recall1": at0["eval/recall1"], "mAP": at0["eval/mAP"]},
        "best": {"recall1": best["metrics"]["recall1"], "mAP": best["metrics"]["mAP"]},
        "best_step": best["step"],
        "train_seconds": train_s,
        "evaluate_stdout": p.stdout.strip().splitlines()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--work", default="/tmp/jaxrec_demo_seeds")
    ap.add_argument("--out", default=None, help="JSON file (default WORK/results.json)")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    rows = []
    for s in args.seeds:
        r = run_seed(s, args.work)
        rows.append(r)
        print(
            f"seed {s}: untrained recall1 {r['untrained']['recall1']:.4f} mAP "
            f"{r['untrained']['mAP']:.4f} -> best (step {r['best_step']}) recall1 "
            f"{r['best']['recall1']:.4f} mAP {r['best']['mAP']:.4f} ({r['train_seconds']:.0f} s)",
            flush=True,
        )
    print("\n| | Recall@1 min / median / max | mAP min / median / max |\n|---|---|---|")
    for part in ("untrained", "best"):
        r1 = [r[part]["recall1"] for r in rows]
        m = [r[part]["mAP"] for r in rows]
        print(
            f"| {part} | {min(r1):.3f} / {statistics.median(r1):.3f} / {max(r1):.3f} | "
            f"{min(m):.3f} / {statistics.median(m):.3f} / {max(m):.3f} |"
        )
    out = args.out or os.path.join(args.work, "results.json")
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
