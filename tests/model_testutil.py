"""Models from Arch sections in tests: resolved as a config's Arch is, runtime options as
build_model's keyword arguments; compilations of a jitted function counted."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
from jax import monitoring

from jaxrec.config import resolve_arch
from jaxrec.models import RecModel, build_model

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def build(arch: Mapping[str, Any], **options: Any) -> RecModel:
    """`build_model(resolve_arch(arch), **options)`."""
    return build_model(resolve_arch(arch), **options)


def build_head(head: Mapping[str, Any], dtype: str = "float32") -> nn.Module:
    """The head module of an `Arch.Head` section: the `head` of a RecModel built with it (the
    backbone is never initialized or run)."""
    arch = {"name": "RecModel", "Backbone": {"name": "PPLCNetV2_base"}, "Head": dict(head)}
    return build(arch, dtype=dtype).head


@contextlib.contextmanager
def compiles_of(jitted: Callable) -> Iterator[list[str]]:
    """The programs XLA compiles for `jitted` inside the block, one entry per new input
    signature (jax.monitoring names each backend compilation `jit(<function name>)`)."""
    name = f"jit({jitted.__name__})"
    seen: list[str] = []

    def listener(event: str, _seconds: float, **kwargs: Any) -> None:
        if event == _BACKEND_COMPILE and kwargs.get("fun_name") == name:
            seen.append(name)

    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        monitoring.unregister_event_duration_listener(listener)
