"""python -m jaxrec.extract end to end on a tiny-width model and real image files.

The model directory records a 48 px input and non-ImageNet pixel normalization; extraction must
use them with no flag, flags override them (with a note), and a v1 directory gets the old
defaults (with a note).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from model_testutil import build, compiles_of

from jaxrec import extract, models
from jaxrec.config import resolve, resolve_arch
from jaxrec.data import image
from jaxrec.data.preprocess import Preprocess
from jaxrec.errors import DatasetError
from jaxrec.models import FeatureSpec

FILES = os.path.join(os.path.dirname(__file__), "fixtures", "image_files")
TINY_ARCH = {
    "name": "RecModel",
    "Backbone": {
        "name": "PPLCNetV2_base_ShiTu",
        "scale": 0.25,
        "depths": [1, 1, 1, 1],
        "class_expand": 16,
    },
    "BackboneStopLayer": {"name": "flatten"},
    "Neck": {"name": "BNNeck", "num_features": 16},
}
TINY_MODEL = build(TINY_ARCH)
# What the tiny model "was trained with": 48 px, its own mean/std, the deploy pixel scale.
OWN = Preprocess(resize=(48, 48), scale=image.SCALE_DEPLOY, mean=(0.5, 0.4, 0.3), std=(0.2,) * 3)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    model = TINY_MODEL
    variables = models.init_variables(model, seed=0)
    # Random BN statistics so that the eval-mode path is really exercised (and no ReLU is dead:
    # features must depend on the image, else every comparison below would hold trivially).
    rng = np.random.default_rng(0)

    def stat(kp, a):
        if getattr(kp[-1], "key", "") == "var":
            return rng.uniform(0.5, 1.5, np.shape(a)).astype(np.float32)
        return rng.normal(0, 0.1, np.shape(a)).astype(np.float32)

    stats = jax.tree_util.tree_map_with_path(stat, variables["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": stats}
    d = tmp_path_factory.mktemp("model") / "tiny"
    models.save_model_dir(d, TINY_ARCH, TINY_MODEL, variables, preprocess=OWN)
    return str(d), model, variables


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    layout = {
        "b/rocket.jpg": "rocket_q80.jpg",
        "a/cat.jpg": "chelsea_progressive.jpg",
        "a/z_logo.png": "logo_rgba.png",
        "gray.jpg": "camera_gray.jpg",
        "c/d/cmyk.jpg": "astronaut_cmyk.jpg",
    }
    for dst, src in layout.items():
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(FILES, src), root / dst)
    (root / "notes.md").write_text("not an image, ignored by the folder scan")
    return root


@jax.jit
def _apply_one(variables, x):
    return TINY_MODEL.apply(variables, x, train=False)["features"]


def reference(variables, paths, size=48, scale=OWN.scale, mean=OWN.mean, std=OWN.std, norm=True):
    """Independent path: one image at a time, numpy resize and normalization, plain model.apply."""
    rows = []
    for p in paths:
        img = image.resize_bilinear(image.decode_image(p), (size, size))
        x = image.normalize(img, scale, mean, std)[None]
        rows.append(np.asarray(_apply_one(variables, x))[0])
    f = np.stack(rows)
    return f / np.linalg.norm(f, axis=1, keepdims=True) if norm else f


def run_cli(*args):
    return extract.main([*args, "--quiet"])


def test_folder_uses_the_models_own_preprocessing(tiny_model, image_tree, tmp_path, capsys):
    mdir, _, variables = tiny_model
    out = tmp_path / "feats.npy"
    assert extract.main(["--model", mdir, "--images", str(image_tree), "--out", str(out),
                         "--batch-size", "2"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "preprocessing: resize 48x48" in err and "note:" not in err
    names = (tmp_path / "feats.txt").read_text().splitlines()
    assert names == ["a/cat.jpg", "a/z_logo.png", "b/rocket.jpg", "c/d/cmyk.jpg", "gray.jpg"]
    feats = np.load(out)
    assert feats.shape == (5, 16) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-6)
    paths = [image_tree / n for n in names]
    np.testing.assert_allclose(feats, reference(variables, paths), atol=2e-5)
    # 224 px with ImageNet normalization (the old fixed default) gives other features.
    old = reference(
        variables, paths, 224, image.SCALE_TRAIN, image.IMAGENET_MEAN, image.IMAGENET_STD
    )
    assert np.abs(feats - old).max() > 0.05
    assert not (tmp_path / "feats.bad.txt").exists()

    # unnormalized output (5 images in batches of 2: the last batch is padded)
    raw_out = tmp_path / "raw.npy"
    assert run_cli("--model", mdir, "--images", str(image_tree), "--out", str(raw_out),
                   "--batch-size", "2", "--no-normalize") == 0  # fmt: skip
    assert "note: --no-normalize" in capsys.readouterr().err  # notes print even with --quiet
    raw = np.load(raw_out)
    np.testing.assert_allclose(raw, reference(variables, paths, norm=False), rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)


def test_flags_override_with_a_note(tiny_model, image_tree, tmp_path, capsys):
    mdir, _, variables = tiny_model
    img = str(image_tree / "a" / "cat.jpg")
    out = tmp_path / "o.npy"
    assert run_cli("--model", mdir, "--images", img, "--out", str(out), "--image-size", "64",
                   "--pixel-scale", "1/255") == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "note: --image-size 64 overrides the model's 48x48 input" in err
    assert (
        "note: --pixel-scale 1/255 (0.0039215686) overrides the model's pixel scale 0.00392157"
        in err
    )
    want = reference(variables, [img], 64, image.SCALE_TRAIN)
    np.testing.assert_allclose(np.load(out), want, atol=2e-5)
    # A flag equal to the model's own value says nothing.
    out2 = tmp_path / "o2.npy"  # a new file: replacing one is a note of its own
    assert run_cli("--model", mdir, "--images", img, "--out", str(out2), "--image-size", "48",
                   "--pixel-scale", "deploy", "--output-key", "features") == 0  # fmt: skip
    assert "note" not in capsys.readouterr().err
    np.testing.assert_allclose(np.load(out2), reference(variables, [img]), atol=2e-5)


def test_v1_model_dir_gets_the_old_defaults_with_a_note(tiny_model, image_tree, tmp_path, capsys):
    mdir, _, variables = tiny_model
    v1 = tmp_path / "v1"
    shutil.copytree(mdir, v1)
    cfg = json.loads((v1 / "config.json").read_text())
    (v1 / "config.json").write_text(
        json.dumps({"format": cfg["format"], "version": 1, "Arch": cfg["Arch"]})
    )
    img = str(image_tree / "gray.jpg")
    out = tmp_path / "v1.npy"
    assert run_cli("--model", str(v1), "--images", img, "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert "has no preprocessing record (model directory format v1)" in err
    assert "resize 224x224" in err
    want = reference(
        variables, [img], 224, image.SCALE_TRAIN, image.IMAGENET_MEAN, image.IMAGENET_STD
    )
    np.testing.assert_allclose(np.load(out), want, atol=2e-5)


def test_list_and_single_image_inputs(tiny_model, image_tree, tmp_path):
    mdir, _, variables = tiny_model
    lst = image_tree / "a" / "list.txt"
    lst.write_text(
        "# query images\n"
        "../gray.jpg\n"
        "\n"
        "cat.jpg 7 1\n"  # PaddleClas 'path label id' line: first field is the path
        f"{image_tree / 'b' / 'rocket.jpg'}\n"
    )
    out = tmp_path / "list.npy"
    assert run_cli("--model", mdir, "--images", str(lst), "--out", str(out),
                   "--batch-size", "2") == 0  # fmt: skip
    names = (tmp_path / "list.txt").read_text().splitlines()
    assert names == ["../gray.jpg", "cat.jpg", str(image_tree / "b" / "rocket.jpg")]
    paths = [image_tree / "gray.jpg", image_tree / "a" / "cat.jpg", image_tree / "b/rocket.jpg"]
    np.testing.assert_allclose(np.load(out), reference(variables, paths), atol=2e-5)

    one = tmp_path / "one.npy"
    assert run_cli("--model", mdir, "--images", str(image_tree / "a" / "cat.jpg"),
                   "--out", str(one)) == 0  # fmt: skip
    assert (tmp_path / "one.txt").read_text() == "cat.jpg\n"
    np.testing.assert_allclose(np.load(one), reference(variables, paths[1:2]), atol=2e-5)


def test_bad_images_fail_with_name_or_are_skipped(tiny_model, image_tree, tmp_path, capsys):
    mdir, _, _ = tiny_model
    good = open(os.path.join(FILES, "rocket_q80.jpg"), "rb").read()
    (tmp_path / "broken.jpg").write_bytes(good[: len(good) // 3])
    lst = tmp_path / "imgs.txt"
    lst.write_text(
        f"{image_tree / 'gray.jpg'}\nbroken.jpg\nmissing.png\n{image_tree / 'a/cat.jpg'}\n"
    )
    out = tmp_path / "f.npy"
    assert run_cli("--model", mdir, "--images", str(lst), "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "--skip-bad" in err
    assert not out.exists()

    assert run_cli("--model", mdir, "--images", str(lst), "--out", str(out), "--skip-bad") == 0
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "missing.png" in err
    assert np.load(out).shape == (2, 16)
    assert (tmp_path / "f.txt").read_text().splitlines() == [
        str(image_tree / "gray.jpg"),
        str(image_tree / "a/cat.jpg"),
    ]
    bad = (tmp_path / "f.bad.txt").read_text().splitlines()
    assert [b.split("\t")[0] for b in bad] == [
        str(tmp_path / "broken.jpg"),
        str(tmp_path / "missing.png"),
    ]
    assert "does not exist" in bad[1]


def test_input_errors(tiny_model, tmp_path, capsys):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        extract.resolve_images(empty)
    out = str(tmp_path / "o.npy")
    assert run_cli("--model", "x", "--images", str(empty), "--out", out) == 2
    assert "error: no images found" in capsys.readouterr().err
    one = os.path.join(FILES, "rocket.bmp")
    assert run_cli("--model", str(empty), "--images", one, "--out", out) == 2
    assert "not a jaxrec model directory" in capsys.readouterr().err
    assert run_cli("--model", str(tmp_path / "nope"), "--images", one, "--out", out) == 2
    assert "nope is not a directory" in capsys.readouterr().err
    assert run_cli("--model", tiny_model[0], "--images", one, "--out", out, "--output-key",
                   "bogus") == 2  # fmt: skip
    assert "error: feature output_key 'bogus'" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_extract_features_library_compiles_once_and_help(tiny_model, image_tree):
    mdir, _, variables = tiny_model
    md = models.load_model_dir(mdir, resolve_arch)
    assert md.preprocess == OWN
    paths = [str(image_tree / n) for n in ("gray.jpg", "b/rocket.jpg", "a/cat.jpg")]
    errors = {}
    forward = extract.make_forward(md.model, md.preprocess, md.features)
    with compiles_of(forward) as compiled:
        feats, kept = extract.extract_features(
            md,
            paths * 3 + [str(image_tree / "notes.md")],
            batch_size=12,
            skip_bad=True,
            errors=errors,
        )
        assert kept == paths * 3 and list(errors) == [str(image_tree / "notes.md")]
        np.testing.assert_allclose(feats, np.tile(reference(variables, paths), (3, 1)), atol=2e-5)
        extract.extract_features(md, paths[:2] * 6, batch_size=12)
    # 9 and 12 images in one batch of 16 rows each (batch 12, at most the image count, rounded up
    # to the 8 devices; padded); no other test feeds 16 rows.
    assert len(compiled) == 1
    # Overrides through the library: another preprocessing and the raw backbone output.
    pre = Preprocess(resize=(32, 40))
    feats, _ = extract.extract_features(
        md, paths[:1], preprocess=pre, features=FeatureSpec("backbone", normalize=False)
    )
    x = image.normalize(image.resize_bilinear(image.decode_image(paths[0]), (32, 40)))[None]
    want = jax.jit(lambda v, x: TINY_MODEL.apply(v, x, train=False)["backbone"])(variables, x)
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-5)

    r = subprocess.run(
        [sys.executable, "-m", "jaxrec.extract", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "relative paths in a list are resolved against" in text
    assert "with the model's own preprocessing" in text and "training workdir" in text


def test_extraction_on_eight_devices_equals_one_device(tiny_model, image_tree):
    """Batches are sharded over all local devices: 8 CPU devices give the features of one, with a
    batch size (5, rounded up to 8) and an image count (13) that 8 does not divide."""
    assert jax.local_device_count() == 8
    md = models.load_model_dir(tiny_model[0], resolve_arch)
    names = ("gray.jpg", "b/rocket.jpg", "a/cat.jpg", "a/z_logo.png", "c/d/cmyk.jpg")
    paths = [str(image_tree / n) for n in names] * 3
    paths = paths[:13]
    one, kept_one = extract.extract_features(md, paths, batch_size=5, devices=jax.devices()[:1])
    eight, kept_eight = extract.extract_features(md, paths, batch_size=5)
    assert kept_one == kept_eight == paths and eight.shape == (13, 16)
    np.testing.assert_allclose(eight, one, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(eight, reference(tiny_model[2], paths), atol=2e-5)


@pytest.mark.slow
def test_training_workdir_as_model(tmp_path, capsys):
    """--model WORKDIR: the run's best (else latest) checkpoint, fed with the run's own eval
    preprocessing (24 px here), equal to the library path through checkpoint.restore_model."""
    from train_data_util import make_tiny_dataset, tiny_config

    from jaxrec.training import loop as trainer
    from jaxrec.training.checkpoint import restore_model

    data = make_tiny_dataset(str(tmp_path / "data"), train_classes=2, per_class=4)
    cfg = tiny_config(data, epochs=1, size=24)
    cfg.Optimizer.lr.warmup_epoch = 0
    workdir = str(tmp_path / "run")
    trainer.train(resolve(cfg), workdir)
    out = tmp_path / "w.npy"
    images = str(tmp_path / "data" / "images")
    capsys.readouterr()
    assert extract.main(["--model", workdir, "--images", images, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "preprocessing: resize 24x24" in err, err
    md = restore_model(workdir, which="best")
    names = (tmp_path / "w.txt").read_text().splitlines()
    want, _ = extract.extract_features(md, [os.path.join(images, n) for n in names])
    np.testing.assert_array_equal(np.load(out), want)


def test_replacing_existing_outputs_is_said(tiny_model, image_tree, tmp_path, capsys):
    mdir, _, _ = tiny_model
    out = tmp_path / "feats.npy"
    (tmp_path / "feats.txt").write_text("old names\n")
    assert run_cli("--model", mdir, "--images", str(image_tree), "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert f"note: replaced the existing {tmp_path / 'feats.txt'}" in err
    assert "old names" not in (tmp_path / "feats.txt").read_text()
    assert run_cli("--model", mdir, "--images", str(image_tree), "--out", str(out)) == 0
    assert f"replaced the existing {out} and {tmp_path / 'feats.txt'}" in capsys.readouterr().err
