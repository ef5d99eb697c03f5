"""Image decoding, resizing and normalization with PaddleClas/OpenCV semantics.

PaddleClas decodes with ``cv2.imdecode(buf, IMREAD_COLOR)`` (then BGR -> RGB), resizes with
``cv2.resize(..., INTER_LINEAR)`` and normalizes with ``(float32(x) * scale - mean) / std``.

Each kernel has a fast form that calls OpenCV 4.x (the same library PaddleClas uses, 3-20x
faster than numpy) and a reference form written in Pillow/numpy that the tests compare it with,
bit for bit:

* :func:`decode_image` reads complete JPEG and PNG files with ``cv2.imdecode`` (libjpeg-turbo,
  libpng) and everything else, and every file OpenCV cannot read, with
  :func:`decode_image_reference`: Pillow plus the conversions OpenCV applies when it reads a file
  as 3-channel 8-bit colour (EXIF orientation, alpha dropped, 16-bit reduced to the high byte,
  CMYK converted with OpenCV's integer formula).
* :func:`resize_bilinear` is ``cv2.resize(INTER_LINEAR)``; :func:`resize_bilinear_reference` is a
  numpy port of OpenCV's fixed-point ``INTER_LINEAR`` path for ``uint8`` images (11-bit
  coefficients, a horizontal pass into int32 and a vertical pass with OpenCV's shift-and-round).
* :func:`normalize` works on numpy arrays and on jax arrays inside ``jit``.

OpenCV 5 changed its warpAffine rounding (see ``jaxrec.data.transforms``), so only OpenCV 4.10+
is used (4.10 added ``IMREAD_COLOR_RGB``, which decodes straight to RGB without a channel-reversing
copy). Without it, or with ``JAXREC_NO_OPENCV=1`` in the environment, every kernel runs its
reference form: same results, slower.
"""

from __future__ import annotations

import ctypes
import io
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxrec.errors import ImageDecodeError

log = logging.getLogger(__name__)


def _load_opencv() -> Any:
    """The ``cv2`` module if it is a usable 4.x (>= 4.10) and not disabled, else None."""
    if os.environ.get("JAXREC_NO_OPENCV", "") not in ("", "0"):
        return None
    try:
        import cv2  # noqa: PLC0415 - may be absent or disabled: the numpy kernels stand in
    except ImportError:
        log.warning("OpenCV is not installed: decoding and resizing use the slower numpy kernels")
        return None
    major, minor = (int(v) for v in cv2.__version__.split(".")[:2])
    if major != 4 or minor < 10:
        log.warning(
            "OpenCV %s is not 4.x >= 4.10 (pip install 'opencv-python-headless>=4.10,<5'): "
            "using the numpy kernels, which match OpenCV 4",
            cv2.__version__,
        )
        return None
    return cv2


#: The OpenCV module behind the fast kernels, or None when they fall back to the reference forms.
cv2 = _load_opencv()


def configure_decoding() -> None:
    """Process-wide settings for threads that decode and resize images (the loaders' pools).

    * OpenCV runs each call on the calling thread: the pools already use one thread per core,
      and OpenCV's own parallel resize would oversubscribe them (the setting is process-wide
      with OpenCV's pthreads backend).
    * glibc malloc keeps freed buffers up to 64 MiB in its heap instead of returning them to the
      kernel. By default every decoded photo (a few MB) gets fresh pages from ``mmap``, and
      faulting them in cost about as much CPU as the decode itself (BENCHMARKS.md, "Input
      pipeline: OpenCV kernels and the prepared set"). The process
      may keep up to 256 MiB of freed memory. ``JAXREC_NO_MALLOC_TUNING=1`` leaves malloc alone.
    """
    if cv2 is not None:
        cv2.setNumThreads(0)
    _tune_malloc()


_MALLOC_TUNED = False


