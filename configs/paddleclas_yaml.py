"""Train from a PaddleClas YAML config as it is.

    python train.py --config configs/paddleclas_yaml.py:path/to/config.yaml --workdir runs/x \
        --config.Global.epochs=10      # PaddleClas's `-o Global.epochs=10`

The YAML's keys are checked like any jaxrec config: each is honoured, listed as inert in
docs/CONFIG.md, or an error naming it (with what is supported). Relative paths in the YAML
(`./dataset/...`) are relative to the current directory, as in PaddleClas.
"""

from __future__ import annotations

from jaxrec.paddle.yaml_in import load_yaml


def get_config(path: str | None = None):
    if not path:
        raise SystemExit(
            "error: give the YAML after a colon: --config configs/paddleclas_yaml.py:FILE.yaml"
        )
    return load_yaml(path)
