"""The resolved Arch: typed, frozen, every value explicit (no defaults), the input of
`build_model`.

`jaxrec.config.resolve_arch` reads a PaddleClas `Arch` section (a config's, or the one a model
directory records) into these objects, filling what the section omits from
`config/defaults.py`; the model code never reads an Arch key. Runtime choices (compute dtype,
deploy form, BN folding, sync-BN axis) are not part of the Arch: they are keyword arguments of
`build_model`.
"""

from __future__ import annotations

import dataclasses

#: Paddle initializer names jaxrec implements (`Initializer.name`).
INITIALIZERS = ("Normal", "Constant", "XavierNormal", "XavierUniform", "KaimingNormal")
#: Head classes jaxrec implements (`HeadArch.name`).
HEADS = ("ArcMargin", "CircleMargin", "CosMargin", "FC")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Initializer:
    """A Paddle weight initializer: `name` and its arguments (mean/std: Normal; value:
    Constant; the Xavier and Kaiming ones take none and ignore them)."""

    name: str
    mean: float
    std: float
    value: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class BackboneArch:
    """PP-LCNetV2 (ref §2): width `scale`, blocks per stage `depths`, the PP-ShiTu form
    (`shitu`: stride-1 stem conv, ref §2.4) and where the backbone stops (`stop_after`, a layer
    of `lcnetv2.LAYER_ORDER`; None: the ImageNet classifier with its `fc`)."""

    scale: float
    depths: tuple[int, int, int, int]
    class_num: int
    dropout_prob: float
    use_last_conv: bool
    class_expand: int
    shitu: bool
    stop_after: str | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class NeckArch:
    """BNNeck: a BatchNorm over `num_features` features."""

    num_features: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadArch:
    """The classifier head. `margin` / `scale` / `easy_margin` are None for FC, `use_bias` is
    False for the margin heads (they have no bias)."""

    name: str  # one of HEADS
    embedding_size: int
    class_num: int
    weight_init: Initializer
    use_bias: bool
    margin: float | None
    scale: float | None
    easy_margin: bool | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Arch:
    """A recognition model: backbone, optional BNNeck, optional head, which output feeds the
    head ("neck" or "backbone") and which output PaddleClas's inference returns
    (`infer_output_key`, the feature of a converted model)."""

    backbone: BackboneArch
    neck: NeckArch | None
    head: HeadArch | None
    head_feature_from: str
    infer_output_key: str
