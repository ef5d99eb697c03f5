"""One run per workdir: the flock is exclusive, names its holder, dies with its process, and is
released when the training function ends (in-process reruns work)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from jaxrec.training.workdir_lock import (
    LOCK_FILE,
    WorkdirBusyError,
    WorkdirLock,
    acquire,
    held_during,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _holder(workdir) -> subprocess.Popen:
    code = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {REPO!r})
        from jaxrec.training.workdir_lock import WorkdirLock
        WorkdirLock({str(workdir)!r}).acquire()
        print("locked", flush=True)
        time.sleep(120)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_locker_is_refused_with_the_holder_and_a_killed_holder_frees_it(tmp_path):
    p = _holder(tmp_path)
    try:
        with pytest.raises(WorkdirBusyError) as err:
            WorkdirLock(tmp_path).acquire()
        msg = str(err.value)
        assert str(tmp_path) in msg and f"pid {p.pid} on host" in msg and "started" in msg
        assert "\n" not in msg
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    lock = WorkdirLock(tmp_path).acquire()  # the kernel dropped the dead process's lock
    assert lock.held and (tmp_path / LOCK_FILE).is_file()
    lock.release()


def test_held_during_releases_on_return_and_on_error(tmp_path):
    @held_during
    def run(fail: bool):
        first = acquire(tmp_path)
        assert first is not None and acquire(tmp_path) is first  # early and late call: one lock
        with pytest.raises(WorkdirBusyError):  # even this process cannot take it twice
            WorkdirLock(tmp_path).acquire()
        if fail:
            raise RuntimeError("boom")

    run(False)
    with pytest.raises(RuntimeError):
        run(True)
    WorkdirLock(tmp_path).acquire().release()  # released both times
