"""Multi-host faults end cleanly: a dead peer or coordinator stops every survivor with one line.

Without this, a process whose peer dies prints a gloo traceback, then JAX's coordination agent
ends it from a C++ thread (`Terminating process because the JAX distributed service detected
fatal errors`, a C++ stack, `Fatal Python error: Aborted`), or it hangs in
`jax.distributed.shutdown` at exit for minutes. JAX offers no working hook for that error (its
`missed_heartbeat_callback` cannot convert the status it passes), so in a multi-process run:

- `jax.distributed` starts with a bounded heartbeat (`HEARTBEAT_S`): a process that stops
  answering is declared dead after that long, and every survivor is told at once when a peer's
  connection drops;
- the coordination service's own log lines and the C++ stack of its abort are kept off the
  terminal (a filter on file descriptor 2 that drops exactly those records), but remembered;
- the abort itself (SIGABRT) is caught: the process prints one `error:` line (which process is
  gone, the last checkpoint step in the workdir, the command to resume) and exits with status
  `EXIT_CODE` at once, skipping the distributed shutdown that would hang;
- `exit_on_peer_failure(err)` does the same for an exception that a collective raises in the
  training thread when its peer vanished (gloo "Connection reset by peer").

Resuming is ordinary: rerunning the same command on every host restores the newest checkpoint.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import shlex
import signal
import sys
import threading
import time
from typing import Any, NoReturn

import jax

from jaxrec.training.workdir import Workdir

HEARTBEAT_S = 20  # seconds without a heartbeat before a process is declared dead
EXIT_CODE = 1
_WAIT_FOR_SERVICE_S = HEARTBEAT_S + 10.0  # the service names a dead peer within HEARTBEAT_S

_state: dict[str, Any] = {"workdir": None, "coordinator": None, "fatal": [], "stderr": 2}
_exiting = threading.Lock()
_keep: list[Any] = []  # the ctypes signal handler must outlive this module's functions


def set_workdir(workdir: str) -> None:
    """Name the run's workdir, for the last-checkpoint step in the fault message."""
    _state["workdir"] = os.path.abspath(workdir)


def initialize(**kwargs: Any) -> None:
    """`jax.distributed.initialize(**kwargs)` with a bounded heartbeat, then the clean exit on a
    lost peer (stderr filter and SIGABRT handler) for this process."""
    kwargs.setdefault("heartbeat_timeout_seconds", HEARTBEAT_S)
    _state["coordinator"] = kwargs.get("coordinator_address")
    _filter_stderr()
    jax.distributed.initialize(**kwargs)
    _catch_abort()


# ------------------------------------------------------------------------------ stderr filter

_GLOG = re.compile(rb"^[EFW]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ (\S+):\d+\]")
_COORDINATION_SOURCES = re.compile(rb"coordination|client\.h|preemption|distributed")
_STACK = re.compile(rb"^(\*\*\* Check failure stack trace|    @ +0x)")


def _filter_stderr() -> None:
    """Route fd 2 through a thread that drops the coordination service's records (each is one
    write: a glog line and its continuation lines) and the C++ stack of its abort, keeping them
    for the fault message. Everything else passes through unchanged."""
    sys.stderr.flush()
    real = os.dup(2)
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)
    _state["stderr"] = real

    def pump() -> None:
        while True:
            try:
                chunk = os.read(r, 65536)
            except OSError:
                return
            if not chunk:
                return
            out = []
            for record in _records(chunk):
                m = _GLOG.match(record)
                if m and _COORDINATION_SOURCES.search(m.group(1)):
                    _state["fatal"].append(record.decode(errors="replace"))
                    del _state["fatal"][:-20]
                elif not _STACK.match(record):
                    out.append(record)
            if out:
                os.write(real, b"".join(out))

    thread = threading.Thread(target=pump, name="jaxrec-stderr", daemon=True)
    thread.start()

    def restore() -> None:  # at exit: everything written so far reaches the terminal
        try:
            sys.stderr.flush()
        except (OSError, ValueError):  # a closed or broken stderr
            pass
        os.dup2(real, 2)
        thread.join(timeout=2.0)

    atexit.register(restore)


def _records(chunk: bytes) -> list[bytes]:
    """Split a chunk at the start of each glog record or stack line (a glog record's
    continuation lines stay with it); other text stays whole."""
    lines = chunk.splitlines(keepends=True)
    records: list[bytes] = []
    for line in lines:
        if _GLOG.match(line) or _STACK.match(line) or not records:
            records.append(line)
        elif _GLOG.match(records[-1]) and _COORDINATION_SOURCES.search(
            _GLOG.match(records[-1]).group(1)
        ):
            records[-1] += line  # continuation of a coordination record
        elif _STACK.match(records[-1]):
            records.append(line)
        else:
            records[-1] += line
    return records


