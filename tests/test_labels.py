"""Training labels are checked against the classifier head on the host, before any compile:
JAX's out-of-range gathers and one-hots do not raise (a -1 silently trains the last class)."""

from __future__ import annotations

import pytest
from train_data_util import make_tiny_dataset, tiny_config

from jaxrec.errors import LabelError
from jaxrec.training import loop as trainer


def _with_label(tmp_path, line_no: int, label: str):
    data = make_tiny_dataset(str(tmp_path / "d"), train_classes=4, per_class=2)
    lines = open(data["train"]).read().splitlines()
    path, _ = lines[line_no - 1].split(" ")
    lines[line_no - 1] = f"{path} {label}"
    with open(data["train"], "w") as f:
        f.write("\n".join(lines) + "\n")
    cfg = tiny_config(data, epochs=2)
    cfg.DataLoader.Train.dataset.relabel = False
    return data, cfg


@pytest.mark.parametrize("label", ["-1", "4", "1000"])
def test_label_outside_the_head_fails_before_training(tmp_path, label):
    data, cfg = _with_label(tmp_path, 3, label)
    wd = tmp_path / "w"
    with pytest.raises(LabelError) as err:
        trainer.train(cfg, str(wd))
    msg = str(err.value)
    assert f"{data['train']} line 3" in msg
    assert f"label {label} " in msg and "4 classes [0, 3]" in msg
    assert "Arch.Head.class_num" in msg
    assert not wd.exists()  # nothing was trained or written


def test_relabel_maps_any_labels_into_the_head(tmp_path):
    """With relabel, labels become 0..K-1; K > class_num is still caught."""
    data, cfg = _with_label(tmp_path, 1, "-7")
    cfg.DataLoader.Train.dataset.relabel = True
    cfg.Arch.Head.class_num = 3  # the list has 5 distinct labels after the edit
    with pytest.raises(LabelError, match="label 3 .*3 classes.*5 distinct labels"):
        trainer.train(cfg, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()  # nothing was trained or written
