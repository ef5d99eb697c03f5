"""Training from a prepared set is a config switch: name PreparedDataset + prepared_dir, also
from the command line; a list in the config must be the one the set was prepared from."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest
from train_data_util import assert_same_batches, make_tiny_dataset, tiny_config

from jaxrec import inputs
from jaxrec.config import resolve
from jaxrec.errors import ConfigError, DatasetError
from jaxrec.parallel import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def prepared(tmp_path):
    data = make_tiny_dataset(str(tmp_path / "d"), train_classes=4, per_class=4)
    out = tmp_path / "prep"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxrec.prepare",
            "--list",
            data["train"],
            "--out",
            str(out),
            "--size",
            "32",
            "--codec",
            "raw",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    return data, str(out)


def _config(data, prepared_dir):
    cfg = tiny_config(data)
    cfg.DataLoader.Train.dataset.name = "PreparedDataset"
    cfg.DataLoader.Train.dataset.prepared_dir = prepared_dir  # a placeholder: settable by flag
    return cfg


def test_prepared_set_feeds_the_same_batches_as_the_list(prepared):
    data, out = prepared
    mesh = make_mesh(jax.devices()[:1])
    a = inputs.train_loader(resolve(tiny_config(data)).train, mesh, seed=0, class_num=4)
    b = inputs.train_loader(resolve(_config(data, out)).train, mesh, seed=0, class_num=4)
    assert_same_batches(a, b, 2)


def test_prepared_from_another_list_is_an_error(prepared, tmp_path):
    data, out = prepared
    other = tmp_path / "other.txt"
    other.write_text("\n".join(open(data["train"]).read().splitlines()[:-2]) + "\n")
    cfg = _config(data, out)
    cfg.DataLoader.Train.dataset.cls_label_path = str(other)
    with pytest.raises(DatasetError, match="was not prepared from"):
        inputs.train_loader(resolve(cfg).train, make_mesh(jax.devices()[:1]), seed=0)


def test_prepared_dir_key_rules(prepared):
    data, out = prepared
    cfg = _config(data, out)
    cfg.DataLoader.Train.dataset.name = "ImageNetDataset"
    with pytest.raises(ConfigError, match="prepared_dir: is only read with name PreparedDataset"):
        resolve(cfg)
    cfg = _config(data, None)
    with pytest.raises(ConfigError, match="prepared_dir: is required"):
        resolve(cfg)
