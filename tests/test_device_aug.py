"""DeviceAugment against the host chain: same images for the same parameters, same distributions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from PIL import Image

from jaxrec.data.device_aug import DeviceAugment, DeviceAugParams
from jaxrec.data.transforms import AugParams, RandomErasingConfig, TrainTransform, rng_for

HOST = TrainTransform(size=32, pad=4, erasing=RandomErasingConfig(prob=0.5, fill=(9, 99, 199)))
DEV = DeviceAugment.from_transform(HOST)


def _smooth(rng, n, s=32):
    """Photo-like images (smooth, so that interpolation differences stay small)."""
    base = rng.integers(0, 256, (n, s // 4, s // 4, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(b).resize((s, s), Image.BICUBIC)) for b in base])


def _to_device(ps: list[AugParams]) -> DeviceAugParams:
    box = [p.erase_box or (0, 0, 0, 0) for p in ps]
    col = lambda v, dt: jnp.asarray(np.asarray(v), dt)
    return DeviceAugParams(
        flip=col([p.flip for p in ps], bool),
        top=col([p.top for p in ps], jnp.int32),
        left=col([p.left for p in ps], jnp.int32),
        rotate=col([p.rotate for p in ps], bool),
        angle=col([p.angle for p in ps], jnp.float32),
        erase=col([p.erase_box is not None for p in ps], bool),
        erase_top=col([b[0] for b in box], jnp.int32),
        erase_left=col([b[1] for b in box], jnp.int32),
        erase_h=col([b[2] for b in box], jnp.int32),
        erase_w=col([b[3] for b in box], jnp.int32),
    )


def test_same_images_as_the_host_for_the_same_parameters():
    rng = np.random.default_rng(0)
    ps = [HOST.sample(rng_for(1, 0, i)) for i in range(400)]
    imgs = _smooth(rng, len(ps))
    host = np.stack([HOST.apply_prepared(x, p) for x, p in zip(imgs, ps, strict=True)])
    dev = np.asarray(jax.jit(DEV.apply)(jnp.asarray(imgs), _to_device(ps)))
    diff = np.abs(dev.astype(int) - host)
    span = HOST.size + 2 * HOST.pad
    full = np.array([not p.rotate and max(p.top, p.left) <= span - HOST.size for p in ps])
    short = np.array([not p.rotate and not f for p, f in zip(ps, full, strict=True)])
    rot = np.array([p.rotate for p in ps])
    assert full.sum() > 50 and short.sum() > 5 and rot.sum() > 100
    assert diff[full].max() == 0, "flip, pad, crop (and erasing): exactly the host's pixels"
    assert diff[short].max() <= 1, "223-style crops: OpenCV's fixed-point resize vs float"
    # Rotation: one bilinear sampling instead of the host's two; same geometry.
    mean_rot = diff[rot].mean(axis=(1, 2, 3))
    assert np.median(mean_rot) < 2.0 and mean_rot.max() < 8, mean_rot.max()
    wrong = [
        HOST.apply_prepared(x, AugParams(p.flip, p.top, p.left, True, -p.angle, p.erase_box))
        for x, p in zip(imgs[rot][:40], np.array(ps, dtype=object)[rot][:40], strict=True)
    ]
    mirror = np.abs(dev[rot][:40].astype(int) - np.stack(wrong)).mean(axis=(1, 2, 3))
    assert np.median(mirror) > 5 * np.median(mean_rot), "the rotation turns the right way"


def _stats(flip, top, left, rot, angle, erase, area, aspect) -> dict:
    angle, area, aspect = angle[rot], area[erase], aspect[erase]
    return {
        "flip": flip.mean(),
        "rotate": rot.mean(),
        "erase": erase.mean(),
        "top_hist": np.bincount(top, minlength=10) / top.size,
        "left_hist": np.bincount(left, minlength=10) / left.size,
        "angle_q": np.quantile(angle, [0.1, 0.25, 0.5, 0.75, 0.9]) / HOST.degrees,
        "area_q": np.quantile(area, [0.1, 0.25, 0.5, 0.75, 0.9]),
        "aspect_q": np.quantile(np.log(aspect), [0.1, 0.5, 0.9]),
    }


def test_parameter_distributions_match_the_host():
    n, s = 8000, HOST.size
    ps = [HOST.sample(rng_for(3, 0, i)) for i in range(n)]
    box = np.array([p.erase_box or (0, 0, 1, 1) for p in ps], float)
    host = _stats(
        np.array([p.flip for p in ps]),
        np.array([p.top for p in ps]),
        np.array([p.left for p in ps]),
        np.array([p.rotate for p in ps]),
        np.array([p.angle for p in ps]),
        np.array([p.erase_box is not None for p in ps]),
        box[:, 2] * box[:, 3] / s**2,
        box[:, 2] / box[:, 3],
    )
    d = jax.tree.map(np.asarray, jax.jit(DEV.sample, static_argnums=1)(jax.random.key(0), n))
    ok = d.erase
    dev = _stats(
        d.flip,
        d.top,
        d.left,
        d.rotate,
        d.angle,
        ok,
        d.erase_h * d.erase_w / s**2,
        np.where(ok, d.erase_h, 1) / np.where(ok, d.erase_w, 1),
    )
    for key in ("flip", "rotate", "erase"):
        assert abs(host[key] - dev[key]) < 0.03, (key, host[key], dev[key])
    for key in ("top_hist", "left_hist"):
        assert host[key].size == dev[key].size == 10  # offsets 0..2*pad+1, both ends inclusive
        assert np.abs(host[key] - dev[key]).max() < 0.02, (key, host[key], dev[key])
    for key, tol in (("angle_q", 0.05), ("area_q", 0.02), ("aspect_q", 0.08)):
        assert np.abs(host[key] - dev[key]).max() < tol, (key, host[key], dev[key])
    assert (d.erase_top + d.erase_h <= s).all() and (d.erase_left + d.erase_w <= s).all()


def test_deterministic_per_device_inside_shard_map():
    mesh = jax.make_mesh((8,), ("data",))
    imgs = np.repeat(_smooth(np.random.default_rng(5), 1), 16, axis=0)
    imgs = jax.device_put(imgs, jax.sharding.NamedSharding(mesh, P("data")))

    def per_device(x, rng):
        return DEV(x, jax.random.fold_in(rng, jax.lax.axis_index("data")))

    fn = jax.jit(
        jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"))
    )
    a = np.asarray(fn(imgs, jax.random.key(7)))
    b = np.asarray(fn(imgs, jax.random.key(7)))
    c = np.asarray(fn(imgs, jax.random.key(8)))
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)  # a pure function of (images, rng): resumes exactly
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[2]), "devices draw different parameters"
    assert not np.array_equal(a[0], a[1]), "images of one device draw different parameters"


def test_switched_off_steps_and_shape_errors():
    plain = DeviceAugment.from_transform(TrainTransform(size=16, flip=False, pad=0, rotate_prob=0))
    x = jnp.asarray(_smooth(np.random.default_rng(1), 4, 16))
    fn = jax.jit(lambda images, rng: plain(images, rng))
    np.testing.assert_array_equal(np.asarray(fn(x, jax.random.key(0))), np.asarray(x))
    with pytest.raises(ValueError, match=r"needs \[B, 16, 16, C\]"):
        fn(jnp.zeros((2, 8, 8, 3), jnp.uint8), jax.random.key(0))
