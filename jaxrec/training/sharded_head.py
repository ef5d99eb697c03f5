"""The class-sharded classification head: the head's class axis split over the "data" mesh.

For general_v2 the FC head holds 95% of the parameters (512 x 192,612); replicated, every device
stores it, its momentum and its gradient, and every step all-reduces that gradient. Sharded, each
device holds `[embedding, C_pad / N]` columns (weight, optimizer state and gradient) and:

1. all-gathers the global batch's features and labels (`[B, D]`, `[B]`);
2. computes the logits of its own classes (FC: `x W_d (+ b_d)` in the compute dtype; margin
   heads: the float32 cosine with the head's own `margin_logits` on the local one-hot);
3. assembles the softmax cross-entropy with collectives: `pmax` of the row maxima (no
   gradient), `psum` of the exponentials, of the target logit and (label smoothing) of the
   logit sum; padded classes (`C_pad > class_num`) are masked out.

The loss value equals the replicated head's CELoss (ref §5.2: smoothing mass also on the true
class, mean over the batch); the mean over the global batch equals the replicated step's mean
of per-device means, since every device has the same number of samples.

Gradients, with the step's `check_vma=False`: autodiff differentiates the sum over devices of
each device's objective, with all_gather transposing to psum_scatter and psum to psum. Each
device's objective is its own local terms (triplet mining etc., per device as before) plus the
global CE (equal on all devices). So replicated leaves take `pmean` (as before), head shards
take `grad / N` (`reduce_grads`). tests/test_sharded_head.py checks both against the replicated
head.

The head's placement (and the optimizer state that mirrors it) has one home: `state_shardings`.
Padded columns are zero; in checkpoints they are saved padded, and the meta records the real
class count (`jaxrec.training.checkpoint` slices them off for evaluate/export/convert).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrec.losses import CELoss
from jaxrec.models.heads import FCHead, _MarginBase
from jaxrec.parallel import AXIS
from jaxrec.treepath import path_names

PyTree = Any


def padded_classes(class_num: int, n_shards: int) -> int:
    """The smallest multiple of `n_shards` that holds `class_num` classes."""
    return int(math.ceil(class_num / n_shards) * n_shards)


@dataclasses.dataclass(frozen=True)
class HeadPlan:
    """How the head is sharded: the head module (its kind and margins), the real and padded
    class counts, the number of shards and the CE loss whose value the sharded head computes."""

    head: Any  # FCHead or a _MarginBase subclass (unbound)
    class_num: int
    padded: int
    n_shards: int
    ce: CELoss | None
    axis: str = AXIS

    @property
    def per_shard(self) -> int:
        return self.padded // self.n_shards

    @property
    def is_fc(self) -> bool:
        return isinstance(self.head, FCHead)

    def is_head_leaf(self, path: tuple[str, ...]) -> bool:
        return is_head_path(path)


def is_head_path(path: tuple[str, ...]) -> bool:
    """Whether a state leaf (by path names) is a head array with a class (last) axis: the
    params `model/head/...` and the optimizer-state leaves that mirror them."""
    for i in range(len(path) - 2):
        if path[i] == "model" and path[i + 1] == "head":
            return path[-1] in ("kernel", "bias", "weight")
    return False


def unpad_head(tree: PyTree, class_num: int) -> PyTree:
    """Head leaves (`is_head_path`) cut back to `class_num` classes on their last axis."""

    def leaf(path, x):
        return x[..., :class_num] if is_head_path(path_names(path)) else x

    return jax.tree_util.tree_map_with_path(leaf, tree)


def plan_head(
    model: Any, loss: Any, n_devices: int, enabled: bool = True
) -> tuple[HeadPlan | None, str]:
    """(plan, reason): a HeadPlan when the head can and should be sharded, else None and why.

    Sharded by default with more than one device (`Global.shard_head` turns it off). Supported:
    a RecModel head FC / ArcMargin / CosMargin / CircleMargin whose logits only CELoss reads
    (integer labels), in the loss list with any per-device losses on features.
    """
    head = getattr(model, "head", None)
    if not enabled:
        return None, "Global.shard_head is False"
    if n_devices < 2:
        return None, "one device"
    if not isinstance(head, FCHead | _MarginBase):
        return None, "the model has no FC/ArcMargin/CosMargin/CircleMargin head"
    ce = None
    for item in getattr(loss, "losses", []) if loss is not None else []:
        if isinstance(item, CELoss):
            ce = item
        elif getattr(item, "feature_from", None) == "logits":
            return None, f"{item.name} reads the logits"
    return (
        HeadPlan(
            head=head,
            class_num=int(head.class_num),
            padded=padded_classes(int(head.class_num), n_devices),
            n_shards=n_devices,
            ce=ce,
        ),
        "",
    )


def _map_head(fn: Callable[[jax.Array], Any], tree: PyTree, plan: HeadPlan, other=None):
    def leaf(path, x):
        if plan.is_head_leaf(path_names(path)):
            return fn(x)
        return x if other is None else other(x)

    return jax.tree_util.tree_map_with_path(leaf, tree)


def pad_head(tree: PyTree, plan: HeadPlan) -> PyTree:
    """Head leaves zero-padded on their class (last) axis from class_num to the padded count."""

    def pad(x):
        extra = plan.padded - x.shape[-1]
        if extra <= 0:
            return x
        widths = [(0, 0)] * (x.ndim - 1) + [(0, extra)]
        return jnp.pad(jnp.asarray(x), widths)

    return _map_head(pad, tree, plan)


def state_shardings(state: PyTree, mesh: jax.sharding.Mesh, plan: HeadPlan | None) -> PyTree:
    """The NamedSharding of every leaf of a TrainState (or its abstract twin) on `mesh`: head
    leaves split on their class axis when `plan` is given, everything else replicated. Used by
    state creation, checkpoint restore and the pod accounting script."""
    rep = NamedSharding(mesh, P())
    if plan is None:
        return jax.tree.map(lambda _: rep, state)

    def spec(x):
        nd = len(x.shape)
        return NamedSharding(mesh, P(*([None] * (nd - 1)), plan.axis))

    return _map_head(spec, state, plan, other=lambda _: rep)


def head_grads_and_norm_sq(grads: PyTree, plan: HeadPlan) -> tuple[PyTree, jax.Array]:
    """Inside the shard_map: (gradients of the mean objective, their squared global L2 norm).
    Replicated leaves are pmean-ed, head shards divided by the device count (module doc)."""
    n = plan.n_shards
    reduced = _map_head(lambda g: g / n, grads, plan, other=lambda g: jax.lax.pmean(g, plan.axis))
    sq_head = jnp.zeros((), jnp.float32)
    sq_rep = jnp.zeros((), jnp.float32)
    for path, g in jax.tree_util.tree_flatten_with_path(reduced)[0]:
        s = jnp.sum(jnp.square(g.astype(jnp.float32)))
        if plan.is_head_leaf(path_names(path)):
            sq_head = sq_head + s
        else:
            sq_rep = sq_rep + s
    return reduced, sq_rep + jax.lax.psum(sq_head, plan.axis)


def _class_ids(plan: HeadPlan) -> jax.Array:
    start = jax.lax.axis_index(plan.axis) * plan.per_shard
    return start + jnp.arange(plan.per_shard, dtype=jnp.int32)


def local_logits(
    plan: HeadPlan,
    head_params: Mapping[str, Any],
    x: jax.Array,
    labels: jax.Array,
    compute_dtype: Any = jnp.float32,
) -> jax.Array:
    """This device's training logits `[B, C_pad / N]` (float32) for the gathered features `x`
    and labels, computed like the replicated head (FC in the compute dtype, margins float32)."""
    cls = _class_ids(plan)
    if plan.is_fc:
        fc = head_params["fc"]
        z = jnp.matmul(x.astype(compute_dtype), fc["kernel"].astype(compute_dtype))
        if "bias" in fc:
            z = z + fc["bias"].astype(compute_dtype)
        return z.astype(jnp.float32)
    w = head_params["weight"].astype(jnp.float32)
    x = x.astype(jnp.float32)
    x = x / jnp.sqrt(jnp.sum(jnp.square(x), axis=1, keepdims=True))
    valid = cls < plan.class_num
    # padded columns are zero: a norm of 1 keeps them (and their gradient) finite.
    sq = jnp.where(valid, jnp.sum(jnp.square(w), axis=0), 1.0)
    cos = jnp.matmul(x, w / jnp.sqrt(sq), precision=jax.lax.Precision.HIGHEST)
    onehot = (labels.reshape(-1, 1).astype(jnp.int32) == cls[None, :]).astype(jnp.float32)
    return plan.head.margin_logits(cos, onehot)


def sharded_cross_entropy(plan: HeadPlan, z: jax.Array, labels: jax.Array) -> jax.Array:
    """The CELoss value (same on every device) of the logits split over the mesh: `z` is this
    device's `[B, C_pad / N]` slice, `labels` the global `[B]` integer labels."""
    ce = plan.ce if plan.ce is not None else CELoss(epsilon=None, reduction="mean")
    cls = _class_ids(plan)
    valid = (cls < plan.class_num)[None, :]
    zm = jnp.where(valid, z, -jnp.inf)
    m = jax.lax.stop_gradient(jax.lax.pmax(jax.lax.stop_gradient(jnp.max(zm, axis=1)), plan.axis))
    s = jax.lax.psum(jnp.sum(jnp.exp(zm - m[:, None]), axis=1), plan.axis)
    lse = m + jnp.log(s)
    labels = labels.reshape(-1).astype(jnp.int32)
    local = labels - cls[0]
    mine = (local >= 0) & (local < plan.per_shard)
    z_y = jnp.take_along_axis(z, jnp.clip(local, 0, plan.per_shard - 1)[:, None], axis=1)[:, 0]
    z_y = jax.lax.psum(jnp.where(mine, z_y, 0.0), plan.axis)
    per_example = lse - z_y
    if ce.epsilon is not None:
        z_sum = jax.lax.psum(jnp.sum(jnp.where(valid, z, 0.0), axis=1), plan.axis)
        uniform = lse - z_sum / plan.class_num
        per_example = (1.0 - ce.epsilon) * per_example + ce.epsilon * uniform
    if ce.reduction == "sum":  # the replicated step averages per-device sums
        return jnp.sum(per_example) / plan.n_shards
    return jnp.mean(per_example)


def sharded_head_loss(
    plan: HeadPlan,
    head_params: Mapping[str, Any],
    features: jax.Array,
    labels: jax.Array,
    compute_dtype: Any = jnp.float32,
) -> jax.Array:
    """Inside the shard_map: gather the batch's features and labels over the mesh, then the
    global CE of this device's classes assembled with collectives (module doc)."""
    x = jax.lax.all_gather(features, plan.axis, tiled=True)
    y = jax.lax.all_gather(labels.reshape(-1), plan.axis, tiled=True)
    z = local_logits(plan, head_params, x, y, compute_dtype)
    return sharded_cross_entropy(plan, z, y)
