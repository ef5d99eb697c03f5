"""jaxrec.data.image against goldens made by OpenCV 4.6 and PaddleClas's deploy preprocess.

The fixtures come from tools/golden_image.py (real photos from scikit-image's sample data,
re-encoded small in many formats); see that script for how they were made. Both forms of each
kernel are checked: the OpenCV calls and the Pillow/numpy reference forms.
"""

import hashlib
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.data import image

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
FILES = os.path.join(FIX, "image_files")

with open(os.path.join(FIX, "image_golden.json")) as _f:
    GOLDEN = json.load(_f)
ARRAYS = dict(np.load(os.path.join(FIX, "image_golden_arrays.npz")))


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def pattern(h: int, w: int, c: int, seed: int) -> np.ndarray:
    """Same generator as tools/golden_image.py (splitmix64 of the flat index)."""
    offset = np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64))
    x = np.arange(h * w * c, dtype=np.uint64) + offset
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    img = (x >> np.uint64(56)).astype(np.uint8).reshape(h, w, c)
    if seed % 4 == 0:
        img = (np.cumsum(img.astype(np.int64) - 128, axis=1) // 8 + 128).clip(0, 255)
        img = img.astype(np.uint8)
    return img


def test_opencv_kernels_are_active():
    """The dependency is pinned: without it every test below would compare a reference to itself."""
    assert image.cv2 is not None, "install opencv-python-headless>=4.10,<5"
    assert image.cv2.__version__.startswith("4.")


@pytest.mark.parametrize("decode", [image.decode_image, image.decode_image_reference])
@pytest.mark.parametrize("name", sorted(GOLDEN["files"]))
def test_decode_resize_normalize_match_paddleclas(name, decode):
    g = GOLDEN["files"][name]
    path = os.path.join(FILES, name)
    rgb = decode(path)
    assert rgb.dtype == np.uint8 and list(rgb.shape) == g["shape"], (rgb.shape, g["shape"])
    key = "decoded/" + name
    if key in ARRAYS:
        diff = np.abs(rgb.astype(int) - ARRAYS[key]).max()
        assert diff == 0, f"{name}: max |diff| vs cv2.imdecode = {diff}"
    assert sha(rgb) == g["decoded_sha256"], f"{name}: decoded bytes differ from cv2.imdecode"

    with open(path, "rb") as f:
        assert np.array_equal(decode(f.read(), name=name), rgb)

    r224 = image.preprocess_for_rec(rgb)
    assert r224.shape == (224, 224, 3)
    assert sha(r224) == g["resized224_sha256"], f"{name}: 224 resize differs from ResizeImage"
    assert np.array_equal(image.resize_bilinear_reference(rgb, (224, 224)), r224)
    dep = np.transpose(image.normalize(r224, scale=image.SCALE_DEPLOY), (2, 0, 1))
    assert dep.dtype == np.float32
    assert sha(dep) == g["deploy_chw_float32_sha256"]
    assert sha(image.normalize(r224)) == g["train_hwc_float32_sha256"]


def test_exif_orientations_are_the_eight_dihedral_transforms():
    base = image.decode_image(os.path.join(FILES, "chelsea_exif1.jpg"))
    expect = {
        2: base[:, ::-1],
        3: base[::-1, ::-1],
        4: base[::-1],
        5: base.transpose(1, 0, 2),
        6: np.rot90(base, -1),
        7: np.rot90(base, 2).transpose(1, 0, 2),
        8: np.rot90(base, 1),
    }
    for o, want in expect.items():
        got = image.decode_image(os.path.join(FILES, f"chelsea_exif{o}.jpg"))
        assert np.array_equal(got, want), o


@pytest.mark.parametrize("resize", [image.resize_bilinear, image.resize_bilinear_reference])
def test_resize_matches_cv2_on_random_sizes(resize):
    cases = GOLDEN["resize"]
    assert len(cases) >= 500
    kinds = {"up": 0, "down": 0, "2x": 0}
    for seed, h, w, c, oh, ow, digest in cases:
        img = pattern(h, w, c, seed)
        out = resize(img, (oh, ow))
        assert out.shape == (oh, ow, c)
        key = f"resize/{seed}"
        if key in ARRAYS:
            assert np.array_equal(out, ARRAYS[key].reshape(oh, ow, c)), (seed, h, w, c, oh, ow)
        assert sha(out) == digest, f"case seed={seed} {h}x{w}x{c} -> {oh}x{ow} differs from cv2"
        kinds["up" if oh * ow > h * w else "down"] += 1
        kinds["2x"] += (h, w) == (2 * oh, 2 * ow)
    assert min(kinds.values()) > 0, kinds


def test_resize_opencv_equals_reference_on_random_cases():
    rng = np.random.default_rng(7)
    for _ in range(300):
        h, w, oh, ow = (int(v) for v in rng.integers(1, 160, 4))
        c = int(rng.choice([1, 2, 3, 4, 5]))
        img = pattern(h, w, c, int(rng.integers(1 << 30)))
        img = img[:, :, 0] if c == 1 and rng.random() < 0.5 else img
        fast = image.resize_bilinear(img, (oh, ow))
        ref = image.resize_bilinear_reference(img, (oh, ow))
        assert fast.shape == ref.shape and np.array_equal(fast, ref), (h, w, c, oh, ow)


@pytest.mark.parametrize("resize", [image.resize_bilinear, image.resize_bilinear_reference])
def test_resize_2d_identity_and_errors(resize):
    img = pattern(7, 9, 1, 3)[:, :, 0]
    same = resize(img, (7, 9))
    assert same.tolist() == img.tolist() and same is not img
    assert resize(img, (5, 4)).shape == (5, 4)
    with pytest.raises(TypeError, match="uint8"):
        resize(img.astype(np.float32), (4, 4))
    with pytest.raises(ValueError, match="positive"):
        resize(img, (0, 4))


def _encode_random(rng: np.random.Generator, k: int) -> bytes:
    """A small photo-like image in one of many JPEG/PNG variants (case ``k`` picks the variant)."""
    from PIL import Image

    h, w = (int(v) for v in rng.integers(8, 90, 2))
    rgb = pattern(h, w, 3, int(rng.integers(1 << 30)) * 4)  # seed % 4 == 0: smooth rows
    im = Image.fromarray(rgb)
    buf = io.BytesIO()
    kind = k % 9
    if kind <= 4:
        mode = {0: "RGB", 1: "RGB", 2: "L", 3: "CMYK", 4: "RGB"}[kind]
        exif = Image.Exif()
        exif[0x0112] = int(rng.integers(1, 9))
        im.convert(mode).save(
            buf,
            format="JPEG",
            quality=int(rng.integers(30, 100)),
            subsampling=int(rng.integers(0, 3)),
            progressive=kind == 1,
            exif=exif.tobytes() if kind == 4 else b"",
        )
    else:
        mode = {5: "RGB", 6: "RGBA", 7: "LA", 8: "P"}[kind]
        im.convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_opencv_equals_reference_on_random_files():
    rng = np.random.default_rng(3)
    for k in range(90):
        data = _encode_random(rng, k)
        assert image._complete_jpeg_or_png(data)
        fast, ref = image.decode_image(data), image.decode_image_reference(data)
        assert fast.shape == ref.shape and np.array_equal(fast, ref), k
    # Bytes after the end-of-image marker: decoded by Pillow, still the same pixels.
    jpeg = _encode_random(rng, 0)
    padded = jpeg + b"\0" * 100
    assert not image._complete_jpeg_or_png(padded)
    assert np.array_equal(image.decode_image(padded), image.decode_image(jpeg))


def test_normalize_numpy_and_jit_agree_bitwise():
    x = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    x[..., 1] = x[..., 1][::-1]
    for scale in (image.SCALE_TRAIN, image.SCALE_DEPLOY):
        ref = image.normalize(x, scale=scale)
        assert isinstance(ref, np.ndarray) and ref.dtype == np.float32
        manual = (x.astype(np.float32) * np.float32(scale) - np.float32(image.IMAGENET_MEAN)) / (
            np.float32(image.IMAGENET_STD)
        )
        assert np.array_equal(ref, manual)
        jitted = jax.jit(lambda a, s=scale: image.normalize(a, scale=s))(jnp.asarray(x))
        assert isinstance(jitted, jax.Array) and jitted.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(jitted), ref)
        # float input inside jit: arithmetic form, within an ulp or so of numpy
        jf = jax.jit(lambda a, s=scale: image.normalize(a, scale=s))(jnp.asarray(x, jnp.float32))
        np.testing.assert_allclose(np.asarray(jf), ref, rtol=0, atol=2e-6)
    # the deploy scale really is a different number from 1/255
    assert not np.array_equal(
        image.normalize(x, scale=image.SCALE_DEPLOY), image.normalize(x, scale=image.SCALE_TRAIN)
    )


