"""Building blocks of PP-LCNetV2 (ref §2.1): ConvBN, SE, RepDepthwiseSeparable, Dropout.

Everything is NHWC. Convolutions use explicit symmetric padding (k-1)//2 on every side (never
"SAME", which pads stride-2 convs asymmetrically and breaks Paddle weight compatibility).
Parameter and module names mirror the Paddle state-dict keys so that conversion is a rename
(see `jaxrec.paddle.naming`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.models.initializers import kaiming_normal, paddle_default_conv_init
from jaxrec.ops.depthwise import depthwise_conv

Dtype = Any

#: BatchNorm epsilon of every BN in the model (Paddle's default); folding uses the same value.
BN_EPS = 1e-5


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    p = (k - 1) // 2
    return ((p, p), (p, p))


def batch_norm(
    train: bool, dtype: Dtype, param_dtype: Dtype, name: str, axis_name: str | None = None
) -> nn.BatchNorm:
    """BatchNorm with Paddle settings: running = 0.9*running + 0.1*batch, eps 1e-5, biased var.

    `axis_name` (a mesh axis) averages batch statistics across devices (sync BN); None keeps
    per-device statistics as the reference's multi-GPU training does.
    """
    return nn.BatchNorm(
        use_running_average=not train,
        axis_name=axis_name if train else None,
        momentum=0.9,
        epsilon=BN_EPS,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def conv2d(
    features: int,
    k: int,
    stride: int = 1,
    groups: int = 1,
    use_bias: bool = False,
    kernel_init=kaiming_normal,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A k x k conv with explicit symmetric padding (k-1)//2."""
    return nn.Conv(
        features,
        kernel_size=(k, k),
        strides=(stride, stride),
        padding=_pad(k),
        feature_group_count=groups,
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class DepthwiseConv(nn.Module):
    """Depthwise k x k conv (groups = channels) with symmetric padding (k-1)//2.

    Same parameters as `nn.Conv(feature_group_count=C)`: `kernel` [k, k, 1, C] (+ `bias`), so
    the two are interchangeable; only the lowering differs (`jaxrec.ops.depthwise`: shifted
    slices on CPU, the grouped conv elsewhere).
    """

    features: int
    kernel_size: int
    stride: int = 1
    use_bias: bool = False
    kernel_init: Any = kaiming_normal
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, c = self.kernel_size, self.stride, self.features
        if x.shape[-1] != c:
            raise ValueError(f"depthwise conv over {c} channels got input {x.shape}")
        kernel = self.param("kernel", self.kernel_init, (k, k, 1, c), self.param_dtype)
        bias = (
            self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
            if self.use_bias
            else None
        )
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        y = depthwise_conv(x, kernel, s, (k - 1) // 2)
        if bias is not None:
            y = y + bias.astype(self.dtype)
        return y


class ConvBN(nn.Module):
    """Conv (no bias, KaimingNormal) -> BatchNorm -> optional ReLU. Keys `conv`, `bn`.

    `fold_bn=True` is the BN-folded inference form (`jaxrec.models.fold`): the conv carries a
    bias and there is no `bn`.
    """

    features: int
    kernel_size: int
    stride: int = 1
    groups: int = 1
    act: bool = True
    fold_bn: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.groups > 1 and self.groups == self.features == x.shape[-1]:
            x = DepthwiseConv(
                self.features,
                self.kernel_size,
                self.stride,
                use_bias=self.fold_bn,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="conv",
            )(x)
        else:
            x = conv2d(
                self.features,
                self.kernel_size,
                self.stride,
                self.groups,
                use_bias=self.fold_bn,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="conv",
            )(x)
        if not self.fold_bn:
            x = batch_norm(train, self.dtype, self.param_dtype, "bn", self.bn_axis_name)(x)
        if self.act:
            x = nn.relu(x)
        return x


class SE(nn.Module):
    """Squeeze-excitation on C channels (reduction 4) with a plain logistic sigmoid gate."""

    channels: int
    reduction: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, r = self.channels, self.channels // self.reduction
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = conv2d(
            r,
            1,
            use_bias=True,
            kernel_init=paddle_default_conv_init(c, 1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv1",
        )(s)
        s = nn.relu(s)
        s = conv2d(
            c,
            1,
            use_bias=True,
            kernel_init=paddle_default_conv_init(r, 1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv2",
        )(s)
        return x * nn.sigmoid(s)


def rep_kernel_sizes(dw_size: int, stride: int) -> list[int]:
    """Branch kernel sizes of a rep block: dw, dw-2, ..., 1; the 1x1 branch only at stride 1."""
    return [k for k in range(dw_size, 0, -2) if not (k == 1 and stride != 1)]


class RepDepthwiseSeparable(nn.Module):
    """Depthwise (optionally multi-branch re-parameterizable) + SE + pointwise block (ref §2.1).

    Training form (`deploy=False`, `use_rep`): sum of BN(DWConv_k(x)) over the branches
    `dw_conv_list_{i}`, then ReLU. Deploy form (`deploy=True`, `use_rep`): ReLU(DWConv(x) + b)
    with one fused `dw_conv` (kernel dw_size, with bias). The training form deliberately does not
    create Paddle's unused `dw_conv` fusion-target tensors: they never get a gradient, and
    `reparameterize` recomputes them exactly. `fold_bn` (with `deploy`) folds every other BN.
    """

    in_channels: int
    out_channels: int
    stride: int
    dw_size: int = 3
    split_pw: bool = False
    use_rep: bool = False
    use_se: bool = False
    use_shortcut: bool = False
    deploy: bool = False
    fold_bn: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @property
    def has_shortcut(self) -> bool:
        return self.use_shortcut and self.stride == 1 and self.in_channels == self.out_channels

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bkw = dict(kw, bn_axis_name=self.bn_axis_name, fold_bn=self.fold_bn)
        c = self.in_channels
        inp = x
        if self.use_rep and self.deploy:
            x = DepthwiseConv(
                c,
                self.dw_size,
                self.stride,
                use_bias=True,
                kernel_init=paddle_default_conv_init(c, self.dw_size),
                name="dw_conv",
                **kw,
            )(x)
            x = nn.relu(x)
        elif self.use_rep:
            y = None
            for i, k in enumerate(rep_kernel_sizes(self.dw_size, self.stride)):
                b = ConvBN(c, k, self.stride, groups=c, act=False, name=f"dw_conv_list_{i}", **bkw)(
                    x, train
                )
                y = b if y is None else y + b
            x = nn.relu(y)
        else:
            x = ConvBN(c, self.dw_size, self.stride, groups=c, act=True, name="dw_conv", **bkw)(
                x, train
            )
        if self.use_se:
            x = SE(c, name="se", **kw)(x)
        if self.split_pw:
            mid = int(self.out_channels * 0.5)
            x = ConvBN(mid, 1, name="pw_conv_1", **bkw)(x, train)
            x = ConvBN(self.out_channels, 1, name="pw_conv_2", **bkw)(x, train)
        else:
            x = ConvBN(self.out_channels, 1, name="pw_conv", **bkw)(x, train)
        if self.has_shortcut:
            x = x + inp
        return x


class DownscaleInInferDropout(nn.Module):
    """Paddle Dropout(mode="downscale_in_infer").

    train: x * mask with mask ~ Bernoulli(keep = 1 - p) and NO 1/(1-p) rescale (rng "dropout");
    eval: x * (1 - p).
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.rate == 0.0:
            return x
        if not train:
            return x * jnp.asarray(1.0 - self.rate, x.dtype)
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate, x.shape)
        return jnp.where(keep, x, jnp.zeros_like(x))
