"""The metric-learning benchmark protocol on top of general_v2 (used by cub200, cars196, sop).

Zero-shot retrieval on classes never seen in training, as in the deep metric learning
literature (Oh Song et al., "Deep Metric Learning via Lifted Structured Feature Embedding",
CVPR 2016, which introduced the class splits of CUB-200-2011, Cars196 and Stanford Online
Products; Musgrave et al., "A Metric Learning Reality Check", ECCV 2020, for MAP@R):

* training on one set of classes, evaluation on the disjoint rest;
* every evaluation image is a query against all the others (query == gallery); the image
  itself leaves its own ranking (the record index is its id, ref §8.3, and
  `Global.drop_excluded` removes the excluded pair instead of PaddleClas's similarity 0 with a
  rank slot), as pytorch-metric-learning evaluates;
* Recall@1/2/4/8 and MAP@R as the papers and pytorch-metric-learning report them, besides
  PaddleClas's mAP (`Metric.Eval`; recall1 selects the best checkpoint).

The data is read offline through tensorflow-datasets (`DataLoader.*.dataset.name: TFDSDataset`)
from `TFDS_DATA_DIR` (default `~/tensorflow_datasets`), which `tfds build NAME
--file_format=array_record` prepared on a connected machine (then copy the folder over).
Passing a folder after the colon (`--config configs/cub200.py:/data/cub_224`) trains from a set
that `python -m jaxrec.prepare --tfds NAME ...` prepared instead (same batches, faster decode).

What differs from general_v2 (a fine-tuning variant sized for these sets; starting points,
not tuned here): `class_num` = training classes with `relabel`, PK batches without general_v2's
`id_list`/`ratio` (they index its 192,612 classes), LR 0.02 with a 2-epoch warmup, and
`Arch.Backbone.pretrained: False` because jaxrec downloads nothing. The published numbers
fine-tune ImageNet weights: convert `PPLCNetV2_base_ssld_pretrained.pdparams` with
`python -m jaxrec.convert` and pass it as `--config.Global.pretrained_model=DIR`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import general_v2
import ml_collections

from jaxrec.config import defaults

_C = ml_collections.ConfigDict


def data_dir() -> str:
    """Where tfds datasets are read from: $TFDS_DATA_DIR, else tfds's own default."""
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def tfds_set(
    name: str, split: str, classes: tuple[int, int] | None, label_key: str = "label"
) -> _C:
    """A `TFDSDataset` section (transform_ops are added by the caller)."""
    return _C(
        {
            "name": "TFDSDataset",
            "tfds_name": name,
            "split": split,
            "data_dir": data_dir(),
            "image_key": "image",
            "label_key": label_key,
            "classes": classes,
        }
    )


def protocol_config(
    name: str,
    *,
    train_split: str,
    eval_split: str,
    train_classes: tuple[int, int] | None,
    eval_classes: tuple[int, int] | None,
    class_num: int,
    epochs: int,
    label_key: str = "label",
    prepared_dir: str | None = None,
    size: int = 224,
) -> ml_collections.ConfigDict:
    """general_v2 with the benchmark's train and query == gallery sets (see the module doc)."""
    c = general_v2.get_config(str(size))
    c.Global.epochs = epochs
    c.Global.drop_excluded = True
    c.Arch.Backbone.pretrained = False
    c.Arch.Head.class_num = class_num
    c.Optimizer.lr.learning_rate = 0.02
    c.Optimizer.lr.warmup_epoch = 2.0

    tr = c.DataLoader.Train
    train = tfds_set(name, train_split, train_classes, label_key)
    if prepared_dir:
        train = _C({"name": "PreparedDataset", "prepared_dir": prepared_dir})
        train.classes = train_classes
    train.relabel = True
    train.transform_ops = general_v2.train_transform_ops(size)
    tr.dataset = train
    tr.sampler.batch_size = 128
    tr.sampler.sample_per_id = 4
    tr.sampler.id_list = ()
    tr.sampler.ratio = ()

    ev = _C(
        {
            "dataset": tfds_set(name, eval_split, eval_classes, label_key),
            "sampler": {
                "name": "DistributedBatchSampler",
                "batch_size": 256,
                "drop_last": False,
                "shuffle": False,
            },
            "loader": {"num_workers": 4, "use_shared_memory": True},
        }
    )
    ev.dataset.transform_ops = general_v2.eval_transform_ops(size)
    c.DataLoader.Eval = _C({"Query": ev, "Gallery": _C(ev.to_dict())})
    c.Metric.Eval = [
        _C({"Recallk": {"topk": (1, 2, 4, 8)}}),
        _C({"mAP": {}}),
        _C({"MAP@R": {}}),
    ]
    return defaults.fill(c)
