"""PaddleClas config out: a run's config as a PaddleClas YAML that reads back into the same run
(jaxrec-only keys aside), and PP-ShiTu's inference_rec.yaml with the model's own preprocessing.
The PaddleClas-side checks (its config loader, build_model, deploy ops) are in
tools/paddle_config_check.py (Paddle venv)."""

from __future__ import annotations

import os
import sys

import pytest
import yaml

from jaxrec.config import defaults, resolve
from jaxrec.config.chains import eval_chain
from jaxrec.config.keys import Reader
from jaxrec.data.preprocess import INFERENCE_REC, LEGACY, Preprocess
from jaxrec.models import build_model
from jaxrec.paddle.yaml_in import load_yaml
from jaxrec.paddle.yaml_out import (
    DROPPED,
    NATIVE,
    PADDLECLAS_YAML,
    inference_rec_yaml,
    paddleclas_yaml,
    save_inference_rec_yaml,
    save_paddleclas_yaml,
)
from jaxrec.training.workdir import load_config, save_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))

import demo  # noqa: E402
import general_v2  # noqa: E402

FIELDS = ("arch", "loss", "optim", "train", "eval", "loop", "seed", "compute_dtype", "sync_bn")


def _config(name: str):
    c = {"demo": demo, "general_v2": general_v2}[name].get_config()
    c.Global.pretrained_model = "/nonexistent/PPLCNetV2_base_ssld_pretrained.pdparams"
    return c


def _reset_dropped(c):
    """The config as a PaddleClas YAML carries it: dropped jaxrec keys at their defaults."""
    for dotted in DROPPED:
        section, key = dotted.rsplit(".", 1)
        node = c
        for part in section.split("."):
            node = node[part]
        node[key] = defaults.JAXREC_KEYS[section][key]
    return c


def _written(tmp_path, config) -> str:
    path = tmp_path / "paddleclas.yaml"
    path.write_text(paddleclas_yaml(config))
    return str(path)


@pytest.mark.parametrize("name", ["general_v2", "demo"])
def test_round_trip_resolves_to_the_same_run(tmp_path, name):
    back = resolve(load_yaml(_written(tmp_path, _config(name))))
    want = resolve(_reset_dropped(_config(name)))
    for field in FIELDS:
        assert getattr(back, field) == getattr(want, field), field


def test_demo_loses_only_the_dropped_jaxrec_keys(tmp_path):
    back = resolve(load_yaml(_written(tmp_path, _config("demo"))))
    orig = resolve(_config("demo"))
    assert back.seed == orig.seed and back.arch == orig.arch and back.train == orig.train
    assert orig.loop.checkpoint_every_steps == 200 and back.loop.checkpoint_every_steps == 1000
    assert orig.eval.before_training and not back.eval.before_training


def test_every_jaxrec_key_is_kept_or_dropped_with_a_reason():
    flat = {f"{s}.{k}" for s, keys in defaults.JAXREC_KEYS.items() for k in keys}
    assert flat == set(NATIVE) | set(DROPPED) and not set(NATIVE) & set(DROPPED)


def test_yaml_has_paddleclas_keys_and_value_forms():
    text = paddleclas_yaml(_config("demo"))
    tree = yaml.safe_load(text)
    assert list(tree) == ["Global", "AMP", "Arch", "Loss", "Optimizer", "DataLoader", "Metric"]
    g = tree["Global"]
    assert g["seed"] == 0 and g["sim_block_size"] == 64 and g["image_shape"] == [3, 48, 48]
    assert g["checkpoints"] is None and "  checkpoints: null\n" in text
    for dotted in DROPPED:
        section, key = dotted.rsplit(".", 1)
        node = tree
        for part in section.split("."):
            node = node[part]
        assert key not in node, dotted
    assert "# Global.checkpoint_every_steps: 200 - " in text
    assert "# Global.eval_before_training: True - " in text
    assert "# AMP.dtype: bfloat16 - " in text
    assert "Arch.Backbone.scale: 0.5 is a jaxrec size extension" in text
    norm = tree["DataLoader"]["Train"]["dataset"]["transform_ops"][-1]["NormalizeImage"]
    assert norm["scale"] == "1.0/255.0" and "scale: 1.0/255.0\n" in text
    assert "size: [48, 48]" in text and "eval_during_train: True" in text
    assert tree["Metric"]["Eval"][1] == {"mAP": {}}
    assert all(len(line) <= 100 for line in text.splitlines() if line.startswith("#"))


def test_whole_epochs_are_ints_fractions_are_noted():
    c = _config("general_v2")
    text = paddleclas_yaml(c)
    assert "  warmup_epoch: 5\n" in text and "  epochs: 100\n" in text
    c.Optimizer.lr.warmup_epoch = 0.5
    text = paddleclas_yaml(c)
    assert "warmup_epoch: 0.5\n" in text and "# Optimizer.lr.warmup_epoch: 0.5 - " in text


