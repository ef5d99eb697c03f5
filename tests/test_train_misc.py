"""Cheap checks of train_lib helpers: pretrained merging, config glue, distributed flags."""

from __future__ import annotations

import numpy as np
import pytest
from train_data_util import tiny_config

from jaxrec import train_lib


def test_merge_pretrained_is_non_strict_and_reports():
    variables = {
        "params": {
            "backbone": {"conv": {"kernel": np.zeros((3, 3, 3, 8), np.float32)}},
            "head": {"fc": {"kernel": np.zeros((16, 4), np.float32)}},
        },
        "batch_stats": {"backbone": {"bn": {"mean": np.zeros(8, np.float32)}}},
    }
    loaded = {
        "params": {
            "backbone": {"conv": {"kernel": np.ones((3, 3, 3, 8), np.float32)}},
            "head": {"fc": {"kernel": np.ones((16, 1000), np.float32)}},
            "extra": {"w": np.ones(2, np.float32)},
        },
        "batch_stats": {},
    }
    out, notes = train_lib.merge_pretrained(variables, loaded, "x.pdparams")
    np.testing.assert_array_equal(out["params"]["backbone"]["conv"]["kernel"], 1.0)
    np.testing.assert_array_equal(out["params"]["head"]["fc"]["kernel"], 0.0)
    text = "\n".join(notes)
    assert "head/fc/kernel: shape [16, 1000] in x.pdparams vs [16, 4]" in text
    assert "params/extra/w: in x.pdparams but not in the model" in text
    assert "batch_stats/backbone/bn/mean: missing from x.pdparams" in text


def test_missing_pretrained_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a jaxrec model directory"):
        train_lib.load_pretrained_variables(str(tmp_path / "nope"))


def test_sync_bn_without_model_support_is_a_clear_error():
    cfg = tiny_config({"root": ".", "train": "", "eval": "", "num_classes": 4})
    cfg.Global.sync_bn = True
    try:
        model = train_lib.build_model_from_config(cfg)
    except ValueError as e:  # the model does not accept Arch.bn_axis_name (yet)
        assert "Global.sync_bn=True needs a model" in str(e)
    else:  # the model supports synchronized BN: it must have been built with it
        assert "bn_axis_name" in repr(model) or "data" in repr(model)


def test_config_glue():
    cfg = tiny_config({"root": ".", "train": "", "eval": "", "num_classes": 4})
    assert train_lib.image_size(cfg) == 32
    assert train_lib.topk_from_config(cfg) == (1, 5)
    assert train_lib.freeze_neck_bias(cfg)
    cfg.AMP.use_amp = True
    assert train_lib.arch_dict(cfg)["dtype"] == "bfloat16"
    ops = train_lib.config_lib.to_plain(cfg.DataLoader.Train.dataset.transform_ops)
    t = train_lib.train_transform_from_ops(ops, 32, "x")
    assert (t.size, t.flip, t.pad, t.crop, t.rotate_prob, t.degrees) == (32, True, 2, True, 0.5, 90)
    with pytest.raises(ValueError, match="differs from Global.image_shape"):
        train_lib.train_transform_from_ops(ops, 64, "x")


def test_distributed_flags_must_come_together():
    with pytest.raises(ValueError, match="--process_id"):
        train_lib.maybe_initialize_distributed("127.0.0.1:1234", 2, None)
    assert train_lib.maybe_initialize_distributed() is False  # plain single-machine run
