"""Search backends of a gallery index: faiss (PP-ShiTu's index types) or exact numpy search.

Both keep no state that cannot be rebuilt from the gallery features: `reset(feats, ids)` builds
the whole index, `add`/`remove` change it, `search(queries, k)` returns (scores, ids) with id -1
and score -inf (IP) / +inf (L2) where fewer than k vectors exist.
"""

from __future__ import annotations

import warnings

import numpy as np

from jaxrec.errors import GalleryError

METHODS = ("HNSW32", "IVF", "Flat")
METRICS = ("IP", "L2")
BACKENDS = ("auto", "faiss", "exact")
FAISS_HINT = "install faiss with `pip install jaxrec[faiss]` (or `pip install faiss-cpu`)"


def _import_faiss():
    try:
        import faiss  # noqa: PLC0415 - optional dependency (jaxrec[faiss])
    except ImportError:
        return None
    return faiss


def faiss_available() -> bool:
    """Whether faiss can be imported."""
    return _import_faiss() is not None


def ivf_nlist(n: int) -> int:
    """Number of IVF lists for a gallery of n vectors: min(n // 8, 65536), at least 1."""
    return max(1, min(n // 8, 65536))


def _empty_result(metric: str, q: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    fill = -np.inf if metric == "IP" else np.inf
    return np.full((q, k), fill, np.float32), np.full((q, k), -1, np.int64)


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
        scores, ids = _empty_result(self.metric, q.shape[0], k)
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

    def _faiss_metric(self) -> int:
        return self.faiss.METRIC_INNER_PRODUCT if self.metric == "IP" else self.faiss.METRIC_L2

    def _apply_search_params(self) -> None:
        if self.method == "HNSW32" and self.ef_search:
            self.faiss.downcast_index(self.index.index).hnsw.efSearch = int(self.ef_search)
        if self.method == "IVF" and self.nprobe:
            self.faiss.extract_index_ivf(self.index).nprobe = int(self.nprobe)

    def reset(self, feats: np.ndarray, ids: np.ndarray) -> None:
        feats = np.ascontiguousarray(feats, np.float32)
        n = feats.shape[0]
        factory = f"IVF{ivf_nlist(n)},Flat" if self.method == "IVF" else self.method
        self.index = self.faiss.IndexIDMap2(
            self.faiss.index_factory(self.dim, factory, self._faiss_metric())
        )
        if n:
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
            return _empty_result(self.metric, q.shape[0], k)
        self._apply_search_params()
        scores, ids = self.index.search(q, k)
        missing = ids < 0
        scores[missing] = -np.inf if self.metric == "IP" else np.inf
        return scores, ids.astype(np.int64)

    def write(self, path: str) -> None:
        """Serialize the faiss index to `path` (the caller makes the write atomic)."""
        self.faiss.write_index(self.index, path)

    def read(self, path: str, ids: np.ndarray) -> str | None:
        """Load `path` if it is a readable index of this dim/metric holding exactly `ids`.

        Returns None on success, else why it cannot be used (the index is then left unset)."""
        self.index = None
        try:
            index = self.faiss.read_index(path)
        except RuntimeError as e:  # faiss reports truncated or foreign files this way
            detail = str(e).rsplit("Error: ", 1)[-1].strip()[:160]
            return f"faiss cannot read it, truncated or not a faiss index: {detail}"
        if not isinstance(index, self.faiss.IndexIDMap2):
            return f"it holds a {type(index).__name__}, not an IndexIDMap2"
        if index.d != self.dim or index.metric_type != self._faiss_metric():
            return (
                f"it has dim {index.d} / metric {index.metric_type}, not {self.dim} / {self.metric}"
            )
        stored = self.faiss.vector_to_array(index.id_map)
        if index.ntotal != len(ids) or not np.array_equal(np.sort(stored), np.sort(ids)):
            return f"stale: it holds {index.ntotal} vectors, index.json lists {len(ids)}"
        self.index = index
        return None

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)


def make_backend(backend: str, dim: int, metric: str, method: str) -> ExactBackend | FaissBackend:
    """The backend named `backend`; "auto" is faiss when installed, else exact (with a warning)."""
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
