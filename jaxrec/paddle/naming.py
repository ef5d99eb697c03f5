"""Mapping between jaxrec variable paths and Paddle state-dict keys / layouts (ref §11.3, 11.4).

jaxrec module names mirror Paddle's with indices joined by "_": `stages_2_0` <-> `stages.2.0`,
`stem_1` <-> `stem.1`, `dw_conv_list_1` <-> `dw_conv_list.1`. Leaves: conv/Dense `kernel` <->
`weight`, BN `scale` <-> `weight`, `bias` <-> `bias`, batch_stats `mean`/`var` <->
`_mean`/`_variance`; margin heads' `weight` stays `weight`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

_STAGE = re.compile(r"^stages_(\d+)_(\d+)$")
_INDEXED = re.compile(r"^(stem|dw_conv_list)_(\d+)$")
_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("params", "weight"): "weight",
    ("batch_stats", "mean"): "_mean",
    ("batch_stats", "var"): "_variance",
}


def _module_to_paddle(name: str) -> str:
    m = _STAGE.match(name)
    if m:
        return f"stages.{m.group(1)}.{m.group(2)}"
    m = _INDEXED.match(name)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    return name


def paddle_key(collection: str, path: tuple[str, ...]) -> str:
    """Paddle state-dict key of the jaxrec leaf `variables[collection][path...]`."""
    leaf = _LEAF.get((collection, path[-1]))
    if leaf is None:
        raise KeyError(f"no Paddle name for {collection}/{'/'.join(path)}")
    return ".".join([_module_to_paddle(p) for p in path[:-1]] + [leaf])


def to_paddle_layout(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    """jaxrec array -> Paddle layout: conv HWIO -> OIHW; Dense [in,out] stays as is."""
    value = np.asarray(value)
    if path[-1] == "kernel" and value.ndim == 4:
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    return value


def from_paddle_layout(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    """Paddle array -> jaxrec layout: conv OIHW -> HWIO (DW [C,1,k,k] -> [k,k,1,C])."""
    value = np.asarray(value)
    if path[-1] == "kernel" and value.ndim == 4:
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    return value


def paddle_shape(shape: tuple[int, ...], path: tuple[str, ...]) -> tuple[int, ...]:
    """Paddle shape of a jaxrec leaf with `shape`."""
    if path[-1] == "kernel" and len(shape) == 4:
        h, w, i, o = shape
        return (o, i, h, w)
    return tuple(shape)


def to_paddle_state_dict(variables: dict) -> dict[str, np.ndarray]:
    """{Paddle structured name: array in Paddle layout} for training-form variables.

    The inverse of the converter's mapping (rep-block fusion targets are not produced).
    """
    out: dict[str, np.ndarray] = {}
    for collection in ("params", "batch_stats"):
        tree = variables.get(collection, {})
        for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            path = tuple(k.key for k in kp)
            out[paddle_key(collection, path)] = to_paddle_layout(np.asarray(leaf), path)
    return out


_BN_MODULES = ("bn", "feat_bn")


def jaxrec_path(key: str, ndim: int) -> tuple[str, tuple[str, ...]]:
    """(collection, path) of the jaxrec leaf for a Paddle key (RecModel form, `backbone.`...).

    The inverse of `paddle_key`: "backbone.stages.2.0.dw_conv_list.1.bn._mean" ->
    ("batch_stats", ("backbone", "stages_2_0", "dw_conv_list_1", "bn", "mean")).
    """
    parts = key.split(".")
    mods: list[str] = []
    i = 0
    body = parts[:-1]
    while i < len(body):
        p = body[i]
        if p == "stages" and i + 2 < len(body):
            mods.append(f"stages_{body[i + 1]}_{body[i + 2]}")
            i += 3
        elif p in ("stem", "dw_conv_list") and i + 1 < len(body):
            mods.append(f"{p}_{body[i + 1]}")
            i += 2
        else:
            mods.append(p)
            i += 1
    leaf = parts[-1]
    if leaf == "_mean":
        return "batch_stats", (*mods, "mean")
    if leaf == "_variance":
        return "batch_stats", (*mods, "var")
    if leaf == "bias":
        return "params", (*mods, "bias")
    if leaf == "weight":
        if mods and mods[-1] in _BN_MODULES:
            return "params", (*mods, "scale")
        if mods == ["head"]:  # margin heads own a bare `weight` [emb, classes]
            return "params", (*mods, "weight")
        return "params", (*mods, "kernel")
    raise KeyError(f"no jaxrec name for Paddle key {key!r}")


# ------------------------------------------------------------- state-dict key order

FUSION_TARGET = re.compile(r"^(.*)\.dw_conv\.(weight|bias)$")

# PaddleClas's state-dict order: sublayers in registration order (RecModel: backbone, neck,
# head; PPLCNetV2: stem, stages, last_conv, fc; RepDepthwiseSeparable: dw_conv_list, dw_conv,
# se, pw_conv(_1, _2); ConvBNLayer: conv, bn; SE: conv1, conv2), then each layer's parameters
# (weight, bias) and buffers (_mean, _variance). Siblings never share a name, so one ranking
# orders every level.
_PADDLE_ORDER = {
    name: i
    for i, name in enumerate(
        "backbone neck head stem stages last_conv dw_conv_list dw_conv se pw_conv pw_conv_1 "
        "pw_conv_2 conv bn conv1 conv2 feat_bn fc weight bias _mean _variance".split()
    )
}


def is_fusion_target(key: str, state: Mapping[str, Any]) -> bool:
    """Whether `key` is a rep block's `dw_conv.weight/bias` (the re-parameterization target
    next to its `dw_conv_list.*` branches) in a training-form state dict."""
    m = FUSION_TARGET.match(key)
    return m is not None and f"{m.group(1)}.dw_conv_list.0.conv.weight" in state


def paddle_order_key(key: str) -> tuple:
    """Sort key putting PP-LCNetV2 / RecModel state-dict keys in PaddleClas's own order."""
    return tuple(
        (0, int(p), "") if p.isdigit() else (1 + _PADDLE_ORDER.get(p, len(_PADDLE_ORDER)), 0, p)
        for p in key.split(".")
    )
