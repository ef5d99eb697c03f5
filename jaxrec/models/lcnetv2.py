"""PP-LCNetV2 backbone: the ImageNet classifier form and the PP-ShiTuV2 form (ref §2.2-2.4)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.models.initializers import paddle_default_conv_init, xavier_uniform
from jaxrec.models.layers import (
    ConvBN,
    DownscaleInInferDropout,
    RepDepthwiseSeparable,
)

Dtype = Any

# Per stage: in_channels (scale 1), dw kernel, split_pw, use_rep, use_se, use_shortcut.
NET_CONFIG: tuple[tuple[int, int, bool, bool, bool, bool], ...] = (
    (64, 3, False, False, False, False),
    (128, 3, False, False, False, False),
    (256, 5, True, True, True, False),
    (512, 5, False, True, False, True),
)

# Sub-layer order of the Paddle backbone; `stop_after` names one of these.
LAYER_ORDER = ("stem", "stages", "avg_pool", "last_conv", "act", "dropout", "flatten", "fc")


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a width to a multiple of `divisor` (never below 90% of v), as PP-LCNet does."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def block_specs(
    scale: float, depths: tuple[int, ...], shitu: bool
) -> list[tuple[str, dict[str, Any]]]:
    """(name, RepDepthwiseSeparable kwargs) for every stage block, in order."""
    specs = []
    for si, (cin, k, split_pw, use_rep, use_se, use_sc) in enumerate(NET_CONFIG):
        for bi in range(depths[si]):
            stride = 2 if bi == 0 else 1
            if shitu and si == len(NET_CONFIG) - 1:
                stride = 1
            specs.append(
                (
                    f"stages_{si}_{bi}",
                    dict(
                        in_channels=make_divisible((cin if bi == 0 else cin * 2) * scale),
                        out_channels=make_divisible(cin * 2 * scale),
                        stride=stride,
                        dw_size=k,
                        split_pw=split_pw,
                        use_rep=use_rep,
                        use_se=use_se,
                        use_shortcut=use_sc,
                    ),
                )
            )
    return specs


class PPLCNetV2(nn.Module):
    """PP-LCNetV2. `shitu=True` gives PPLCNetV2_base_ShiTu's edits (ref §2.4).

    ShiTu: last stage at stride 1 (so `stages_3_0` gains the 1x1 rep branch), `last_conv` with
    bias and no ReLU after it. `stop_after` (a name in LAYER_ORDER) turns every later layer into
    identity, like Paddle's `stop_after`; "flatten" removes `fc`. The output is [N, C].
    `deploy` fuses the rep blocks; `fold_bn` (with `deploy`) also folds every BN into its conv.
    """

    # The architecture (a resolved `BackboneArch`; no defaults: they live in config/defaults.py).
    scale: float
    depths: tuple[int, ...]
    class_num: int
    dropout_prob: float
    use_last_conv: bool
    class_expand: int
    shitu: bool
    stop_after: str | None
    # Runtime form and precision (`build_model`'s keyword arguments).
    deploy: bool = False
    fold_bn: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    def _active(self, layer: str) -> bool:
        if self.stop_after is None:
            return True
        return LAYER_ORDER.index(layer) <= LAYER_ORDER.index(self.stop_after)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bkw = dict(kw, bn_axis_name=self.bn_axis_name, fold_bn=self.fold_bn)
        s = self.scale
        x = x.astype(self.dtype)
        x = ConvBN(make_divisible(32 * s), 3, 2, name="stem_0", **bkw)(x, train)
        x = RepDepthwiseSeparable(
            make_divisible(32 * s), make_divisible(64 * s), 1, dw_size=3, name="stem_1", **bkw
        )(x, train)
        for name, spec in block_specs(s, tuple(self.depths), self.shitu):
            x = RepDepthwiseSeparable(**spec, deploy=self.deploy, name=name, **bkw)(x, train)
        if not self._active("avg_pool"):
            return x
        x = jnp.mean(x, axis=(1, 2), keepdims=True)
        if self.use_last_conv:
            if self._active("last_conv"):
                cin = x.shape[-1]
                x = nn.Conv(
                    self.class_expand,
                    (1, 1),
                    padding=((0, 0), (0, 0)),
                    use_bias=self.shitu,
                    kernel_init=paddle_default_conv_init(cin, 1),
                    bias_init=nn.initializers.zeros,
                    name="last_conv",
                    **kw,
                )(x)
            if self._active("act") and not self.shitu:
                x = nn.relu(x)
            if self._active("dropout"):
                x = DownscaleInInferDropout(self.dropout_prob, name="dropout")(x, train)
        x = x.reshape((x.shape[0], -1))
        if self._active("fc"):
            x = nn.Dense(
                self.class_num,
                kernel_init=xavier_uniform,
                bias_init=nn.initializers.zeros,
                name="fc",
                **kw,
            )(x)
        return x
