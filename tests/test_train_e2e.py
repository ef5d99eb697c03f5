"""End-to-end training on a tiny real-image dataset: loss goes down, eval, checkpoints, logs,
resume-config checks, evaluate_workdir, NaN stop."""

from __future__ import annotations

import glob
import json
import os
import tempfile

import numpy as np
import pytest
from train_data_util import make_tiny_dataset, tiny_config

from jaxrec import config_lib, logging_lib, train_lib


@pytest.fixture(scope="module")
def trained():
    tmp = tempfile.TemporaryDirectory(prefix="jaxrec_e2e_")
    root = os.path.join(tmp.name, "data")
    data = make_tiny_dataset(root, train_classes=4, per_class=16)
    cfg = tiny_config(data, epochs=4)
    cfg.Optimizer.lr.warmup_epoch = 0
    cfg.Optimizer.lr.learning_rate = 0.1
    cfg.Global.eval_during_train = True
    cfg.Global.eval_interval = 2
    workdir = os.path.join(tmp.name, "run")
    metrics = train_lib.train_and_evaluate(cfg, workdir)
    yield data, cfg, workdir, metrics
    tmp.cleanup()


def test_training_reduces_loss_and_logs(trained):
    _, cfg, workdir, metrics = trained
    events = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert len(events) == 1
    scalars = logging_lib.read_scalars(events[0])
    loss = [v for _, tag, v in sorted(scalars) if tag == "train/loss"]
    assert len(loss) == 8  # 2 steps/epoch x 4 epochs, logged every step
    ce = [v for _, tag, v in sorted(scalars) if tag == "train/CELoss"]
    assert np.mean(loss[-3:]) < np.mean(loss[:3]), loss
    assert np.mean(ce[-3:]) < np.mean(ce[:3]), ce
    tags = {tag for _, tag, _ in scalars}
    assert {
        "train/CELoss",
        "train/TripletAngularMarginLoss",
        "train/lr",
        "train/grad_norm",
        "train/img_per_sec",
        "eval/recall1",
        "eval/mAP",
    } <= tags
    assert set(metrics) >= {"recall1", "recall5", "mAP"}
    assert 0.0 <= metrics["recall1"] <= 1.0


def test_checkpoints_config_and_best(trained):
    _, cfg, workdir, _ = trained
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert (
        saved == config_lib.to_plain(cfg)
        or config_lib.config_diff(saved, config_lib.to_plain(cfg)) == []
    )
    ck = train_lib.Checkpoints(workdir)
    try:
        assert ck.steps("latest")[-1] == 8
        assert len(ck.steps("best")) == 1 and ck.steps("best")[0] in (4, 8)
    finally:
        ck.close()


def test_rerun_finished_run_is_a_noop_and_config_change_is_an_error(trained):
    _, cfg, workdir, metrics = trained
    again = train_lib.train_and_evaluate(cfg, workdir)  # resumes at the end: nothing to do
    assert again == metrics
    other = config_lib.from_plain(config_lib.to_plain(cfg))
    other.Optimizer.lr.learning_rate = 0.5
    with pytest.raises(train_lib.ConfigMismatchError, match="Optimizer.lr.learning_rate"):
        train_lib.train_and_evaluate(other, workdir)


def test_mismatched_checkpoint_is_a_clear_error(trained):
    _, cfg, workdir, _ = trained
    other = config_lib.from_plain(config_lib.to_plain(cfg))
    other.Arch.Backbone.class_expand = 8
    other.Arch.Neck.num_features = 8
    other.Arch.Head.embedding_size = 8
    other.Global.allow_config_change = True
    with pytest.warns(UserWarning, match="changed config"):
        with pytest.raises(train_lib.CheckpointMismatchError, match="does not match the model"):
            train_lib.train_and_evaluate(other, workdir)


def test_evaluate_workdir(trained, tmp_path):
    _, _, workdir, metrics = trained
    res = train_lib.evaluate_workdir(workdir, which="latest", output=str(tmp_path), num_visualize=2)
    assert res["step"] == 8
    assert res["metrics"] == pytest.approx(metrics, abs=1e-6)
    assert json.load(open(res["json"]))["metrics"] == pytest.approx(metrics, abs=1e-6)
    if res["png"] is not None:
        assert os.path.getsize(res["png"]) > 0


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    data = make_tiny_dataset(str(tmp_path / "d"), train_classes=4, per_class=8)
    cfg = tiny_config(data, epochs=2)
    cfg.Optimizer.lr.warmup_epoch = 0
    cfg.Optimizer.lr.learning_rate = 1e30
    with pytest.raises(train_lib.TrainingDivergedError, match="non-finite") as err:
        train_lib.train_and_evaluate(cfg, str(tmp_path / "w"))
    assert "last good checkpoint" in str(err.value) or "no checkpoint yet" in str(err.value)
