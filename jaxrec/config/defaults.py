"""Defaults, in one place: jaxrec's own keys and PaddleClas keys that YAML files may omit.

`fill(config)` adds the missing ones to a config (configs/general_v2.py and the PaddleClas YAML
reader call it, so the keys can be overridden on the command line), and the resolver applies
the same tables to whatever still lacks them, so every route resolves to the same run.
"""

from __future__ import annotations

import re
from typing import Any

from ml_collections import config_dict

from jaxrec.data import image as image_lib

#: Keys that jaxrec adds to the PaddleClas sections, with their defaults and meaning.
JAXREC_KEYS: dict[str, dict[str, Any]] = {
    "Global": {
        # Seeds init, dropout, sampling and augmentation (the reference's unset seed acts as 0).
        "seed": 0,
        # BatchNorm statistics synchronized over all devices (the reference: per device).
        "sync_bn": False,
        # A checkpoint every N steps besides one at every epoch end (0: epoch ends only).
        "checkpoint_every_steps": 1000,
        # Checkpoints kept in WORKDIR/checkpoints (the best is kept separately in best/).
        "keep_checkpoints": 3,
        # Eval images per device (0: the Eval sampler's batch_size split over the devices).
        "eval_batch_size_per_device": 0,
        # Resume a workdir although the config changed (the run is then not reproducible).
        "allow_config_change": False,
        # Also evaluate the freshly initialized network (step 0; not used for best selection).
        "eval_before_training": False,
        # With several devices, split the classification head's class axis over them (its
        # weight, optimizer state and gradient; the loss is unchanged). False: replicated.
        "shard_head": True,
        # Excluded query/gallery pairs (same label and id) leave the ranking instead of ranking
        # at similarity 0 (PaddleClas); the benchmarks' query == gallery protocol.
        "drop_excluded": False,
    },
    "AMP": {
        # Compute dtype when AMP.use_amp (parameters, BNNeck statistics and losses stay float32).
        "dtype": "bfloat16",
    },
    "DataLoader.Train": {
        # Random crop/flip/rotation/erasing inside the jitted step instead of on the host.
        "augment_on_device": False,
    },
    "DataLoader.Train.dataset": {
        # With name PreparedDataset: the folder `python -m jaxrec.prepare` wrote.
        "prepared_dir": None,
    },
}

#: Keys of a `DataLoader.*.dataset` section with `name: TFDSDataset` (jaxrec's own source: a
#: tensorflow-datasets split read offline), with their defaults; `tfds_name` and `split` are
#: required. They are read only with that name (and an error with any other).
TFDS_KEYS: dict[str, Any] = {
    # The tfds dataset name, e.g. caltech_birds2011, cars196, stanford_online_products.
    "tfds_name": None,
    # A tfds split expression, e.g. train, test, train+test.
    "split": None,
    # The folder `tfds build` wrote (None: tfds's default, ~/tensorflow_datasets).
    "data_dir": None,
    # The feature holding the encoded image.
    "image_key": "image",
    # The integer (ClassLabel) feature holding the class.
    "label_key": "label",
    # An integer feature used as the third-column id (None: none; a set that is both query and
    # gallery then uses the record index, so no image retrieves itself).
    "uid_key": None,
}

#: Keys every `DataLoader.*.dataset` section may have (jaxrec's own), with their defaults.
DATASET_KEYS: dict[str, Any] = {
    # [first, last] label kept (inclusive), for class-disjoint protocols; None keeps all.
    "classes": None,
}

#: PaddleClas keys that are absent from its YAML files but have defaults that matter.
PADDLE_DEFAULTS: dict[str, Any] = {
    "Global.feature_normalize": True,
    "Global.start_eval_epoch": 0,
    "Global.sim_block_size": 64,
    "Global.re_ranking": False,
    "Global.eval_mode": "classification",
    "Global.retrieval_feature_from": "features",
    "Global.eval_interval": 1,
}

#: Arch backbones by PaddleClas class name: the width, stage depths, dropout and PP-ShiTu form
#: that the name fixes (`scale` / `depths` / `dropout_prob` in the section override them;
#: "PPLCNetV2" has no preset, so the section must give `scale` and `depths`).
BACKBONE_VARIANTS: dict[str, dict[str, Any]] = {
    "PPLCNetV2": {"scale": None, "depths": None, "dropout_prob": 0.0, "shitu": False},
    "PPLCNetV2_small": {"scale": 0.75, "depths": (2, 2, 4, 2), "dropout_prob": 0.2, "shitu": False},
    "PPLCNetV2_base": {"scale": 1.0, "depths": (2, 2, 6, 2), "dropout_prob": 0.2, "shitu": False},
    "PPLCNetV2_large": {"scale": 1.25, "depths": (2, 2, 8, 2), "dropout_prob": 0.2, "shitu": False},
    "PPLCNetV2_base_ShiTu": {
        "scale": 1.0,
        "depths": (2, 2, 6, 2),
        "dropout_prob": 0.2,
        "shitu": True,
    },
}

