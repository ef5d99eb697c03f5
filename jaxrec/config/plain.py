"""Plain-tree view of configs: ConfigDict <-> JSON-able dicts and lists, and their differences.

Configs are `ml_collections.ConfigDict`s whose sections and keys mirror the PaddleClas YAML
(`Global`, `AMP`, `Arch`, `Loss`, `Optimizer`, `DataLoader`, `Metric`). Lists of one-key dicts
(`Loss.Train`, `Metric.Eval`, transform ops) hold `ConfigDict`s, so single entries can be
overridden on the command line by index, e.g.
`--config.Loss.Train[1].TripletAngularMarginLoss.margin=0.3`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections


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
