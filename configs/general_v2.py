"""PP-ShiTuV2 recognition recipe: PaddleClas GeneralRecognitionV2_PPLCNetV2_base.yaml, key for key.

Train (all devices of all processes, data parallel; resumes automatically from --workdir):

    python train.py --config configs/general_v2.py --workdir runs/general_v2

Override any field on the command line, e.g.

    python train.py --config configs/general_v2.py --workdir runs/x \
        --config.Global.epochs=10 --config.Arch.Head.class_num=1000 \
        --config.DataLoader.Train.sampler.batch_size=64 \
        --config.Loss.Train[1].TripletAngularMarginLoss.margin=0.3

A different input size changes every resize in the train and eval chains and
Global.image_shape together: `--config configs/general_v2.py:112`.

Lists of one-key dicts (`Loss.Train`, `Metric.Eval`, `transform_ops`) hold ConfigDicts: change a
single entry by index as above; to add or remove entries write a small config file that imports
this one (`cfg = general_v2.get_config(); cfg.Loss.Train.append(...)`). Tuples are overridden as
quoted Python literals. Unknown keys are errors.

Sections and keys mirror the YAML key for key. Every key is either honoured or rejected
with an error naming it when the config is resolved (`jaxrec.config.resolve`); the few keys that
are accepted but change nothing are listed, with the reason, in docs/CONFIG.md. jaxrec's own
keys (`Global.seed`, `Global.sync_bn`, `Global.checkpoint_every_steps`, ...) and PaddleClas
defaults the YAML leaves out (`Global.feature_normalize`, `Global.sim_block_size`, ...) are
added by `jaxrec.config.defaults.fill`, which documents each one; they can be overridden here
like any other key.

`DataLoader.Train.sampler.batch_size` is per device, as in the reference (per GPU): the global
batch is batch_size x number of devices. LR 0.06 is tuned for 8 x 256.

`Global.pretrained_model` may be a jaxrec model directory or a PaddleClas `.pdparams` file.
`Arch.Backbone.pretrained=True` asks for ImageNet initialization: jaxrec downloads nothing, so
convert `PPLCNetV2_base_ssld_pretrained.pdparams` with `python -m jaxrec.convert` and pass it as
`Global.pretrained_model` (non-matching keys are skipped with a message), or set
`Arch.Backbone.pretrained=False` to train from scratch.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from jaxrec.config import defaults

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
    """The reference train chain (ref §6.3) at `size`."""
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
    """The reference eval chain (ref §6.4) at `size`."""
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


def get_config(size: str | None = None) -> ml_collections.ConfigDict:
    """The recipe; `size` (the text after `general_v2.py:`) sets the square input size."""
    size = int(size) if size else 224
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
            "image_shape": (3, size, size),
            "save_inference_dir": "./inference",
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
                    "transform_ops": train_transform_ops(size),
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
                "Query": eval_set(
                    "./dataset/Aliproduct/", "./dataset/Aliproduct/val_list.txt", size
                ),
                "Gallery": eval_set(
                    "./dataset/Aliproduct/", "./dataset/Aliproduct/val_list.txt", size
                ),
            },
        }
    )
    c.Metric = _C({"Eval": [_C({"Recallk": {"topk": (1, 5)}}), _C({"mAP": {}})]})
    return defaults.fill(c)
