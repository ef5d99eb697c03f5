"""Configs: the PaddleClas-mirroring ConfigDict in, a frozen resolved `Run` out.

`resolve(config)` is the only reader of config keys (see `resolve.py`); `keys.INERT` lists the
keys that are accepted but change nothing; `defaults.py` holds every default; `workdir.py` keeps
WORKDIR/config.json.
"""

from jaxrec.config.plain import config_diff, from_plain, to_plain
from jaxrec.config.resolve import resolve
from jaxrec.config.spec import (
    DatasetSpec,
    EvalDataSpec,
    EvalSpec,
    LoopSpec,
    LRSpec,
    OptimSpec,
    Run,
    SamplerSpec,
    TrainDataSpec,
)
from jaxrec.config.workdir import CONFIG_FILE, check_resume_config, load_config, save_config
from jaxrec.errors import ConfigError


def load_run(workdir: str) -> Run:
    """The resolved run of a training workdir (from its config.json)."""
    return resolve(load_config(workdir))


__all__ = [
    "CONFIG_FILE",
    "ConfigError",
    "DatasetSpec",
    "EvalDataSpec",
    "EvalSpec",
    "LRSpec",
    "LoopSpec",
    "OptimSpec",
    "Run",
    "SamplerSpec",
    "TrainDataSpec",
    "check_resume_config",
    "config_diff",
    "from_plain",
    "load_config",
    "load_run",
    "resolve",
    "save_config",
    "to_plain",
]
