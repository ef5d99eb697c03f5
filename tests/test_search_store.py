"""Gallery index on disk: atomic generations, locking, crash safety, index.json schema, damaged
files and threshold ranges. No model needed: features are random unit vectors."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from jaxrec import search
from jaxrec.search import GalleryError, GalleryIndex, store
from jaxrec.search import cli as search_cli

faiss = pytest.importorskip("faiss")

DIM = 16
N = 40


def unit(n, seed):
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def saved(tmp_path, method="Flat", metric="IP"):
    idx = GalleryIndex(
        DIM, metric, method, backend="faiss", model_dir="/m", model_fingerprint="ab" * 32
    )
    idx.add(unit(N, 0), [f"c{i % 4}" for i in range(N)], [f"p{i}.jpg" for i in range(N)])
    d = tmp_path / "idx"
    store.save(idx, str(d))
    return d, idx


def meta(d):
    return json.loads((d / search.INDEX_FILE).read_text())


def snapshot(d):
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}


def assert_same(a, b):
    assert a.entries == b.entries and a.config == b.config
    assert a.model_fingerprint == b.model_fingerprint
    np.testing.assert_array_equal(a.features, b.features)


def cli(capsys, *argv):
    store.forget_warnings()  # each CLI run is a fresh process in real use
    capsys.readouterr()
    rc = search_cli.main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out


def test_generations_commit_and_clean_up(tmp_path):
    d, idx = saved(tmp_path)
    m = meta(d)
    assert m["version"] == 2 and m["model_fingerprint"] == "ab" * 32
    assert m["files"] == {"features": "features-000001.npy", "faiss": "vector-000001.index"}
    np.testing.assert_array_equal(np.load(d / "features-000001.npy"), idx.features)
    store.save(idx, str(d))
    assert sorted(os.listdir(d)) == [
        "features-000002.npy", "index.json", "index.lock", "vector-000002.index"
    ]  # fmt: skip
    assert_same(store.load(str(d)), idx)


CRASH = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from jaxrec.search import store
    d, nth = sys.argv[1], int(sys.argv[2])
    idx = store.load(d)
    x = np.random.default_rng(7).normal(size=(5, idx.dim)).astype(np.float32)
    idx.add(x / np.linalg.norm(x, axis=1, keepdims=True), ["new"] * 5)
    real, calls = os.replace, []
    def replace(src, dst):
        calls.append(dst)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
    os.replace = replace
    store.save(idx, d)
    """
)


