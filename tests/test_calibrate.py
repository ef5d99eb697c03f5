"""Open-set threshold calibration: curves against a brute-force reference (ties included), the
choice rules, degenerate inputs, storage in the index and the calibrate -> query CLI flow."""

import json
import math

import numpy as np
import pytest

from jaxrec.errors import GalleryError
from jaxrec.evaluation import threshold as C
from jaxrec.search import GalleryIndex, calibrate_cmd, store


def brute_force(conf, correct, known, t):
    """Figures of one threshold by direct counting."""
    acc = [c >= t for c in conf]
    n_acc = sum(acc)
    tp = sum(a and k for a, k in zip(acc, correct, strict=True))
    n_known = sum(known)
    n_unknown = len(known) - n_known
    unk_acc = sum(a and not k for a, k in zip(acc, known, strict=True))
    return {
        "accepted": n_acc,
        "correct": tp,
        "precision": tp / n_acc if n_acc else math.nan,
        "recall": tp / n_known if n_known else math.nan,
        "rejection": 1 - unk_acc / n_unknown if n_unknown else math.nan,
    }


def random_case(seed, n=60, levels=None):
    rng = np.random.default_rng(seed)
    known = rng.random(n) < 0.6
    correct = known & (rng.random(n) < 0.7)
    conf = rng.random(n) + 0.3 * correct
    if levels:  # heavy ties: a few distinct scores only
        conf = np.round(conf * levels) / levels
    return conf, correct, known


@pytest.mark.parametrize("seed,levels", [(0, None), (1, 4), (2, 10), (3, 1)])
def test_curves_match_brute_force_with_ties(seed, levels):
    conf, correct, known = random_case(seed, levels=levels)
    cv = C.compute_curves(conf, correct, known)
    distinct = sorted(set(conf.tolist()), reverse=True)
    assert cv.thresholds[:-1].tolist() == distinct and cv.thresholds[-1] == np.inf
    for i, t in enumerate(cv.thresholds):
        ref = brute_force(conf.tolist(), correct.tolist(), known.tolist(), t)
        assert cv.accepted[i] == ref["accepted"] and cv.correct[i] == ref["correct"]
        for got, want in (
            (cv.precision[i], ref["precision"]),
            (cv.recall[i], ref["recall"]),
            (cv.unknown_rejection[i], ref["rejection"]),
        ):
            assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_choice_is_the_brute_force_optimum(seed):
    conf, correct, known = random_case(seed, levels=20)
    cv = C.compute_curves(conf, correct, known)
    target = 0.8
    ch = C.choose(cv, target)
    # brute force over every threshold: best recall with precision >= target, highest t on ties
    best = None
    for t in sorted(set(conf.tolist()), reverse=True):
        r = brute_force(conf.tolist(), correct.tolist(), known.tolist(), t)
        if r["precision"] >= target and (best is None or r["correct"] > best[1]["correct"]):
            best = (t, r)
    assert ch.precision >= target and ch.accepted == best[1]["accepted"]
    # the stored threshold (between two distinct scores) sorts the queries like the curve point
    held = C.apply_threshold(conf, correct, known, ch.threshold)
    assert held["accepted"] == best[1]["accepted"] and held["precision"] == pytest.approx(
        ch.precision
    )
    f1 = C.choose(cv, None)
    assert f1.f1 == pytest.approx(np.max(cv.f1)) and f1.rule == "best-f1"


