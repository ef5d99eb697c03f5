"""Tiny real-image dataset (PNG files + PaddleClas list files) and a tiny training config."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def make_tiny_dataset(
    root: str, train_classes: int = 4, eval_classes: int = 3, per_class: int = 4, size: int = 40
) -> dict:
    """Classes differ by colour and stripe direction; a few pixels of noise per image."""
    rs = np.random.RandomState(123)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    lines_train, lines_eval = [], []
    uid = 0
    for c in range(train_classes + eval_classes):
        base = rs.randint(30, 225, size=3)
        for k in range(per_class):
            img = np.tile(base, (size, size, 1)).astype(np.int32)
            period = 4 + 2 * (c % 4)
            stripes = (np.arange(size) // period) % 2
            if c % 2:
                img[stripes.astype(bool), :, :] //= 2
            else:
                img[:, stripes.astype(bool), :] //= 2
            img += rs.randint(-20, 21, size=img.shape)
            img = np.clip(img, 0, 255).astype(np.uint8)
            name = f"images/c{c}_{k}.png"
            Image.fromarray(img).save(os.path.join(root, name))
            if c < train_classes:
                lines_train.append(f"{name} {c}")
            else:
                lines_eval.append(f"{name} {c} {uid}")
                uid += 1
    with open(os.path.join(root, "train.txt"), "w") as f:
        f.write("\n".join(lines_train) + "\n")
    with open(os.path.join(root, "eval.txt"), "w") as f:
        f.write("\n".join(lines_eval) + "\n")
    return {
        "root": root,
        "train": os.path.join(root, "train.txt"),
        "eval": os.path.join(root, "eval.txt"),
        "num_classes": train_classes,
    }


def tiny_config(data: dict, epochs: int = 3, batch_per_device: int = 4, size: int = 32):
    """general_v2 shrunk to a 32x32, width-0.25, depth-1 model on the tiny dataset."""
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "configs"))
    import general_v2

    c = general_v2.get_config()
    c.Global.epochs = epochs
    c.Global.image_shape = (3, size, size)
    c.Global.print_batch_step = 1
    c.Global.checkpoint_every_steps = 1
    c.Global.eval_during_train = False
    c.Arch.Backbone.pretrained = False
    c.Arch.Backbone.use_ssld = False
    c.Arch.Backbone.scale = 0.25
    c.Arch.Backbone.depths = (1, 1, 1, 1)
    c.Arch.Backbone.class_expand = 16
    c.Arch.Neck.num_features = 16
    c.Arch.Head.embedding_size = 16
    c.Arch.Head.class_num = data["num_classes"]
    c.Arch.Head.weight_attr.initializer.std = 0.01
    c.Optimizer.lr.learning_rate = 0.05
    c.Optimizer.lr.warmup_epoch = 1
    tr = c.DataLoader.Train
    tr.dataset.image_root = data["root"]
    tr.dataset.cls_label_path = data["train"]
    tr.dataset.transform_ops = general_v2.train_transform_ops(size, padding=2)
    tr.sampler.batch_size = batch_per_device
    tr.sampler.sample_per_id = 2
    tr.sampler.id_list = ()
    tr.sampler.ratio = ()
    tr.loader.num_workers = 1
    for part in ("Query", "Gallery"):
        ev = c.DataLoader.Eval[part]
        ev.dataset.image_root = data["root"]
        ev.dataset.cls_label_path = data["eval"]
        ev.dataset.transform_ops = general_v2.eval_transform_ops(size)
        ev.sampler.batch_size = 8
        ev.loader.num_workers = 1
    return c


def assert_same_batches(a, b, steps: int) -> None:
    """The next `steps` batches of two train loaders are identical (images and labels); both
    loaders are closed afterwards."""
    try:
        for _ in range(steps):
            x, y = next(a), next(b)
            np.testing.assert_array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
            np.testing.assert_array_equal(np.asarray(x["label"]), np.asarray(y["label"]))
    finally:
        a.close()
        b.close()