# --------------------------------------------------------------------------------- the exits


def _catch_abort() -> None:
    """Replace the coordination agent's abort with the one-line exit."""
    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_int)

    def on_abort(_signum: int) -> None:
        text = "\n".join(_state["fatal"])
        if "Terminating process" not in text and "coordination" not in text.lower():
            signal.signal(signal.SIGABRT, signal.SIG_DFL)  # not ours: a real crash
            os.abort()
        _exit(_describe(text))

    handler = handler_type(on_abort)
    _keep.append(handler)
    libc = ctypes.CDLL(None)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, handler_type]
    libc.signal(signal.SIGABRT, handler)


def is_peer_failure(err: BaseException) -> bool:
    """Whether `err` looks like a collective or coordination call that lost a peer."""
    text = f"{type(err).__name__}: {err}"
    return bool(
        re.search(
            r"[Gg]loo|Connection (reset|refused|closed)|[Cc]oordination|heartbeat|Broken pipe|"
            r"UNAVAILABLE|DEADLINE_EXCEEDED|peer",
            text,
        )
    )


def exit_on_peer_failure(err: BaseException) -> None:
    """In a multi-process run, end this process with the one-line fault message if `err` came
    from a lost peer; otherwise return (the caller re-raises)."""
    if jax.process_count() < 2 or not is_peer_failure(err):
        return
    # The coordination service names the lost process a moment later (the abort handler then
    # exits with that message); wait for it, bounded.
    deadline = time.monotonic() + _WAIT_FOR_SERVICE_S
    while time.monotonic() < deadline and not _state["fatal"]:
        time.sleep(0.2)
    time.sleep(0.5)
    text = "\n".join(_state["fatal"])
    if text:
        _exit(_describe(text))
    first = next((s.strip() for s in str(err).splitlines() if s.strip()), type(err).__name__)
    _exit(
        f"a collective with the other processes of this {jax.process_count()}-process run "
        f"failed (a peer is gone or far behind): {first[:200]}"
    )


def _describe(text: str) -> str:
    """Which process is gone, from the coordination service's records."""
    try:
        me = jax.process_index()
    except Exception:  # noqa: BLE001 - the message must still come out
        me = None
    unhealthy = re.search(r"tasks are unhealthy[^:]*:\s*([\d\s,]+)", text)
    tasks = [int(t) for t in re.findall(r"\d+", unhealthy.group(1))] if unhealthy else []
    tasks += [int(t) for t in re.findall(r"task:(\d+)", text)]
    others = sorted({t for t in tasks if t != me})
    if others:
        who = ", ".join(f"process {t}" for t in others)
        how = " (it stopped answering the coordinator)" if "heartbeat" in text else ""
        return f"{who} of the multi-host run is gone{how}"
    if me not in (None, 0):
        where = _state["coordinator"] or "its address"
        return f"the coordinator (process 0 at {where}) is gone"
    return "a process of the multi-host run is gone"


def _exit(what: str) -> NoReturn:
    """Print the fault line (once, whichever thread gets here first) and end the process now."""
    if not _exiting.acquire(blocking=False):
        while True:  # another thread is already printing and exiting
            time.sleep(60)
    try:
        me = f"process {jax.process_index()}: "
    except Exception:  # noqa: BLE001 - the message must still come out
        me = ""
    line = f"error: {me}{what}; {_resume_hint()}\n"
    try:
        sys.stdout.flush()
        time.sleep(0.2)  # let the stderr filter pass on what came before
        os.write(_state["stderr"], line.encode())
    finally:
        os._exit(EXIT_CODE)


def _resume_hint() -> str:
    workdir = _state["workdir"]
    step = None
    if workdir is not None:
        # A plain listing: orbax's CheckpointManager synchronizes all processes when it opens,
        # which would wait forever for the dead peer. Committed steps are folders named by
        # their step (orbax writes into a temporary name and renames on commit).
        try:
            names = os.listdir(Workdir(workdir).checkpoints("latest"))
        except OSError:
            names = []
        steps = sorted(int(n) for n in names if n.isdigit())
        step = steps[-1] if steps else None
    cmd = shlex.join(["python", *sys.argv])
    if step is not None:
        ckpt = f"last checkpoint: step {step} in {workdir}/checkpoints"
    else:
        ckpt = "no checkpoint was saved yet"
    return f"{ckpt}. Resume by rerunning on every host: {cmd}"
