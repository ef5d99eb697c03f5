"""The model's feature function: the one definition of "image batch -> feature vectors" that
evaluation, extraction, the export (its traced graph and its check) and search share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from jaxrec.data.preprocess import FeatureSpec, PixelNorm
from jaxrec.ops import l2_normalize

FeatureFn = Callable[[Mapping[str, Any], Any], Any]


def feature_fn(
    model: Any,
    features: FeatureSpec,
    pixel: PixelNorm | None = None,
    dtype: Any = jnp.float32,
) -> FeatureFn:
    """`(variables, images NHWC) -> float32 [N, D] features`, not jitted.

    `pixel` normalizes uint8 pixels first (None: the images are already normalized floats); the
    model runs in eval mode in `dtype`; its `features.output_key` output is cast to float32 and
    L2-normalized when `features.normalize`.
    """
    key, normalize = features.output_key, bool(features.normalize)

    def image_features(variables: Mapping[str, Any], images: Any) -> Any:
        x = images if pixel is None else pixel(images)
        out = model.apply(variables, x.astype(dtype), train=False)[key].astype(jnp.float32)
        return l2_normalize(out) if normalize else out

    return image_features
