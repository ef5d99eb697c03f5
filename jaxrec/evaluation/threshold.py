"""Open-set threshold calibration: when is a top-1 answer "known product X", when "unknown"?

PP-ShiTu accepts the top-1 gallery hit when its score passes one fixed `score_thres` (0.5 in its
inference config). That number does not transfer between models: on a trained demo model every
top-5 cosine is above 0.98, wrong matches included. Here the threshold is chosen from data.

Input: one top-1 hit per labelled query (its score and whether its gallery label equals the
query's label) and whether the query's class is in the gallery at all ("known"; the others are
the unknown queries the threshold should reject). For every candidate threshold t (each distinct
top-1 score, so tied scores are accepted or rejected together, plus "accept nothing"):

- accepted: queries whose top-1 score passes t; correct: accepted with the right label;
- precision = correct / accepted (undefined, NaN, when nothing is accepted);
- recall = correct / known queries (NaN without known queries);
- unknown rejection = rejected unknown queries / unknown queries (NaN without unknown ones:
  the rejection side was not measured).

`choose` picks the threshold for a target precision (the highest recall that meets it; with
`--confidence 0.9`, the CLI default, its one-sided 90% Wilson lower bound must meet it, since
the point estimate on a few dozen accepted queries is optimistic) or the best F1. Scores are
"higher is better" here; `to_confidence`/`from_confidence` convert an L2 index's squared
distances (lower is better), so that one code path serves both metrics.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jaxrec.errors import GalleryError


def to_confidence(metric: str, scores: np.ndarray) -> np.ndarray:
    """Scores as "higher is better": IP similarities as they are, L2 distances negated."""
    s = np.asarray(scores, np.float64)
    return s if metric == "IP" else -s


def from_confidence(metric: str, confidence: float) -> float:
    """The index threshold (in the metric's own units) for a confidence threshold."""
    return float(confidence) if metric == "IP" else float(-confidence)


@dataclasses.dataclass(frozen=True)
class Curves:
    """Open-set figures at every candidate threshold, thresholds in decreasing order.

    Index i accepts the queries whose confidence is >= thresholds[i]; the last entry
    (threshold +inf) accepts nothing.
    """

    thresholds: np.ndarray  # float64 [T], decreasing; the last is +inf
    accepted: np.ndarray  # int [T]
    correct: np.ndarray  # int [T]: accepted with the right label
    wrong_known: np.ndarray  # int [T]: accepted, query class in the gallery, wrong label
    accepted_unknown: np.ndarray  # int [T]: accepted although the query class is not in it
    n_known: int
    n_unknown: int

    @property
    def precision(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.accepted > 0, self.correct / np.maximum(self.accepted, 1), np.nan)

    @property
    def recall(self) -> np.ndarray:
        if self.n_known == 0:
            return np.full(self.thresholds.shape, np.nan)
        return self.correct / self.n_known

    @property
    def unknown_rejection(self) -> np.ndarray:
        if self.n_unknown == 0:
            return np.full(self.thresholds.shape, np.nan)
        return 1.0 - self.accepted_unknown / self.n_unknown

    @property
    def f1(self) -> np.ndarray:
        p, r = np.nan_to_num(self.precision), np.nan_to_num(self.recall)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0.0)


def compute_curves(confidence: np.ndarray, correct: np.ndarray, known: np.ndarray) -> Curves:
    """Curves over all thresholds from per-query top-1 confidence, correctness and known-ness.

    `correct` must be False for unknown queries (their class has no gallery image). Thresholds
    are the distinct confidences, decreasing, then +inf (accept nothing) last."""
    conf = np.asarray(confidence, np.float64).reshape(-1)
    corr = np.asarray(correct, bool).reshape(-1)
    kn = np.asarray(known, bool).reshape(-1)
    if not (conf.shape == corr.shape == kn.shape):
        raise ValueError(f"shapes differ: {conf.shape}, {corr.shape}, {kn.shape}")
    if not np.all(np.isfinite(conf)):
        raise GalleryError("a query's top-1 score is NaN or infinite")
    if np.any(corr & ~kn):
        raise ValueError("a query whose class is not in the gallery cannot be correct")
    order = np.argsort(-conf, kind="stable")
    c = conf[order]
    # the last position of each run of equal confidences: everything up to it is accepted
    ends = np.flatnonzero(np.append(c[1:] != c[:-1], True)) if c.size else np.zeros(0, int)

    def cum(mask: np.ndarray) -> np.ndarray:
        return np.append(np.cumsum(mask[order].astype(np.int64))[ends], 0)

    return Curves(
        thresholds=np.append(c[ends], np.inf),
        accepted=cum(np.ones_like(corr)),
        correct=cum(corr),
        wrong_known=cum(kn & ~corr),
        accepted_unknown=cum(~kn),
        n_known=int(kn.sum()),
        n_unknown=int((~kn).sum()),
    )


