"""python -m jaxrec.prepare and load_prepared: exact (raw) and close (jpeg) batches, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxrec import prepare as prep
from jaxrec.data.datasets import DatasetError, load_list, load_prepared
from jaxrec.data.loader import BadImageError, TrainLoader
from jaxrec.data.sampler import PKSampler
from jaxrec.data.transforms import RandomErasingConfig, TrainTransform

ROOT = Path(__file__).parents[1]
CHAIN = TrainTransform(size=32, pad=4, erasing=RandomErasingConfig(prob=0.5))


def _photo(rng, h, w):
    base = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC))


def _make_list(root: Path, ids: int = 8, per_id: int = 3, size=(30, 90)) -> Path:
    """JPEG and PNG photos of varied sizes, ``ids`` x ``per_id``, in a training list."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for label in range(ids):
        for k in range(per_id):
            h, w = (int(v) for v in rng.integers(size[0], size[1], 2))
            name = f"img/{label}_{k}." + ("jpg" if (label + k) % 2 else "png")
            Image.fromarray(_photo(rng, h, w)).save(root / name, quality=90)
            lines.append(f"{name} {label + 100}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root / "train.txt"


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _batches(source, n=4, **kw):
    sampler = PKSampler(source.labels, 6, 3, seed=2, num_shards=2)
    with TrainLoader(source, sampler, CHAIN, seed=7, **kw) as loader:
        return [next(loader) for _ in range(n)]


def test_raw_codec_gives_the_original_paths_batches_bit_for_bit(tmp_path):
    src = load_list(_make_list(tmp_path))
    manifest = prep.prepare(src, tmp_path / "p", prep.PrepareSettings(32, "raw", shard_size=5))
    assert manifest["records"] == len(src) and manifest["shards"] == 5
    ready = load_prepared(tmp_path / "p", size=32)
    assert ready.paths == list(src.paths) and ready.name == src.name
    np.testing.assert_array_equal(ready.labels, src.labels)
    np.testing.assert_array_equal(ready.lines, src.lines)
    assert ready.describe(4) == src.describe(4)
    for a, b in zip(_batches(src), _batches(ready), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    # Resuming from a saved position gives the uninterrupted run's batches.
    sampler = PKSampler(ready.labels, 6, 3, seed=2, num_shards=2)
    with TrainLoader(ready, sampler, CHAIN, seed=7, augment_on_host=False) as a:
        whole = [next(a)["image"] for _ in range(5)]
    with TrainLoader(ready, sampler, CHAIN, seed=7, augment_on_host=False) as b:
        next(b), next(b)
        state = b.state()
    with TrainLoader(ready, sampler, CHAIN, seed=7, augment_on_host=False) as c:
        c.restore(state)
        for want in whole[2:]:
            np.testing.assert_array_equal(next(c)["image"], want)
    rel = load_prepared(tmp_path / "p", relabel=True)
    assert rel.labels.min() == 0 and rel.labels.max() == 7


def test_jpeg_codec_is_close_and_small(tmp_path):
    src = load_list(_make_list(tmp_path))
    prep.prepare(src, tmp_path / "p", prep.PrepareSettings(32, shard_size=7), workers=2)
    ready = load_prepared(tmp_path / "p")
    assert isinstance(ready.read(0), bytes) and ready.read(0)[:3] == b"\xff\xd8\xff"
    diffs = [
        np.abs(a["image"].astype(int) - b["image"]).mean()
        for a, b in zip(_batches(src), _batches(ready), strict=True)
    ]
    assert 0 < max(diffs) < 4, diffs  # quality 95, 4:4:4: only the JPEG error differs


def test_resume_after_damage_gives_identical_files_and_any_worker_count(tmp_path):
    src = load_list(_make_list(tmp_path))
    settings = prep.PrepareSettings(24, shard_size=4)
    prep.prepare(src, tmp_path / "a", settings, workers=1)
    ref = _files(tmp_path / "a")
    # What a kill can leave: no manifest or index, a half-written shard, a stray temp file.
    out = tmp_path / "b"
    prep.prepare(src, out, settings, workers=3)
    assert _files(out) == ref
    for name in ("prepared.json", "records.npy", "paths.txt", "shards/00002.json"):
        (out / name).unlink()
    shard = out / "shards" / "00004.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    (out / "shards" / "00001.bin.tmp").write_bytes(b"partial")
    (out / "shards" / "00001.bin").unlink()
    with pytest.raises(DatasetError, match="has not finished.*run the same"):
        load_prepared(out)
    prep.prepare(src, out, settings, workers=2)
    assert _files(out) == ref  # the redone shard's temp file was renamed into place


def test_refuses_other_plans_foreign_folders_and_other_sizes(tmp_path):
    src = load_list(_make_list(tmp_path, ids=3, per_id=2))
    prep.prepare(src, tmp_path / "p", prep.PrepareSettings(16))
    with pytest.raises(DatasetError, match=r"other inputs or settings .*'size'.*--overwrite"):
        prep.prepare(src, tmp_path / "p", prep.PrepareSettings(20))
    prep.prepare(src, tmp_path / "p", prep.PrepareSettings(20), overwrite=True)
    assert load_prepared(tmp_path / "p", size=20).read(0)[:2] == b"\xff\xd8"
    with pytest.raises(DatasetError, match="prepared at 20x20 px but training uses 16x16"):
        load_prepared(tmp_path / "p", size=16)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not part of a jaxrec prepared dataset"):
        prep.prepare(src, tmp_path / "mine", prep.PrepareSettings(16), overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(DatasetError, match="create it with python -m jaxrec.prepare"):
        load_prepared(tmp_path / "mine")
    with pytest.raises(DatasetError, match="--codec"):
        prep.PrepareSettings(16, codec="webp")


def test_bad_images_fail_by_name_or_are_skipped(tmp_path):
    listing = _make_list(tmp_path, ids=4, per_id=2)
    (tmp_path / "img" / "2_1.jpg").write_bytes(b"broken")
    src = load_list(listing)
    settings = prep.PrepareSettings(16, shard_size=2)
    with pytest.raises(BadImageError, match=r"2_1\.jpg \(.*train\.txt line 6\)"):
        prep.prepare(src, tmp_path / "p", settings, workers=1)
    assert (tmp_path / "p" / "shards" / "00000.json").exists(), "finished shards are kept"
    manifest = prep.prepare(src, tmp_path / "p", settings, skip_bad=True)
    assert manifest["records"] == 7 and "2_1.jpg" in manifest["skipped"][0]["path"]
    ready = load_prepared(tmp_path / "p")
    assert len(ready) == 7 and "2_1.jpg" not in " ".join(ready.paths)
    np.testing.assert_array_equal(ready.lines, [1, 2, 3, 4, 5, 7, 8])


def test_cli_errors_are_one_line(tmp_path):
    listing = _make_list(tmp_path, ids=2, per_id=2)
    (tmp_path / "img" / "1_0.jpg").write_bytes(b"")  # (1 + 0) % 2: a .jpg in the list
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "jaxrec.prepare", "--list", str(listing), "--size", "16"]
    r = subprocess.run(
        cmd + ["--out", str(tmp_path / "p"), "--quiet"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "--skip-bad" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run(
        cmd + ["--out", str(tmp_path / "p"), "--quiet", "--skip-bad"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0 and "prepared 3 images (1 skipped)" in r.stdout


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    listing = _make_list(tmp_path, ids=40, per_id=5, size=(300, 700))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = ["--list", str(listing), "--size", "64", "--shard-size", "4", "--workers", "1"]
    cmd = [sys.executable, "-m", "jaxrec.prepare", *args, "--quiet", "--out"]
    subprocess.run(cmd + [str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + [str(out)], env=env, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "shards").glob("*.json")):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((out / "shards").glob("*.json")))
    assert 0 < done < 50 and not (out / "prepared.json").exists(), done
    subprocess.run(cmd + [str(out)], check=True, env=env, capture_output=True)
    whole, resumed = _files(tmp_path / "whole"), _files(out)
    assert resumed == whole
    assert json.loads(whole["prepared.json"])["records"] == 200
