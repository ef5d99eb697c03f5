"""The class-sharded head against the replicated head: equal CE (epsilon 0.1) losses and
gradients for FC, ArcMargin, CosMargin and CircleMargin on 8 devices, with a class count that 8
does not divide, and in bfloat16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrec.losses import CELoss
from jaxrec.models.heads import ArcMargin, CircleMargin, CosMargin, FCHead
from jaxrec.parallel import AXIS, make_mesh
from jaxrec.training import sharded_head as sh

N_DEV, D, CLASSES, PER_DEV = 8, 16, 37, 4

HEADS = {
    "FC": lambda dt: FCHead(D, CLASSES, dtype=dt, name="head"),
    "FC_bias": lambda dt: FCHead(D, CLASSES, use_bias=True, dtype=dt, name="head"),
    "ArcMargin": lambda dt: ArcMargin(D, CLASSES, margin=0.2, scale=30.0, name="head"),
    "CosMargin": lambda dt: CosMargin(D, CLASSES, margin=0.35, scale=64.0, name="head"),
    "CircleMargin": lambda dt: CircleMargin(D, CLASSES, margin=0.25, scale=32.0, name="head"),
}


def _data(seed=0):
    rs = np.random.RandomState(seed)
    b = N_DEV * PER_DEV
    feats = rs.normal(size=(b, D)).astype(np.float32)
    labels = rs.randint(0, CLASSES, size=(b,)).astype(np.int32)
    labels[:3] = CLASSES - 1  # the last real class sits next to the padding
    return feats, labels


def _cos(a, b):
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _compare(name, dtype):
    head = HEADS[name](dtype)
    ce = CELoss(epsilon=0.1)
    feats, labels = _data()
    params = head.init(jax.random.PRNGKey(1), jnp.asarray(feats))["params"]
    if "fc" in params and "bias" in params["fc"]:
        params = {"fc": {**params["fc"], "bias": jnp.linspace(-0.5, 0.5, CLASSES)}}
    x = jnp.asarray(feats, dtype)

    def replicated(p, x):
        logits = head.apply({"params": p}, x, labels=labels, train=True)
        return ce({}, {"logits": logits.astype(jnp.float32)}, labels)

    ref_loss, (ref_gp, ref_gx) = jax.value_and_grad(replicated, argnums=(0, 1))(params, x)

    mesh = make_mesh(jax.devices()[:N_DEV])
    plan = sh.HeadPlan(head, CLASSES, sh.padded_classes(CLASSES, N_DEV), N_DEV, ce)
    padded = sh.pad_head({"model": {"head": params}}, plan)["model"]["head"]
    specs = jax.tree.map(lambda a: P(*([None] * (a.ndim - 1)), AXIS), padded)

    def per_device(hp, x, y):
        def f(hp, x):
            return sh.sharded_head_loss(plan, hp, x, y, dtype)

        loss, (gp, gx) = jax.value_and_grad(f, argnums=(0, 1))(hp, x)
        return loss, jax.tree.map(lambda g: g / N_DEV, gp), gx / N_DEV

    run = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(specs, P(AXIS), P(AXIS)),
            out_specs=(P(), specs, P(AXIS)),
            check_vma=False,
        )
    )
    loss, gp, gx = run(padded, x, jnp.asarray(labels))
    gp = jax.tree.map(lambda g: np.asarray(g)[..., :CLASSES], gp)
    pad_grads = jax.tree.map(lambda g: np.asarray(g)[..., CLASSES:], run(padded, x, labels)[1])
    return ref_loss, ref_gp, ref_gx, loss, gp, gx, pad_grads


@pytest.mark.parametrize("name", sorted(HEADS))
def test_sharded_head_equals_replicated_float32(name):
    ref_loss, ref_gp, ref_gx, loss, gp, gx, pad_grads = _compare(name, jnp.float32)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=2e-6)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(ref_gp), strict=True):
        assert a.shape == b.shape
        assert _cos(a, b) >= 0.99999
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-6)
    assert _cos(gx, ref_gx) >= 0.99999
    np.testing.assert_allclose(np.asarray(gx), np.asarray(ref_gx), rtol=1e-4, atol=1e-6)
    for g in jax.tree.leaves(pad_grads):  # padded classes: no gradient, no NaN
        assert np.all(g == 0.0)


@pytest.mark.parametrize("name", ["FC", "ArcMargin"])
def test_sharded_head_equals_replicated_bfloat16(name):
    ref_loss, ref_gp, ref_gx, loss, gp, gx, _ = _compare(name, jnp.bfloat16)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-3)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(ref_gp), strict=True):
        assert _cos(a, b) >= 0.999
    assert _cos(np.asarray(gx, np.float32), np.asarray(ref_gx, np.float32)) >= 0.999


def test_padded_classes_and_shardings():
    assert sh.padded_classes(192_612, 8) == 192_616
    assert sh.padded_classes(64, 8) == 64
    mesh = make_mesh(jax.devices()[:N_DEV])
    head = HEADS["ArcMargin"](jnp.float32)
    plan = sh.HeadPlan(head, CLASSES, sh.padded_classes(CLASSES, N_DEV), N_DEV, None)
    tree = {
        "params": {"model": {"head": {"weight": np.zeros((D, 40))}, "neck": {"b": np.zeros(3)}}},
        "opt_state": ({"trace": {"model": {"head": {"weight": np.zeros((D, 40))}}}},),
    }
    s = sh.state_shardings(tree, mesh, plan)
    assert s["params"]["model"]["head"]["weight"].spec == P(None, AXIS)
    assert s["opt_state"][0]["trace"]["model"]["head"]["weight"].spec == P(None, AXIS)
    assert s["params"]["model"]["neck"]["b"].spec == P()