@dataclasses.dataclass(frozen=True)
class Choice:
    """The chosen operating point: `threshold` (confidence units) and its figures."""

    rule: str  # "precision>=0.95" or "best-f1"
    threshold: float
    index: int  # position in Curves
    precision: float
    recall: float
    unknown_rejection: float
    f1: float
    accepted: int


def _nan_to_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def precision_lower_bound(correct: np.ndarray, accepted: np.ndarray, confidence: float):
    """One-sided Wilson lower bound of precision = correct / accepted at `confidence` (0: the
    point estimate). A threshold chosen on a few dozen accepted queries is optimistic (the
    choice picks the point where the sample happened to be good); the bound corrects for that,
    so that the target holds on new queries with about this confidence."""
    accepted = np.asarray(accepted, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(accepted > 0, correct / np.maximum(accepted, 1), np.nan)
        if confidence <= 0:
            return p
        z = statistics.NormalDist().inv_cdf(confidence)
        n = np.maximum(accepted, 1)
        centre = p + z * z / (2 * n)
        spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return np.where(accepted > 0, (centre - spread) / (1 + z * z / n), np.nan)


def choose(curves: Curves, precision: float | None = None, confidence: float = 0.0) -> Choice:
    """The threshold meeting `precision` with the highest recall (ties: the higher threshold),
    or, with `precision=None`, the one with the best F1 (ties: the higher threshold). With
    `confidence` > 0 the precision that must meet the target is its Wilson lower bound
    (`precision_lower_bound`).

    The returned threshold lies halfway between the chosen confidence and the next lower one, so
    that it sorts the calibration queries exactly as the curve point does while leaving a margin
    on both sides for new queries."""
    if curves.n_known == 0:
        raise GalleryError(
            "no query's class is in the gallery, so no answer can be correct and precision and "
            "recall are undefined; calibrate with queries of gallery classes"
        )
    if curves.correct[-2 if len(curves.correct) > 1 else 0] == 0:
        raise GalleryError(
            "no query's top-1 gallery hit has the query's label, so no threshold gives a correct "
            "answer; check that the query list's labels are spelled as the gallery's"
        )
    prec = curves.precision
    if precision is not None:
        if not 0.0 < precision <= 1.0:
            raise GalleryError(f"--precision {precision}: must lie in (0, 1]")
        if not 0.0 <= confidence < 1.0:
            raise GalleryError(f"--confidence {confidence}: must lie in [0, 1)")
        bound = precision_lower_bound(curves.correct, curves.accepted, confidence)
        ok = np.flatnonzero(np.nan_to_num(bound, nan=-1.0) >= precision - 1e-12)
        if ok.size == 0:
            j = int(np.nanargmax(bound))
            what = "precision" if confidence <= 0 else f"{confidence:g}-confidence bound"
            raise GalleryError(
                f"no threshold reaches precision {precision:g} on these queries (the best "
                f"{what} is {bound[j]:.4f}, precision {prec[j]:.4f} accepting "
                f"{int(curves.accepted[j])} queries); lower --precision or --confidence, use "
                "--f1, or calibrate on more queries"
            )
        # highest recall = most correct answers; among equals, the first (highest) threshold
        i = int(ok[np.argmax(curves.correct[ok])])
        rule = f"precision>={precision:g}"
        if confidence:
            rule += f" at {confidence:g} confidence"
    else:
        i = int(np.argmax(curves.f1))
        rule = "best-f1"
    t = curves.thresholds
    # i is never the last entry (+inf): it accepts nothing, so its precision is NaN and its F1 0
    thr = 0.5 * (t[i] + t[i + 1]) if i + 2 < len(t) else float(t[i])
    return Choice(
        rule=rule,
        threshold=float(thr),
        index=i,
        precision=float(prec[i]),
        recall=float(curves.recall[i]),
        unknown_rejection=float(curves.unknown_rejection[i]),
        f1=float(curves.f1[i]),
        accepted=int(curves.accepted[i]),
    )


def apply_threshold(
    confidence: np.ndarray, correct: np.ndarray, known: np.ndarray, threshold: float
) -> dict[str, float | int | None]:
    """Precision, recall and unknown rejection of a fixed confidence threshold (e.g. the
    calibrated one on held-out queries)."""
    conf = np.asarray(confidence, np.float64)
    acc = conf >= threshold
    corr, kn = np.asarray(correct, bool), np.asarray(known, bool)
    n_acc, n_corr = int(acc.sum()), int((acc & corr).sum())
    n_known, n_unknown = int(kn.sum()), int((~kn).sum())
    return {
        "queries": int(conf.size),
        "accepted": n_acc,
        "correct": n_corr,
        "precision": n_corr / n_acc if n_acc else None,
        "recall": n_corr / n_known if n_known else None,
        "unknown_rejection": 1 - int((acc & ~kn).sum()) / n_unknown if n_unknown else None,
    }


def bucket_counts(
    confidence: np.ndarray,
    correct: np.ndarray,
    known: np.ndarray,
    threshold: float,
    n_buckets: int = 10,
) -> list[dict[str, Any]]:
    """Error counts per top-1 score bucket (quantile edges, so every bucket holds queries even
    when all scores crowd near 1): right label, wrong label (class in the gallery), unknown
    class; and how many of the bucket the threshold accepts."""
    conf = np.asarray(confidence, np.float64)
    corr, kn = np.asarray(correct, bool), np.asarray(known, bool)
    if conf.size == 0:
        return []
    edges = np.unique(np.quantile(conf, np.linspace(0, 1, n_buckets + 1)))
    if edges.size == 1:
        edges = np.array([edges[0], edges[0]])
    # bucket b holds edges[b] <= conf < edges[b+1]; the top bucket includes its upper edge
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, edges.size - 2)
    out = []
    for b in range(edges.size - 1):
        m = which == b
        if not m.any():
            continue
        out.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "queries": int(m.sum()),
                "correct": int((m & corr).sum()),
                "wrong_label": int((m & kn & ~corr).sum()),
                "unknown_class": int((m & ~kn).sum()),
                "accepted": int((m & (conf >= threshold)).sum()),
            }
        )
    return out


