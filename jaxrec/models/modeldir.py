"""Model directories: a model with everything needed to feed it and read its features.

Layout of DIR:
  DIR/config.json   {"format": "jaxrec.model_dir", "version": 2, "Arch": {...},
                     "preprocess": {...}, "features": {"output_key": ..., "normalize": ...}}
  DIR/variables/    orbax StandardCheckpointer tree {"params", "batch_stats"}

`preprocess` (see `jaxrec.data.preprocess.Preprocess`) is the input size, resize and pixel
normalization the model was trained and evaluated with; `features` says which model output is
the feature and whether it is L2-normalized. Version-1 directories (written before these were
recorded) still load: they get the 224 px / 1/255 / ImageNet preprocessing that jaxrec used for
them then, and `legacy` is set so that commands can say so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxrec.data.preprocess import LEGACY, FeatureSpec, Preprocess
from jaxrec.errors import ModelDirError
from jaxrec.models.recmodel import RecModel, abstract_variables, build_model

FORMAT = "jaxrec.model_dir"
VERSION = 2
CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"


@dataclasses.dataclass(frozen=True)
class ModelDir:
    """A loaded model: the Flax module, its variables and how to feed and read it."""

    model: RecModel
    variables: dict[str, Any]
    arch: dict[str, Any]
    preprocess: Preprocess
    features: FeatureSpec
    source: str
    legacy: bool = False

    def fingerprint(self) -> str:
        """Content hash of the model: Arch, preprocessing, feature spec and every variable."""
        return fingerprint(self.arch, self.variables, self.preprocess, self.features)


def _to_numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: np.asarray(a), flax.core.unfreeze(tree))


def fingerprint(
    arch: Mapping[str, Any],
    variables: Mapping[str, Any],
    preprocess: Preprocess,
    features: FeatureSpec,
) -> str:
    """sha256 (hex) over the canonical JSON of arch/preprocess/features and every variable's
    path, dtype, shape and bytes. Equal for equal models whatever directory they sit in."""
    h = hashlib.sha256()
    meta = {"Arch": dict(arch), "preprocess": preprocess.to_json(), "features": features.to_json()}
    h.update(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for kp, leaf in jax.tree_util.tree_leaves_with_path(_to_numpy(variables)):
        a = np.ascontiguousarray(leaf)
        h.update(f"{jax.tree_util.keystr(kp)}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def check_variables(arch: Mapping[str, Any], variables: Mapping[str, Any], where: str) -> None:
    """Raise ModelDirError unless `variables` has exactly the tree and shapes `arch` builds."""
    expected = abstract_variables(build_model(arch))
    got = jax.tree_util.tree_structure(_to_numpy(variables))
    want = jax.tree_util.tree_structure(expected)
    if got != want:
        raise ModelDirError(
            f"{where}: variables do not match the Arch (e.g. deploy form vs training form); "
            f"expected tree {want}, got {got}"
        )
    for (kp, leaf), ref in zip(
        jax.tree_util.tree_leaves_with_path(_to_numpy(variables)),
        jax.tree_util.tree_leaves(expected),
        strict=True,
    ):
        if tuple(leaf.shape) != tuple(ref.shape):
            raise ModelDirError(
                f"{where}: {jax.tree_util.keystr(kp)} has shape {leaf.shape}, the Arch needs "
                f"{ref.shape}"
            )


def save_model_dir(
    path: str | os.PathLike,
    arch: Mapping[str, Any],
    variables: Mapping[str, Any],
    *,
    preprocess: Preprocess,
    features: FeatureSpec | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model directory at `path` (created; must be empty unless `overwrite`).

    The variables must match `build_model(arch)` (checked before anything is written).
    `features` defaults to `FeatureSpec()` (the L2-normalized "features" output).
    """
    features = FeatureSpec() if features is None else features
    path = Path(path).absolute()
    check_variables(arch, variables, f"save_model_dir({path})")
    if path.exists():
        if not overwrite and any(path.iterdir()):
            raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True)")
        if (path / VARIABLES_DIR).exists():
            shutil.rmtree(path / VARIABLES_DIR)
    path.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path / VARIABLES_DIR, _to_numpy(variables))
    ckptr.wait_until_finished()
    ckptr.close()
    cfg = {
        "format": FORMAT,
        "version": VERSION,
        "Arch": dict(arch),
        "preprocess": preprocess.to_json(),
        "features": features.to_json(),
    }
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, path / CONFIG_FILE)
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The validated config.json of a model directory (any supported version)."""
    cfg_file = Path(path) / CONFIG_FILE
    if not cfg_file.is_file():
        raise ModelDirError(
            f"{cfg_file} not found: {path} is not a jaxrec model directory "
            "(create one with `python -m jaxrec.convert` or `python -m jaxrec.export`)"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{cfg_file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or "Arch" not in cfg:
        raise ModelDirError(f"{cfg_file}: not a jaxrec model config (needs format and Arch keys)")
    version = cfg.get("version", 1)
    if not isinstance(version, int) or version > VERSION:
        raise ModelDirError(f"{cfg_file}: version {version!r} is newer than this jaxrec")
    return cfg


def read_arch(path: str | os.PathLike) -> dict[str, Any]:
    """The Arch dict stored in a model directory's config.json."""
    return read_config(path)["Arch"]


def read_specs(path: str | os.PathLike) -> tuple[Preprocess, FeatureSpec, bool]:
    """(preprocess, feature spec, legacy) of a model directory; legacy dirs get LEGACY."""
    cfg = read_config(path)
    cfg_file = Path(path) / CONFIG_FILE
    if "preprocess" not in cfg:
        return LEGACY, FeatureSpec(cfg["Arch"].get("infer_output_key", "features")), True
    try:
        return (
            Preprocess.from_json(cfg["preprocess"]),
            FeatureSpec.from_json(cfg.get("features", {})),
            False,
        )
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise ModelDirError(f"{cfg_file}: bad preprocess/features record: {e}") from None


def load_model_dir(path: str | os.PathLike) -> ModelDir:
    """Load a model directory; variables are on the default device."""
    path = Path(path).absolute()
    arch = read_arch(path)
    preprocess, features, legacy = read_specs(path)
    try:
        model = build_model(arch)
    except ValueError as e:
        raise ModelDirError(f"{path / CONFIG_FILE}: {e}") from None
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        abstract_variables(model),
    )
    ckptr = ocp.StandardCheckpointer()
    try:
        variables = ckptr.restore(path / VARIABLES_DIR, target)
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds for damaged files
        raise ModelDirError(
            f"{path / VARIABLES_DIR}: cannot restore the variables the Arch needs "
            f"({type(e).__name__}: {str(e)[:300]})"
        ) from None
    finally:
        ckptr.close()
    return ModelDir(
        model=model,
        variables=dict(variables),
        arch=arch,
        preprocess=preprocess,
        features=features,
        source=f"model dir {path}",
        legacy=legacy,
    )
