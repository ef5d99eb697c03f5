"""Building blocks of PP-LCNetV2 (spec 2.1): ConvBN, SE, RepDepthwiseSeparable, Dropout.

Everything is NHWC. Convolutions use explicit symmetric padding (k-1)//2 on every side (never
"SAME", which pads stride-2 convs asymmetrically and breaks Paddle weight compatibility).
Parameter and module names mirror the Paddle state-dict keys so that conversion is a rename
(see `jaxrec.models.naming`).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.models.initializers import kaiming_normal, paddle_default_conv_init

Dtype = Any


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
        epsilon=1e-5,
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


def _depthwise_impl() -> str:
    """ "shift" (sum of k*k shifted slices) on CPU, where XLA's grouped conv is 10-70x slower;
    "conv" (lax grouped conv, cuDNN on GPU) elsewhere. JAXREC_DW_IMPL=shift|conv overrides."""
    impl = os.environ.get("JAXREC_DW_IMPL", "auto")
    if impl == "auto":
        return "shift" if jax.default_backend() == "cpu" else "conv"
    if impl not in ("shift", "conv"):
        raise ValueError(f"JAXREC_DW_IMPL={impl!r}: use auto, shift or conv")
    return impl


def _taps(xp: jax.Array, k: int, s: int, out_hw: tuple[int, int], offset: int = 0):
    """The k*k strided windows of `xp` (tap (i, j) starts at offset+i, offset+j)."""
    n, _, _, c = xp.shape
    ho, wo = out_hw
    for i in range(k):
        for j in range(k):
            a, b = offset + i, offset + j
            yield (
                i,
                j,
                jax.lax.slice(
                    xp,
                    (0, a, b, 0),
                    (n, a + s * (ho - 1) + 1, b + s * (wo - 1) + 1, c),
                    (1, s, s, 1),
                ),
            )


def _acc_dtype(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


def _dw_forward(x: jax.Array, kernel: jax.Array, s: int, p: int) -> jax.Array:
    n, h, w, c = x.shape
    k = kernel.shape[0]
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    acc = _acc_dtype(x.dtype)
    y = jnp.zeros((n, ho, wo, c), acc)
    for i, j, win in _taps(xp, k, s, (ho, wo)):
        y = y + (win * kernel[i, j, 0]).astype(acc)
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_shift(x: jax.Array, kernel: jax.Array, s: int, p: int) -> jax.Array:
    """Depthwise conv (NHWC, kernel [k,k,1,C], stride s, symmetric padding p) as a sum of k*k
    shifted strided slices. Its gradient is written the same way (one pad of the dilated
    output gradient, then k*k slices), which XLA compiles far faster than the autodiff form."""
    return _dw_forward(x, kernel, s, p)


def _dw_fwd(x, kernel, s, p):
    return _dw_forward(x, kernel, s, p), (x, kernel)


def _dw_bwd(s, p, res, dy):
    x, kernel = res
    n, h, w, c = x.shape
    k = kernel.shape[0]
    ho, wo = dy.shape[1], dy.shape[2]
    acc = _acc_dtype(x.dtype)
    # d kernel[i, j] = sum over n, a, b of xp[n, i + s*a, j + s*b] * dy[n, a, b]
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    dk = jnp.stack(
        [jnp.sum((win * dy).astype(acc), axis=(0, 1, 2)) for _, _, win in _taps(xp, k, s, (ho, wo))]
    ).reshape(k, k, 1, c)
    # dx[q] = sum_r dyd[q + p + r - (k-1)] * kernel[k-1-r], dyd = dy dilated by s (zeros between)
    lh, lw = s * (ho - 1) + 1, s * (wo - 1) + 1
    dyp = jax.lax.pad(
        dy,
        jnp.zeros((), dy.dtype),
        ((0, 0, 0), (k - 1, h + p - lh, s - 1), (k - 1, w + p - lw, s - 1), (0, 0, 0)),
    )
    dx = jnp.zeros((n, h, w, c), acc)
    for r1, r2, win in _taps(dyp, k, 1, (h, w), offset=p):
        dx = dx + (win * kernel[k - 1 - r1, k - 1 - r2, 0]).astype(acc)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


depthwise_shift.defvjp(_dw_fwd, _dw_bwd)


class DepthwiseConv(nn.Module):
    """Depthwise k x k conv (groups = channels) with symmetric padding (k-1)//2.

    Same parameters as `nn.Conv(feature_group_count=C)`: `kernel` [k, k, 1, C] (+ `bias`), so
    the two are interchangeable; only the lowering differs (see `_depthwise_impl`).
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
        p = (k - 1) // 2
        if _depthwise_impl() == "conv":
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                (s, s),
                ((p, p), (p, p)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=c,
            )
        else:
            y = depthwise_shift(x, kernel, s, p)
        if bias is not None:
            y = y + bias.astype(self.dtype)
        return y


class ConvBN(nn.Module):
    """Conv (no bias, KaimingNormal) -> BatchNorm -> optional ReLU. Keys `conv`, `bn`."""

    features: int
    kernel_size: int
    stride: int = 1
    groups: int = 1
    act: bool = True
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
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="conv",
            )(x)
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
    """Depthwise (optionally multi-branch re-parameterizable) + SE + pointwise block (spec 2.1).

    Training form (`deploy=False`, `use_rep`): sum of BN(DWConv_k(x)) over the branches
    `dw_conv_list_{i}`, then ReLU. Deploy form (`deploy=True`, `use_rep`): ReLU(DWConv(x) + b)
    with one fused `dw_conv` (kernel dw_size, with bias). The training form deliberately does not
    create Paddle's unused `dw_conv` fusion-target tensors: they never get a gradient, and
    `reparameterize` recomputes them exactly.
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
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @property
    def has_shortcut(self) -> bool:
        return self.use_shortcut and self.stride == 1 and self.in_channels == self.out_channels

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bkw = dict(kw, bn_axis_name=self.bn_axis_name)
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
