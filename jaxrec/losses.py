"""Training losses with PaddleClas semantics (ref §5), as pure JAX functions.

Every loss is a small object with a ``name`` (the PaddleClas class name, which is also the logged
key), ``init(rng) -> params`` (learnable state; empty for all but CenterLoss) and
``__call__(params, outputs, labels) -> scalar``. ``build_loss`` combines a config list of
``{Name: {weight: w, **kwargs}}`` entries into a :class:`CombinedLoss`.

All maths runs in float32, whatever the input dtype (bf16 logits/features are upcast first).

Data parallelism: every loss reduces over the batch it is given. Inside ``jax.shard_map`` each
device therefore computes the mean over its own per-device batch, which is exactly what PaddleClas
does per GPU (per-GPU triplet mining, ref §13.26). The caller averages the per-device values
(``jax.lax.pmean`` inside the differentiated function).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Outputs = Mapping[str, Array] | Array


def _flat_labels(labels: Array) -> Array:
    """Integer labels of shape [N] from [N] or [N, 1]."""
    labels = jnp.asarray(labels)
    if labels.ndim == 2 and labels.shape[-1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape [N] or [N, 1], got {labels.shape}")
    return labels


def _feature(outputs: Outputs, key: str, loss_name: str) -> Array:
    if not isinstance(outputs, Mapping):
        return jnp.asarray(outputs, jnp.float32)
    if key not in outputs:
        raise KeyError(
            f"{loss_name} reads outputs[{key!r}], but the model outputs only have "
            f"{sorted(outputs)}; set feature_from to one of them in the Loss config"
        )
    return jnp.asarray(outputs[key], jnp.float32)


def _reduce(values: Array, reduction: str) -> Array:
    if reduction == "mean":
        return jnp.mean(values)
    if reduction == "sum":
        return jnp.sum(values)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _hinge(x: Array) -> Array:
    """max(x, 0) with zero gradient at x == 0, like Paddle's relu/where (jnp.maximum gives 0.5)."""
    return jnp.where(x > 0, x, 0.0)


def _same_label_masks(labels: Array) -> tuple[Array, Array]:
    same = labels[:, None] == labels[None, :]
    return same, jnp.logical_not(same)


class CELoss:
    """Softmax cross-entropy with optional label smoothing (ref §5.2).

    With ``epsilon`` in (0, 1) the target is ``q = (1 - eps) * onehot + eps / C``: the uniform mass
    also goes to the true class. Any other epsilon (None, 0, >= 1) disables smoothing. The loss is
    reduced over the batch (mean by default).

    Labels are integers of shape [N] or [N, 1]. A float label array of shape [N, C] (C > 1) is a
    soft target: used as the one-hot before smoothing, or soft-maxed first without smoothing, as
    in the reference.
    """

    name = "CELoss"

    def __init__(self, epsilon: float | None = None, reduction: str = "mean") -> None:
        if epsilon is not None and not 0.0 < float(epsilon) < 1.0:
            epsilon = None
        self.epsilon = None if epsilon is None else float(epsilon)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"CELoss reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def init(self, rng: Array) -> dict:
        del rng
        return {}

    def __call__(self, params: Mapping, outputs: Outputs, labels: Array) -> Array:
        del params
        logits = _feature(outputs, "logits", self.name)
        num_classes = logits.shape[-1]
        log_p = jax.nn.log_softmax(logits, axis=-1)
        labels = jnp.asarray(labels)
        soft = labels.ndim == 2 and labels.shape[-1] == num_classes and num_classes > 1
        if soft:
            target = labels.astype(jnp.float32)
            if self.epsilon is None:
                target = jax.nn.softmax(target, axis=-1)
            else:
                target = (1.0 - self.epsilon) * target + self.epsilon / num_classes
            per_example = -jnp.sum(target * log_p, axis=-1)
        else:
            labels = _flat_labels(labels)
            nll = -jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
            if self.epsilon is None:
                per_example = nll
            else:
                # -sum_c q_c log p_c without building the [N, C] one-hot (C is 192612 here).
                uniform = -jnp.sum(log_p, axis=-1) / num_classes
                per_example = (1.0 - self.epsilon) * nll + self.epsilon * uniform
        return _reduce(per_example, self.reduction)


