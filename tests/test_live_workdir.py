"""Reading a live run: a checkpoint rotated out by the trainer while evaluate/export/extract read
it is not "unreadable"; the newest one is read instead and named. Real orbax checkpoints."""

from __future__ import annotations

import gc
import os
import shutil
import sys
import time
import warnings

import jax
import numpy as np
import optax
import pytest
from test_export import random_variables
from train_data_util import make_tiny_dataset, tiny_config

from jaxrec.config import resolve
from jaxrec.errors import CheckpointMismatchError
from jaxrec.models import build_model
from jaxrec.training import checkpoint as C
from jaxrec.training.train_step import TrainState
from jaxrec.training.workdir import save_config


def _state(v: dict, step: int) -> TrainState:
    """A TrainState for checkpoint `step` from model variables `v`, on the device."""
    params = {"model": v["params"], "loss": {}}
    state = TrainState(
        step=np.asarray(step, np.int32),
        params=params,
        batch_stats=v["batch_stats"],
        opt_state=optax.sgd(0.1).init(params),
    )
    return jax.tree_util.tree_map(jax.numpy.asarray, state)


@pytest.fixture
def workdir(tmp_path):
    data = make_tiny_dataset(str(tmp_path / "data"), per_class=2)
    cfg = tiny_config(data, size=32)
    run = resolve(cfg)
    wd = tmp_path / "run"
    save_config(cfg, wd)
    ck = C.Checkpoints(str(wd))
    for step in (3, 7, 9):
        ck.save(step, _state(random_variables(build_model(run.arch), step), step), {"epoch": 0})
    ck.close()
    return wd


def _rotating_read(monkeypatch, victims):
    """The trainer deletes each of `victims` just as the reader opens it."""
    real = C._read

    def read(wd, which, step):
        if str(step) in victims:
            victims.remove(str(step))
            shutil.rmtree(wd.checkpoint(which, step))
        return real(wd, which, step)

    monkeypatch.setattr(C, "_read", read)


def test_checkpoint_rotated_out_while_read_falls_to_the_newest_and_says_so(workdir, monkeypatch):
    _rotating_read(monkeypatch, ["9"])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, variables, step, desc = C.restore_variables(workdir, "latest")
    assert step == 7 and "checkpoints step 7" in desc
    msg = " ".join(str(x.message) for x in w)
    assert "checkpoints/9 was removed by the running trainer while it was read" in msg
    assert "unreadable" not in msg
    assert variables["params"]


def test_damaged_checkpoint_is_still_called_unreadable(workdir):
    for f in (workdir / "checkpoints" / "9" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * f.stat().st_size)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, _, step, _ = C.restore_variables(workdir, "latest")
    assert step == 7
    msg = " ".join(str(x.message) for x in w)
    assert "checkpoints/9 is unreadable" in msg and "removed" not in msg


def test_explicit_step_rotated_out_is_a_clear_error(workdir, monkeypatch):
    _rotating_read(monkeypatch, ["7"])
    with pytest.raises(CheckpointMismatchError, match=r"removed while it was read .* \[3, 9\]"):
        C.restore_variables(workdir, step=7)


def test_evaluate_cli_prints_the_fallback_as_one_warning_line(workdir):
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for f in (workdir / "checkpoints" / "9" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * f.stat().st_size)
    env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu")
    p = subprocess.run(
        [
            sys.executable,
            os.path.join(repo, "evaluate.py"),
            f"--workdir={workdir}",
            "--latest",
            "--num_visualize=0",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    warn = [x for x in p.stderr.splitlines() if x.startswith("warning:")]
    assert len(warn) == 1 and "checkpoints/9 is unreadable" in warn[0], p.stderr[-2000:]
    assert "UserWarning" not in p.stderr and "warnings.warn" not in p.stderr
    assert "evaluated workdir" in p.stdout and "(checkpoints step 7)" in p.stdout


def test_reading_in_a_loop_beside_real_rotation(workdir):
    """A thread saves checkpoints with keep=1 (each save deletes the previous one) while this
    thread reads the newest in a loop: every read succeeds, none says "unreadable"."""
    import threading

    v = random_variables(build_model(C.load_run(str(workdir)).arch), 0)
    errors: list[BaseException] = []

    def rotate():
        try:
            ck = C.Checkpoints(str(workdir), max_to_keep=1)
            for step in range(10, 40):
                ck.save(step, _state(v, step), {"epoch": 0})
                time.sleep(0.05)  # a training step: saves back to back can starve a reader
            ck.close()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=rotate)
    t.start()
    reads, notes = [], []
    while t.is_alive():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            reads.append(C.restore_variables(workdir, "latest")[2])
        notes += [str(x.message) for x in w]
    t.join()
    assert not errors, errors
    assert len(reads) >= 3 and reads == sorted(reads), reads
    assert not [n for n in notes if "unreadable" in n], notes


def _abandoned_read_error(filename: str) -> BaseException:
    """What an orbax read coroutine leaves when it is collected unfinished (a sibling read failed
    first): it catches the GeneratorExit of its closing and raises an Exception instead, which
    Python can only hand to sys.unraisablehook. The coroutine is compiled under `filename`."""
    src = (
        "async def read(wait):\n"
        "    try:\n"
        "        await wait\n"
        "    except BaseException as e:\n"
        "        raise Exception('Encountered error while reading array index') from e\n"
    )
    scope: dict = {}
    exec(compile(src, filename, "exec"), scope)

    class Pending:
        def __await__(self):
            yield

    seen = []
    hook, sys.unraisablehook = sys.unraisablehook, seen.append
    try:
        coro = scope["read"](Pending())
        coro.send(None)
        del coro
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert len(seen) == 1
    return seen[0].exc_value


def test_abandoned_orbax_read_coroutines_are_not_printed():
    orbax_file = os.path.join(os.sep, "x", "orbax", "checkpoint", "serialization.py")
    assert C._orbax_background_noise(_abandoned_read_error(orbax_file))
    # The same pattern in anyone else's code, and other orbax errors, are still printed.
    assert not C._orbax_background_noise(_abandoned_read_error("/x/mine/reader.py"))
    assert not C._orbax_background_noise(ValueError("orbax: a real error"))
    assert C._orbax_background_noise(RuntimeError("Event loop is closed"))
