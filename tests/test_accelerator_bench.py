"""benchmarks/accelerator.py runs end to end at its CPU size (what CI can check without a GPU)
and reports every measurement, the two train-step variants agreeing on what they compute."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

TIMED = (
    "train_synthetic",
    "train_synthetic_sharded_head",
    "train_loader",
    "train_loader_device_aug",
    "inference",
)
COMPILED = (
    "train_synthetic",
    "train_synthetic_sharded_head",
    "train_loader_device_aug",
    "inference",
)
FIRST_STEP = {"loss", "CELoss", "TripletAngularMarginLoss", "grad_norm", "lr"}


@pytest.mark.slow
def test_accelerator_benchmark_tiny_on_two_cpu_devices(tmp_path):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        PYTHONPATH=str(ROOT),
    )
    out = tmp_path / "accel.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "accelerator.py"), "--steps", "1"]
    cmd += ["--torch-anchor", str(tmp_path / "absent_anchor.py")]  # reported, never fatal
    r = subprocess.run(
        cmd + ["--json", str(out)], env=env, capture_output=True, text=True, timeout=1500
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["devices"] == 2 and res["backend"] == "cpu" and res["device_kind"] == "cpu"
    assert res["size"] == 32 and res["classes"] == 64
    assert res["batch"] == 8 * res["devices"]  # the tiny PK group (8 per device) on each device
    assert res["parameters"] > 0 and "JPEGs" in res["data"]

    # Every measurement is there with finite, mutually consistent numbers (no timing limits).
    for key in TIMED:
        row = res[key]
        assert "skipped" not in row, key  # two devices: the class-sharded head runs too
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("step_ms", "per_device")), key
        assert row["images_per_s"] == pytest.approx(res["batch"] / (row["step_ms"] / 1e3)), key
        assert row["per_device"] == pytest.approx(row["images_per_s"] / res["devices"]), key
    for key in COMPILED:
        assert math.isfinite(res[key]["compile_s"]) and res[key]["compile_s"] > 0, key
    loader = res["loader_only"]["images_per_s"]
    assert math.isfinite(loader) and loader > 0

    # The replicated and the class-sharded head step compute the same first step (same
    # parameters, batch and key): the losses to float32 rounding, the gradient norm to bfloat16.
    rep = res["train_synthetic"]["first_step"]
    sharded = res["train_synthetic_sharded_head"]["first_step"]
    assert set(rep) == set(sharded) == FIRST_STEP
    assert all(math.isfinite(v) for v in (*rep.values(), *sharded.values()))
    for k in ("loss", "CELoss", "TripletAngularMarginLoss"):
        assert sharded[k] == pytest.approx(rep[k], rel=1e-4), k
    assert sharded["grad_norm"] == pytest.approx(rep["grad_norm"], rel=1e-2)
    assert sharded["lr"] == rep["lr"]

    # Inference returns one finite 512-d feature row per image of the batch.
    assert res["inference"]["features"] == {"shape": [res["batch"], 512], "finite": True}

    assert "torch_anchor_note" in res and "torch_anchor" not in res
    assert "jaxrec accelerator benchmark: 2 x cpu" in r.stdout
    for key in (*TIMED, "loader_only"):
        assert f"\n{key} " in r.stdout, key  # one table row each
