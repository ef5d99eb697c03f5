"""A full disk is one DiskFullError line (what, where, how much) for the prepare command and the
search index too, and leaves nothing half-written. A real size-limited tmpfs where it can be
mounted (root), else the kernel's ENOSPC injected at the write."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
import threading
import time

import numpy as np
import pytest
from test_prepare import _make_list

from jaxrec import prepare as prep
from jaxrec.data.datasets import load_list
from jaxrec.errors import DiskFullError, disk_full, is_disk_full
from jaxrec.search import GalleryIndex, store
from jaxrec.training.checkpoint import _remove_partial_save


@contextlib.contextmanager
def small_fs(size: str):
    mnt = tempfile.mkdtemp(prefix="jaxrec_full_")
    ok = not os.environ.get("JAXREC_TEST_NO_MOUNT") and (  # the env var tests the fallback
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield mnt if ok else None
    finally:
        if ok:
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        os.rmdir(mnt)


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_is_disk_full_sees_wrapped_and_textual_errors():
    assert is_disk_full(OSError(errno.ENOSPC, "x"))
    assert is_disk_full(ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']"))
    try:
        try:
            raise OSError(errno.EDQUOT, "quota")
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert is_disk_full(OSError("256000 requested and 65504 written"))  # numpy's short write
    assert not is_disk_full(OSError(errno.EACCES, "denied"))
    e = disk_full("shard 3", "/nonexistent/deep/dir", 3 * 2**20, "rerun")
    assert isinstance(e, DiskFullError) and "\n" not in str(e)
    assert "writing shard 3 to /nonexistent/deep/dir (needs about 3.0 MiB," in str(e)


def test_search_index_on_a_full_disk(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 64)).astype(np.float32)  # 1 MiB of features
    idx = GalleryIndex(64, "IP", "Flat", backend="exact")
    idx.add(x / np.linalg.norm(x, axis=1, keepdims=True), ["a"] * 4000, [f"{i}.jpg" for i in
                                                                          range(4000)])  # fmt: skip
    with small_fs("256k") as mnt:
        d = os.path.join(mnt or str(tmp_path), "idx")
        if mnt is None:
            monkeypatch.setattr(np, "save", _enospc)
        with pytest.raises(DiskFullError) as err:
            store.save(idx, d)
        msg = str(err.value)
        assert "no space left on device writing index file" in msg and d in msg
        assert "the index on disk is unchanged" in msg and "\n" not in msg
        assert not [n for n in os.listdir(d) if ".tmp-" in n]  # nothing half-written stays


def test_prepare_on_a_full_disk_is_one_line_and_resumes(tmp_path, monkeypatch, capsys):
    lst = _make_list(tmp_path / "src", ids=6, per_id=4, size=(60, 90))
    with small_fs("48k") as mnt:
        out = os.path.join(mnt or str(tmp_path), "p")
        argv = ["--list", str(lst), "--image-root", str(tmp_path / "src"), "--out", out,
                "--size", "64", "--codec", "raw", "--shard-size", "2", "--quiet"]  # fmt: skip
        if mnt is None:
            real = prep._write_shard
            calls = []

            def write_shard(*a, **k):
                calls.append(1)
                if len(calls) == 2:
                    _enospc()
                return real(*a, **k)

            monkeypatch.setattr(prep, "_write_shard", write_shard)
        assert prep.main(argv) == 1
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith(
            "error: no space left on device writing shard"
        )
        assert "rerun the same command to continue" in lines[0] and "Traceback" not in err
        shards = os.path.join(out, "shards")
        assert not [n for n in os.listdir(shards) if n.endswith(".tmp")]
        if mnt is not None:
            subprocess.run(["mount", "-o", "remount,size=8m", mnt], check=True)
        else:
            monkeypatch.setattr(prep, "_write_shard", real)
        assert prep.main(argv) == 0
        src = load_list(str(lst), str(tmp_path / "src"))
        assert len(src) == 24


def test_a_failed_saves_folder_is_removed_even_when_late_writes_recreate_it(tmp_path):
    """Tensorstore writes issued before a save failed can land after the error reached the
    trainer (CI left '2.orbax-checkpoint-tmp' behind this way under load)."""
    (tmp_path / "1").mkdir()
    partial = tmp_path / "2.orbax-checkpoint-tmp"
    (partial / "state").mkdir(parents=True)
    landed = []

    def late_writer():
        for delay in (0.1, 0.3):
            time.sleep(delay)
            (partial / "state" / "d").mkdir(parents=True, exist_ok=True)
            (partial / "state" / "d" / f"chunk{delay}").write_bytes(b"x" * 1024)
            landed.append(delay)

    t = threading.Thread(target=late_writer)
    t.start()
    _remove_partial_save(str(tmp_path), 2, quiet_s=1.0)
    t.join()
    assert landed == [0.1, 0.3]  # both writes landed while it was removing
    assert sorted(os.listdir(tmp_path)) == ["1"]
