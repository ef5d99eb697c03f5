"""RecModel (backbone -> neck -> head, ref §3) and `build_model` from a resolved `Arch`."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.models import initializers
from jaxrec.models.arch import Arch, HeadArch, Initializer
from jaxrec.models.heads import (
    ArcMargin,
    BNNeck,
    CircleMargin,
    CosMargin,
    FCHead,
)
from jaxrec.models.lcnetv2 import PPLCNetV2

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
            raise ValueError("a BN-folded model (fold_bn) has no BatchNorm and cannot train")
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


# float64 only for references computed with x64 enabled (the export check, jaxrec.export.check).
_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
    "float64": jnp.float64,
}


def _initializer(init: Initializer):
    if init.name == "Normal":
        return initializers.normal(init.std, init.mean)
    if init.name == "Constant":
        return nn.initializers.constant(init.value)
    return {
        "XavierNormal": initializers.xavier_normal,
        "XavierUniform": initializers.xavier_uniform,
        "KaimingNormal": initializers.kaiming_normal,
    }[init.name]


def _build_head(head: HeadArch, dtype: Any) -> nn.Module:
    emb, cls, init = head.embedding_size, head.class_num, _initializer(head.weight_init)
    if head.name == "FC":
        return FCHead(emb, cls, use_bias=head.use_bias, kernel_init=init, dtype=dtype, name="head")
    if head.name == "ArcMargin":
        return ArcMargin(
            emb,
            cls,
            kernel_init=init,
            margin=head.margin,
            scale=head.scale,
            easy_margin=head.easy_margin,
            name="head",
        )
    margin = {"CosMargin": CosMargin, "CircleMargin": CircleMargin}[head.name]
    return margin(emb, cls, kernel_init=init, margin=head.margin, scale=head.scale, name="head")


def build_model(
    arch: Arch,
    *,
    dtype: str = "float32",
    deploy: bool = False,
    fold_bn: bool = False,
    bn_axis_name: str | None = None,
) -> RecModel:
    """The RecModel of a resolved `Arch` (`jaxrec.config.resolve_arch` makes one from a
    PaddleClas Arch section).

    Runtime options: `dtype` ("float32" | "bfloat16" | "float16", or "float64" for a reference
    computed with x64 enabled) is the compute dtype (parameters stay float32); `deploy` fuses
    the rep blocks' branches (ref §2.6); `fold_bn` (with `deploy`) folds every BatchNorm into
    its conv and the BNNeck into a per-feature affine map, an inference-only form (see
    `jaxrec.models.fold`); `bn_axis_name` is the mesh axis for synchronized BN batch
    statistics in training (None: per-device statistics, as the reference).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"build_model: dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    if fold_bn and not deploy:
        raise ValueError("build_model: the BN-folded form (fold_bn) needs deploy=True as well")
    if bn_axis_name is not None and not isinstance(bn_axis_name, str):
        raise ValueError(
            f"build_model: bn_axis_name must be a mesh axis name, got {bn_axis_name!r}"
        )
    cdtype = _DTYPES[dtype]
    b = arch.backbone
    backbone = PPLCNetV2(
        scale=b.scale,
        depths=b.depths,
        class_num=b.class_num,
        dropout_prob=b.dropout_prob,
        use_last_conv=b.use_last_conv,
        class_expand=b.class_expand,
        shitu=b.shitu,
        stop_after=b.stop_after,
        deploy=deploy,
        fold_bn=fold_bn,
        dtype=cdtype,
        bn_axis_name=bn_axis_name,
        name="backbone",
    )
    neck = None
    if arch.neck is not None:
        neck = BNNeck(
            arch.neck.num_features,
            fold_bn=fold_bn,
            dtype=cdtype,
            bn_axis_name=bn_axis_name,
            name="neck",
        )
    head = None if arch.head is None else _build_head(arch.head, cdtype)
    return RecModel(
        backbone=backbone, neck=neck, head=head, head_feature_from=arch.head_feature_from
    )


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
