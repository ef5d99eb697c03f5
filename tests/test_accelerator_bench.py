"""benchmarks/accelerator.py runs end to end at its CPU size (what CI can check without a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


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
    assert res["devices"] == 2 and res["backend"] == "cpu" and res["size"] == 32
    keys = ("train_synthetic", "train_synthetic_sharded_head", "train_loader")
    for key in (*keys, "train_loader_device_aug", "inference"):
        assert res[key]["images_per_s"] > 0 and res[key]["per_device"] > 0, key
    assert res["loader_only"]["images_per_s"] > 0
    assert "torch_anchor_note" in res and "torch_anchor" not in res
    assert (
        "jaxrec accelerator benchmark: 2 x cpu" in r.stdout
        and "train_loader_device_aug" in r.stdout
    )
