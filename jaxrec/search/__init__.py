"""Gallery index for recognition: build, append, remove and query (PP-ShiTu `IndexProcess`).

Modules: `index` (GalleryIndex in memory: entries, features, thresholds), `backends` (faiss or
exact numpy search), `store` (the directory on disk: lock, atomic generations, checked loading),
`schema` (what index.json may hold), `cli` (`python -m jaxrec.search`).

A gallery index directory holds `index.json` (config, model fingerprint, one entry per vector:
id, label, path, the original list line; JSON, never pickle), `features-<gen>.npy` (the float32
[N, dim] unit features, row i = entry i: the source of truth, any backend is rebuilt from it),
`vector-<gen>.index` (faiss only, a cache of the features) and `index.lock`. Every write holds the
lock and commits by replacing index.json, so concurrent writers serialize and a crash mid-write
leaves the previous index loadable (see `store`). Loading checks index.json against `schema` and
the features against it, and rebuilds a missing, stale or damaged faiss file from the features.

The model: features are extracted with `jaxrec.extract.extract_features`, so with the model's
own preprocessing, and L2-normalized. `index.json` records the model's fingerprint
(`ModelDir.fingerprint()`: variables, Arch, preprocessing, feature spec). `append` with another
model (another directory, or the same directory holding a different model now) is refused: an
index never mixes features of two models; rebuild it with `build --overwrite`. `query` with
another model is refused unless `--allow-model-change`, which queries with a warning. Indexes
written before fingerprints were recorded load with a warning and get one at the next `append`.

Backends: faiss (`HNSW32`, `IVF`, `Flat`, wrapped in `IndexIDMap2` as in PP-ShiTu) or an exact
numpy backend used when faiss is not installed (`pip install jaxrec[faiss]`). With the exact
backend every method searches exhaustively, so its answers equal faiss `Flat`.

Metrics: `IP` (inner product; on L2-normalized features this is the cosine, higher is better) and
`L2` (squared Euclidean distance as faiss reports it, lower is better). Thresholds follow the
metric: a hit is known when `score >= threshold` for IP and when `distance <= threshold` for L2,
and must lie in the range the metric can take between unit vectors ([-1, 1] and [0, 4]).
PP-ShiTu applies `>=` to both, which inverts the meaning for L2; we do not copy that.

Differences from PP-ShiTu, on purpose:

- `query` returns the top-k hits and marks those past the threshold as "unknown"; PP-ShiTu keeps
  only the top-1 hit and drops it when it fails `score_thres`.
- Labels are the second field of the list line split on the delimiter; PP-ShiTu re-splits the
  stored line on whitespace, which truncates label names containing spaces.
- IVF uses nlist = max(1, min(N // 8, 65536)) (PP-ShiTu's formula; its code path has a NameError).
- `remove` works for HNSW too, by rebuilding the graph from the stored features.
- `append` skips list lines that are already in the index instead of adding duplicates.

Command line (`python -m jaxrec.search --help`):
    python -m jaxrec.search build  --model MODEL_DIR --images LIST --index DIR [--method HNSW32]
    python -m jaxrec.search append --index DIR --images LIST
    python -m jaxrec.search remove --index DIR --images LIST
    python -m jaxrec.search query  --index DIR --image X.jpg [--topk 5] [--threshold 0.5]
    python -m jaxrec.search info   --index DIR
    python -m jaxrec.search repair --index DIR
"""

from jaxrec.data.lists import GalleryItem, read_gallery_list
from jaxrec.errors import GalleryError
from jaxrec.search.backends import (
    BACKENDS,
    METHODS,
    METRICS,
    ExactBackend,
    FaissBackend,
    faiss_available,
    ivf_nlist,
)
from jaxrec.search.index import (
    DEFAULT_THRESHOLD,
    Entry,
    GalleryIndex,
    Hit,
    QueryResult,
    check_threshold,
)
from jaxrec.search.store import INDEX_FILE, LOCK_FILE

__all__ = [
    "BACKENDS",
    "DEFAULT_THRESHOLD",
    "INDEX_FILE",
    "LOCK_FILE",
    "METHODS",
    "METRICS",
    "Entry",
    "ExactBackend",
    "FaissBackend",
    "GalleryError",
    "GalleryIndex",
    "GalleryItem",
    "Hit",
    "QueryResult",
    "check_threshold",
    "faiss_available",
    "ivf_nlist",
    "read_gallery_list",
]
