"""PaddleClas `transform_ops` lists -> jaxrec's train transform, eval preprocessing, pixel norm.

Train chains must follow the order jaxrec's `TrainTransform` applies:
DecodeImage, ResizeImage, [RandFlipImage], [Pad], [RandCropImageV2], [RandomRotation],
[ResizeImage], NormalizeImage, [RandomErasing], [ToCHWImage]. Eval chains: DecodeImage,
ResizeImage (size or resize_short), [CropImage], NormalizeImage, [ToCHWImage]. Every argument
is read here (so it is honoured) or rejected with the key that holds it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from jaxrec.config.keys import Reader
from jaxrec.data import image as image_lib
from jaxrec.data.preprocess import PixelNorm, Preprocess
from jaxrec.data.transforms import RandomErasingConfig, TrainTransform
from jaxrec.errors import ConfigError

TRAIN_ORDER = (
    "DecodeImage",
    "ResizeImage",
    "RandFlipImage",
    "Pad",
    "RandCropImageV2",
    "RandomRotation",
    "ResizeImage",
    "NormalizeImage",
    "RandomErasing",
    "ToCHWImage",
)
TRAIN_REQUIRED = ("DecodeImage", "ResizeImage", "NormalizeImage")
EVAL_ORDER = ("DecodeImage", "ResizeImage", "CropImage", "NormalizeImage", "ToCHWImage")
EVAL_REQUIRED = ("DecodeImage", "ResizeImage", "NormalizeImage")


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    key: str  # e.g. "DataLoader.Train.dataset.transform_ops[3].ResizeImage"


def read_ops(r: Reader, key: str) -> list[Op]:
    entries = r.peek(key)
    if entries is None:
        raise ConfigError(key, "is required (the list of image transforms)")
    if not isinstance(entries, list):
        raise ConfigError(key, f"must be a list of {{OpName: {{args}}}} entries, got {entries!r}")
    ops = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(
                f"{key}[{i}]", f"must be a one-key mapping {{Name: {{...}}}}: {entry}"
            )
        (name,) = entry
        args = entry[name]
        if args is not None and not isinstance(args, dict):
            raise ConfigError(f"{key}[{i}].{name}", f"arguments must be a mapping, got {args!r}")
        if not args:
            r.mark(f"{key}[{i}].{name}")
        ops.append(Op(str(name), f"{key}[{i}].{name}"))
    return ops


def _check_order(ops: list[Op], order: tuple[str, ...], required: tuple[str, ...], key: str):
    pos = 0
    for op in ops:
        while pos < len(order) and order[pos] != op.name:
            pos += 1
        if pos == len(order):
            known = set(order)
            why = (
                "is not supported by jaxrec"
                if op.name not in known
                else "is out of order for jaxrec, which applies " + " -> ".join(order)
            )
            raise ConfigError(op.key, why)
        pos += 1
    names = [op.name for op in ops]
    for need in required:
        if need not in names:
            raise ConfigError(key, f"needs a {need} op (chain: {' -> '.join(order)})")


def _size(r: Reader, key: str) -> tuple[int, int]:
    """PaddleClas sizes: an int, or [w, h] -> (h, w)."""
    v = r.get(key)
    if isinstance(v, int | float) and not isinstance(v, bool):
        return int(v), int(v)
    if isinstance(v, list | tuple) and len(v) == 2:
        return int(v[1]), int(v[0])
    raise ConfigError(key, f"must be an int or [width, height], got {v!r}")


def _expect(r: Reader, key: str, allowed: tuple, default: Any, what: str = "") -> Any:
    v = r.get(key, default)
    if v not in allowed:
        raise ConfigError(
            key, f"{v!r} is not supported{what}; use {' or '.join(map(repr, allowed))}"
        )
    return v


def _decode(r: Reader, op: Op) -> None:
    _expect(r, f"{op.key}.to_rgb", (True,), True, " (jaxrec decodes to RGB)")
    _expect(r, f"{op.key}.channel_first", (False,), False, " (images stay HWC until the model)")
    _expect(r, f"{op.key}.backend", ("cv2",), "cv2")


def _resize(r: Reader, op: Op, allow_short: bool) -> tuple[tuple[int, int] | None, int | None]:
    _expect(r, f"{op.key}.interpolation", ("bilinear", None), None, " (cv2 INTER_LINEAR only)")
    _expect(r, f"{op.key}.backend", ("cv2",), "cv2")
    has_size, has_short = r.has(f"{op.key}.size"), r.has(f"{op.key}.resize_short")
    if has_size == has_short:
        raise ConfigError(op.key, "give exactly one of size or resize_short")
    if has_short:
        if not allow_short:
            raise ConfigError(f"{op.key}.resize_short", "is only supported in eval chains")
        return None, int(r.get(f"{op.key}.resize_short"))
    return _size(r, f"{op.key}.size"), None


_SCALE = re.compile(r"^\s*([0-9.eE+-]+)\s*(?:/\s*([0-9.eE+-]+)\s*)?$")


def _scale(r: Reader, key: str) -> float:
    v = r.get(key, 1.0 / 255.0)
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    m = _SCALE.match(str(v))
    if not m:
        raise ConfigError(key, f"{v!r} is not a number or a division like '1.0/255.0'")
    num, den = float(m.group(1)), float(m.group(2) or 1.0)
    return num / den


def _triple(r: Reader, key: str, default: tuple[float, ...]) -> tuple[float, float, float]:
    v = r.get(key, default)
    if not isinstance(v, list | tuple) or len(v) != 3:
        raise ConfigError(key, f"needs 3 values (RGB), got {v!r}")
    return tuple(float(x) for x in v)  # type: ignore[return-value]


def _normalize(r: Reader, op: Op) -> PixelNorm:
    _expect(r, f"{op.key}.order", ("hwc", ""), "hwc")
    _expect(r, f"{op.key}.output_fp16", (False,), False)
    _expect(r, f"{op.key}.channel_num", (3,), 3)
    try:
        return PixelNorm(
            _scale(r, f"{op.key}.scale"),
            _triple(r, f"{op.key}.mean", image_lib.IMAGENET_MEAN),
            _triple(r, f"{op.key}.std", image_lib.IMAGENET_STD),
        )
    except ValueError as e:
        raise ConfigError(op.key, str(e)) from None


def _erasing(r: Reader, op: Op, pixel: PixelNorm) -> RandomErasingConfig:
    k = op.key
    _expect(r, f"{k}.mode", ("const",), "const", " (jaxrec fills erased boxes with one colour)")
    mean = _triple(r, f"{k}.mean", (0.0, 0.0, 0.0))
    cfg = RandomErasingConfig(
        prob=float(r.get(f"{k}.EPSILON", 0.5)),
        sl=float(r.get(f"{k}.sl", 0.02)),
        sh=float(r.get(f"{k}.sh", 0.4)),
        r1=float(r.get(f"{k}.r1", 0.3)),
        mean=mean,
        attempt=int(r.get(f"{k}.attempt", 100)),
        use_log_aspect=bool(r.get(f"{k}.use_log_aspect", False)),
    )
    if "fill" in {f.name for f in dataclasses.fields(RandomErasingConfig)}:
        fill = tuple(
            int(min(255, max(0, round((m * s + mu) / pixel.scale))))
            for m, s, mu in zip(mean, pixel.std, pixel.mean, strict=True)
        )
        return dataclasses.replace(cfg, fill=fill)
    if pixel != PixelNorm():
        raise ConfigError(k, "with a NormalizeImage other than ImageNet's 1/255 is not supported")
    return cfg


def train_chain(r: Reader, key: str) -> tuple[TrainTransform, PixelNorm]:
    """(TrainTransform, PixelNorm) of a train `transform_ops` list at `key`."""
    ops = read_ops(r, key)
    _check_order(ops, TRAIN_ORDER, TRAIN_REQUIRED, key)
    kw: dict[str, Any] = {"flip": False, "pad": 0, "crop": False, "rotate_prob": 0.0}
    pixel = PixelNorm()
    erasing_op = None
    resizes = []
    for op in ops:
        k = op.key
        if op.name == "DecodeImage":
            _decode(r, op)
        elif op.name == "ResizeImage":
            resizes.append((op, _resize(r, op, allow_short=False)[0]))
        elif op.name == "RandFlipImage":
            _expect(r, f"{k}.flip_code", (1,), 1, " (horizontal flips only)")
            kw["flip"] = True
        elif op.name == "Pad":
            kw["pad"] = int(r.get(f"{k}.padding"))
            _expect(r, f"{k}.fill", (0,), 0, " (black padding only)")
            _expect(r, f"{k}.padding_mode", ("constant",), "constant")
            _expect(r, f"{k}.backend", ("cv2", "pil"), "cv2")
        elif op.name == "RandCropImageV2":
            kw["crop"] = True
            resizes.append((op, _size(r, f"{k}.size")))
        elif op.name == "RandomRotation":
            kw["rotate_prob"] = float(r.get(f"{k}.prob", 0.5))
            degrees = r.get(f"{k}.degrees")
            if not isinstance(degrees, int | float):
                raise ConfigError(
                    f"{k}.degrees", f"must be one number (+-degrees), got {degrees!r}"
                )
            kw["degrees"] = float(degrees)
            _expect(r, f"{k}.interpolation", ("bilinear",), "bilinear")
            _expect(r, f"{k}.expand", (False,), False)
            _expect(r, f"{k}.center", (None,), None)
            _expect(r, f"{k}.fill", (0,), 0)
        elif op.name == "NormalizeImage":
            pixel = _normalize(r, op)
        elif op.name == "RandomErasing":
            erasing_op = op
    size = resizes[0][1]
    for op, s in resizes:
        if s != size or s[0] != s[1]:
            raise ConfigError(op.key, f"size {s} must be square and equal the first ResizeImage's")
    if erasing_op is not None:
        kw["erasing"] = _erasing(r, erasing_op, pixel)
    return TrainTransform(size=size[0], **kw), pixel


def eval_chain(r: Reader, key: str) -> Preprocess:
    """The `Preprocess` of an eval `transform_ops` list at `key`."""
    ops = read_ops(r, key)
    _check_order(ops, EVAL_ORDER, EVAL_REQUIRED, key)
    resize = short = crop = None
    pixel = PixelNorm()
    for op in ops:
        if op.name == "DecodeImage":
            _decode(r, op)
        elif op.name == "ResizeImage":
            resize, short = _resize(r, op, allow_short=True)
        elif op.name == "CropImage":
            crop = _size(r, f"{op.key}.size")
        elif op.name == "NormalizeImage":
            pixel = _normalize(r, op)
    try:
        return Preprocess(
            resize=resize,
            resize_short=short,
            crop=crop,
            scale=pixel.scale,
            mean=pixel.mean,
            std=pixel.std,
        )
    except ValueError as e:
        raise ConfigError(key, str(e)) from None
