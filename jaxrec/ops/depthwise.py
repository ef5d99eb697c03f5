"""Depthwise convolution, lowered per platform when the computation is lowered.

`depthwise_conv(x, kernel, stride, padding)` is one traced function with two lowerings chosen by
`jax.lax.platform_dependent`:

- CPU: a sum of k*k shifted strided slices (`depthwise_shift`) with a hand-written VJP. XLA:CPU
  runs grouped convolutions (`feature_group_count = C`) 4-10x slower than this (BENCHMARKS.md,
  "Depthwise convolutions on CPU"), and compiles the hand-written gradient far faster than the
  autodiff form of the slices.
- every other platform (CUDA, ROCm, TPU): `lax.conv_general_dilated` with
  `feature_group_count = C` (cuDNN's depthwise kernels on GPU).

Both lowerings are staged out; a jit lowered for one platform keeps only that platform's
branch, and a `jax.export` for several platforms carries both and picks one when the artifact
is compiled. So the platform the array lives on decides, never the process's default backend.

`forced_lowering("shift" | "conv")` traces every depthwise conv with one lowering on all
platforms; it is for benchmarks and tests that compare the two (see benchmarks/forward.py).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

LOWERINGS = ("shift", "conv")
_forced: str | None = None


@contextlib.contextmanager
def forced_lowering(name: str | None) -> Iterator[None]:
    """Within the block, trace depthwise convs with lowering `name` on every platform.

    For benchmarks and tests only. It acts when a function is traced, so use a fresh `jax.jit`
    (a jitted function traced earlier keeps the lowering it was traced with). None restores
    the per-platform choice.
    """
    global _forced
    if name is not None and name not in LOWERINGS:
        raise ValueError(f"depthwise lowering {name!r}: use one of {LOWERINGS} or None")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Depthwise conv of NHWC `x` with `kernel` [k, k, 1, C], stride `stride` and symmetric
    zero padding `padding` on both spatial dims (no bias)."""
    shift = functools.partial(depthwise_shift, s=stride, p=padding)
    conv = functools.partial(grouped_conv, stride=stride, padding=padding)
    if _forced == "shift":
        return shift(x, kernel)
    if _forced == "conv":
        return conv(x, kernel)
    return jax.lax.platform_dependent(x, kernel, cpu=shift, default=conv)


def grouped_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """The depthwise conv as lax's grouped convolution (one group per channel)."""
    p = padding
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        ((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


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


def _shift_forward(x: jax.Array, kernel: jax.Array, s: int, p: int) -> jax.Array:
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
    return _shift_forward(x, kernel, s, p)


def _shift_fwd(x, kernel, s, p):
    return _shift_forward(x, kernel, s, p), (x, kernel)


def _shift_bwd(s, p, res, dy):
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


depthwise_shift.defvjp(_shift_fwd, _shift_bwd)
