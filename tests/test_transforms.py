"""Train transforms against PaddleClas goldens (tools/golden_transforms.py) and their sampling."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from jaxrec.data.image import decode_image, resize_bilinear
from jaxrec.data.transforms import (
    AugParams,
    RandomErasingConfig,
    TrainTransform,
    crop_v2,
    erase,
    hflip,
    normalized_to_uint8,
    pad_constant,
    pad_crop,
    rng_for,
    rotate,
    rotation_matrix,
    warp_affine,
    warp_affine_reference,
)

ROOT = Path(__file__).parents[1]
GOLDEN = ROOT / "tests" / "fixtures" / "data_transforms_golden.npz"


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes() + str(a.shape).encode()).hexdigest()


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN))


def _decoded(g, si: int) -> np.ndarray:
    key = f"input{si}/decoded"
    if key in g:  # JPEG: the reference's cv2 decode (decoder parity is tested in test_image.py)
        return g[key]
    return decode_image(g[f"input{si}/bytes"].tobytes())


def _params(g, key: str) -> AugParams:
    flip, top, left, rot, angle = g[f"{key}/params"]
    return AugParams(flip=bool(flip), top=int(top), left=int(left), rotate=bool(rot), angle=angle)


def test_chain_matches_paddleclas_exactly(golden):
    t = TrainTransform()
    n = int(golden["num_cases"])
    assert n >= 12
    kinds = set()
    for c in range(n):
        key = f"case{c}"
        img = _decoded(golden, int(golden[f"{key}/input"]))
        p = _params(golden, key)
        # Exact steps: resize, flip, pad, RandCropImageV2 (incl. 223-px crops).
        x = resize_bilinear(img, (224, 224)) if img.shape[:2] != (224, 224) else img
        x = crop_v2(pad_constant(hflip(x) if p.flip else x, 10), p.top, p.left, (224, 224))
        assert x.shape == tuple(golden[f"{key}/crop_shape"])
        assert sha(x) == str(golden[f"{key}/crop_sha"]), f"{key}: crop differs"
        out = t.apply(img, p)
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
        if f"{key}/final" in golden:
            diff = np.abs(out.astype(int) - golden[f"{key}/final"]).max()
            assert diff == 0, f"{key}: max |diff| {diff} after rotation"
        assert sha(out) == str(golden[f"{key}/final_sha"]), f"{key}: final image differs"
        kinds.add((p.rotate, x.shape[:2] != (224, 224)))
    assert kinds == {(False, False), (False, True), (True, False), (True, True)}


def test_warp_affine_matches_cv2(golden):
    """RandomRotation's cv2.warpAffine (INTER_LINEAR, black border): bit-exact on 48 cases."""
    worst = 0
    for i, angle in enumerate(golden["rot_angles"]):
        img = golden[f"rot{i}/input"]
        ours = rotate(img, float(angle))
        ref = golden[f"rot{i}/output"]
        assert ours.shape == ref.shape
        h, w = img.shape[:2]
        port = warp_affine_reference(img, rotation_matrix(float(angle), (w / 2, h / 2)))
        worst = max(worst, int(np.abs(ours.astype(int) - ref).max()), int(np.abs(port - ref).max()))
    assert worst == 0, f"max |ours - cv2| = {worst}"


def test_warp_affine_opencv_equals_numpy_port():
    """Random angles, centres, scales, output sizes, fills and channel counts."""
    rng = np.random.default_rng(11)
    for k in range(300):
        h, w = (int(v) for v in rng.integers(2, 80, 2))
        c = int(rng.choice([1, 3, 4, 6]))
        img = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        img = img[:, :, 0] if c == 1 and k % 2 else img
        centre = (w / 2, h / 2) if k % 3 else tuple(rng.uniform(-5, 90, 2))
        m = rotation_matrix(float(rng.uniform(-180, 180)), centre, float(rng.uniform(0.5, 2)))
        size = None if k % 4 else tuple(int(v) for v in rng.integers(2, 90, 2))
        fill = int(rng.choice([0, 127, 255]))
        fast, port = warp_affine(img, m, size, fill), warp_affine_reference(img, m, size, fill)
        assert fast.shape == port.shape and np.array_equal(fast, port), k


