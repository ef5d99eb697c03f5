"""PaddleClas YAML in: a YAML recipe resolves exactly like configs/general_v2.py; command-line
overrides work like PaddleClas's `-o`; unsupported parts are errors naming the first one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jaxrec.config import config_diff, resolve, to_plain
from jaxrec.errors import ConfigError
from jaxrec.paddle.yaml_in import load_yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(REPO, "tests", "fixtures", "paddleclas")
sys.path.insert(0, os.path.join(REPO, "configs"))

import general_v2  # noqa: E402


@pytest.mark.parametrize("which", ["fixture", "paddleclas"])
def test_yaml_equals_general_v2_key_for_key(which, request):
    if which == "fixture":
        path = os.path.join(FIX, "general_v2_base.yaml")
    else:
        path = request.getfixturevalue("reference_yaml")
    cfg = load_yaml(path)
    assert config_diff(to_plain(general_v2.get_config()), to_plain(cfg)) == []
    cfg.Arch.Backbone.pretrained = False
    ref = general_v2.get_config()
    ref.Arch.Backbone.pretrained = False
    a, b = resolve(cfg), resolve(ref)
    assert (a.arch, a.loss, a.optim, a.train, a.eval, a.loop) == (
        b.arch,
        b.loss,
        b.optim,
        b.train,
        b.eval,
        b.loop,
    )


def test_unsupported_part_is_named():
    with pytest.raises(ConfigError) as err:
        resolve(load_yaml(os.path.join(FIX, "recognition_v1_style.yaml")))
    assert err.value.key == "Arch.Backbone.name" and "PPLCNet_x2_5" in str(err.value)


def test_bad_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("Global:\n  epochs: 3\n  bad: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_yaml(p)


def test_command_line_overrides_like_paddleclas_o(tmp_path):
    code = (
        "from absl import app\n"
        "from ml_collections import config_flags\n"
        "from jaxrec.config.flags import parse_flags_with_config_errors\n"
        "_C = config_flags.DEFINE_config_file('config', None, 'c', lock_config=True)\n"
        "def main(_):\n"
        "    c = _C.value\n"
        "    print(c.Global.epochs, c.Global.pretrained_model, c.Global.seed,\n"
        "          c.DataLoader.Train.sampler.batch_size)\n"
        "app.run(main, flags_parser=parse_flags_with_config_errors)\n"
    )
    yaml_path = os.path.join(FIX, "general_v2_base.yaml")
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            f"--config=configs/paddleclas_yaml.py:{yaml_path}",
            "--config.Global.epochs=7",
            "--config.Global.pretrained_model=/m/x.pdparams",
            "--config.Global.seed=3",
            "--config.DataLoader.Train.sampler.batch_size=64",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["7", "/m/x.pdparams", "3", "64"]
