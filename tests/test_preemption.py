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
import jax.numpy as jnp
from jaxrec.parallel import data_sharding, make_mesh, replicated
from jaxrec.training.preemption import PreemptionWatch
mesh = make_mesh()
# A step with a cross-process collective (sum over the 8 devices of both processes).
step_fn = jax.jit(lambda x: x * 0.5 + x.sum(), out_shardings=data_sharding(mesh))
x = jax.device_put(jnp.ones((8,)), data_sharding(mesh))
stopped_at = None
with PreemptionWatch(mesh) as watch:
    for step in range(1, 100000):
        x = step_fn(x)
        if step == 20:
            print("running", flush=True)  # the test sends SIGTERM to process 1 now
        if watch.after_step(x):
            stopped_at = step
            break
    agreed = watch.stop_now()
print(json.dumps({"stopped_at": stopped_at, "received": watch.received, "agreed": agreed}))
"""
)


@pytest.mark.slow
def test_two_processes_agree_on_the_step_when_one_gets_sigterm(tmp_path):
    """A real SIGTERM from outside to process 1 (delivered to whichever of its threads the
    kernel picks) while both run collectives: both stop after the same step, process 0 too."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)

    def preempt_process_1(procs):
        for line in procs[1].stdout:
            if line.startswith("running"):
                procs[1].send_signal(signal.SIGTERM)
                return

    outs = multiproc_util.run_processes(script, on_start=preempt_process_1)
    assert outs[0]["received"] is None and outs[1]["received"] == signal.SIGTERM
    assert outs[0]["stopped_at"] == outs[1]["stopped_at"] >= 20
    assert outs[0]["agreed"] and outs[1]["agreed"]
