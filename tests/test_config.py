"""Configs: general_v2 mirrors the PaddleClas YAML; overrides via config_flags; unknown keys."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jaxrec import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))

import general_v2  # noqa: E402

YAML = (
    "/work/PaddleClas/ppcls/configs/GeneralRecognitionV2/GeneralRecognitionV2_PPLCNetV2_base.yaml"
)


def _normalize(x):
    if isinstance(x, dict):
        return {k: _normalize(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_normalize(v) for v in x]
    return x


def test_general_v2_matches_the_reference_yaml():
    yaml = pytest.importorskip("yaml")
    if not os.path.exists(YAML):
        pytest.skip("PaddleClas checkout not available")
    with open(YAML) as f:
        ref = _normalize(yaml.safe_load(f))
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
from jaxrec.config_lib import parse_flags_with_config_errors
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


def test_demo_config_builds():
    import demo

    c = demo.get_config()
    assert c.Arch.Head.class_num == 6
    assert os.path.exists(c.DataLoader.Train.dataset.cls_label_path)
    assert c.DataLoader.Train.sampler.batch_size // c.DataLoader.Train.sampler.sample_per_id <= 6
