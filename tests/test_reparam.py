"""BN folding (jaxrec.models.fold): reparameterize() gives the deploy form (ref §2.6) and
fold_variables() the BN-folded form; both are exact in eval."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_testutil import build

from jaxrec.models import (
    abstract_variables,
    count_params,
    fold_variables,
    init_variables,
    reparameterize,
)
from jaxrec.models.fold import fuse_branches
from jaxrec.models.layers import RepDepthwiseSeparable


def randomize(variables, seed):
    """Random params and random (positive-variance) BN statistics."""
    rng = np.random.default_rng(seed)

    def draw(kp, a):
        name = kp[-1].key
        if name == "var":
            return rng.uniform(0.5, 2.0, a.shape).astype(np.float32)
        if name in ("mean", "bias"):
            return rng.normal(0.0, 0.2, a.shape).astype(np.float32)
        if name == "scale":
            return rng.uniform(0.5, 1.5, a.shape).astype(np.float32)
        fan_in = int(np.prod(a.shape[:-1])) or 1
        return rng.normal(0.0, (2.0 / fan_in) ** 0.5, a.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, variables)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# The ImageNet form (stride-2 stage 4) is covered block-wise by test_single_block_fusion.
ARCHS = {
    "shitu": {
        "name": "RecModel",
        "Backbone": {
            "name": "PPLCNetV2_base_ShiTu",
            "scale": 0.125,
            "depths": [1, 1, 2, 2],
            "class_expand": 16,
        },
        "BackboneStopLayer": {"name": "flatten"},
        "Neck": {"name": "BNNeck", "num_features": 16},
        "Head": {"name": "FC", "embedding_size": 16, "class_num": 5},
    },
}


@pytest.mark.parametrize("which", sorted(ARCHS))
def test_fused_model_matches_multi_branch(which):
    arch = ARCHS[which]
    model, dmodel = build(arch), build(arch, deploy=True)
    v = randomize(init_variables(model), seed=3)
    before = copy.deepcopy(jax.tree_util.tree_map(np.asarray, v))
    dv = reparameterize(v)
    # pure: input untouched
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, v)
    # the result has exactly the deploy model's variable tree
    want = abstract_variables(dmodel)
    assert jax.tree_util.tree_structure(dv) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(dv), jax.tree_util.tree_leaves(want), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 40, 40, 3))
    out = jax.jit(lambda v, x: model.apply(v, x))(v, x)
    dout = jax.jit(lambda v, x: dmodel.apply(v, x))(dv, x)
    for key in out:
        assert rel_err(dout[key], out[key]) < 1e-5, key


@pytest.mark.parametrize("stride", [1, 2])
def test_single_block_fusion(stride):
    kw = dict(in_channels=8, out_channels=8, stride=stride, dw_size=5, use_rep=True)
    blk, dblk = RepDepthwiseSeparable(**kw), RepDepthwiseSeparable(**kw, deploy=True)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 9, 8))
    v = randomize(jax.jit(blk.init)(jax.random.key(0, impl="rbg"), x), seed=stride)
    n_branches = sum(k.startswith("dw_conv_list") for k in v["params"])
    assert n_branches == (3 if stride == 1 else 2)  # 1x1 branch only at stride 1
    dv = reparameterize(v)
    fused = jax.jit(lambda v, x: dblk.apply(v, x))(dv, x)
    multi = jax.jit(lambda v, x: blk.apply(v, x))(v, x)
    assert rel_err(fused, multi) < 1e-5


def test_fuse_branches_formula():
    """1x1 lands at the centre tap, 3x3 in the middle of 5x5; BN folds as W*t, b - mean*t."""
    c = 2
    rng = np.random.default_rng(0)
    params, stats = {}, {}
    for i, k in enumerate((5, 3, 1)):
        params[f"dw_conv_list_{i}"] = {
            "conv": {"kernel": rng.normal(size=(k, k, 1, c)).astype(np.float32)},
            "bn": {"scale": rng.uniform(0.5, 1.5, c), "bias": rng.normal(size=c)},
        }
        stats[f"dw_conv_list_{i}"] = {
            "bn": {"mean": rng.normal(size=c), "var": rng.uniform(0.5, 2, c)}
        }
    kernel, bias = fuse_branches(params, stats)
    want_k = np.zeros((5, 5, 1, c))
    want_b = np.zeros(c)
    for i, k in enumerate((5, 3, 1)):
        p, s = params[f"dw_conv_list_{i}"], stats[f"dw_conv_list_{i}"]["bn"]
        t = p["bn"]["scale"] / np.sqrt(s["var"] + 1e-5)
        o = (5 - k) // 2
        want_k[o : o + k, o : o + k] += p["conv"]["kernel"] * t
        want_b += p["bn"]["bias"] - s["mean"] * t
    np.testing.assert_allclose(np.asarray(kernel), want_k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bias), want_b, rtol=1e-5, atol=1e-6)


def test_reparameterize_without_rep_blocks_is_identity():
    v = {
        "params": {"a": {"conv": {"kernel": jnp.ones((3, 3, 1, 2))}}},
        "batch_stats": {"a": {"bn": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}},
    }
    out = reparameterize(v)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(v)


@pytest.mark.parametrize("which", sorted(ARCHS))
def test_folded_model_matches_training_form(which):
    """fold_variables: no BatchNorm left, every output key equal in eval, deploy form in too."""
    arch = ARCHS[which]
    model, fmodel = build(arch), build(arch, deploy=True, fold_bn=True)
    v = randomize(init_variables(model), seed=5)
    fv = fold_variables(v)
    want = abstract_variables(fmodel)
    assert "batch_stats" not in fv and "batch_stats" not in want
    assert jax.tree_util.tree_structure(fv) == jax.tree_util.tree_structure(want)
    assert set(fv["params"]["neck"]["feat_bn"]) == {"scale", "bias"}
    assert set(fv["params"]["backbone"]["stem_0"]) == {"conv"}
    assert set(fv["params"]["backbone"]["stem_0"]["conv"]) == {"kernel", "bias"}
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 40, 40, 3))
    out = jax.jit(lambda v, x: model.apply(v, x))(v, x)
    fout = jax.jit(lambda v, x: fmodel.apply(v, x))(fv, x)
    for key in out:
        assert rel_err(fout[key], out[key]) < 1e-5, key
    # from the deploy form, and idempotent
    again = fold_variables(fold_variables(reparameterize(v)))
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(fv), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="cannot train"):
        fmodel.apply(fv, x, train=True)
    with pytest.raises(ValueError, match="fold_bn"):
        build(arch, fold_bn=True)


def test_full_size_folded_count():
    """Spec 2.7's fully conv+BN-folded count, 4,549,184, has the BNNeck folded into last_conv;
    the folded Flax model keeps the BNNeck as its own affine map (512 scales + 512 biases) so
    that every output key stays right. The ONNX export merges it (test_export)."""
    arch = {
        "name": "RecModel",
        "Backbone": {"name": "PPLCNetV2_base_ShiTu", "class_expand": 512},
        "BackboneStopLayer": {"name": "flatten"},
        "Neck": {"name": "BNNeck", "num_features": 512},
    }
    folded = abstract_variables(build(arch, deploy=True, fold_bn=True))
    assert count_params(folded) == 4_549_184 + 2 * 512
    ones = jax.tree_util.tree_map(
        lambda s: np.ones(s.shape, s.dtype), abstract_variables(build(arch))
    )
    fv = fold_variables(ones)
    assert jax.tree_util.tree_structure(fv) == jax.tree_util.tree_structure(folded)
