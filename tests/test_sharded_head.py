"""The class-sharded head against the replicated head: equal CE (epsilon 0.1) losses and
gradients for FC, ArcMargin, CosMargin and CircleMargin on 8 devices, with a class count that 8
does not divide, and in bfloat16."""

from __future__ import annotations

import functools

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
_INIT = jax.nn.initializers.lecun_normal()

HEADS = {
    "FC": lambda dt: FCHead(D, CLASSES, False, _INIT, dtype=dt, name="head"),
    "FC_bias": lambda dt: FCHead(D, CLASSES, True, _INIT, dtype=dt, name="head"),
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
    ce = CELoss(epsilon=0.1, reduction="mean")
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


# --------------------------------------------------------------------------------------------
# The full train step: sharded and replicated heads from the same initial state.


def _step_arch(head: dict) -> dict:
    arch = {
        "name": "RecModel",
        "Backbone": {
            "name": "PPLCNetV2_base_ShiTu",
            "class_expand": D,
            "scale": 0.25,
            "depths": [1, 1, 1, 1],
            "dropout_prob": 0.2,
        },
        "BackboneStopLayer": {"name": "flatten"},
        "Neck": {"name": "BNNeck", "num_features": D},
        "Head": {"embedding_size": D, "class_num": CLASSES, **head},
    }
    return arch


def _two_steps(head: dict, dtype: str, sharded: bool):
    import optax

    from jaxrec.config import resolve_arch, resolve_losses
    from jaxrec.losses import build_loss
    from jaxrec.models import build_model
    from jaxrec.parallel import global_batch
    from jaxrec.training import optimizer as optim
    from jaxrec.training import train_step as step_lib

    mesh = make_mesh(jax.devices()[:N_DEV])
    model = build_model(resolve_arch(_step_arch(head)), dtype=dtype)
    loss = build_loss(
        resolve_losses(
            [
                {"CELoss": {"weight": 1.0, "epsilon": 0.1}},
                {"TripletAngularMarginLoss": {"weight": 1.0, "margin": 0.5, "add_absolute": True}},
            ]
        )
    )
    size = 16
    params, stats = step_lib.init_params(model, loss, (size, size, 3), jax.random.PRNGKey(0))
    sched = optax.constant_schedule(0.05)
    tx = optim.make_optimizer(sched, optim.param_labels(params, stats), weight_decay=1e-4)
    plan = sh.plan_head(model, loss, N_DEV, enabled=sharded)[0]
    assert (plan is not None) == sharded
    state = step_lib.create_state(params, stats, tx, mesh, plan)
    step = step_lib.make_train_step(
        model, loss, tx, mesh, compute_dtype=jnp.dtype(dtype), head_plan=plan
    )
    rs = np.random.RandomState(0)
    b = N_DEV * PER_DEV
    all_metrics = []
    for i in range(2):
        batch = {
            "image": rs.randint(0, 256, (b, size, size, 3)).astype(np.uint8),
            "label": np.repeat(rs.randint(0, CLASSES, b // 2), 2).astype(np.int32),
        }
        state, metrics = step(state, global_batch(mesh, batch), jax.random.PRNGKey(i))
        all_metrics.append(jax.device_get(metrics))
    if plan is not None:
        head = state.params["model"]["head"]
        assert jax.tree.leaves(head)[0].sharding.spec[-1] == AXIS
    host = jax.device_get(state)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x[..., :CLASSES] if "head" in str(p) else x, host.params
    )
    return all_metrics, params, host.batch_stats


@functools.cache
def _cached_steps(head: tuple, dtype: str, sharded: bool):
    return _two_steps(dict(head), dtype, sharded)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.mark.slow
@pytest.mark.parametrize(
    "head", [(("name", "FC"),), (("name", "ArcMargin"), ("margin", 0.2), ("scale", 30.0))]
)
def test_train_step_sharded_equals_replicated(head):
    m_rep, p_rep, s_rep = _cached_steps(head, "float32", False)
    m_sh, p_sh, s_sh = _cached_steps(head, "float32", True)
    for i, (a, b) in enumerate(zip(m_sh, m_rep, strict=True)):
        assert a.keys() == b.keys()
        for k in a:  # the second step starts from parameters that differ by float rounding
            tol = 1e-5 if i == 0 else 2e-4
            np.testing.assert_allclose(float(a[k]), float(b[k]), rtol=tol, err_msg=f"{i} {k}")
    flat_sh = jax.tree_util.tree_flatten_with_path(p_sh)[0]
    for (path, a), b in zip(flat_sh, jax.tree.leaves(p_rep), strict=True):
        assert a.shape == b.shape, path
        if np.any(b):
            assert _cos(a, b) >= 0.99999, path
    for a, b in zip(jax.tree.leaves(s_sh), jax.tree.leaves(s_rep), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_train_step_sharded_equals_replicated_bfloat16():
    """bf16 tolerance, measured: the sharded bf16 run is at least as close to the replicated
    bf16 run as that is to the float32 run (bf16 rounding of the split matmul's partial sums
    is the only difference). Measured on this setup: first-step grad norm 73.04 sharded, 73.22
    replicated, 83.25 float32."""
    head = (("name", "FC"),)
    m_rep, p_rep, s_rep = _cached_steps(head, "bfloat16", False)
    m_sh, p_sh, s_sh = _cached_steps(head, "bfloat16", True)
    m_32, p_32, s_32 = _cached_steps(head, "float32", False)
    for k in m_rep[0]:
        np.testing.assert_allclose(float(m_sh[0][k]), float(m_rep[0][k]), rtol=1e-2, err_msg=k)
    for got, want, f32 in ((p_sh, p_rep, p_32), (s_sh, s_rep, s_32)):
        got, want, f32 = _flat(got), _flat(want), _flat(f32)
        assert got.shape == want.shape
        assert np.linalg.norm(got - want) <= np.linalg.norm(want - f32)
        assert _cos(got, want) >= _cos(want, f32)