def test_plain_config_json_gives_the_same_yaml(tmp_path):
    c = _config("demo")
    save_config(c, tmp_path)
    assert paddleclas_yaml(load_config(tmp_path)) == paddleclas_yaml(c)
    path = save_paddleclas_yaml(load_config(tmp_path), tmp_path)
    assert path == os.path.join(tmp_path, PADDLECLAS_YAML)
    assert open(path).read() == paddleclas_yaml(c)
    assert sorted(os.listdir(tmp_path)) == ["config.json", PADDLECLAS_YAML]  # no temp files


def test_sync_bn_becomes_arch_use_sync_bn():
    c = _config("general_v2")
    c.Global.sync_bn = True
    tree = yaml.safe_load(paddleclas_yaml(c))
    assert tree["Arch"]["use_sync_bn"] is True and "sync_bn" not in tree["Global"]
    assert "use_sync_bn" not in yaml.safe_load(paddleclas_yaml(_config("general_v2")))["Arch"]


def test_parts_paddleclas_cannot_run_are_commented(tmp_path):
    c = _config("general_v2")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    c.Global.pretrained_model = str(model_dir)
    c.DataLoader.Train.dataset = {"name": "PreparedDataset", "prepared_dir": "/p", "relabel": True}
    text = paddleclas_yaml(c)
    assert f"--to-pdparams --model {model_dir} --out {model_dir}.pdparams" in text
    assert "PreparedDataset, which PaddleClas does not" in text
    assert yaml.safe_load(text)["Global"]["pretrained_model"] == str(model_dir)
    assert "size extension" not in text


def test_backbone_size_keys_paddleclas_builds_in_are_dropped(tmp_path):
    c = _config("demo")
    c.Arch.Backbone.scale = 1.0
    c.Arch.Backbone.depths = (2, 2, 6, 2)
    text = paddleclas_yaml(c)
    backbone = yaml.safe_load(text)["Arch"]["Backbone"]
    assert "scale" not in backbone and "depths" not in backbone
    assert "Arch.Backbone.scale: 1.0 dropped" in text and "size extension" not in text
    back = resolve(load_yaml(_written(tmp_path, c)))
    want = resolve(_reset_dropped(c))
    assert back.arch["Backbone"] == {
        k: v for k, v in want.arch["Backbone"].items() if k not in ("scale", "depths")
    }
    assert build_model(back.arch) == build_model(want.arch)  # the same model


PREPROCESSES = [
    INFERENCE_REC,
    LEGACY,
    Preprocess(resize=(64, 48), scale=0.5 / 255, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)),
    Preprocess(resize=None, resize_short=256, crop=(224, 200)),
]


@pytest.mark.parametrize("pre", PREPROCESSES, ids=["inference_rec", "legacy", "odd", "short"])
def test_inference_rec_yaml_feeds_like_the_model(pre):
    tree = yaml.safe_load(inference_rec_yaml(pre, model_dir_name="/m/export", batch_size=4))
    g = tree["Global"]
    assert g["rec_inference_model_dir"] == "/m/export" and g["batch_size"] == 4
    assert g["use_gpu"] is False and "use_onnx" not in g and tree["RecPostProcess"] is None
    ops = tree["RecPreProcess"]["transform_ops"]
    assert list(ops[0]) == ["ResizeImage"] and ops[-1] == {"ToCHWImage": None}
    assert ops[-2]["NormalizeImage"]["order"] == "hwc"
    # jaxrec's own reading of PaddleClas's eval ops gives the same Preprocess back.
    chain = {"ops": [{"DecodeImage": {"to_rgb": True, "channel_first": False}}, *ops]}
    assert eval_chain(Reader(chain), "ops") == pre


def test_inference_rec_yaml_forms():
    text = inference_rec_yaml(LEGACY, use_onnx=True)
    assert "scale: 1.0/255.0\n" in text and "size: [224, 224]\n" in text
    assert "    - ToCHWImage: null\n" in text and "RecPostProcess: null\n" in text
    tree = yaml.safe_load(text)
    assert tree["Global"]["use_onnx"] is True
    assert tree["Global"]["rec_inference_model_dir"] == "inference"
    ops = yaml.safe_load(inference_rec_yaml(INFERENCE_REC))["RecPreProcess"]["transform_ops"]
    assert ops[1]["NormalizeImage"]["scale"] == 0.00392157


def test_save_inference_rec_yaml(tmp_path):
    path = save_inference_rec_yaml(INFERENCE_REC, tmp_path / "e", batch_size=2)
    assert path == os.path.join(tmp_path / "e", "inference_rec.yaml")
    assert yaml.safe_load(open(path).read())["Global"]["batch_size"] == 2
