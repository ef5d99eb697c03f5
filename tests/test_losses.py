"""Losses against the real PaddleClas losses (fixtures from tools/golden_losses.py)."""

import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from jaxrec import losses
from jaxrec.config import resolve_losses
from jaxrec.errors import ConfigError

FIXTURE = Path(__file__).parent / "fixtures" / "loss_golden.npz"
GOLDEN = np.load(FIXTURE)
META = json.loads(str(GOLDEN["meta_json"]))

PPSHITU = META["ppshitu_0"]["config"]


def _build(entries):
    """The CombinedLoss of a Loss.Train list, resolved as a config's is."""
    return losses.build_loss(resolve_losses(entries))


def _one(name, **args):
    """One loss object with PaddleClas's defaults for the arguments not given."""
    return _build([{name: {"weight": 1.0, **args}}]).losses[0]


def _case(key):
    feats = jnp.asarray(GOLDEN[f"{key}/features"])
    logits = jnp.asarray(GOLDEN[f"{key}/logits"])
    labels = jnp.asarray(GOLDEN[f"{key}/labels"]).reshape(-1, 1)
    return feats, logits, labels


def _loss_and_grads(loss, key):
    feats, logits, labels = _case(key)
    params = loss.init(jax.random.key(0))
    if f"{key}/centers" in GOLDEN:
        params = {"CenterLoss": {"centers": jnp.asarray(GOLDEN[f"{key}/centers"])}}

    def total(f, z, p):
        return loss(p, {"features": f, "logits": z}, labels)

    (value, terms), grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True))(
        feats, logits, params
    )
    return value, terms, grads


@pytest.mark.parametrize("key", sorted(k for k in META if k != "spec53"))
def test_matches_paddleclas(key):
    cfg = META[key]["config"]
    expected = META[key]["values"]
    loss = _build(cfg)
    value, terms, (g_feat, g_logit, g_params) = _loss_and_grads(loss, key)
    assert set(terms) == set(expected)
    for name, ref in expected.items():
        np.testing.assert_allclose(float(terms[name]), ref, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(float(value), expected["loss"], rtol=1e-5)
    for name, got in (("grad_features", g_feat), ("grad_logits", g_logit)):
        ref = GOLDEN[f"{key}/{name}"] if f"{key}/{name}" in GOLDEN else np.zeros_like(got)
        scale = max(np.abs(ref).max(), 1e-12)
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5 * scale, err_msg=name)
    if f"{key}/grad_centers" in GOLDEN:
        ref = GOLDEN[f"{key}/grad_centers"]
        got = np.asarray(g_params["CenterLoss"]["centers"])
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_spec_53_worked_example():
    """Spec 5.3 numbers: triplet 0.335, CE 0.6521370, total 0.9871370 (and paddle's grads)."""
    loss = _build(PPSHITU)
    value, terms, (g_feat, g_logit, _) = _loss_and_grads(loss, "spec53")
    np.testing.assert_allclose(float(terms["TripletAngularMarginLoss"]), 0.335, rtol=1e-6)
    np.testing.assert_allclose(float(terms["CELoss"]), 0.6521370, rtol=1e-6)
    np.testing.assert_allclose(float(value), 0.9871370, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_feat), GOLDEN["spec53/grad_features"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_logit), GOLDEN["spec53/grad_logits"], atol=1e-6)
    tam = loss.losses[1]
    s_ap, s_an = tam.hard_pairs(GOLDEN["spec53/features"], GOLDEN["spec53/labels"])
    np.testing.assert_allclose(np.asarray(s_ap), [0.8, 0.8, 0.6, 0.6], atol=1e-6)
    np.testing.assert_allclose(np.asarray(s_an), [0.0, 0.6, 0.6, 0.36], atol=1e-6)


