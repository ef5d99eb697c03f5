"""Optimizer and learning-rate schedule of the PP-ShiTuV2 recipe (Paddle semantics).

Momentum with coupled L2 decay: v = mu*v + (g + lambda*theta); theta -= lr*v. The decay is
added to the gradient before the momentum trace, except for the backbone's BatchNorm gamma/beta
(their L2Decay(0.0) attribute). The BNNeck bias is frozen (LR multiplier 1e-20). The LR is a
per-iteration cosine with linear warmup from 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrec.config.spec import OptimSpec
from jaxrec.treepath import path_names

PyTree = Any
Schedule = Callable[[Any], jax.Array]


def cosine_warmup_schedule(
    learning_rate: float,
    steps_per_epoch: int,
    epochs: float,
    warmup_epoch: float = 0.0,
    eta_min: float = 0.0,
    warmup_start_lr: float = 0.0,
) -> Schedule:
    """Per-iteration cosine decay with linear warmup from `warmup_start_lr`.

    W = round(warmup_epoch * S) warmup steps, then a cosine over T = (epochs - warmup_epoch) * S
    steps from `learning_rate` down to `eta_min` in closed form. lr(0) = warmup_start_lr (0).
    """
    s = int(steps_per_epoch)
    if s <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    w = int(round(warmup_epoch * s))
    t_total = (epochs - warmup_epoch) * s
    if t_total <= 0:
        raise ValueError(f"warmup_epoch ({warmup_epoch}) must be smaller than epochs ({epochs})")

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        warm = warmup_start_lr + (learning_rate - warmup_start_lr) * t / max(w, 1)
        progress = jnp.clip((t - w) / t_total, 0.0, 1.0)
        cos = eta_min + (learning_rate - eta_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(t < w, warm, cos)

    return schedule


def _bn_module_paths(batch_stats: PyTree) -> set[tuple[str, ...]]:
    """Paths of BatchNorm modules: the parents of `mean` leaves in `batch_stats`."""
    paths = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(batch_stats)[0]:
        names = path_names(path)
        if names and names[-1] == "mean":
            paths.add(names[:-1])
    return paths


def param_labels(
    params: PyTree, batch_stats: PyTree, freeze_neck_bias: bool = True, model_key: str = "model"
) -> PyTree:
    """Label every parameter leaf "decay", "no_decay" or "frozen".

    * "no_decay": BatchNorm gamma/beta inside the backbone, and the rep blocks' `dw_conv` fusion
      targets (they never get a gradient; the reference's optimizer skips them).
    * "frozen": the BNNeck bias (LR multiplier 1e-20): zero updates, kept in the tree.
    * "decay": everything else (convs, SE biases, last_conv, BNNeck gamma/beta, head, learnable
      loss parameters).

    `params` is `{"model": model_params, "loss": loss_params}`; `batch_stats` belongs to the model.
    """
    bn = _bn_module_paths(batch_stats)

    def label(path, _leaf):
        names = path_names(path)
        if names[0] != model_key:
            return "decay"
        inner = names[1:]
        parent, leaf = inner[:-1], inner[-1]
        is_bn = parent in bn and leaf in ("scale", "bias")
        if is_bn and inner[0] == "backbone":
            return "no_decay"
        if is_bn and inner[0] == "neck" and leaf == "bias" and freeze_neck_bias:
            return "frozen"
        if inner[0] == "backbone" and len(parent) >= 1 and parent[-1] == "dw_conv" and not is_bn:
            # The rep fusion target is a bare conv named dw_conv next to dw_conv_list.*;
            # non-rep blocks' dw_conv is a ConvBN whose conv lives one level deeper.
            return "no_decay"
        return "decay"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
    schedule: Schedule, labels: PyTree, momentum: float = 0.9, weight_decay: float = 1e-5
) -> optax.GradientTransformation:
    """Paddle Momentum with coupled L2 for "decay" leaves; "frozen" leaves get zero updates."""
    decay_mask = jax.tree.map(lambda lab: lab == "decay", labels)
    frozen_mask = jax.tree.map(lambda lab: lab == "frozen", labels)
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
    parts += [
        optax.trace(decay=momentum, nesterov=False),
        optax.scale_by_learning_rate(schedule),
        optax.masked(optax.set_to_zero(), frozen_mask),
    ]
    return optax.chain(*parts)


def build_optimizer(
    spec: OptimSpec, steps_per_epoch: int, epochs: int, params: PyTree, batch_stats: PyTree
) -> tuple[optax.GradientTransformation, Schedule]:
    """(optimizer, schedule) of a resolved OptimSpec for the given parameter tree."""
    lr = spec.lr
    schedule = cosine_warmup_schedule(
        lr.learning_rate,
        steps_per_epoch,
        float(epochs),
        lr.warmup_epoch,
        eta_min=lr.eta_min,
        warmup_start_lr=lr.warmup_start_lr,
    )
    labels = param_labels(params, batch_stats, freeze_neck_bias=spec.freeze_neck_bias)
    tx = make_optimizer(schedule, labels, momentum=spec.momentum, weight_decay=spec.weight_decay)
    return tx, schedule
