"""Stand-in tiny model and loss for the train-step tests (the real ones are tested elsewhere)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class TinyRec(nn.Module):
    """backbone (conv+BN+dropout) -> neck BN -> head, with the RecModel output dict."""

    classes: int = 5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, labels=None, train=False):
        bb = _TinyBackbone(dtype=self.dtype, name="backbone")(x, train)
        feats = _TinyNeck(name="neck")(bb, train)
        logits = nn.Dense(self.classes, use_bias=False, name="head")(feats)
        return {"backbone": bb, "features": feats, "logits": logits}


class _TinyBackbone(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(
            4,
            (3, 3),
            strides=2,
            padding=((1, 1), (1, 1)),
            use_bias=False,
            dtype=self.dtype,
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="bn"
        )(x)
        x = nn.relu(x).mean(axis=(1, 2))
        x = nn.Dense(6, dtype=self.dtype, name="last_conv")(x)
        x = nn.Dropout(0.2, deterministic=not train)(x)
        return x


class _TinyNeck(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        return nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, name="feat_bn"
        )(x)


def tiny_loss(params, outputs, labels):
    """CE on logits + a batch-dependent term (max similarity), like the real per-device mining."""
    del params
    logp = jax.nn.log_softmax(outputs["logits"])
    ce = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
    f = outputs["features"]
    f = f / jnp.linalg.norm(f, axis=1, keepdims=True)
    sim = f @ f.T
    hard = jnp.mean(jnp.max(sim - 2.0 * jnp.eye(f.shape[0]), axis=1))
    total = ce + 0.1 * hard
    return total, {"CELoss": ce, "Hard": hard, "loss": total}


class TinyLoss:
    def init(self, rng):
        return {}

    def __call__(self, params, outputs, labels):
        return tiny_loss(params, outputs, labels)
