"""Real subprocess runs of train.py: SIGKILL + restart gives bit-identical parameters; a
two-process jax.distributed run (2 x 4 CPU devices, gloo) matches one process with 8 devices."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
from train_data_util import make_tiny_dataset

from jaxrec.training.checkpoint import read_checkpoint
from jaxrec.training.workdir import Workdir

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")

CONFIG_TEMPLATE = """
import sys
sys.path.insert(0, {tests!r})
from train_data_util import tiny_config

def get_config():
    data = {{"root": {root!r}, "train": {train!r}, "eval": {eval!r}, "num_classes": 8}}
    c = tiny_config(data, epochs=2)
    c.Optimizer.lr.warmup_epoch = 0.5
    return c
"""


@pytest.fixture(scope="module")
def setup():
    # Not tmp_path_factory: concurrent pytest sessions rotate /tmp/pytest-of-<user> away under
    # long-running subprocesses.
    tmp = tempfile.TemporaryDirectory(prefix="jaxrec_resume_")
    base = pathlib.Path(tmp.name)
    data = make_tiny_dataset(str(base / "data"), train_classes=8, per_class=8)
    cfg = base / "tiny_cfg.py"
    cfg.write_text(CONFIG_TEMPLATE.format(tests=TESTS, **data))
    cache = base / "xla_cache"
    yield {"base": base, "config": str(cfg), "cache": str(cache)}
    tmp.cleanup()


def _env(setup, devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    # Later runs reuse the first run's executables: keeps these tests fast.
    env["JAX_COMPILATION_CACHE_DIR"] = setup["cache"]
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train_cmd(setup, workdir, *extra):
    return [
        sys.executable,
        os.path.join(REPO, "train.py"),
        f"--config={setup['config']}",
        f"--workdir={workdir}",
        *extra,
    ]


def _run(setup, workdir, devices=8, timeout=600):
    p = subprocess.run(
        _train_cmd(setup, workdir),
        env=_env(setup, devices),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _final_state(workdir):
    return read_checkpoint(workdir)


@pytest.fixture(scope="module")
def reference(setup):
    """One uninterrupted run on 8 devices (2 epochs x 2 steps): (step, state, meta, stdout)."""
    wd = str(setup["base"] / "ref")
    p = _run(setup, wd)
    return (*_final_state(wd), p.stdout)


def _losses(stdout: str) -> list[float]:
    return [float(m) for m in re.findall(r"step \d+: .*? loss ([0-9.]+)", stdout)]


def _assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(x, y)


def test_sigkill_and_restart_is_bit_identical(setup, reference):
    wd = str(setup["base"] / "killed")
    ckdir = str(Workdir(wd).checkpoints("latest"))
    proc = subprocess.Popen(
        _train_cmd(setup, wd),
        env=_env(setup, 8),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 600
    # Kill right after the first mid-epoch checkpoint (step 1) appears: a data position
    # inside an epoch must be restored, not just an epoch boundary.
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckdir) and any(d.isdigit() for d in os.listdir(ckdir)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(int(d) for d in os.listdir(ckdir) if d.isdigit())
    assert steps and steps[-1] < reference[0]
    p = _run(setup, wd)
    assert "resumed from step" in p.stdout + p.stderr
    step, state, meta = _final_state(wd)
    ref_step, ref_state, ref_meta, _ = reference
    assert step == ref_step == 4
    _assert_trees_equal(state, ref_state)
    assert meta["loader"] == ref_meta["loader"]


def test_unreadable_latest_checkpoint_falls_back(setup, reference):
    import shutil

    wd = str(setup["base"] / "corrupt")
    shutil.copytree(str(setup["base"] / "ref"), wd)
    ck = str(Workdir(wd).checkpoints("latest"))
    latest = max(int(d) for d in os.listdir(ck) if d.isdigit())
    for dirpath, _, files in os.walk(os.path.join(ck, str(latest), "state")):
        for f in files:
            with open(os.path.join(dirpath, f), "wb") as fh:
                fh.write(b"garbage")
    p = _run(setup, wd)
    assert "unreadable" in p.stderr
    assert os.path.isdir(os.path.join(ck, f"{latest}.unreadable"))
    step, state, _ = _final_state(wd)
    assert step == reference[0]
    _assert_trees_equal(state, reference[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(setup, reference):
    wd = str(setup["base"] / "dist")
    port = _free_port()
    procs = [
        subprocess.Popen(
            _train_cmd(
                setup,
                wd,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            env=_env(setup, 4),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    assert "2 process(es)" in outs[0]
    step, state, _ = _final_state(wd)
    assert step == reference[0]
    # Same data and per-device computation; only the cross-process (gloo) reduction order
    # differs, and these tiny-batch BN/mining dynamics amplify float32 rounding a little per step.
    ref_losses = _losses(reference[3])
    assert len(ref_losses) == 4
    np.testing.assert_allclose(_losses(outs[0]), ref_losses, rtol=1e-4)
    # Parameters and BN statistics agree to float32 rounding of a different reduction order
    # (measured: max abs diff 3.3e-5 on parameters up to 3.8, 4.5e-6 on BN statistics). Momentum
    # traces (accumulated raw gradients) differ more, measured 2.6e-3 on values up to 5, so they
    # get a looser bound.
    for name, atol in (("params", 1e-4), ("batch_stats", 1e-5), ("opt_state", 1e-2)):
        for x, y in zip(
            jax.tree.leaves(state[name]), jax.tree.leaves(reference[1][name]), strict=True
        ):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol, err_msg=name)
