"""Export: deploy model dir, jax.export and ONNX artifacts, and the built-in equality check."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from jaxrec import export as E
from jaxrec.models import (
    abstract_variables,
    build_model,
    load_model_dir,
    save_model_dir,
)

SIZE = 32  # tiny images keep the tests fast; the network is fully convolutional


def tiny_arch(class_expand=32, head=True):
    arch = {
        "name": "RecModel",
        "infer_output_key": "features",
        "infer_add_softmax": False,
        "Backbone": {
            "name": "PPLCNetV2_base_ShiTu",
            "pretrained": False,
            "class_expand": class_expand,
            "scale": 0.25,
            "depths": [1, 1, 2, 2],  # keeps SE, stride-1 rep blocks and the stage-4 shortcut
        },
        "BackboneStopLayer": {"name": "flatten"},
        "Neck": {"name": "BNNeck", "num_features": class_expand},
    }
    if head:
        arch["Head"] = {"name": "FC", "embedding_size": class_expand, "class_num": 7}
    return arch


def random_variables(model, seed):
    """Random variables (He-scaled kernels, random BN statistics and affine params) built from
    the abstract shapes, so that folding is really exercised and no init compile is needed."""
    rng = np.random.default_rng(seed)

    def f(path, s):
        last = getattr(path[-1], "key", "")
        if last == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            return (rng.normal(size=s.shape) * np.sqrt(2.0 / fan_in)).astype(s.dtype)
        if last == "mean":
            return rng.normal(0, 0.3, s.shape).astype(s.dtype)
        if last == "var":
            return rng.uniform(0.3, 2.0, s.shape).astype(s.dtype)
        if last == "scale":
            return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
        return rng.normal(0, 0.2, s.shape).astype(s.dtype)  # biases

    return jax.tree_util.tree_map_with_path(f, abstract_variables(model, image_size=SIZE))


def make_model_dir(path, seed):
    arch = tiny_arch()
    save_model_dir(path, arch, random_variables(build_model(arch), seed))
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    src = make_model_dir(root / "trained", seed=0)
    other = make_model_dir(root / "other", seed=1)
    imgs = root / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        arr = rng.integers(0, 256, size=(40 + 3 * i, 50, 3), dtype=np.uint8)
        Image.fromarray(arr).save(imgs / f"im{i}.jpg", quality=90)
    out = root / "out"
    rc = E.main(
        ["--model", src, "--out", str(out), "--image-size", str(SIZE), "--check-images", str(imgs)]
    )
    return {"rc": rc, "src": src, "other": other, "out": str(out), "imgs": str(imgs)}


def test_export_writes_artifacts_and_passes_check(exported):
    assert exported["rc"] == 0
    out = exported["out"]
    for f in ("config.json", "variables", E.JAX_EXPORT_FILE, E.ONNX_FILE, E.CHECK_FILE):
        assert os.path.exists(os.path.join(out, f)), f
    rep = json.load(open(os.path.join(out, E.CHECK_FILE)))
    assert rep["passed"] and rep["n_images"] == 5
    assert {r["artifact"] for r in rep["results"]} == {"model_dir", "jax_export", "onnx"}
    for r in rep["results"]:
        assert r["ok"] and r["min_cosine"] >= 0.9999 and r["max_abs_err"] < 1e-4 * r["max_abs_ref"]
    # The model dir is the deploy form without the head, loadable by jaxrec.
    model, v, arch = load_model_dir(out)
    assert arch["deploy"] is True and "Head" not in arch and "head" not in v["params"]
    assert "dw_conv" in v["params"]["backbone"]["stages_2_1"]
    assert not any(k.startswith("dw_conv_list") for k in v["params"]["backbone"]["stages_2_1"])


def _reference(exported, images):
    model, v, _ = load_model_dir(exported["src"])
    return E.reference_features(model, v, images)


def test_jax_export_loads_without_jaxrec_and_has_symbolic_batch(exported, tmp_path):
    images = E.load_check_images(None, SIZE)
    ref = _reference(exported, images)
    np.save(tmp_path / "x.npy", images)
    artifact = os.path.join(exported["out"], E.JAX_EXPORT_FILE)
    code = (
        "import sys, numpy as np, jax\n"
        "assert not any(m.startswith('jaxrec') for m in sys.modules)\n"
        f"exp = jax.export.deserialize(bytearray(open({artifact!r}, 'rb').read()))\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        "outs = [np.asarray(exp.call(x[a:b])) for a, b in ((0, 1), (1, 4), (4, 8))]\n"
        "assert not any(m.startswith('jaxrec') for m in sys.modules)\n"
        "print(exp.in_avals[0].shape, exp.platforms)\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, np.concatenate(outs))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "(b, 32, 32, 3)" in res.stdout and "cuda" in res.stdout
    got = np.load(tmp_path / "y.npy")
    assert E.compare("jax", ref, got).ok


def test_onnx_graph_and_runtime(exported):
    import onnx

    proto = onnx.load(os.path.join(exported["out"], E.ONNX_FILE))
    inp = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in inp] == ["batch", 3, SIZE, SIZE]
    ops = {n.op_type for n in proto.graph.node}
    assert ops <= {
        "Conv",
        "Relu",
        "GlobalAveragePool",
        "Sigmoid",
        "Mul",
        "Add",
        "Flatten",
        "Gemm",
        "Identity",
    }
    assert "BatchNormalization" not in ops
    assert any(a.name == "group" and a.i > 1 for n in proto.graph.node for a in n.attribute)
    images = E.load_check_images(None, SIZE)
    ref = _reference(exported, images)
    sess = E.onnx_session(os.path.join(exported["out"], E.ONNX_FILE))
    got = np.concatenate(
        [
            sess.run(["features"], {"x": images[i:j].transpose(0, 3, 1, 2)})[0]
            for i, j in ((0, 1), (1, 6), (6, 8))
        ]
    )
    r = E.compare("onnx", ref, got)
    assert r.ok, r.line()


def test_check_fails_for_wrong_model(exported, capsys):
    rc = E.main(
        [
            "--model",
            exported["other"],
            "--out",
            exported["out"],
            "--check-only",
            "--image-size",
            str(SIZE),
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "EXPORT CHECK FAILED" in err and "jax_export" in err and "onnx" in err
    rep = json.load(open(os.path.join(exported["out"], E.CHECK_FILE)))
    assert not rep["passed"] and not any(r["ok"] for r in rep["results"])


def test_check_fails_for_corrupted_deploy_param_and_onnx(exported, tmp_path, capsys):
    import onnx
    from onnx import numpy_helper

    out = tmp_path / "corrupt"
    shutil.copytree(exported["out"], out)
    # One BN variance in the deploy model dir, off by 30%: only model_dir must fail.
    model, v, arch = load_model_dir(out)
    v = jax.tree_util.tree_map(np.array, v)  # writable copies
    var = v["batch_stats"]["backbone"]["stages_3_1"]["pw_conv"]["bn"]["var"]
    var[3] *= 1.3
    save_model_dir(out, arch, v, overwrite=True)
    # A corrupted ONNX weight: one depthwise tap changed.
    proto = onnx.load(os.path.join(exported["out"], E.ONNX_FILE))
    init = next(
        t
        for t in proto.graph.initializer
        if numpy_helper.to_array(t).ndim == 4 and numpy_helper.to_array(t).shape[1] == 1
    )
    arr = numpy_helper.to_array(init).copy()
    arr[0, 0, 1, 1] += 0.5
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(proto, str(out / E.ONNX_FILE))
    capsys.readouterr()
    rc = E.main(
        ["--model", exported["src"], "--out", str(out), "--check-only", "--image-size", str(SIZE)]
    )
    assert rc == 1
    res = {r["artifact"]: r["ok"] for r in json.load(open(out / E.CHECK_FILE))["results"]}
    assert res == {"model_dir": False, "jax_export": True, "onnx": False}
    assert "EXPORT CHECK FAILED for: model_dir, onnx" in capsys.readouterr().err


def test_compare_rule():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 16))
    assert E.compare("a", ref, ref + 1e-6).ok
    scaled = E.compare("a", ref, ref * 1.01)  # cosine 1, yet 1% off: must fail
    assert scaled.min_cosine > 0.99999 and not scaled.ok
    noisy = E.compare("a", ref, ref + 0.05 * rng.normal(size=ref.shape))
    assert noisy.min_cosine < 0.9999 and not noisy.ok
    assert not E.compare("a", ref, ref[:3]).ok
    assert not E.compare("a", ref, np.full_like(ref, np.nan)).ok


def test_full_size_fold_counts():
    """The folded full ShiTu network has the spec's conv+BN-folded parameter count (2.7)."""
    arch = {
        "name": "RecModel",
        "Backbone": {"name": "PPLCNetV2_base_ShiTu", "class_expand": 512},
        "BackboneStopLayer": {"name": "flatten"},
        "Neck": {"name": "BNNeck", "num_features": 512},
        "Head": {"name": "FC", "embedding_size": 512, "class_num": 10},
    }
    model = build_model(arch)
    zeros = jax.tree_util.tree_map(lambda s: np.ones(s.shape, s.dtype), abstract_variables(model))
    ops = E.fold_network(model, zeros)
    summary = E.ops_summary(ops)
    assert summary["params"] == 4_549_184
    assert summary["conv"] == 33 and summary["se"] == 6 and summary["dense"] == 1
    assert [op["op"] for op in ops[-2:]] == ["pool", "dense"]
    assert ops[-1]["w"].shape == (1024, 512)


def test_fold_matches_dropout_and_bnneck_algebra():
    """dense(pool) == BNNeck(0.8 * last_conv(pool)) computed by hand from the variables."""
    arch = tiny_arch(head=False)
    model = build_model(arch)
    v = random_variables(model, 3)
    ops = E.fold_network(model, v)
    lc = v["params"]["backbone"]["last_conv"]
    bn_p, bn_s = v["params"]["neck"]["feat_bn"], v["batch_stats"]["neck"]["feat_bn"]
    pooled = np.random.default_rng(0).normal(size=(3, lc["kernel"].shape[2]))
    y = 0.8 * (pooled @ np.asarray(lc["kernel"])[0, 0] + np.asarray(lc["bias"]))
    want = (y - bn_s["mean"]) / np.sqrt(bn_s["var"] + 1e-5) * bn_p["scale"] + bn_p["bias"]
    got = pooled @ ops[-1]["w"] + ops[-1]["b"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_source_is_reported(tmp_path, capsys):
    assert E.main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not a jaxrec model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        E.main(["--out", str(tmp_path / "o")])  # needs --model or --workdir


def _write_workdir(wd, arch, variables, use_train_lib):
    """A training workdir as train.py writes it: config.json + orbax checkpoints of the state."""
    import jax.numpy as jnp
    import optax

    params = {"model": variables["params"], "loss": {}}
    state = {
        "step": jnp.asarray(7, jnp.int32),
        "params": params,
        "batch_stats": variables["batch_stats"],
        "opt_state": optax.sgd(0.1, momentum=0.9).init(params),
    }
    state = jax.tree_util.tree_map(jnp.asarray, state)
    wd.mkdir()
    (wd / "config.json").write_text(json.dumps({"Arch": arch, "Global": {"epochs": 1}}))
    if use_train_lib:
        train_lib = pytest.importorskip("jaxrec.train_lib")
        ts = train_lib.TrainState(**state)
        ck = train_lib.Checkpoints(str(wd))
        ck.save(3, ts, {"epoch": 0})
        ck.save(7, ts, {"epoch": 1})
        ck.close()
    else:
        import orbax.checkpoint as ocp

        mgr = ocp.CheckpointManager(
            str(wd / "checkpoints"),
            options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
            item_names=("state", "meta"),
        )
        host = jax.tree_util.tree_map(np.asarray, state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave({"epoch": 1})
        )
        mgr.save(7, args=args)
        mgr.wait_until_finished()
        mgr.close()


@pytest.mark.parametrize("use_train_lib", [False, True])
def test_export_from_workdir(tmp_path, capsys, use_train_lib):
    arch = tiny_arch()
    model = build_model(arch)
    v = random_variables(model, 4)
    wd = tmp_path / "run"
    _write_workdir(wd, arch, v, use_train_lib)
    got_model, got_v, got_arch, desc = E.load_workdir(str(wd))
    assert "step 7" in desc and "no best checkpoint" in capsys.readouterr().out
    for a, b in zip(jax.tree_util.tree_leaves(got_v), jax.tree_util.tree_leaves(v), strict=True):
        np.testing.assert_array_equal(a, b)
    out = tmp_path / "out"
    rc = E.main(["--workdir", str(wd), "--out", str(out), "--image-size", str(SIZE), "--no-onnx"])
    assert rc == 0
    assert json.load(open(out / E.CHECK_FILE))["passed"]
    with pytest.raises(E.ExportError, match="no checkpoint for step 5"):
        E.load_workdir(str(wd), step=5)
    bad = dict(arch, Neck={"name": "BNNeck", "num_features": 16},
               Backbone=dict(arch["Backbone"], class_expand=16))  # fmt: skip
    (wd / "config.json").write_text(json.dumps({"Arch": bad}))
    with pytest.raises(E.ExportError, match="does not match the Arch"):
        E.load_workdir(str(wd))
