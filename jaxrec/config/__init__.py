"""Configs: the PaddleClas-mirroring ConfigDict in, a frozen resolved `Run` out.

`resolve(config)` is the only reader of config keys (see `resolve.py`); `keys.INERT` lists the
keys that are accepted but change nothing; `defaults.py` holds every default.
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
from jaxrec.errors import ConfigError

__all__ = [
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
    "config_diff",
    "from_plain",
    "resolve",
    "to_plain",
]
