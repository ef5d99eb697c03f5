"""Models from Arch sections in tests: resolved as a config's Arch is, runtime options as
build_model's keyword arguments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxrec.config import resolve_arch
from jaxrec.config.arch import _head as _resolve_head
from jaxrec.models import RecModel, build_model
from jaxrec.models.recmodel import _build_head


def build(arch: Mapping[str, Any], **options: Any) -> RecModel:
    """`build_model(resolve_arch(arch), **options)`."""
    return build_model(resolve_arch(arch), **options)


def build_head(head: Mapping[str, Any], dtype: Any = jnp.float32) -> nn.Module:
    """The head module of an `Arch.Head` section."""
    return _build_head(_resolve_head(head, "Arch.Head"), dtype)
