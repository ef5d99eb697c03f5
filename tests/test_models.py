"""Model structure, parameter counts (full size, via eval_shape), output shapes, heads, dtypes,
initializers and Arch validation. Numerical parity with PaddleClas is in test_model_parity.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_testutil import build, build_head

from jaxrec.errors import ArchError
from jaxrec.models import abstract_variables, count_params, init_variables
from jaxrec.models.lcnetv2 import block_specs

FULL = {
    "name": "RecModel",
    "infer_output_key": "features",
    "infer_add_softmax": False,
    "Backbone": {
        "name": "PPLCNetV2_base_ShiTu",
        "pretrained": True,
        "use_ssld": True,
        "class_expand": 512,
    },
    "BackboneStopLayer": {"name": "flatten"},
    "Neck": {
        "name": "BNNeck",
        "num_features": 512,
        "weight_attr": {"initializer": {"name": "Constant", "value": 1.0}},
        "bias_attr": {"initializer": {"name": "Constant", "value": 0.0}, "learning_rate": 1e-20},
    },
    "Head": {
        "name": "FC",
        "embedding_size": 512,
        "class_num": 192612,
        "weight_attr": {"initializer": {"name": "Normal", "mean": 0.0, "std": 0.001}},
        "bias_attr": False,
    },
}


def tiny(head=None, **top):
    arch = {
        "name": "RecModel",
        "Backbone": {
            "name": "PPLCNetV2_base_ShiTu",
            "scale": 0.125,
            "depths": [1, 1, 2, 2],
            "class_expand": 16,
        },
        "BackboneStopLayer": {"name": "flatten"},
        "Neck": {"name": "BNNeck", "num_features": 16},
        **top,
    }
    if head is not None:
        arch["Head"] = {"embedding_size": 16, "class_num": 5, **head}
    return arch


# ---------------------------------------------------------------- full-size counts (no compute)


def test_full_size_parameter_counts_match_spec():
    av = abstract_variables(build(FULL))
    p = av["params"]
    assert count_params(p) == 103_240_192
    assert count_params({k: v for k, v in p.items() if k != "head"}) == 4_622_848
    assert count_params(p["backbone"]) == 4_621_824
    assert count_params(av["batch_stats"]) == 42_880
    bb = p["backbone"]

    def part(prefix):
        return sum(count_params(v) for k, v in bb.items() if k.startswith(prefix))

    assert part("stem") == 3_456
    assert part("stages_0") == 27_200
    assert part("stages_1") == 103_552
    assert part("stages_2") == 2_322_880
    assert part("stages_3") == 1_639_936
    assert count_params(bb["last_conv"]) == 524_800
    assert p["head"]["fc"]["kernel"].shape == (512, 192612)
    assert "bias" not in p["head"]["fc"]


def test_full_size_deploy_counts_match_spec():
    arch = {k: v for k, v in FULL.items() if k != "Head"}
    av = abstract_variables(build(arch, deploy=True))
    assert count_params(av["params"]) == 4_558_336
    assert count_params(av["batch_stats"]) == 17_280


def test_full_size_imagenet_counts():
    # Reference (Paddle 3.3.1, PPLCNetV2_base()): 6,841,192 state-dict numbers, of which
    # 40,832 BN running stats and 113,152 unused rep fusion targets -> 6,687,208 learnable.
    av = abstract_variables(build({"name": "PPLCNetV2_base"}))
    assert count_params(av["params"]) == 6_687_208
    assert count_params(av["batch_stats"]) == 40_832
    dv = abstract_variables(build({"name": "PPLCNetV2_base"}, deploy=True))
    assert count_params(dv["params"]) + count_params(dv["batch_stats"]) == 6_640_488  # "6.64 M"


def test_full_size_layer_shapes():
    p = abstract_variables(build(FULL))["params"]["backbone"]
    assert p["stem_0"]["conv"]["kernel"].shape == (3, 3, 3, 32)
    assert p["stem_1"]["dw_conv"]["conv"]["kernel"].shape == (3, 3, 1, 32)
    # stride-2 rep block: 5x5 and 3x3 branches only; stride-1 blocks also have the 1x1 branch
    assert sorted(k for k in p["stages_2_0"] if k.startswith("dw_conv_list")) == [
        "dw_conv_list_0",
        "dw_conv_list_1",
    ]
    assert p["stages_2_1"]["dw_conv_list_2"]["conv"]["kernel"].shape == (1, 1, 1, 512)
    assert p["stages_3_0"]["dw_conv_list_2"]["conv"]["kernel"].shape == (1, 1, 1, 512)
    assert "dw_conv" not in p["stages_2_0"]  # no unused fusion target in the training form
    assert p["stages_2_0"]["se"]["conv1"]["kernel"].shape == (1, 1, 256, 64)
    assert p["stages_2_0"]["pw_conv_1"]["conv"]["kernel"].shape == (1, 1, 256, 256)
    assert p["last_conv"]["kernel"].shape == (1, 1, 1024, 512)
    assert p["last_conv"]["bias"].shape == (512,)
    imnet = abstract_variables(build({"name": "PPLCNetV2_base"}))["params"]["backbone"]
    assert "dw_conv_list_2" not in imnet["stages_3_0"]
    assert "bias" not in imnet["last_conv"]
    assert imnet["fc"]["kernel"].shape == (1280, 1000)


def test_shortcut_only_in_last_block():
    for shitu in (True, False):
        specs = block_specs(1.0, (2, 2, 6, 2), shitu)
        on = [
            n
            for n, s in specs
            if s["use_shortcut"] and s["stride"] == 1 and s["in_channels"] == s["out_channels"]
        ]
        assert on == ["stages_3_1"]
    strides = {n: s["stride"] for n, s in block_specs(1.0, (2, 2, 6, 2), True)}
    assert strides["stages_3_0"] == 1 and strides["stages_2_0"] == 2


# ---------------------------------------------------------------- tiny models
# Shapes come from jax.eval_shape (tracing only); real compute shares one initialized model.

X_SPEC = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
Y_SPEC = jax.ShapeDtypeStruct((3,), jnp.int32)


def shapes(model, train=False, labels=True):
    def f(x, y):
        v = model.init(jax.random.key(0), x)
        if train:
            out, upd = model.apply(
                v, x, y, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}
            )
            assert set(upd) == {"batch_stats"}
            return out
        return model.apply(v, x, y if labels else None)

    return {k: tuple(a.shape) for k, a in jax.eval_shape(f, X_SPEC, Y_SPEC).items()}


@pytest.mark.parametrize(
    "head",
    [
        None,
        {"name": "FC"},
        {"name": "ArcMargin"},
        {"name": "CosMargin"},
        {"name": "CircleMargin", "margin": 0.25, "scale": 32},
    ],
)
@pytest.mark.parametrize("train", [False, True])
def test_output_shapes_every_head(head, train):
    got = shapes(build(tiny(head)), train=train)
    want = {"backbone": (3, 16), "neck": (3, 16), "features": (3, 16)}
    if head is not None:
        want["logits"] = (3, 5)
    assert got == want


def test_imagenet_classifier_shapes():
    arch = {"name": "PPLCNetV2", "scale": 0.125, "depths": [1, 1, 2, 2], "class_num": 7}
    assert shapes(build(arch))["logits"] == (3, 7)
    assert shapes(build(arch), train=True)["backbone"] == (3, 7)
    # PPLCNetV2_base also accepts the reduced-size keys
    m2 = build({"name": "PPLCNetV2_base", "scale": 0.125, "depths": [1, 1, 1, 1]})
    assert shapes(m2)["logits"] == (3, 1000)


def test_deploy_form_shapes():
    model = build(tiny({"name": "FC"}), deploy=True)
    bb = abstract_variables(model)["params"]["backbone"]
    assert set(bb["stages_3_1"]["dw_conv"]) == {"kernel", "bias"}
    assert bb["stages_3_1"]["dw_conv"]["kernel"].shape == (5, 5, 1, 128)
    assert not any(k.startswith("dw_conv_list") for k in bb["stages_2_0"])
    assert shapes(model)["logits"] == (3, 5)


SHARED = tiny(
    {
        "name": "FC",
        "class_num": 4000,
        "weight_attr": {"initializer": {"name": "Normal", "mean": 0.0, "std": 0.001}},
    }
)


@pytest.fixture(scope="module")
def shared():
    """(model, variables, x, eval outputs) of one tiny ShiTu RecModel, computed once."""
    model = build(SHARED)
    v = init_variables(model, seed=1)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 32, 32, 3))
    out = jax.jit(lambda v, x: model.apply(v, x))(v, x)
    return model, v, x, out


def test_bf16_compute_keeps_fp32_params(shared):
    model, v, x, ref = shared
    m16 = build(SHARED, dtype="bfloat16")
    assert {a.dtype for a in jax.tree_util.tree_leaves(v)} == {jnp.dtype(jnp.float32)}
    out = jax.jit(lambda v, x: m16.apply(v, x))(v, x)
    assert out["features"].dtype == jnp.bfloat16
    err = np.abs(np.asarray(out["features"], np.float32) - np.asarray(ref["features"]))
    assert err.max() < 0.1 * np.abs(np.asarray(ref["features"])).max()


def test_margin_head_math_is_fp32_for_bf16_input():
    h = _head({"name": "ArcMargin"})
    v = {"params": {"weight": W}}
    out = h.apply(v, FEATS.astype(jnp.bfloat16), LAB, train=True)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, h.apply(v, FEATS, LAB, train=True), rtol=1e-6)


def test_labels_n_and_n1_agree():
    v = {"params": {"weight": W}}
    for cfg in ({"name": "ArcMargin"}, {"name": "CosMargin"}):
        h = _head(cfg)
        np.testing.assert_array_equal(
            h.apply(v, FEATS, LAB, train=True), h.apply(v, FEATS, LAB[:, None], train=True)
        )


def test_dropout_in_backbone(shared):
    """Eval: last_conv output x 0.8; train: masked, unscaled; needs the "dropout" rng."""
    model, v, x, out = shared
    m0 = build(dict(SHARED, Backbone=dict(SHARED["Backbone"], dropout_prob=0.0)))
    b0 = np.asarray(jax.jit(lambda v, x: m0.apply(v, x)["backbone"])(v, x))
    np.testing.assert_allclose(np.asarray(out["backbone"]), b0 * np.float32(0.8), rtol=1e-6)

    def train_out(m, v, x, key):
        rngs = {"dropout": key} if key is not None else {}
        return m.apply(v, x, train=True, mutable=["batch_stats"], rngs=rngs)[0]["backbone"]

    bt = np.asarray(jax.jit(lambda v, x: train_out(model, v, x, jax.random.key(0)))(v, x))
    bt0 = np.asarray(jax.jit(lambda v, x: train_out(m0, v, x, None))(v, x))
    kept = bt != 0
    assert 0 < kept.sum() < kept.size
    np.testing.assert_allclose(bt[kept], bt0[kept], rtol=1e-6)


# ---------------------------------------------------------------- heads on hand-computed values

FEATS = jnp.array([[3.0, 0.0], [0.0, 2.0]])
W = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # columns: e1, e2, (e1+e2)/sqrt2 after norm
LAB = jnp.array([0, 2])
R = 1 / math.sqrt(2)
COS = np.array([[1.0, 0.0, R], [0.0, 1.0, R]])


def _head(cfg):
    return build_head({**cfg, "embedding_size": 2, "class_num": 3})


@pytest.mark.parametrize(
    "cfg",
    [
        {"name": "ArcMargin"},
        {"name": "CosMargin"},
        {"name": "CircleMargin", "margin": 0.25, "scale": 32},
    ],
)
def test_margin_heads_eval_return_unscaled_cosine(cfg):
    h = _head(cfg)
    v = {"params": {"weight": W}}
    np.testing.assert_allclose(h.apply(v, FEATS, LAB, train=False), COS, atol=1e-6)
    np.testing.assert_allclose(h.apply(v, FEATS, None, train=True), COS, atol=1e-6)


def test_arcmargin_hand_values():
    v = {"params": {"weight": W}}
    got = np.asarray(_head({"name": "ArcMargin"}).apply(v, FEATS, LAB, train=True))
    m, s = 0.5, 80.0
    sin0 = math.sqrt(1e-6)  # cos = 1 for row 0's target
    phi0 = math.cos(m) - sin0 * math.sin(m)
    sin1 = math.sqrt(1 - R * R + 1e-6)
    phi1 = R * math.cos(m) - sin1 * math.sin(m)
    want = s * np.array([[phi0, 0.0, R], [0.0, 1.0, phi1]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # target cosine below -cos(m): cos - m*sin(m) instead of phi (non-easy margin)
    got = np.asarray(_head({"name": "ArcMargin"}).apply(v, -FEATS, LAB, train=True))
    assert got[0, 0] == pytest.approx(s * (-1.0 - m * math.sin(m)), rel=1e-6)
    # easy margin: cos <= 0 keeps the plain cosine
    got = np.asarray(
        _head({"name": "ArcMargin", "easy_margin": True}).apply(v, -FEATS, LAB, train=True)
    )
    assert got[0, 0] == pytest.approx(-s, rel=1e-6)


def test_cosmargin_hand_values():
    v = {"params": {"weight": W}}
    got = np.asarray(_head({"name": "CosMargin"}).apply(v, FEATS, LAB, train=True))
    want = 64.0 * np.array([[1 - 0.35, 0.0, R], [0.0, 1.0, R - 0.35]])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_circlemargin_hand_values_and_detached_alpha():
    v = {"params": {"weight": W}}
    h = _head({"name": "CircleMargin", "margin": 0.25, "scale": 32.0})
    got = np.asarray(h.apply(v, FEATS, LAB, train=True))
    m, s = 0.25, 32.0

    def neg(c):
        return max(c + m, 0) * (c - m)

    want = s * np.array(
        [
            [max(1 + m - 1, 0) * (1 - (1 - m)), neg(0.0), neg(R)],
            [neg(0.0), neg(1.0), max(1 + m - R, 0) * (R - (1 - m))],
        ]
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # alpha is detached: d out[0,2] / d cos[0,2] = s * alpha_n = s * (cos + m), not s * 2 cos
    g = jax.grad(lambda w: h.apply({"params": {"weight": w}}, FEATS, LAB, train=True)[0, 2])(W)
    dcos = jax.grad(lambda w: h.apply({"params": {"weight": w}}, FEATS, LAB)[0, 2])(W)
    ratio = np.asarray(g)[:, 2] / np.asarray(dcos)[:, 2]
    np.testing.assert_allclose(ratio, s * (R + m), rtol=1e-5)


def test_fc_head_bias_option():
    v = {"params": {"fc": {"kernel": W}}}
    np.testing.assert_allclose(
        _head({"name": "FC"}).apply(v, FEATS), np.asarray(FEATS @ W), atol=1e-6
    )
    hb = _head({"name": "FC", "bias_attr": {"initializer": {"name": "Constant", "value": 0.0}}})
    vb = hb.init(jax.random.key(0), FEATS)
    assert vb["params"]["fc"]["bias"].shape == (3,)


# ---------------------------------------------------------------- initializers


def test_initializers_follow_spec(shared):
    _, v, _, _ = shared
    bb = v["params"]["backbone"]

    def std(a):
        return float(np.asarray(a).std())

    k = np.asarray(bb["stages_3_1"]["pw_conv"]["conv"]["kernel"])  # 1x1, 128 -> 128
    assert std(k) == pytest.approx(math.sqrt(2 / 128), rel=0.05)
    assert np.abs(k).max() > 2.5 * math.sqrt(2 / 128)  # plain normal, not truncated at 2 sigma
    dw = np.asarray(bb["stages_3_1"]["dw_conv_list_0"]["conv"]["kernel"])  # 5x5 DW, fan_in 25
    assert std(dw) == pytest.approx(math.sqrt(2 / 25), rel=0.1)
    se = bb["stages_2_1"]["se"]
    assert std(se["conv1"]["kernel"]) == pytest.approx(math.sqrt(2 / 64), rel=0.1)
    assert not np.asarray(se["conv1"]["bias"]).any()
    assert std(bb["last_conv"]["kernel"]) == pytest.approx(math.sqrt(2 / 128), rel=0.15)
    head = np.asarray(v["params"]["head"]["fc"]["kernel"])
    assert std(head) == pytest.approx(0.001, rel=0.05)
    bn = bb["stem_0"]["bn"]
    assert (np.asarray(bn["scale"]) == 1).all() and not np.asarray(bn["bias"]).any()
    st = v["batch_stats"]["backbone"]["stem_0"]["bn"]
    assert not np.asarray(st["mean"]).any() and (np.asarray(st["var"]) == 1).all()
    neck = v["params"]["neck"]["feat_bn"]
    assert (np.asarray(neck["scale"]) == 1).all() and not np.asarray(neck["bias"]).any()
    arc = build_head({"name": "ArcMargin", "embedding_size": 16, "class_num": 2000})
    w = np.asarray(arc.init(jax.random.key(0), jnp.ones((1, 16)))["params"]["weight"])
    assert std(w) == pytest.approx(math.sqrt(2 / (16 + 2000)), rel=0.05)  # XavierNormal


# ---------------------------------------------------------------- Arch validation


@pytest.mark.parametrize(
    "arch,needle",
    [
        ({**tiny(), "Backbone": {"name": "PPLCNetV2_base_ShiTu", "widht": 2}}, "widht"),
        ({**tiny(), "bogus": 1}, "bogus"),
        (tiny({"name": "FC", "margin": 0.1}), "margin"),
        (tiny({"name": "SoftmaxHead"}), "SoftmaxHead"),
        (tiny({"name": "CircleMargin", "margin": 0.2}), "scale"),
        ({**tiny(), "Neck": {"name": "BNNeck"}}, "num_features"),
        ({**tiny(), "Neck": {"name": "BNNeck", "num_features": 16, "momentum": 0.1}}, "momentum"),
        ({**tiny(), "dtype": "float32"}, "dtype"),
        ({**tiny(), "deploy": True}, "deploy"),
        ({**tiny(), "BackboneStopLayer": {"name": "stages"}}, "stages"),
        ({**tiny(), "Backbone": {"name": "ResNet50"}}, "ResNet50"),
        ({"name": "DistillationModel"}, "DistillationModel"),
        ({"name": "PPLCNetV2"}, "scale"),
        (
            tiny({"name": "FC", "weight_attr": {"initializer": {"name": "Orthogonal"}}}),
            "Orthogonal",
        ),
    ],
)
def test_arch_errors_name_the_problem(arch, needle):
    with pytest.raises(ArchError, match=needle) as err:
        build(arch)
    assert err.value.key.startswith("Arch") and needle in str(err.value)


def test_neck_width_mismatch_is_reported():
    arch = tiny()
    arch["Neck"] = {"name": "BNNeck", "num_features": 32}
    with pytest.raises(ValueError, match="num_features=32"):
        abstract_variables(build(arch))


def test_init_keys_are_accepted():
    m = build(FULL)
    assert m.head.class_num == 192612 and m.backbone.shitu and m.backbone.class_expand == 512


def test_bn_axis_name_synchronizes_batch_statistics():
    """build(bn_axis_name=...): per-device BN under shard_map then equals full-batch BN."""
    from jax.sharding import PartitionSpec as P

    from jaxrec.models import BNNeck

    n = len(jax.devices())
    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jax.random.normal(jax.random.PRNGKey(0), (4 * n, 6)) * 3 + 1
    ref_mod, sync_mod = BNNeck(6), BNNeck(6, bn_axis_name="data")
    v = ref_mod.init(jax.random.key(0), x)
    ref, ref_upd = ref_mod.apply(v, x, train=True, mutable=["batch_stats"])

    def step(x):
        return sync_mod.apply(v, x, train=True, mutable=["batch_stats"])

    out, upd = jax.jit(
        jax.shard_map(step, mesh=mesh, in_specs=P("data"), out_specs=(P("data"), P()))
    )(x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(upd["batch_stats"]["feat_bn"]["var"]),
        np.asarray(ref_upd["batch_stats"]["feat_bn"]["var"]),
        rtol=1e-5,
    )
    assert build(tiny(), bn_axis_name="data").backbone.bn_axis_name == "data"
    with pytest.raises(ValueError, match="bn_axis_name"):
        build(tiny(), bn_axis_name=3)
    with pytest.raises(ValueError, match="dtype"):
        build(tiny(), dtype="int8")


@pytest.mark.parametrize("k,stride,size", [(5, 1, 7), (3, 2, 8)])
def test_depthwise_shift_lowering_equals_grouped_conv(k, stride, size):
    """The CPU lowering (sum of shifted slices) equals lax's grouped conv, values and grads."""
    from jaxrec.models.layers import DepthwiseConv
    from jaxrec.ops.depthwise import forced_lowering

    mod = DepthwiseConv(6, k, stride, use_bias=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 6))
    v = mod.init(jax.random.key(1), x)
    v = {"params": {"kernel": v["params"]["kernel"], "bias": jnp.arange(6.0)}}

    def run(impl):
        with forced_lowering(impl):  # acts at trace time: a fresh jit per lowering
            y = jax.jit(lambda v, x: mod.apply(v, x))(v, x)
            loss = lambda v, x: jnp.sum(jnp.sin(mod.apply(v, x)))
            g = jax.jit(jax.grad(loss, argnums=(0, 1)))(v, x)
        return y, g

    (y1, g1), (y2, g2) = run("shift"), run("conv")
    assert y1.shape == (2, (size - 1) // stride + 1, (size - 1) // stride + 1, 6)
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="lowering"):
        with forced_lowering("cudnn"):
            pass


