"""PaddleClas YAML configs in: a `.yaml` file -> the same ConfigDict as a jaxrec config file.

    python train.py --config configs/paddleclas_yaml.py:GeneralRecognitionV2_PPLCNetV2_base.yaml \
        --config.Global.epochs=10 --config.DataLoader.Train.sampler.batch_size=64

The YAML is read as it is (anchors and all), then jaxrec's own keys and PaddleClas's implicit
defaults are added (`defaults.fill`), so that every key can be overridden on the command line
like PaddleClas's `-o Section.key=value`, and the resolver checks it like any other config:
unsupported keys are errors naming them, inert ones are listed in docs/CONFIG.md.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import yaml
from ml_collections import config_dict

from jaxrec.config import defaults
from jaxrec.errors import ConfigError


def _to_config(value: Any) -> Any:
    if isinstance(value, dict):
        return ml_collections.ConfigDict({str(k): _to_config(v) for k, v in value.items()})
    if isinstance(value, list):
        if any(isinstance(v, dict) for v in value):
            return [_to_config(v) for v in value]
        return tuple(value)
    if value is None:
        return config_dict.placeholder(str)  # overridable with a string on the command line
    return value


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The plain tree of a PaddleClas YAML file; syntax errors name the file and line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError("", f"PaddleClas YAML {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            tree = yaml.safe_load(f)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark
            where = f"{path}:{mark.line + 1}" if mark is not None else path
            raise ConfigError("", f"{where}: not valid YAML ({e.problem})") from None
    if not isinstance(tree, dict):
        raise ConfigError("", f"{path}: a PaddleClas config is a mapping of sections")
    return tree


def load_yaml(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """A PaddleClas YAML file as a jaxrec config (ConfigDict), defaults filled in."""
    return defaults.fill(_to_config(read_yaml(path)))
