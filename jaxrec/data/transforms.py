"""Training augmentations with PaddleClas semantics and explicit random parameters (ref §6.3).

The reference train chain after decoding is::

    ResizeImage(224) -> RandFlipImage(1) -> Pad(10) -> RandCropImageV2(224)
    -> RandomRotation(p=0.5, 90 deg, bilinear) -> ResizeImage(224) [-> NormalizeImage on device]

Randomness is split from computation: :meth:`TrainTransform.sample` draws an :class:`AugParams`
from a numpy ``Generator`` (seeded per (seed, epoch, index) by :func:`rng_for`), and
:meth:`TrainTransform.apply` is a pure function of the image and those parameters. The same
parameters can therefore be fed to the reference for golden tests. The distributions match the
reference draws (``random.randint`` both ends inclusive, ``np.random.random() < p``,
``random.uniform``); the generator differs.

:func:`warp_affine` calls OpenCV's ``warpAffine`` (uint8, ``INTER_LINEAR``, constant border), as
PaddleClas does. :func:`warp_affine_reference` is its numpy port, the reference the tests compare
it with: coordinates quantized to 1/32 px through OpenCV's 10-bit fixed-point steps
(``INTER_BITS=5``), 15-bit bilinear weights (``INTER_REMAP_COEF_BITS``) and its border rule;
bit-exact with OpenCV 4.6 (tests/fixtures, tools/golden_transforms.py) and 4.14. OpenCV 5.x rounds
differently, which is why jaxrec pins OpenCV 4 (``jaxrec.data.image``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from jaxrec.data.image import IMAGENET_MEAN, IMAGENET_STD, cv2, resize_bilinear

_AB_BITS = 10
_AB_SCALE = 1 << _AB_BITS
_INTER_BITS = 5
_INTER_TAB = 1 << _INTER_BITS
_ROUND_DELTA = _AB_SCALE // _INTER_TAB // 2
_COEF_BITS = 15


def rng_for(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation generator of sample ``index`` in ``epoch``: independent of order/workers."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence((seed, epoch, index, 0xA5))))


# --------------------------------------------------------------------------------------------
# Primitive operations (pure).
# --------------------------------------------------------------------------------------------


def hflip(img: np.ndarray) -> np.ndarray:
    """``cv2.flip(img, 1)``: a new contiguous array (numpy's reversed-stride copy is slower)."""
    if cv2 is None:
        return np.ascontiguousarray(img[:, ::-1])
    return cv2.flip(np.ascontiguousarray(img), 1).reshape(img.shape)


def pad_constant(img: np.ndarray, padding: int, fill: int = 0) -> np.ndarray:
    """``cv2.copyMakeBorder(img, p, p, p, p, BORDER_CONSTANT, value=fill)``."""
    h, w = img.shape[:2]
    out = np.full((h + 2 * padding, w + 2 * padding) + img.shape[2:], fill, dtype=img.dtype)
    out[padding : padding + h, padding : padding + w] = img
    return out


def crop_v2(img: np.ndarray, top: int, left: int, size: tuple[int, int]) -> np.ndarray:
    """``RandCropImageV2`` slicing: ``img[top:top+th, left:left+tw]`` (may run past the edge)."""
    th, tw = size
    h, w = img.shape[:2]
    if h == th and w == tw:
        return img
    return img[top : top + th, left : left + tw]


def pad_crop(
    img: np.ndarray, padding: int, top: int, left: int, size: tuple[int, int]
) -> np.ndarray:
    """``crop_v2(pad_constant(img, padding), top, left, size)`` without the padded intermediate.

    One zero-filled output and one block copy, including RandCropImageV2's windows that run past
    the padded image (they come out one row or column short, as slicing makes them).
    """
    h, w = img.shape[:2]
    ph, pw = h + 2 * padding, w + 2 * padding
    if (ph, pw) == tuple(size):
        return pad_constant(img, padding)
    r0, r1 = min(top, ph), min(top + size[0], ph)
    c0, c1 = min(left, pw), min(left + size[1], pw)
    out = np.zeros((r1 - r0, c1 - c0) + img.shape[2:], img.dtype)
    sr0, sr1 = max(r0 - padding, 0), min(r1 - padding, h)
    sc0, sc1 = max(c0 - padding, 0), min(c1 - padding, w)
    if sr1 > sr0 and sc1 > sc0:
        dr, dc = sr0 + padding - r0, sc0 + padding - c0
        out[dr : dr + sr1 - sr0, dc : dc + sc1 - sc0] = img[sr0:sr1, sc0:sc1]
    return out


def rotation_matrix(angle: float, center: tuple[float, float], scale: float = 1.0) -> np.ndarray:
    """``cv2.getRotationMatrix2D``: 2x3 float64, positive angle = counter-clockwise on screen.

    OpenCV takes the centre as float32 ``Point2f``; the angle and products are double.
    """
    cx, cy = (float(np.float32(c)) for c in center)
    a = angle * (math.pi / 180.0)
    alpha = math.cos(a) * scale
    beta = math.sin(a) * scale
    return np.array(
        [
            [alpha, beta, (1.0 - alpha) * cx - beta * cy],
            [-beta, alpha, beta * cx + (1.0 - alpha) * cy],
        ],
        dtype=np.float64,
    )


def _invert_affine(m: np.ndarray) -> tuple[float, ...]:
    """``cv2.invertAffineTransform`` with the exact double operation order."""
    m0, m1, m2 = (float(v) for v in m[0])
    m3, m4, m5 = (float(v) for v in m[1])
    d = m0 * m4 - m1 * m3
    d = 1.0 / d if d != 0 else 0.0
    a11, a22, a12, a21 = m4 * d, m0 * d, -m1 * d, -m3 * d
    b1 = -a11 * m2 - a12 * m5
    b2 = -a21 * m2 - a22 * m5
    return a11, a12, b1, a21, a22, b2


def warp_affine(
    img: np.ndarray, matrix: np.ndarray, out_size: tuple[int, int] | None = None, fill: int = 0
) -> np.ndarray:
    """``cv2.warpAffine(img, matrix, (w, h), flags=INTER_LINEAR, borderValue=fill)`` for uint8.

    ``matrix`` maps source to destination (OpenCV inverts it). ``out_size`` is (h, w), default
    the input size. Equal to :func:`warp_affine_reference` bit for bit.
    """
    if img.dtype != np.uint8:
        raise TypeError(f"warp_affine expects uint8, got {img.dtype}")
    if cv2 is None or (img.ndim == 3 and img.shape[2] > 4):
        return warp_affine_reference(img, matrix, out_size, fill)
    oh, ow = img.shape[:2] if out_size is None else out_size
    out = cv2.warpAffine(
        np.ascontiguousarray(img),
        np.asarray(matrix, dtype=np.float64),
        (int(ow), int(oh)),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(fill,) * 4,
    )
    return out[:, :, None] if img.ndim == 3 and out.ndim == 2 else out


def warp_affine_reference(
    img: np.ndarray, matrix: np.ndarray, out_size: tuple[int, int] | None = None, fill: int = 0
) -> np.ndarray:
    """:func:`warp_affine` in numpy: a port of OpenCV 4's fixed-point ``warpAffine``.

    Destination -> source coordinates in units of 1/1024 px rounded half-to-even, reduced to
    1/32 px (floor), then 15-bit integer bilinear weights with rounding. A pixel whose 2x2
    neighbourhood is entirely outside gets ``fill``; partly outside neighbourhoods use ``fill``
    for the missing samples.
    """
    if img.dtype != np.uint8:
        raise TypeError(f"warp_affine expects uint8, got {img.dtype}")
    squeeze = img.ndim == 2
    src = img[:, :, None] if squeeze else img
    h, w, c = src.shape
    oh, ow = (h, w) if out_size is None else out_size
    m0, m1, m2, m3, m4, m5 = _invert_affine(np.asarray(matrix, dtype=np.float64))

    xs = np.arange(ow, dtype=np.float64)
    ys = np.arange(oh, dtype=np.float64)
    adelta = np.rint(m0 * xs * _AB_SCALE).astype(np.int32)
    bdelta = np.rint(m3 * xs * _AB_SCALE).astype(np.int32)
    x0 = np.rint((m1 * ys + m2) * _AB_SCALE).astype(np.int32) + _ROUND_DELTA
    y0 = np.rint((m4 * ys + m5) * _AB_SCALE).astype(np.int32) + _ROUND_DELTA
    sh = _AB_BITS - _INTER_BITS
    fx = (x0[:, None] + adelta[None, :]) >> sh
    fy = (y0[:, None] + bdelta[None, :]) >> sh
    sx = fx >> _INTER_BITS
    sy = fy >> _INTER_BITS
    # Fully outside (2x2 block misses the image): fill; otherwise missing samples read fill via
    # a one-pixel constant frame around the source.
    outside = (sx >= w) | (sx < -1) | (sy >= h) | (sy < -1)
    wp = w + 2
    idx = ((np.clip(sy, -1, h - 1) + 1) * wp + (np.clip(sx, -1, w - 1) + 1)).astype(np.intp)
    ax1 = (fx & (_INTER_TAB - 1)).astype(np.uint64)
    ax0 = np.uint64(_INTER_TAB) - ax1
    ay1 = (fy & (_INTER_TAB - 1))[..., None]
    ay0 = _INTER_TAB - ay1
    # OpenCV's weights are (32-ax)(32-ay)*32 etc. (exact in its float table), summing to 1 << 15;
    # the *32 and the 15-bit rounding shift reduce to (sum + 512) >> 10. The sum is taken in two
    # exact integer stages: horizontal, with up to four channels in the 16-bit lanes of one
    # uint64 (a lane never exceeds 255 * 32), then vertical in int32.
    half = 1 << (_COEF_BITS - 1 - 5)
    shift = _COEF_BITS - 5
    out = np.empty((oh, ow, c), dtype=np.uint8)
    for start in range(0, c, 4):
        ng = min(4, c - start)
        framed = np.full((h + 2, wp, 4), fill, dtype=np.uint16)
        framed[1:-1, 1:-1, :ng] = src[:, :, start : start + ng]
        packed = framed.reshape(-1).view(np.uint64)
        top = ax0 * packed[idx] + ax1 * packed[idx + 1]
        bot = ax0 * packed[idx + wp] + ax1 * packed[idx + wp + 1]
        top16 = top.view(np.uint16).reshape(oh, ow, 4)[:, :, :ng]
        bot16 = bot.view(np.uint16).reshape(oh, ow, 4)[:, :, :ng]
        acc = ay0 * top16.astype(np.int32)
        acc += ay1 * bot16
        acc += half
        acc >>= shift
        out[:, :, start : start + ng] = acc
    out[outside] = fill
    return out[:, :, 0] if squeeze else out


def rotate(img: np.ndarray, angle: float, fill: int = 0) -> np.ndarray:
    """Paddle ``F.rotate`` on numpy (cv2 backend): centre (w/2, h/2), bilinear, same size."""
    h, w = img.shape[:2]
    return warp_affine(img, rotation_matrix(angle, (w / 2.0, h / 2.0)), (h, w), fill)


def erase(img: np.ndarray, box: tuple[int, int, int, int], value: Sequence[int]) -> np.ndarray:
    """Fill ``img[top:top+h, left:left+w]`` with ``value`` (a copy; the input is untouched)."""
    top, left, h, w = box
    out = img.copy()
    out[top : top + h, left : left + w] = np.asarray(value, dtype=img.dtype)
    return out


def normalized_to_uint8(mean_norm: Sequence[float]) -> tuple[int, int, int]:
    """The uint8 RGB colour whose ImageNet normalization is closest to ``mean_norm``.

    PaddleClas's RandomErasing writes its ``mean`` into the *normalized* image; the pipeline here
    stays uint8 until the device, so the fill is mapped back (error below 0.5/255/std).
    """
    vals = []
    for m, mu, sd in zip(mean_norm, IMAGENET_MEAN, IMAGENET_STD, strict=True):
        vals.append(int(np.clip(np.rint((m * sd + mu) * 255.0), 0, 255)))
    return tuple(vals)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# The train chain with explicit parameters.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AugParams:
    """Every random decision of one training sample.

    ``top``/``left`` are the RandCropImageV2 offsets in the padded image; ``angle`` is used only
    when ``rotate``; ``erase_box`` is (top, left, h, w) in the final image or None.
    """

    flip: bool
    top: int
    left: int
    rotate: bool
    angle: float
    erase_box: tuple[int, int, int, int] | None = None


@dataclasses.dataclass(frozen=True)
class RandomErasingConfig:
    """PaddleClas ``RandomErasing`` (mode ``const``) applied to the final uint8 image.

    ``mean`` is the fill in normalized space (PaddleClas's value). ``fill`` is the uint8 RGB
    colour actually written; when None it is derived from ``mean`` with ImageNet's normalization
    (:func:`normalized_to_uint8`). The config resolver sets it from the run's own normalization.
    """

    prob: float = 0.5
    sl: float = 0.02
    sh: float = 0.4
    r1: float = 0.3
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    attempt: int = 100
    use_log_aspect: bool = False
    fill: tuple[int, int, int] | None = None

    @property
    def fill_rgb(self) -> tuple[int, int, int]:
        """The uint8 RGB colour of erased pixels."""
        return normalized_to_uint8(self.mean) if self.fill is None else self.fill


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """The PP-ShiTuV2 train augmentation chain (ref §6.3) on decoded uint8 RGB images.

    Defaults are the reference config. ``flip``/``pad``/``rotate_prob`` can switch steps off
    (``pad=0`` removes Pad; RandCropImageV2 then returns a 224 image unchanged).
    """

    size: int = 224
    flip: bool = True
    pad: int = 10
    crop: bool = True
    rotate_prob: float = 0.5
    degrees: float = 90.0
    erasing: RandomErasingConfig | None = None

    def sample(self, rng: np.random.Generator) -> AugParams:
        """Draw the random parameters with the reference distributions."""
        flip = bool(self.flip and rng.integers(0, 2) == 1)
        top = left = 0
        span = self.size + 2 * self.pad
        if self.crop and span != self.size:
            # random.randint(0, H - th + 1): both ends inclusive.
            top = int(rng.integers(0, span - self.size + 2))
            left = int(rng.integers(0, span - self.size + 2))
        rot = bool(rng.random() < self.rotate_prob)
        angle = float(rng.uniform(-self.degrees, self.degrees)) if rot else 0.0
        box = self._sample_erase(rng) if self.erasing is not None else None
        return AugParams(flip=flip, top=top, left=left, rotate=rot, angle=angle, erase_box=box)

    def _sample_erase(self, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
        cfg = self.erasing
        assert cfg is not None
        if rng.random() > cfg.prob:
            return None
        area = self.size * self.size
        lo, hi = (
            (math.log(cfg.r1), math.log(1 / cfg.r1)) if cfg.use_log_aspect else (cfg.r1, 1 / cfg.r1)
        )
        for _ in range(cfg.attempt):
            target = rng.uniform(cfg.sl, cfg.sh) * area
            aspect = rng.uniform(lo, hi)
            if cfg.use_log_aspect:
                aspect = math.exp(aspect)
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < self.size and h < self.size:
                top = int(rng.integers(0, self.size - h + 1))
                left = int(rng.integers(0, self.size - w + 1))
                return (top, left, h, w)
        return None

    def prepare(self, img: np.ndarray) -> np.ndarray:
        """The deterministic first step (resize to ``size``); its result may be cached."""
        s = self.size
        return resize_bilinear(img, (s, s)) if img.shape[:2] != (s, s) else img

    def apply(self, img: np.ndarray, p: AugParams) -> np.ndarray:
        """Apply the chain to a decoded uint8 ``[H, W, 3]`` image; returns ``[size, size, 3]``."""
        return self.apply_prepared(self.prepare(img), p)

    def apply_prepared(self, x: np.ndarray, p: AugParams) -> np.ndarray:
        """The random part of the chain, on the output of :meth:`prepare`."""
        s = self.size
        if p.flip:
            x = hflip(x)
        if self.crop:
            h, w = x.shape[0] + 2 * self.pad, x.shape[1] + 2 * self.pad
            if h + 1 < s or w + 1 < s:
                raise ValueError(f"crop {s} is larger than the padded image {(h, w)}")
            x = pad_crop(x, self.pad, p.top, p.left, (s, s))
        elif self.pad:
            x = pad_constant(x, self.pad)
        if p.rotate:
            x = rotate(np.ascontiguousarray(x), p.angle)
        if x.shape[:2] != (s, s):
            x = resize_bilinear(np.ascontiguousarray(x), (s, s))
        if p.erase_box is not None:
            assert self.erasing is not None
            x = erase(x, p.erase_box, self.erasing.fill_rgb)
        return np.ascontiguousarray(x)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.apply(img, self.sample(rng))
