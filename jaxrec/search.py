"""Gallery index for recognition: build, append, remove and query (PP-ShiTu `IndexProcess`).

A gallery index directory holds:

- `index.json`    config (dim, metric, method, model dir, delimiter) and one entry per vector
                  (id, label, path, the original list line). JSON, never pickle.
- `features.npy`  the float32 [N, dim] gallery features, row i belonging to entry i. This is the
                  source of truth: any backend can be rebuilt from it.
- `vector.index`  the serialized faiss index (faiss backend only), a cache of `features.npy`.

Backends: faiss (`HNSW32`, `IVF`, `Flat`, wrapped in `IndexIDMap2` as in PP-ShiTu) or an exact
numpy backend used when faiss is not installed (`pip install jaxrec[faiss]`). With the exact
backend every method searches exhaustively, so its answers equal faiss `Flat`.

Metrics: `IP` (inner product; on L2-normalized features this is the cosine, higher is better) and
`L2` (squared Euclidean distance as faiss reports it, lower is better). Thresholds follow the
metric: a hit is known when `score >= threshold` for IP and when `distance <= threshold` for L2.
PP-ShiTu applies `>=` to both, which inverts the meaning for L2; we do not copy that.

Differences from PP-ShiTu, on purpose:

- `query` returns the top-k hits and marks those past the threshold as "unknown"; PP-ShiTu keeps
  only the top-1 hit and drops it when it fails `score_thres`.
- Labels are the second field of the list line split on the delimiter; PP-ShiTu re-splits the
  stored line on whitespace, which truncates label names containing spaces.
- IVF uses nlist = max(1, min(N // 8, 65536)) (PP-ShiTu's formula; its code path has a NameError).
- `remove` works for HNSW too, by rebuilding the graph from the stored features.
- `append` skips list lines that are already in the index instead of adding duplicates.

Command line:
    python -m jaxrec.search build  --model MODEL_DIR --images LIST --index DIR [--method HNSW32]
    python -m jaxrec.search append --index DIR --images LIST
    python -m jaxrec.search remove --index DIR --images LIST
    python -m jaxrec.search query  --index DIR --image X.jpg [--topk 5] [--threshold 0.5]
    python -m jaxrec.search info   --index DIR
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

INDEX_FILE = "index.json"
FEATURES_FILE = "features.npy"
FAISS_FILE = "vector.index"
FORMAT_NAME = "jaxrec-gallery-index"
FORMAT_VERSION = 1

METHODS = ("HNSW32", "IVF", "Flat")
METRICS = ("IP", "L2")
BACKENDS = ("auto", "faiss", "exact")
# Default thresholds; for L2 on unit vectors d^2 = 2 - 2 cos, so 1.0 is the same cut as cos 0.5.
DEFAULT_THRESHOLD = {"IP": 0.5, "L2": 1.0}
FAISS_HINT = "install faiss with `pip install jaxrec[faiss]` (or `pip install faiss-cpu`)"


class GalleryError(ValueError):
    """Bad input to the gallery index (list file, index directory, arguments)."""


# --------------------------------------------------------------------------------------------
# Backends


def _import_faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError:
        return None
    return faiss


def faiss_available() -> bool:
    """Whether faiss can be imported."""
    return _import_faiss() is not None


def ivf_nlist(n: int) -> int:
    """Number of IVF lists for a gallery of n vectors: min(n // 8, 65536), at least 1."""
    return max(1, min(n // 8, 65536))


class ExactBackend:
    """Exhaustive search with numpy matrix products (same answers as faiss Flat)."""

    name = "exact"

    def __init__(self, dim: int, metric: str):
        self.dim, self.metric = dim, metric
        self._feats = np.zeros((0, dim), np.float32)
        self._ids = np.zeros((0,), np.int64)
        self._sq_norms = np.zeros((0,), np.float32)

    def reset(self, feats: np.ndarray, ids: np.ndarray) -> None:
        self._feats = np.ascontiguousarray(feats, np.float32)
        self._ids = np.asarray(ids, np.int64)
        self._sq_norms = np.einsum("ij,ij->i", self._feats, self._feats)

    # The exact backend keeps no state of its own beyond the arrays, so every change is a reset.
    def add(self, feats: np.ndarray, ids: np.ndarray, all_feats: np.ndarray, all_ids: np.ndarray):
        self.reset(all_feats, all_ids)

    def remove(self, ids: np.ndarray, all_feats: np.ndarray, all_ids: np.ndarray) -> None:
        self.reset(all_feats, all_ids)

    def search(self, queries: np.ndarray, k: int, block: int = 256):
        q = np.ascontiguousarray(queries, np.float32)
        n = self._feats.shape[0]
        kk = min(k, n)
        scores = np.full((q.shape[0], k), -np.inf if self.metric == "IP" else np.inf, np.float32)
        ids = np.full((q.shape[0], k), -1, np.int64)
        if kk == 0:
            return scores, ids
        for s in range(0, q.shape[0], block):
            qb = q[s : s + block]
            sim = qb @ self._feats.T
            if self.metric == "IP":
                key = -sim
            else:
                sim = np.einsum("ij,ij->i", qb, qb)[:, None] + self._sq_norms[None, :] - 2.0 * sim
                np.maximum(sim, 0.0, out=sim)
                key = sim
            if kk < n:
                part = np.argpartition(key, kk - 1, axis=1)[:, :kk]
            else:
                part = np.broadcast_to(np.arange(n), (qb.shape[0], n))
            part_key = np.take_along_axis(key, part, axis=1)
            # Sort by key, ties by gallery position (deterministic, like faiss Flat).
            order = np.lexsort((part, part_key), axis=1)
            top = np.take_along_axis(part, order, axis=1)
            scores[s : s + block, :kk] = np.take_along_axis(sim, top, axis=1)
            ids[s : s + block, :kk] = self._ids[top]
        return scores, ids

    def save(self, path: str) -> None:
        """Nothing to write: the exact backend is rebuilt from features.npy."""

    @property
    def ntotal(self) -> int:
        return int(self._ids.shape[0])


class FaissBackend:
    """faiss index_factory(dim, method) wrapped in IndexIDMap2, as PP-ShiTu builds it."""

    name = "faiss"

    def __init__(self, dim: int, metric: str, method: str):
        self.faiss = _import_faiss()
        if self.faiss is None:
            raise GalleryError(
                f"the faiss backend was requested but faiss is missing: {FAISS_HINT}"
            )
        self.dim, self.metric, self.method = dim, metric, method
        self.index = None
        self.ef_search: int | None = None  # HNSW efSearch; None keeps faiss's default (16)
        self.nprobe: int | None = None  # IVF lists visited; None keeps faiss's default (1)

    def _apply_search_params(self) -> None:
        if self.method == "HNSW32" and self.ef_search:
            self.faiss.downcast_index(self.index.index).hnsw.efSearch = int(self.ef_search)
        if self.method == "IVF" and self.nprobe:
            self.faiss.extract_index_ivf(self.index).nprobe = int(self.nprobe)

    def _new_index(self, n: int):
        faiss = self.faiss
        metric = faiss.METRIC_INNER_PRODUCT if self.metric == "IP" else faiss.METRIC_L2
        factory = f"IVF{ivf_nlist(n)},Flat" if self.method == "IVF" else self.method
        return faiss.IndexIDMap2(faiss.index_factory(self.dim, factory, metric))

    def reset(self, feats: np.ndarray, ids: np.ndarray) -> None:
        feats = np.ascontiguousarray(feats, np.float32)
        self.index = self._new_index(feats.shape[0])
        if feats.shape[0]:
            self.index.train(feats)  # no-op for Flat and HNSW
            self.index.add_with_ids(feats, np.asarray(ids, np.int64))

    def add(self, feats: np.ndarray, ids: np.ndarray, all_feats: np.ndarray, all_ids: np.ndarray):
        if self.index is None or not self.index.is_trained:
            self.reset(all_feats, all_ids)
        else:
            self.index.add_with_ids(np.ascontiguousarray(feats, np.float32), ids.astype(np.int64))

    def remove(self, ids: np.ndarray, all_feats: np.ndarray, all_ids: np.ndarray) -> None:
        if self.method == "HNSW32" or self.index is None:
            # faiss HNSW cannot delete; rebuild the graph from the remaining vectors.
            self.reset(all_feats, all_ids)
        else:
            self.index.remove_ids(np.asarray(ids, np.int64))

    def search(self, queries: np.ndarray, k: int):
        q = np.ascontiguousarray(queries, np.float32)
        if self.index is None or self.index.ntotal == 0:
            fill = -np.inf if self.metric == "IP" else np.inf
            return np.full((q.shape[0], k), fill, np.float32), np.full((q.shape[0], k), -1)
        self._apply_search_params()
        scores, ids = self.index.search(q, k)
        missing = ids < 0
        scores[missing] = -np.inf if self.metric == "IP" else np.inf
        return scores, ids.astype(np.int64)

    def save(self, path: str) -> None:
        if self.index is not None:
            tmp = path + ".tmp"
            self.faiss.write_index(self.index, tmp)
            os.replace(tmp, path)

    def load(self, path: str) -> None:
        self.index = self.faiss.read_index(path)

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)


def _make_backend(backend: str, dim: int, metric: str, method: str):
    if backend not in BACKENDS:
        raise GalleryError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "exact":
        return ExactBackend(dim, metric)
    if backend == "auto" and not faiss_available():
        warnings.warn(
            f"faiss is not installed, so the gallery uses the exact numpy backend (every method "
            f"searches exhaustively). For HNSW/IVF, {FAISS_HINT}.",
            stacklevel=3,
        )
        return ExactBackend(dim, metric)
    return FaissBackend(dim, metric, method)


# --------------------------------------------------------------------------------------------
# The index


@dataclasses.dataclass(frozen=True)
class Entry:
    """One gallery vector: its id, label, image path and the original list line."""

    id: int
    label: str
    path: str
    line: str


@dataclasses.dataclass(frozen=True)
class Hit:
    """One search result. `known` is False when the score fails the threshold."""

    rank: int
    id: int
    gallery_label: str
    path: str
    score: float
    known: bool

    @property
    def label(self) -> str:
        """The gallery label, or "unknown" when the hit fails the threshold."""
        return self.gallery_label if self.known else "unknown"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "label": self.label,
            "gallery_label": self.gallery_label,
            "score": self.score,
            "id": self.id,
            "path": self.path,
        }


@dataclasses.dataclass(frozen=True)
class QueryResult:
    """The top-k hits of one query; `prediction` is the top-1 label or "unknown"."""

    hits: list[Hit]

    @property
    def prediction(self) -> str:
        return self.hits[0].label if self.hits else "unknown"

    def to_dict(self) -> dict[str, Any]:
        return {"prediction": self.prediction, "hits": [h.to_dict() for h in self.hits]}


class GalleryIndex:
    """A searchable set of labelled gallery features with JSON metadata.

    Features should be L2-normalized (the CLI does this) so that IP scores are cosines.
    """

    def __init__(
        self,
        dim: int,
        metric: str = "IP",
        method: str = "HNSW32",
        backend: str = "auto",
        model_dir: str | None = None,
        delimiter: str = "\t",
        ef_search: int | None = None,
        nprobe: int | None = None,
    ):
        if metric not in METRICS:
            raise GalleryError(f"unknown metric {metric!r}; choose one of {METRICS}")
        if method not in METHODS:
            raise GalleryError(f"unknown index method {method!r}; choose one of {METHODS}")
        if dim <= 0:
            raise GalleryError(f"feature dimension must be positive, got {dim}")
        self.dim, self.metric, self.method = int(dim), metric, method
        self.model_dir, self.delimiter = model_dir, delimiter
        self.backend = _make_backend(backend, self.dim, metric, method)
        self.set_search_params(ef_search, nprobe)
        self.entries: list[Entry] = []
        self.features = np.zeros((0, self.dim), np.float32)

    # ---- bookkeeping
    def __len__(self) -> int:
        return len(self.entries)

    @property
    def ids(self) -> np.ndarray:
        return np.array([e.id for e in self.entries], np.int64)

    @property
    def config(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "metric": self.metric,
            "method": self.method,
            "model_dir": self.model_dir,
            "delimiter": self.delimiter,
            "ef_search": self.ef_search,
            "nprobe": self.nprobe,
        }

    def set_search_params(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """faiss search-time knobs: HNSW efSearch and IVF nprobe (None: faiss defaults 16 and 1,
        as PP-ShiTu uses them). Larger values trade speed for recall; the exact backend ignores
        them."""
        for name, val in (("ef_search", ef_search), ("nprobe", nprobe)):
            if val is not None and int(val) < 1:
                raise GalleryError(f"{name} must be a positive integer, got {val}")
        self.ef_search = None if ef_search is None else int(ef_search)
        self.nprobe = None if nprobe is None else int(nprobe)
        if isinstance(self.backend, FaissBackend):
            self.backend.ef_search, self.backend.nprobe = self.ef_search, self.nprobe

    def default_threshold(self) -> float:
        return DEFAULT_THRESHOLD[self.metric]

    # ---- changes
    def add(
        self,
        features: np.ndarray,
        labels: Sequence[str],
        paths: Sequence[str] | None = None,
        lines: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Add labelled features; ids continue from max(existing id) + 1. Returns the new ids."""
        feats = np.asarray(features, np.float32)
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise GalleryError(f"features must be [n, {self.dim}], got shape {feats.shape}")
        n = feats.shape[0]
        if len(labels) != n:
            raise GalleryError(f"{n} features but {len(labels)} labels")
        paths = list(paths) if paths is not None else [""] * n
        if lines is None:
            lines = [f"{p}{self.delimiter}{lab}" for p, lab in zip(paths, labels, strict=True)]
        if not np.all(np.isfinite(feats)):
            raise GalleryError("features contain NaN or Inf (a zero feature cannot be normalized)")
        start = int(self.ids.max()) + 1 if self.entries else 0
        new_ids = np.arange(start, start + n, dtype=np.int64)
        self.entries += [
            Entry(int(i), str(lab), str(p), str(li).strip())
            for i, lab, p, li in zip(new_ids, labels, paths, lines, strict=True)
        ]
        self.features = np.concatenate([self.features, feats], axis=0)
        self.backend.add(feats, new_ids, self.features, self.ids)
        return new_ids

    def remove(self, ids: Sequence[int]) -> int:
        """Remove vectors by id. Returns how many were removed."""
        drop = set(int(i) for i in ids)
        keep = np.array([e.id not in drop for e in self.entries], bool)
        removed = np.array([e.id for e in self.entries if e.id in drop], np.int64)
        if removed.size == 0:
            return 0
        self.entries = [e for e, k in zip(self.entries, keep, strict=True) if k]
        self.features = self.features[keep]
        self.backend.remove(removed, self.features, self.ids)
        return int(removed.size)

    def remove_lines(self, lines: Sequence[str]) -> tuple[int, list[str]]:
        """Remove every vector whose stored list line equals one of `lines` (stripped).

        Returns (number removed, lines that matched nothing)."""
        wanted = {li.strip() for li in lines if li.strip()}
        ids = [e.id for e in self.entries if e.line in wanted]
        found = {e.line for e in self.entries if e.line in wanted}
        return self.remove(ids), sorted(wanted - found)

    def has_line(self, line: str) -> bool:
        return any(e.line == line.strip() for e in self.entries)

    # ---- search
    def search(self, queries: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Raw search: (scores [q, k], ids [q, k]); id -1 where fewer than k vectors exist."""
        q = np.asarray(queries, np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise GalleryError(f"queries must be [q, {self.dim}], got shape {q.shape}")
        if k <= 0:
            raise GalleryError(f"k must be positive, got {k}")
        return self.backend.search(q, k)

    def passes(self, score: float, threshold: float) -> bool:
        """Whether a score is good enough: >= for IP similarity, <= for L2 distance."""
        return score >= threshold if self.metric == "IP" else score <= threshold

    def query(
        self, queries: np.ndarray, topk: int = 5, threshold: float | None = None
    ) -> list[QueryResult]:
        """Top-k labelled hits per query; hits failing the threshold are labelled "unknown"."""
        thr = self.default_threshold() if threshold is None else float(threshold)
        scores, ids = self.search(queries, topk)
        by_id = {e.id: e for e in self.entries}
        results = []
        for srow, irow in zip(scores, ids, strict=True):
            hits = []
            for rank, (s, i) in enumerate(zip(srow, irow, strict=True)):
                if i < 0:
                    continue
                e = by_id[int(i)]
                hits.append(
                    Hit(rank + 1, e.id, e.label, e.path, float(s), self.passes(float(s), thr))
                )
            results.append(QueryResult(hits))
        return results

    # ---- persistence
    def save(self, index_dir: str) -> None:
        """Write index.json, features.npy and (faiss) vector.index, each atomically."""
        os.makedirs(index_dir, exist_ok=True)
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "config": self.config,
            "backend": self.backend.name,
            "entries": [dataclasses.asdict(e) for e in self.entries],
        }
        with tempfile.NamedTemporaryFile("wb", dir=index_dir, suffix=".npy.tmp", delete=False) as f:
            np.save(f, self.features)
        os.replace(f.name, os.path.join(index_dir, FEATURES_FILE))
        self.backend.save(os.path.join(index_dir, FAISS_FILE))
        with tempfile.NamedTemporaryFile(
            "w", dir=index_dir, suffix=".json.tmp", delete=False, encoding="utf-8"
        ) as f:
            json.dump(meta, f, ensure_ascii=False, indent=1)
        os.replace(f.name, os.path.join(index_dir, INDEX_FILE))

    @classmethod
    def load(cls, index_dir: str, backend: str = "auto") -> GalleryIndex:
        """Read an index directory. The faiss index is rebuilt from features.npy if stale."""
        meta_path = os.path.join(index_dir, INDEX_FILE)
        if not os.path.isfile(meta_path):
            raise GalleryError(
                f"{meta_path} not found: {index_dir} is not a gallery index "
                "(create one with `python -m jaxrec.search build`)"
            )
        with open(meta_path, encoding="utf-8") as f:
            try:
                meta = json.load(f)
            except json.JSONDecodeError as err:
                raise GalleryError(f"{meta_path}: not valid JSON ({err})") from err
        if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
            raise GalleryError(
                f"{meta_path}: not a {FORMAT_NAME} v{FORMAT_VERSION} file "
                f"(format={meta.get('format')!r}, version={meta.get('version')!r})"
            )
        cfg = meta["config"]
        self = cls(
            cfg["dim"],
            cfg["metric"],
            cfg["method"],
            backend=backend,
            model_dir=cfg.get("model_dir"),
            delimiter=cfg.get("delimiter", "\t"),
            ef_search=cfg.get("ef_search"),
            nprobe=cfg.get("nprobe"),
        )
        self.entries = [Entry(**e) for e in meta["entries"]]
        feats = np.load(os.path.join(index_dir, FEATURES_FILE), allow_pickle=False)
        if feats.shape != (len(self.entries), self.dim):
            raise GalleryError(
                f"{index_dir}: {FEATURES_FILE} has shape {feats.shape} but index.json lists "
                f"{len(self.entries)} entries of dim {self.dim}; the index is corrupt, rebuild it"
            )
        self.features = feats.astype(np.float32, copy=False)
        faiss_path = os.path.join(index_dir, FAISS_FILE)
        if isinstance(self.backend, FaissBackend) and os.path.isfile(faiss_path):
            self.backend.load(faiss_path)
            if self.backend.ntotal != len(self.entries):
                warnings.warn(
                    f"{faiss_path} is stale; rebuilding it from {FEATURES_FILE}", stacklevel=2
                )
                self.backend.reset(self.features, self.ids)
        else:
            self.backend.reset(self.features, self.ids)
        return self


# --------------------------------------------------------------------------------------------
# List files and feature extraction


@dataclasses.dataclass(frozen=True)
class ListItem:
    """One line of a gallery list file: `path<delimiter>label[<delimiter>more...]`."""

    path: str  # resolved against the image root
    rel_path: str
    label: str
    line: str  # stripped original line
    lineno: int


def parse_delimiter(text: str) -> str:
    """Read a delimiter from the command line; accepts escapes such as '\\t'."""
    if text.lower() in ("tab", "\\t"):
        return "\t"
    if text.lower() == "space":
        return " "
    out = codecs.decode(text, "unicode_escape")
    if not out:
        raise GalleryError("the delimiter must not be empty")
    return out


def read_list(
    list_file: str, image_root: str | None = None, delimiter: str = "\t", check_exists: bool = True
) -> list[ListItem]:
    """Parse a PP-ShiTu gallery list file. Blank lines are skipped; paths are relative to
    `image_root` (default: the list file's directory)."""
    if not os.path.isfile(list_file):
        raise GalleryError(f"list file {list_file} not found")
    root = os.path.dirname(os.path.abspath(list_file)) if image_root is None else image_root
    items = []
    with open(list_file, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            fields = line.split(delimiter)
            if len(fields) < 2 or not fields[0] or not fields[1]:
                raise GalleryError(
                    f"{list_file}:{lineno}: expected 'path{delimiter!r}label', got {line!r}; "
                    "fix the line or pass the right --delimiter"
                )
            path = os.path.join(root, fields[0])
            if check_exists and not os.path.isfile(path):
                raise GalleryError(
                    f"{list_file}:{lineno}: image {path} not found (paths are relative to the "
                    f"image root {root}; set --image-root)"
                )
            items.append(ListItem(path, fields[0], fields[1], line, lineno))
    return items


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise x / ||x|| as the PP-ShiTu deploy code does (no epsilon)."""
    x = np.asarray(x, np.float32)
    norms = np.sqrt(np.sum(x * x, axis=1, keepdims=True))
    if np.any(norms == 0):
        raise GalleryError("a feature vector is all zeros and cannot be L2-normalized")
    return x / norms


def extract_normalized(
    model_dir: str, paths: Sequence[str], batch_size: int = 32, progress: bool = False
) -> np.ndarray:
    """L2-normalized features of image files, from a jaxrec model directory.

    Preprocessing is PP-ShiTu's gallery/query pipeline (`inference_general.yaml`): cv2-style
    decode, 224x224 INTER_LINEAR resize, scale 1/255, ImageNet mean/std."""
    from jaxrec import extract  # noqa: PLC0415  (jax is only needed when images are embedded)
    from jaxrec.models import load_model_dir  # noqa: PLC0415

    if not os.path.isdir(model_dir):
        raise GalleryError(f"model directory {model_dir} not found (see `python -m jaxrec.export`)")
    model, variables, _ = load_model_dir(model_dir)
    feats, _ = extract.extract_features(
        model, variables, list(paths), batch_size=batch_size, normalize=False, progress=progress
    )
    return l2_normalize(np.asarray(feats))


# --------------------------------------------------------------------------------------------
# CLI


def _cmd_build(args) -> int:
    index_json = os.path.join(args.index, INDEX_FILE)
    if os.path.exists(index_json) and not args.overwrite:
        raise GalleryError(
            f"{args.index} already holds an index; use `append`, or pass --overwrite to replace it"
        )
    delim = parse_delimiter(args.delimiter)
    items = read_list(args.images, args.image_root, delim)
    if not items:
        raise GalleryError(f"{args.images} lists no images")
    feats = extract_normalized(
        args.model, [it.path for it in items], args.batch_size, progress=True
    )
    index = GalleryIndex(
        feats.shape[1],
        args.metric,
        args.method,
        backend=args.backend,
        model_dir=os.path.abspath(args.model),
        delimiter=delim,
        ef_search=args.ef_search,
        nprobe=args.nprobe,
    )
    index.add(
        feats, [it.label for it in items], [it.rel_path for it in items], [it.line for it in items]
    )
    index.save(args.index)
    print(
        f"built {args.method}/{args.metric} index of {len(index)} images "
        f"({index.backend.name} backend) in {args.index}"
    )
    return 0


def _cmd_append(args) -> int:
    index = GalleryIndex.load(args.index, backend=args.backend)
    delim = index.delimiter if args.delimiter is None else parse_delimiter(args.delimiter)
    items = read_list(args.images, args.image_root, delim)
    new = [it for it in items if not index.has_line(it.line)]
    seen, unique = set(), []
    for it in new:
        if it.line not in seen:
            seen.add(it.line)
            unique.append(it)
    skipped = len(items) - len(unique)
    if unique:
        model_dir = args.model or index.model_dir
        if not model_dir:
            raise GalleryError(f"{args.index} records no model dir; pass --model")
        feats = extract_normalized(
            model_dir, [it.path for it in unique], args.batch_size, progress=True
        )
        index.add(
            feats,
            [it.label for it in unique],
            [it.rel_path for it in unique],
            [it.line for it in unique],
        )
        index.save(args.index)
    print(
        f"appended {len(unique)} images ({skipped} already present, skipped); "
        f"index now holds {len(index)}"
    )
    return 0


def _cmd_remove(args) -> int:
    index = GalleryIndex.load(args.index, backend=args.backend)
    delim = index.delimiter if args.delimiter is None else parse_delimiter(args.delimiter)
    items = read_list(args.images, args.image_root, delim, check_exists=False)
    removed, missing = index.remove_lines([it.line for it in items])
    index.save(args.index)
    for line in missing:
        print(f"warning: not in the index: {line!r}", file=sys.stderr)
    print(f"removed {removed} images; index now holds {len(index)}")
    return 0


def _cmd_query(args) -> int:
    index = GalleryIndex.load(args.index, backend=args.backend)
    model_dir = args.model or index.model_dir
    if not model_dir:
        raise GalleryError(f"{args.index} records no model dir; pass --model")
    for p in args.image:
        if not os.path.isfile(p):
            raise GalleryError(f"query image {p} not found")
    if args.ef_search is not None or args.nprobe is not None:
        index.set_search_params(
            args.ef_search if args.ef_search is not None else index.ef_search,
            args.nprobe if args.nprobe is not None else index.nprobe,
        )
    feats = extract_normalized(model_dir, args.image, args.batch_size)
    thr = index.default_threshold() if args.threshold is None else args.threshold
    results = index.query(feats, args.topk, thr)
    if args.json:
        out = [{"image": p, **r.to_dict()} for p, r in zip(args.image, results, strict=True)]
        print(json.dumps(out, ensure_ascii=False, indent=1))
        return 0
    kind = "similarity >=" if index.metric == "IP" else "distance <="
    for p, r in zip(args.image, results, strict=True):
        print(f"{p}: {r.prediction}   (known if {kind} {thr:g})")
        for h in r.hits:
            print(f"  {h.rank:>2}  {h.label:<24} {h.score:9.4f}  [{h.gallery_label}] {h.path}")
    return 0


def _cmd_info(args) -> int:
    index = GalleryIndex.load(args.index, backend=args.backend)
    labels = {e.label for e in index.entries}
    print(
        json.dumps(
            {
                **index.config,
                "backend": index.backend.name,
                "size": len(index),
                "labels": len(labels),
            },
            indent=1,
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxrec.search",
        description="Build, update and query a gallery index of image features (PP-ShiTu "
        "style). List files hold one `path<TAB>label` line per gallery image.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  python -m jaxrec.search build  --model export_dir --images gallery/label.txt --index idx
  python -m jaxrec.search append --index idx --images new_items.txt
  python -m jaxrec.search remove --index idx --images discontinued.txt
  python -m jaxrec.search query  --index idx --image photo.jpg --topk 5 --threshold 0.5

Files in the index dir: index.json (config + id -> label/path/line, JSON), features.npy
(the normalized gallery features), vector.index (faiss only). Hits whose score fails the
threshold (IP: similarity < threshold; L2: squared distance > threshold) are labelled
"unknown"; PP-ShiTu instead keeps only the top-1 hit and drops it below score_thres.""",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, list_required: bool):
        sp.add_argument("--index", required=True, help="index directory")
        sp.add_argument(
            "--backend",
            default="auto",
            choices=BACKENDS,
            help="faiss, exact numpy search, or auto (faiss if installed)",
        )
        if list_required:
            sp.add_argument(
                "--images",
                required=True,
                help="list file: `path<delimiter>label[<delimiter>more]` per line",
            )
            sp.add_argument(
                "--image-root",
                default=None,
                help="directory the list paths are relative to "
                "(default: the list file's directory)",
            )
        sp.add_argument("--batch-size", type=int, default=32, help="extraction batch size")

    b = sub.add_parser("build", help="create a new index from a list file")
    common(b, True)
    b.add_argument("--model", required=True, help="model directory (from jaxrec.export)")
    b.add_argument("--method", default="HNSW32", choices=METHODS)
    b.add_argument(
        "--metric",
        default="IP",
        choices=METRICS,
        help="IP: cosine on normalized features; L2: squared distance",
    )
    b.add_argument("--delimiter", default="\t", help="list field delimiter (default: tab)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index")
    b.add_argument(
        "--ef-search",
        type=int,
        default=None,
        help="HNSW efSearch stored with the index (default: faiss's 16)",
    )
    b.add_argument(
        "--nprobe",
        type=int,
        default=None,
        help="IVF lists searched, stored with the index (default: faiss's 1)",
    )
    b.set_defaults(func=_cmd_build)

    a = sub.add_parser("append", help="add the list's images that are not yet in the index")
    common(a, True)
    a.add_argument("--model", default=None, help="model directory (default: the index's)")
    a.add_argument("--delimiter", default=None, help="default: the index's delimiter")
    a.set_defaults(func=_cmd_append)

    r = sub.add_parser("remove", help="remove the images whose list lines match")
    common(r, True)
    r.add_argument("--delimiter", default=None, help="default: the index's delimiter")
    r.set_defaults(func=_cmd_remove)

    q = sub.add_parser("query", help="search the index with query images")
    common(q, False)
    q.add_argument("--image", required=True, action="append", help="query image (repeatable)")
    q.add_argument("--model", default=None, help="model directory (default: the index's)")
    q.add_argument("--topk", type=int, default=5, help="hits per query (default 5)")
    q.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="IP: min similarity (default 0.5); L2: max squared distance (default 1.0)",
    )
    q.add_argument("--json", action="store_true", help="print JSON")
    q.add_argument("--ef-search", type=int, default=None, help="override HNSW efSearch")
    q.add_argument("--nprobe", type=int, default=None, help="override IVF nprobe")
    q.set_defaults(func=_cmd_query)

    i = sub.add_parser("info", help="print the index config and size")
    common(i, False)
    i.set_defaults(func=_cmd_info)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GalleryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
