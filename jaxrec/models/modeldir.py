"""Model directories: `config.json` (the Arch dict) + an orbax checkpoint of the variables.

Layout of DIR:
  DIR/config.json   {"format": "jaxrec.model_dir", "version": 1, "Arch": {...}}
  DIR/variables/    orbax StandardCheckpointer tree {"params", "batch_stats"}
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxrec.models.recmodel import RecModel, abstract_variables, build_model

FORMAT = "jaxrec.model_dir"
VERSION = 1


def _to_numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: np.asarray(a), flax.core.unfreeze(tree))


def save_model_dir(
    path: str | os.PathLike,
    arch: Mapping[str, Any],
    variables: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write `arch` and `variables` to the model directory `path` (created; must not exist
    unless `overwrite`). The variables must match `build_model(arch)` (checked)."""
    path = Path(path).absolute()
    model = build_model(arch)
    expected = abstract_variables(model)
    got = jax.tree_util.tree_structure(_to_numpy(variables))
    want = jax.tree_util.tree_structure(expected)
    if got != want:
        raise ValueError(
            f"save_model_dir({path}): variables do not match the Arch (e.g. deploy form vs "
            f"training form); expected tree {want}, got {got}"
        )
    for (kp, leaf), ref in zip(
        jax.tree_util.tree_leaves_with_path(_to_numpy(variables)),
        jax.tree_util.tree_leaves(expected),
        strict=True,
    ):
        if tuple(leaf.shape) != tuple(ref.shape):
            raise ValueError(
                f"save_model_dir({path}): {jax.tree_util.keystr(kp)} has shape {leaf.shape}, "
                f"the Arch needs {ref.shape}"
            )
    if path.exists():
        if not overwrite and any(path.iterdir()):
            raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True)")
        if (path / "variables").exists():
            import shutil

            shutil.rmtree(path / "variables")
    path.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path / "variables", _to_numpy(variables))
    ckptr.wait_until_finished()
    ckptr.close()
    cfg = {"format": FORMAT, "version": VERSION, "Arch": dict(arch)}
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=False) + "\n")
    return path


def read_arch(path: str | os.PathLike) -> dict[str, Any]:
    """The Arch dict stored in a model directory's config.json."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{cfg_file} not found: {path} is not a jaxrec model directory "
            "(create one with jaxrec.convert or save_model_dir)"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or "Arch" not in cfg:
        raise ValueError(f"{cfg_file}: not a jaxrec model config (needs format and Arch keys)")
    if cfg.get("version", 0) > VERSION:
        raise ValueError(f"{cfg_file}: version {cfg['version']} is newer than this jaxrec")
    return cfg["Arch"]


def load_model_dir(path: str | os.PathLike) -> tuple[RecModel, dict[str, Any], dict[str, Any]]:
    """(model, variables, arch) from a model directory; variables are on the default device."""
    path = Path(path).absolute()
    arch = read_arch(path)
    model = build_model(arch)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        abstract_variables(model),
    )
    ckptr = ocp.StandardCheckpointer()
    try:
        variables = ckptr.restore(path / "variables", target)
    finally:
        ckptr.close()
    return model, dict(variables), arch
