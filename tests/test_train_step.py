"""The shard_map train step against a manual per-shard reference; schedule; decay masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_testutil import TinyLoss, TinyRec

from jaxrec.config import resolve
from jaxrec.data.preprocess import PixelNorm
from jaxrec.losses import build_loss
from jaxrec.models import build_model
from jaxrec.parallel import AXIS, global_batch, make_mesh
from jaxrec.training import optimizer as optim
from jaxrec.training import train_step as step_lib


def _setup(n_dev=8, per_dev=4, size=16, wd=1e-3, lr=0.1):
    mesh = make_mesh(jax.devices()[:n_dev])
    model, loss = TinyRec(), TinyLoss()
    sched = optax.constant_schedule(lr)
    params, stats = step_lib.init_params(model, loss, (size, size, 3), jax.random.PRNGKey(0))
    labels = optim.param_labels(params, stats)
    tx = optim.make_optimizer(sched, labels, momentum=0.9, weight_decay=wd)
    state = step_lib.create_state(params, stats, tx, mesh)
    rs = np.random.RandomState(0)
    b = n_dev * per_dev
    batch = {
        "image": rs.randint(0, 256, (b, size, size, 3)).astype(np.uint8),
        "label": np.repeat(np.arange(b // 2) % 5, 2).astype(np.int32),
    }
    return mesh, model, loss, tx, sched, state, batch


def _reference_step(model, loss, tx, state, batch, rng, n_dev):
    """Each shard processed independently (own BN stats, own mining); grads and stats averaged."""
    params = jax.device_get(state.params)
    stats = jax.device_get(state.batch_stats)
    grads, new_stats, losses = [], [], []
    images = np.split(batch["image"], n_dev)
    labels = np.split(batch["label"], n_dev)
    for i in range(n_dev):
        x = step_lib.to_model_input(jnp.asarray(images[i]), PixelNorm(), jnp.float32)
        key = jax.random.fold_in(rng, i)

        def f(p, x=x, y=labels[i], key=key):
            out, mut = model.apply(
                {"params": p["model"], "batch_stats": stats},
                x,
                labels=y,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": key},
            )
            total, _ = loss(p["loss"], out, jnp.asarray(y))
            return total, mut["batch_stats"]

        (loss_i, s), g = jax.value_and_grad(f, has_aux=True)(params)
        grads.append(g)
        new_stats.append(s)
        losses.append(loss_i)
    g = jax.tree.map(lambda *xs: sum(xs) / n_dev, *grads)
    s = jax.tree.map(lambda *xs: sum(xs) / n_dev, *new_stats)
    updates, _ = tx.update(g, jax.device_get(state.opt_state), params)
    return optax.apply_updates(params, updates), s, float(np.mean(losses))


def test_data_parallel_step_matches_per_shard_reference():
    mesh, model, loss, tx, sched, state, batch = _setup()
    step = step_lib.make_train_step(model, loss, tx, mesh, schedule=sched)
    rng = jax.random.PRNGKey(3)
    ref_params, ref_stats, ref_loss = _reference_step(model, loss, tx, state, batch, rng, 8)
    new_state, metrics = step(state, global_batch(mesh, batch), rng)
    assert int(new_state.step) == 1
    np.testing.assert_allclose(float(metrics["loss"]), ref_loss, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
        jax.device_get(new_state.params),
        ref_params,
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
        jax.device_get(new_state.batch_stats),
        ref_stats,
    )
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["lr"]) == pytest.approx(0.1)


def test_schedule_check_values():
    s = optim.cosine_warmup_schedule(0.06, steps_per_epoch=10, epochs=10, warmup_epoch=2)
    got = [float(s(t)) for t in (0, 1, 2, 20, 21)]
    np.testing.assert_allclose(got, [0.0, 0.003, 0.006, 0.06, 0.059977], atol=5e-7)
    assert float(s(100)) == pytest.approx(0.0, abs=1e-9)
    assert float(s(60)) == pytest.approx(0.03, abs=1e-7)  # half way through the cosine


def test_first_update_uses_lr_zero_and_momentum_semantics():
    sched = optim.cosine_warmup_schedule(0.06, 10, 10, 2)
    params = {"model": {"head": {"kernel": jnp.ones((2,))}}, "loss": {}}
    labels = optim.param_labels(params, {})
    tx = optim.make_optimizer(sched, labels, momentum=0.9, weight_decay=0.1)
    st = tx.init(params)
    g = {"model": {"head": {"kernel": jnp.full((2,), 0.5)}}, "loss": {}}
    u, st = tx.update(g, st, params)
    np.testing.assert_array_equal(u["model"]["head"]["kernel"], 0.0)  # lr(0) == 0
    u, st = tx.update(g, st, params)
    # v1 = 0.5 + 0.1*1 = 0.6; v2 = 0.9*0.6 + 0.6 = 1.14; update = -lr(1)*v2 = -0.003*1.14
    np.testing.assert_allclose(u["model"]["head"]["kernel"], -0.003 * 1.14, rtol=1e-6)


def test_weight_decay_labels():
    mesh, model, loss, tx, sched, state, batch = _setup(n_dev=1)
    labels = optim.param_labels(state.params, state.batch_stats)
    m = labels["model"]
    assert m["backbone"]["bn"]["scale"] == "no_decay" and m["backbone"]["bn"]["bias"] == "no_decay"
    assert m["backbone"]["conv"]["kernel"] == "decay"
    assert m["backbone"]["last_conv"]["bias"] == "decay"
    assert m["neck"]["feat_bn"]["scale"] == "decay"
    assert m["neck"]["feat_bn"]["bias"] == "frozen"
    assert m["head"]["kernel"] == "decay"
    rep = {
        "model": {
            "backbone": {
                "blk": {
                    "dw_conv": {"kernel": 0, "bias": 0},
                    "dw_conv_list_0": {"conv": {"kernel": 0}},
                }
            }
        }
    }
    lab = optim.param_labels(rep, {})
    assert lab["model"]["backbone"]["blk"]["dw_conv"]["kernel"] == "no_decay"
    assert lab["model"]["backbone"]["blk"]["dw_conv_list_0"]["conv"]["kernel"] == "decay"


def test_frozen_neck_bias_never_moves_and_bn_scale_not_decayed():
    mesh, model, loss, tx, sched, state, batch = _setup(n_dev=2, wd=0.5)
    step = step_lib.make_train_step(model, loss, tx, mesh)
    gb = global_batch(mesh, {k: v[:8] for k, v in batch.items()})
    s = state
    for i in range(3):
        s, _ = step(s, gb, jax.random.PRNGKey(i))
    np.testing.assert_array_equal(s.params["model"]["neck"]["feat_bn"]["bias"], 0.0)
    assert not np.allclose(s.params["model"]["neck"]["feat_bn"]["scale"], 1.0)


@pytest.mark.slow
def test_bf16_mixed_precision_step_keeps_float32_params():
    from train_data_util import tiny_config

    cfg = tiny_config({"root": ".", "train": "", "eval": "", "num_classes": 4})
    cfg.AMP.use_amp = True
    run = resolve(cfg)
    assert run.compute_dtype == "bfloat16" and run.eval.compute_dtype == "float32"
    mesh = make_mesh(jax.devices()[:2])
    model = build_model(run.model_arch(training=True, axis_name=AXIS))
    loss = build_loss(list(run.loss))
    params, stats = step_lib.init_params(model, loss, (32, 32, 3), jax.random.PRNGKey(0))
    tx, sched = optim.build_optimizer(run.optim, 10, run.loop.epochs, params, stats)
    state = step_lib.create_state(params, stats, tx, mesh)
    step = step_lib.make_train_step(
        model, loss, tx, mesh, schedule=sched, compute_dtype=jnp.dtype(run.compute_dtype)
    )
    rs = np.random.RandomState(0)
    batch = {
        "image": rs.randint(0, 256, (8, 32, 32, 3)).astype(np.uint8),
        "label": np.repeat(np.arange(4), 2).astype(np.int32),
    }
    new, m = step(state, global_batch(mesh, batch), jax.random.PRNGKey(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.batch_stats))
    assert np.isfinite(float(m["loss"])) and float(m["loss"]) > 0


def test_state_is_donated():
    """The step reuses the state's buffers: the passed-in state is consumed (no second copy of
    parameters and optimizer state on the device)."""
    mesh, model, loss, tx, sched, state, batch = _setup(n_dev=2)
    step = step_lib.make_train_step(model, loss, tx, mesh)
    gb = global_batch(mesh, {k: v[:8] for k, v in batch.items()})
    leaf = jax.tree.leaves(state.params)[0]
    new, _ = step(state, gb, jax.random.PRNGKey(0))
    assert leaf.is_deleted()
    assert not jax.tree.leaves(new.params)[0].is_deleted()
