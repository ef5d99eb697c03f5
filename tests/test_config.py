"""Configs: general_v2 mirrors the PaddleClas YAML; overrides via config_flags; the resolver
honours every key or rejects it by name; the inert table is quoted in docs/CONFIG.md."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_collections
import pytest

from jaxrec import config as config_lib
from jaxrec.config import defaults, keys, resolve
from jaxrec.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))

import general_v2  # noqa: E402


def _reference_yaml(path: str):
    yaml = pytest.importorskip("yaml")
    with open(path) as f:
        return _normalize(yaml.safe_load(f))


def _normalize(x):
    if isinstance(x, dict):
        return {k: _normalize(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_normalize(v) for v in x]
    return x


def test_general_v2_matches_the_reference_yaml(reference_yaml):
    ref = _reference_yaml(reference_yaml)
    ours = config_lib.to_plain(general_v2.get_config())

    def check(r, o, path):
        if isinstance(r, dict):
            assert isinstance(o, dict), path
            for k, v in r.items():
                assert k in o, f"missing key {path}.{k}"
                check(v, o[k], f"{path}.{k}")
        elif isinstance(r, list):
            assert isinstance(o, list) and len(o) == len(r), path
            for i, (a, b) in enumerate(zip(r, o, strict=True)):
                check(a, b, f"{path}[{i}]")
        else:
            assert o == r, f"{path}: {o!r} != {r!r}"

    check(ref, ours, "")
    # The check above can fail: a changed leaf is caught.
    broken = _normalize(config_lib.to_plain(general_v2.get_config()))
    broken["Optimizer"]["lr"]["learning_rate"] = 0.05
    with pytest.raises(AssertionError, match="Optimizer.lr.learning_rate"):
        check(ref, broken, "")


def test_the_test_fixture_yaml_is_the_reference_recipe(reference_yaml):
    """tests/fixtures/paddleclas/general_v2_base.yaml (written for the YAML-reader tests) holds
    the same values as PaddleClas's file."""
    yaml = pytest.importorskip("yaml")
    with open(os.path.join(REPO, "tests", "fixtures", "paddleclas", "general_v2_base.yaml")) as f:
        assert _normalize(yaml.safe_load(f)) == _reference_yaml(reference_yaml)


def test_key_values_of_the_recipe():
    c = general_v2.get_config()
    assert c.Optimizer.lr.learning_rate == 0.06 and c.Optimizer.lr.warmup_epoch == 5
    assert c.Optimizer.regularizer.coeff == 1e-5 and c.Optimizer.momentum == 0.9
    assert c.Arch.Neck.bias_attr.learning_rate == 1e-20
    assert c.Arch.Head.class_num == 192612
    assert c.Loss.Train[0].CELoss.epsilon == 0.1
    assert c.Loss.Train[1].TripletAngularMarginLoss.an_value == 0.4
    assert c.DataLoader.Train.sampler.id_list == (50030, 80700, 92019, 96015)
    assert c.Global.seed == 0 and c.AMP.dtype == "bfloat16"


def test_plain_round_trip_and_diff():
    c = general_v2.get_config()
    plain = config_lib.to_plain(c)
    back = config_lib.to_plain(config_lib.from_plain(plain))
    assert back == plain
    c2 = config_lib.from_plain(plain)
    c2.Global.epochs = 3
    c2.Loss.Train[1].TripletAngularMarginLoss.margin = 0.3
    diff = config_lib.config_diff(plain, config_lib.to_plain(c2))
    assert diff == [
        "Global.epochs: 100 -> 3",
        "Loss.Train[1].TripletAngularMarginLoss.margin: 0.5 -> 0.3",
    ]


PRINT = """
import sys
from absl import app
from ml_collections import config_flags
from jaxrec.config.flags import parse_flags_with_config_errors
_C = config_flags.DEFINE_config_file("config", None, "cfg", lock_config=True)
def main(_):
    c = _C.value
    print(c.Global.epochs, c.Loss.Train[1].TripletAngularMarginLoss.margin,
          c.Global.image_shape, c.Global.pretrained_model, c.Optimizer.lr.warmup_epoch)
app.run(main, flags_parser=parse_flags_with_config_errors)
"""


