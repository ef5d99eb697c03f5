"""End-to-end training on a tiny real-image dataset: loss goes down, eval, checkpoints, logs,
resume-config checks, evaluate_workdir (read-only, also with a damaged best checkpoint), NaN
stop with the last good checkpoint."""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile

import jax
import numpy as np
import pytest
from train_data_util import make_tiny_dataset, tiny_config

from jaxrec.config import config_diff, from_plain, to_plain
from jaxrec.errors import CheckpointMismatchError, ConfigChangedError, TrainingDivergedError
from jaxrec.evaluate import evaluate_workdir
from jaxrec.training import loop as trainer
from jaxrec.training import tensorboard as logging_lib
from jaxrec.training.checkpoint import Checkpoints, read_checkpoint
from jaxrec.training.workdir import Workdir

pytestmark = pytest.mark.slow


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
    metrics = trainer.train(cfg, workdir)
    yield data, cfg, workdir, metrics
    tmp.cleanup()


def test_training_reduces_loss_and_logs(trained):
    _, cfg, workdir, metrics = trained
    events = glob.glob(os.path.join(Workdir(workdir).tensorboard, "events.out.tfevents.*"))
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
    saved = json.loads(Workdir(workdir).config.read_text())
    assert saved == to_plain(cfg) or config_diff(saved, to_plain(cfg)) == []
    ck = Checkpoints(workdir)
    try:
        assert ck.steps("latest")[-1] == 8
        assert len(ck.steps("best")) == 1 and ck.steps("best")[0] in (4, 8)
    finally:
        ck.close()


def test_rerun_finished_run_is_a_noop_and_config_change_is_an_error(trained):
    _, cfg, workdir, metrics = trained
    again = trainer.train(cfg, workdir)  # resumes at the end: nothing to do
    assert again == metrics
    other = from_plain(to_plain(cfg))
    other.Optimizer.lr.learning_rate = 0.5
    with pytest.raises(ConfigChangedError, match="Optimizer.lr.learning_rate"):
        trainer.train(other, workdir)


def test_mismatched_checkpoint_is_a_clear_error(trained):
    _, cfg, workdir, _ = trained
    other = from_plain(to_plain(cfg))
    other.Arch.Backbone.class_expand = 8
    other.Arch.Neck.num_features = 8
    other.Arch.Head.embedding_size = 8
    other.Global.allow_config_change = True
    with pytest.warns(UserWarning, match="changed config"):
        with pytest.raises(CheckpointMismatchError, match="does not match the model"):
            trainer.train(other, workdir)


def test_evaluate_workdir(trained, tmp_path):
    _, _, workdir, metrics = trained
    res = evaluate_workdir(workdir, which="latest", output=str(tmp_path), num_visualize=2)
    assert res["step"] == 8
    assert res["metrics"] == pytest.approx(metrics, abs=1e-6)
    assert json.load(open(res["json"]))["metrics"] == pytest.approx(metrics, abs=1e-6)
    assert res["png"] is not None and os.path.getsize(res["png"]) > 0


def _listing(root: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )


def test_evaluate_with_unreadable_best_falls_back_and_moves_nothing(trained, tmp_path):
    import shutil

    _, _, workdir, _ = trained
    wd = str(tmp_path / "run")
    shutil.copytree(workdir, wd, ignore=shutil.ignore_patterns("eval"))
    (best,) = [d for d in os.listdir(Workdir(wd).checkpoints("best")) if d.isdigit()]
    for d, _, files in os.walk(Workdir(wd).checkpoint("best", int(best)) / "state"):
        for f in files:
            with open(os.path.join(d, f), "wb") as fh:
                fh.write(b"\x00truncated")
    before = _listing(wd)
    with pytest.warns(UserWarning, match=f"best/{best}.* is unreadable.*using .*checkpoints/8"):
        res = evaluate_workdir(wd, output=str(tmp_path / "out"), num_visualize=0)
    assert res["step"] == 8 and "checkpoints step 8" in res["source"]
    assert _listing(wd) == before  # nothing moved, renamed or deleted


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    data = make_tiny_dataset(str(tmp_path / "d"), train_classes=4, per_class=8)
    cfg = tiny_config(data, epochs=5)
    cfg.Optimizer.lr.warmup_epoch = 0
    cfg.Optimizer.lr.learning_rate = 1e6
    wd = str(tmp_path / "w")
    with pytest.raises(TrainingDivergedError, match=r"NaN/inf at step (\d+)") as err:
        trainer.train(cfg, wd)
    msg = str(err.value)
    bad = int(msg.split("NaN/inf at step ")[1].split()[0])
    # The log counts steps the same way: the last logged step is the one before.
    logged = [int(m) for m in re.findall(r" step (\d+): ", capsys.readouterr().out)]
    assert logged and logged[-1] == bad - 1
    steps = Checkpoints(wd).steps("latest")
    assert all(s < bad for s in steps)  # nothing diverged was saved
    if steps:
        assert f"The last good checkpoint is step {steps[-1]}" in msg
        _, state, meta = read_checkpoint(wd)
        big = meta["param_max_abs"]
        assert np.isfinite(big) and f"largest |parameter| {big:.3g}" in msg
        if big > 1e4:
            assert "likely diverge again" in msg
    else:
        assert "No checkpoint was saved before it" in msg


