"""Make the image-decoding/resizing golden fixtures with OpenCV and PaddleClas's deploy preprocess.

Run in the PaddleClas venv (it has cv2 and paddle):

    /work/paddle_venv/bin/python tools/golden_image.py --photos DIR \
        --paddleclas /work/PaddleClas --out tests/fixtures

DIR holds real photographs; we used scikit-image 0.26's sample data (``skimage/data`` in the
wheel: astronaut.png, camera.png, chelsea.png, coffee.png, coins.png, logo.png, rocket.jpg),
extracted with ``pip download scikit-image==0.26.0 --no-deps`` and ``unzip``. The photos are
shrunk and re-encoded with Pillow into small files of many kinds (baseline/progressive/4:4:4/grey/
CMYK JPEG, all eight EXIF orientations, RGBA/LA/palette/16-bit PNG, WebP, BMP, TIFF); those files
go to ``tests/fixtures/image_files/``. For each file we record what ``cv2.imdecode(IMREAD_COLOR)``
(BGR->RGB) gives, what PaddleClas's ``ResizeImage(224, bilinear, cv2)`` gives, and what its
``NormalizeImage`` gives with the deploy scale (0.00392157) and the training scale (1/255): a
SHA-256 of the exact bytes, plus the whole decoded array for the small files.

It also records ``cv2.resize(INTER_LINEAR)`` on many synthetic inputs of random sizes; the inputs
come from :func:`pattern` (a fixed integer hash, so the test regenerates them without numpy's RNG).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys

import cv2
import numpy as np
from PIL import Image

N_RESIZE_CASES = 600


def pattern(h: int, w: int, c: int, seed: int) -> np.ndarray:
    """Deterministic pseudo-random uint8 image (splitmix64 of the flat index); also in the test."""
    offset = np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64))
    x = np.arange(h * w * c, dtype=np.uint64) + offset
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    img = (x >> np.uint64(56)).astype(np.uint8).reshape(h, w, c)
    if seed % 4 == 0:  # smooth content as well as noise: a running sum along x
        img = (np.cumsum(img.astype(np.int64) - 128, axis=1) // 8 + 128).clip(0, 255)
        img = img.astype(np.uint8)
    return img


def resize_cases() -> list[tuple[int, int, int, int, int, int]]:
    """(seed, h, w, c, out_h, out_w) for the synthetic cv2.resize goldens; also in the test."""
    cases = []
    for seed in range(N_RESIZE_CASES):
        v = pattern(1, 1, 8, seed + 1_000_003).astype(int)[0, 0]
        h = 1 + (v[0] * 256 + v[1]) % 400
        w = 1 + (v[2] * 256 + v[3]) % 400
        c = (1, 3, 4)[v[4] % 3]
        if seed % 3 == 0:
            oh, ow = 224, 224
        else:
            oh = 1 + (v[5] * 256 + v[6]) % 300
            ow = 1 + (v[7] * 256 + v[4]) % 300
        if seed % 50 == 7:  # exact 2x downscale: OpenCV switches to its INTER_AREA fast path
            h, w, oh, ow = 448, 448, 224, 224
        cases.append((seed, int(h), int(w), int(c), int(oh), int(ow)))
    return cases


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def shrink(im: Image.Image, longest: int) -> Image.Image:
    scale = longest / max(im.size)
    return im.resize(
        (max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS
    )


def make_files(photos: str) -> dict[str, bytes]:
    """Small encoded real photos of many kinds."""

    def load(name: str) -> Image.Image:
        return Image.open(os.path.join(photos, name))

    def enc(im: Image.Image, fmt: str, **kw) -> bytes:
        b = io.BytesIO()
        im.save(b, fmt, **kw)
        return b.getvalue()

    rocket = load("rocket.jpg").convert("RGB")
    chelsea = load("chelsea.png").convert("RGB")
    coffee = load("coffee.png").convert("RGB")
    astro = load("astronaut.png").convert("RGB")
    camera = load("camera.png")
    coins = load("coins.png")
    logo = load("logo.png")

    files: dict[str, bytes] = {}
    files["rocket_q80.jpg"] = enc(shrink(rocket, 320), "JPEG", quality=80)
    files["chelsea_progressive.jpg"] = enc(
        shrink(chelsea, 150), "JPEG", quality=85, progressive=True
    )
    files["coffee_444_q95.jpg"] = enc(shrink(coffee, 120), "JPEG", quality=95, subsampling=0)
    files["camera_gray.jpg"] = enc(shrink(camera, 96), "JPEG", quality=85)
    files["astronaut_cmyk.jpg"] = enc(shrink(astro, 80).convert("CMYK"), "JPEG", quality=90)
    small = shrink(chelsea, 48)
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        files[f"chelsea_exif{o}.jpg"] = enc(small, "JPEG", quality=85, exif=exif.tobytes())
    exif = Image.Exif()
    exif[0x0112] = 6
    files["coffee_exif6.png"] = enc(shrink(coffee, 40), "PNG", exif=exif.tobytes())
    files["logo_rgba.png"] = enc(shrink(logo, 64), "PNG")
    files["coins_la.png"] = enc(shrink(coins, 48).convert("LA"), "PNG")
    files["astronaut_palette.png"] = enc(
        shrink(astro, 64).convert("P", palette=Image.ADAPTIVE, colors=64), "PNG"
    )
    # 16-bit greyscale: the photo in the high byte, a ramp in the low byte.
    g = np.asarray(shrink(camera, 48), dtype=np.uint16)
    g16 = g * 256 + (np.arange(g.size, dtype=np.uint16).reshape(g.shape) * 37 % 256)
    files["camera_gray16.png"] = enc(Image.fromarray(g16.astype(np.uint16)), "PNG")
    files["coffee_rgb16.png"] = _png16(np.asarray(shrink(coffee, 40), dtype=np.uint16) * 257 + 3)
    files["chelsea.webp"] = enc(shrink(chelsea, 64), "WEBP", quality=80)
    files["rocket.bmp"] = enc(shrink(rocket, 32), "BMP")
    files["coffee.tiff"] = enc(shrink(coffee, 32), "TIFF")
    return files


def _png16(rgb16: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow cannot write 16-bit colour)."""
    import struct
    import zlib

    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--photos", required=True, help="folder with the scikit-image sample photos")
    ap.add_argument("--paddleclas", default="/work/PaddleClas", help="PaddleClas source checkout")
    ap.add_argument("--out", default="tests/fixtures", help="fixtures folder")
    args = ap.parse_args()

    sys.path.insert(0, os.path.join(args.paddleclas, "deploy", "python"))
    import preprocess as deploy_pre  # PaddleClas deploy/python/preprocess.py

    resize = deploy_pre.ResizeImage(size=[224, 224], interpolation="bilinear", backend="cv2")
    norm_deploy = deploy_pre.NormalizeImage(scale=0.00392157, order="hwc")
    norm_train = deploy_pre.NormalizeImage(scale=1.0 / 255.0, order="hwc")
    to_chw = deploy_pre.ToCHWImage()

    files_dir = os.path.join(args.out, "image_files")
    os.makedirs(files_dir, exist_ok=True)
    files = make_files(args.photos)
    golden: dict = {"opencv": cv2.__version__, "files": {}, "resize": []}
    arrays: dict[str, np.ndarray] = {}
    for name, data in sorted(files.items()):
        path = os.path.join(files_dir, name)
        with open(path, "wb") as f:
            f.write(data)
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)  # predict_rec reads files with cv2.imread
        bgr2 = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # DecodeImage op
        assert bgr is not None and np.array_equal(bgr, bgr2), name
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        r224 = resize(rgb)
        dep = to_chw(norm_deploy(r224))
        trn = norm_train(r224)
        golden["files"][name] = {
            "shape": list(rgb.shape),
            "decoded_sha256": sha(rgb),
            "resized224_sha256": sha(r224),
            "deploy_chw_float32_sha256": sha(dep.astype(np.float32)),
            "train_hwc_float32_sha256": sha(trn.astype(np.float32)),
        }
        if rgb.size <= 64 * 64 * 3:
            arrays["decoded/" + name] = rgb
        print(f"{name:28s} {len(data):6d} B  decoded {rgb.shape}")

    for seed, h, w, c, oh, ow in resize_cases():
        img = pattern(h, w, c, seed)
        out = cv2.resize(img, (ow, oh), interpolation=cv2.INTER_LINEAR)
        out = out.reshape(oh, ow, c)
        golden["resize"].append([seed, h, w, c, oh, ow, sha(out)])
        if h * w <= 24 * 24 and oh * ow <= 24 * 24:
            arrays[f"resize/{seed}"] = out

    with open(os.path.join(args.out, "image_golden.json"), "w") as f:
        json.dump(golden, f, indent=1, sort_keys=True)
    np.savez_compressed(os.path.join(args.out, "image_golden_arrays.npz"), **arrays)
    print(f"{len(files)} files, {len(golden['resize'])} resize cases, {len(arrays)} full arrays")


if __name__ == "__main__":
    main()