def test_rotation_matrix_convention():
    m = rotation_matrix(90.0, (2.0, 1.0))
    # Positive angle = counter-clockwise on screen: the point right of centre goes up.
    x, y = m @ np.array([3.0, 1.0, 1.0])
    np.testing.assert_allclose([x, y], [2.0, 0.0], atol=1e-12)
    img = np.zeros((4, 4, 3), np.uint8)
    img[0, :] = 255  # top row
    r = rotate(img, 90.0)  # centre (2, 2): the top row moves to column 0 of the left side
    assert r[:, 0].max() == 255 and r[0, 1:].max() == 0


def test_random_erasing_matches_paddleclas(golden):
    spec = importlib.util.spec_from_file_location("gt", ROOT / "tools" / "golden_transforms.py")
    gt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gt)
    base = gt.synthetic_photo(224, 224, seed=int(golden["erase_base_seed"]))
    fill = golden["erase_fill"].astype(int)
    for k, (_, _, top, left, h, w) in enumerate(golden["erase_cases"]):
        out = erase(base, (int(top), int(left), int(h), int(w)), fill)
        assert sha(out) == str(golden[f"erase{k}/output_sha"])
    assert normalized_to_uint8((0.0, 0.0, 0.0)) == (124, 116, 104)


def test_sampled_parameters_follow_reference_distributions():
    t = TrainTransform()
    ps = [t.sample(rng_for(0, 0, i)) for i in range(4000)]
    flips = np.mean([p.flip for p in ps])
    rots = np.mean([p.rotate for p in ps])
    assert abs(flips - 0.5) < 0.04 and abs(rots - 0.5) < 0.04
    tops = np.bincount([p.top for p in ps], minlength=22)
    lefts = np.bincount([p.left for p in ps], minlength=22)
    assert tops.size == 22 and lefts.size == 22  # randint(0, 244 - 224 + 1): 22 values
    assert tops.min() > 100 and lefts.min() > 100  # ~182 expected each
    angles = np.array([p.angle for p in ps if p.rotate])
    assert angles.min() >= -90 and angles.max() <= 90
    assert abs(angles.mean()) < 5 and abs(np.std(angles) - 180 / np.sqrt(12)) < 3
    # Determinism per (seed, epoch, index), and independence across them.
    assert t.sample(rng_for(3, 1, 7)) == t.sample(rng_for(3, 1, 7))
    assert len({t.sample(rng_for(3, e, 7)) for e in range(20)}) == 20


def test_random_erasing_sampling():
    t = TrainTransform(erasing=RandomErasingConfig(prob=0.5))
    boxes = [t.sample(rng_for(1, 0, i)).erase_box for i in range(600)]
    some = [b for b in boxes if b is not None]
    assert 0.4 < len(some) / len(boxes) < 0.6
    for top, left, h, w in some:
        assert 0 <= top and top + h <= 224 and 0 <= left and left + w <= 224
        assert 0.015 <= h * w / 224**2 <= 0.41
    img = np.full((224, 224, 3), 7, np.uint8)
    p = next(t.sample(rng_for(1, 0, i)) for i in range(100) if boxes[i] is not None)
    out = t.apply(img, p)
    top, left, h, w = p.erase_box
    assert (out[top : top + h, left : left + w] == (124, 116, 104)).all()
    # An explicit uint8 fill (the resolver's, from the run's own normalization) wins over mean.
    own = TrainTransform(erasing=RandomErasingConfig(prob=0.5, fill=(1, 2, 3)))
    assert (own.apply(img, p)[top : top + h, left : left + w] == (1, 2, 3)).all()


def test_steps_can_be_switched_off():
    img = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    plain = TrainTransform(flip=False, pad=0, rotate_prob=0.0)
    p = plain.sample(rng_for(0, 0, 0))
    assert not p.flip and not p.rotate and (p.top, p.left) == (0, 0)
    np.testing.assert_array_equal(plain.apply(img, p), resize_bilinear(img, (224, 224)))


def test_pad_crop_equals_pad_then_crop():
    rng = np.random.default_rng(2)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 20, 2))
        pad = int(rng.integers(0, 5))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        size = tuple(int(v) for v in rng.integers(1, 25, 2))
        top, left = (int(v) for v in rng.integers(0, 30, 2))
        want = crop_v2(pad_constant(img, pad), top, left, size)
        got = pad_crop(img, pad, top, left, size)
        assert got.shape == want.shape and np.array_equal(got, want), (h, w, pad, size, top, left)
    flipped = hflip(img)
    assert flipped.flags.c_contiguous and np.array_equal(flipped, img[:, ::-1])
