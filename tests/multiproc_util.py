"""Run a worker script as several real jax.distributed processes on this machine (loopback
coordinator, CPU devices, gloo collectives): each process prints one JSON line last."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Worker preamble: `pid, port = int(sys.argv[1]), sys.argv[2]`, then jax.distributed is up.
PREAMBLE = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=int(sys.argv[3]), process_id=pid)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(
    script: os.PathLike,
    *args: str,
    processes: int = 2,
    devices: int = 4,
    timeout: int = 240,
    on_start: Callable[[list[subprocess.Popen]], None] | None = None,
) -> list[dict]:
    """Start `processes` copies of `script` (argv: pid, port, processes, *args) with `devices`
    CPU devices each; wait for all and return each one's last stdout line parsed as JSON.
    `on_start(procs)` may act on the running processes first (e.g. read a line, send a signal)."""
    port = str(free_port())
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [sys.executable, os.fspath(script), str(i), port, str(processes), *map(str, args)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    if on_start is not None:
        on_start(procs)
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs
