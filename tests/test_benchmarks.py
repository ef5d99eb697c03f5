"""The standard retrieval benchmarks by name: TFDSDataset in the config, the CUB/Cars/SOP
protocol configs (classes and splits), the prepared-set path from tfds, the missing-data error,
the class-disjoint hold-out for lists and folders, and an end-to-end run on a protocol config.

The tfds sets are small stand-ins built offline under the real names and features
(tests/tfds_benchmarks_util.py), so the configs are used as shipped, only `data_dir` (from
$TFDS_DATA_DIR) and the model size changed."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tfds_benchmarks_util as mock
from train_data_util import assert_same_batches, make_tiny_dataset, tiny_config

from jaxrec import holdout, inputs
from jaxrec import prepare as prepare_cli
from jaxrec.config import defaults, resolve
from jaxrec.errors import ConfigError, DatasetError
from jaxrec.parallel import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))

pytest.importorskip("tensorflow_datasets")

# config module, tfds name, label key, train/eval classes (inclusive label ranges) and the
# images per side in the stand-ins.
PROTOCOLS = {
    "cub200": ("caltech_birds2011", "label", (0, 99), (100, 199), 400, 400),
    "cars196": ("cars196", "label", (0, 97), (98, 195), 392, 392),
    "sop": ("stanford_online_products", "class_id", (0, 11317), (11318, 22633), 24, 20),
}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    for name, *_ in PROTOCOLS.values():
        mock.build(name, str(root))
    return str(root)


def _protocol(module: str, tfds_dir: str, monkeypatch, prepared_dir: str | None = None):
    monkeypatch.setenv("TFDS_DATA_DIR", tfds_dir)
    return importlib.import_module(module).get_config(prepared_dir)


def _shrink(cfg, size: int = 32, epochs: int = 1):
    """The protocol config with tiny inputs and model, as tests/train_data_util.tiny_config."""
    import general_v2

    cfg.Global.epochs = epochs
    cfg.Global.image_shape = (3, size, size)
    cfg.Global.print_batch_step = 1
    cfg.Global.checkpoint_every_steps = 0
    cfg.Arch.Backbone.scale = 0.25
    cfg.Arch.Backbone.depths = (1, 1, 1, 1)
    cfg.Arch.Backbone.class_expand = 16
    cfg.Arch.Neck.num_features = 16
    cfg.Arch.Head.embedding_size = 16
    cfg.Optimizer.lr.warmup_epoch = 0.0
    tr = cfg.DataLoader.Train
    tr.dataset.transform_ops = general_v2.train_transform_ops(size, padding=2)
    tr.sampler.batch_size = 8
    tr.sampler.sample_per_id = 2
    tr.loader.num_workers = 1
    for part in ("Query", "Gallery"):
        ev = cfg.DataLoader.Eval[part]
        ev.dataset.transform_ops = general_v2.eval_transform_ops(size)
        ev.sampler.batch_size = 64
        ev.loader.num_workers = 1
    return cfg


@pytest.mark.parametrize("module", sorted(PROTOCOLS))
def test_protocol_config_selects_classes_and_splits(module, tfds_dir, monkeypatch):
    name, label_key, train_cls, eval_cls, n_train, n_eval = PROTOCOLS[module]
    run = resolve(_protocol(module, tfds_dir, monkeypatch))
    t, q = run.train.dataset, run.eval.data.query
    assert (t.kind, t.tfds.name, t.tfds.label_key, t.classes, t.relabel) == (
        "TFDSDataset",
        name,
        label_key,
        train_cls,
        True,
    )
    assert (q.kind, q.tfds.name, q.classes) == ("TFDSDataset", name, eval_cls)
    split = {"sop": ("train", "test")}.get(module, ("train+test", "train+test"))
    assert (t.tfds.split, q.tfds.split) == split
    assert t.tfds.data_dir == tfds_dir
    assert run.eval.data.same_lists  # query == gallery
    assert run.eval.drop_excluded  # each query leaves its own ranking
    assert run.arch["Head"]["class_num"] == train_cls[1] - train_cls[0] + 1
    assert run.eval.keys == ("recall1", "recall2", "recall4", "recall8", "mAP", "MAP@R")

    train = inputs.load_source(t)
    query, gallery = inputs.eval_sources(run.eval.data)
    assert query is gallery and (len(train), len(query)) == (n_train, n_eval)
    # The original labels behind the relabelled training set, read straight from tfds.
    raw = inputs.load_source(
        type(t)(t.key, t.kind, tfds=t.tfds)  # no classes, no relabel
    )
    kept = raw.labels[(raw.labels >= train_cls[0]) & (raw.labels <= train_cls[1])]
    np.testing.assert_array_equal(np.unique(train.labels), np.arange(np.unique(kept).size))
    assert np.unique(train.labels).size == {"sop": 6}.get(module, train_cls[1] + 1)
    lo, hi = eval_cls
    assert lo <= query.labels.min() and query.labels.max() <= hi
    expected = {"sop": set(mock.SOP_TEST)}.get(module, set(range(lo, hi + 1)))
    assert set(query.labels.tolist()) == expected
    np.testing.assert_array_equal(query.uids, np.arange(len(query)))  # no image finds itself


def test_missing_tfds_data_is_one_error_line_with_the_command(tmp_path, monkeypatch):
    run = resolve(_protocol("cub200", str(tmp_path / "nowhere"), monkeypatch))
    with pytest.raises(DatasetError) as err:
        inputs.load_source(run.train.dataset)
    msg = str(err.value)
    assert "\n" not in msg
    assert "'caltech_birds2011'" in msg and str(tmp_path / "nowhere") in msg
    assert "tfds build caltech_birds2011 --file_format=array_record" in msg
    # The CLIs print it as one `error:` line.
    p = subprocess.run(
        [sys.executable, "-m", "jaxrec.prepare", "--tfds", "cars196", "--data-dir",
         str(tmp_path), "--out", str(tmp_path / "o"), "--size", "32", "--quiet"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tfds dataset 'cars196'"), p.stderr
    assert "tfds build cars196" in lines[0]


def test_prepared_from_tfds_gives_the_same_batches(tfds_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "cub_train_32")
    rc = prepare_cli.main(
        ["--tfds", "caltech_birds2011", "--split", "train+test", "--data-dir", tfds_dir,
         "--classes", "0", "99", "--out", out, "--size", "32", "--codec", "raw", "--quiet"]
    )  # fmt: skip
    assert rc == 0
    direct = resolve(_shrink(_protocol("cub200", tfds_dir, monkeypatch)))
    prepared = resolve(_shrink(_protocol("cub200", tfds_dir, monkeypatch, prepared_dir=out)))
    assert prepared.train.dataset.kind == "PreparedDataset"
    assert prepared.train.dataset.classes == (0, 99)
    mesh = make_mesh(jax.devices()[:2])
    a = inputs.train_loader(direct.train, mesh, seed=3, class_num=100)
    b = inputs.train_loader(prepared.train, mesh, seed=3, class_num=100)
    assert len(a.source) == len(b.source) == 400
    assert_same_batches(a, b, 3)


def test_tfds_dataset_keys_are_honoured_or_rejected(tfds_dir, monkeypatch):
    cfg = _protocol("cub200", tfds_dir, monkeypatch)
    cfg.DataLoader.Train.dataset.image_root = "/data"
    with pytest.raises(ConfigError, match=r"Train\.dataset\.image_root: is not read with name "):
        resolve(cfg)
    cfg = _protocol("cub200", tfds_dir, monkeypatch)
    cfg.DataLoader.Train.dataset.split = ""
    with pytest.raises(ConfigError, match=r"Train\.dataset\.split: is required"):
        resolve(cfg)
    cfg = _protocol("cub200", tfds_dir, monkeypatch)
    cfg.DataLoader.Train.dataset.classes = (5, 2)
    with pytest.raises(ConfigError, match=r"Train\.dataset\.classes: \[5, 2\]: give"):
        resolve(cfg)
    cfg = _protocol("cub200", tfds_dir, monkeypatch)
    cfg.DataLoader.Train.dataset.classes = (300, 400)
    with pytest.raises(DatasetError, match=r"Train\.dataset\.classes: \[300, 400\] selects no"):
        inputs.load_source(resolve(cfg).train.dataset)
    cfg = _protocol("cub200", tfds_dir, monkeypatch)
    cfg.Global.re_ranking = True
    with pytest.raises(ConfigError, match="drop_excluded: is not implemented with Global.re_"):
        resolve(cfg)
    cfg = tiny_config({"root": "/d", "train": "/d/t.txt", "eval": "/d/e.txt", "num_classes": 2})
    cfg.DataLoader.Train.dataset.tfds_name = "cars196"
    with pytest.raises(ConfigError, match="tfds_name: is only read with name TFDSDataset"):
        resolve(cfg)


def test_tfds_and_dataset_keys_are_documented():
    doc = open(os.path.join(REPO, "docs", "CONFIG.md")).read()
    for k in (*defaults.TFDS_KEYS, *defaults.DATASET_KEYS):
        assert f"`{k}`" in doc, k
    assert "`MAP@R`" in doc
    readme = open(os.path.join(REPO, "README.md")).read()
    assert "## Standard benchmarks" in readme


def test_holdout_classes_for_a_list_and_a_folder(tmp_path):
    data = make_tiny_dataset(str(tmp_path / "d"), train_classes=4, eval_classes=2, per_class=3)
    both = tmp_path / "all.txt"
    rows = open(data["train"]).read().splitlines() + [
        " ".join(r.split()[:2]) for r in open(data["eval"]).read().splitlines()
    ]
    both.write_text("\n".join(rows) + "\n")
    out = tmp_path / "split"
    rc = holdout.main(
        ["--list", str(both), "--image-root", data["root"], "--holdout-classes", "0.34",
         "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    train = [r.split() for r in (out / holdout.TRAIN_LIST).read_text().splitlines()]
    held = [r.split() for r in (out / holdout.EVAL_LIST).read_text().splitlines()]
    assert {int(r[1]) for r in train} == {0, 1, 2, 3} and {int(r[1]) for r in held} == {4, 5}
    assert [int(r[2]) for r in held] == list(range(6)) and len(train) == 12
    assert all(os.path.isfile(r[0]) for r in train + held)
    # The lists feed a config as they are: relabelled training set, query == gallery.
    cfg = tiny_config({"root": str(out), "train": str(out / holdout.TRAIN_LIST),
                       "eval": str(out / holdout.EVAL_LIST), "num_classes": 4})  # fmt: skip
    cfg.DataLoader.Train.dataset.relabel = True
    run = resolve(cfg)
    assert inputs.load_source(run.train.dataset).num_classes == 4
    query, gallery = inputs.eval_sources(run.eval.data)
    assert query is gallery and len(set(query.uids.tolist())) == 6
    # A folder, by count; and what cannot be split.
    folder = tmp_path / "folder"
    for c in range(3):
        (folder / f"class{c}").mkdir(parents=True)
        for k in range(2):
            os.link(os.path.join(data["root"], "images", f"c{c}_{k}.png"),
                    folder / f"class{c}" / f"{k}.png")  # fmt: skip
    rc = holdout.main(["--folder", str(folder), "--holdout-classes", "1", "--out", str(out)])
    assert rc == 0
    assert len((out / holdout.EVAL_LIST).read_text().splitlines()) == 2
    for bad in ("3", "0", "1.5"):
        assert (
            holdout.main(["--folder", str(folder), "--holdout-classes", bad, "--out", str(out)])
            == 1
        )


@pytest.mark.slow
def test_protocol_config_trains_and_evaluates_end_to_end(tfds_dir, tmp_path, monkeypatch):
    from jaxrec.evaluate import evaluate_workdir
    from jaxrec.training import loop as trainer

    cfg = _shrink(_protocol("cub200", tfds_dir, monkeypatch), epochs=1)
    cfg.Global.eval_during_train = True
    workdir = str(tmp_path / "run")
    metrics = trainer.train(cfg, workdir)
    keys = ["recall1", "recall2", "recall4", "recall8", "mAP", "MAP@R"]
    assert list(metrics) == keys  # the evaluation at the end of the epoch
    res = evaluate_workdir(workdir, which="latest", output=str(tmp_path / "eval"), num_visualize=2)
    m = res["metrics"]
    print("cub200 stand-in, 1 epoch:", {k: round(v, 4) for k, v in m.items()})
    assert m == pytest.approx(metrics, abs=1e-6)
    assert all(0.0 <= m[k] <= 1.0 for k in keys)
    assert m["recall1"] <= m["recall2"] <= m["recall4"] <= m["recall8"]
    # 4 images per class: a random ranking of 399 others puts one of 3 relevant first ~1% of
    # the time; the class colours make that far higher even after one epoch.
    assert m["recall8"] > 0.1
    assert os.path.getsize(res["png"]) > 0


def test_paddleclas_yaml_of_a_protocol_config_says_what_paddleclas_needs(tfds_dir, monkeypatch):
    from jaxrec.paddle.yaml_out import paddleclas_yaml

    text = paddleclas_yaml(_protocol("cub200", tfds_dir, monkeypatch))
    notes = [line for line in text.splitlines() if line.startswith("#")]
    for part in ("Train", "Eval.Query", "Eval.Gallery"):
        assert any(f"DataLoader.{part}.dataset is a jaxrec TFDSDataset" in n for n in notes), part
        assert any(f"DataLoader.{part}.dataset.classes: [" in n for n in notes), part
    assert any("Metric.Eval MAP@R is jaxrec's metric" in n for n in notes)


def test_uid_key_gives_the_third_column_ids(tfds_dir, monkeypatch):
    cfg = _protocol("sop", tfds_dir, monkeypatch)
    for part in ("Query", "Gallery"):
        cfg.DataLoader.Eval[part].dataset.uid_key = "super_class_id/num"
    run = resolve(cfg)
    query, gallery = inputs.eval_sources(run.eval.data)
    assert query is gallery
    np.testing.assert_array_equal(query.uids, query.labels % 12)  # the stand-in's super class


@pytest.mark.slow
def test_train_py_names_the_missing_dataset_in_one_line(tmp_path):
    env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "empty"))
    p = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/sop.py", "--workdir",
         str(tmp_path / "run")],
        capture_output=True, text=True, cwd=REPO, timeout=300, env=env,
    )  # fmt: skip
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("error: tfds dataset 'stanford_online_products' is not prepared")
    assert "tfds build stanford_online_products" in lines[-1]
    assert not (tmp_path / "run").exists()
