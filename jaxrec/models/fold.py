"""Folding eval-mode BatchNorm into the layer before it: the one place jaxrec does this.

An eval-mode BatchNorm is one per-channel affine map,

    BN(y) = (y - mean) / sqrt(var + eps) * gamma + beta = y * t + (beta - mean * t),
    t = gamma / sqrt(var + eps),

so a conv without bias followed by BN equals a conv with kernel W * t and bias beta - mean * t.
Two model forms use this (both exact in eval mode up to float rounding):

- the deploy form (`build_model(..., deploy=True)`, `reparameterize`): each rep block's
  `dw_conv_list_*` branches (depthwise conv + BN each) become one depthwise conv with bias
  (ref §2.6);
- the BN-folded form (`build_model(..., deploy=True, fold_bn=True)`, `fold_variables`):
  additionally every ConvBN becomes a conv with bias and the BNNeck's BatchNorm a per-feature
  affine map (`FoldedBN`). It has no BatchNorm left and is what `jaxrec.export` lowers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.models.layers import BN_EPS

_BRANCH = re.compile(r"^dw_conv_list_(\d+)$")
_BN_PARAMS = frozenset({"scale", "bias"})
_BN_STATS = frozenset({"mean", "var"})


def _is_concrete(tree: Any) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(tree))


def _xp(tree: Any) -> tuple[Any, Any]:
    """(array module, compute dtype): float64 numpy for concrete arrays (exact enough that the
    folded model matches to float32 rounding, and no per-shape compiles), float32 jnp when
    traced (e.g. under `jax.eval_shape`)."""
    return (np, np.float64) if _is_concrete(tree) else (jnp, jnp.float32)


def bn_affine(bn: Mapping[str, Any], stats: Mapping[str, Any], eps: float = BN_EPS):
    """(t, c) with BN(y) = y * t + c for BN params {scale, bias} and statistics {mean, var}."""
    xp, dt = _xp((bn, stats))
    t = xp.asarray(bn["scale"], dt) / xp.sqrt(xp.asarray(stats["var"], dt) + eps)
    return t, xp.asarray(bn["bias"], dt) - xp.asarray(stats["mean"], dt) * t


def fold_conv_bn(kernel: Any, bn: Mapping[str, Any], stats: Mapping[str, Any]):
    """(kernel * t, c): a bias-free conv (kernel [..., C_out]) followed by BN as one conv."""
    xp, dt = _xp((kernel, bn, stats))
    t, c = bn_affine(bn, stats)
    return xp.asarray(kernel, dt) * t, c


# ---------------------------------------------------------------------------- deploy form


def _branches(params: Mapping[str, Any]) -> list[str]:
    names = [k for k in params if _BRANCH.match(k)]
    return sorted(names, key=lambda k: int(_BRANCH.match(k).group(1)))


def fuse_branches(params: Mapping[str, Any], stats: Mapping[str, Any]) -> tuple[Any, Any]:
    """Fused (kernel [k,k,1,C], bias [C]) of one rep block's `dw_conv_list_*` branches.

    Each branch's BN folds into its kernel (`fold_conv_bn`), smaller kernels are zero-padded to
    the centre of the largest, and all are summed.
    """
    xp, _ = _xp((params, stats))
    names = _branches(params)
    size = max(params[n]["conv"]["kernel"].shape[0] for n in names)
    kernel = bias = 0.0
    for n in names:
        w, b = fold_conv_bn(params[n]["conv"]["kernel"], params[n]["bn"], stats[n]["bn"])
        p = (size - w.shape[0]) // 2
        kernel = kernel + xp.pad(w, ((p, p), (p, p), (0, 0), (0, 0)))
        bias = bias + b
    return kernel, bias


def _fuse_walk(params: Mapping[str, Any], stats: Mapping[str, Any]) -> tuple[dict, dict]:
    new_p: dict[str, Any] = {}
    new_s: dict[str, Any] = {}
    if _branches(params):
        kernel, bias = fuse_branches(params, stats)
        dtype = params[_branches(params)[0]]["conv"]["kernel"].dtype
        new_p["dw_conv"] = {"kernel": kernel.astype(dtype), "bias": bias.astype(dtype)}
    for k, v in params.items():
        if _BRANCH.match(k):
            continue
        if isinstance(v, Mapping):
            new_p[k], s = _fuse_walk(v, _sub(stats, k))
            if s:
                new_s[k] = s
        else:
            new_p[k] = v
    # Statistics of modules without params (none in this model) are kept as they are.
    for k, v in stats.items():
        if k not in params and not _BRANCH.match(k):
            new_s[k] = v
    return new_p, new_s


def _sub(tree: Any, key: str) -> Any:
    out = tree.get(key, {}) if isinstance(tree, Mapping) else {}
    return out if isinstance(out, Mapping) else {}


def _split(variables: Mapping[str, Any]) -> tuple[dict, Any, Any]:
    variables = flax.core.unfreeze(variables)
    rest = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
    return rest, variables["params"], _sub(variables, "batch_stats")


def reparameterize(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Training-form -> deploy-form variables (model built with `deploy=True`).

    Pure: the input is not modified. Every module holding `dw_conv_list_*` branches gets one
    `dw_conv` {kernel, bias} instead, and the branches' BN statistics are dropped. Eval outputs
    of the two forms agree to float32 rounding. Other collections are copied unchanged; already
    deploy-form variables come back unchanged.
    """
    out, params, stats = _split(variables)
    out["params"], out["batch_stats"] = _fuse_walk(params, stats)
    return out


# ---------------------------------------------------------------------------- BN-folded form


def _is_bn(params: Any, stats: Any) -> bool:
    return (
        isinstance(params, Mapping)
        and set(params) == _BN_PARAMS
        and isinstance(stats, Mapping)
        and set(stats) == _BN_STATS
    )


def _fold_walk(params: Mapping[str, Any], stats: Mapping[str, Any]) -> tuple[dict, dict]:
    new_p: dict[str, Any] = {}
    new_s: dict[str, Any] = {}
    for k, v in params.items():
        s = _sub(stats, k)
        if k == "conv" and _is_bn(params.get("bn"), _sub(stats, "bn")) and "bias" not in v:
            kernel, bias = fold_conv_bn(v["kernel"], params["bn"], stats["bn"])
            dtype = v["kernel"].dtype
            new_p[k] = {"kernel": kernel.astype(dtype), "bias": bias.astype(dtype)}
        elif k == "bn" and "conv" in params and _is_bn(v, s):
            continue  # folded into the sibling conv above
        elif _is_bn(v, s):
            t, c = bn_affine(v, s)
            new_p[k] = {"scale": t.astype(v["scale"].dtype), "bias": c.astype(v["bias"].dtype)}
        elif isinstance(v, Mapping):
            new_p[k], sub = _fold_walk(v, s)
            if sub:
                new_s[k] = sub
        else:
            new_p[k] = v
    return new_p, new_s


def fold_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Training- or deploy-form variables -> BN-folded variables (`deploy=True, fold_bn=True`).

    Re-parameterizes the rep blocks, then folds every ConvBN's BN into its conv (kernel * t,
    bias beta - mean * t) and the BNNeck's BN into `{scale: t, bias: beta - mean * t}`. The
    result has no `batch_stats`. Pure; already folded variables come back unchanged.
    """
    out, params, stats = _split(reparameterize(variables))
    out["params"], left = _fold_walk(params, stats)
    if left:
        out["batch_stats"] = left
    return out
