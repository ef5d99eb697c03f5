"""Gallery index: build / append / remove / query on clustered features, faiss vs exact."""

import json
import os
import sys

import numpy as np
import pytest

from jaxrec import search
from jaxrec.errors import DatasetError
from jaxrec.search import GalleryError, GalleryIndex, store
from jaxrec.search import cli as search_cli

faiss = pytest.importorskip("faiss")

DIM = 32


def _meta(index_dir):
    return json.loads((index_dir / search.INDEX_FILE).read_text())


def clustered(n_classes=6, per_class=10, seed=0, spread=0.15):
    """Unit vectors in tight clusters around random class centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    feats, labels = [], []
    for c in range(n_classes):
        x = centres[c] + spread * rng.normal(size=(per_class, DIM)) / np.sqrt(DIM)
        feats.append(x)
        labels += [f"class {c}"] * per_class  # a label with a space survives (no re-split)
    feats = np.concatenate(feats).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return feats, labels, centres.astype(np.float32)


def make(method="Flat", metric="IP", backend="faiss", n_classes=6, per_class=10):
    feats, labels, centres = clustered(n_classes, per_class)
    idx = GalleryIndex(DIM, metric, method, backend=backend)
    paths = [f"img/{i}.jpg" for i in range(len(labels))]
    ids = idx.add(feats, labels, paths)
    return idx, feats, labels, centres, ids


@pytest.mark.parametrize("metric", ["IP", "L2"])
@pytest.mark.parametrize("method", ["Flat", "HNSW32", "IVF"])
def test_faiss_and_exact_agree(method, metric):
    fidx, feats, labels, centres, _ = make(method, metric, "faiss")
    eidx, *_ = make(method, metric, "exact")
    rng = np.random.default_rng(1)
    q = feats[rng.choice(len(feats), 12, replace=False)] + 0.01 * rng.normal(size=(12, DIM))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    fs, fi = fidx.search(q, 5)
    es, ei = eidx.search(q, 5)
    if method == "IVF":
        # nlist = 60 // 8 = 7 with nprobe 1 is approximate: compare only the top-1 cluster label.
        assert faiss.extract_index_ivf(fidx.backend.index).nlist == 7
        for a, b in zip(fi[:, 0], ei[:, 0], strict=True):
            assert labels[a] == labels[b]
    else:
        np.testing.assert_array_equal(fi, ei)
        np.testing.assert_allclose(fs, es, atol=1e-5)
    if metric == "IP":
        np.testing.assert_allclose(es[:, 0], np.sum(q * feats[ei[:, 0]], axis=1), atol=1e-5)
        assert np.all(np.diff(es, axis=1) <= 1e-7)  # similarity descending
    else:
        d2 = np.sum((q - feats[ei[:, 0]]) ** 2, axis=1)
        np.testing.assert_allclose(es[:, 0], d2, atol=1e-5)
        assert np.all(np.diff(es, axis=1) >= -1e-7)  # distance ascending


def test_exact_backend_matches_brute_force_ranking():
    idx, feats, *_ = make("Flat", "IP", "exact")
    rng = np.random.default_rng(3)
    q = rng.normal(size=(7, DIM)).astype(np.float32)
    scores, ids = idx.search(q, 9)
    sim = q @ feats.T
    want = np.argsort(-sim, axis=1, kind="stable")[:, :9]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(sim, want, 1), rtol=1e-6)


@pytest.mark.parametrize("backend", ["faiss", "exact"])
def test_query_labels_and_unknown_threshold(backend):
    idx, feats, labels, centres, _ = make("Flat", "IP", backend)
    res = idx.query(centres[[2, 4]], topk=5, threshold=0.5)
    assert [r.prediction for r in res] == ["class 2", "class 4"]
    assert all(h.gallery_label == "class 2" and h.known for h in res[0].hits)
    # A vector orthogonal-ish to everything is unknown at a high threshold, but keeps its hits.
    far = -centres[[2]]
    res = idx.query(far, topk=3, threshold=0.9)[0]
    assert res.prediction == "unknown"
    assert len(res.hits) == 3 and not any(h.known for h in res.hits)
    assert all(h.label == "unknown" and h.gallery_label.startswith("class") for h in res.hits)
    d = res.to_dict()
    assert d["prediction"] == "unknown" and d["hits"][0]["rank"] == 1


@pytest.mark.parametrize("backend", ["faiss", "exact"])
def test_l2_threshold_direction(backend):
    idx, feats, labels, centres, _ = make("Flat", "L2", backend)
    near = idx.query(feats[[0]], topk=2)[0]  # default L2 threshold 1.0 (= cosine 0.5)
    assert near.hits[0].score == pytest.approx(0.0, abs=1e-5)
    assert near.hits[0].known and near.prediction == "class 0"
    far = idx.query(-feats[[0]], topk=2)[0]  # squared distances near 4: must be unknown
    assert far.hits[0].score > 1.0 and far.prediction == "unknown"


@pytest.mark.parametrize("method", ["Flat", "HNSW32", "IVF"])
def test_append_remove_and_persist(tmp_path, method):
    feats, labels, centres = clustered(6, 10)
    idx = GalleryIndex(DIM, "IP", method, backend="faiss", model_dir="/some/model")
    ids = idx.add(feats[:40], labels[:40], [f"p{i}" for i in range(40)])
    np.testing.assert_array_equal(ids, np.arange(40))
    store.save(idx, str(tmp_path))
    idx = store.load(str(tmp_path))
    new = idx.add(feats[40:], labels[40:], [f"p{i}" for i in range(40, 60)])
    np.testing.assert_array_equal(new, np.arange(40, 60))  # ids continue from max + 1
    # classes 4 and 5 only exist in the appended part
    assert idx.query(centres[[5]], topk=1)[0].prediction == "class 5"
    removed, missing = idx.remove_lines([f"p{i}\tclass 5" for i in range(50, 60)] + ["nope\tx"])
    assert removed == 10 and missing == ["nope\tx"]
    assert len(idx) == 50 and idx.backend.ntotal == 50
    _, hit_ids = idx.search(centres[[5]], 50)
    assert not set(hit_ids[0].tolist()) & set(range(50, 60))
    assert idx.query(centres[[5]], topk=1, threshold=0.95)[0].prediction == "unknown"
    store.save(idx, str(tmp_path))
    # Reload with both backends: same state, same answers.
    a = store.load(str(tmp_path), backend="faiss")
    b = store.load(str(tmp_path), backend="exact")
    assert len(a) == len(b) == 50
    assert a.model_dir == "/some/model" and a.method == method
    q = centres[[0, 1, 3, 4]]
    if method != "IVF":
        np.testing.assert_array_equal(a.search(q, 5)[1], b.search(q, 5)[1])
    assert [r.prediction for r in a.query(q, 1)] == [r.prediction for r in b.query(q, 1)]
    # The metadata is plain JSON with the entries and config.
    meta = json.loads((tmp_path / search.INDEX_FILE).read_text())
    assert meta["config"] == {
        "dim": DIM,
        "metric": "IP",
        "method": method,
        "model_dir": "/some/model",
        "delimiter": "\t",
        "ef_search": None,
        "nprobe": None,
    }
    assert len(meta["entries"]) == 50
    assert meta["entries"][0] == {"id": 0, "label": "class 0", "path": "p0", "line": "p0\tclass 0"}
    assert not any(n.endswith(".pkl") for n in os.listdir(tmp_path))


def test_search_returns_minus_one_when_fewer_than_k():
    for backend in ("faiss", "exact"):
        idx, *_ = make("Flat", "IP", backend, n_classes=1, per_class=3)
        scores, ids = idx.search(np.ones((1, DIM), np.float32), 5)
        assert ids[0, 3:].tolist() == [-1, -1]
        assert len(idx.query(np.ones((1, DIM), np.float32), topk=5)[0].hits) == 3


def test_search_params_ivf_full_probe_is_exact_and_persist(tmp_path):
    feats, labels, centres = clustered(6, 10)
    ivf = GalleryIndex(DIM, "IP", "IVF", backend="faiss", nprobe=7)  # nlist 60 // 8 = 7
    ivf.add(feats, labels)
    flat = GalleryIndex(DIM, "IP", "Flat", backend="exact")
    flat.add(feats, labels)
    q = np.random.default_rng(2).normal(size=(9, DIM)).astype(np.float32)
    np.testing.assert_array_equal(ivf.search(q, 8)[1], flat.search(q, 8)[1])
    hnsw = GalleryIndex(DIM, "IP", "HNSW32", backend="faiss", ef_search=77)
    hnsw.add(feats, labels)
    hnsw.search(q, 3)
    assert faiss.downcast_index(hnsw.backend.index.index).hnsw.efSearch == 77
    store.save(hnsw, str(tmp_path))
    again = store.load(str(tmp_path))
    assert again.ef_search == 77 and again.config["ef_search"] == 77
    with pytest.raises(GalleryError, match="ef_search must be a positive"):
        again.set_search_params(ef_search=0)


def test_ivf_nlist_formula():
    assert search.ivf_nlist(3) == 1
    assert search.ivf_nlist(800) == 100
    assert search.ivf_nlist(10**7) == 65536


def test_stale_faiss_file_is_rebuilt(tmp_path):
    idx, *_ = make("Flat", "IP", "faiss")
    store.save(idx, str(tmp_path))
    small = GalleryIndex(DIM, "IP", "Flat", backend="faiss")
    small.add(np.eye(DIM, dtype=np.float32)[:2], ["a", "b"])
    small.backend.write(str(tmp_path / _meta(tmp_path)["files"]["faiss"]))
    with pytest.warns(UserWarning, match="stale"):
        again = store.load(str(tmp_path))
    assert again.backend.ntotal == len(again) == 60


def test_exact_fallback_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes the import fail
    with pytest.warns(UserWarning, match=r"pip install jaxrec\[faiss\]"):
        idx = GalleryIndex(DIM, backend="auto")
    assert idx.backend.name == "exact"
    with pytest.raises(GalleryError, match=r"jaxrec\[faiss\]"):
        GalleryIndex(DIM, backend="faiss")


def test_bad_inputs(tmp_path):
    with pytest.raises(GalleryError, match="metric"):
        GalleryIndex(DIM, metric="cos")
    with pytest.raises(GalleryError, match="method"):
        GalleryIndex(DIM, method="PQ16")
    idx = GalleryIndex(DIM, backend="exact")
    with pytest.raises(GalleryError, match="shape"):
        idx.add(np.zeros((2, DIM + 1), np.float32), ["a", "b"])
    lst = tmp_path / "list.txt"
    (tmp_path / "a.jpg").write_bytes(b"x")
    lst.write_text("a.jpg\tcat\n\nb.jpg cat\n")
    with pytest.raises(DatasetError, match=r"list.txt:3: expected"):
        search.read_gallery_list(str(lst))
    lst.write_text("a.jpg\tcat\nmissing.jpg\tdog\n")
    with pytest.raises(DatasetError, match=r"list.txt:2: image .*missing.jpg not found"):
        search.read_gallery_list(str(lst))
    items = search.read_gallery_list(str(lst), check_exists=False)
    assert [(i.rel_path, i.label, i.lineno) for i in items] == [
        ("a.jpg", "cat", 1),
        ("missing.jpg", "dog", 2),
    ]
    assert search_cli.parse_delimiter("\\t") == "\t" and search_cli.parse_delimiter("space") == " "
    with pytest.raises(GalleryError, match="not a gallery index"):
        store.load(str(tmp_path))
    assert search_cli.main(["info", "--index", str(tmp_path)]) == 2


# --------------------------------------------------------------------------------------------
# End to end through the CLI, on real image files and a (tiny, random) jaxrec model


ARCH = {
    "name": "RecModel",
    "Backbone": {
        "name": "PPLCNetV2_base_ShiTu",
        "class_expand": 32,
        "scale": 0.25,
        "depths": [1, 1, 2, 2],
    },
    "BackboneStopLayer": {"name": "flatten"},
    "Neck": {"name": "BNNeck", "num_features": 32},
}


def _tiny_model_dir(path, seed=0, overwrite=False):
    """A random tiny model fed at 48 px (its own preprocessing, not the old 224 default)."""
    import jax
    from model_testutil import build

    from jaxrec.data.preprocess import Preprocess
    from jaxrec.models import abstract_variables, save_model_dir

    rng = np.random.default_rng(seed)

    def f(kp, s):
        last = getattr(kp[-1], "key", "")
        if last == "kernel":
            return (rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))).astype("f")
        if last in ("scale", "var"):
            return rng.uniform(0.5, 1.5, s.shape).astype("f")
        return rng.normal(0, 0.1, s.shape).astype("f")

    model = build(ARCH, deploy=True)
    variables = jax.tree_util.tree_map_with_path(f, abstract_variables(model))
    pre = Preprocess(resize=(48, 48))
    save_model_dir(path, ARCH, model, variables, preprocess=pre, overwrite=overwrite)
    return str(path)


def _write_images(root, names_colors, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    lines = []
    for name, label, color in names_colors:
        yy, xx = np.mgrid[0:60, 0:80]
        img = np.zeros((60, 80, 3)) + color
        img[..., 0] += 60 * np.sin(xx / (4 + color[1] / 40))  # class-specific texture
        img += rng.normal(0, 6, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name, quality=95)
        lines.append(f"{name}\t{label}")
    return lines


COLORS = {"red can": (200, 30, 30), "green bottle": (30, 180, 40), "blue box": (20, 40, 210)}


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """Two tiny models (seeds 0 and 1), 9 gallery images in lists, 3 query images."""
    root = tmp_path_factory.mktemp("gallery")
    models = [_tiny_model_dir(root / "model", 0), _tiny_model_dir(root / "other_model", 1)]
    g = root / "gallery"
    g.mkdir()
    spec = [(f"{lab.split()[0]}_{i}.jpg", lab, c) for lab, c in COLORS.items() for i in range(3)]
    lines = _write_images(g, spec, seed=0)
    (g / "first.txt").write_text("\n".join(lines[:6]) + "\n")  # red and green only
    (g / "all.txt").write_text("\n".join(lines) + "\n")
    (g / "blue.txt").write_text("\n".join(lines[6:]) + "\n")
    q = root / "q"
    q.mkdir()
    _write_images(q, [(f"{lab.split()[0]}.jpg", lab, c) for lab, c in COLORS.items()], seed=5)
    return {"models": models, "g": g, "q": q, "lines": lines}


@pytest.fixture
def run(capsys):
    def run(*argv):
        store.forget_warnings()  # each CLI run is a fresh process in real use
        capsys.readouterr()
        rc = search_cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        assert "Traceback" not in out.err
        return rc, out

    return run


def _snapshot(d):
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}


def test_cli_build_append_remove_query_on_images(tmp_path, gallery, run):
    from jaxrec.config import resolve_arch
    from jaxrec.extract import extract_features
    from jaxrec.models import load_model_dir

    model, g, q, lines = gallery["models"][0], gallery["g"], gallery["q"], gallery["lines"]
    index = tmp_path / "index"
    rc, _ = run("build", "--model", model, "--images", g / "first.txt", "--index", index,
                "--method", "Flat")  # fmt: skip
    assert rc == 0
    # The gallery holds the model's own features: 48 px preprocessing, normalized.
    md = load_model_dir(model, resolve_arch)
    want, _ = extract_features(md, [str(g / n.split("\t")[0]) for n in lines[:6]])
    np.testing.assert_allclose(store.load(str(index)).features, want, atol=1e-6)
    assert _meta(index)["model_fingerprint"] == md.fingerprint()
    rc, out = run("build", "--model", model, "--images", g / "first.txt", "--index", index)
    assert rc == 2 and "already holds an index" in out.err  # refuses to clobber
    rc, out = run("append", "--index", index, "--images", g / "all.txt")
    assert rc == 0 and "appended 3 images (6 already present" in out.out

    def query(*extra):
        rc, out = run("query", "--index", index, "--image", q / "red.jpg", "--image",
                      q / "blue.jpg", "--image", g / "green_1.jpg", "--topk", "3", "--json",
                      *extra)  # fmt: skip
        assert rc == 0
        return json.loads(out.out)

    res = query()
    assert [r["prediction"] for r in res] == ["red can", "blue box", "green bottle"]
    assert res[2]["hits"][0]["path"] == "green_1.jpg"
    assert res[2]["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)  # itself, cosine 1
    assert all(h["gallery_label"] == "blue box" for h in res[1]["hits"])
    # Same answers from the exact backend on the same index directory.
    res_exact = query("--backend", "exact")
    assert [[h["id"] for h in r["hits"]] for r in res_exact] == [
        [h["id"] for h in r["hits"]] for r in res
    ]
    # The highest threshold IP allows makes the other images unknown but keeps the hits.
    res = query("--threshold", "1")
    assert [r["prediction"] for r in res[:2]] == ["unknown"] * 2
    assert all(h["label"] == "unknown" for r in res[:2] for h in r["hits"])
    # Remove the blue images: blue queries can no longer return them.
    rc, out = run("remove", "--index", index, "--images", g / "blue.txt")
    assert rc == 0 and "removed 3 images; index now holds 6" in out.out
    res = query()
    assert res[1]["prediction"] != "blue box"
    assert not any(h["gallery_label"] == "blue box" for r in res for h in r["hits"])
    rc, out = run("info", "--index", index)
    info = json.loads(out.out)
    assert info["size"] == 6 and info["labels"] == 2 and info["method"] == "Flat"
    assert info["model_fingerprint"] == md.fingerprint()
    # Text output names the prediction and the threshold rule.
    rc, out = run("query", "--index", index, "--image", q / "red.jpg")
    assert rc == 0 and "red.jpg: red can" in out.out and "similarity >= 0.5" in out.out
    # A missing image in a list is reported with file and line; nothing is written.
    (tmp_path / "bad.txt").write_text(f"{g}/red_0.jpg\tred can\nnope.jpg\tred can\n")
    before = _snapshot(index)
    rc, out = run("append", "--index", index, "--images", tmp_path / "bad.txt")
    assert rc == 2 and "bad.txt:2" in out.err and "nope.jpg not found" in out.err
    assert _snapshot(index) == before


def test_an_index_never_mixes_two_models(tmp_path, gallery, run):
    import shutil

    model, other = gallery["models"]
    g, q = gallery["g"], gallery["q"]
    mine = tmp_path / "model"
    shutil.copytree(model, mine)
    index = tmp_path / "index"
    assert run("build", "--model", mine, "--images", g / "first.txt", "--index", index)[0] == 0
    fp = _meta(index)["model_fingerprint"]
    before = _snapshot(index)
    # Another model directory: refused, naming both models.
    rc, out = run("append", "--index", index, "--images", g / "all.txt", "--model", other)
    assert rc == 2 and f"{other} is not the model the index was built with ({mine})" in out.err
    assert fp[:12] in out.err and "never mixes two models" in out.err and "--overwrite" in out.err
    rc, out = run("query", "--index", index, "--image", q / "red.jpg", "--model", other)
    assert rc == 2 and "--allow-model-change" in out.err
    # The index's own model directory replaced in place: refused too.
    _tiny_model_dir(mine, seed=1, overwrite=True)
    rc, out = run("append", "--index", index, "--images", g / "all.txt")
    assert rc == 2 and f"the model in {mine} has changed since the index was built" in out.err
    assert _snapshot(index) == before
    rc, out = run("query", "--index", index, "--image", q / "red.jpg")
    assert rc == 2 and "has changed" in out.err
    rc, out = run("query", "--index", index, "--image", q / "red.jpg", "--allow-model-change")
    assert rc == 0 and "warning: --allow-model-change: the model in" in out.err
    assert "red.jpg:" in out.out and _snapshot(index) == before
    # Rebuilding with the new model is the way to switch.
    rc, _ = run("build", "--model", mine, "--images", g / "all.txt", "--index", index,
                "--overwrite")  # fmt: skip
    assert rc == 0 and _meta(index)["model_fingerprint"] != fp
    assert run("append", "--index", index, "--images", g / "all.txt")[0] == 0


def test_index_without_fingerprint_records_it_at_the_next_append(tmp_path, gallery, run):
    model, g = gallery["models"][0], gallery["g"]
    index = tmp_path / "index"
    assert run("build", "--model", model, "--images", g / "first.txt", "--index", index)[0] == 0
    m = _meta(index)
    fp = m.pop("model_fingerprint")
    os.rename(index / m.pop("files")["features"], index / "features.npy")
    for name in os.listdir(index):
        if name.startswith("vector-"):
            os.rename(index / name, index / "vector.index")
    (index / search.INDEX_FILE).write_text(json.dumps({**m, "version": 1}))
    rc, out = run("info", "--index", index)
    assert rc == 0 and "older jaxrec and records no model fingerprint" in out.err
    rc, out = run("append", "--index", index, "--images", g / "all.txt")
    assert rc == 0 and "appended 3 images" in out.out
    assert out.err.count("records no model fingerprint") == 1  # warned once per command
    m = _meta(index)
    assert m["version"] == 2 and m["model_fingerprint"] == fp
    assert not (index / "features.npy").exists() and len(store.load(str(index))) == 9


@pytest.mark.slow
def test_concurrent_cli_appends_keep_every_image(tmp_path, gallery, run):
    """Three `python -m jaxrec.search append` processes at once on one index."""
    import subprocess
    import sys

    model, g, lines = gallery["models"][0], gallery["g"], gallery["lines"]
    index = tmp_path / "index"
    (tmp_path / "seed.txt").write_text(f"{g}/{lines[0]}\n")
    assert run("build", "--model", model, "--images", tmp_path / "seed.txt", "--index", index,
               "--method", "HNSW32")[0] == 0  # fmt: skip
    lists = []
    for w, chunk in enumerate((lines[1:4], lines[4:7], lines[7:])):
        lists.append(tmp_path / f"w{w}.txt")
        lists[-1].write_text("".join(f"{g}/{li}\n" for li in chunk))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jaxrec.search",
                "append",
                "--index",
                str(index),
                "--images",
                str(lst),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for lst in lists
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-2000:] for o in outs]
    idx = store.load(str(index))
    assert len(idx) == 9 and idx.backend.ntotal == 9
    assert sorted(e.path for e in idx.entries) == sorted(f"{g}/{li.split()[0]}" for li in lines)


def test_cli_calibrate_stores_the_threshold_that_query_and_info_use(tmp_path, gallery, run):
    model, g, q = gallery["models"][0], gallery["g"], gallery["q"]
    index = tmp_path / "index"
    assert run("build", "--model", model, "--images", g / "first.txt", "--index", index,
               "--method", "Flat")[0] == 0  # fmt: skip
    # queries: the gallery's red and green images (self-matches skipped) and the unknown blue ones
    rc, out = run("calibrate", "--index", index, "--queries", g / "all.txt", "--f1",
                  "--out", tmp_path / "rep")  # fmt: skip
    assert rc == 0, out.err
    assert "6 queries are gallery images" in out.out and "3 of classes absent" in out.out
    cal = _meta(index)["calibration"]
    assert cal["rule"] == "best-f1" and cal["unknown_queries"] == 3 and cal["gallery_size"] == 6
    assert (tmp_path / "rep" / "calibration.png").is_file()
    rc, out = run("query", "--index", index, "--image", q / "blue.jpg", "--topk", "1", "--json")
    assert rc == 0
    hit = json.loads(out.out)[0]["hits"][0]
    assert hit["label"] == ("unknown" if hit["score"] < cal["threshold"] else hit["gallery_label"])
    rc, out = run("query", "--index", index, "--image", q / "red.jpg", "--topk", "1")
    assert f"known if similarity >= {cal['threshold']:.6g}, calibrated, best-f1" in out.out
    rc, out = run("info", "--index", index)
    assert json.loads(out.out)["threshold"] == cal["threshold"]
    # with no unknown queries the rejection side is reported as not measured
    rc, out = run("calibrate", "--index", index, "--queries", g / "first.txt", "--f1", "--dry-run",
                  "--out", tmp_path / "rep2")  # fmt: skip
    assert rc == 0 and "unknown rejection NOT MEASURED" in out.out
    assert _meta(index)["calibration"] == cal  # --dry-run stores nothing