def test_two_runs_with_several_loader_threads_are_bitwise_equal(tmp_path):
    """Nothing in the pipeline depends on thread timing: same seed, same machine, equal bits."""
    data = make_tiny_dataset(str(tmp_path / "d"), train_classes=4, per_class=8)
    states = []
    for name in ("a", "b"):
        cfg = tiny_config(data, epochs=2)
        cfg.DataLoader.Train.loader.num_workers = 4
        cfg.Global.checkpoint_every_steps = 0
        trainer.train(cfg, str(tmp_path / name))
        step, state, meta = read_checkpoint(str(tmp_path / name))
        states.append((step, state, meta["loader"]))
    (s1, a, la), (s2, b, lb) = states
    assert s1 == s2 and la == lb
    la_, ta = jax.tree.flatten(a)
    lb_, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la_, lb_, strict=True):
        np.testing.assert_array_equal(x, y)


def test_prepared_set_with_on_device_augmentation_resumes_exactly(tmp_path):
    """The accelerator path (prepared shards, augmentation inside the step) is deterministic in
    (seed, step): a run cut after its first checkpoint and resumed ends bit-identical."""
    import shutil

    from jaxrec import prepare

    data = make_tiny_dataset(str(tmp_path / "d"), train_classes=4, per_class=8)
    prep = str(tmp_path / "prep")
    assert prepare.main(["--list", data["train"], "--out", prep, "--size", "32", "--quiet"]) == 0
    cfg = tiny_config(data, epochs=2)
    cfg.DataLoader.Train.dataset.name = "PreparedDataset"
    cfg.DataLoader.Train.dataset.prepared_dir = prep
    cfg.DataLoader.Train.augment_on_device = True
    ref = str(tmp_path / "ref")
    trainer.train(cfg, ref)
    cut = str(tmp_path / "cut")
    shutil.copytree(ref, cut)
    ck = str(Workdir(cut).checkpoints("latest"))
    first = min(int(d) for d in os.listdir(ck) if d.isdigit())
    for d in os.listdir(ck):
        if d.isdigit() and int(d) > first:
            shutil.rmtree(os.path.join(ck, d))  # as if killed right after the first checkpoint
    shutil.rmtree(Workdir(cut).checkpoints("best"), ignore_errors=True)
    trainer.train(cfg, cut)
    (s1, a, _), (s2, b, _) = read_checkpoint(ref), read_checkpoint(cut)
    assert s1 == s2 > first
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_restore_step_moves_later_checkpoints_aside_and_resumes(tmp_path):
    import shutil

    data = make_tiny_dataset(str(tmp_path / "d"), train_classes=4, per_class=8)
    cfg = tiny_config(data, epochs=2)
    ref = str(tmp_path / "ref")
    trainer.train(cfg, ref)
    wd = str(tmp_path / "again")
    shutil.copytree(ref, wd)
    steps = Checkpoints(wd).steps("latest")
    trainer.train(cfg, wd, restore_step=steps[0])
    ck = str(Workdir(wd).checkpoints("latest"))
    assert all(os.path.isdir(os.path.join(ck, f"{s}.discarded")) for s in steps[1:])
    (s1, a, _), (s2, b, _) = read_checkpoint(ref), read_checkpoint(wd)
    assert s1 == s2
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(CheckpointMismatchError, match="--restore_step 999: no such checkpoint"):
        trainer.train(cfg, wd, restore_step=999)
