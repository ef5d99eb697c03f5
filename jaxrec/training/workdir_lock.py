"""One training run per workdir: an exclusive `flock` on WORKDIR/.train.lock.

`train.py` takes the lock (on process 0 of a multi-host run) before it writes anything into the
workdir, and a second `train.py` on the same workdir exits at once with one line naming the
holder (pid, host, start time, command). The kernel drops a `flock` when its process dies, so a
killed run never leaves a stale lock; the file itself stays (deleting it would race with a
starting run). Readers (`evaluate.py`, export, extract, convert) never take it.

Usage in the trainer: decorate the training function with `@held_during` and call
`acquire(workdir)` inside it; the lock is released when the decorated function returns or
raises (the kernel releases it anyway when the process ends).
"""

from __future__ import annotations

import contextvars
import fcntl
import functools
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxrec.errors import JaxrecError

LOCK_FILE = ".train.lock"

F = TypeVar("F", bound=Callable[..., Any])


class WorkdirBusyError(JaxrecError):
    """Another training process holds the workdir's lock."""


class WorkdirLock:
    """An exclusive lock on WORKDIR/.train.lock held through an open file descriptor."""

    def __init__(self, workdir: str | os.PathLike) -> None:
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        """Take the lock without waiting; raises `WorkdirBusyError` naming the holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirBusyError(
                f"workdir {self.workdir} is in use by another training run "
                f"({holder(self.workdir)}); one train.py per workdir: wait for it to finish, "
                "stop it, or pass another --workdir"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "argv": sys.argv,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def holder(workdir: str | os.PathLike) -> str:
    """Who holds (or last held) the lock of `workdir`, as `pid P on host H, started T`."""
    try:
        with open(os.path.join(os.fspath(workdir), LOCK_FILE)) as f:
            info = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "its details are not written yet"
    cmd = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(info.get("argv", [])))
    return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}" + (
        f": {cmd}" if cmd else ""
    )


_HELD: contextvars.ContextVar[list[WorkdirLock] | None] = contextvars.ContextVar(
    "jaxrec_workdir_locks", default=None
)


def held_during(fn: F) -> F:
    """Decorator: locks taken with `acquire` inside `fn` are released when `fn` ends."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        token = _HELD.set([])
        try:
            return fn(*args, **kwargs)
        finally:
            for lock in _HELD.get() or []:
                lock.release()
            _HELD.reset(token)

    return wrapper  # type: ignore[return-value]


def acquire(workdir: str | os.PathLike) -> WorkdirLock | None:
    """Lock `workdir` for training: process 0 takes the lock, and in a multi-host run every
    process learns whether it succeeded (the others then stop too). Returns the lock on process
    0, None elsewhere; raises `WorkdirBusyError` on every process when it is taken. Calling it
    again inside the same `held_during` function returns the lock already held."""
    held = _HELD.get()
    path = os.path.abspath(os.fspath(workdir))
    for lock in held or []:
        if lock.workdir == path and lock.held:
            return lock  # taken earlier in this run
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir).acquire()
        except WorkdirBusyError as e:
            error = e
    if jax.process_count() > 1:
        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not int(ok) and error is None:
            error = WorkdirBusyError(
                f"workdir {os.path.abspath(workdir)} is in use by another training run "
                "(process 0 reports the holder)"
            )
    if error is not None:
        raise error
    if held is not None and lock is not None:
        held.append(lock)
    return lock
