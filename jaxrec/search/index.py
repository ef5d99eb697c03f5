"""The in-memory gallery index: labelled unit feature vectors, a search backend and thresholds.

`GalleryIndex.save`/`load` go through `jaxrec.search.store` (locking, atomic writes, checks).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxrec.errors import GalleryError
from jaxrec.search.backends import METHODS, METRICS, FaissBackend, make_backend

# Default thresholds; for L2 on unit vectors d^2 = 2 - 2 cos, so 1.0 is the same cut as cos 0.5.
DEFAULT_THRESHOLD = {"IP": 0.5, "L2": 1.0}
# Every score two unit vectors can have: a cosine, or a squared distance 2 - 2 cos.
SCORE_RANGE = {"IP": (-1.0, 1.0), "L2": (0.0, 4.0)}
_SCORE_NAME = {"IP": "inner products (cosines)", "L2": "squared L2 distances"}
UNIT_NORM_TOL = 1e-3


def check_threshold(metric: str, threshold: float) -> float:
    """`threshold` as a float if a score of `metric` between unit vectors can take it."""
    lo, hi = SCORE_RANGE[metric]
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise GalleryError(f"threshold {threshold!r} is not a number") from None
    if not math.isfinite(t) or not lo <= t <= hi:
        raise GalleryError(
            f"threshold {threshold!r} is outside [{lo:g}, {hi:g}], the range of "
            f"{_SCORE_NAME[metric]} between unit vectors (this index uses metric {metric})"
        )
    return t


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
    """A searchable set of labelled, L2-normalized gallery features with JSON metadata.

    `model_fingerprint` identifies the model the features came from (`ModelDir.fingerprint()`);
    None for indexes written before it was recorded.
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
        model_fingerprint: str | None = None,
    ):
        if metric not in METRICS:
            raise GalleryError(f"unknown metric {metric!r}; choose one of {METRICS}")
        if method not in METHODS:
            raise GalleryError(f"unknown index method {method!r}; choose one of {METHODS}")
        if dim <= 0:
            raise GalleryError(f"feature dimension must be positive, got {dim}")
        self.dim, self.metric, self.method = int(dim), metric, method
        self.model_dir, self.delimiter = model_dir, delimiter
        self.model_fingerprint = model_fingerprint
        self.backend = make_backend(backend, self.dim, metric, method)
        self.set_search_params(ef_search, nprobe)
        self.entries: list[Entry] = []
        # the threshold `python -m jaxrec.search calibrate` chose, with how (None: not calibrated)
        self.calibration: dict[str, Any] | None = None
        self.runtime = "jax"  # what embedded the gallery: jax, onnx (float32) or int8 (ONNX)
        self.features = np.zeros((0, self.dim), np.float32)

    # ---- bookkeeping
    def __len__(self) -> int:
        return len(self.entries)

    @property
    def ids(self) -> np.ndarray:
        return np.array([e.id for e in self.entries], np.int64)

    @property
    def config(self) -> dict[str, Any]:
        runtime = {} if self.runtime == "jax" else {"runtime": self.runtime}  # jax: key absent
        return {
            "dim": self.dim,
            "metric": self.metric,
            "method": self.method,
            "model_dir": self.model_dir,
            "delimiter": self.delimiter,
            "ef_search": self.ef_search,
            "nprobe": self.nprobe,
            **runtime,
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
        """The calibrated threshold if `calibrate` stored one, else PP-ShiTu's fixed default."""
        if self.calibration is not None:
            return float(self.calibration["threshold"])
        return DEFAULT_THRESHOLD[self.metric]

    # ---- changes
    def add(
        self,
        features: np.ndarray,
        labels: Sequence[str],
        paths: Sequence[str] | None = None,
        lines: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Add labelled unit-norm features; ids continue from max(existing id) + 1. Returns the
        new ids."""
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
            raise GalleryError("features contain NaN or Inf")
        norms = np.linalg.norm(feats, axis=1)
        bad = np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOL)
        if bad.size:
            i = int(bad[0])
            raise GalleryError(
                f"gallery features must be L2-normalized; row {i} ({paths[i] or 'no path'}) has "
                f"norm {norms[i]:.4g}"
            )
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
        """Top-k labelled hits per query; hits failing the threshold are labelled "unknown".
        The threshold must lie in the metric's range (`check_threshold`)."""
        thr = self.default_threshold() if threshold is None else threshold
        thr = check_threshold(self.metric, thr)
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
