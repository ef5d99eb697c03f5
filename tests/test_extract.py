"""python -m jaxrec.extract end to end on a tiny-width model and real image files."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxrec import extract, models
from jaxrec.data import image

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
TINY_MODEL = models.build_model(TINY_ARCH)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    model = TINY_MODEL
    variables = models.init_variables(model, seed=0)
    # random BN statistics so that the eval-mode path is really exercised
    rng = np.random.default_rng(0)
    stats = jax.tree_util.tree_map(
        lambda a: np.asarray(a) + rng.uniform(0.1, 0.5, np.shape(a)).astype(np.float32),
        variables["batch_stats"],
    )
    variables = {"params": variables["params"], "batch_stats": stats}
    d = tmp_path_factory.mktemp("model") / "tiny"
    models.save_model_dir(d, TINY_ARCH, variables)
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


def reference(model, variables, paths):
    """Independent path: one image at a time, numpy normalization, plain model.apply."""
    assert model == TINY_MODEL
    rows = []
    for p in paths:
        x = image.normalize(image.preprocess_for_rec(image.decode_image(p)))[None]
        rows.append(np.asarray(_apply_one(variables, x))[0])
    f = np.stack(rows)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def run_cli(*args):
    return extract.main([*args, "--quiet"])


def test_folder_input_sorted_normalized_and_equal_to_reference(tiny_model, image_tree, tmp_path):
    mdir, model, variables = tiny_model
    out = tmp_path / "feats.npy"
    assert run_cli("--model", mdir, "--images", str(image_tree), "--out", str(out),
                   "--batch-size", "2") == 0  # fmt: skip
    names = (tmp_path / "feats.txt").read_text().splitlines()
    assert names == ["a/cat.jpg", "a/z_logo.png", "b/rocket.jpg", "c/d/cmyk.jpg", "gray.jpg"]
    feats = np.load(out)
    assert feats.shape == (5, 16) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-6)
    ref = reference(model, variables, [image_tree / n for n in names])
    np.testing.assert_allclose(feats, ref, atol=2e-5)
    assert not (tmp_path / "feats.bad.txt").exists()

    # unnormalized output (5 images in batches of 2: the last batch is padded)
    raw_out = tmp_path / "raw.npy"
    assert run_cli("--model", mdir, "--images", str(image_tree), "--out", str(raw_out),
                   "--batch-size", "2", "--no-normalize") == 0  # fmt: skip
    raw = np.load(raw_out)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(extract.l2_normalize(raw), feats, atol=2e-5)


def test_list_and_single_image_inputs(tiny_model, image_tree, tmp_path):
    mdir, model, variables = tiny_model
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
    np.testing.assert_allclose(np.load(out), reference(model, variables, paths), atol=2e-5)

    one = tmp_path / "one.npy"
    assert run_cli("--model", mdir, "--images", str(image_tree / "a" / "cat.jpg"),
                   "--out", str(one)) == 0  # fmt: skip
    assert (tmp_path / "one.txt").read_text() == "cat.jpg\n"
    np.testing.assert_allclose(np.load(one), reference(model, variables, paths[1:2]), atol=2e-5)


def test_bad_images_fail_with_name_or_are_skipped(tiny_model, image_tree, tmp_path, capsys):
    mdir, _, _ = tiny_model
    good = open(os.path.join(FILES, "rocket_q80.jpg"), "rb").read()  # noqa: SIM115
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


def test_input_errors(tmp_path, capsys):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images found"):
        extract.resolve_images(empty)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        extract.resolve_images(tmp_path / "nowhere")
    blank = tmp_path / "blank.txt"
    blank.write_text("# nothing\n\n")
    with pytest.raises(extract.ImageListError, match="blank.txt"):
        extract.resolve_images(blank)
    assert run_cli("--model", "x", "--images", str(empty), "--out", str(tmp_path / "o.npy")) == 2
    assert "no images found" in capsys.readouterr().err
    one = os.path.join(FILES, "rocket.bmp")
    assert run_cli("--model", str(empty), "--images", one, "--out", str(tmp_path / "o.npy")) == 2
    assert "not a jaxrec model directory" in capsys.readouterr().err


def test_l2_normalize_keeps_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    y = extract.l2_normalize(x)
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0]])
    assert np.isfinite(y).all()


def test_extract_features_library_and_help(tiny_model, image_tree):
    _, model, variables = tiny_model
    paths = [str(image_tree / "gray.jpg"), str(image_tree / "b" / "rocket.jpg")]
    errors = {}
    feats, kept = extract.extract_features(
        model, variables, paths + [str(image_tree / "notes.md")], batch_size=2,
        normalize=True, skip_bad=True, errors=errors,
    )  # fmt: skip
    assert kept == paths and list(errors) == [str(image_tree / "notes.md")]
    np.testing.assert_allclose(feats, reference(model, variables, paths), atol=2e-5)

    r = subprocess.run(
        [sys.executable, "-m", "jaxrec.extract", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0
    assert "relative paths in a list are resolved against" in " ".join(r.stdout.split())