#: Arch keys PaddleClas's classes give defaults to (the backbone's keys also apply to a bare
#: backbone, whose keys sit at the top of the section).
ARCH_DEFAULTS: dict[str, Any] = {
    "head_feature_from": "neck",
    "infer_output_key": "features",
    "Backbone.class_num": 1000,
    "Backbone.use_last_conv": True,
    "Backbone.class_expand": 1280,
    "Backbone.act": "relu",
}

#: Head arguments by head name when the section omits them. `weight_attr` is the initializer
#: of the head's weight (FC: jaxrec's N(0, 0.001); the margin heads: XavierNormal, as
#: PaddleClas); FC's `bias_attr` False means no bias (the GeneralRecognitionV2 config).
HEAD_DEFAULTS: dict[str, dict[str, Any]] = {
    "FC": {"weight_attr": {"name": "Normal", "mean": 0.0, "std": 0.001}, "bias_attr": False},
    "ArcMargin": {
        "weight_attr": {"name": "XavierNormal"},
        "margin": 0.5,
        "scale": 80.0,
        "easy_margin": False,
    },
    "CosMargin": {"weight_attr": {"name": "XavierNormal"}, "margin": 0.35, "scale": 64.0},
    # CircleMargin's margin and scale have no default in PaddleClas: the section must give them.
    "CircleMargin": {"weight_attr": {"name": "XavierNormal"}},
}

#: Arguments of Paddle initializers (`weight_attr.initializer`) that the section may omit.
INITIALIZER_DEFAULTS: dict[str, float] = {"mean": 0.0, "std": 1.0, "value": 0.0}

#: Loss.Train arguments by loss name, as PaddleClas's loss classes default them (`weight` has
#: none: every entry must give it).
LOSS_DEFAULTS: dict[str, dict[str, Any]] = {
    "CELoss": {"epsilon": None, "reduction": "mean"},
    "TripletAngularMarginLoss": {
        "margin": 0.5,
        "normalize_feature": True,
        "reduction": "mean",
        "add_absolute": False,
        "absolute_loss_weight": 1.0,
        "ap_value": 0.9,
        "an_value": 0.5,
        "feature_from": "features",
    },
    "TripletLossV2": {"margin": 0.5, "normalize_feature": True, "feature_from": "features"},
    "TripletLoss": {"margin": 1.0},
    "CenterLoss": {"feature_from": "features"},  # num_classes and feat_dim are required
}

#: PaddleClas keys the resolver reads with a fallback when a config omits them (or sets them
#: to null): the values PaddleClas's code uses then. None means "optional, unset".
KEY_DEFAULTS: dict[str, Any] = {
    "Global.print_batch_step": 10,
    "Global.pretrained_model": None,
    "Global.checkpoints": None,
    "Global.use_dali": False,
    "Global.feature_binarize": None,
    "Global.update_freq": 1,
    "Global.eval_during_train": False,
    "Global.image_shape": [3, 224, 224],
    "AMP.use_amp": False,
    "AMP.level": "O1",
    "AMP.use_fp16_test": False,
    "Arch.use_sync_bn": False,
    "Arch.Backbone.pretrained": False,
    "Arch.Neck.bias_attr.learning_rate": 1.0,
    "Optimizer.lr.by_epoch": False,
    "Optimizer.lr.last_epoch": -1,
    "Optimizer.lr.warmup_epoch": 0.0,
    "Optimizer.lr.eta_min": 0.0,
    "Optimizer.lr.warmup_start_lr": 0.0,
    # Without a Metric section PaddleClas's retrieval evaluation reports recall1/5 and mAP.
    "Metric.Eval": [{"Recallk": {"topk": [1, 5]}}, {"mAP": {}}],
}

#: Keys of any DataLoader dataset / sampler / loader section (Train and the Eval sets).
DATASET_DEFAULTS: dict[str, Any] = {
    "cls_label_path": None,  # required except with name PreparedDataset
    "image_root": None,
    "delimiter": " ",
    "relabel": False,
    "prepared_dir": None,  # read only with name PreparedDataset (a jaxrec key for Train)
}
TRAIN_SAMPLER_DEFAULTS: dict[str, Any] = {
    "sample_method": "sample_avg_prob",
    "id_list": None,
    "ratio": None,
    "shuffle": True,
}
EVAL_SAMPLER_DEFAULTS: dict[str, Any] = {"name": "DistributedBatchSampler", "drop_last": False}
LOADER_DEFAULTS: dict[str, Any] = {"num_workers": 0}  # 0: jaxrec picks the thread count
#: `topk` of the Recallk / Precisionk metrics.
METRIC_TOPK: tuple[int, ...] = (1, 5)

