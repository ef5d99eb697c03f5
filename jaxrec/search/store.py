"""A gallery index on disk: locking, atomic generations, and checked loading.

Directory layout (see `schema` for index.json):
    index.json             metadata and entries; its rename is the commit point of every write
    features-<gen>.npy     float32 [N, dim] unit features, row i = entries[i]: the source of truth
    vector-<gen>.index     the serialized faiss index (faiss backend only), a cache of the features
    index.lock             the lock file writers hold (`fcntl.flock`, exclusive)

A write takes the lock, writes the new generation's data files under temporary names, renames
them into place, and then replaces index.json (written the same way). Until that last rename the
previous index.json still names the previous generation's files, which are only deleted after it,
so a writer killed at any point leaves the previous index loadable; the next writer removes the
leftovers. Readers take no lock: they read index.json, then the files it names, and start again
if a concurrent writer deleted them in between.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator

import numpy as np

from jaxrec.errors import GalleryError, disk_full, is_disk_full
from jaxrec.search.backends import FaissBackend
from jaxrec.search.index import Entry, GalleryIndex
from jaxrec.search.schema import FORMAT_NAME, FORMAT_VERSION, LEGACY_FILES, check_meta

INDEX_FILE = "index.json"
LOCK_FILE = "index.lock"
_DATA_FILE = re.compile(r"^(features-(\d+)\.npy|vector-(\d+)\.index)$")
_warned: set[tuple[str, str]] = set()


def _warn_once(index_dir: str, kind: str, message: str) -> None:
    key = (os.path.abspath(index_dir), kind)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def forget_warnings() -> None:
    """Forget which indexes were warned about, so that their warnings come again (a stale,
    damaged or old index is reported once per process)."""
    _warned.clear()


def rebuild_hint(index_dir: str, model_dir: str | None) -> str:
    """The one command that rebuilds an index from its gallery list."""
    return (
        f"python -m jaxrec.search build --model {model_dir or 'MODEL_DIR'} --images GALLERY_LIST "
        f"--index {index_dir} --overwrite"
    )


# ---- locking and atomic files -----------------------------------------------------------------


@contextlib.contextmanager
def locked(index_dir: str) -> Iterator[None]:
    """Hold the index's write lock (created with the directory if missing). Blocks, saying so
    once, while another process holds it. The kernel releases it if the holder dies."""
    try:
        os.makedirs(index_dir, exist_ok=True)
        fd = os.open(os.path.join(index_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise GalleryError(f"cannot write to the index directory {index_dir}: {e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process writing {index_dir} ...", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(index_dir: str, name: str, write) -> None:
    """`write(tmp_path)`, fsync, then rename to `name`: the file appears whole or not at all."""
    tmp = os.path.join(index_dir, f".{name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(index_dir, name))
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if is_disk_full(e):
            raise disk_full(
                f"index file {name}", index_dir, hint="the index on disk is unchanged"
            ) from None
        raise


# ---- writing ----------------------------------------------------------------------------------


def _generations(index_dir: str) -> list[int]:
    gens = []
    for name in os.listdir(index_dir):
        m = _DATA_FILE.match(name)
        if m:
            gens.append(int(m.group(2) or m.group(3)))
    return gens


def write(index: GalleryIndex, index_dir: str) -> dict[str, str | None]:
    """Write `index` as a new generation and commit it. The caller holds `locked(index_dir)`.

    Returns the data file names it committed."""
    gen = max(_generations(index_dir), default=0) + 1
    files: dict[str, str | None] = {"features": f"features-{gen:06d}.npy", "faiss": None}

    def save_features(p: str) -> None:
        with open(p, "wb") as f:
            np.save(f, index.features)

    _write_file(index_dir, files["features"], save_features)
    if isinstance(index.backend, FaissBackend) and index.backend.index is not None:
        files["faiss"] = f"vector-{gen:06d}.index"
        _write_file(index_dir, files["faiss"], index.backend.write)
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": index.config,
        "model_fingerprint": index.model_fingerprint,
        "backend": index.backend.name,
        "files": files,
        "entries": [dataclasses.asdict(e) for e in index.entries],
    }
    if index.calibration is not None:
        meta["calibration"] = index.calibration

    def dump(p: str) -> None:
        with open(p, "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False, indent=1)

    _write_file(index_dir, INDEX_FILE, dump)  # the commit point
    _fsync_dir(index_dir)
    keep = {INDEX_FILE, LOCK_FILE, *(n for n in files.values() if n)}
    for name in os.listdir(index_dir):
        stale = _DATA_FILE.match(name) or ".tmp-" in name or name in LEGACY_FILES.values()
        if stale and name not in keep:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(index_dir, name))
    return files


def update(
    index_dir: str, change: Callable[[GalleryIndex], bool], backend: str = "auto"
) -> GalleryIndex:
    """Read-modify-write under the lock: load the committed index, apply `change` to it, and
    commit it if `change` returns True. Concurrent updates serialize; none is lost."""
    with locked(index_dir):
        index = load(index_dir, backend)
        if change(index):
            write(index, index_dir)
    return index


def save(index: GalleryIndex, index_dir: str) -> None:
    """Take the lock and write `index` (replacing whatever index the directory holds)."""
    with locked(index_dir):
        write(index, index_dir)


# ---- reading ----------------------------------------------------------------------------------


def _read_meta(index_dir: str) -> dict:
    meta_path = os.path.join(index_dir, INDEX_FILE)
    if not os.path.isfile(meta_path):
        raise GalleryError(
            f"{meta_path} not found: {index_dir} is not a gallery index "
            "(create one with `python -m jaxrec.search build`)"
        )
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GalleryError(f"{meta_path}: not valid JSON ({err})") from None
    return check_meta(meta, meta_path)


def _read_features(path: str, n: int, dim: int, index_dir: str, model_dir: str | None):
    lost = (
        "The features are the index's source of truth and cannot be recovered from the other "
        f"files; rebuild the index: {rebuild_hint(index_dir, model_dir)}"
    )
    try:
        feats = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, EOFError, OSError) as e:  # numpy's messages do not name the file
        raise GalleryError(f"{path} is truncated or damaged ({e}). {lost}") from None
    if feats.dtype != np.float32 or feats.ndim != 2:
        raise GalleryError(
            f"{path} holds {feats.dtype} {feats.shape}, not float32 [N, dim]. {lost}"
        )
    if feats.shape != (n, dim):
        raise GalleryError(
            f"{path} has shape {feats.shape} but index.json lists {n} entries (key entries) of "
            f"dim {dim} (key config.dim). {lost}"
        )
    if not np.all(np.isfinite(feats)):
        raise GalleryError(f"{path} contains NaN or Inf. {lost}")
    return feats


def load(index_dir: str, backend: str = "auto") -> GalleryIndex:
    """Load and check the committed index in `index_dir` (no lock needed: see the module
    docstring). A faiss file that is missing, unreadable or stale is rebuilt from the features
    in memory, with a warning."""
    for attempt in range(3):
        try:
            return _load_once(index_dir, backend, last=attempt == 2)
        except _Replaced:
            continue  # a writer committed a new generation while we read; read that one
    raise AssertionError("unreachable")


class _Replaced(Exception):
    """A data file named by index.json vanished: a writer committed since we read index.json."""


def _load_once(index_dir: str, backend: str, last: bool) -> GalleryIndex:
    meta = _read_meta(index_dir)
    cfg, files = meta["config"], meta["files"]
    index = GalleryIndex(
        cfg["dim"],
        cfg["metric"],
        cfg["method"],
        backend=backend,
        model_dir=cfg.get("model_dir"),
        delimiter=cfg.get("delimiter", "\t"),
        ef_search=cfg.get("ef_search"),
        nprobe=cfg.get("nprobe"),
        model_fingerprint=meta["model_fingerprint"],
    )
    index.entries = [Entry(**e) for e in meta["entries"]]
    index.calibration = meta.get("calibration")
    index.runtime = cfg.get("runtime", "jax")
    feats_path = os.path.join(index_dir, files["features"])
    try:
        index.features = _read_features(
            feats_path, len(index.entries), index.dim, index_dir, index.model_dir
        )
    except FileNotFoundError:
        if meta["version"] >= 2 and not last:
            raise _Replaced from None
        raise GalleryError(
            f"{feats_path} is missing. The features are the index's source of truth; rebuild the "
            f"index: {rebuild_hint(index_dir, index.model_dir)}"
        ) from None
    if meta["version"] == 1:
        _warn_once(
            index_dir,
            "v1",
            f"{index_dir} was written by an older jaxrec and records no model fingerprint, so the "
            "model used with it cannot be checked; the next append records it",
        )
    faiss_name = files["faiss"]
    problem = None
    if isinstance(index.backend, FaissBackend) and faiss_name is not None:
        faiss_path = os.path.join(index_dir, faiss_name)
        if os.path.isfile(faiss_path):
            problem = index.backend.read(faiss_path, index.ids)
        elif meta["version"] >= 2:
            if not last:
                raise _Replaced
            problem = "the file is missing"
    if problem is not None:
        _warn_once(
            index_dir,
            f"{faiss_name}: {problem}",
            f"{os.path.join(index_dir, faiss_name)} is stale or damaged ({problem}); rebuilt the "
            f"faiss index from {files['features']}. `python -m jaxrec.search repair --index "
            f"{index_dir}` writes it back (append and remove do too)",
        )
    if isinstance(index.backend, FaissBackend) and index.backend.index is not None:
        return index
    index.backend.reset(index.features, index.ids)
    return index