class TripletAngularMarginLoss:
    """Batch-hard triplet loss on cosine similarity (ref §5.3, PP-ShiTuV2's metric loss).

    1. Rows are L2-normalized when ``normalize_feature`` (no epsilon, as the reference).
    2. ``S = f f^T`` (cosine similarity, larger = closer).
    3. Hardest positive ``s_ap = min S`` over same-label items, the diagonal included; hardest
       negative ``s_an = max S`` over different-label items.
    4. ``L_rank = mean(max(0, s_an - s_ap + margin))``.
    5. With ``add_absolute``: ``L_ap = mean(max(0, ap_value - s_ap))`` and
       ``L_an = mean(s_an - an_value if s_an > an_value else 1.0)``. The constant **1.0** for a
       satisfied negative is the reference's behaviour (not 0): it adds to the value and carries
       no gradient. ``loss = absolute_loss_weight * (L_an + L_ap) + L_rank``.

    The reference gathers the masked entries and reshapes them to [N, -1], which only works when
    every row has the same number of positives (PK batches). Masks are applied here with
    ``jnp.where`` instead, which is jit-safe, gives the same numbers on PK batches and the
    per-row answer otherwise. A row without negatives gets ``s_an = -inf``: ranking term 0 and
    absolute-negative term 1.0 (like a satisfied negative), with zero gradient.
    """

    name = "TripletAngularMarginLoss"

    def __init__(
        self,
        margin: float = 0.5,
        normalize_feature: bool = True,
        reduction: str = "mean",
        add_absolute: bool = False,
        absolute_loss_weight: float = 1.0,
        ap_value: float = 0.9,
        an_value: float = 0.5,
        feature_from: str = "features",
    ) -> None:
        self.margin = float(margin)
        self.normalize_feature = bool(normalize_feature)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"{self.name} reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self.add_absolute = bool(add_absolute)
        self.absolute_loss_weight = float(absolute_loss_weight)
        self.ap_value = float(ap_value)
        self.an_value = float(an_value)
        self.feature_from = feature_from

    def init(self, rng: Array) -> dict:
        del rng
        return {}

    def hard_pairs(self, feats: Array, labels: Array) -> tuple[Array, Array]:
        """Return (s_ap, s_an), the hardest positive and negative similarity per row."""
        f = jnp.asarray(feats, jnp.float32)
        if self.normalize_feature:
            f = f / jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True))
        sim = f @ f.T
        pos, neg = _same_label_masks(_flat_labels(labels))
        s_ap = jnp.min(jnp.where(pos, sim, jnp.inf), axis=1)
        s_an = jnp.max(jnp.where(neg, sim, -jnp.inf), axis=1)
        return s_ap, s_an

    def __call__(self, params: Mapping, outputs: Outputs, labels: Array) -> Array:
        del params
        s_ap, s_an = self.hard_pairs(_feature(outputs, self.feature_from, self.name), labels)
        loss = _reduce(_hinge(s_an - s_ap + self.margin), self.reduction)
        if self.add_absolute:
            l_ap = _hinge(self.ap_value - s_ap)
            excess = s_an - self.an_value
            l_an = jnp.where(excess > 0, excess, 1.0)
            loss = (jnp.mean(l_an) + jnp.mean(l_ap)) * self.absolute_loss_weight + loss
        return loss


def _euclidean(f: Array) -> Array:
    sq = jnp.sum(f * f, axis=1, keepdims=True)
    d2 = sq + sq.T - 2.0 * (f @ f.T)
    return jnp.sqrt(jnp.clip(d2, 1e-12, None))


class TripletLossV2:
    """Batch-hard triplet loss on Euclidean distance (PaddleClas ``TripletLossV2``, ref §5.4).

    Features are divided by ``norm + 1e-12`` when ``normalize_feature``; distances are
    ``sqrt(clip(|a|^2 + |b|^2 - 2 a.b, 1e-12))``; hardest positive = max distance (diagonal
    included), hardest negative = min distance; loss = ``mean(max(0, d_ap - d_an + margin))``.
    """

    name = "TripletLossV2"

    def __init__(
        self, margin: float = 0.5, normalize_feature: bool = True, feature_from: str = "features"
    ) -> None:
        self.margin = float(margin)
        self.normalize_feature = bool(normalize_feature)
        self.feature_from = feature_from

    def init(self, rng: Array) -> dict:
        del rng
        return {}

    def __call__(self, params: Mapping, outputs: Outputs, labels: Array) -> Array:
        del params
        f = _feature(outputs, self.feature_from, self.name)
        if self.normalize_feature:
            f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-12)
        dist = _euclidean(f)
        pos, neg = _same_label_masks(_flat_labels(labels))
        d_ap = jnp.max(jnp.where(pos, dist, -jnp.inf), axis=1)
        d_an = jnp.min(jnp.where(neg, dist, jnp.inf), axis=1)
        return jnp.mean(_hinge(d_ap - d_an + self.margin))


class TripletLoss(TripletLossV2):
    """PaddleClas ``TripletLoss(margin=1.0)``: TripletLossV2 on raw (unnormalized) features."""

    name = "TripletLoss"

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__(margin=margin, normalize_feature=False, feature_from="features")


