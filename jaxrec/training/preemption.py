"""Preemption: on SIGTERM, finish the step, checkpoint it on every host, and exit.

Cloud GPU/TPU VMs receive SIGTERM shortly before they are taken away (spot/preemptible VMs,
Kubernetes, SLURM). Without a handler Python dies at once and the work since the last periodic
checkpoint is lost. `PreemptionWatch` turns the signal into a flag; the training loop asks it
once per step whether to stop, and every host gets the same answer at the same step, so all of
them save the checkpoint of that one step (orbax saves are collective) and raise `Preempted`.
`train.py` prints the step and exits with status 143 (128 + SIGTERM, "terminated, not done", so
that a job controller restarts it); rerunning the command resumes bit-identically from it.

Agreement across hosts: a SIGTERM may reach only one host. After each step every process enters
its local flag in a tiny jitted max over the "data" mesh (one int32 per device) that takes the
step's output as an (unused) argument, so it runs after that step on every device, and reads the
result before it dispatches the next step: all hosts see the same global value after the same
step. The collective programs stay strictly ordered (no reduction can run beside a train step
and pair its collectives differently on two hosts); the price is that in a multi-process run the
host waits for each step before dispatching the next (one tiny all-reduce and the dispatch
latency per step). A single process needs no reduction and never waits: it stops after the step
it is in.

A second SIGTERM is not caught (the default action, ending the process, is restored by the
first), so an operator can still stop a run at once.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.parallel import data_sharding, replicated

EXIT_STATUS = 128 + signal.SIGTERM


class Preempted(Exception):  # a stop, not an error
    """Training stopped on a signal after saving the checkpoint of `step` in `path`."""

    def __init__(self, step: int, path: str, signal_name: str = "SIGTERM") -> None:
        self.step, self.path, self.signal_name = step, path, signal_name
        super().__init__(
            f"{signal_name} received: stopped after step {step} and saved its checkpoint in "
            f"{path}; rerun the same command to resume from it"
        )


class PreemptionWatch:
    """Catches SIGTERM (in the main thread) and answers, identically on every host, whether to
    stop. Use as a context manager; `after_step()` once per training step on every process,
    `stop_now()` at points every process reaches (e.g. epoch ends)."""

    def __init__(self, mesh: jax.sharding.Mesh, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.mesh, self.signals = mesh, signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._multi = jax.process_count() > 1
        self._sharding = data_sharding(mesh)
        self._local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
        self._max = jax.jit(
            lambda flags, after: jnp.max(flags), out_shardings=replicated(mesh), keep_unused=True
        )

    # -- signal handling ------------------------------------------------------------------

    def install(self) -> None:
        """Catch the signals (only the main thread can; elsewhere this does nothing)."""
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
                # SA_RESTART, as a C++ std::signal handler has: a native call (XLA, gloo, gRPC)
                # blocked in the thread that takes the signal resumes instead of seeing EINTR.
                signal.siginterrupt(s, False)

    def uninstall(self) -> None:
        """Restore the handlers found by `install` (the default one where it was not Python's)."""
        for s, prev in self._previous.items():
            if signal.getsignal(s) == self._handle:
                signal.signal(s, signal.SIG_DFL if prev is None else prev)
        self._previous.clear()

    def __enter__(self) -> PreemptionWatch:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.received is None:
            self.received = signum
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else "SIGTERM"

    # -- agreement ------------------------------------------------------------------------

    def _agree(self, after: Any) -> bool:
        flag = np.full((self._local,), self.received is not None, np.int32)
        flags = jax.make_array_from_process_local_data(self._sharding, flag)
        return bool(self._max(flags, after).addressable_data(0))

    def after_step(self, after: Any = None) -> bool:
        """Call once per step on every process, with an output of the step (`after`, e.g. the
        new step counter): True on all of them, after the same step, when any process has
        received a signal, so the loop should checkpoint this step and stop."""
        if not self._multi:
            return self.received is not None
        return self._agree(0 if after is None else after)

    def stop_now(self) -> bool:
        """Blocking agreement at a point every process reaches: True on all of them when any
        process has received a signal."""
        return self.after_step()

    def stopped(self, step: int, path: str) -> Preempted:
        """The exception to raise once the checkpoint of `step` is saved in `path`."""
        return Preempted(step, path, self.signal_name)
