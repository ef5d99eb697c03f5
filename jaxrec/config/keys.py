"""Key accounting for the resolver: every config leaf is read, listed as inert, or rejected.

`Reader` wraps the plain config and records each key the resolver reads. After resolving, any
leaf that was neither read nor matched by `INERT` is an error naming the key, so a key that
mirrors the PaddleClas YAML can never be silently ignored. `INERT` is the one table of keys
that are accepted but change nothing in jaxrec, with the reason; docs/CONFIG.md quotes it.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterator
from typing import Any

from jaxrec.config import defaults
from jaxrec.errors import ConfigError

#: Keys accepted with any value that have no effect in jaxrec, and why. `*` matches one key or
#: list position (e.g. `DataLoader.Eval.*.loader.use_shared_memory`).
INERT: dict[str, str] = {
    "Global.output_dir": "jaxrec writes checkpoints, logs and config.json into --workdir",
    "Global.device": "jaxrec runs on every device JAX finds (choose with JAX_PLATFORMS)",
    "Global.save_interval": "jaxrec checkpoints at every epoch end and every "
    "Global.checkpoint_every_steps, keeping Global.keep_checkpoints plus the best",
    "Global.use_visualdl": "TensorBoard event files are always written to WORKDIR/tensorboard",
    "Global.save_inference_dir": "`python -m jaxrec.export --out` chooses the export folder",
    "Global.to_static": "jaxrec always compiles the step with XLA",
    "AMP.scale_loss": "fp16 loss scaling: jaxrec's mixed precision is bfloat16 and needs none",
    "AMP.use_dynamic_loss_scaling": "fp16 loss scaling, as AMP.scale_loss",
    "AMP.use_promote": "fp16 operator promotion; bfloat16 compute keeps float32 parameters",
    "Arch.Backbone.use_ssld": "which ImageNet weights PaddleClas would download for "
    "Arch.Backbone.pretrained; jaxrec loads Global.pretrained_model instead",
    "Loss.Eval": "PaddleClas needs it present to compute retrieval metrics; jaxrec computes no "
    "evaluation loss",
    "DataLoader.*.loader.use_shared_memory": "jaxrec's loader threads share memory anyway",
    "DataLoader.Eval.*.loader.use_shared_memory": "as above",
    "DataLoader.Eval.*.sampler.shuffle": "the evaluation order does not change the metrics",
    "DataLoader.Train.sampler.drop_last": "PK batches are always full",
    "DataLoader.*.dataset.transform_ops[*].ResizeImage.return_numpy": "images are numpy "
    "arrays throughout",
    "DataLoader.Eval.*.dataset.transform_ops[*].ResizeImage.return_numpy": "as above",
}


def _match(key: str, pattern: str) -> bool:
    # fnmatch treats [..] as a character class; escape list indices first.
    pat = pattern.replace("[*]", "\x00").replace("[", "[[]").replace("\x00", "[[]*]")
    return fnmatch.fnmatchcase(key, pat) and key.count(".") == pattern.count(".")


def inert_reason(key: str) -> str | None:
    """Why `key` is inert, or None when it is not an inert key."""
    for pattern, why in INERT.items():
        if _match(key, pattern) or key.startswith((pattern + ".", pattern + "[")):
            return why
    return None


def leaves(tree: Any, prefix: str = "") -> Iterator[str]:
    """Dotted paths of every leaf; lists of one-key dicts give `a.b[i].Name.key` paths."""
    if isinstance(tree, dict):
        if not tree and prefix:
            yield prefix
        for k, v in tree.items():
            yield from leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, list) and any(isinstance(v, dict) for v in tree):
        for i, v in enumerate(tree):
            yield from leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix


_MISSING = object()


class Reader:
    """Reads a plain config by dotted key (`A.B[2].C`) and remembers what was read."""

    def __init__(self, plain: dict[str, Any]) -> None:
        self.plain = plain
        self.used: set[str] = set()

    def _lookup(self, key: str) -> Any:
        cur: Any = self.plain
        for part in key.replace("[", ".[").split("."):
            if part.startswith("["):
                idx = int(part[1:-1])
                if not isinstance(cur, list) or idx >= len(cur):
                    return _MISSING
                cur = cur[idx]
            else:
                if not isinstance(cur, dict) or part not in cur:
                    return _MISSING
                cur = cur[part]
        return cur

    def has(self, key: str) -> bool:
        return self._lookup(key) is not _MISSING

    def peek(self, key: str, default: Any = None) -> Any:
        """The value at `key` without recording it as read (for sections whose keys are then
        read one by one)."""
        value = self._lookup(key)
        return default if value is _MISSING or value is None else value

    def get(self, key: str) -> Any:
        """The value at `key`, or its default from `defaults.py` when the key is absent or null
        (`defaults.key_default`); a key without a default is required."""
        value = self._lookup(key)
        self.mark(key)
        try:
            default = defaults.key_default(key)
        except KeyError:
            default = _MISSING
        if value is _MISSING or (value is None and default is not _MISSING):
            if default is _MISSING:
                raise ConfigError(key, "is required")
            return copy.deepcopy(default)
        return value

    def mark(self, key: str) -> None:
        """Record `key` (and everything below it) as honoured."""
        self.used.add(key)

    def is_used(self, leaf: str) -> bool:
        return any(leaf == k or leaf.startswith((k + ".", k + "[")) for k in self.used)

    def check_all_used(self) -> None:
        """Raise ConfigError for the first leaf that is neither read nor inert."""
        for leaf in leaves(self.plain):
            if self.is_used(leaf) or inert_reason(leaf) is not None:
                continue
            section = leaf.rsplit(".", 1)[0] if "." in leaf else ""
            known = sorted(
                k.rsplit(".", 1)[-1]
                for k in self.used
                if section and k.rsplit(".", 1)[0] == section
            )
            hint = f" Keys jaxrec reads in {section}: {known}." if known else ""
            raise ConfigError(
                leaf,
                "is not a key jaxrec supports, so it would be ignored; remove it (inert keys are "
                f"listed in docs/CONFIG.md).{hint}",
            )
