"""Stanford Online Products protocol: the official split, 11,318 / 11,316 classes, query == gallery.

    python train.py --config configs/sop.py --workdir runs/sop
    python evaluate.py --workdir runs/sop

The split published with the dataset (Oh Song et al., CVPR 2016; `Ebay_train.txt` and
`Ebay_test.txt`), which tfds `stanford_online_products` keeps as its `train` split (59,551
images of classes 1-11,318: labels 0-11,317) and `test` split (60,502 images of classes
11,319-22,634: labels 11,318-22,633), with the product id in the `class_id` feature. Everything
else: configs/metric_learning.py.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import metric_learning


def get_config(prepared_dir: str | None = None):
    return metric_learning.protocol_config(
        "stanford_online_products",
        train_split="train",
        eval_split="test",
        train_classes=(0, 11317),
        eval_classes=(11318, 22633),
        class_num=11318,
        epochs=30,
        label_key="class_id",
        prepared_dir=prepared_dir,
    )
