"""Defaults, in one place: jaxrec's own keys and PaddleClas keys that YAML files may omit.

`fill(config)` adds the missing ones to a config (configs/general_v2.py and the PaddleClas YAML
reader call it, so the keys can be overridden on the command line), and the resolver applies
the same tables to whatever still lacks them, so every route resolves to the same run.
"""

from __future__ import annotations

from typing import Any

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
        from ml_collections import config_dict

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
