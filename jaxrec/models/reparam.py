"""Re-parameterization of rep blocks (spec 2.6): multi-branch DW conv+BN -> one DW conv + bias."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

BN_EPS = 1e-5
_BRANCH = re.compile(r"^dw_conv_list_(\d+)$")


def _branches(params: Mapping[str, Any]) -> list[str]:
    names = [k for k in params if _BRANCH.match(k)]
    return sorted(names, key=lambda k: int(_BRANCH.match(k).group(1)))


def _is_concrete(tree: Any) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(tree))


def fuse_branches(
    params: Mapping[str, Any], stats: Mapping[str, Any], eps: float = BN_EPS
) -> tuple[Any, Any]:
    """Fused (kernel [k,k,1,C], bias [C]) of one block's `dw_conv_list_*` branches.

    Each branch's BN folds into its kernel (W*t, beta - mean*t with t = gamma/sqrt(var+eps)),
    smaller kernels are zero-padded to the centre of the largest, and all are summed. Computed
    in float32 with numpy for concrete arrays (fast, no per-shape compiles), jnp under tracing.
    """
    xp = np if _is_concrete((params, stats)) else jnp
    names = _branches(params)
    size = max(params[n]["conv"]["kernel"].shape[0] for n in names)
    kernel = 0.0
    bias = 0.0
    for n in names:
        w = xp.asarray(params[n]["conv"]["kernel"], xp.float32)
        bn, st = params[n]["bn"], stats[n]["bn"]
        t = xp.asarray(bn["scale"], xp.float32) / xp.sqrt(
            xp.asarray(st["var"], xp.float32) + xp.float32(eps)
        )
        p = (size - w.shape[0]) // 2
        kernel = kernel + xp.pad(w * t, ((p, p), (p, p), (0, 0), (0, 0)))
        bias = bias + (xp.asarray(bn["bias"], xp.float32) - xp.asarray(st["mean"], xp.float32) * t)
    return kernel, bias


def _walk(params: Mapping[str, Any], stats: Mapping[str, Any]) -> tuple[dict, dict]:
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
            sub_s = stats.get(k, {}) if isinstance(stats, Mapping) else {}
            new_p[k], s = _walk(v, sub_s)
            if s:
                new_s[k] = s
        else:
            new_p[k] = v
    # Statistics of modules without params (none in this model) are kept as they are.
    for k, v in stats.items():
        if k not in params and not _BRANCH.match(k):
            new_s[k] = v
    return new_p, new_s


def reparameterize(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Training-form variables -> deploy-form variables (model built with `deploy=True`).

    Pure: the input is not modified. Every module holding `dw_conv_list_*` branches gets one
    `dw_conv` {kernel, bias} instead, and the branches' BN statistics are dropped. Eval outputs
    of the two forms agree to float32 rounding. Other collections are copied unchanged.
    """
    variables = flax.core.unfreeze(variables)
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    new_params, new_stats = _walk(params, _stats_tree(stats))
    out = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
    out["params"] = new_params
    out["batch_stats"] = new_stats
    return out


def _stats_tree(stats: Any) -> Any:
    return stats if isinstance(stats, Mapping) else {}
