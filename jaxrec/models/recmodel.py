"""RecModel (backbone -> neck -> head, ref §3) and `build_model` from a YAML-like Arch dict."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.models import initializers
from jaxrec.models.heads import (
    ArcMargin,
    BNNeck,
    CircleMargin,
    CosMargin,
    FCHead,
)
from jaxrec.models.lcnetv2 import LAYER_ORDER, PPLCNetV2

Dtype = Any


class RecModel(nn.Module):
    """Backbone, optional BNNeck, optional head; returns a dict of arrays.

    `__call__(x, labels=None, train=False)` with x NHWC (normalized floats) returns
    `{"backbone": [N,D], "neck": [N,D] (if a neck), "features": [N,D], "logits": [N,C]}`.
    `features` is the neck output (or the backbone output without neck). `logits` comes from the
    head, or, for a bare classifier backbone (ImageNet form with `fc`), is the backbone output.
    `train=True` needs `mutable=["batch_stats"]` and `rngs={"dropout": key}`.
    """

    backbone: PPLCNetV2
    neck: nn.Module | None = None
    head: nn.Module | None = None
    head_feature_from: str = "neck"

    def __call__(
        self, x: jax.Array, labels: jax.Array | None = None, train: bool = False
    ) -> dict[str, jax.Array]:
        if train and self.backbone.fold_bn:
            raise ValueError("a BN-folded model (Arch fold_bn) has no BatchNorm and cannot train")
        out: dict[str, jax.Array] = {}
        b = self.backbone(x, train)
        out["backbone"] = b
        feats = b
        if self.neck is not None:
            feats = self.neck(b, train)
            out["neck"] = feats
        out["features"] = feats
        if self.head is not None:
            head_in = b if self.head_feature_from == "backbone" else feats
            out["logits"] = self.head(head_in, labels, train)
        elif self.backbone.stop_after in (None, "fc"):
            out["logits"] = b
        return out


# name -> (scale, depths, dropout_prob, shitu); "PPLCNetV2" needs scale and depths given.
BACKBONES: dict[str, tuple[float | None, tuple[int, ...] | None, float, bool]] = {
    "PPLCNetV2": (None, None, 0.0, False),
    "PPLCNetV2_small": (0.75, (2, 2, 4, 2), 0.2, False),
    "PPLCNetV2_base": (1.0, (2, 2, 6, 2), 0.2, False),
    "PPLCNetV2_large": (1.25, (2, 2, 8, 2), 0.2, False),
    "PPLCNetV2_base_ShiTu": (1.0, (2, 2, 6, 2), 0.2, True),
}

# Keys PaddleClas uses only for initialization / loading; accepted and ignored here.
_INIT_KEYS = {"pretrained", "use_ssld"}
_BACKBONE_KEYS = {
    "name",
    "class_num",
    "class_expand",
    "use_last_conv",
    "dropout_prob",
    "act",
    "scale",
    "depths",
} | _INIT_KEYS
_TOP_KEYS = {
    "name",
    "infer_output_key",
    "infer_add_softmax",
    "Backbone",
    "BackboneStopLayer",
    "Neck",
    "Head",
    "head_feature_from",
    "dtype",
    "deploy",
    "fold_bn",
    "bn_axis_name",
}
# jaxrec-only top-level keys, also accepted beside a bare backbone's keys.
_MODEL_KEYS = ("dtype", "deploy", "fold_bn", "bn_axis_name")
# float64 only for references computed with x64 enabled (the export check, jaxrec.export.check).
_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
    "float64": jnp.float64,
}


class ArchError(ValueError):
    """An Arch dict that jaxrec cannot build."""


def _check_keys(section: str, cfg: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ArchError(
            f"Arch.{section}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}"
        )


def _initializer(section: str, attr: Any, default):
    """Initializer from a Paddle ParamAttr-like dict ({"initializer": {"name": ..}}), or default.

    Other ParamAttr entries (learning_rate, regularizer, trainable, name) concern the optimizer
    and are ignored here.
    """
    if not isinstance(attr, Mapping) or attr.get("initializer") is None:
        return default
    init = dict(attr["initializer"])
    name = init.pop("name", None)
    if name == "Normal":
        return initializers.normal(float(init.get("std", 1.0)), float(init.get("mean", 0.0)))
    if name == "Constant":
        return nn.initializers.constant(float(init.get("value", 0.0)))
    if name == "XavierNormal":
        return initializers.xavier_normal
    if name == "XavierUniform":
        return initializers.xavier_uniform
    if name == "KaimingNormal":
        return initializers.kaiming_normal
    raise ArchError(
        f"Arch.{section}: initializer {name!r} is not supported "
        "(use Normal, Constant, XavierNormal, XavierUniform or KaimingNormal)"
    )


def _dtype(arch: Mapping[str, Any]) -> Any:
    name = arch.get("dtype", "float32")
    if name not in _DTYPES:
        raise ArchError(f"Arch.dtype: {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _build_backbone(
    cfg: Mapping[str, Any],
    stop_after: str | None,
    deploy: bool,
    dtype: Any,
    section: str,
    bn_axis_name: str | None = None,
    fold_bn: bool = False,
) -> PPLCNetV2:
    _check_keys(section, cfg, _BACKBONE_KEYS)
    name = cfg.get("name")
    if name not in BACKBONES:
        raise ArchError(f"Arch.{section}.name: {name!r} is not one of {sorted(BACKBONES)}")
    scale, depths, dropout, shitu = BACKBONES[name]
    scale = cfg.get("scale", scale)
    depths = cfg.get("depths", depths)
    if scale is None or depths is None:
        raise ArchError(f"Arch.{section}: backbone {name} needs `scale` and `depths`")
    depths = tuple(int(d) for d in depths)
    if len(depths) != 4 or min(depths) < 1:
        raise ArchError(f"Arch.{section}.depths: need 4 positive stage depths, got {depths}")
    if cfg.get("act", "relu") != "relu":
        raise ArchError(f"Arch.{section}.act: only 'relu' is supported, got {cfg['act']!r}")
    return PPLCNetV2(
        scale=float(scale),
        depths=depths,
        class_num=int(cfg.get("class_num", 1000)),
        dropout_prob=float(cfg.get("dropout_prob", dropout)),
        use_last_conv=bool(cfg.get("use_last_conv", True)),
        class_expand=int(cfg.get("class_expand", 1280)),
        shitu=shitu,
        stop_after=stop_after,
        deploy=deploy,
        fold_bn=fold_bn,
        dtype=dtype,
        bn_axis_name=bn_axis_name,
        name="backbone",
    )


def _build_neck(
    cfg: Mapping[str, Any], dtype: Any, bn_axis_name: str | None = None, fold_bn: bool = False
) -> BNNeck:
    name = cfg.get("name")
    if name != "BNNeck":
        raise ArchError(f"Arch.Neck.name: {name!r} is not supported (only 'BNNeck')")
    _check_keys("Neck", cfg, {"name", "num_features", "weight_attr", "bias_attr"})
    if "num_features" not in cfg:
        raise ArchError("Arch.Neck: BNNeck needs `num_features`")
    return BNNeck(
        int(cfg["num_features"]),
        fold_bn=fold_bn,
        dtype=dtype,
        bn_axis_name=bn_axis_name,
        name="neck",
    )


def _build_head(cfg: Mapping[str, Any], dtype: Any) -> nn.Module:
    name = cfg.get("name")
    common = {"name", "embedding_size", "class_num", "weight_attr"}
    for key in ("embedding_size", "class_num"):
        if key not in cfg:
            raise ArchError(f"Arch.Head: {name} needs `{key}`")
    emb, cls = int(cfg["embedding_size"]), int(cfg["class_num"])
    if name == "FC":
        _check_keys("Head", cfg, common | {"bias_attr", "use_bias"})
        # jaxrec default: no bias (the GeneralRecognitionV2 config); bias_attr: dict/True or
        # use_bias: True add a zero-initialized bias.
        bias_attr = cfg.get("bias_attr", False)
        use_bias = bool(cfg.get("use_bias", bias_attr is not False and bias_attr is not None))
        init = _initializer("Head.weight_attr", cfg.get("weight_attr"), None)
        kw = {} if init is None else {"kernel_init": init}
        return FCHead(emb, cls, use_bias=use_bias, dtype=dtype, name="head", **kw)
    init = _initializer("Head.weight_attr", cfg.get("weight_attr"), initializers.xavier_normal)
    if name == "ArcMargin":
        _check_keys("Head", cfg, common | {"margin", "scale", "easy_margin"})
        return ArcMargin(
            emb,
            cls,
            kernel_init=init,
            margin=float(cfg.get("margin", 0.5)),
            scale=float(cfg.get("scale", 80.0)),
            easy_margin=bool(cfg.get("easy_margin", False)),
            name="head",
        )
    if name == "CosMargin":
        _check_keys("Head", cfg, common | {"margin", "scale"})
        return CosMargin(
            emb,
            cls,
            kernel_init=init,
            margin=float(cfg.get("margin", 0.35)),
            scale=float(cfg.get("scale", 64.0)),
            name="head",
        )
    if name == "CircleMargin":
        _check_keys("Head", cfg, common | {"margin", "scale"})
        for key in ("margin", "scale"):
            if key not in cfg:
                raise ArchError(f"Arch.Head: CircleMargin needs `{key}` (it has no default)")
        return CircleMargin(
            emb,
            cls,
            kernel_init=init,
            margin=float(cfg["margin"]),
            scale=float(cfg["scale"]),
            name="head",
        )
    raise ArchError(
        f"Arch.Head.name: {name!r} is not one of ['ArcMargin', 'CircleMargin', 'CosMargin', 'FC']"
    )


def build_model(arch: Mapping[str, Any]) -> RecModel:
    """Build a RecModel from an Arch dict mirroring the PaddleClas YAML `Arch` section.

    `name` is "RecModel" (with Backbone / BackboneStopLayer / Neck / Head sections), or a
    backbone name such as "PPLCNetV2_base" for a bare ImageNet classifier (backbone keys then sit
    at the top level, as in PaddleClas). jaxrec-only keys: `dtype` ("float32" | "bfloat16" |
    "float16", the compute dtype; params stay float32), `deploy` (fused rep blocks), `fold_bn`
    (with `deploy`: every BatchNorm folded into its conv, BNNeck into a per-feature affine map;
    an inference-only form, see `jaxrec.models.fold`) and `bn_axis_name` (mesh axis for
    synchronized BN batch statistics in training; default None = per-device statistics, as the
    reference).
    Backbone sections also accept `scale` / `depths` / `dropout_prob` for reduced-size variants.
    Unknown keys raise `ArchError` naming the key.
    """
    arch = copy.deepcopy(dict(arch))
    name = arch.get("name")
    dtype = _dtype(arch)
    deploy = bool(arch.get("deploy", False))
    fold_bn = bool(arch.get("fold_bn", False))
    if fold_bn and not deploy:
        raise ArchError("Arch.fold_bn: the BN-folded form needs `deploy: True` as well")
    axis = arch.get("bn_axis_name")
    if axis is not None and not isinstance(axis, str):
        raise ArchError(f"Arch.bn_axis_name: must be a mesh axis name (str), got {axis!r}")
    if name in BACKBONES:
        bb_cfg = {k: v for k, v in arch.items() if k not in _MODEL_KEYS}
        return RecModel(
            backbone=_build_backbone(bb_cfg, None, deploy, dtype, "(backbone)", axis, fold_bn)
        )
    if name != "RecModel":
        raise ArchError(
            f"Arch.name: {name!r} is not supported; use 'RecModel' or one of {sorted(BACKBONES)}"
        )
    _check_keys("(top level)", arch, _TOP_KEYS)
    if "Backbone" not in arch:
        raise ArchError("Arch: RecModel needs a `Backbone` section")
    stop = arch.get("BackboneStopLayer")
    stop_after = None
    if stop is not None:
        _check_keys("BackboneStopLayer", stop, {"name"})
        stop_after = stop.get("name")
        allowed = LAYER_ORDER[LAYER_ORDER.index("avg_pool") :]
        if stop_after not in allowed:
            raise ArchError(
                f"Arch.BackboneStopLayer.name: {stop_after!r} is not supported; use one of "
                f"{list(allowed)}"
            )
    backbone = _build_backbone(
        arch["Backbone"], stop_after, deploy, dtype, "Backbone", axis, fold_bn
    )
    neck = _build_neck(arch["Neck"], dtype, axis, fold_bn) if arch.get("Neck") else None
    head = _build_head(arch["Head"], dtype) if arch.get("Head") else None
    hff = arch.get("head_feature_from", "neck")
    if hff not in ("neck", "backbone"):
        raise ArchError(f"Arch.head_feature_from: {hff!r} must be 'neck' or 'backbone'")
    iok = arch.get("infer_output_key", "features")
    if iok not in ("features", "backbone", "neck", "logits"):
        raise ArchError(f"Arch.infer_output_key: {iok!r} is not an output key")
    return RecModel(backbone=backbone, neck=neck, head=head, head_feature_from=hff)


def init_variables(model: RecModel, seed: int = 0, image_size: int = 32) -> dict[str, Any]:
    """Fresh variables ({"params", "batch_stats"}) for `model` (eval-mode init, no dropout rng).

    Uses the "rbg" PRNG for the initializers: compiling ~100 threefry initializers costs several
    seconds more on CPU, and the values only need to be deterministic in `seed`.
    """
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    key = jax.random.key(seed, impl="rbg")
    variables = jax.jit(lambda k: model.init(k, x, train=False))(key)
    return dict(variables)


def abstract_variables(model: RecModel, image_size: int = 32) -> dict[str, Any]:
    """ShapeDtypeStruct tree of the variables, computed with `jax.eval_shape` (no compute)."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return dict(
        jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.PRNGKey(0), x)
    )


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree, e.g. `count_params(variables["params"])` = learnable count."""
    return int(
        sum(math.prod(getattr(leaf, "shape", ())) for leaf in jax.tree_util.tree_leaves(tree))
    )