def class_counts(
    query_labels: Sequence[str],
    top1_labels: Sequence[str],
    confidence: np.ndarray,
    known: np.ndarray,
    threshold: float,
    top_confusions: int = 3,
) -> list[dict[str, Any]]:
    """Per query class: accepted right, accepted wrong (with the gallery labels it was taken
    for, most frequent first), rejected; sorted by accepted errors, worst first."""
    conf = np.asarray(confidence, np.float64)
    rows: dict[str, dict[str, Any]] = {}
    confused: dict[str, Counter] = {}
    for q, t, c, k in zip(query_labels, top1_labels, conf, known, strict=True):
        r = rows.setdefault(
            q,
            {"label": q, "in_gallery": bool(k), "queries": 0, "accepted_correct": 0,
             "accepted_wrong": 0, "rejected": 0},
        )  # fmt: skip
        r["queries"] += 1
        if c < threshold:
            r["rejected"] += 1
        elif t == q:
            r["accepted_correct"] += 1
        else:
            r["accepted_wrong"] += 1
            confused.setdefault(q, Counter())[t] += 1
    for q, r in rows.items():
        r["taken_for"] = dict(confused.get(q, Counter()).most_common(top_confusions))
    return sorted(rows.values(), key=lambda r: (-r["accepted_wrong"], r["label"]))


def curve_table(curves: Curves, metric: str) -> list[dict[str, Any]]:
    """The curves as JSON rows (threshold in the index's metric units; None where undefined)."""
    rows = []
    p, r, u, f = curves.precision, curves.recall, curves.unknown_rejection, curves.f1
    for i, t in enumerate(curves.thresholds):
        rows.append(
            {
                "threshold": None if math.isinf(t) else from_confidence(metric, t),
                "accepted": int(curves.accepted[i]),
                "correct": int(curves.correct[i]),
                "wrong_label": int(curves.wrong_known[i]),
                "accepted_unknown": int(curves.accepted_unknown[i]),
                "precision": _nan_to_none(p[i]),
                "recall": _nan_to_none(r[i]),
                "unknown_rejection": _nan_to_none(u[i]),
                "f1": float(f[i]),
            }
        )
    return rows