def test_degenerate_inputs():
    empty = C.compute_curves(np.zeros(0), np.zeros(0, bool), np.zeros(0, bool))
    assert empty.thresholds.tolist() == [np.inf] and empty.accepted.tolist() == [0]
    with pytest.raises(GalleryError, match="no query's class is in the gallery"):
        C.choose(empty, 0.9)
    only_unknown = C.compute_curves([0.9, 0.8], [False, False], [False, False])
    with pytest.raises(GalleryError, match="no query's class is in the gallery"):
        C.choose(only_unknown, None)
    all_wrong = C.compute_curves([0.9, 0.8], [False, False], [True, True])
    with pytest.raises(GalleryError, match="no query's top-1"):
        C.choose(all_wrong, None)
    # no unknown queries: the rejection side is NaN (not measured), the choice still works
    no_unknown = C.compute_curves([0.9, 0.8, 0.7], [True, True, False], [True, True, True])
    assert np.all(np.isnan(no_unknown.unknown_rejection))
    ch = C.choose(no_unknown, 0.99)
    assert ch.accepted == 2 and 0.7 < ch.threshold < 0.8
    with pytest.raises(GalleryError, match="no threshold reaches precision 0.99"):
        C.choose(C.compute_curves([0.9, 0.8], [False, True], [True, True]), 0.99)
    with pytest.raises(GalleryError, match="must lie in"):
        C.choose(no_unknown, 1.5)
    with pytest.raises(GalleryError, match="NaN"):
        C.compute_curves([np.nan], [True], [True])
    # all queries tied: the only threshold accepts all of them
    tied = C.compute_curves([0.5] * 4, [True, True, False, False], [True] * 4)
    assert tied.thresholds.tolist() == [0.5, np.inf] and C.choose(tied, None).threshold == 0.5


def test_buckets_and_classes_count_every_query():
    conf, correct, known = random_case(5, n=80, levels=7)
    b = C.bucket_counts(conf, correct, known, threshold=0.6)
    assert sum(x["queries"] for x in b) == 80
    assert sum(x["correct"] + x["wrong_label"] + x["unknown_class"] for x in b) == 80
    assert sum(x["accepted"] for x in b) == int((conf >= 0.6).sum())
    q = ["a", "a", "b", "x"]
    t = ["a", "b", "b", "a"]
    rows = C.class_counts(q, t, np.array([0.9, 0.9, 0.4, 0.95]), np.array([1, 1, 1, 0], bool), 0.5)
    by = {r["label"]: r for r in rows}
    assert by["a"] == {
        "label": "a",
        "in_gallery": True,
        "queries": 2,
        "accepted_correct": 1,
        "accepted_wrong": 1,
        "rejected": 0,
        "taken_for": {"b": 1},
    }
    assert by["b"]["rejected"] == 1 and by["x"]["taken_for"] == {"a": 1}