def _tune_malloc() -> None:
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("JAXREC_NO_MALLOC_TUNING", "") not in ("", "0"):
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 64 << 20)
        libc.mallopt(m_trim_threshold, 256 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ``NormalizeImage`` scale of the training/eval configs.
SCALE_TRAIN = 1.0 / 255.0
#: ``NormalizeImage`` scale of ``deploy/configs/inference_rec.yaml``.
SCALE_DEPLOY = 0.00392157

# OpenCV's INTER_RESIZE_COEF_BITS / INTER_RESIZE_COEF_SCALE for 8-bit images.
_COEF_BITS = 11
_COEF_SCALE = 1 << _COEF_BITS

_EXIF_ORIENTATION = 0x0112
# Formats whose EXIF orientation OpenCV (4.6, checked) applies in imdecode; WebP/TIFF: not applied.
_EXIF_FORMATS = ("JPEG", "MPO", "PNG")


def _describe(name: str | None) -> str:
    return repr(name) if name else "<bytes>"


def read_bytes(path: str | os.PathLike) -> bytes:
    """Read a file, turning OS errors into messages that name the file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"image file {path!r} does not exist (check the path, or for list files whether it "
            "is relative to the list's folder)"
        ) from None
    except IsADirectoryError:
        raise ImageDecodeError(f"image path {path!r} is a directory, not an image file") from None
    except OSError as e:
        raise ImageDecodeError(f"cannot read image file {path!r}: {e}") from e


def _apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation tag (1..8) the way OpenCV's ``ExifTransform`` does."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    t = np.swapaxes(arr, 0, 1)
    if orientation == 5:
        return t
    if orientation == 6:
        return t[:, ::-1]
    if orientation == 7:
        return t[::-1, ::-1]
    if orientation == 8:
        return t[::-1]
    return arr


def _cmyk_to_rgb(cmyk_pil: np.ndarray) -> np.ndarray:
    """OpenCV's ``icvCvt_CMYK2BGR_8u_C4C3R`` on the values libjpeg returns.

    Pillow inverts CMYK JPEG samples when it reads them (Adobe convention), so the raw libjpeg
    values are ``255 - pillow``.
    """
    raw = 255 - cmyk_pil.astype(np.int32)
    k = raw[..., 3:4]
    rgb = k - (((255 - raw[..., :3]) * k) >> 8)
    return rgb.astype(np.uint8)


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Convert a loaded Pillow image of any mode to uint8 HWC RGB, OpenCV style."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("L", "1"):
        g = np.asarray(im.convert("L"), dtype=np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode.startswith("I;16"):
        g = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode in ("I", "F"):
        g = np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "CMYK":
        return _cmyk_to_rgb(np.asarray(im))
    if mode in ("RGBA", "RGBX", "RGBa"):
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8)[:, :, :3])
    if mode in ("LA", "La"):
        g = np.asarray(im, dtype=np.uint8)[:, :, 0]
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "PA":
        im = im.convert("RGBA")
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8)[:, :, :3])
    # P (palette: colours of the palette, transparency ignored), YCbCr, LAB, HSV, ...
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _orientation(im: Image.Image) -> int:
    """EXIF orientation tag, or 1 when absent or unreadable (a broken EXIF block is ignored)."""
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:  # noqa: BLE001 - malformed EXIF must not make the image unreadable
        return 1


def _input_bytes(data: bytes | str | os.PathLike, name: str | None) -> tuple[bytes, str | None]:
    """Encoded bytes (read from the file when ``data`` is a path) and the name for messages."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data), name
    return read_bytes(data), name or os.fspath(data)


def _complete_jpeg_or_png(buf: bytes) -> bool:
    """A JPEG whose end-of-image marker is present, or a PNG ending in its IEND chunk.

    Only those go to OpenCV: it decodes a truncated file to a partly grey image (or fails),
    where jaxrec reports an error. In a JPEG's entropy-coded data 0xFF is always followed by 0x00
    or a restart marker, so FF D9 near the end is the real end-of-image marker.
    """
    if buf[:3] == b"\xff\xd8\xff":
        return b"\xff\xd9" in buf[-64:]
    if buf[:8] == b"\x89PNG\r\n\x1a\n":
        return buf[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    return False


def decode_image(data: bytes | str | os.PathLike, name: str | None = None) -> np.ndarray:
    """Decode an encoded image (bytes or a file path) to ``uint8`` ``[H, W, 3]`` RGB.

    Matches ``cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]``: the EXIF orientation is applied,
    greyscale is replicated to three channels, alpha is dropped (not composited), 16-bit samples
    keep their high byte, palettes are expanded and CMYK uses OpenCV's integer conversion.
    Unlike OpenCV, truncated files are an error rather than a partly grey image, and formats
    OpenCV lacks (e.g. GIF) are decoded. ``name`` is used in error messages for bytes input.

    Complete JPEG and PNG files are decoded by OpenCV itself; other formats, and files OpenCV
    rejects, by :func:`decode_image_reference` (which also words the errors).
    """
    buf, name = _input_bytes(data, name)
    if cv2 is not None and _complete_jpeg_or_png(buf):
        arr = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR_RGB)
        if arr is not None and not _over_pillow_limit(arr.shape):
            return arr
    return decode_image_reference(buf, name)


def _over_pillow_limit(shape: tuple[int, ...]) -> bool:
    """Pillow refuses images above twice its pixel limit; the OpenCV path keeps that rule."""
    limit = Image.MAX_IMAGE_PIXELS
    return limit is not None and shape[0] * shape[1] > 2 * limit


def decode_image_reference(data: bytes | str | os.PathLike, name: str | None = None) -> np.ndarray:
    """:func:`decode_image` with Pillow only: the reference that the OpenCV path is tested against.

    Same contract as :func:`decode_image`; it is used directly for the formats OpenCV does not
    read the way PaddleClas expects, and to report undecodable files.
    """
    buf, name = _input_bytes(data, name)
    label = _describe(name)
    if not buf:
        raise ImageDecodeError(f"image {label} is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(buf)) as im:
            im.load()
            orientation = _orientation(im) if im.format in _EXIF_FORMATS else 1
            arr = _to_rgb_array(im)
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"cannot decode image {label}: not a recognised image format "
            "(corrupt file or not an image; remove it or pass --skip-bad)"
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(
            f"cannot decode image {label}: {e} (the file is corrupt or truncated; re-encode or "
            "remove it)"
        ) from e
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageDecodeError(f"image {label} decoded to an unusable shape {arr.shape}")
    return np.ascontiguousarray(_apply_orientation(arr, orientation))


def _axis_coeffs(
    src: int, dst: int, clamp_weights: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and 11-bit weights [dst, 2] for one axis, as OpenCV computes them.

    OpenCV computes the position in double, rounds it to float32, splits it into floor and
    fraction, and quantizes ``1 - f`` and ``f`` with round-half-even. Along x the out-of-range
    positions get weight (1, 0) on the clamped pixel; along y the weights are left as they are and
    only the row indices are clamped (OpenCV does it that way, and the result can differ).
    """
    scale = 1.0 / (dst / src)
    pos = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(pos).astype(np.int64)
    frac = (pos - i0.astype(np.float32)).astype(np.float32)
    if clamp_weights:
        low = i0 < 0
        high = i0 >= src - 1
        frac = np.where(low | high, np.float32(0), frac)
        i0 = np.where(low, 0, np.where(high, src - 1, i0))
    w0 = np.rint((np.float32(1) - frac) * np.float32(_COEF_SCALE)).astype(np.int32)
    w1 = np.rint(frac * np.float32(_COEF_SCALE)).astype(np.int32)
    i1 = np.clip(i0 + 1, 0, src - 1)
    i0 = np.clip(i0, 0, src - 1)
    return i0, i1, np.stack([w0, w1], axis=1)


def _check_resize_args(img: Any, size: Sequence[int]) -> tuple[np.ndarray, int, int]:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"resize_bilinear expects a uint8 image, got {img.dtype}")
    if img.ndim not in (2, 3):
        raise ValueError(f"resize_bilinear expects [H, W] or [H, W, C], got shape {img.shape}")
    out_h, out_w = int(size[0]), int(size[1])
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"output size must be positive, got {tuple(size)}")
    return img, out_h, out_w


def resize_bilinear(img: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize ``uint8`` ``[H, W]`` or ``[H, W, C]`` to ``size = (h, w)`` with ``cv2.INTER_LINEAR``.

    Half-pixel centres, no antialiasing, 11-bit fixed-point weights, border replication; equal
    to :func:`resize_bilinear_reference` bit for bit. Note the argument order is (height, width),
    unlike cv2's dsize. Always returns a new array.
    """
    img, out_h, out_w = _check_resize_args(img, size)
    if cv2 is None:
        return resize_bilinear_reference(img, (out_h, out_w))
    if img.shape[:2] == (out_h, out_w):
        return img.copy()
    out = cv2.resize(np.ascontiguousarray(img), (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    return out[:, :, None] if img.ndim == 3 and out.ndim == 2 else out


def resize_bilinear_reference(img: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """:func:`resize_bilinear` in numpy: a port of OpenCV's 8-bit ``INTER_LINEAR`` path.

    The reference the OpenCV call is tested against, and the fallback without OpenCV.
    """
    img, out_h, out_w = _check_resize_args(img, size)
    in_h, in_w = img.shape[:2]
    if (in_h, in_w) == (out_h, out_w):
        return img.copy()
    squeeze = img.ndim == 2
    if squeeze:
        img = img[:, :, None]
    c = img.shape[2]

    x0, x1, wx = _axis_coeffs(in_w, out_w, clamp_weights=True)
    y0, y1, wy = _axis_coeffs(in_h, out_h, clamp_weights=False)

    # Work on [rows, width*channels] views: gathering whole columns of a 2-D array is much faster
    # in numpy than 2-D fancy indexing. The horizontal pass runs only on the rows that the
    # vertical pass reads.
    flat = np.ascontiguousarray(img).reshape(in_h, in_w * c)
    chan = np.arange(c)
    cols0 = (x0[:, None] * c + chan).ravel()
    cols1 = (x1[:, None] * c + chan).ravel()
    rows, inverse = np.unique(np.concatenate([y0, y1]), return_inverse=True)
    sel = flat[rows]
    horiz = sel[:, cols0].astype(np.int32)
    horiz *= np.repeat(wx[:, 0], c)
    right = sel[:, cols1].astype(np.int32)
    right *= np.repeat(wx[:, 1], c)
    horiz += right
    horiz >>= 4
    top = horiz[inverse[:out_h]]
    top *= wy[:, 0, None]
    top >>= 16
    bot = horiz[inverse[out_h:]]
    bot *= wy[:, 1, None]
    bot >>= 16
    top += bot
    top += 2
    top >>= 2
    out = np.clip(top, 0, 255).astype(np.uint8).reshape(out_h, out_w, c)
    return out[:, :, 0] if squeeze else out


def _is_jax_array(x: Any) -> bool:
    mod = type(x).__module__
    return mod.startswith("jax") or mod.startswith("jaxlib")


def normalize(
    x: Any,
    scale: float = SCALE_TRAIN,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Any:
    """``(float32(x) * float32(scale) - mean) / std`` per channel (last axis), in float32.

    Works on numpy arrays (returns numpy) and on jax arrays or tracers (returns jax), so it can
    run on the host or inside a jitted step. Use ``scale=SCALE_DEPLOY`` for ``predict_rec``.

    For ``uint8`` jax input the result is looked up in a 256-entry table computed with numpy, so it
    is bit-identical to PaddleClas: XLA would otherwise turn ``/ std`` into a multiplication by
    the reciprocal and fuse the multiply-subtract, which moves some values by one float32 ulp.
    Other jax dtypes use the arithmetic form and may differ from numpy by about one ulp.
    """
    m = np.asarray(mean, dtype=np.float32)
    s = np.asarray(std, dtype=np.float32)
    sc = np.float32(scale)
    if not _is_jax_array(x):
        x = np.asarray(x)
        return (x.astype(np.float32) * sc - m) / s

    if x.dtype == jnp.uint8:
        levels = np.arange(256, dtype=np.float32)[:, None]
        table = (levels * sc - m) / s  # [256, C] (C = len(mean))
        return jnp.asarray(table)[x.astype(jnp.int32), jnp.arange(table.shape[1])]
    return (x.astype(jnp.float32) * sc - m) / s


def preprocess_for_rec(img: np.ndarray, size: int | Sequence[int] = 224) -> np.ndarray:
    """Resize a decoded uint8 RGB image to the recognition input (224x224, aspect ignored)."""
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return resize_bilinear(img, hw)
