"""Golden fixtures for jaxrec.data.transforms from PaddleClas's own train operators (cv2).

Run with the reference environment (paddle, cv2 and a PaddleClas checkout)::

    PYTHONPATH=/work/PaddleClas:/work/main /work/paddle_venv/bin/python \
        tools/golden_transforms.py --out tests/fixtures/data_transforms_golden.npz

What it does:

* encodes a few synthetic photographs (smooth colour fields, edges, noise; made here, so no
  third-party image is committed) as real JPEG/PNG files and decodes them with PaddleClas
  ``DecodeImage`` (cv2);
* runs the PP-ShiTuV2 train chain ``ResizeImage -> RandFlipImage -> Pad -> RandCropImageV2 ->
  RandomRotation -> ResizeImage`` with PaddleClas's classes, forcing the values that Python
  ``random`` / ``np.random`` return so every case has known parameters (flip on/off, crop
  offsets 0 and 21, i.e. 223-px crops, rotation on/off with several angles), and records the
  calls each operator made (to check the parameter order and ranges);
* records ``cv2.warpAffine`` rotations (``paddle.vision`` ``F.rotate``) of small random images at
  random angles, and PaddleClas ``RandomErasing`` with forced values;
* with ``--measure DIR``, also reports the max difference of jaxrec's chain on real JPEGs there
  (nothing from DIR is written to the fixture).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import os
import random

import numpy as np
from PIL import Image


def synthetic_photo(h: int, w: int, seed: int, noise: float = 6.0) -> np.ndarray:
    """A photo-like uint8 RGB image: smooth colour gradients, a few shapes and mild noise."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        a, b, ph = rng.uniform(0.01, 0.08, 3)
        img[..., c] = 128 + 90 * np.sin(a * xx + ph * 7) * np.cos(b * yy + c)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, max(4, min(h, w) / 3))
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
    else:
        Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


FULL_ARRAY_CASES = (3,)


class Forced:
    """Replaces random.randint / random.uniform / random.random / np.random.random.

    Returns queued values (checking each lies in the range the caller asked for) and logs calls.
    """

    def __init__(self) -> None:
        self.queue: list[float] = []
        self.log: list[tuple] = []
        self._orig = (random.randint, random.uniform, random.random, np.random.random)

    def __enter__(self):
        def randint(a, b):
            v = self.queue.pop(0)
            assert a <= v <= b, (a, b, v)
            self.log.append(("randint", a, b, v))
            return int(v)

        def uniform(a, b):
            v = self.queue.pop(0)
            assert min(a, b) <= v <= max(a, b), (a, b, v)
            self.log.append(("uniform", a, b, v))
            return float(v)

        def rnd(*args, **kwargs):
            v = self.queue.pop(0)
            self.log.append(("random", v))
            return float(v)

        random.randint, random.uniform, random.random, np.random.random = (
            randint,
            uniform,
            rnd,
            rnd,
        )
        return self

    def __exit__(self, *exc):
        random.randint, random.uniform, random.random, np.random.random = self._orig
        assert not self.queue, f"unused forced values {self.queue}"


def build_chain():
    from ppcls.data.preprocess.ops.operators import (  # reference code
        DecodeImage,
        Pad,
        RandCropImageV2,
        RandFlipImage,
        RandomRotation,
        ResizeImage,
    )

    decode = DecodeImage(to_rgb=True, channel_first=False)
    steps = [
        ResizeImage(size=[224, 224], return_numpy=False, interpolation="bilinear", backend="cv2"),
        RandFlipImage(flip_code=1),
        Pad(padding=10, backend="cv2"),
        RandCropImageV2(size=[224, 224]),
        RandomRotation(prob=0.5, degrees=90, interpolation="bilinear"),
        ResizeImage(size=[224, 224], return_numpy=False, interpolation="bilinear", backend="cv2"),
    ]
    return decode, steps