def _clustered_index(tmp_path, metric):
    """A stored exact index of 3 gallery classes on tight 16-d clusters; returns it and
    query features of those classes plus 2 unknown ones."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(c, n, spread):
        x = centres[c] + spread * rng.normal(size=(n, 16)) / 4
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    idx = GalleryIndex(16, metric, "Flat", backend="exact")
    g = np.concatenate([draw(c, 10, 0.2) for c in range(3)])
    labels = [str(c) for c in range(3) for _ in range(10)]
    paths = [f"g{i}.png" for i in range(30)]
    idx.add(g, labels, paths, [f"{p}\t{lab}" for p, lab in zip(paths, labels, strict=True)])
    store.save(idx, str(tmp_path / "idx"))
    q = np.concatenate([draw(c, 20, 0.5) for c in range(5)])
    q_labels = [str(c) for c in range(5) for _ in range(20)]
    return store.load(str(tmp_path / "idx"), backend="exact"), q, q_labels


@pytest.mark.parametrize("metric", ["IP", "L2"])
def test_calibration_stored_and_used_by_query(tmp_path, metric):
    idx, q, q_labels = _clustered_index(tmp_path, metric)
    scores, top1, selfs = calibrate_cmd.top1(idx, q, [f"q{i}.png" for i in range(len(q))])
    assert selfs == 0
    report = calibrate_cmd.calibrate(idx, q_labels, scores, top1, precision=0.9)
    rec = report["calibration"]
    assert rec["precision"] >= 0.9 and rec["unknown_queries"] == 40
    # the threshold in index units applied by GalleryIndex.query gives the reported precision
    idx.calibration = rec
    store.save(idx, str(tmp_path / "idx"))
    back = store.load(str(tmp_path / "idx"), backend="exact")
    assert back.default_threshold() == rec["threshold"]
    preds = [r.prediction for r in back.query(q, topk=1)]
    known = [p != "unknown" for p in preds]
    right = sum(p == lab for p, lab in zip(preds, q_labels, strict=True))
    assert right / sum(known) == pytest.approx(rec["precision"])
    js, png = calibrate_cmd.write_report(report, metric, str(tmp_path / "rep"))
    data = json.loads(open(js).read())
    assert {"calibration", "curves", "buckets", "classes"} <= set(data)
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 400 and len(np.unique(np.asarray(im.convert("L")))) > 2


def test_self_matches_are_skipped(tmp_path):
    idx, _, _ = _clustered_index(tmp_path, "IP")
    paths = ["g0.png", "g1.png", "x", "g3.png", "g4.png"]
    scores, top1, selfs = calibrate_cmd.top1(idx, idx.features[:5], paths)
    assert selfs == 4 and top1 == ["0"] * 5 and scores[2] == pytest.approx(1.0, abs=1e-5)
    assert np.all(scores[[0, 1, 3, 4]] < 1 - 1e-4)


def test_holdout_split_is_disjoint_and_seeded():
    a, b = calibrate_cmd.split(10, 0.5, 3)
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(10)) and len(b) == 5
    assert np.array_equal(calibrate_cmd.split(10, 0.5, 3)[1], b)
    with pytest.raises(GalleryError, match="holdout"):
        calibrate_cmd.split(10, 1.0, 0)


def test_wilson_bound():
    acc = np.array([10, 10, 100, 0])
    cor = np.array([10, 9, 90, 0])
    point = C.precision_lower_bound(cor, acc, 0.0)
    assert np.allclose(point[:3], [1.0, 0.9, 0.9]) and np.isnan(point[3])
    lb = C.precision_lower_bound(cor, acc, 0.9)
    z2 = 1.2815515655446004**2
    assert lb[0] == pytest.approx(10 / (10 + z2))  # all correct: n / (n + z^2)
    assert lb[1] < 0.9 and lb[1] < lb[2] < 0.9  # more evidence, tighter bound
    cv = C.compute_curves([0.9] * 10 + [0.5] * 90, [True] * 10 + [True, False] * 45, [True] * 100)
    assert C.choose(cv, 0.8).accepted == 10  # the point estimate accepts only the top 10 ...
    with pytest.raises(GalleryError, match="0.9-confidence bound"):
        C.choose(cv, 0.9, confidence=0.9)  # ... and 10 of 10 is not enough evidence for 0.9


def test_open_set_report_matches_the_curves():
    from jaxrec.evaluation.open_set import open_set_lines, open_set_report

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 8))
    ql = np.repeat(np.arange(4), 10)
    qf = centres[ql] + 0.8 * rng.normal(size=(40, 8))
    gl = np.repeat(np.arange(2), 5)
    gf = centres[gl] + 0.3 * rng.normal(size=(10, 8))
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    qf, gf = unit(qf), unit(gf)
    assert open_set_report(qf[:20], ql[:20], gf, gl) is None  # closed set: nothing to report
    rep = open_set_report(qf, ql, gf, gl)
    s = qf @ gf.T
    top = s.argmax(1)
    known = ql < 2
    cv = C.compute_curves(s.max(1), (gl[top] == ql) & known, known)
    best = C.choose(cv, None)
    assert rep["unknown_queries"] == 20 and rep["unknown_classes"] == ["2", "3"]
    assert rep["best_f1"]["f1"] == pytest.approx(best.f1)
    assert rep["best_f1"]["threshold"] == pytest.approx(best.threshold, abs=1e-6)
    assert len(open_set_lines(rep)) == 4
