"""Multi-host faults end cleanly: a dead peer or coordinator stops every survivor with one line.

Without this, a process whose peer dies prints a gloo traceback, then JAX's coordination agent
aborts it from a C++ thread (`Terminating process because the JAX distributed service detected
fatal errors`, `Fatal Python error: Aborted`), or it hangs in `jax.distributed.shutdown` at exit
for minutes. Here:

- `initialize(**kwargs)` starts `jax.distributed` with a bounded heartbeat (`HEARTBEAT_S`: a
  process that stops answering is declared dead after that long) and with an error callback
  that replaces the abort: it prints one `error:` line (which process is gone, the last
  checkpoint step in the workdir, the command to resume) and ends the process at once with
  `os._exit(EXIT_CODE)`, skipping the distributed shutdown that would hang.
- `exit_on_peer_failure(err)`: the same for an exception raised in the training thread by a
  collective whose peer vanished (gloo "Connection reset by peer"); it first waits a few seconds
  for the coordination service to name the lost process.

Resuming is ordinary: rerunning the same command on every host restores the newest checkpoint.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import threading
import time
from typing import Any, NoReturn

HEARTBEAT_S = 20  # seconds without a heartbeat before a process is declared dead
EXIT_CODE = 1
_WAIT_FOR_SERVICE_S = 10.0

_state: dict[str, Any] = {"workdir": None, "num_processes": None, "coordinator": None}
_exiting = threading.Lock()


def set_workdir(workdir: str) -> None:
    """Name the run's workdir, for the last-checkpoint step in the fault message."""
    _state["workdir"] = os.path.abspath(workdir)


def initialize(**kwargs: Any) -> None:
    """`jax.distributed.initialize(**kwargs)` with a bounded heartbeat and the clean-exit fault
    callback instead of JAX's abort."""
    import jax  # noqa: PLC0415
    from jax._src.lib import _jax  # noqa: PLC0415 - the client factory JAX calls

    kwargs.setdefault("heartbeat_timeout_seconds", HEARTBEAT_S)
    _state["coordinator"] = kwargs.get("coordinator_address")
    _state["num_processes"] = kwargs.get("num_processes")
    original = _jax.get_distributed_runtime_client

    def client(*args: Any, **kw: Any) -> Any:
        kw.setdefault("missed_heartbeat_callback", _on_service_error)
        return original(*args, **kw)

    _jax.get_distributed_runtime_client = client
    try:
        jax.distributed.initialize(**kwargs)
    finally:
        _jax.get_distributed_runtime_client = original


def _on_service_error(status: Any, *_: Any) -> None:
    """Called by the coordination agent's thread when the service reports a fatal error."""
    _exit(_describe(str(status)))


def is_peer_failure(err: BaseException) -> bool:
    """Whether `err` looks like a collective or coordination call that lost a peer."""
    text = f"{type(err).__name__}: {err}"
    return bool(
        re.search(
            r"Gloo|gloo|Connection (reset|refused|closed)|coordination|CoordinationService|"
            r"heartbeat|Broken pipe|UNAVAILABLE|DEADLINE_EXCEEDED|peer",
            text,
        )
    )


def exit_on_peer_failure(err: BaseException) -> None:
    """In a multi-process run, end this process with the one-line fault message if `err` came
    from a lost peer; otherwise return (the caller re-raises)."""
    import jax  # noqa: PLC0415

    if jax.process_count() < 2 or not is_peer_failure(err):
        return
    # The coordination service usually names the lost process a moment later (the callback
    # then exits with the better message); wait briefly for it.
    deadline = time.monotonic() + _WAIT_FOR_SERVICE_S
    while time.monotonic() < deadline:
        time.sleep(0.2)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    _exit(f"a peer process of this {jax.process_count()}-process run is gone ({first[:200]})")


def _describe(message: str) -> str:
    tasks = sorted({int(t) for t in re.findall(r"task:(\d+)", message)})
    try:
        import jax  # noqa: PLC0415

        me = jax.process_index()
    except Exception:  # noqa: BLE001 - the message must still come out
        me = None
    others = [t for t in tasks if t != me]
    reason = "stopped answering" if "heartbeat" in message.lower() else "is gone"
    if others:
        who = ", ".join(f"process {t}" for t in others)
        return f"{who} of the multi-host run {reason} (coordination service: {_first(message)})"
    if me not in (None, 0) and re.search(r"UNAVAILABLE|Connection|Socket|unavailable", message):
        return (
            f"the coordinator (process 0 at {_state['coordinator'] or 'its address'}) is gone "
            f"({_first(message)})"
        )
    return f"the multi-host run lost a process ({_first(message)})"


def _first(message: str) -> str:
    line = next((s.strip() for s in message.splitlines() if s.strip()), message)
    return line[:200]


def _exit(what: str) -> NoReturn:
    """Print the fault line (once, whichever thread gets here first) and end the process now."""
    if not _exiting.acquire(blocking=False):
        while True:  # another thread is already printing and exiting
            time.sleep(60)
    try:
        import jax  # noqa: PLC0415

        me = f"process {jax.process_index()}: "
    except Exception:  # noqa: BLE001
        me = ""
    line = f"error: {me}{what}; {_resume_hint()}"
    try:
        sys.stdout.flush()
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    finally:
        os._exit(EXIT_CODE)


def _resume_hint() -> str:
    workdir = _state["workdir"]
    step = None
    if workdir is not None:
        try:
            from jaxrec.training.checkpoint import steps_in  # noqa: PLC0415

            steps = steps_in(workdir, "latest")
            step = steps[-1] if steps else None
        except Exception:  # noqa: BLE001
            step = None
    cmd = shlex.join(["python", *sys.argv])
    where = f"in {workdir}/checkpoints" if workdir else ""
    ckpt = f"last checkpoint: step {step} {where}" if step is not None else "no checkpoint yet"
    return f"{ckpt}. Resume by running on every host: {cmd}"
