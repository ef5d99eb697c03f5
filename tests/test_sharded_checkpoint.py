"""Training with the class-sharded head on 8 devices (6 classes, padded to 8): the checkpoint
holds the padded, sharded arrays and says so; evaluate, export and convert --to-pdparams see the
real [embedding, 6] head; a replicated run (Global.shard_head False) resumes it (the padding is
cut) and ends where the all-sharded run ends."""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import numpy as np
import pytest
from train_data_util import make_tiny_dataset, tiny_config

from jaxrec.config import resolve
from jaxrec.paddle.pdparams import read_pdparams
from jaxrec.training import loop as trainer
from jaxrec.training.checkpoint import read_checkpoint, restore_variables

pytestmark = pytest.mark.slow

CLASSES = 6


def _cfg(data, epochs, shard=True):
    cfg = tiny_config(data, epochs=epochs)
    cfg.Optimizer.lr.warmup_epoch = 0
    cfg.Global.shard_head = shard
    cfg.Global.allow_config_change = True
    return cfg


@pytest.fixture(scope="module")
def runs():
    tmp = tempfile.TemporaryDirectory(prefix="jaxrec_shardck_")
    data = make_tiny_dataset(os.path.join(tmp.name, "data"), train_classes=CLASSES, per_class=8)
    sharded = os.path.join(tmp.name, "sharded")
    trainer.train(resolve(_cfg(data, 2)), sharded)
    # The same run resumed after its first epoch with the replicated head (same schedule).
    mixed = os.path.join(tmp.name, "mixed")
    shutil.copytree(sharded, mixed)
    spe = read_checkpoint(sharded)[2]["steps_per_epoch"]
    trainer.train(resolve(_cfg(data, 2, shard=False)), mixed, restore_step=spe)
    yield data, sharded, mixed, tmp.name
    tmp.cleanup()


def test_checkpoint_holds_the_real_head_for_readers(runs):
    _, sharded, _, _ = runs
    step, state, meta = read_checkpoint(sharded)
    assert meta["head_classes"] == CLASSES and meta["devices"] == 8
    assert any(f"head/fc/kernel [16, {CLASSES}]" in s for s in meta["signature"])
    assert state["params"]["model"]["head"]["fc"]["kernel"].shape == (16, CLASSES)
    trace = jax.tree.leaves(
        {
            k: v
            for k, v in jax.tree_util.tree_leaves_with_path(state["opt_state"])
            if "head" in jax.tree_util.keystr(k)
        }
    )
    assert trace and all(t.shape == (16, CLASSES) for t in trace)
    _, variables, vstep, _ = restore_variables(sharded, which="latest")
    assert vstep == step
    np.testing.assert_array_equal(
        variables["params"]["head"]["fc"]["kernel"],
        state["params"]["model"]["head"]["fc"]["kernel"],
    )


def test_convert_to_pdparams_and_export_from_a_sharded_run(runs, tmp_path):
    from jaxrec import convert
    from jaxrec.export import cli as export_cli

    _, sharded, _, _ = runs
    out = tmp_path / "m.pdparams"
    assert (
        convert.main(
            ["--to-pdparams", "--workdir", sharded, "--which", "latest", "--out", str(out)]
        )
        == 0
    )
    weights = read_pdparams(out)
    head = [v for k, v in weights.items() if k.startswith("head.")]
    assert [np.shape(h) for h in head] == [(16, CLASSES)]
    _, state, _ = read_checkpoint(sharded)
    np.testing.assert_array_equal(head[0], state["params"]["model"]["head"]["fc"]["kernel"])
    args = ["--workdir", sharded, "--out", str(tmp_path / "e"), "--which", "latest", "--no-onnx"]
    assert export_cli.main(args) == 0


def test_replicated_resume_of_a_sharded_checkpoint_matches(runs):
    _, sharded, mixed, _ = runs
    s1, a, _ = read_checkpoint(sharded)
    s2, b, meta = read_checkpoint(mixed)
    assert s1 == s2 and "head_classes" not in meta
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("devices", [3, 4, 5])
def test_restore_reshards_onto_another_device_count(runs, devices):
    """The 8-device checkpoint (6 classes padded to 8) restored for 3 (padding cut to 6), 4
    (8) and 5 devices (padded to 10): the real values are exact, the padding is zero."""
    from jaxrec.losses import build_loss
    from jaxrec.models import build_model
    from jaxrec.parallel import AXIS, make_mesh
    from jaxrec.training import sharded_head as sh
    from jaxrec.training.checkpoint import Checkpoints
    from jaxrec.training.optimizer import build_optimizer
    from jaxrec.training.train_step import abstract_state, init_params

    data, sharded, _, _ = runs
    run = resolve(_cfg(data, 2))
    model = build_model(run.arch, **run.model_options(training=True, axis_name=AXIS))
    loss = build_loss(list(run.loss))
    mesh = make_mesh(jax.devices()[:devices])
    plan, _ = sh.plan_head(model, loss, devices)
    size = (run.image_size, run.image_size, 3)
    params, stats = jax.eval_shape(lambda: init_params(model, loss, size, jax.random.PRNGKey(0)))
    tx, _ = build_optimizer(run.optim, 2, 2, params, stats)
    target = abstract_state(model, loss, tx, size, mesh, plan)
    ck = Checkpoints(sharded, 3, head_classes=CLASSES)
    try:
        state, meta = ck.restore(target)
    finally:
        ck.close()
    assert meta["devices"] == 8
    w = state.params["model"]["head"]["fc"]["kernel"]
    assert w.shape == (16, plan.padded) and w.sharding.spec == jax.sharding.PartitionSpec(
        None, AXIS
    )
    _, saved, _ = read_checkpoint(sharded)
    got = jax.tree.map(np.asarray, sh.unpad_head(jax.device_get(state.params), CLASSES))
    jax.tree.map(np.testing.assert_array_equal, got, saved["params"])
    assert not np.any(np.asarray(w)[:, CLASSES:])
    opt = sh.unpad_head(jax.device_get(state.opt_state), CLASSES)
    for x, y in zip(jax.tree.leaves(opt), jax.tree.leaves(saved["opt_state"]), strict=True):
        np.testing.assert_array_equal(x, y)