def _grouped_convs(stablehlo: str) -> int:
    return stablehlo.count("feature_group_count = 6")


def test_depthwise_lowering_is_chosen_per_platform_at_lowering_time():
    """One traced function: a CPU lowering keeps only the shifted slices (also in the gradient),
    a jax.export for cpu and cuda carries both branches and picks the slices on CPU."""
    from jaxrec.ops.depthwise import depthwise_conv

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 6))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, 6))
    fwd = jax.jit(lambda x, w: depthwise_conv(x, w, 1, 1))
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(depthwise_conv(x, w, 2, 1))), (0, 1)))
    assert _grouped_convs(fwd.lower(x, w).as_text()) == 0
    assert _grouped_convs(grad.lower(x, w).as_text()) == 0
    exp = jax.export.export(fwd, platforms=("cpu", "cuda"))(x, w)
    text = exp.mlir_module()
    assert _grouped_convs(text) >= 1 and "stablehlo.case" in text  # the CUDA branch is there
    # Called on CPU, the platform switch resolves before XLA compiles: no convolution is left.
    compiled = jax.jit(exp.call).lower(x, w).compile().as_text()
    assert "convolution" not in compiled and "conditional" not in compiled
    want = np.asarray(fwd(x, w))
    np.testing.assert_allclose(np.asarray(exp.call(x, w)), want, rtol=1e-6, atol=1e-6)
    gx, gw = grad(x, w)  # gradients flow through the platform switch and the custom VJP
    assert gx.shape == x.shape and gw.shape == w.shape and np.isfinite(np.asarray(gw)).all()
