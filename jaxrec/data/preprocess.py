"""How a model is fed at evaluation and inference time: resize, crop and pixel normalization.

A `Preprocess` is the resolved form of a PaddleClas eval chain (`DecodeImage`, `ResizeImage`,
optional `CropImage`, `NormalizeImage`, `ToCHWImage`). It travels with every model: training
resolves it from `DataLoader.Eval`, model directories store it in `config.json`, and evaluation,
extraction, search and the export check all feed images through it, so a model trained at 48 px
is also extracted at 48 px without a flag.

The geometric part (`apply`) runs on the host on decoded uint8 RGB images; the pixel part
(`normalize`) runs on device inside the jitted forward (uint8 stays on the wire).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxrec.data import image as image_lib

INTERPOLATIONS = ("bilinear",)


@dataclasses.dataclass(frozen=True)
class PixelNorm:
    """`NormalizeImage`: `(float32(x) * scale - mean) / std` per RGB channel, on device."""

    scale: float = image_lib.SCALE_TRAIN
    mean: tuple[float, float, float] = image_lib.IMAGENET_MEAN
    std: tuple[float, float, float] = image_lib.IMAGENET_STD

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {self.mean}, {self.std}")
        if any(float(s) == 0.0 for s in self.std):
            raise ValueError(f"std must not contain 0, got {self.std}")

    def __call__(self, x: Any) -> Any:
        """uint8 NHWC (numpy or jax, also under jit) -> normalized float32."""
        return image_lib.normalize(x, self.scale, self.mean, self.std)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Deterministic eval/inference preprocessing of one image.

    resize: exact (h, w) resize (PaddleClas `ResizeImage.size`), or None.
    resize_short: resize so the shorter side has this length, keeping the aspect ratio
      (`ResizeImage.resize_short`); needs `crop` so that every image ends at one size.
    crop: centre crop (h, w) after the resize (`CropImage.size`), or None.
    scale, mean, std: `NormalizeImage` (`(x * scale - mean) / std`, per RGB channel).
    """

    resize: tuple[int, int] | None = (224, 224)
    resize_short: int | None = None
    crop: tuple[int, int] | None = None
    interpolation: str = "bilinear"
    scale: float = image_lib.SCALE_TRAIN
    mean: tuple[float, float, float] = image_lib.IMAGENET_MEAN
    std: tuple[float, float, float] = image_lib.IMAGENET_STD

    def __post_init__(self) -> None:
        if (self.resize is None) == (self.resize_short is None):
            raise ValueError("Preprocess needs exactly one of resize (h, w) or resize_short")
        if self.resize_short is not None and self.crop is None:
            raise ValueError(
                "resize_short keeps the aspect ratio, so images end at different sizes; "
                "follow it with a centre crop"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation {self.interpolation!r} is not supported; use {INTERPOLATIONS}"
            )
        PixelNorm(self.scale, self.mean, self.std)  # validates
        for name, size in (("resize", self.resize), ("crop", self.crop)):
            if size is not None and (len(size) != 2 or min(size) < 1):
                raise ValueError(f"{name} must be a positive (h, w), got {size}")

    @property
    def input_size(self) -> tuple[int, int]:
        """(h, w) of the images the model receives."""
        return tuple(self.crop if self.crop is not None else self.resize)  # type: ignore[arg-type]

    def apply(self, img: np.ndarray) -> np.ndarray:
        """Resize (and crop) a decoded uint8 RGB image to `input_size`, PaddleClas style."""
        h, w = img.shape[:2]
        if self.resize_short is not None:
            # ResizeImage(resize_short): the scale factor rounds each side with Python's round().
            pct = float(self.resize_short) / min(w, h)
            target = (int(round(h * pct)), int(round(w * pct)))
        else:
            target = self.resize
        if (h, w) != target:
            img = image_lib.resize_bilinear(img, target)
        if self.crop is not None:
            ch, cw = self.crop
            h, w = img.shape[:2]
            if ch > h or cw > w:
                raise ValueError(f"centre crop {self.crop} is larger than the resized image {h, w}")
            top, left = (h - ch) // 2, (w - cw) // 2
            img = img[top : top + ch, left : left + cw]
        return np.ascontiguousarray(img)

    @property
    def pixel(self) -> PixelNorm:
        return PixelNorm(self.scale, self.mean, self.std)

    def normalize(self, x: Any) -> Any:
        """uint8 NHWC (numpy or jax, also under jit) -> normalized float32."""
        return self.pixel(x)

    def to_json(self) -> dict[str, Any]:
        return {
            "resize": None if self.resize is None else list(self.resize),
            "resize_short": self.resize_short,
            "crop": None if self.crop is None else list(self.crop),
            "interpolation": self.interpolation,
            "scale": float(self.scale),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Preprocess:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown preprocess keys {unknown}")

        def pair(v: Sequence[int] | None) -> tuple[int, int] | None:
            return None if v is None else (int(v[0]), int(v[1]))

        return cls(
            resize=pair(d.get("resize")),
            resize_short=None if d.get("resize_short") is None else int(d["resize_short"]),
            crop=pair(d.get("crop")),
            interpolation=str(d.get("interpolation", "bilinear")),
            scale=float(d.get("scale", image_lib.SCALE_TRAIN)),
            mean=tuple(float(v) for v in d.get("mean", image_lib.IMAGENET_MEAN)),
            std=tuple(float(v) for v in d.get("std", image_lib.IMAGENET_STD)),
        )

    def describe(self) -> str:
        """One line for logs: `resize 224x224, scale 0.00392157, mean (...), std (...)`."""
        geo = (
            f"resize {self.resize[0]}x{self.resize[1]}"
            if self.resize is not None
            else f"resize short side {self.resize_short}"
        )
        if self.crop is not None:
            geo += f", centre crop {self.crop[0]}x{self.crop[1]}"
        return (
            f"{geo} ({self.interpolation}), scale {self.scale:.8g}, "
            f"mean {tuple(round(v, 6) for v in self.mean)}, "
            f"std {tuple(round(v, 6) for v in self.std)}"
        )


#: PaddleClas `deploy/configs/inference_rec.yaml`: what a converted PaddleClas model expects.
INFERENCE_REC = Preprocess(resize=(224, 224), scale=image_lib.SCALE_DEPLOY)
#: What model directories written before preprocessing was recorded were extracted with.
LEGACY = Preprocess(resize=(224, 224), scale=image_lib.SCALE_TRAIN)


# Model outputs a feature can be read from (RecModel.__call__).
OUTPUT_KEYS = ("features", "backbone", "neck", "logits")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Which model output is the feature vector, and whether it is L2-normalized after."""

    output_key: str = "features"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.output_key not in OUTPUT_KEYS:
            raise ValueError(f"feature output_key {self.output_key!r} is not one of {OUTPUT_KEYS}")

    def to_json(self) -> dict[str, Any]:
        return {"output_key": self.output_key, "normalize": bool(self.normalize)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FeatureSpec:
        unknown = sorted(set(d) - {"output_key", "normalize"})
        if unknown:
            raise ValueError(f"unknown features keys {unknown}")
        return cls(str(d.get("output_key", "features")), bool(d.get("normalize", True)))
