"""PP-ShiTuV2 recognition recipe: PaddleClas GeneralRecognitionV2_PPLCNetV2_base.yaml, key for key.

Train (all devices of all processes, data parallel; resumes automatically from --workdir):

    python train.py --config configs/general_v2.py --workdir runs/general_v2

Override any field on the command line, e.g.

    python train.py --config configs/general_v2.py --workdir runs/x \
        --config.Global.epochs=10 --config.Arch.Head.class_num=1000 \
        --config.DataLoader.Train.sampler.batch_size=64 \
        --config.Loss.Train[1].TripletAngularMarginLoss.margin=0.3 \
        '--config.Global.image_shape=(3, 112, 112)'

Lists of one-key dicts (`Loss.Train`, `Metric.Eval`, `transform_ops`) hold ConfigDicts: change a
single entry by index as above; to add or remove entries write a small config file that imports
this one (`cfg = general_v2.get_config(); cfg.Loss.Train.append(...)`). Tuples are overridden as
quoted Python literals. Unknown keys are errors.

Sections and keys mirror the YAML (spec section 1). jaxrec-only keys (not in the YAML):

* `Global.seed` (0): seeds init, dropout, sampling and augmentation (the reference's
  unset seed also behaves as 0).
* `Global.sync_bn` (False): BatchNorm statistics synchronized over all devices instead of the
  reference's per-device statistics.
* `Global.checkpoint_every_steps` (1000, 0 = off) and `Global.keep_checkpoints` (3): besides
  a checkpoint at every epoch end; the best (by recall1) is kept separately.
* `Global.eval_batch_size_per_device` (0 = Eval sampler batch_size / device count).
* `Global.feature_normalize` (True), `Global.start_eval_epoch` (0): reference defaults made
  explicit.
* `Global.allow_config_change` (False): resume a workdir although the config changed.
* `Global.eval_before_training` (False): also evaluate the freshly initialized network (logged
  as step 0; not used for best-model selection).
* `AMP.dtype` ("bfloat16"): compute dtype when `AMP.use_amp` (params, BNNeck stats, losses and
  margin heads stay float32). The reference's fp16 loss-scaling keys are kept but unused.

`DataLoader.Train.sampler.batch_size` is per device, as in the reference (per GPU): the global
batch is batch_size x number of devices. LR 0.06 is tuned for 8 x 256.

`Global.pretrained_model` may be a jaxrec model directory or a PaddleClas `.pdparams` file.
`Arch.Backbone.pretrained`/`use_ssld` only document the reference's ImageNet initialization:
jaxrec downloads nothing; convert `PPLCNetV2_base_ssld_pretrained.pdparams` with jaxrec.convert
and pass it as `Global.pretrained_model` (non-matching keys are skipped with a message).
`Global.checkpoints` must stay null: runs resume from `--workdir`. Inert here (kept for key
parity): `Global.output_dir`, `save_interval` (jaxrec checkpoints every
`checkpoint_every_steps` and at each epoch end, keeping the last `keep_checkpoints` plus the
best), `device`, `use_visualdl` (TensorBoard files are always written), `use_dali`,
`save_inference_dir`, the AMP loss-scaling keys, `DataLoader.*.loader.use_shared_memory` and the
eval samplers' `drop_last`/`shuffle`.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

_C = ml_collections.ConfigDict


def _decode_resize(size: int) -> list:
    return [
        _C({"DecodeImage": {"to_rgb": True, "channel_first": False}}),
        _C(
            {
                "ResizeImage": {
                    "size": (size, size),
                    "return_numpy": False,
                    "interpolation": "bilinear",
                    "backend": "cv2",
                }
            }
        ),
    ]


def _normalize() -> _C:
    return _C(
        {
            "NormalizeImage": {
                "scale": "1.0/255.0",
                "mean": (0.485, 0.456, 0.406),
                "std": (0.229, 0.224, 0.225),
                "order": "hwc",
            }
        }
    )


def train_transform_ops(size: int = 224, padding: int = 10) -> list:
    """The reference train chain (spec 6.3) at `size`."""
    return _decode_resize(size) + [
        _C({"RandFlipImage": {"flip_code": 1}}),
        _C({"Pad": {"padding": padding, "backend": "cv2"}}),
        _C({"RandCropImageV2": {"size": (size, size)}}),
        _C({"RandomRotation": {"prob": 0.5, "degrees": 90, "interpolation": "bilinear"}}),
        _C(
            {
                "ResizeImage": {
                    "size": (size, size),
                    "return_numpy": False,
                    "interpolation": "bilinear",
                    "backend": "cv2",
                }
            }
        ),
        _normalize(),
    ]


def eval_transform_ops(size: int = 224) -> list:
    """The reference eval chain (spec 6.4) at `size`."""
    return _decode_resize(size) + [_normalize()]


def eval_set(image_root: str, cls_label_path: str, size: int = 224, batch_size: int = 64) -> _C:
    return _C(
        {
            "dataset": {
                "name": "VeriWild",
                "image_root": image_root,
                "cls_label_path": cls_label_path,
                "transform_ops": eval_transform_ops(size),
            },
            "sampler": {
                "name": "DistributedBatchSampler",
                "batch_size": batch_size,
                "drop_last": False,
                "shuffle": False,
            },
            "loader": {"num_workers": 4, "use_shared_memory": True},
        }
    )


def get_config() -> ml_collections.ConfigDict:
    feat_dim = 512
    c = ml_collections.ConfigDict()
    c.Global = _C(
        {
            "checkpoints": config_dict.placeholder(str),
            "pretrained_model": config_dict.placeholder(str),
            "output_dir": "./output",
            "device": "gpu",
            "save_interval": 1,
            "eval_during_train": True,
            "eval_interval": 1,
            "epochs": 100,
            "print_batch_step": 20,
            "use_visualdl": False,
            "eval_mode": "retrieval",
            "retrieval_feature_from": "features",
            "re_ranking": False,
            "use_dali": False,
            "image_shape": (3, 224, 224),
            "save_inference_dir": "./inference",
            # jaxrec-only
            "seed": 0,
            "sync_bn": False,
            "checkpoint_every_steps": 1000,
            "keep_checkpoints": 3,
            "eval_batch_size_per_device": 0,
            "feature_normalize": True,
            "start_eval_epoch": 0,
            "allow_config_change": False,
            "eval_before_training": False,
        }
    )
    c.AMP = _C(
        {
            "use_amp": False,
            "use_fp16_test": False,
            "scale_loss": 128.0,
            "use_dynamic_loss_scaling": True,
            "use_promote": False,
            "level": "O1",
            "dtype": "bfloat16",  # jaxrec-only
        }
    )
    c.Arch = _C(
        {
            "name": "RecModel",
            "infer_output_key": "features",
            "infer_add_softmax": False,
            "Backbone": {
                "name": "PPLCNetV2_base_ShiTu",
                "pretrained": True,
                "use_ssld": True,
                "class_expand": feat_dim,
            },
            "BackboneStopLayer": {"name": "flatten"},
            "Neck": {
                "name": "BNNeck",
                "num_features": feat_dim,
                "weight_attr": {"initializer": {"name": "Constant", "value": 1.0}},
                "bias_attr": {
                    "initializer": {"name": "Constant", "value": 0.0},
                    "learning_rate": 1.0e-20,
                },
            },
            "Head": {
                "name": "FC",
                "embedding_size": feat_dim,
                "class_num": 192612,
                "weight_attr": {"initializer": {"name": "Normal", "std": 0.001}},
                "bias_attr": False,
            },
        }
    )
    c.Loss = _C(
        {
            "Train": [
                _C({"CELoss": {"weight": 1.0, "epsilon": 0.1}}),
                _C(
                    {
                        "TripletAngularMarginLoss": {
                            "weight": 1.0,
                            "feature_from": "features",
                            "margin": 0.5,
                            "reduction": "mean",
                            "add_absolute": True,
                            "absolute_loss_weight": 0.1,
                            "normalize_feature": True,
                            "ap_value": 0.8,
                            "an_value": 0.4,
                        }
                    }
                ),
            ],
            "Eval": [_C({"CELoss": {"weight": 1.0}})],
        }
    )
    c.Optimizer = _C(
        {
            "name": "Momentum",
            "momentum": 0.9,
            "lr": {"name": "Cosine", "learning_rate": 0.06, "warmup_epoch": 5.0},
            "regularizer": {"name": "L2", "coeff": 0.00001},
        }
    )
    c.DataLoader = _C(
        {
            "Train": {
                "dataset": {
                    "name": "ImageNetDataset",
                    "image_root": "./dataset/",
                    "cls_label_path": "./dataset/train_reg_all_data_v2.txt",
                    "relabel": True,
                    "transform_ops": train_transform_ops(224),
                },
                "sampler": {
                    "name": "PKSampler",
                    "batch_size": 256,
                    "sample_per_id": 4,
                    "drop_last": False,
                    "shuffle": True,
                    "sample_method": "id_avg_prob",
                    "id_list": (50030, 80700, 92019, 96015),
                    "ratio": (4, 4),
                },
                "loader": {"num_workers": 4, "use_shared_memory": True},
            },
            "Eval": {
                "Query": eval_set("./dataset/Aliproduct/", "./dataset/Aliproduct/val_list.txt"),
                "Gallery": eval_set("./dataset/Aliproduct/", "./dataset/Aliproduct/val_list.txt"),
            },
        }
    )
    c.Metric = _C({"Eval": [_C({"Recallk": {"topk": (1, 5)}}), _C({"mAP": {}})]})
    return c
