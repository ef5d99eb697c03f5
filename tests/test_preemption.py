"""PreemptionWatch with real signals: one process, and two jax.distributed processes (2 x 4 CPU
devices, gloo) where only one of them gets SIGTERM and both stop at the same step."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from jaxrec.parallel import make_mesh
from jaxrec.preemption import EXIT_STATUS, Preempted, PreemptionWatch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


_WORKER = r"""
import json, os, signal, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import jax.numpy as jnp
from jaxrec.parallel import make_mesh, replicated
from jaxrec.preemption import PreemptionWatch
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_agree_on_the_step_when_one_gets_sigterm(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert outs[0]["received"] is None and outs[1]["received"] == signal.SIGTERM
    # Host 1 raised its flag during step 5; the step-5 reduction is read after step 6.
    assert outs[0]["stopped_at"] == outs[1]["stopped_at"] == 6
    assert outs[0]["agreed"] and outs[1]["agreed"]
