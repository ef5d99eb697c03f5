"""The PP-ShiTuV2 recipe scaled to the shipped Fashion-MNIST demo data (data/demo/README.md).

    python train.py --config configs/demo.py --workdir /tmp/demo
    python evaluate.py --workdir /tmp/demo

Same sections, losses (CE with label smoothing 0.1 + TripletAngularMarginLoss), optimizer
(Momentum, L2), warmup + cosine schedule and transform chain as configs/general_v2.py, changed
only where the 2-core-CPU budget (about 10 minutes for training and evaluation) or the data
require it:

* 48x48 inputs (the images are 28x28; Pad 3 instead of 10 gives a crop jitter of about 6% of
  the side) and a half-width backbone (`Arch.Backbone.scale` 0.5, 128-d embedding); 48 px gave
  higher mAP and a steadier recall1 than 32 px.
* RandomRotation probability 0 instead of 0.5 (a deviation from the recipe): Fashion-MNIST
  items are centred and always upright, so +-90 degree turns only show the 1,800 training
  images in poses that never occur at test time; turning it off gave higher mAP and a steadier
  recall1 (the ablation is in BENCHMARKS.md).
* 6 training classes: `class_num` 6, PK batches of 6 ids x 4 images per device, no
  `id_list`/`ratio` (the reference ranges point past this dataset).
* no ImageNet initialization (jaxrec downloads nothing), so training starts from scratch: LR
  0.05 (the recipe's 0.06 order; a higher one swung recall1 between epochs), a 1-epoch warmup
  and 8 epochs (600 steps; twice as many overfitted the 6 training classes).
* evaluation on 400 images of 4 classes never seen in training (query == gallery, self-matches
  excluded by the list's third column) before training (the untrained baseline, same seed and
  input size) and after every epoch; the best checkpoint by recall1 is kept in best/ and is the
  one evaluate.py restores.

Results over seeds (the README quotes the range; BENCHMARKS.md has the per-epoch values):
`python benchmarks/demo_seeds.py`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import general_v2

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(_REPO, "data", "demo")
SIZE = 48
PAD = 3


def get_config():
    c = general_v2.get_config()
    g = c.Global
    g.epochs = 8
    g.eval_interval = 1
    g.print_batch_step = 25
    g.image_shape = (3, SIZE, SIZE)
    g.checkpoint_every_steps = 200
    g.keep_checkpoints = 2
    g.eval_before_training = True

    c.Arch.Backbone.pretrained = False
    c.Arch.Backbone.use_ssld = False
    c.Arch.Backbone.scale = 0.5
    c.Arch.Backbone.class_expand = 128
    c.Arch.Neck.num_features = 128
    c.Arch.Head.embedding_size = 128
    c.Arch.Head.class_num = 6

    c.Optimizer.lr.learning_rate = 0.05
    c.Optimizer.lr.warmup_epoch = 1.0

    tr = c.DataLoader.Train
    tr.dataset.image_root = DEMO
    tr.dataset.cls_label_path = os.path.join(DEMO, "train_list.txt")
    ops = general_v2.train_transform_ops(SIZE, padding=PAD)
    for op in ops:
        if "RandomRotation" in op:
            op.RandomRotation.prob = 0.0
    tr.dataset.transform_ops = ops
    tr.sampler.batch_size = 24
    tr.sampler.sample_per_id = 4
    tr.sampler.id_list = ()
    tr.sampler.ratio = ()
    tr.loader.num_workers = 2
    for part in ("Query", "Gallery"):
        ev = c.DataLoader.Eval[part]
        ev.dataset.image_root = DEMO
        ev.dataset.cls_label_path = os.path.join(DEMO, "query_gallery_list.txt")
        ev.dataset.transform_ops = general_v2.eval_transform_ops(SIZE)
        ev.sampler.batch_size = 100
        ev.loader.num_workers = 2
    return c
