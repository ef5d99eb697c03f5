"""Real subprocess runs of train.py: SIGKILL or SIGTERM + restart gives bit-identical
parameters; a two-process jax.distributed run (2 x 4 CPU devices, gloo) matches one process with
8 devices (both with the class-sharded head, the default); the replicated head gives the same
run; a checkpoint of 8 devices on 4 stops with an error naming the device counts (the state
itself reshards: tests/test_sharded_checkpoint.py); evaluate.py on two processes equals one."""

from __future__ import annotations

import json
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


def _run(setup, workdir, devices=8, timeout=600, *extra, check=True):
    p = subprocess.run(
        _train_cmd(setup, workdir, *extra),
        env=_env(setup, devices),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
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


def test_sigterm_saves_the_step_and_restart_is_bit_identical(setup, reference):
    """A real SIGTERM: the run finishes its step, saves that step's checkpoint, exits 143 naming
    it; rerunning the command ends bit-identical to the uninterrupted run."""
    wd = str(setup["base"] / "sigterm")
    proc = subprocess.Popen(
        _train_cmd(setup, wd),
        env={**_env(setup, 8), "PYTHONUNBUFFERED": "1"},  # each log line as it is written
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # SIGTERM once step 1 is logged (inside the training loop, with steps 2..4 still to come).
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.search(r"step 1: ", line):
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(seen) + proc.communicate(timeout=600)[0]
    assert proc.returncode == 143, out[-3000:]
    m = re.search(r"preempted: SIGTERM received: stopped after step (\d+) and saved", out)
    assert m, out[-3000:]
    stopped = int(m.group(1))
    assert 1 <= stopped < reference[0]
    step, _, meta = _final_state(wd)
    assert step == stopped == meta["step"]  # the checkpoint of exactly that step is the newest
    p = _run(setup, wd)
    assert f"resumed from step {stopped}" in p.stdout + p.stderr
    step, state, meta = _final_state(wd)
    assert step == reference[0]
    _assert_trees_equal(state, reference[1])
    assert meta["loader"] == reference[2]["loader"]


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


def _start_two(setup, wd, cache=None):
    """train.py as 2 processes x 4 CPU devices (loopback coordinator), output unbuffered;
    `cache`: another XLA compilation cache folder than the module's shared one."""
    port = _free_port()
    env = {**_env(setup, 4), "PYTHONUNBUFFERED": "1"}
    if cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = cache
    return [
        subprocess.Popen(
            _train_cmd(
                setup,
                wd,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


@pytest.fixture(scope="module")
def two_process_run(setup):
    """One uninterrupted 2-process run: (workdir, [stdout of each process])."""
    wd = str(setup["base"] / "dist")
    procs = _start_two(setup, wd)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    return wd, outs


def test_two_processes_match_one_process(setup, reference, two_process_run):
    wd, outs = two_process_run
    assert "2 process(es)" in outs[0]
    assert "head sharded over 8 devices" in outs[0] and "head sharded over 8" in reference[3]
    step, state, _ = _final_state(wd)
    assert step == reference[0]
    # Same data and per-device computation; only the cross-process (gloo) reduction order
    # differs, and these tiny-batch BN/mining dynamics amplify float32 rounding a little per step.
    ref_losses = _losses(reference[3])
    assert len(ref_losses) == 4
    np.testing.assert_allclose(_losses(outs[0]), ref_losses, rtol=1e-4)
    # Parameters and BN statistics agree to float32 rounding of a different reduction order
    # (measured: max abs diff 3.3e-5 on parameters up to 3.8, 4.5e-6 on BN statistics; with the
    # class-sharded head, whose CE sums also cross the processes, one of 8192 conv weights
    # differed by 1.1e-4). Momentum traces (accumulated raw gradients) differ more, measured
    # 2.6e-3 on values up to 5 (1.2e-2 on one entry with the sharded head), so they get a
    # looser bound.
    for name, atol in (("params", 2e-4), ("batch_stats", 1e-5), ("opt_state", 2e-2)):
        for x, y in zip(
            jax.tree.leaves(state[name]), jax.tree.leaves(reference[1][name]), strict=True
        ):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol, err_msg=name)


def test_replicated_head_run_matches_the_sharded_one(setup, reference):
    wd = str(setup["base"] / "replicated")
    p = _run(setup, wd, 8, 600, "--config.Global.shard_head=False")
    assert "head replicated (Global.shard_head is False)" in p.stdout
    np.testing.assert_allclose(_losses(p.stdout), _losses(reference[3]), rtol=1e-4)
    step, state, _ = _final_state(wd)
    assert step == reference[0]
    for name, atol in (("params", 1e-4), ("batch_stats", 1e-5)):
        for x, y in zip(
            jax.tree.leaves(state[name]), jax.tree.leaves(reference[1][name]), strict=True
        ):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol, err_msg=name)


def test_resume_on_another_device_count_is_a_clear_error(setup, reference):
    import shutil

    wd = str(setup["base"] / "four")
    shutil.copytree(str(setup["base"] / "ref"), wd)
    # Same per-device batch on 4 devices: another global batch, so a clear error.
    p = _run(setup, wd, 4, 600, "--restore_step=2", check=False)
    assert p.returncode != 0
    assert "it ran on 8 devices, this run has 4" in p.stdout + p.stderr
    # The same global batch (8 per device): the model state reshards (checked exactly in
    # test_sharded_checkpoint), the data order cannot follow: a clear error naming both counts.
    extra = (
        "--config.DataLoader.Train.sampler.batch_size=8",
        "--config.Global.allow_config_change=True",
    )
    p = _run(setup, wd, 4, 600, *extra, check=False)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "resharded from 8 to 4 devices" in out
    assert "written on 8 devices, this run has 4" in out and "resume on 8 devices" in out
    # On its own device count the cut run resumes and ends where the reference ends.
    p = _run(setup, wd, 8, 600, "--config.Global.allow_config_change=True")
    step, state, _ = _final_state(wd)
    assert step == reference[0]
    _assert_trees_equal(state["params"], reference[1]["params"])


def _evaluate(setup, workdir, out, devices, *extra):
    return subprocess.Popen(
        [
            sys.executable,
            os.path.join(REPO, "evaluate.py"),
            f"--workdir={workdir}",
            "--latest",
            f"--output={out}",
            "--num_visualize=2",
            *extra,
        ],
        env=_env(setup, devices),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_evaluate_py_on_two_processes_matches_one_process(setup, reference):
    """evaluate.py --coordinator_address ...: 2 processes x 4 devices give the metrics of one
    process with 8 devices; process 0 alone writes the JSON and the rank-list picture."""
    wd = str(setup["base"] / "ref")
    one = setup["base"] / "eval1"
    p = _evaluate(setup, wd, one, 8)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out[-3000:]
    two = setup["base"] / "eval2"
    port = _free_port()
    procs = [
        _evaluate(
            setup,
            wd,
            two,
            4,
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        )
        for i in range(2)
    ]
    outs = [q.communicate(timeout=600)[0] for q in procs]
    for q, o in zip(procs, outs, strict=True):
        assert q.returncode == 0, o[-3000:]
    assert "recall1" in outs[0] and "recall1" not in outs[1]  # process 0 prints
    step = reference[0]
    want = json.loads((one / f"eval_step{step}.json").read_text())["metrics"]
    got = json.loads((two / f"eval_step{step}.json").read_text())["metrics"]
    assert set(got) == set(want) == {"recall1", "recall5", "mAP"}
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), (k, got, want)
    assert (two / f"ranklist_step{step}.png").stat().st_size > 0


def test_sigterm_to_one_of_two_processes(setup, two_process_run):
    """SIGTERM to process 1 only: both processes stop after the same step, save it and exit 143;
    rerunning both resumes to the parameters of the uninterrupted 2-process run, bit for bit."""
    wd = str(setup["base"] / "dist_sigterm")
    # Fresh compilation caches: on this 2-core machine under load, 2-process runs that loaded
    # the module cache's executables often failed at step 1, before any signal, with gloo
    # connect/context timeouts; the runs that compiled their own programs did not.
    procs = _start_two(setup, wd, cache=str(setup["base"] / "xla_cache_sigterm"))
    seen = []
    for line in procs[0].stdout:
        seen.append(line)
        if re.search(r"step 1: ", line):
            procs[1].send_signal(signal.SIGTERM)
            break
    outs = ["".join(seen) + procs[0].communicate(timeout=600)[0]]
    outs.append(procs[1].communicate(timeout=600)[0])
    stopped = []
    both = f"process 0:\n{outs[0][-3000:]}\nprocess 1:\n{outs[1][-3000:]}"
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 143, both
        m = re.search(r"preempted: SIGTERM received: stopped after step (\d+) and saved", out)
        assert m, out[-3000:]
        stopped.append(int(m.group(1)))
    ref_wd = two_process_run[0]
    ref_step = _final_state(ref_wd)[0]
    assert stopped[0] == stopped[1] and 1 <= stopped[0] < ref_step
    assert _final_state(wd)[0] == stopped[0]
    procs = _start_two(setup, wd, cache=str(setup["base"] / "xla_cache_resume"))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    assert f"resumed from step {stopped[0]}" in outs[0]
    step, state, meta = _final_state(wd)
    ref = _final_state(ref_wd)
    assert step == ref[0]
    _assert_trees_equal(state, ref[1])
    assert meta["loader"] == ref[2]["loader"]
