"""A training workdir: `Workdir` names every path of its layout; WORKDIR/config.json and the
check before resuming.

    WORKDIR/config.json              the run's config (`save_config`, `load_run`)
    WORKDIR/paddleclas.yaml          the run as a PaddleClas YAML (`jaxrec.paddle.yaml_out`)
    WORKDIR/checkpoints/STEP/{state,meta}   the last checkpoints (`jaxrec.training.checkpoint`)
    WORKDIR/best/STEP/{state,meta}   the checkpoint of the best evaluation so far
    WORKDIR/tensorboard/             TensorBoard event files (`jaxrec.training.tensorboard`)
    WORKDIR/eval/                    evaluate.py's results and rank-list pictures
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

from jaxrec.config import Run, resolve
from jaxrec.config.plain import config_diff, to_plain
from jaxrec.errors import ConfigChangedError, JaxrecError
from jaxrec.paddle.yaml_out import PADDLECLAS_YAML

CONFIG_FILE = "config.json"
#: Checkpoint kinds (`which`) and their folders.
KINDS = {"latest": "checkpoints", "best": "best"}


@dataclasses.dataclass(frozen=True)
class Workdir:
    """The paths of a training workdir; the only place that spells them."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root).absolute())

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def paddleclas_yaml(self) -> Path:
        return self.root / PADDLECLAS_YAML

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def checkpoints(self, which: str = "latest") -> Path:
        """The folder of the `which` ("latest" or "best") checkpoints."""
        if which not in KINDS:
            raise JaxrecError(f"which={which!r}: use best or latest")
        return self.root / KINDS[which]

    def checkpoint(self, which: str, step: int) -> Path:
        return self.checkpoints(which) / str(step)

    def is_workdir(self) -> bool:
        """Whether this looks like a training workdir (config.json and a checkpoint folder)."""
        return self.config.is_file() and any(self.checkpoints(w).is_dir() for w in KINDS)

    def __str__(self) -> str:
        return str(self.root)


#: Keys that may change between a run and its resumption without changing its results.
NON_TRAINING_KEYS = {
    "Global.allow_config_change",
    "Global.print_batch_step",
    "Global.output_dir",
    "Global.save_inference_dir",
    "Global.use_visualdl",
}


def save_config(config: Any, workdir: str | os.PathLike) -> str:
    """Write the run's config as `WORKDIR/config.json` (atomically) and return the path."""
    os.makedirs(workdir, exist_ok=True)
    path = str(Workdir(workdir).config)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(to_plain(config), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load_config(workdir: str | os.PathLike) -> dict[str, Any]:
    """The plain config a run saved in its workdir."""
    path = str(Workdir(workdir).config)
    if not os.path.isfile(path):
        raise JaxrecError(f"{path} not found: is {workdir} a training workdir written by train.py?")
    with open(path) as f:
        try:
            plain = json.load(f)
        except json.JSONDecodeError as e:
            raise JaxrecError(f"{path}: not valid JSON ({e}); delete or repair it") from None
    if not isinstance(plain, dict):
        raise JaxrecError(f"{path}: not a config (top level is {type(plain).__name__})")
    return plain


def check_resume_config(config: Any, workdir: str | os.PathLike, allow_change: bool) -> None:
    """Compare `config` with WORKDIR/config.json; error (or warn when allowed) on differences."""
    if not Workdir(workdir).config.is_file():
        return
    old = load_config(workdir)
    new = to_plain(config)
    diffs = [d for d in config_diff(old, new) if d.split(":")[0] not in NON_TRAINING_KEYS]
    if not diffs:
        return
    listing = "\n  ".join(diffs[:40])
    if allow_change:
        warnings.warn(
            f"resuming {workdir} with a changed config (Global.allow_config_change=True); "
            f"the run is no longer reproducible:\n  {listing}",
            stacklevel=2,
        )
        return
    raise ConfigChangedError(
        f"{workdir} holds a run with a different config ({len(diffs)} difference(s), saved -> "
        f"now):\n  {listing}\nUse a new --workdir, rerun with the saved config "
        f"({Workdir(workdir).config}), or pass "
        "--config.Global.allow_config_change=True to resume anyway."
    )


def load_run(workdir: str | os.PathLike) -> Run:
    """The resolved run of a training workdir (from its config.json)."""
    return resolve(load_config(workdir))
