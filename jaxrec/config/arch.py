"""`resolve_arch(section) -> models.Arch` and `resolve_losses(entries) -> LossSpec`s: the only
readers of the `Arch` and `Loss.Train` sections.

The resolver calls them for a config; model directories' recorded Arch sections go through
`resolve_arch` too. What a section omits comes from `defaults.py`. Errors name the key
(`ArchError` / `ConfigError`: `Arch.Head.name: ...`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jaxrec.config import defaults
from jaxrec.errors import ArchError, ConfigError
from jaxrec.losses import LOSSES, LossSpec, build_loss
from jaxrec.models.arch import (
    HEADS,
    INITIALIZERS,
    Arch,
    BackboneArch,
    HeadArch,
    Initializer,
    NeckArch,
)
from jaxrec.models.lcnetv2 import LAYER_ORDER

#: Keys PaddleClas uses only for initialization / loading; accepted here (the resolver checks
#: `pretrained` against Global.pretrained_model, `use_ssld` is inert).
_INIT_KEYS = {"pretrained", "use_ssld"}
_BACKBONE_KEYS = {
    "name",
    "class_num",
    "class_expand",
    "use_last_conv",
    "dropout_prob",
    "act",
    "scale",
    "depths",
} | _INIT_KEYS
_TOP_KEYS = {
    "name",
    "infer_output_key",
    "infer_add_softmax",
    "Backbone",
    "BackboneStopLayer",
    "Neck",
    "Head",
    "head_feature_from",
}
_OUTPUT_KEYS = ("features", "backbone", "neck", "logits")


def _check_keys(key: str, cfg: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ArchError(
            f"{key}.{unknown[0]}",
            f"unknown key(s) {unknown} in {key}; allowed keys are {sorted(allowed)}",
        )


def _arg(cfg: Mapping[str, Any], name: str, default: Any) -> Any:
    """cfg[name], or the default when absent or None."""
    value = cfg.get(name)
    return default if value is None else value


def _backbone(cfg: Any, key: str, stop_after: str | None) -> BackboneArch:
    if not isinstance(cfg, Mapping):
        raise ArchError(key, f"must be a mapping with a `name`, got {cfg!r}")
    _check_keys(key, cfg, _BACKBONE_KEYS)
    name = cfg.get("name")
    if name not in defaults.BACKBONE_VARIANTS:
        raise ArchError(
            f"{key}.name", f"{name!r} is not one of {sorted(defaults.BACKBONE_VARIANTS)}"
        )
    variant = defaults.BACKBONE_VARIANTS[name]
    scale = _arg(cfg, "scale", variant["scale"])
    depths = _arg(cfg, "depths", variant["depths"])
    if scale is None or depths is None:
        raise ArchError(key, f"backbone {name} needs `scale` and `depths`")
    depths = tuple(int(d) for d in depths)
    if len(depths) != 4 or min(depths) < 1:
        raise ArchError(f"{key}.depths", f"need 4 positive stage depths, got {depths}")
    bb = "Backbone."
    act = _arg(cfg, "act", defaults.ARCH_DEFAULTS[bb + "act"])
    if act != "relu":
        raise ArchError(f"{key}.act", f"only 'relu' is supported, got {act!r}")
    return BackboneArch(
        scale=float(scale),
        depths=depths,  # type: ignore[arg-type]
        class_num=int(_arg(cfg, "class_num", defaults.ARCH_DEFAULTS[bb + "class_num"])),
        dropout_prob=float(_arg(cfg, "dropout_prob", variant["dropout_prob"])),
        use_last_conv=bool(
            _arg(cfg, "use_last_conv", defaults.ARCH_DEFAULTS[bb + "use_last_conv"])
        ),
        class_expand=int(_arg(cfg, "class_expand", defaults.ARCH_DEFAULTS[bb + "class_expand"])),
        shitu=bool(variant["shitu"]),
        stop_after=stop_after,
    )


def _neck(cfg: Mapping[str, Any], key: str) -> NeckArch:
    name = cfg.get("name")
    if name != "BNNeck":
        raise ArchError(f"{key}.name", f"{name!r} is not supported (only 'BNNeck')")
    _check_keys(key, cfg, {"name", "num_features", "weight_attr", "bias_attr"})
    if "num_features" not in cfg:
        raise ArchError(f"{key}.num_features", "BNNeck needs `num_features`")
    return NeckArch(num_features=int(cfg["num_features"]))


def _initializer(attr: Any, default: Mapping[str, Any], key: str) -> Initializer:
    """The initializer of a Paddle ParamAttr-like dict ({"initializer": {"name": ..}}), or the
    head's default. Other ParamAttr entries are the resolver's business (it rejects them)."""
    spec = dict(default)
    if isinstance(attr, Mapping) and attr.get("initializer") is not None:
        spec = dict(attr["initializer"])
    name = spec.get("name")
    if name not in INITIALIZERS:
        raise ArchError(
            f"{key}.initializer.name",
            f"initializer {name!r} is not supported (use {', '.join(INITIALIZERS)})",
        )
    args = {k: float(_arg(spec, k, v)) for k, v in defaults.INITIALIZER_DEFAULTS.items()}
    return Initializer(name=name, **args)


def _head(cfg: Mapping[str, Any], key: str) -> HeadArch:
    name = cfg.get("name")
    if name not in HEADS:
        raise ArchError(f"{key}.name", f"{name!r} is not one of {sorted(HEADS)}")
    common = {"name", "embedding_size", "class_num", "weight_attr"}
    extra = {
        "FC": {"bias_attr", "use_bias"},
        "ArcMargin": {"margin", "scale", "easy_margin"},
        "CosMargin": {"margin", "scale"},
        "CircleMargin": {"margin", "scale"},
    }[name]
    _check_keys(key, cfg, common | extra)
    for k in ("embedding_size", "class_num"):
        if k not in cfg:
            raise ArchError(f"{key}.{k}", f"{name} needs `{k}`")
    d = defaults.HEAD_DEFAULTS[name]
    init = _initializer(cfg.get("weight_attr"), d["weight_attr"], f"{key}.weight_attr")
    margin = scale = easy = None
    use_bias = False
    if name == "FC":
        # bias_attr: a dict or True (or use_bias: True) adds a zero-initialized bias.
        bias_attr = cfg.get("bias_attr", d["bias_attr"])
        use_bias = bool(cfg.get("use_bias", bias_attr is not False and bias_attr is not None))
    else:
        for k in ("margin", "scale"):
            if cfg.get(k) is None and k not in d:
                raise ArchError(f"{key}.{k}", f"{name} needs `{k}` (it has no default)")
        margin = float(_arg(cfg, "margin", d.get("margin")))
        scale = float(_arg(cfg, "scale", d.get("scale")))
        if name == "ArcMargin":
            easy = bool(_arg(cfg, "easy_margin", d["easy_margin"]))
    return HeadArch(
        name=name,
        embedding_size=int(cfg["embedding_size"]),
        class_num=int(cfg["class_num"]),
        weight_init=init,
        use_bias=use_bias,
        margin=margin,
        scale=scale,
        easy_margin=easy,
    )


def resolve_arch(section: Mapping[str, Any], key: str = "Arch") -> Arch:
    """The typed `Arch` of a PaddleClas Arch section (`key` prefixes error messages).

    `name` is "RecModel" (with Backbone / BackboneStopLayer / Neck / Head sections), or a
    backbone name such as "PPLCNetV2_base" for a bare ImageNet classifier (its keys then sit at
    the top level, as in PaddleClas). Backbone sections also accept `scale` / `depths` /
    `dropout_prob` for reduced-size variants. Unknown keys raise `ArchError` naming the key.
    """
    if not isinstance(section, Mapping):
        raise ArchError(key, f"must be a mapping, got {type(section).__name__}")
    name = section.get("name")
    if name in defaults.BACKBONE_VARIANTS:
        return Arch(
            backbone=_backbone(section, key, None),
            neck=None,
            head=None,
            head_feature_from=defaults.ARCH_DEFAULTS["head_feature_from"],
            infer_output_key=defaults.ARCH_DEFAULTS["infer_output_key"],
        )
    if name != "RecModel":
        raise ArchError(
            f"{key}.name",
            f"{name!r} is not supported; use 'RecModel' or one of "
            f"{sorted(defaults.BACKBONE_VARIANTS)}",
        )
    _check_keys(key, section, _TOP_KEYS)
    if "Backbone" not in section:
        raise ArchError(f"{key}.Backbone", "RecModel needs a `Backbone` section")
    stop = section.get("BackboneStopLayer")
    stop_after = None
    if stop is not None:
        _check_keys(f"{key}.BackboneStopLayer", stop, {"name"})
        stop_after = stop.get("name")
        allowed = LAYER_ORDER[LAYER_ORDER.index("avg_pool") :]
        if stop_after not in allowed:
            raise ArchError(
                f"{key}.BackboneStopLayer.name",
                f"{stop_after!r} is not supported; use one of {list(allowed)}",
            )
    hff = _arg(section, "head_feature_from", defaults.ARCH_DEFAULTS["head_feature_from"])
    if hff not in ("neck", "backbone"):
        raise ArchError(f"{key}.head_feature_from", f"{hff!r} must be 'neck' or 'backbone'")
    iok = _arg(section, "infer_output_key", defaults.ARCH_DEFAULTS["infer_output_key"])
    if iok not in _OUTPUT_KEYS:
        raise ArchError(f"{key}.infer_output_key", f"{iok!r} is not an output key")
    neck, head = section.get("Neck"), section.get("Head")
    return Arch(
        backbone=_backbone(section["Backbone"], f"{key}.Backbone", stop_after),
        neck=_neck(neck, f"{key}.Neck") if neck else None,
        head=_head(head, f"{key}.Head") if head else None,
        head_feature_from=hff,
        infer_output_key=iok,
    )


def resolve_losses(entries: Any, key: str = "Loss.Train") -> tuple[LossSpec, ...]:
    """The `LossSpec`s of a PaddleClas loss list (`[{Name: {weight: w, ...}}, ...]`), every
    argument filled from `defaults.LOSS_DEFAULTS`; checked by building the loss once."""
    if isinstance(entries, Mapping) or not isinstance(entries, Sequence) or not entries:
        raise ConfigError(key, "must be a non-empty list of {Name: {weight: w, ...}} entries")
    specs = []
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        if not isinstance(entry, Mapping) or len(entry) != 1:
            raise ConfigError(
                where, f"must be a one-key mapping {{Name: {{weight: w, ...}}}}: {entry!r}"
            )
        ((name, args),) = entry.items()
        if name not in LOSSES:
            raise ConfigError(f"{where}.{name}", f"unknown loss; known: {sorted(LOSSES)}")
        args = dict(args or {})
        if "weight" not in args:
            raise ConfigError(f"{where}.{name}.weight", "is required (as in PaddleClas)")
        weight = float(args.pop("weight"))
        known = defaults.LOSS_DEFAULTS[name]
        required = {"CenterLoss": ("num_classes", "feat_dim")}.get(name, ())
        unknown = sorted(set(args) - set(known) - set(required))
        if unknown:
            raise ConfigError(
                f"{where}.{name}.{unknown[0]}",
                f"is not an argument of {name}; its arguments: {sorted({*known, *required})}",
            )
        for r in required:
            if r not in args:
                raise ConfigError(f"{where}.{name}.{r}", f"is required by {name}")
        specs.append(LossSpec(name=name, weight=weight, args={**known, **args}))
    specs = tuple(specs)
    try:
        build_loss(specs)
    except (TypeError, ValueError) as e:
        raise ConfigError(key, str(e)) from None
    return specs
