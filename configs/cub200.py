"""CUB-200-2011 retrieval protocol: classes 1-100 train, 101-200 retrieval, query == gallery.

    python train.py --config configs/cub200.py --workdir runs/cub200
    python evaluate.py --workdir runs/cub200

The split of Oh Song et al. (CVPR 2016) used throughout deep metric learning: the 11,788
images of tfds `caltech_birds2011` (its `train+test`, since the protocol splits by class, not by
tfds's split), labels 0-99 (classes 001-100: 5,864 images) for training and 100-199
(classes 101-200: 5,924 images) for retrieval. Everything else: configs/metric_learning.py.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import metric_learning


def get_config(prepared_dir: str | None = None):
    return metric_learning.protocol_config(
        "caltech_birds2011",
        train_split="train+test",
        eval_split="train+test",
        train_classes=(0, 99),
        eval_classes=(100, 199),
        class_num=100,
        epochs=30,
        prepared_dir=prepared_dir,
    )