#: Arguments of the `transform_ops` jaxrec implements, as PaddleClas's operators default them.
OP_DEFAULTS: dict[str, dict[str, Any]] = {
    "DecodeImage": {"to_rgb": True, "channel_first": False, "backend": "cv2"},
    "ResizeImage": {"interpolation": None, "backend": "cv2"},
    "RandFlipImage": {"flip_code": 1},
    "Pad": {"fill": 0, "padding_mode": "constant", "backend": "cv2"},
    "RandomRotation": {
        "prob": 0.5,
        "interpolation": "bilinear",
        "expand": False,
        "center": None,
        "fill": 0,
    },
    "NormalizeImage": {
        "scale": image_lib.SCALE_TRAIN,
        "mean": image_lib.IMAGENET_MEAN,
        "std": image_lib.IMAGENET_STD,
        "order": "hwc",
        "output_fp16": False,
        "channel_num": 3,
    },
    "RandomErasing": {
        "EPSILON": 0.5,
        "sl": 0.02,
        "sh": 0.4,
        "r1": 0.3,
        "mean": (0.0, 0.0, 0.0),
        "attempt": 100,
        "use_log_aspect": False,
        "mode": "const",
    },
}

_NO_DEFAULT = object()
_OP_ARG = re.compile(r"\[\d+\]\.(\w+)\.(\w+)$")  # ...transform_ops[i].Op.arg
_DATA = re.compile(r"^DataLoader\.(Train|Eval\.\w+)\.(dataset|sampler|loader)\.(\w+)$")
_TOPK = re.compile(r"^Metric\.Eval\[\d+\]\.(Recallk|Precisionk)\.topk$")


def key_default(key: str) -> Any:
    """The default of a dotted config key (e.g. `Optimizer.lr.eta_min`,
    `DataLoader.Eval.Query.sampler.name`, `...transform_ops[3].RandomErasing.sl`); raises
    KeyError when the key has none (it is then required)."""
    section, _, name = key.rpartition(".")
    if key in PADDLE_DEFAULTS:
        return PADDLE_DEFAULTS[key]
    if name in JAXREC_KEYS.get(section, {}):
        return JAXREC_KEYS[section][name]
    if key in KEY_DEFAULTS:
        return KEY_DEFAULTS[key]
    value: Any = _NO_DEFAULT
    if _TOPK.match(key):
        value = list(METRIC_TOPK)
    elif (m := _OP_ARG.search(key)) and m.group(1) in OP_DEFAULTS:
        value = OP_DEFAULTS[m.group(1)].get(m.group(2), _NO_DEFAULT)
    elif m := _DATA.match(key):
        which, part, arg = m.groups()
        if part == "sampler":
            table = TRAIN_SAMPLER_DEFAULTS if which == "Train" else EVAL_SAMPLER_DEFAULTS
        elif part == "dataset":
            table = {**DATASET_DEFAULTS, **DATASET_KEYS, **TFDS_KEYS}
        else:
            table = LOADER_DEFAULTS
        value = table.get(arg, _NO_DEFAULT)
    if value is _NO_DEFAULT:
        raise KeyError(key)
    return value


def _sections(tree: Any, dotted: str, create: bool) -> Any:
    node = tree
    for part in dotted.split("."):
        if part not in node or node[part] is None:
            if not create:
                return None
            node[part] = type(node)()
        node = node[part]
    return node


def _placeholder(node: Any, value: Any) -> Any:
    """None in a ConfigDict becomes a str placeholder, so the command line can set it."""
    if value is None and not isinstance(node, dict):
        return config_dict.placeholder(str)
    return value


def fill(tree: Any) -> Any:
    """Add missing jaxrec keys and PaddleClas defaults to a config (ConfigDict or dict), in
    place, for the sections the config has; returns it."""
    for section, keys in JAXREC_KEYS.items():
        node = _sections(tree, section, create=False)
        if node is not None:
            for k, v in keys.items():
                if k not in node:
                    node[k] = _placeholder(node, v)
    for dotted, v in PADDLE_DEFAULTS.items():
        section, k = dotted.rsplit(".", 1)
        node = _sections(tree, section, create=False)
        if node is not None and k not in node:
            node[k] = v
    return tree