def run_chain(decode, steps, data: bytes, params: dict, forced: Forced) -> tuple[np.ndarray, ...]:
    """Run the reference chain with forced draws; returns (decoded, after crop, final)."""
    # Draw order: flip randint(0,1); crop randint(top), randint(left); rotation np.random.random;
    # angle random.uniform (only when rotating).
    forced.queue = [1 if params["flip"] else 0, params["top"], params["left"]]
    forced.queue.append(0.1 if params["rotate"] else 0.9)
    if params["rotate"]:
        forced.queue.append(params["angle"])
    img = decode(data)
    x = img
    crop = None
    for i, op in enumerate(steps):
        x = op(x)
        if i == 3:
            crop = np.asarray(x).copy()
    return np.asarray(img), crop, np.asarray(x)


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes() + str(a.shape).encode()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/data_transforms_golden.npz")
    ap.add_argument("--measure", default=None, help="folder of real JPEGs to measure on")
    args = ap.parse_args()

    import cv2

    decode, steps = build_chain()
    out: dict[str, np.ndarray] = {}

    # -- the full chain on synthetic photos ------------------------------------------------
    shapes = [
        (90, 120, "JPEG", 6.0),
        (64, 48, "PNG", 2.0),
        (224, 224, "PNG", 0.0),
        (40, 150, "JPEG", 4.0),
    ]
    cases = [
        dict(flip=False, top=10, left=10, rotate=False, angle=0.0),
        dict(flip=True, top=0, left=21, rotate=False, angle=0.0),
        dict(flip=False, top=21, left=3, rotate=True, angle=37.25),
        dict(flip=True, top=21, left=21, rotate=True, angle=-89.9),
        dict(flip=True, top=5, left=0, rotate=True, angle=12.5),
        dict(flip=False, top=17, left=21, rotate=True, angle=-45.0),
    ]
    n = 0
    with Forced() as forced:
        for si, (h, w, fmt, noise) in enumerate(shapes):
            data = encode(synthetic_photo(h, w, seed=si, noise=noise), fmt)
            out[f"input{si}/bytes"] = np.frombuffer(data, dtype=np.uint8)
            for ci, p in enumerate(cases):
                if (si + ci) % 2 and si != 0:
                    continue  # every case on image 0, half of them on the others
                forced.log.clear()
                dec, crop, final = run_chain(decode, steps, data, p, forced)
                calls = [c[0] for c in forced.log]
                expect = ["randint", "randint", "randint", "random"] + (
                    ["uniform"] if p["rotate"] else []
                )
                assert calls == expect, calls
                assert forced.log[1][1:3] == (0, 21) and forced.log[2][1:3] == (0, 21)
                if p["rotate"]:
                    assert forced.log[4][1:3] == (-90, 90)
                key = f"case{n}"
                out[f"{key}/input"] = np.asarray(si)
                out[f"{key}/params"] = np.asarray(
                    [p["flip"], p["top"], p["left"], p["rotate"], p["angle"]], dtype=np.float64
                )
                out[f"{key}/crop_shape"] = np.asarray(crop.shape)
                out[f"{key}/crop_sha"] = np.asarray(sha(crop))
                out[f"{key}/final_sha"] = np.asarray(sha(final))
                if n in FULL_ARRAY_CASES:  # a few full arrays, to report the size of a mismatch
                    out[f"{key}/final"] = final
                n += 1
            if fmt == "JPEG":  # PNG decoding is lossless: tests decode the bytes themselves
                out[f"input{si}/decoded"] = dec
            else:
                assert np.array_equal(dec, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    out["num_cases"] = np.asarray(n)
    out["num_inputs"] = np.asarray(len(shapes))

    # -- warpAffine rotations of small random images -------------------------------------------
    from paddle.vision.transforms import functional as F

    rng = np.random.RandomState(7)
    rots, angles, outs = [], [], []
    for i in range(48):
        h, w = rng.randint(6, 26, size=2)
        img = rng.randint(0, 256, size=(h, w, 3)).astype(np.uint8)
        if i % 3 == 0:  # smooth image: interpolation weights matter more than noise
            img = synthetic_photo(h, w, seed=100 + i)
        ang = float(rng.uniform(-90, 90)) if i > 3 else [90.0, -90.0, 0.0, 45.0][i]
        ref = F.rotate(img, ang, interpolation="bilinear")
        m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), ang, 1)
        direct = cv2.warpAffine(img, m, (int(w), int(h)), flags=cv2.INTER_LINEAR, borderValue=0)
        assert np.array_equal(ref, direct)
        rots.append(img)
        angles.append(ang)
        outs.append(ref)
    for i, (a, b) in enumerate(zip(rots, outs, strict=True)):
        out[f"rot{i}/input"] = a
        out[f"rot{i}/output"] = b
    out["rot_angles"] = np.asarray(angles)
    out["num_rot"] = np.asarray(len(rots))

    # -- RandomErasing (const fill) with forced draws ------------------------------------------
    from ppcls.data.preprocess.ops.random_erasing import RandomErasing

    fill = [124.0, 116.0, 104.0]
    er = RandomErasing(EPSILON=0.5, sl=0.02, sh=0.4, r1=0.3, mean=fill, attempt=100)
    base = synthetic_photo(224, 224, seed=50)
    er_cases = []
    with Forced() as forced:
        for k, (area, aspect) in enumerate([(0.1, 1.0), (0.39, 1.5), (0.02, 0.31)]):
            x = base.copy()
            forced.log.clear()
            h = int(round(np.sqrt(area * 224 * 224 * aspect)))
            w = int(round(np.sqrt(area * 224 * 224 / aspect)))
            top, left = (224 - h) // 3, (224 - w) // 2
            forced.queue = [0.2, area, aspect, top, left]
            y = er(x)
            er_cases.append([area, aspect, top, left, h, w])
            out[f"erase{k}/output_sha"] = np.asarray(sha(np.asarray(y)))
    out["erase_cases"] = np.asarray(er_cases, dtype=np.float64)
    out["erase_fill"] = np.asarray(fill)
    out["erase_base_seed"] = np.asarray(50)

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes): {n} chain cases, 48 rotations")

    if args.measure:
        measure(args.measure, decode, steps)


def measure(folder: str, decode, steps) -> None:
    """Max |ours - reference| of the whole chain (from the cv2-decoded image) on real JPEGs."""
    from jaxrec.data.image import decode_image
    from jaxrec.data.transforms import AugParams, TrainTransform

    files = sorted(glob.glob(os.path.join(folder, "**", "*.jpg"), recursive=True))
    t = TrainTransform()
    rng = np.random.RandomState(0)
    worst = worst_dec = 0
    n = 0
    with Forced() as forced:
        for f in files:
            data = open(f, "rb").read()
            p = dict(
                flip=bool(rng.randint(2)),
                top=int(rng.randint(22)),
                left=int(rng.randint(22)),
                rotate=True,
                angle=float(rng.uniform(-90, 90)),
            )
            dec, _, final = run_chain(decode, steps, data, p, forced)
            ours = t.apply(dec, AugParams(p["flip"], p["top"], p["left"], True, p["angle"]))
            worst = max(worst, int(np.abs(ours.astype(int) - final).max()))
            pil = decode_image(data)
            if pil.shape == dec.shape:
                worst_dec = max(worst_dec, int(np.abs(pil.astype(int) - dec).max()))
            n += 1
    print(
        f"measured {n} real JPEGs in {folder}: max |chain diff| = {worst} (same decoded input); "
        f"max |Pillow decode - cv2 decode| = {worst_dec}"
    )


if __name__ == "__main__":
    main()