@pytest.mark.parametrize("nth", [1, 2, 3])  # SIGKILL before renaming features / faiss / index.json
def test_writer_killed_mid_save_leaves_the_previous_index(tmp_path, nth):
    d, idx = saved(tmp_path)
    before = store.load(str(d))
    r = subprocess.run(
        [sys.executable, "-c", CRASH, str(d), str(nth)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    committed = {"index.json", "index.lock", "features-000001.npy", "vector-000001.index"}
    assert set(os.listdir(d)) - committed  # the dead writer's files are still there
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loads cleanly: nothing stale, nothing rebuilt
        after = store.load(str(d))
    assert_same(after, before)
    store.save(after, str(d))  # the next writer commits and removes the leftovers
    assert len(os.listdir(d)) == 4 and len(store.load(str(d))) == N


APPENDER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from jaxrec.search import store
    d, worker, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(worker)
    for i in range(n):
        x = rng.normal(size=(1, 16)).astype(np.float32)
        x /= np.linalg.norm(x)
        def change(index):
            index.add(x, [f"w{worker}"], [f"w{worker}_{i}.jpg"])
            return True
        store.update(d, change)
    """
)


def test_concurrent_appends_lose_nothing(tmp_path):
    d, _ = saved(tmp_path, "HNSW32")
    workers, n = 4, 6
    procs = [
        subprocess.Popen([sys.executable, "-c", APPENDER, str(d), str(w), str(n)])
        for w in range(workers)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0] * workers
    idx = store.load(str(d))
    assert len(idx) == N + workers * n and idx.backend.ntotal == len(idx)
    paths = {e.path for e in idx.entries}
    assert all(f"w{w}_{i}.jpg" in paths for w in range(workers) for i in range(n))
    assert len(set(idx.ids.tolist())) == len(idx)
    assert sorted(os.listdir(d))[0].startswith("features-") and len(os.listdir(d)) == 4


@pytest.mark.parametrize(
    "metric, bad, good",
    [
        ("IP", [float("nan"), 7, -5, 1.01, float("inf")], [-1, 0.3, 1]),
        ("L2", [float("nan"), -0.1, 4.5, float("-inf")], [0, 1.0, 4]),
    ],
)
def test_threshold_must_fit_the_metric(metric, bad, good):
    idx = GalleryIndex(DIM, metric, "Flat", backend="exact")
    idx.add(unit(3, 1), ["a", "b", "c"])
    for t in bad:
        with pytest.raises(GalleryError, match=rf"threshold {t!r} is outside \["):
            idx.query(idx.features[:1], 1, t)
    for t in good:
        assert len(idx.query(idx.features[:1], 2, t)[0].hits) == 2


@pytest.mark.parametrize("value, metric", [("nan", "IP"), ("7", "IP"), ("-5", "IP"), ("5", "L2")])
def test_cli_rejects_a_threshold_outside_the_metric(tmp_path, capsys, value, metric):
    d, _ = saved(tmp_path, metric=metric)
    before = snapshot(d)
    rc, out = cli(capsys, "query", "--index", str(d), "--image", "x.jpg", "--threshold", value)
    rng = "[-1, 1]" if metric == "IP" else "[0, 4]"
    assert rc == 2 and out.err.startswith("error: --threshold: threshold") and rng in out.err
    assert snapshot(d) == before


def test_features_must_be_unit_vectors():
    idx = GalleryIndex(DIM, backend="exact")
    with pytest.raises(GalleryError, match=r"L2-normalized; row 1 \(b.jpg\) has norm 0"):
        idx.add(
            np.stack([unit(1, 0)[0], np.zeros(DIM, np.float32)]), ["a", "b"], ["a.jpg", "b.jpg"]
        )


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(extra=1), r"unknown key extra \(known keys"),
        (lambda m: m["entries"][3].update(note="x"), r"unknown key entries\[3\]\.note"),
        (lambda m: m["config"].update(ef_serach=3), r"unknown key config\.ef_serach"),
        (lambda m: m.pop("config"), r"missing key config"),
        (
            lambda m: m["entries"][5].update(id=2),
            r"entries\[5\]\.id 2 is a duplicate of entries\[2\]",
        ),
        (
            lambda m: m["config"].update(dim="16"),
            r"config\.dim must be a positive integer, got '16'",
        ),
        (
            lambda m: m["config"].update(dim=8),
            r"shape \(40, 16\) .* 40 entries \(key entries\) of dim 8",
        ),
        (lambda m: m["entries"].pop(), r"shape \(40, 16\) but index.json lists 39 entries"),
        (lambda m: m["config"].update(metric="cos"), r"config\.metric must be one of"),
        (lambda m: m["entries"][0].update(label=5), r"entries\[0\]\.label must be a string"),
        (lambda m: m["files"].update(features="../x.npy"), r"files\.features must be a file name"),
        (lambda m: m.update(version=3), r"version 3 was written by a newer jaxrec"),
        (lambda m: m.update(entries={}), r"entries must be a list, got {} \(dict\)"),
    ],
)
def test_hand_edited_index_json_gives_one_error_naming_the_key(tmp_path, capsys, edit, match):
    d, _ = saved(tmp_path)
    m = meta(d)
    edit(m)
    (d / search.INDEX_FILE).write_text(json.dumps(m))
    with pytest.raises(GalleryError, match=match):
        store.load(str(d))
    before = snapshot(d)
    for cmd in (["info"], ["repair"], ["remove", "--images", str(d / "index.json")]):
        rc, out = cli(capsys, *cmd, "--index", str(d))
        assert rc == 2 and out.err.startswith("error: ") and len(out.err.splitlines()) == 1
    assert snapshot(d) == before
    (d / search.INDEX_FILE).write_text("{")
    with pytest.raises(GalleryError, match="index.json: not valid JSON"):
        store.load(str(d))


def test_truncated_features_name_the_file_and_the_rebuild_command(tmp_path, capsys):
    d, _ = saved(tmp_path)
    f = d / meta(d)["files"]["features"]
    f.write_bytes(f.read_bytes()[:1000])
    hint = r"python -m jaxrec.search build --model /m --images GALLERY_LIST --index .* --overwrite"
    with pytest.raises(GalleryError, match=rf"{f} is truncated or damaged .*{hint}"):
        store.load(str(d))
    rc, out = cli(capsys, "info", "--index", str(d))
    assert rc == 2 and str(f) in out.err
    f.unlink()
    with pytest.raises(GalleryError, match=rf"{f} is missing"):
        store.load(str(d))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete", "other-index"])
def test_damaged_faiss_file_is_rebuilt_from_the_features(tmp_path, capsys, damage):
    d, idx = saved(tmp_path, "HNSW32")
    f = d / meta(d)["files"]["faiss"]
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "garbage":
        f.write_bytes(b"not a faiss index")
    elif damage == "delete":
        f.unlink()
    else:  # a readable index with other vectors (stale)
        small = GalleryIndex(DIM, "IP", "HNSW32", backend="faiss")
        small.add(unit(2, 3), ["a", "b"])
        small.backend.write(str(f))
    store.forget_warnings()
    with pytest.warns(UserWarning, match=rf"{f.name} is stale or damaged .*rebuilt .* repair"):
        again = store.load(str(d))
    q = unit(5, 9)
    np.testing.assert_array_equal(again.search(q, 3)[1], idx.search(q, 3)[1])
    before = snapshot(d)
    rc, out = cli(capsys, "info", "--index", str(d))
    assert rc == 0 and json.loads(out.out)["size"] == N
    assert out.err.startswith("warning: ") and "stale or damaged" in out.err
    assert snapshot(d) == before  # info only reads
    rc, out = cli(capsys, "repair", "--index", str(d))
    assert rc == 0 and f"rewrote {d}: {N} entries" in out.out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(store.load(str(d)), idx)


def test_v1_index_loads_with_one_warning_and_is_upgraded_on_write(tmp_path, capsys):
    d, idx = saved(tmp_path)
    m = meta(d)
    os.rename(d / m["files"]["features"], d / "features.npy")
    os.rename(d / m["files"]["faiss"], d / "vector.index")
    os.unlink(d / "index.lock")
    v1 = {k: m[k] for k in ("format", "config", "backend", "entries")}
    (d / search.INDEX_FILE).write_text(json.dumps({**v1, "version": 1}))
    store.forget_warnings()
    with pytest.warns(UserWarning, match="older jaxrec and records no model fingerprint"):
        old = store.load(str(d))
    assert old.model_fingerprint is None and old.backend.ntotal == N
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.load(str(d))  # warned once per process
    rc, out = cli(capsys, "info", "--index", str(d))
    assert rc == 0 and out.err.count("warning:") == 1
    rc, out = cli(capsys, "repair", "--index", str(d))
    assert rc == 0 and sorted(os.listdir(d)) == [
        "features-000001.npy", "index.json", "index.lock", "vector-000001.index"
    ]  # fmt: skip
    assert meta(d)["version"] == 2 and meta(d)["model_fingerprint"] is None
    np.testing.assert_array_equal(store.load(str(d)).features, idx.features)
