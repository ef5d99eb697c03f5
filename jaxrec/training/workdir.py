"""The run's config in its workdir: WORKDIR/config.json, and the check before resuming."""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

from jaxrec.config import Run, resolve
from jaxrec.config.plain import config_diff, to_plain
from jaxrec.errors import ConfigChangedError, JaxrecError

CONFIG_FILE = "config.json"

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
    path = os.path.join(os.fspath(workdir), CONFIG_FILE)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(to_plain(config), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load_config(workdir: str | os.PathLike) -> dict[str, Any]:
    """The plain config a run saved in its workdir."""
    path = os.path.join(os.fspath(workdir), CONFIG_FILE)
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


def check_resume_config(config: Any, workdir: str, allow_change: bool) -> None:
    """Compare `config` with WORKDIR/config.json; error (or warn when allowed) on differences."""
    if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
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
        f"({os.path.join(workdir, CONFIG_FILE)}), or pass "
        "--config.Global.allow_config_change=True to resume anyway."
    )


def load_run(workdir: str | os.PathLike) -> Run:
    """The resolved run of a training workdir (from its config.json)."""
    return resolve(load_config(workdir))