def plot_curves(curves: Curves, choice: Choice, metric: str, path: str, title: str = "") -> None:
    """Draw the curves to a PNG: precision, recall and unknown rejection against the fraction of
    queries accepted, labelled with the thresholds (left), precision against recall (right); the
    chosen threshold is marked on both."""
    font = ImageFont.load_default()
    w, h, pad = 460, 340, 48
    img = Image.new("RGB", (2 * w, h + 30), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((10, 6), title or f"open-set calibration ({choice.rule})", fill=(0, 0, 0), font=font)
    finite = np.isfinite(curves.thresholds)
    t = np.array([from_confidence(metric, x) for x in curves.thresholds[finite]])
    # x = the fraction of queries accepted: monotone in the threshold, and it spreads out scores
    # that crowd near 1 (a trained model's top-1 cosines often differ in the 5th decimal)
    total = max(int(curves.accepted[finite][-1]) if finite.any() else 1, 1)
    frac = curves.accepted[finite] / total
    colors = {"precision": (0, 90, 220), "recall": (0, 160, 0), "unknown rejection": (220, 0, 0)}

    def threshold_at(v: float) -> str:
        if not t.size:
            return ""
        return f"{t[min(int(np.searchsorted(frac, v)), t.size - 1)]:.6g}"

    def frame(x0: int, xlabel: str, tick: Callable[[float], str]):
        box = (x0 + pad, 30 + 10, x0 + w - 15, 30 + h - pad)
        d.rectangle(box, outline=(0, 0, 0))
        for k in range(5):
            v = k / 4
            y = box[3] - v * (box[3] - box[1])
            d.line((box[0] - 4, y, box[0], y), fill=(0, 0, 0))
            d.text((box[0] - 30, y - 6), f"{v:.2f}", fill=(0, 0, 0), font=font)
            x = box[0] + v * (box[2] - box[0])
            d.text((x - 18, box[3] + 6), tick(v), fill=(0, 0, 0), font=font)
        d.text((box[0] + 10, box[3] + 24), xlabel, fill=(0, 0, 0), font=font)

        def xy(xv: float, yv: float) -> tuple[float, float]:
            return box[0] + xv * (box[2] - box[0]), box[3] - yv * (box[3] - box[1])

        return xy

    score = "similarity" if metric == "IP" else "squared L2"
    xy = frame(0, f"fraction of queries accepted; ticks: the threshold ({score})", threshold_at)
    series = {
        "precision": curves.precision[finite],
        "recall": curves.recall[finite],
        "unknown rejection": curves.unknown_rejection[finite],
    }
    for n, (name, ys) in enumerate(series.items()):
        pts = [xy(x, y) for x, y in zip(frac, ys, strict=True) if not math.isnan(y)]
        if len(pts) > 1:
            d.line(pts, fill=colors[name], width=2)
        note = "" if pts else " (not measured)"
        d.text((pad + 10, 48 + 14 * n), name + note, fill=colors[name], font=font)
    x, _ = xy(choice.accepted / total, 0)
    d.line((x, 40, x, 30 + h - pad), fill=(120, 120, 120), width=1)
    chosen = from_confidence(metric, choice.threshold)
    d.text((x + 3, 30 + h - pad - 16), f"{chosen:.6g}", fill=(80, 80, 80), font=font)

    xy2 = frame(w, "recall", lambda v: f"{v:.2f}")
    ok = ~np.isnan(curves.precision)
    pts = [xy2(r, p) for r, p in zip(curves.recall[ok], curves.precision[ok], strict=True)]
    if len(pts) > 1:
        d.line(pts, fill=colors["precision"], width=2)
    cx, cy = xy2(choice.recall, choice.precision)
    d.ellipse((cx - 4, cy - 4, cx + 4, cy + 4), outline=(0, 0, 0), width=2)
    d.text((w + pad + 10, 48), "precision vs recall", fill=colors["precision"], font=font)
    img.save(path)
