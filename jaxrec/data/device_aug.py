"""The random part of the train chain on the accelerator, inside the jitted step, on uint8 batches.

With ``DataLoader.Train.augment_on_device`` the host only decodes and resizes each image to
size x size (``TrainTransform.prepare``; ``TrainLoader(..., augment_on_host=False)``), and
:class:`DeviceAugment` applies the rest of the PP-ShiTuV2 chain to the uint8 batch on device:

    RandFlipImage -> Pad(p) -> RandCropImageV2(size) -> RandomRotation -> ResizeImage(size)
    -> RandomErasing

with the same parameter distributions as :meth:`TrainTransform.sample` (flip with p 0.5; crop
offsets uniform on 0..2p+1, both ends inclusive, so a crop can run one pixel past the padded
image and is then resized back; rotation with ``rotate_prob`` by an angle uniform in
[-degrees, degrees] about the crop's centre; erasing with PaddleClas's attempt loop, here all
``attempt`` draws made at once and the first one that fits taken).

It is the same transform family, not bit-exact: flip, pad, crop and rotation and the final
resize are folded into one inverse map per output pixel, sampled bilinearly once (the host
samples twice when it rotates and resizes), with OpenCV's border rules (black outside the
padded image and outside the rotated crop, edge replication for the resize) and float weights
instead of OpenCV's fixed-point ones. Without rotation and with a full-size crop the result is
exactly the host's. tests/test_device_aug.py checks both the images for given parameters and
the parameter distributions against the host's.

Randomness comes only from the ``rng`` argument, so a step is a pure function of (images, rng):
the training step derives ``rng`` from (seed, step) and folds in the device index (each device
augments its own shard differently), which makes on-device augmentation exactly resumable.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxrec.data.transforms import TrainTransform


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceAugParams:
    """Per-image random decisions, arrays of shape [B] (the device twin of ``AugParams``).

    ``erase`` tells whether the box (``erase_top``, ``erase_left``, ``erase_h``, ``erase_w``)
    is filled.
    """

    flip: jax.Array
    top: jax.Array
    left: jax.Array
    rotate: jax.Array
    angle: jax.Array
    erase: jax.Array
    erase_top: jax.Array
    erase_left: jax.Array
    erase_h: jax.Array
    erase_w: jax.Array


@dataclasses.dataclass(frozen=True)
class DeviceAugment:
    """The random part of a :class:`TrainTransform`, as a jittable function of (images, rng)."""

    transform: TrainTransform = TrainTransform()

    @classmethod
    def from_transform(cls, t: TrainTransform) -> DeviceAugment:
        return cls(t)

    @property
    def size(self) -> int:
        return self.transform.size

    # -- parameters ---------------------------------------------------------------------------

    def sample(self, rng: jax.Array, n: int) -> DeviceAugParams:
        """Draw the parameters of ``n`` images with the host chain's distributions."""
        t = self.transform
        k_flip, k_top, k_left, k_rot, k_angle, k_erase = jax.random.split(rng, 6)
        span = t.size + 2 * t.pad
        zeros = jnp.zeros((n,), jnp.int32)
        flip = jax.random.bernoulli(k_flip, 0.5, (n,)) if t.flip else zeros.astype(bool)
        if t.crop and span != t.size:
            hi = span - t.size + 2  # randint(0, span - size + 1), both ends inclusive
            top = jax.random.randint(k_top, (n,), 0, hi)
            left = jax.random.randint(k_left, (n,), 0, hi)
        else:
            top = left = zeros
        rotate = jax.random.uniform(k_rot, (n,)) < t.rotate_prob
        angle = jax.random.uniform(k_angle, (n,), minval=-t.degrees, maxval=t.degrees)
        angle = jnp.where(rotate, angle, 0.0)
        erase = self._sample_erase(k_erase, n)
        return DeviceAugParams(flip, top, left, rotate, angle, *erase)

    def _sample_erase(self, rng: jax.Array, n: int) -> tuple[jax.Array, ...]:
        cfg, s = self.transform.erasing, self.size
        if cfg is None:
            z = jnp.zeros((n,), jnp.int32)
            return z.astype(bool), z, z, z, z
        k_p, k_area, k_aspect, k_top, k_left = jax.random.split(rng, 5)
        shape = (n, cfg.attempt)
        target = jax.random.uniform(k_area, shape, minval=cfg.sl, maxval=cfg.sh) * (s * s)
        if cfg.use_log_aspect:
            lo, hi = math.log(cfg.r1), math.log(1 / cfg.r1)
            aspect = jnp.exp(jax.random.uniform(k_aspect, shape, minval=lo, maxval=hi))
        else:
            aspect = jax.random.uniform(k_aspect, shape, minval=cfg.r1, maxval=1 / cfg.r1)
        h = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
        w = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
        fits = (h < s) & (w < s)
        first = jnp.argmax(fits, axis=1)  # the first attempt that fits, as the loop takes it
        h = jnp.take_along_axis(h, first[:, None], axis=1)[:, 0]
        w = jnp.take_along_axis(w, first[:, None], axis=1)[:, 0]
        erase = (jax.random.uniform(k_p, (n,)) <= cfg.prob) & fits.any(axis=1)
        h, w = jnp.where(erase, h, 0), jnp.where(erase, w, 0)
        top = jax.random.randint(k_top, (n,), 0, s - h + 1)
        left = jax.random.randint(k_left, (n,), 0, s - w + 1)
        return erase, top, left, h, w

    # -- images -------------------------------------------------------------------------------

    def apply(self, images: jax.Array, p: DeviceAugParams) -> jax.Array:
        """Augment uint8 ``[B, size, size, C]`` with given parameters; returns the same shape."""
        t = self.transform
        b, s = images.shape[0], t.size
        if images.shape[1:3] != (s, s):
            raise ValueError(
                f"DeviceAugment({s}) needs [B, {s}, {s}, C] images, got {images.shape}"
            )
        span = s + 2 * t.pad
        f32 = jnp.float32
        # Crop window in the padded image (RandCropImageV2 slicing may cut it one pixel short).
        ch = jnp.minimum(s, span - p.top).astype(f32) if t.crop else jnp.full((b,), span, f32)
        cw = jnp.minimum(s, span - p.left).astype(f32) if t.crop else jnp.full((b,), span, f32)
        top, left = p.top.astype(f32), p.left.astype(f32)
        o = jnp.arange(s, dtype=f32)
        yo, xo = o[None, :, None], o[None, None, :]
        ch_, cw_ = ch[:, None, None], cw[:, None, None]
        # Final resize crop -> size x size: half-pixel centres, edge replication (cv2 INTER_LINEAR).
        yr = jnp.clip((yo + 0.5) * (ch_ / s) - 0.5, 0.0, ch_ - 1.0)
        xr = jnp.clip((xo + 0.5) * (cw_ / s) - 0.5, 0.0, cw_ - 1.0)
        # Rotation about the crop's centre (cv2.getRotationMatrix2D), inverted: output -> crop.
        rad = jnp.deg2rad(p.angle.astype(f32))[:, None, None]
        cos, sin = jnp.cos(rad), jnp.sin(rad)
        cx, cy = cw_ / 2.0, ch_ / 2.0
        xc = cos * (xr - cx) - sin * (yr - cy) + cx
        yc = sin * (xr - cx) + cos * (yr - cy) + cy
        x0, y0 = jnp.floor(xc), jnp.floor(yc)
        fx, fy = (xc - x0)[..., None], (yc - y0)[..., None]
        flat = images.reshape(b, s * s, -1).astype(f32)
        flip = p.flip[:, None, None]

        def tap(yi: jax.Array, xi: jax.Array) -> jax.Array:
            # Inside the rotated crop and inside the image (not the black padding), else black.
            iy = yi + top[:, None, None] - t.pad
            ix = xi + left[:, None, None] - t.pad
            ok = (yi >= 0) & (yi < ch_) & (xi >= 0) & (xi < cw_)
            ok &= (iy >= 0) & (iy < s) & (ix >= 0) & (ix < s)
            ix = jnp.where(flip, s - 1 - ix, ix)
            idx = (jnp.clip(iy, 0, s - 1) * s + jnp.clip(ix, 0, s - 1)).astype(jnp.int32)
            v = jnp.take_along_axis(flat, idx.reshape(b, -1, 1), axis=1).reshape(b, s, s, -1)
            return jnp.where(ok[..., None], v, 0.0)

        out = (1 - fy) * ((1 - fx) * tap(y0, x0) + fx * tap(y0, x0 + 1)) + fy * (
            (1 - fx) * tap(y0 + 1, x0) + fx * tap(y0 + 1, x0 + 1)
        )
        out = jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)
        if t.erasing is not None:
            yy, xx = jnp.arange(s)[None, :, None], jnp.arange(s)[None, None, :]
            et, el = p.erase_top[:, None, None], p.erase_left[:, None, None]
            box = (yy >= et) & (yy < et + p.erase_h[:, None, None])
            box &= (xx >= el) & (xx < el + p.erase_w[:, None, None])
            box &= p.erase[:, None, None]
            fill = jnp.asarray(t.erasing.fill_rgb, jnp.uint8)
            out = jnp.where(box[..., None], fill, out)
        return out

    def __call__(self, images: jax.Array, rng: jax.Array) -> jax.Array:
        """Augment uint8 ``[B, size, size, 3]`` images; a pure function of (images, rng)."""
        return self.apply(images, self.sample(rng, images.shape[0]))
