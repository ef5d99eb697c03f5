"""Config helpers: plain-dict conversion, the run's config JSON in the workdir, and diffs.

Configs are `ml_collections.ConfigDict`s whose sections and keys mirror the PaddleClas YAML
(`Global`, `AMP`, `Arch`, `Loss`, `Optimizer`, `DataLoader`, `Metric`). Lists of one-key dicts
(`Loss.Train`, `Metric.Eval`, transform ops) hold `ConfigDict`s, so single entries can be
overridden on the command line by index, e.g.
`--config.Loss.Train[1].TripletAngularMarginLoss.margin=0.3`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

CONFIG_FILE = "config.json"


def to_plain(value: Any) -> Any:
    """ConfigDict / FieldReference / tuple tree -> JSON-able dicts, lists and scalars."""
    if isinstance(value, ml_collections.FieldReference):
        return to_plain(value.get())
    if isinstance(value, ml_collections.ConfigDict | Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def from_plain(value: Any) -> Any:
    """Inverse of `to_plain`: dicts (also inside lists) become ConfigDicts; lists stay lists."""
    if isinstance(value, Mapping):
        return ml_collections.ConfigDict({k: from_plain(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return [from_plain(v) for v in value]
    return value


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two plain config trees (`Global.epochs: 10 -> 2`)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{p}: (absent) -> {new[k]!r}")
            elif k not in new:
                out.append(f"{p}: {old[k]!r} -> (absent)")
            else:
                out.extend(config_diff(old[k], new[k], p))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            out.extend(config_diff(a, b, f"{prefix}[{i}]"))
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


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


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run saved in its workdir, as a ConfigDict."""
    path = os.path.join(os.fspath(workdir), CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: is {workdir} a training workdir written by train.py?"
        )
    with open(path) as f:
        try:
            plain = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); delete or repair it") from None
    return from_plain(plain)


def load_plain_config(workdir: str | os.PathLike) -> dict | None:
    path = os.path.join(os.fspath(workdir), CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def get(config: Any, dotted: str, default: Any = None) -> Any:
    """`config["A"]["B"]` for `"A.B"`, or `default` when a key is missing."""
    cur = config
    for part in dotted.split("."):
        try:
            cur = cur[part]
        except (KeyError, AttributeError, TypeError):
            return default
    if isinstance(cur, ml_collections.FieldReference):
        cur = cur.get()
    return default if cur is None else cur


def one_key(entry: Any, where: str) -> tuple[str, Any]:
    """Split a `{Name: {kwargs}}` list entry, with a clear error if it is malformed."""
    plain = to_plain(entry)
    if not isinstance(plain, dict) or len(plain) != 1:
        raise ValueError(
            f"{where}: each entry must be a one-key mapping {{Name: {{...}}}}, got {plain!r}"
        )
    name, kwargs = next(iter(plain.items()))
    return name, dict(kwargs or {})


def parse_flags_with_config_errors(argv: list[str]) -> list[str]:
    """absl flags parser that turns an unknown `--config.X` override into a short clear error."""
    import sys

    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        bad = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        print(
            f"error: unknown config key in {bad} ({e}). Check the spelling against the config "
            "file; keys are case-sensitive (e.g. Global.epochs, Optimizer.lr.learning_rate).",
            file=sys.stderr,
        )
        sys.exit(2)
    except flags.Error as e:
        print(f"error: {e}\nPass --helpfull to see all flags.", file=sys.stderr)
        sys.exit(2)
