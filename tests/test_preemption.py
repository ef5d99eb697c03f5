"""PreemptionWatch with real signals: one process, and two jax.distributed processes (2 x 4 CPU
devices, gloo) where only one of them gets SIGTERM and both stop at the same step."""

from __future__ import annotations

import os
import signal

import multiproc_util
import pytest

from jaxrec.parallel import make_mesh
from jaxrec.training.preemption import EXIT_STATUS, Preempted, PreemptionWatch


def test_sigterm_sets_the_flag_once_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatch(make_mesh()) as watch:
        assert not watch.after_step() and not watch.stop_now()
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled in this (main) thread
        assert watch.after_step() and watch.stop_now()
        assert watch.signal_name == "SIGTERM"
        # The first SIGTERM restored the default action: a second one ends the process.
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        exc = watch.stopped(7, "/w/checkpoints")
    assert signal.getsignal(signal.SIGTERM) == before
    assert isinstance(exc, Preempted) and exc.step == 7
    assert "stopped after step 7" in str(exc) and "/w/checkpoints" in str(exc)
    assert "rerun the same command" in str(exc)
    assert EXIT_STATUS == 143


_WORKER = (
    multiproc_util.PREAMBLE
    + r"""
import os, signal
import jax.numpy as jnp
from jaxrec.parallel import make_mesh, replicated
from jaxrec.training.preemption import PreemptionWatch
mesh = make_mesh()
step_fn = jax.jit(lambda x: x * 1.0001 + 1.0, out_shardings=replicated(mesh))
x = jax.device_put(jnp.ones((4,)), replicated(mesh))
stopped_at = None
with PreemptionWatch(mesh) as watch:
    for step in range(1, 50):
        x = step_fn(x)
        if pid == 1 and step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # only this host is preempted
        if watch.after_step():
            stopped_at = step
            break
    agreed = watch.stop_now()
print(json.dumps({"stopped_at": stopped_at, "received": watch.received, "agreed": agreed}))
"""
)


@pytest.mark.slow
def test_two_processes_agree_on_the_step_when_one_gets_sigterm(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    outs = multiproc_util.run_processes(script)
    assert outs[0]["received"] is None and outs[1]["received"] == signal.SIGTERM
    # Host 1 raised its flag during step 5; the step-5 reduction is read after step 6.
    assert outs[0]["stopped_at"] == outs[1]["stopped_at"] == 6
    assert outs[0]["agreed"] and outs[1]["agreed"]
