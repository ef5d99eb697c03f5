"""Cars196 retrieval protocol: classes 1-98 train, 99-196 retrieval, query == gallery.

    python train.py --config configs/cars196.py --workdir runs/cars196
    python evaluate.py --workdir runs/cars196

The split of Oh Song et al. (CVPR 2016): the 16,185 images of tfds `cars196` (its
`train+test`; the protocol splits by class), labels 0-97 (8,054 images) for training and 98-195
(8,131 images) for retrieval. Everything else: configs/metric_learning.py.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import metric_learning


def get_config(prepared_dir: str | None = None):
    return metric_learning.protocol_config(
        "cars196",
        train_split="train+test",
        eval_split="train+test",
        train_classes=(0, 97),
        eval_classes=(98, 195),
        class_num=98,
        epochs=30,
        prepared_dir=prepared_dir,
    )