def test_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        image.decode_image(missing)

    good = open(os.path.join(FILES, "rocket_q80.jpg"), "rb").read()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(image.ImageDecodeError, match="truncated.jpg"):
        image.decode_image(truncated)

    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image" * 10)
    with pytest.raises(image.ImageDecodeError, match=r"garbage\.png.*not a recognised"):
        image.decode_image(garbage)

    corrupt = bytearray(open(os.path.join(FILES, "logo_rgba.png"), "rb").read())
    corrupt[200:260] = b"\x00" * 60
    with pytest.raises(image.ImageDecodeError, match="my_logo"):
        image.decode_image(bytes(corrupt), name="my_logo.png")

    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(image.ImageDecodeError, match="empty.jpg.*empty"):
        image.decode_image(empty)

    with pytest.raises(image.ImageDecodeError, match="directory"):
        image.decode_image(tmp_path)


def test_malformed_exif_is_ignored_like_opencv():
    # OpenCV 4.6 decodes this file (orientation 6 with its TIFF header overwritten) unrotated.
    data = bytearray(open(os.path.join(FILES, "chelsea_exif6.jpg"), "rb").read())
    i = data.find(b"Exif")
    data[i + 6 : i + 20] = b"\xff" * 14
    got = image.decode_image(bytes(data), name="bad_exif.jpg")
    assert np.array_equal(got, image.decode_image(os.path.join(FILES, "chelsea_exif1.jpg")))


_FAULTS = r"""
import concurrent.futures as cf, resource, numpy as np
from jaxrec.data import image
base = np.random.default_rng(0).integers(0, 256, (68, 120, 3), dtype=np.uint8)
jpeg = image.cv2.imencode(".jpg", image.cv2.resize(base, (1920, 1080)))[1].tobytes()
with cf.ThreadPoolExecutor(2, initializer=image.configure_decoding) as pool:
    list(pool.map(lambda _: image.decode_image(jpeg).sum(), range(4)))
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    list(pool.map(lambda _: image.decode_image(jpeg).sum(), range(20)))
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 20)
"""


@pytest.mark.slow
def test_decode_pools_do_not_page_fault_per_image():
    """configure_decoding keeps freed 6 MB image buffers: no fresh pages for every 1080p decode."""
    import subprocess
    import sys

    def faults(**env) -> float:
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        return float(out.stdout.split()[-1])

    tuned, untuned = faults(), faults(JAXREC_NO_MALLOC_TUNING="1")
    assert untuned > 500, untuned  # 6.2 MB = 1,500 pages when glibc returns them to the kernel
    assert tuned < 50, tuned
