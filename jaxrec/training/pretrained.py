"""`Global.pretrained_model`: weights from a model directory or a .pdparams file, merged
non-strictly into a fresh model (like PaddleClas: matching keys load, the rest is reported)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.errors import JaxrecError
from jaxrec.models import load_model_dir
from jaxrec.paddle.convert import load_pdparams_variables
from jaxrec.treepath import path_names

PyTree = Any


def _flatten(tree: PyTree) -> dict[tuple[str, ...], Any]:
    return {path_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def merge_pretrained(
    variables: Mapping[str, PyTree], loaded: Mapping[str, PyTree], source: str
) -> tuple[dict, list[str]]:
    """Copy every loaded array whose path and shape match into `variables` (non-strict, like
    the reference's `pretrained_model`); returns the new variables and messages about the rest.
    """
    notes = []
    out = {}
    for col in ("params", "batch_stats"):
        cur = variables.get(col, {})
        new = _flatten(loaded.get(col, {}))
        used = set()

        def pick(path, leaf, new=new, used=used, col=col):
            names = path_names(path)
            if names not in new:
                notes.append(f"{col}/{'/'.join(names)}: missing from {source}, kept at init")
                return leaf
            val = np.asarray(new[names])
            used.add(names)
            if tuple(val.shape) != tuple(leaf.shape):
                notes.append(
                    f"{col}/{'/'.join(names)}: shape {list(val.shape)} in {source} vs "
                    f"{list(leaf.shape)} in the model, kept at init"
                )
                return leaf
            return jnp.asarray(val, leaf.dtype)

        out[col] = jax.tree_util.tree_map_with_path(pick, cur)
        for names in sorted(set(new) - used):
            notes.append(f"{col}/{'/'.join(names)}: in {source} but not in the model, ignored")
    return out, notes


def load_pretrained_variables(path: str) -> dict:
    """Variables from a jaxrec model directory or a PaddleClas `.pdparams` file (or prefix)."""
    if os.path.isdir(path):
        return dict(load_model_dir(path).variables)
    for candidate in (path, path + ".pdparams"):
        if os.path.isfile(candidate):
            return dict(load_pdparams_variables(candidate))
    raise JaxrecError(
        f"Global.pretrained_model={path!r}: neither a jaxrec model directory nor a .pdparams "
        "file (a prefix without .pdparams also works)"
    )


def apply_pretrained(
    params: PyTree, batch_stats: PyTree, path: str, log=print
) -> tuple[PyTree, PyTree]:
    """Merge the weights at `path` into `({"model", "loss"} params, batch_stats)`."""
    loaded = load_pretrained_variables(path)
    merged, notes = merge_pretrained(
        {"params": params["model"], "batch_stats": batch_stats}, loaded, path
    )
    for n in notes:
        log(f"pretrained: {n}")
    return {"model": merged["params"], "loss": params["loss"]}, merged["batch_stats"]
