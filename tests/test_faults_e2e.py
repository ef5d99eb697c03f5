# ruff: noqa: F811 - the pytest fixtures imported from test_train_resume are arguments here
"""Real faults on real train.py runs (tiny model, 2 epochs x 2 steps, checkpoint every step):
two runs on one workdir, a full disk, evaluation beside a run that rotates its checkpoints, and a
peer process killed in a 2-process run. Each ends with one `error:` line, loses nothing, and a
rerun resumes exactly (the final state equals an uninterrupted run's)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import pytest
from test_disk_full import small_fs
from test_train_resume import (  # noqa: F401 - pytest fixtures
    REPO,
    _assert_trees_equal,
    _env,
    _final_state,
    _free_port,
    _run,
    _train_cmd,
    reference,
    setup,
)

from jaxrec.training.checkpoint import restore_variables, steps_in
from jaxrec.training.workdir_lock import LOCK_FILE

pytestmark = pytest.mark.slow


def _one_error_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert "Traceback" not in stderr and "Fatal Python error" not in stderr, stderr[-3000:]
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def _wait_for(pred, timeout=600, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_second_train_py_on_a_workdir_exits_at_once_naming_the_first(setup, reference):
    wd = str(setup["base"] / "twice")
    first = subprocess.Popen(
        _train_cmd(setup, wd),
        env=_env(setup, 8),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = os.path.join(wd, LOCK_FILE)
    assert _wait_for(lambda: os.path.isfile(lock) and os.path.getsize(lock) > 0, proc=first)
    t0 = time.time()
    second = subprocess.run(
        _train_cmd(setup, wd),
        env=_env(setup, 8),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 1
    line = _one_error_line(second.stderr)
    assert f"workdir {wd} is in use by another training run (pid {first.pid} on host" in line
    assert "started" in line and "train.py" in line
    assert time.time() - t0 < 120  # it stops before building the model or touching data
    step, state, _ = _final_state(wd)  # the first run was not disturbed: bit-identical
    assert step == reference[0]
    _assert_trees_equal(state, reference[1])


# Fault-injection fallback where no tmpfs can be mounted: orbax's writes of the second
# checkpoint fail with ENOSPC, exactly as the kernel reports a full disk.
_INJECT = """
import errno, os, runpy, sys
import orbax.checkpoint as ocp
real = ocp.CheckpointManager.save
calls = []
def save(self, step, *a, **k):
    calls.append(step)
    if len(calls) == 2:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory))
    return real(self, step, *a, **k)
