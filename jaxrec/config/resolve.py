"""`resolve(config) -> Run`: the only place where config keys are read and checked.

Each key is honoured (read into the `Run`), listed as inert (`keys.INERT`), or an error naming
it. Defaults come from `defaults.py`. Errors are `ConfigError`s: `<key>: <what is wrong and what
is supported>`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

from jaxrec.config import defaults
from jaxrec.config.chains import eval_chain, train_chain
from jaxrec.config.keys import Reader
from jaxrec.config.plain import to_plain
from jaxrec.config.spec import (
    DatasetSpec,
    EvalDataSpec,
    EvalSpec,
    LoopSpec,
    LRSpec,
    OptimSpec,
    Run,
    SamplerSpec,
    TFDSSpec,
    TrainDataSpec,
)
from jaxrec.data.preprocess import FeatureSpec
from jaxrec.errors import ConfigError

_AMP_DTYPES = ("bfloat16", "float32")
# PaddleClas's Metric.Eval names, plus jaxrec's MAP@R (the metric-learning benchmarks' metric).
_METRICS = {
    "Recallk": "recall",
    "mAP": "mAP",
    "mINP": "mINP",
    "Precisionk": "precision",
    "MAP@R": "MAP@R",
}


def resolve(config: Any) -> Run:
    """Check a config (ConfigDict or plain dict) and return the resolved `Run`."""
    plain = to_plain(config)
    if not isinstance(plain, dict):
        raise ConfigError("", f"a config must be a mapping of sections, got {type(plain).__name__}")
    r = Reader(defaults.fill(copy.deepcopy(plain)))
    for section in ("Global", "Arch", "Loss", "Optimizer", "DataLoader"):
        if not isinstance(r.plain.get(section), dict):
            raise ConfigError(section, "section is required")
    _global_checks(r)
    compute_dtype = _amp(r)
    arch = _arch(r)
    loss = _loss(r)
    optim = _optimizer(r)
    train = _train_data(r) if r.has("DataLoader.Train") else None
    eval_spec = _eval(r, compute_dtype)
    image_size = _image_size(r, train, eval_spec)
    loop = LoopSpec(
        epochs=_pos_int(r, "Global.epochs"),
        print_every=max(1, int(r.get("Global.print_batch_step", 10))),
        checkpoint_every_steps=int(r.get("Global.checkpoint_every_steps")),
        keep_checkpoints=_pos_int(r, "Global.keep_checkpoints"),
        pretrained_model=r.get("Global.pretrained_model", None) or None,
        allow_config_change=bool(r.get("Global.allow_config_change")),
    )
    _pretrained_backbone(r, loop)
    run = Run(
        config=plain,
        arch=arch,
        loss=loss,
        optim=optim,
        train=train,
        eval=eval_spec,
        loop=loop,
        seed=int(r.get("Global.seed")),
        compute_dtype=compute_dtype,
        # PaddleClas's own switch is Arch.use_sync_bn; either turns synchronized BN on.
        sync_bn=bool(r.get("Global.sync_bn")) or bool(r.get("Arch.use_sync_bn", False)),
        image_size=image_size,
    )
    r.check_all_used()
    return run


def _pos_int(r: Reader, key: str) -> int:
    v = r.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or int(v) != v or v < 1:
        raise ConfigError(key, f"must be a positive integer, got {v!r}")
    return int(v)


def _global_checks(r: Reader) -> None:
    if r.get("Global.checkpoints", None):
        raise ConfigError(
            "Global.checkpoints",
            "is not used by jaxrec: training resumes automatically from --workdir; point "
            "--workdir at the run to resume and leave Global.checkpoints null",
        )
    mode = r.get("Global.eval_mode")
    if mode != "retrieval":
        raise ConfigError("Global.eval_mode", f"{mode!r}: jaxrec evaluates retrieval only")
    if r.get("Global.use_dali", False):
        raise ConfigError("Global.use_dali", "DALI is not used by jaxrec; set it to False")
    if r.get("Global.feature_binarize", None):
        raise ConfigError("Global.feature_binarize", "binary features are not supported")
    if int(r.get("Global.update_freq", 1)) != 1:
        raise ConfigError("Global.update_freq", "gradient accumulation is not supported; use 1")
    if int(r.get("Global.checkpoint_every_steps")) < 0:
        raise ConfigError("Global.checkpoint_every_steps", "must be >= 0 (0: epoch ends only)")


def _amp(r: Reader) -> str:
    if not r.has("AMP"):
        return "float32"
    use = bool(r.get("AMP.use_amp", False))
    dtype = r.get("AMP.dtype", "bfloat16")
    if dtype not in _AMP_DTYPES:
        raise ConfigError(
            "AMP.dtype",
            f"{dtype!r}: use bfloat16 (float16 would need loss scaling, which jaxrec does not do)",
        )
    level = r.get("AMP.level", "O1")
    if level != "O1":
        raise ConfigError("AMP.level", f"{level!r}: jaxrec keeps float32 parameters (O1) only")
    r.get("AMP.use_fp16_test", False)
    return dtype if use else "float32"


def _arch(r: Reader) -> dict[str, Any]:
    from jaxrec.models import build_model

    arch = {k: v for k, v in r.get("Arch").items() if k != "use_sync_bn"}
    for key in ("dtype", "deploy", "bn_axis_name", "fold_bn"):
        if key in arch:
            raise ConfigError(f"Arch.{key}", "is set by jaxrec itself; remove it from the config")
    neck = arch.get("Neck") or {}
    for attr, value in (("weight_attr", 1.0), ("bias_attr", 0.0)):
        init = ((neck.get(attr) or {}).get("initializer")) or {}
        if init and (init.get("name") != "Constant" or float(init.get("value", value)) != value):
            raise ConfigError(
                f"Arch.Neck.{attr}.initializer",
                f"BNNeck {attr[:-5]} must start at Constant {value} (BatchNorm's own init)",
            )
        extra = set(neck.get(attr) or {}) - {"initializer", "learning_rate"}
        if extra:
            raise ConfigError(f"Arch.Neck.{attr}.{sorted(extra)[0]}", "is not supported")
    if (neck.get("weight_attr") or {}).get("learning_rate", 1.0) != 1.0:
        raise ConfigError("Arch.Neck.weight_attr.learning_rate", "only 1.0 is supported")
    head = arch.get("Head") or {}
    for attr in ("weight_attr", "bias_attr"):
        extra = set(head.get(attr) or {}) if isinstance(head.get(attr), dict) else set()
        extra -= {"initializer"}
        if extra:
            raise ConfigError(
                f"Arch.Head.{attr}.{sorted(extra)[0]}",
                "is not supported (per-parameter learning rates and regularizers apply only to "
                "the BNNeck bias)",
            )
    try:
        build_model(arch)
    except ValueError as e:
        key, _, msg = str(e).partition(": ")
        if key.startswith("Arch") and msg:
            raise ConfigError(key, msg) from None
        raise ConfigError("Arch", str(e)) from None
    r.mark("Arch")  # validated whole by build_model above
    return arch


def _pretrained_backbone(r: Reader, loop: LoopSpec) -> None:
    if r.get("Arch.Backbone.pretrained", False) and not loop.pretrained_model:
        raise ConfigError(
            "Arch.Backbone.pretrained",
            "asks for ImageNet initialization, which jaxrec does not download: convert "
            "PPLCNetV2_base_ssld_pretrained.pdparams with `python -m jaxrec.convert` and pass it "
            "as Global.pretrained_model, or set Arch.Backbone.pretrained=False to train from "
            "scratch",
        )


def _loss(r: Reader) -> tuple[dict[str, Any], ...]:
    from jaxrec.losses import build_loss

    entries = r.get("Loss.Train")
    try:
        build_loss(entries)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError("Loss.Train", str(e)) from None
    r.mark("Loss.Train")
    return tuple(entries)


def _optimizer(r: Reader) -> OptimSpec:
    name = r.get("Optimizer.name")
    if name != "Momentum":
        raise ConfigError("Optimizer.name", f"{name!r}: only Momentum is implemented")
    lr_name = r.get("Optimizer.lr.name")
    if lr_name != "Cosine":
        raise ConfigError("Optimizer.lr.name", f"{lr_name!r}: only Cosine is implemented")
    if r.get("Optimizer.lr.by_epoch", False):
        raise ConfigError("Optimizer.lr.by_epoch", "only per-iteration schedules are implemented")
    if int(r.get("Optimizer.lr.last_epoch", -1)) != -1:
        raise ConfigError("Optimizer.lr.last_epoch", "resume from --workdir instead")
    lr = LRSpec(
        learning_rate=float(r.get("Optimizer.lr.learning_rate")),
        warmup_epoch=float(r.get("Optimizer.lr.warmup_epoch", 0.0)),
        eta_min=float(r.get("Optimizer.lr.eta_min", 0.0)),
        warmup_start_lr=float(r.get("Optimizer.lr.warmup_start_lr", 0.0)),
    )
    epochs = float(r.get("Global.epochs"))
    if lr.warmup_epoch >= epochs:
        raise ConfigError(
            "Optimizer.lr.warmup_epoch",
            f"{lr.warmup_epoch} must be smaller than Global.epochs ({epochs:g})",
        )
    wd = 0.0
    if r.peek("Optimizer.regularizer") is not None:
        reg = r.get("Optimizer.regularizer.name")
        if reg != "L2":
            raise ConfigError("Optimizer.regularizer.name", f"{reg!r}: only L2 is implemented")
        wd = float(r.get("Optimizer.regularizer.coeff"))
    lr_mult = float(r.get("Arch.Neck.bias_attr.learning_rate", 1.0))
    if not (lr_mult == 1.0 or lr_mult < 1e-8):
        raise ConfigError(
            "Arch.Neck.bias_attr.learning_rate",
            f"{lr_mult}: jaxrec supports 1.0 or a freezing multiplier below 1e-8 (1e-20)",
        )
    return OptimSpec(
        lr=lr,
        momentum=float(r.get("Optimizer.momentum")),
        weight_decay=wd,
        freeze_neck_bias=lr_mult < 1e-8,
    )


def _dataset(r: Reader, key: str, allowed: tuple[str, ...]) -> DatasetSpec:
    kind = r.get(f"{key}.name")
    if kind not in allowed:
        raise ConfigError(f"{key}.name", f"{kind!r}: use {' or '.join(allowed)}")
    classes = _classes(r, f"{key}.classes")
    if kind == "TFDSDataset":
        return _tfds_dataset(r, key, classes)
    stray = [k for k in defaults.TFDS_KEYS if r.peek(f"{key}.{k}") is not None]
    if stray:
        raise ConfigError(f"{key}.{stray[0]}", f"is only read with name TFDSDataset, not {kind}")
    prepared = r.get(f"{key}.prepared_dir", None)
    if kind == "PreparedDataset":
        if not prepared:
            raise ConfigError(f"{key}.prepared_dir", "is required with name PreparedDataset")
        # The list keys, when given, say which list the prepared set must come from.
        return DatasetSpec(
            key,
            kind,
            label_path=r.get(f"{key}.cls_label_path", None),
            image_root=r.get(f"{key}.image_root", None),
            delimiter=r.get(f"{key}.delimiter", " "),
            relabel=bool(r.get(f"{key}.relabel", False)),
            prepared_dir=str(prepared),
            classes=classes,
        )
    if prepared:
        raise ConfigError(
            f"{key}.prepared_dir", f"is only read with name PreparedDataset, not {kind}"
        )
    return DatasetSpec(
        key,
        kind,
        label_path=str(r.get(f"{key}.cls_label_path")),
        image_root=r.get(f"{key}.image_root", None),
        delimiter=r.get(f"{key}.delimiter", " ") if kind == "ImageNetDataset" else None,
        relabel=bool(r.get(f"{key}.relabel", False)),
        classes=classes,
    )


def _classes(r: Reader, key: str) -> tuple[int, int] | None:
    value = r.get(key, defaults.DATASET_KEYS["classes"])
    if value is None:
        return None
    pair = list(value) if isinstance(value, list | tuple) else None
    if (
        pair is None
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
        or not 0 <= pair[0] <= pair[1]
    ):
        raise ConfigError(key, f"{value!r}: give [first, last] labels kept, 0 <= first <= last")
    return (pair[0], pair[1])


def _tfds_dataset(r: Reader, key: str, classes: tuple[int, int] | None) -> DatasetSpec:
    for other in ("cls_label_path", "image_root", "delimiter", "prepared_dir"):
        if r.peek(f"{key}.{other}") is not None:
            raise ConfigError(f"{key}.{other}", "is not read with name TFDSDataset; remove it")
        r.mark(f"{key}.{other}")
    values = {k: r.get(f"{key}.{k}", v) for k, v in defaults.TFDS_KEYS.items()}
    for required in ("tfds_name", "split"):
        if not values[required] or not isinstance(values[required], str):
            raise ConfigError(f"{key}.{required}", "is required (a string) with name TFDSDataset")
    return DatasetSpec(
        key,
        "TFDSDataset",
        relabel=bool(r.get(f"{key}.relabel", False)),
        classes=classes,
        tfds=TFDSSpec(
            name=values["tfds_name"],
            split=values["split"],
            data_dir=None if values["data_dir"] is None else str(values["data_dir"]),
            image_key=str(values["image_key"]),
            label_key=str(values["label_key"]),
            uid_key=values["uid_key"] or None,
        ),
    )


def _workers(r: Reader, key: str) -> int | None:
    n = int(r.get(key, 0) or 0)
    return n if n > 0 else None


def _train_data(r: Reader) -> TrainDataSpec:
    base = "DataLoader.Train"
    dataset = _dataset(r, f"{base}.dataset", ("ImageNetDataset", "PreparedDataset", "TFDSDataset"))
    transform, pixel = train_chain(r, f"{base}.dataset.transform_ops")
    s = f"{base}.sampler"
    if r.get(f"{s}.name") != "PKSampler":
        raise ConfigError(f"{s}.name", f"{r.get(f'{s}.name')!r}: only PKSampler is supported")
    method = r.get(f"{s}.sample_method", "sample_avg_prob")
    if method not in ("sample_avg_prob", "id_avg_prob"):
        raise ConfigError(f"{s}.sample_method", f"{method!r}: use sample_avg_prob or id_avg_prob")
    sampler = SamplerSpec(
        batch_size=_pos_int(r, f"{s}.batch_size"),
        sample_per_id=_pos_int(r, f"{s}.sample_per_id"),
        sample_method=method,
        id_list=tuple(int(v) for v in (r.get(f"{s}.id_list", ()) or ())),
        ratio=tuple(float(v) for v in (r.get(f"{s}.ratio", ()) or ())),
        shuffle=bool(r.get(f"{s}.shuffle", True)),
    )
    if sampler.batch_size % sampler.sample_per_id:
        raise ConfigError(
            f"{s}.batch_size",
            f"{sampler.batch_size} must be a multiple of sample_per_id {sampler.sample_per_id}",
        )
    return TrainDataSpec(
        dataset=dataset,
        sampler=sampler,
        transform=transform,
        pixel=pixel,
        num_workers=_workers(r, f"{base}.loader.num_workers"),
        augment_on_device=bool(r.get(f"{base}.augment_on_device", False)),
    )


def _eval_data(r: Reader) -> EvalDataSpec:
    base = "DataLoader.Eval"
    parts = list(r.peek(base, {}))
    if "Query" in parts and "Gallery" in parts and len(parts) == 2:
        names = {"query": f"{base}.Query", "gallery": f"{base}.Gallery"}
    elif len(parts) == 1:
        names = {"query": f"{base}.{parts[0]}", "gallery": f"{base}.{parts[0]}"}
    else:
        raise ConfigError(base, f"needs Query and Gallery sections (or exactly one), got {parts}")
    specs, chains = {}, {}
    for role, key in names.items():
        specs[role] = _dataset(r, f"{key}.dataset", ("VeriWild", "ImageNetDataset", "TFDSDataset"))
        chains[role] = eval_chain(r, f"{key}.dataset.transform_ops")
        if r.get(f"{key}.sampler.drop_last", False):
            raise ConfigError(f"{key}.sampler.drop_last", "jaxrec evaluates every image; use False")
        sampler = r.get(f"{key}.sampler.name", "DistributedBatchSampler")
        if sampler not in ("DistributedBatchSampler", "BatchSampler"):
            raise ConfigError(f"{key}.sampler.name", f"{sampler!r}: use DistributedBatchSampler")
    if chains["query"] != chains["gallery"]:
        raise ConfigError(
            f"{names['gallery']}.dataset.transform_ops",
            "must preprocess like the Query set (one model input for both)",
        )
    q, g = names["query"], names["gallery"]
    for sub in ("sampler.batch_size", "loader.num_workers"):
        if r.get(f"{g}.{sub}", None) != r.get(f"{q}.{sub}", None):
            raise ConfigError(
                f"{g}.{sub}", f"must equal {q}.{sub} (jaxrec feeds both sets the same way)"
            )
    same = dataclasses.replace(specs["query"], key="") == dataclasses.replace(
        specs["gallery"], key=""
    )
    return EvalDataSpec(
        query=specs["query"],
        gallery=specs["gallery"],
        same_lists=same,
        preprocess=chains["query"],
        sampler_batch_size=_pos_int(r, f"{q}.sampler.batch_size"),
        batch_size_per_device=int(r.get("Global.eval_batch_size_per_device")),
        num_workers=_workers(r, f"{q}.loader.num_workers"),
    )


def _metrics(r: Reader) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    entries = r.peek("Metric.Eval") or [{"Recallk": {"topk": [1, 5]}}, {"mAP": {}}]
    names, topk, keys = [], [], []
    for i, entry in enumerate(entries):
        key = f"Metric.Eval[{i}]"
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(key, "must be a one-key mapping {Name: {...}}")
        (name,) = entry
        if name not in _METRICS:
            raise ConfigError(f"{key}.{name}", f"is not a retrieval metric; use {sorted(_METRICS)}")
        if not entry[name]:
            r.mark(f"{key}.{name}")
        names.append(_METRICS[name])
        if name in ("Recallk", "Precisionk"):
            ks = r.get(f"{key}.{name}.topk", (1, 5))
            ks = [int(ks)] if isinstance(ks, int) else [int(k) for k in ks]
            topk += [k for k in ks if k not in topk]
            keys += [f"recall{k}" if name == "Recallk" else f"precision@{k}" for k in ks]
        else:
            keys.append(name)
    if r.has("Metric.Train"):
        raise ConfigError("Metric.Train", "training metrics are not computed by jaxrec; remove it")
    return tuple(names), tuple(topk), tuple(keys)


def _eval(r: Reader, compute_dtype: str) -> EvalSpec:
    has_data = r.has("DataLoader.Eval")
    enabled = bool(r.get("Global.eval_during_train", False))
    interval = int(r.get("Global.eval_interval", 1))
    if enabled and not has_data:
        raise ConfigError("Global.eval_during_train", "is True but there is no DataLoader.Eval")
    names, topk, keys = _metrics(r)
    feature_from = r.get("Global.retrieval_feature_from", "features")
    if feature_from not in ("features", "backbone"):
        raise ConfigError(
            "Global.retrieval_feature_from", f"{feature_from!r}: use features or backbone"
        )
    fp16_test = bool(r.get("AMP.use_fp16_test", False)) if r.has("AMP") else False
    return EvalSpec(
        enabled=enabled and interval > 0,
        interval=max(interval, 1),
        start_epoch=int(r.get("Global.start_eval_epoch")),
        before_training=bool(r.get("Global.eval_before_training")),
        metrics=names,
        topk=topk,
        keys=keys,
        feature=FeatureSpec(feature_from, bool(r.get("Global.feature_normalize"))),
        re_ranking=bool(r.get("Global.re_ranking")),
        block_size=_pos_int(r, "Global.sim_block_size"),
        drop_excluded=_drop_excluded(r),
        compute_dtype=compute_dtype if fp16_test else "float32",
        data=_eval_data(r) if has_data else None,
    )


def _drop_excluded(r: Reader) -> bool:
    drop = bool(r.get("Global.drop_excluded"))
    if drop and bool(r.get("Global.re_ranking")):
        raise ConfigError(
            "Global.drop_excluded", "is not implemented with Global.re_ranking; set one False"
        )
    return drop


def _image_size(r: Reader, train: TrainDataSpec | None, ev: EvalSpec) -> int:
    shape = list(r.get("Global.image_shape", [3, 224, 224]))
    if len(shape) != 3 or shape[0] != 3 or shape[1] != shape[2]:
        raise ConfigError("Global.image_shape", f"{shape}: expected [3, S, S]")
    size = int(shape[1])
    if ev.data is not None and ev.data.preprocess.input_size != (size, size):
        raise ConfigError(
            "Global.image_shape",
            f"{shape} differs from the eval input size {ev.data.preprocess.input_size} that "
            "export and extraction use; keep them equal",
        )
    if train is not None and not math.isclose(train.transform.size, size):
        raise ConfigError(
            "Global.image_shape",
            f"{shape} differs from the training size {train.transform.size}; keep them equal",
        )
    return size
