"""Names of pytree paths: one spelling of a parameter's path for labels, checkpoints and
pretrained merging."""

from __future__ import annotations

from typing import Any


def path_names(path: Any) -> tuple[str, ...]:
    """Key names of a pytree path (dict keys, attribute names, sequence indices)."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)