ocp.CheckpointManager.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_disk_full_during_a_checkpoint_is_one_line_and_resumes_exactly(setup, reference):
    """A real full filesystem: a tmpfs that fills up (a filler file takes all but 64 KiB) as soon
    as the first checkpoint is committed, so a later checkpoint fails mid-write. One checkpoint
    of this run takes 0.8-2.3 MB on disk (OCDBT, the class-sharded head stored per shard), too
    variable for a fixed filesystem size. Without mount rights, ENOSPC is injected into the
    second save."""
    with small_fs("64m") as mnt:
        wd = os.path.join(mnt or str(setup["base"]), "full")
        cmd = _train_cmd(setup, wd)
        if mnt is None:
            cmd = [sys.executable, "-c", _INJECT, *cmd[1:]]
        p = subprocess.Popen(
            cmd, env=_env(setup, 8), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        filler = None
        if mnt is not None:
            first = os.path.join(wd, "checkpoints", "1")
            assert _wait_for(lambda: os.path.isdir(first), timeout=600, proc=p)
            filler = os.path.join(mnt, "filler")
            st = os.statvfs(mnt)
            with open(filler, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - 64 * 1024)
        out, err = p.communicate(timeout=600)
        assert p.returncode == 1, err[-3000:]
        line = _one_error_line(err)
        m = re.search(
            r"no space left on device writing checkpoint step (\d+) to \S+/checkpoints", line
        )
        assert m, line
        failed = int(m.group(1))
        assert failed >= 2 and (mnt is not None or failed == 2), line
        assert f"the last complete checkpoint is step {failed - 1}" in line
        if mnt is not None:
            assert re.search(r"needs about [\d.]+ \w+, [\d.]+ \w+ free there", line), line
        # Nothing half-written is left to be taken for a checkpoint.
        assert steps_in(wd, "latest")[-1] == failed - 1
        left = os.listdir(os.path.join(wd, "checkpoints"))
        assert all(n.isdigit() for n in left), (left, err[-3000:])
        if filler is not None:
            os.remove(filler)
        p = _run(setup, wd)
        assert f"resumed from step {failed - 1}" in p.stdout + p.stderr
        step, state, _ = _final_state(wd)
        assert step == reference[0]
        _assert_trees_equal(state, reference[1])


def test_evaluate_beside_a_run_that_rotates_checkpoints_every_step(setup):
    wd = str(setup["base"] / "live")
    extra = ["--config.Global.keep_checkpoints=1", "--config.Global.epochs=40"]
    train = subprocess.Popen(
        _train_cmd(setup, wd, *extra),
        env=_env(setup, 8),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert _wait_for(lambda: bool(steps_in(wd, "latest")), proc=train)
    follow = subprocess.Popen(
        [
            sys.executable,
            os.path.join(REPO, "evaluate.py"),
            f"--workdir={wd}",
            "--follow",
            "--poll_seconds=0.1",
            "--follow_idle_seconds=20",
            "--num_visualize=0",
        ],
        env=_env(setup, 8),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Meanwhile read the newest checkpoint in a loop, as evaluate/export/extract do.
    reads, notes = [], []
    while train.poll() is None:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            _, _, step, _ = restore_variables(wd, "latest")
        reads.append(step)
        notes += [str(x.message) for x in w]
    t_out, t_err = train.communicate()
    assert train.returncode == 0, t_err[-3000:]
    f_out, f_err = follow.communicate(timeout=600)
    assert follow.returncode == 0, f_err[-3000:]
    assert "Traceback" not in f_err and "unreadable" not in f_err + " ".join(notes)
    evaluated = [
        int(s) for s in re.findall(r"evaluated workdir \S+ \(checkpoints step (\d+)\)", f_out)
    ]
    assert len(evaluated) >= 2 and evaluated == sorted(set(evaluated)), f_out
    assert evaluated[-1] == 80  # the last checkpoint of the run (40 epochs x 2 steps)
    assert len(reads) >= 5 and reads == sorted(reads)
    for n in evaluated:
        assert os.path.isfile(os.path.join(wd, "eval", f"eval_step{n}.json"))


def _two_process_env(setup):
    """Its own compilation cache per 2-process launch: with a warm cache on process 0 only
    (JAX writes it from process 0), process 1 compiles for longer than gloo's 30 s rendezvous."""
    env = _env(setup, 4)
    env["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxrec_2proc_cache_")
    return env


def _two_process_cmds(setup, wd, port):
    return [
        _train_cmd(
            setup,
            wd,
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        )
        for i in range(2)
    ]


def _popen_all(cmds, env, stderr):
    return [
        subprocess.Popen(c, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)
        for c in cmds
    ]


@pytest.mark.parametrize("victim", [1, 0])
def test_killed_peer_ends_the_survivor_with_one_line_and_resume_works(setup, reference, victim):
    wd = str(setup["base"] / f"peer{victim}")
    cmds = _two_process_cmds(setup, wd, _free_port())
    env = _two_process_env(setup)
    procs = _popen_all(cmds, env, stderr=subprocess.PIPE)
    ckdir = os.path.join(wd, "checkpoints")
    assert _wait_for(lambda: os.path.isdir(ckdir) and steps_in(wd, "latest"), proc=procs[0])
    procs[victim].send_signal(signal.SIGKILL)
    t0 = time.time()
    survivor = procs[1 - victim]
    out, err = survivor.communicate(timeout=120)
    took = time.time() - t0
    procs[victim].wait()
    assert took < 60, took
    assert survivor.returncode == 1, err[-3000:]
    line = _one_error_line(err)
    gone = "process 1 of the multi-host run" if victim == 1 else "the coordinator (process 0"
    assert gone in line, line
    assert re.search(r"last checkpoint: step \d+ in \S+/checkpoints", line), line
    assert "Resume by rerunning on every host: python" in line and "--process_id=" in line
    # Resume: both processes again, to the end.
    cmds = _two_process_cmds(setup, wd, _free_port())
    env = _two_process_env(setup)
    procs = _popen_all(cmds, env, stderr=subprocess.STDOUT)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, o in zip(procs, outs, strict=True):
        assert p.returncode == 0, o[-3000:]
    assert "resumed from step" in outs[0]
    step, state, _ = _final_state(wd)
    assert step == reference[0]
    # Same tolerance as the uninterrupted 2-process run against 1 process (test_train_resume:
    # with the class-sharded head one conv weight differs by 1.1e-4).
    for name, atol in (("params", 2e-4), ("batch_stats", 1e-5)):
        for x, y in zip(
            __import__("jax").tree.leaves(state[name]),
            __import__("jax").tree.leaves(reference[1][name]),
            strict=True,
        ):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol, err_msg=name)
