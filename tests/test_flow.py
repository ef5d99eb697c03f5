"""The whole flow at a non-224 size with a non-ImageNet NormalizeImage: train, evaluate, export,
extract. Every stage feeds images the way the config says, with no size or normalization flag,
and the exported and extracted features equal the ones evaluation computed."""

from __future__ import annotations

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_data_util import make_tiny_dataset, tiny_config

from jaxrec.config import resolve
from jaxrec.data.image import decode_image
from jaxrec.evaluation import RetrievalEvaluator
from jaxrec.extract import extract_features
from jaxrec.models import build_model, load_model_dir
from jaxrec.parallel import make_mesh
from jaxrec.training import loop as trainer
from jaxrec.training.checkpoint import restore_model

pytestmark = pytest.mark.slow

SIZE = 40
MEAN, STD, SCALE = (0.3, 0.5, 0.7), (0.2, 0.3, 0.4), "1.0/200.0"


def _custom_normalize(cfg) -> None:
    chains = [cfg.DataLoader.Train.dataset.transform_ops] + [
        cfg.DataLoader.Eval[p].dataset.transform_ops for p in ("Query", "Gallery")
    ]
    for ops in chains:
        for op in ops:
            if "NormalizeImage" in op:
                op.NormalizeImage.mean, op.NormalizeImage.std = MEAN, STD
                op.NormalizeImage.scale = SCALE


@pytest.fixture(scope="module")
def run_dir():
    tmp = tempfile.TemporaryDirectory(prefix="jaxrec_flow_")
    data = make_tiny_dataset(os.path.join(tmp.name, "d"), train_classes=4, per_class=8, size=56)
    cfg = tiny_config(data, epochs=2, size=SIZE)
    cfg.Global.eval_during_train = True
    _custom_normalize(cfg)
    wd = os.path.join(tmp.name, "w")
    trainer.train(cfg, wd)
    yield cfg, wd, tmp.name
    tmp.cleanup()


def _manual_features(model_dir, paths):
    """What the features must be: resize to 40x40, (x * 1/200 - MEAN) / STD, model, L2."""
    from jaxrec.data.image import resize_bilinear

    x = np.stack([resize_bilinear(decode_image(p), (SIZE, SIZE)) for p in paths])
    x = (x.astype(np.float32) * np.float32(1 / 200) - np.float32(MEAN)) / np.float32(STD)
    f = model_dir.model.apply(model_dir.variables, jnp.asarray(x), train=False)["features"]
    f = np.asarray(f, np.float64)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def test_training_and_evaluation_use_the_configured_normalization(run_dir):
    cfg, wd, _ = run_dir
    run = resolve(cfg)
    assert run.train.pixel.mean == MEAN and run.train.pixel.scale == pytest.approx(1 / 200)
    assert run.preprocess.input_size == (SIZE, SIZE) and run.preprocess.std == STD
    md = restore_model(wd)
    assert md.preprocess == run.preprocess
    evaluator = RetrievalEvaluator.for_model(
        run.eval, build_model(run.model_arch(False)), make_mesh()
    )
    feats = evaluator.features(md.variables, "query")
    want = _manual_features(md, evaluator.query.paths)
    np.testing.assert_allclose(feats, want, atol=2e-5)


def test_export_and_extract_use_the_trained_size_and_normalization(run_dir, tmp_path):
    from jaxrec.export.cli import main as export_main

    cfg, wd, _ = run_dir
    run = resolve(cfg)
    out = tmp_path / "export"
    assert export_main(["--workdir", wd, "--out", str(out)]) == 0
    exported = json.loads((out / "config.json").read_text())
    assert exported["preprocess"]["resize"] == [SIZE, SIZE]
    assert exported["preprocess"]["mean"] == list(MEAN)
    assert exported["preprocess"]["scale"] == pytest.approx(1 / 200)
    assert json.loads((out / "export_check.json").read_text())["passed"]
    # PP-ShiTu's deploy YAML with the model's own feeding, and the run as a PaddleClas YAML.
    from jaxrec.paddle.yaml_in import load_yaml, read_yaml
    from jaxrec.paddle.yaml_out import PADDLECLAS_YAML

    rec = read_yaml(out / "inference_rec.yaml")
    ops = {next(iter(op)): op[next(iter(op))] for op in rec["RecPreProcess"]["transform_ops"]}
    assert ops["ResizeImage"]["size"] == [SIZE, SIZE]
    assert ops["NormalizeImage"]["mean"] == list(MEAN)
    assert rec["Global"]["rec_inference_model_dir"] == str(out)
    assert resolve(load_yaml(out / PADDLECLAS_YAML)).preprocess == run.preprocess

    evaluator = RetrievalEvaluator.for_model(
        run.eval, build_model(run.model_arch(False)), make_mesh()
    )
    eval_feats = evaluator.features(restore_model(wd).variables, "query")
    paths = list(evaluator.query.paths)
    for model_dir in (load_model_dir(out), restore_model(wd)):
        feats, kept = extract_features(model_dir, paths)
        assert kept == paths
        np.testing.assert_allclose(feats, eval_feats, atol=1e-5)
    # Not vacuous: ImageNet normalization at the same size gives other features.
    from dataclasses import replace

    md = load_model_dir(out)
    other = replace(md.preprocess, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    feats, _ = extract_features(md, paths, preprocess=other)
    assert np.max(np.abs(feats - eval_feats)) > 1e-3
    jax.clear_caches()