class CenterLoss:
    """Center loss ``(1/N) sum_i |f_i - c_{y_i}|^2`` with learnable centers (ref §5.4).

    As in the reference, every entry of the masked [N, num_classes] distance matrix (zeros
    included) is clipped to [1e-12, 1e12] before the sum, so each row adds (C-1)*1e-12.
    Centers start as standard-normal samples; they live in ``params["centers"]`` and must be
    trained with the model (the train step differentiates ``loss_params`` too).
    """

    name = "CenterLoss"

    def __init__(self, num_classes: int, feat_dim: int, feature_from: str = "features") -> None:
        self.num_classes = int(num_classes)
        self.feat_dim = int(feat_dim)
        self.feature_from = feature_from

    def init(self, rng: Array) -> dict:
        centers = jax.random.normal(rng, (self.num_classes, self.feat_dim), jnp.float32)
        return {"centers": centers}

    def __call__(self, params: Mapping, outputs: Outputs, labels: Array) -> Array:
        f = _feature(outputs, self.feature_from, self.name)
        centers = jnp.asarray(params["centers"], jnp.float32)
        distmat = (
            jnp.sum(f * f, axis=1, keepdims=True)
            + jnp.sum(centers * centers, axis=1)[None, :]
            - 2.0 * (f @ centers.T)
        )
        labels = _flat_labels(labels)
        mask = labels[:, None] == jnp.arange(self.num_classes, dtype=labels.dtype)[None, :]
        dist = distmat * mask.astype(jnp.float32)
        return jnp.sum(jnp.clip(dist, 1e-12, 1e12)) / f.shape[0]


LOSSES: dict[str, type] = {
    cls.name: cls
    for cls in (CELoss, TripletAngularMarginLoss, TripletLossV2, TripletLoss, CenterLoss)
}


class CombinedLoss:
    """Weighted sum of losses with the reference rule (ref §5.1).

    With several losses each value is multiplied by its weight (the weighted value is also what
    ``terms`` reports) and ``loss`` is their sum. With exactly one loss its weight is ignored.
    ``loss_params`` maps loss name -> that loss's params, for losses that have any.
    """

    def __init__(self, losses: Sequence[Any], weights: Sequence[float]) -> None:
        if not losses:
            raise ValueError("the Loss config list is empty; give at least one loss")
        names = [loss.name for loss in losses]
        if len(set(names)) != len(names):
            raise ValueError(f"each loss may appear once in the Loss list, got {names}")
        self.losses = list(losses)
        self.weights = [float(w) for w in weights]

    @property
    def names(self) -> list[str]:
        return [loss.name for loss in self.losses]

    def init(self, rng: Array) -> dict:
        params = {}
        for loss, key in zip(self.losses, jax.random.split(rng, len(self.losses)), strict=True):
            p = loss.init(key)
            if p:
                params[loss.name] = p
        return params

    def __call__(
        self, loss_params: Mapping, outputs: Outputs, labels: Array
    ) -> tuple[Array, dict[str, Array]]:
        terms: dict[str, Array] = {}
        if len(self.losses) == 1:
            loss = self.losses[0]
            value = loss(loss_params.get(loss.name, {}), outputs, labels)
            terms[loss.name] = value
            terms["loss"] = value
            return value, terms
        for loss, weight in zip(self.losses, self.weights, strict=True):
            terms[loss.name] = loss(loss_params.get(loss.name, {}), outputs, labels) * weight
        total = sum(terms.values())
        terms["loss"] = total
        return total, terms


def build_loss(cfg_list: Sequence[Mapping[str, Mapping[str, Any]]] | None) -> CombinedLoss | None:
    """Build a :class:`CombinedLoss` from the YAML-style ``Loss.Train`` list.

    Each entry is a one-key mapping ``{Name: {weight: w, ...kwargs}}`` (a dict or an
    ``ml_collections.ConfigDict``); ``weight`` is required as in PaddleClas. ``None`` gives
    ``None`` (no loss configured).
    """
    if cfg_list is None:
        return None
    if isinstance(cfg_list, Mapping) or not isinstance(cfg_list, Sequence):
        raise TypeError(
            "the Loss config must be a list of {Name: {weight: w, ...}} entries, "
            f"got {type(cfg_list).__name__}"
        )
    losses, weights = [], []
    for i, entry in enumerate(cfg_list):
        if hasattr(entry, "to_dict"):  # ml_collections.ConfigDict entries
            entry = entry.to_dict()
        if not isinstance(entry, Mapping) or len(entry) != 1:
            raise ValueError(
                f"Loss entry {i} must be a one-key mapping {{Name: {{weight: w, ...}}}}, "
                f"got {entry!r}"
            )
        ((name, kwargs),) = entry.items()
        kwargs = dict(kwargs or {})
        if name not in LOSSES:
            raise ValueError(f"Loss entry {i}: unknown loss {name!r}; known: {sorted(LOSSES)}")
        if "weight" not in kwargs:
            raise ValueError(f"Loss entry {i} ({name}) needs a 'weight', got keys {sorted(kwargs)}")
        weights.append(kwargs.pop("weight"))
        try:
            losses.append(LOSSES[name](**kwargs))
        except TypeError as err:
            raise ValueError(
                f"Loss entry {i} ({name}): bad arguments {sorted(kwargs)}: {err}"
            ) from err
    return CombinedLoss(losses, weights)
