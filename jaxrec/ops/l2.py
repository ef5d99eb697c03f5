"""Row-wise L2 normalization: the one definition used for features everywhere in jaxrec."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

EPS = 1e-12


def l2_normalize(x: Any, eps: float = EPS) -> Any:
    """`x / max(||x||, eps)` over the last axis, in float32 (numpy in, numpy out; jax in, jax out).

    This is PaddleClas's eval normalization (`feature_normalize`). An all-zero row stays zero;
    PP-ShiTu's deploy code divides without an epsilon (a zero row becomes NaN there), which is
    the only case where the two differ. The norm is accumulated in float32.
    """
    if type(x).__module__.startswith(("jax", "jaxlib")):
        x = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
        return x / jnp.maximum(norm, jnp.float32(eps))
    x = np.asarray(x, dtype=np.float32)
    norm = np.sqrt(np.sum(np.square(x), axis=-1, keepdims=True))
    return x / np.maximum(norm, np.float32(eps))
