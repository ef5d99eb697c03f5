"""`python -m jaxrec.search calibrate`: choose an index's known/unknown threshold from queries.

Embeds a labelled query list with the index's model, takes each query's top-1 gallery hit (a
gallery image with the query's own path is its self-match and is skipped), computes the open-set
curves (`jaxrec.evaluation.threshold`), picks the threshold, stores it in index.json (so `query`
uses it by default and `info` shows it) and writes OUT/calibration.json (curves, per-class and
per-score-bucket error counts) and OUT/calibration.png.

`--holdout F` calibrates on a random (seeded) 1-F of the queries and reports the chosen threshold
on the other F, the honest estimate of how it does on new queries.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxrec.errors import GalleryError
from jaxrec.evaluation import threshold as C
from jaxrec.search.index import GalleryIndex, check_threshold


def top1(
    index: GalleryIndex, feats: np.ndarray, rel_paths: Sequence[str]
) -> tuple[np.ndarray, list[str], int]:
    """Top-1 score and gallery label per query, skipping a query's self-match (the gallery entry
    with the query's own list path). Returns (scores, labels, number of self-matches skipped)."""
    scores, ids = index.search(feats, min(2, len(index)))
    by_id = {e.id: e for e in index.entries}
    out_s, out_l, skipped = [], [], 0
    for srow, irow, path in zip(scores, ids, rel_paths, strict=True):
        hits = [(float(s), by_id[int(i)]) for s, i in zip(srow, irow, strict=True) if i >= 0]
        if hits and hits[0][1].path == path:
            hits, skipped = hits[1:], skipped + 1
        if not hits:
            raise GalleryError(
                f"query {path} has no gallery hit other than itself; the gallery is too small"
            )
        out_s.append(hits[0][0])
        out_l.append(hits[0][1].label)
    return np.array(out_s, np.float64), out_l, skipped


def split(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration indices, held-out indices): a seeded random `holdout` fraction held out."""
    if not 0.0 <= holdout < 1.0:
        raise GalleryError(f"--holdout {holdout}: must lie in [0, 1)")
    perm = np.random.default_rng(seed).permutation(n)
    n_out = int(round(n * holdout))
    return np.sort(perm[n_out:]), np.sort(perm[:n_out])


def calibrate(
    index: GalleryIndex,
    query_labels: Sequence[str],
    scores: np.ndarray,
    top1_labels: Sequence[str],
    precision: float | None,
    holdout: float = 0.0,
    seed: int = 0,
    confidence: float = 0.0,
) -> dict[str, Any]:
    """The calibration report (JSON-ready) for queries with known top-1 hits; its
    `calibration` entry is what index.json stores."""
    gallery_labels = {e.label for e in index.entries}
    known = np.array([q in gallery_labels for q in query_labels], bool)
    correct = np.array([q == t for q, t in zip(query_labels, top1_labels, strict=True)], bool)
    conf = C.to_confidence(index.metric, scores)
    cal, held = split(len(conf), holdout, seed)
    curves = C.compute_curves(conf[cal], correct[cal], known[cal])
    choice = C.choose(curves, precision, confidence)
    threshold = check_threshold(index.metric, C.from_confidence(index.metric, choice.threshold))
    record: dict[str, Any] = {
        "threshold": threshold,
        "rule": choice.rule,
        "precision": choice.precision,
        "recall": choice.recall,
        "unknown_rejection": None if curves.n_unknown == 0 else choice.unknown_rejection,
        "queries": int(cal.size),
        "known_queries": curves.n_known,
        "unknown_queries": curves.n_unknown,
        "gallery_size": len(index),
        "model_fingerprint": index.model_fingerprint,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if held.size:
        record["holdout"] = {
            "fraction": holdout,
            "seed": seed,
            **C.apply_threshold(conf[held], correct[held], known[held], choice.threshold),
        }
    labels = [query_labels[i] for i in cal]
    return {
        "calibration": record,
        "curves": C.curve_table(curves, index.metric),
        "buckets": [
            {
                **b,
                "low": C.from_confidence(index.metric, b["low"]),
                "high": C.from_confidence(index.metric, b["high"]),
            }
            for b in C.bucket_counts(conf[cal], correct[cal], known[cal], choice.threshold)
        ],
        "classes": C.class_counts(
            labels, [top1_labels[i] for i in cal], conf[cal], known[cal], choice.threshold
        ),
        "_curves": curves,
        "_choice": choice,
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def summary(report: dict[str, Any], metric: str) -> list[str]:
    """Human-readable lines for the terminal."""
    rec = report["calibration"]
    kind = "similarity >=" if metric == "IP" else "distance <="
    lines = [
        f"threshold {rec['threshold']:.6g} (known if {kind} it; rule {rec['rule']}) on "
        f"{rec['queries']} queries ({rec['known_queries']} of gallery classes, "
        f"{rec['unknown_queries']} of classes absent from the gallery)",
        f"  precision {_pct(rec['precision'])}, recall {_pct(rec['recall'])}, "
        + (
            f"unknown rejection {_pct(rec['unknown_rejection'])}"
            if rec["unknown_queries"]
            else "unknown rejection NOT MEASURED (no query class is absent from the gallery)"
        ),
    ]
    if "holdout" in rec:
        h = rec["holdout"]
        lines.append(
            f"  held-out {h['queries']} queries: precision {_pct(h['precision'])}, recall "
            f"{_pct(h['recall'])}, unknown rejection {_pct(h['unknown_rejection'])}"
        )
    worst = [c for c in report["classes"] if c["accepted_wrong"]][:5]
    for c in worst:
        taken = ", ".join(f"{k} x{v}" for k, v in c["taken_for"].items())
        where = "" if c["in_gallery"] else " (not in the gallery)"
        lines.append(
            f"  class {c['label']}{where}: {c['accepted_wrong']} of {c['queries']} accepted "
            f"wrongly, taken for {taken}"
        )
    return lines


def write_report(report: dict[str, Any], metric: str, out_dir: str) -> tuple[str, str]:
    """OUT/calibration.json and OUT/calibration.png."""
    os.makedirs(out_dir, exist_ok=True)
    js = os.path.join(out_dir, "calibration.json")
    png = os.path.join(out_dir, "calibration.png")
    with open(js, "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in report.items() if not k.startswith("_")}, f, indent=1)
    rec = report["calibration"]
    C.plot_curves(
        report["_curves"],
        report["_choice"],
        metric,
        png,
        title=f"{rec['rule']}: threshold {rec['threshold']:.5g}, precision "
        f"{_pct(rec['precision'])}, recall {_pct(rec['recall'])}, unknown rejection "
        f"{_pct(rec['unknown_rejection'])} ({rec['queries']} queries)",
    )
    return js, png
