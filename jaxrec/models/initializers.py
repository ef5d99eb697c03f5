"""Parameter initializers (ref §2.8) that draw their numbers on the host with numpy.

XLA compiles every random initializer into its own kernel; for ~170 parameters that costs tens
of seconds on a small CPU for the full-size model (BENCHMARKS.md), far more than the draw. These
initializers are `jax.pure_callback`s seeded from the flax-provided key, so `model.init` (jitted
or not) compiles in a few seconds and stays deterministic in the key. They work with typed and
legacy uint32 keys.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def _key_words(key: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return key.reshape(-1).astype(jnp.uint32)


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) with flax's convention: last axis out, second-to-last in."""
    if len(shape) < 2:
        return shape[0] if shape else 1, shape[0] if shape else 1
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


@dataclasses.dataclass(frozen=True)
class HostInit:
    """kind "normal": N(mean, std); "uniform": U(-limit, limit).

    `std`/`limit` may instead come from the shape: mode "fan_in" (std sqrt(gain/fan_in)) or
    "fan_avg" (sqrt(gain / ((fan_in+fan_out)/2)), the Xavier form).
    """

    kind: str = "normal"
    std: float | None = None
    mean: float = 0.0
    mode: str | None = None
    gain: float = 1.0

    def scale(self, shape: tuple[int, ...]) -> float:
        if self.mode is None:
            assert self.std is not None
            return self.std
        fan_in, fan_out = _fans(shape)
        fan = fan_in if self.mode == "fan_in" else (fan_in + fan_out) / 2
        if self.kind == "uniform":
            return math.sqrt(3.0 * self.gain / fan)
        return math.sqrt(self.gain / fan)

    def sample(self, words: np.ndarray, shape: tuple[int, ...], dtype) -> np.ndarray:
        rng = np.random.default_rng(np.asarray(words, np.uint32))
        s = self.scale(shape)
        if self.kind == "uniform":
            v = rng.uniform(-s, s, shape)
        else:
            v = rng.normal(self.mean, s, shape)
        return v.astype(dtype)

    def __call__(self, key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        shape = tuple(int(d) for d in shape)
        dtype = jnp.dtype(dtype)
        return jax.pure_callback(
            lambda w: self.sample(w, shape, dtype),
            jax.ShapeDtypeStruct(shape, dtype),
            _key_words(key),
        )


# KaimingNormal: plain (untruncated) normal, std sqrt(2 / fan_in), fan_in = k*k*in/groups.
kaiming_normal = HostInit("normal", mode="fan_in", gain=2.0)
# Paddle XavierNormal / XavierUniform.
xavier_normal = HostInit("normal", mode="fan_avg", gain=1.0)
xavier_uniform = HostInit("uniform", mode="fan_avg", gain=1.0)


def normal(std: float, mean: float = 0.0) -> HostInit:
    return HostInit("normal", std=float(std), mean=float(mean))


def paddle_default_conv_init(in_channels: int, kernel_size: int) -> HostInit:
    """Paddle's default Conv2D weight init: N(0, sqrt(2 / (k*k*in_channels))), full in_channels.

    For groups == 1 this equals `kaiming_normal`; it differs for grouped convs, whose fan_in
    Paddle still counts with the full channel number.
    """
    return normal((2.0 / (kernel_size * kernel_size * in_channels)) ** 0.5)