def test_ce_label_smoothing_formula():
    """q = (1-eps) onehot + eps/C, mean over the batch; eps outside (0, 1) disables smoothing."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, 5)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for eps in (0.1, 0.5):
        q = (1 - eps) * np.eye(7)[labels] + eps / 7
        expected = -(q * logp).sum(-1).mean()
        got = _one("CELoss", epsilon=eps)({}, {"logits": logits}, labels)
        np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    plain = -logp[np.arange(5), labels].mean()
    for eps in (None, 0.0, 1.0, 1.5, -0.1):
        got = _one("CELoss", epsilon=eps)({}, {"logits": logits}, labels[:, None])
        np.testing.assert_allclose(float(got), plain, rtol=1e-6)


def test_bf16_inputs_give_finite_float32_grads():
    feats, logits, labels = _case("ppshitu_0")
    loss = _build(PPSHITU)

    def total(f, z):
        return loss({}, {"features": f, "logits": z}, labels)[0]

    value, (gf, gz) = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(
        feats.astype(jnp.bfloat16), logits.astype(jnp.bfloat16)
    )
    assert value.dtype == jnp.float32
    assert gf.dtype == jnp.bfloat16 and gz.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(gf, np.float32)).all()
    assert np.isfinite(np.asarray(gz, np.float32)).all()
    np.testing.assert_allclose(float(value), META["ppshitu_0"]["values"]["loss"], rtol=2e-2)


def test_triplet_rows_without_negatives_or_unequal_positives():
    """Degenerate batches stay finite; unequal positives give the per-row answer."""
    tam = _one("TripletAngularMarginLoss", add_absolute=True, absolute_loss_weight=0.1)
    f = jnp.asarray(np.random.default_rng(1).standard_normal((4, 8)), jnp.float32)
    same = jnp.zeros((4,), jnp.int32)
    value, grad = jax.value_and_grad(lambda x: tam({}, {"features": x}, same))(f)
    s_ap, _ = tam.hard_pairs(f, same)
    # ranking term 0, absolute-negative term 1.0, absolute-positive term mean(max(0, 0.9 - s_ap)).
    expected = 0.1 * (1.0 + np.maximum(0.9 - np.asarray(s_ap), 0).mean())
    np.testing.assert_allclose(float(value), expected, rtol=1e-6)
    assert np.isfinite(np.asarray(grad)).all()

    labels = np.array([0, 0, 0, 1, 1, 2])
    f = np.random.default_rng(2).standard_normal((6, 8)).astype(np.float32)
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    sim = fn @ fn.T
    s_ap = np.array([sim[i, labels == labels[i]].min() for i in range(6)])
    s_an = np.array([sim[i, labels != labels[i]].max() for i in range(6)])
    expected = np.maximum(s_an - s_ap + 0.5, 0).mean()
    got = _one("TripletAngularMarginLoss")({}, {"features": f}, labels)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_shard_map_per_device_mean_then_pmean():
    """Each device mines its own sub-batch (as per-GPU PaddleClas); pmean of the device means."""
    n_dev = 8
    assert jax.device_count() >= n_dev
    loss = _build(PPSHITU)
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(16), 4).reshape(n_dev, 8)  # 2 ids x 4 per device
    feats = rng.standard_normal((n_dev * 8, 16)).astype(np.float32)
    logits = rng.standard_normal((n_dev * 8, 20)).astype(np.float32)
    labels = labels.reshape(-1)
    mesh = Mesh(np.array(jax.devices()[:n_dev]), ("data",))

    @partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(PartitionSpec("data"), PartitionSpec("data"), PartitionSpec("data")),
        out_specs=PartitionSpec(),
    )
    def sharded(f, z, y):
        total, _ = loss({}, {"features": f, "logits": z}, y)
        return jax.lax.pmean(total, "data")

    got, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(feats, logits, labels)

    def host_mean(f, z):
        total = 0.0
        for i in range(n_dev):
            part = slice(i * 8, (i + 1) * 8)
            total += loss({}, {"features": f[part], "logits": z[part]}, labels[part])[0]
        return total / n_dev

    want, want_grads = jax.value_and_grad(host_mean, argnums=(0, 1))(feats, logits)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


def test_build_loss_errors_and_single_loss_weight_ignored():
    logits = np.random.default_rng(4).standard_normal((3, 5)).astype(np.float32)
    labels = np.array([0, 1, 2])
    one = _build([{"CELoss": {"weight": 7.0}}])
    two = _build([{"CELoss": {"weight": 7.0}}, {"TripletLossV2": {"weight": 0.0}}])
    feats = np.eye(3, 4, dtype=np.float32)
    v1, t1 = one({}, {"logits": logits, "features": feats}, labels)
    v2, t2 = two({}, {"logits": logits, "features": feats}, labels)
    np.testing.assert_allclose(float(v1) * 7.0, float(v2), rtol=1e-6)
    assert set(t2) == {"CELoss", "TripletLossV2", "loss"}
    for entries, key in [
        (None, "Loss.Train"),
        ([], "Loss.Train"),
        ([{"CELoss": {"epsilon": 0.1}}], "Loss.Train[0].CELoss.weight"),
        ([{"FooLoss": {"weight": 1.0}}], "Loss.Train[0].FooLoss"),
        ([{"CELoss": {"weight": 1.0, "epsilom": 0.1}}], "Loss.Train[0].CELoss.epsilom"),
        ([{"CenterLoss": {"weight": 1.0, "num_classes": 5}}], "Loss.Train[0].CenterLoss.feat_dim"),
        ([{"CELoss": {"weight": 1.0, "reduction": "max"}}], "Loss.Train"),
        ([{"CELoss": {"weight": 1.0}}, {"CELoss": {"weight": 1.0}}], "Loss.Train"),
    ]:
        with pytest.raises(ConfigError) as err:
            resolve_losses(entries)
        assert err.value.key == key, (entries, str(err.value))
    with pytest.raises(KeyError, match="feature_from"):
        _build([{"TripletLossV2": {"weight": 1.0, "feature_from": "backbone"}}])(
            {}, {"features": feats}, labels
        )


def test_center_loss_init_and_clip():
    loss = _build([{"CenterLoss": {"weight": 1.0, "num_classes": 5, "feat_dim": 3}}])
    params = loss.init(jax.random.key(1))
    centers = params["CenterLoss"]["centers"]
    assert centers.shape == (5, 3)
    feats = np.asarray(centers)[[0, 2]]  # exactly on their centers
    value, _ = loss(params, {"features": feats}, np.array([0, 2]))
    # every clipped entry is 1e-12 (float32 rounding of |f|^2+|c|^2-2f.c may add ~1e-6)
    assert 0 <= float(value) < 1e-5


def test_build_loss_from_the_project_config():
    """configs/general_v2.py's Loss.Train, resolved with the whole config, is PP-ShiTuV2's."""
    import sys

    from jaxrec.config import resolve

    sys.path.insert(0, str(Path(__file__).parents[1] / "configs"))
    import general_v2

    cfg = general_v2.get_config()
    cfg.Arch.Backbone.pretrained = False  # no ImageNet weights to point Global.pretrained_model at
    specs = resolve(cfg).loss
    assert specs == resolve_losses(PPSHITU)
    loss = losses.build_loss(specs)
    assert loss.names == ["CELoss", "TripletAngularMarginLoss"]
    value, _, _ = _loss_and_grads(loss, "spec53")
    np.testing.assert_allclose(float(value), 0.9871370, rtol=1e-6)
