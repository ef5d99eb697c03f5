"""Open-set figures for `evaluate.py` when the query list holds classes absent from the gallery.

The same computation as `python -m jaxrec.search calibrate` (`jaxrec.evaluation.threshold`): each
query's top-1 gallery item (PaddleClas's self-match exclusion by unique id applies), the
precision/recall of accepted answers and the rejection rate of unknown queries over all
thresholds; reported at the best-F1 threshold and at the thresholds for precision 0.9 / 0.95
(point estimates on the eval queries) when they are reachable.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxrec.errors import GalleryError
from jaxrec.evaluation import threshold as C
from jaxrec.evaluation.retrieval import topk_neighbors

TARGETS = (0.9, 0.95)


def open_set_report(
    query_features: np.ndarray,
    query_labels: np.ndarray,
    gallery_features: np.ndarray,
    gallery_labels: np.ndarray,
    query_ids: np.ndarray | None = None,
    gallery_ids: np.ndarray | None = None,
    mesh: Any = None,
) -> dict[str, Any] | None:
    """None when every query class is in the gallery (closed set); else the open-set figures.
    Features are unit vectors (cosine similarity)."""
    ql, gl = np.asarray(query_labels).reshape(-1), np.asarray(gallery_labels).reshape(-1)
    known = np.isin(ql, gl)
    if known.all():
        return None
    scores, idx = topk_neighbors(
        query_features,
        gallery_features,
        1,
        query_labels=ql,
        gallery_labels=gl,
        query_ids=query_ids,
        gallery_ids=gallery_ids,
        mesh=mesh,
    )
    conf = np.asarray(scores, np.float64)[:, 0]
    correct = gl[np.asarray(idx)[:, 0]] == ql
    curves = C.compute_curves(conf, correct & known, known)
    out: dict[str, Any] = {
        "queries": int(ql.size),
        "known_queries": curves.n_known,
        "unknown_queries": curves.n_unknown,
        "unknown_classes": sorted({str(x) for x in ql[~known]}),
    }
    rules: list[tuple[str, float | None]] = [("best_f1", None)]
    rules += [(f"precision_{t:g}", t) for t in TARGETS]
    for name, target in rules:
        try:
            ch = C.choose(curves, target)
        except GalleryError as err:
            out[name] = {"reachable": False, "why": str(err).split(";")[0]}
            continue
        out[name] = {
            "threshold": ch.threshold,
            "precision": ch.precision,
            "recall": ch.recall,
            "unknown_rejection": ch.unknown_rejection,
            "f1": ch.f1,
        }
    return out


def open_set_lines(rep: dict[str, Any]) -> list[str]:
    """The report as terminal lines."""
    lines = [
        f"open set: {rep['unknown_queries']} of {rep['queries']} queries are of classes absent "
        f"from the gallery ({', '.join(rep['unknown_classes'][:8])}"
        f"{', ...' if len(rep['unknown_classes']) > 8 else ''})"
    ]
    for name in ("best_f1", *(f"precision_{t:g}" for t in TARGETS)):
        r = rep[name]
        if "threshold" not in r:
            lines.append(f"  {name:<15} not reachable on these queries")
            continue
        lines.append(
            f"  {name:<15} threshold {r['threshold']:.5f}: precision {r['precision']:.4f}, "
            f"recall {r['recall']:.4f}, unknown rejection {r['unknown_rejection']:.4f}"
        )
    return lines
