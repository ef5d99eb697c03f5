"""BNNeck and the classification heads FC, ArcMargin, CosMargin, CircleMargin (ref §4).

Margin heads always compute in float32 (the input is upcast), whatever the model's compute
dtype. In eval (`train=False`) or without labels they return the unscaled cosine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.models.initializers import xavier_normal
from jaxrec.models.layers import batch_norm

Dtype = Any
Initializer = Callable[..., jax.Array]


class FoldedBN(nn.Module):
    """An eval-mode BatchNorm folded into one per-feature affine map `x * scale + bias`
    (params `scale`, `bias`; no statistics). See `jaxrec.models.fold`."""

    num_features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (self.num_features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.num_features,), self.param_dtype)
        x = x.astype(self.dtype)
        return x * scale.astype(self.dtype) + bias.astype(self.dtype)


class BNNeck(nn.Module):
    """Flatten then BatchNorm1D (momentum 0.9, eps 1e-5). Key `feat_bn`.

    The bias is a normal parameter here; the optimizer freezes it (ref §7.3). `fold_bn=True` is
    the BN-folded inference form: `feat_bn` is a `FoldedBN`.
    """

    num_features: int
    fold_bn: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        if x.shape[-1] != self.num_features:
            raise ValueError(
                f"BNNeck: num_features={self.num_features} but its input has {x.shape[-1]} "
                "features; set Neck.num_features to the backbone's class_expand"
            )
        if self.fold_bn:
            return FoldedBN(self.num_features, self.dtype, self.param_dtype, name="feat_bn")(x)
        return batch_norm(train, self.dtype, self.param_dtype, "feat_bn", self.bn_axis_name)(x)


def _labels(labels: jax.Array) -> jax.Array:
    """Accept labels of shape [N] or [N, 1]."""
    return jnp.reshape(labels, (-1,)).astype(jnp.int32)


def _cosine(x: jax.Array, w: jax.Array) -> jax.Array:
    """Row-normalized x times column-normalized w, float32, no epsilon (as the reference)."""
    x = x.astype(jnp.float32)
    w = w.astype(jnp.float32)
    x = x / jnp.sqrt(jnp.sum(jnp.square(x), axis=1, keepdims=True))
    w = w / jnp.sqrt(jnp.sum(jnp.square(w), axis=0, keepdims=True))
    return jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST)


class FCHead(nn.Module):
    """logits = x W (+ b), W [embedding_size, class_num]. The label is ignored. Key `fc`."""

    embedding_size: int
    class_num: int
    use_bias: bool
    kernel_init: Initializer
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, labels: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        del labels, train
        return nn.Dense(
            self.class_num,
            use_bias=self.use_bias,
            kernel_init=self.kernel_init,
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="fc",
        )(x)


class _MarginBase(nn.Module):
    """cos(x, W) in eval or without labels; `margin_logits(cos, onehot)` in training."""

    embedding_size: int
    class_num: int
    kernel_init: Initializer = xavier_normal
    param_dtype: Dtype = jnp.float32

    def cosine(self, x: jax.Array) -> jax.Array:
        w = self.param(
            "weight", self.kernel_init, (self.embedding_size, self.class_num), self.param_dtype
        )
        return _cosine(x, w)

    def margin_logits(self, cos: jax.Array, onehot: jax.Array) -> jax.Array:
        raise NotImplementedError

    @nn.compact
    def __call__(
        self, x: jax.Array, labels: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        cos = self.cosine(x)
        if not train or labels is None:
            return cos
        onehot = jax.nn.one_hot(_labels(labels), self.class_num, dtype=jnp.float32)
        return self.margin_logits(cos, onehot)


class ArcMargin(_MarginBase):
    """ArcFace: s * (onehot * phi' + (1 - onehot) * cos), phi = cos(theta + m) (ref §4.3)."""

    margin: float = 0.5
    scale: float = 80.0
    easy_margin: bool = False

    def margin_logits(self, cos: jax.Array, onehot: jax.Array) -> jax.Array:
        sin = jnp.sqrt(1.0 - jnp.square(cos) + 1e-6)
        cos_m, sin_m = math.cos(self.margin), math.sin(self.margin)
        phi = cos * cos_m - sin * sin_m
        if self.easy_margin:
            phi = jnp.where(cos > 0, phi, cos)
        else:
            phi = jnp.where(cos > -cos_m, phi, cos - sin_m * self.margin)
        return self.scale * (onehot * phi + (1.0 - onehot) * cos)


class CosMargin(_MarginBase):
    """CosFace: s * (cos - m * onehot) (ref §4.4)."""

    margin: float = 0.35
    scale: float = 64.0

    def margin_logits(self, cos: jax.Array, onehot: jax.Array) -> jax.Array:
        return self.scale * (onehot * (cos - self.margin) + (1.0 - onehot) * cos)


class CircleMargin(_MarginBase):
    """Circle loss logits with detached alphas (ref §4.5). `margin` and `scale` are required."""

    margin: float = None  # type: ignore[assignment]
    scale: float = None  # type: ignore[assignment]

    def cosine(self, x: jax.Array) -> jax.Array:
        if self.margin is None or self.scale is None:
            raise ValueError("CircleMargin needs both `margin` and `scale` (no defaults)")
        return super().cosine(x)

    def margin_logits(self, cos: jax.Array, onehot: jax.Array) -> jax.Array:
        c = jax.lax.stop_gradient(cos)
        alpha_p = jnp.maximum(1.0 + self.margin - c, 0.0)
        alpha_n = jnp.maximum(c + self.margin, 0.0)
        logits_p = alpha_p * (cos - (1.0 - self.margin))
        logits_n = alpha_n * (cos - self.margin)
        return self.scale * (logits_p * onehot + logits_n * (1.0 - onehot))
