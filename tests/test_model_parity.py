"""Parity of jaxrec's model with the real PaddleClas, through the .pdparams converter.

Fixtures come from `tools/golden_model.py` (run with the paddle venv): reduced-size reference
models (scale 0.125, depths [1,1,2,2]; every block type present) with random weights and random
BN running statistics, inputs 4x3x36x36, and the reference outputs.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.models import build_model, reparameterize
from jaxrec.paddle.convert import convert_pdparams
from jaxrec.paddle.naming import paddle_key

FIX = Path(__file__).parent / "fixtures"


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def shitu():
    gold = dict(np.load(FIX / "model_shitu.npz"))
    arch, variables, report = convert_pdparams(FIX / "model_shitu.pdparams", strict=True)
    x = jnp.asarray(gold["x"].transpose(0, 2, 3, 1))
    return gold, arch, variables, report, x


def test_shitu_arch_inferred_from_checkpoint(shitu):
    _, arch, _, report, _ = shitu
    assert arch["Backbone"] == {
        "name": "PPLCNetV2_base_ShiTu",
        "class_expand": 32,
        "scale": 0.125,
        "depths": [1, 1, 2, 2],
    }
    assert arch["Head"]["class_num"] == 10 and arch["Head"]["bias_attr"] is False
    assert report.ok
    # Fusion targets of the 4 rep blocks (stages.2.0, 2.1, 3.0, 3.1) are ignored, not loaded.
    assert sorted(report.ignored_fusion_targets) == sorted(
        f"backbone.stages.{b}.dw_conv.{t}"
        for b in ("2.0", "2.1", "3.0", "3.1")
        for t in ("weight", "bias")
    )


def test_shitu_eval_matches_paddle(shitu):
    gold, arch, variables, _, x = shitu
    model = build_model(arch)
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert set(out) == {"backbone", "neck", "features", "logits"}
    for key in ("backbone", "neck", "features", "logits"):
        assert out[key].shape == gold[f"eval_{key}"].shape
        assert rel_err(out[key], gold[f"eval_{key}"]) < 1e-4, key


def test_shitu_train_mode_matches_paddle(shitu):
    """BN batch statistics, running-stat updates (momentum 0.9) and labels; dropout p=0 on both
    sides (see tools/golden_model.py)."""
    gold, arch, variables, _, x = shitu
    arch = dict(arch, Backbone=dict(arch["Backbone"], dropout_prob=0.0))
    model = build_model(arch)
    labels = jnp.asarray(gold["label"])  # [N, 1] as the Paddle engine passes them
    out, updates = jax.jit(
        lambda v, x, y: model.apply(v, x, labels=y, train=True, mutable=["batch_stats"])
    )(variables, x, labels)
    for key in ("backbone", "features", "logits"):
        assert rel_err(out[key], gold[f"train_{key}"]) < 1e-4, key
    flat = jax.tree_util.tree_flatten_with_path(updates["batch_stats"])[0]
    assert len(flat) == sum(k.startswith("stat_") for k in gold)
    for kp, leaf in flat:
        key = paddle_key("batch_stats", tuple(k.key for k in kp))
        assert rel_err(leaf, gold[f"stat_{key}"]) < 1e-4, key


def test_shitu_train_gradients_match_paddle(shitu):
    """d/dparams of sum(logits*R1) + sum(features*R2) in train mode (dropout p=0)."""
    gold, arch, variables, _, x = shitu
    from jaxrec.paddle.naming import jaxrec_path, to_paddle_layout

    arch = dict(arch, Backbone=dict(arch["Backbone"], dropout_prob=0.0))
    model = build_model(arch)
    r1, r2 = jnp.asarray(gold["grad_r_logits"]), jnp.asarray(gold["grad_r_features"])

    def scalar(params):
        out, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            labels=jnp.asarray(gold["label"]),
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(out["logits"] * r1) + jnp.sum(out["features"] * r2)

    grads = jax.jit(jax.grad(scalar))(variables["params"])
    keys = [
        k[len("grad_") :] for k in gold if k.startswith("grad_") and not k.startswith("grad_r_")
    ]
    assert len(keys) == 12
    for key in keys:
        want = gold[f"grad_{key}"]
        _, path = jaxrec_path(key, want.ndim)
        node = grads
        for name in path:
            node = node[name]
        assert rel_err(to_paddle_layout(np.asarray(node), path), want) < 1e-4, key


def test_shitu_deploy_matches_paddle_reparameterized(shitu):
    gold, arch, variables, _, x = shitu
    model = build_model(dict(arch, deploy=True))
    out = jax.jit(lambda v, x: model.apply(v, x))(reparameterize(variables), x)
    for key in ("backbone", "features", "logits"):
        assert rel_err(out[key], gold[f"deploy_{key}"]) < 1e-4, key


def test_dropout_semantics_match_paddle(shitu):
    """downscale_in_infer: eval multiplies by 0.8, train zeroes without rescale."""
    gold, *_ = shitu
    from jaxrec.models.layers import DownscaleInInferDropout

    ones = jnp.ones((64, 32))
    drop = DownscaleInInferDropout(0.2)
    ev = drop.apply({}, ones, train=False)
    np.testing.assert_array_equal(np.asarray(ev), gold["dropout_eval_ones"])
    tr = np.asarray(drop.apply({}, ones, train=True, rngs={"dropout": jax.random.PRNGKey(0)}))
    assert set(np.unique(tr)) == set(np.unique(gold["dropout_train_ones"])) == {0.0, 1.0}
    assert abs(tr.mean() - 0.8) < 0.03 and abs(gold["dropout_train_ones"].mean() - 0.8) < 0.03


def test_imagenet_classifier_matches_paddle():
    gold = np.load(FIX / "model_imagenet.npz")
    x = jnp.asarray(np.load(FIX / "model_shitu.npz")["x"].transpose(0, 2, 3, 1))
    arch, variables, report = convert_pdparams(
        FIX / "model_imagenet.pdparams", target="imagenet", strict=True
    )
    assert arch["name"] == "PPLCNetV2" and arch["class_num"] == 7 and arch["class_expand"] == 48
    model = build_model(arch)
    out = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
    assert rel_err(out["logits"], gold["eval_logits"]) < 1e-4
    model0 = build_model(dict(arch, dropout_prob=0.0))
    out, _ = jax.jit(lambda v, x: model0.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    assert rel_err(out["logits"], gold["train_logits"]) < 1e-4


@pytest.mark.parametrize(
    "name,cfg",
    [
        ("arc", {"name": "ArcMargin"}),
        ("arc_easy", {"name": "ArcMargin", "margin": 0.3, "scale": 30.0, "easy_margin": True}),
        ("cos", {"name": "CosMargin"}),
        ("circle", {"name": "CircleMargin", "margin": 0.25, "scale": 32.0}),
    ],
)
def test_margin_heads_match_paddle(name, cfg):
    from jaxrec.models.recmodel import _build_head

    gold = np.load(FIX / "model_heads.npz")
    feats, label = jnp.asarray(gold["features"]), jnp.asarray(gold["label"])
    w = gold[f"{name}_weight"]
    head = _build_head({**cfg, "embedding_size": w.shape[0], "class_num": w.shape[1]}, jnp.float32)
    params = {"params": {"weight": jnp.asarray(w)}}
    ev = head.apply(params, feats, label, train=False)
    assert rel_err(ev, gold[f"{name}_eval"]) < 1e-5
    tr = head.apply(params, feats, label, train=True)
    # sqrt(1 - cos^2 + 1e-6) amplifies float32 rounding where |cos| ~ 1 (rows 0 and 1).
    assert rel_err(tr, gold[f"{name}_train"]) < 1e-4
    tr1 = head.apply(params, feats, label.reshape(-1), train=True)  # [N] labels too
    np.testing.assert_array_equal(np.asarray(tr), np.asarray(tr1))