def _run(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-c", PRINT, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )


def test_command_line_overrides():
    p = _run(
        "--config=configs/general_v2.py",
        "--config.Global.epochs=2",
        "--config.Loss.Train[1].TripletAngularMarginLoss.margin=0.3",
        "--config.Global.image_shape=(3, 64, 64)",
        "--config.Global.pretrained_model=/m",
        "--config.Optimizer.lr.warmup_epoch=0.5",
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["2", "0.3", "(3,", "64,", "64)", "/m", "0.5"]


def test_unknown_key_is_a_clear_error():
    p = _run("--config=configs/general_v2.py", "--config.Global.epoch=2")
    assert p.returncode == 2
    assert "unknown config key" in p.stderr and "Global.epoch" in p.stderr


def test_demo_config_builds_and_resolves():
    import demo

    c = demo.get_config()
    assert c.Arch.Head.class_num == 6
    assert os.path.exists(c.DataLoader.Train.dataset.cls_label_path)
    assert c.DataLoader.Train.sampler.batch_size // c.DataLoader.Train.sampler.sample_per_id <= 6
    run = resolve(c)
    assert run.image_size == 48 and run.preprocess.input_size == (48, 48)
    assert run.train.transform.size == 48 and run.train.transform.pad == 3


def _recipe():
    c = general_v2.get_config()
    c.Arch.Backbone.pretrained = False
    return c


def test_recipe_resolves_to_the_reference_run():
    run = resolve(_recipe())
    assert run.optim.lr.learning_rate == 0.06 and run.optim.lr.warmup_epoch == 5
    assert run.optim.weight_decay == 1e-5 and run.optim.freeze_neck_bias
    t = run.train.transform
    assert (t.size, t.flip, t.pad, t.crop, t.rotate_prob, t.degrees) == (
        224,
        True,
        10,
        True,
        0.5,
        90,
    )
    assert run.train.sampler.sample_method == "id_avg_prob"
    assert run.train.sampler.id_list == (50030, 80700, 92019, 96015)
    assert run.eval.keys == ("recall1", "recall5", "mAP") and run.eval.best_metric == "recall1"
    assert run.eval.data.same_lists and run.eval.block_size == 64
    assert run.preprocess.input_size == (224, 224) and run.preprocess.scale == 1 / 255
    assert run.loop.checkpoint_every_steps == 1000 and run.compute_dtype == "float32"


def test_size_argument_changes_every_resize_together():
    c = general_v2.get_config("112")
    c.Arch.Backbone.pretrained = False
    run = resolve(c)
    assert run.image_size == 112 and run.train.transform.size == 112
    assert run.preprocess.input_size == (112, 112)


def test_normalize_image_is_honoured_in_train_and_eval():
    c = _recipe()
    for op in c.DataLoader.Train.dataset.transform_ops:
        if "NormalizeImage" in op:
            op.NormalizeImage.mean = (0.5, 0.5, 0.5)
            op.NormalizeImage.std = (0.25, 0.25, 0.25)
            op.NormalizeImage.scale = "1/127.5"
    for part in ("Query", "Gallery"):
        for op in c.DataLoader.Eval[part].dataset.transform_ops:
            if "NormalizeImage" in op:
                op.NormalizeImage.mean = (0.1, 0.2, 0.3)
    run = resolve(c)
    assert run.train.pixel.mean == (0.5, 0.5, 0.5) and run.train.pixel.std == (0.25,) * 3
    assert run.train.pixel.scale == pytest.approx(1 / 127.5)
    assert run.preprocess.mean == (0.1, 0.2, 0.3)


def _error(mutate) -> ConfigError:
    c = _recipe()
    mutate(c)
    with pytest.raises(ConfigError) as err:
        resolve(c)
    return err.value


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda c: setattr(c.AMP, "level", "O2"), "AMP.level"),
        (lambda c: setattr(c.AMP, "dtype", "float16"), "AMP.dtype"),
        (lambda c: setattr(c.Global, "eval_mode", "classification"), "Global.eval_mode"),
        (lambda c: setattr(c.Global, "use_dali", True), "Global.use_dali"),
        (lambda c: setattr(c.Optimizer, "name", "AdamW"), "Optimizer.name"),
        (
            lambda c: setattr(c.Arch.Neck.bias_attr, "learning_rate", 0.1),
            "Arch.Neck.bias_attr.learning_rate",
        ),
        (
            lambda c: c.DataLoader.Train.dataset.transform_ops[2].RandFlipImage.update(
                {"flip_code": 0}
            ),
            "DataLoader.Train.dataset.transform_ops[2].RandFlipImage.flip_code",
        ),
        (
            lambda c: c.DataLoader.Train.dataset.transform_ops[1].ResizeImage.update(
                {"interpolation": "bicubic"}
            ),
            "DataLoader.Train.dataset.transform_ops[1].ResizeImage.interpolation",
        ),
        (
            lambda c: c.DataLoader.Eval.Query.dataset.transform_ops[1].ResizeImage.update(
                {"backend": "pil"}
            ),
            "DataLoader.Eval.Query.dataset.transform_ops[1].ResizeImage.backend",
        ),
        (
            lambda c: c.DataLoader.Eval.Query.sampler.update({"drop_last": True}),
            "DataLoader.Eval.Query.sampler.drop_last",
        ),
        (lambda c: setattr(c.Global, "image_shape", (3, 64, 64)), "Global.image_shape"),
        (lambda c: setattr(c.Arch.Backbone, "pretrained", True), "Arch.Backbone.pretrained"),
        (lambda c: c.Global.update({"sim_block_sizee": 3}), "Global.sim_block_sizee"),
        (
            lambda c: c.DataLoader.Train.dataset.transform_ops[1].ResizeImage.update({"foo": 1}),
            "DataLoader.Train.dataset.transform_ops[1].ResizeImage.foo",
        ),
        (
            lambda c: c.DataLoader.Train.dataset.transform_ops.insert(
                1, ml_collections.ConfigDict({"AutoAugment": {}})
            ),
            "DataLoader.Train.dataset.transform_ops[1].AutoAugment",
        ),
    ],
)
def test_unsupported_mirrored_keys_are_errors_naming_the_key(mutate, key):
    err = _error(mutate)
    assert err.key == key, str(err)
    assert str(err).startswith(key)


def test_inert_keys_are_accepted_and_change_nothing():
    base = resolve(_recipe())
    c = _recipe()
    c.Global.output_dir = "/elsewhere"
    c.Global.device = "cpu"
    c.Global.use_visualdl = True
    c.AMP.scale_loss = 1024.0
    c.DataLoader.Eval.Query.sampler.shuffle = True
    run = resolve(c)
    assert (run.train, run.eval, run.optim, run.loop) == (
        base.train,
        base.eval,
        base.optim,
        base.loop,
    )


def test_every_inert_key_is_documented():
    doc = open(os.path.join(REPO, "docs", "CONFIG.md")).read()
    for key in keys.INERT:
        assert f"`{key}`" in doc, key
    for section, table in defaults.JAXREC_KEYS.items():
        for k in table:
            assert f"`{section}.{k}`" in doc, k


def test_paddleclas_sync_bn_switch_is_honoured():
    c = _recipe()
    assert not resolve(c).sync_bn
    c.Arch.use_sync_bn = True  # PaddleClas's key; Global.sync_bn is jaxrec's
    run = resolve(c)
    assert run.sync_bn and "use_sync_bn" not in run.arch
    assert run.model_arch(training=True, axis_name="data")["bn_axis_name"] == "data"
