"""Export: deploy model dir, jax.export and ONNX artifacts from the BN-folded model, the
built-in equality check, and an all-or-nothing OUT directory."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from model_testutil import build
from PIL import Image

from jaxrec import export as E
from jaxrec.config import resolve_arch
from jaxrec.data.preprocess import Preprocess
from jaxrec.models import abstract_variables, build_model, save_model_dir
from jaxrec.models import load_model_dir as _load_model_dir

SIZE = 32  # tiny images keep the tests fast; the network is fully convolutional
# The source model's own feeding: not the 224 px default, not ImageNet's mean/std.
OWN = Preprocess(resize=(SIZE, SIZE), scale=1 / 255, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))


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


def load_model_dir(path):
    return _load_model_dir(path, resolve_arch)


def make_model_dir(path, seed):
    arch = tiny_arch()
    model = build(arch)
    save_model_dir(path, arch, model, random_variables(model, seed), preprocess=OWN)
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
    rc = E.main(["--model", src, "--out", str(out), "--check-images", str(imgs)])  # no size flag
    return {"rc": rc, "src": src, "other": other, "out": str(out), "imgs": str(imgs)}


def _reference(exported, images):
    md = load_model_dir(exported["src"])
    return E.reference_features(md.model, md.variables, images, "features")


@pytest.mark.slow
def test_export_writes_artifacts_and_passes_check(exported):
    assert exported["rc"] == 0
    out = exported["out"]
    for f in ("config.json", "variables", E.JAX_EXPORT_FILE, E.ONNX_FILE, E.CHECK_FILE):
        assert os.path.exists(os.path.join(out, f)), f
    assert not [p for p in os.listdir(os.path.dirname(out)) if p.startswith(".")]  # no leftovers
    rep = json.load(open(os.path.join(out, E.CHECK_FILE)))
    assert rep["passed"] and rep["n_images"] == 5
    assert {r["artifact"] for r in rep["results"]} == {"model_dir", "jax_export", "onnx"}
    for r in rep["results"]:
        assert r["ok"] and r["max_rel_err"] <= r["tolerance"] <= E.MAX_TOL
    assert "[b, 32, 32, 3] NHWC" in rep["artifacts"][E.JAX_EXPORT_FILE]
    # The model dir is the deploy form without the head, fed like the source model.
    md = load_model_dir(out)
    assert md.deploy and not md.fold_bn and "Head" not in md.arch
    assert "head" not in md.variables["params"]
    assert md.preprocess == OWN and md.features.output_key == "features" and not md.legacy
    bb = md.variables["params"]["backbone"]
    assert "dw_conv" in bb["stages_2_1"]
    assert not any(k.startswith("dw_conv_list") for k in bb["stages_2_1"])


@pytest.mark.slow
def test_check_images_go_through_the_models_preprocessing(exported):
    images = E.load_check_images(exported["imgs"], OWN)
    assert images.shape == (5, SIZE, SIZE, 3)
    raw = np.asarray(Image.open(os.path.join(exported["imgs"], "im0.jpg")).convert("RGB"))
    want = OWN.normalize(OWN.apply(raw)[None])
    np.testing.assert_allclose(images[0], want[0], atol=2 / 255 / 0.2)  # JPEG decoders may differ


@pytest.mark.slow
def test_jax_export_loads_without_jaxrec_and_has_symbolic_batch(exported, tmp_path):
    images = E.load_check_images(None, OWN)
    ref = _reference(exported, images)
    np.save(tmp_path / "x.npy", images)
    artifact = os.path.join(exported["out"], E.JAX_EXPORT_FILE)
    code = (
        "import sys, numpy as np, jax\n"
        "assert not any(m.startswith('jaxrec') for m in sys.modules)\n"
        f"exp = jax.export.deserialize(bytearray(open({artifact!r}, 'rb').read()))\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        "outs = [np.asarray(exp.call(x[a:b])) for a, b in ((0, 1), (1, 5), (5, 12))]\n"
        "assert not any(m.startswith('jaxrec') for m in sys.modules)\n"
        "print(exp.in_avals[0].shape, exp.platforms)\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, np.concatenate(outs))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert "(b, 32, 32, 3)" in res.stdout and "cuda" in res.stdout
    assert E.compare("jax", ref, np.load(tmp_path / "y.npy")).ok


@pytest.mark.slow
def test_jax_export_carries_both_depthwise_lowerings(exported):
    """The artifact holds the grouped convs for CUDA; called on CPU it compiles without them."""
    exp = jax.export.deserialize(
        bytearray(open(os.path.join(exported["out"], E.JAX_EXPORT_FILE), "rb").read())
    )
    assert exp.platforms == ("cpu", "cuda")
    text = exp.mlir_module()
    assert "feature_group_count = 16" in text and "stablehlo.case" in text
    x = np.zeros((2, SIZE, SIZE, 3), np.float32)
    compiled = jax.jit(exp.call).lower(x).compile().as_text()
    assert "feature_group_count" not in compiled and "convolution" in compiled


def test_onnx_graph_and_runtime(tmp_path):
    """The ONNX graph traced from the folded tiny model equals the training-form model."""
    import onnx

    arch = tiny_arch()
    v = random_variables(build(arch), 0)
    model, fv = E.folded(E.deploy_arch(arch), E.deploy_variables(v))
    proto, _ = E.build_onnx(model, fv, "features", (SIZE, SIZE))
    inp = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in inp] == ["batch", 3, SIZE, SIZE]
    assert proto.graph.output[0].name == "features"
    ops = [n.op_type for n in proto.graph.node]
    # One Conv per conv of the model (BN, biases merged into them), the tail (last_conv, dropout,
    # BNNeck) one Gemm; no layout transposes, no BatchNormalization.
    assert set(ops) == {
        "Conv", "Relu", "GlobalAveragePool", "Sigmoid", "Mul", "Add", "Flatten", "Gemm"
    }  # fmt: skip
    assert ops.count("Conv") == 21 and ops.count("Gemm") == 1 and ops.count("Add") == 1
    assert any(a.name == "group" and a.i > 1 for n in proto.graph.node for a in n.attribute)
    onnx.save(proto, str(tmp_path / "m.onnx"))
    images = E.load_check_images(None, OWN)
    ref = E.reference_features(build(arch), v, images, "features")
    sess = E.onnx_session(str(tmp_path / "m.onnx"))
    got = np.concatenate(
        [
            sess.run(["features"], {"x": images[i:j].transpose(0, 3, 1, 2)})[0]
            for i, j in ((0, 1), (1, 6), (6, len(images)))
        ]
    )
    r = E.compare("onnx", ref, got)
    assert r.ok, r.line()


def _run_converted(fn, x, tmp_path, platform="cpu"):
    import onnx

    from jaxrec.export.artifacts import NCHW
    from jaxrec.export.jaxpr_onnx import convert

    (b,) = jax.export.symbolic_shape("batch")
    graph, _ = convert(fn, (b, *x.shape[1:]), NCHW, platform)
    graph.simplify()
    onnx.save(graph.to_onnx("x", "features"), str(tmp_path / "f.onnx"))
    sess = E.onnx_session(str(tmp_path / "f.onnx"))
    return graph, sess.run(["features"], {"x": x.transpose(0, 3, 1, 2)})[0]


def test_jaxpr_to_onnx_is_generic(tmp_path):
    """The translation follows the jaxpr, not this network: the CPU lowering of the depthwise
    convs (pads, strided slices, broadcast multiply-adds) and a function with a transpose,
    concat, mean and matmul convert too, and match JAX."""
    import jax.numpy as jnp

    arch = tiny_arch(head=False)
    v = random_variables(build(arch), 2)
    model, fv = E.folded(E.deploy_arch(arch), E.deploy_variables(v))
    x = np.random.default_rng(0).normal(size=(3, SIZE, SIZE, 3)).astype(np.float32)
    fn = lambda a: model.apply(fv, a)["features"]
    graph, got = _run_converted(fn, x, tmp_path, platform="cpu")
    assert graph.op_counts()["Slice"] > 100 and graph.op_counts()["Pad"] == 7
    assert E.compare("cpu lowering", np.asarray(jax.jit(fn)(x)), got).ok

    def f(a):
        y = jnp.transpose(a, (0, 3, 1, 2))
        z = jnp.concatenate([y, y * 2.0], axis=1)
        return jnp.tanh(jnp.mean(z, axis=(2, 3)) @ np.ones((6, 2), np.float32)) - 1.0

    x = np.random.default_rng(1).normal(size=(2, 4, 5, 3)).astype(np.float32)
    _, got = _run_converted(f, x, tmp_path)
    np.testing.assert_allclose(got, np.asarray(f(x)), atol=1e-6)


def test_onnx_tail_is_last_conv_dropout_and_bnneck_in_one_gemm():
    """The graph's Gemm == BNNeck(0.8 * last_conv(pool)), computed by hand."""
    from onnx import numpy_helper

    arch = tiny_arch(head=False)
    v = random_variables(build(arch), 3)
    model, fv = E.folded(E.deploy_arch(arch), E.deploy_variables(v))
    proto, _ = E.build_onnx(model, fv, "features", (SIZE, SIZE))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    (gemm,) = [n for n in proto.graph.node if n.op_type == "Gemm"]
    w, b = inits[gemm.input[1]], inits[gemm.input[2]]
    lc = v["params"]["backbone"]["last_conv"]
    bn_p, bn_s = v["params"]["neck"]["feat_bn"], v["batch_stats"]["neck"]["feat_bn"]
    pooled = np.random.default_rng(0).normal(size=(3, lc["kernel"].shape[2]))
    y = 0.8 * (pooled @ np.asarray(lc["kernel"])[0, 0] + np.asarray(lc["bias"]))
    want = (y - bn_s["mean"]) / np.sqrt(bn_s["var"] + 1e-5) * bn_p["scale"] + bn_p["bias"]
    np.testing.assert_allclose(pooled @ w + b, want, rtol=1e-5, atol=1e-5)


def test_full_size_onnx_has_the_folded_parameter_count():
    """Spec 2.7's fully conv+BN-folded count (BNNeck folded into last_conv): 4,549,184."""
    arch = {
        "name": "RecModel",
        "Backbone": {"name": "PPLCNetV2_base_ShiTu", "class_expand": 512},
        "BackboneStopLayer": {"name": "flatten"},
        "Neck": {"name": "BNNeck", "num_features": 512},
        "Head": {"name": "FC", "embedding_size": 512, "class_num": 10},
    }
    ones = jax.tree_util.tree_map(
        lambda s: np.ones(s.shape, s.dtype), abstract_variables(build(arch))
    )
    model, fv = E.folded(E.deploy_arch(arch), E.deploy_variables(ones))
    _, graph = E.build_onnx(model, fv, "features", (224, 224))
    assert graph.param_count() == 4_549_184
    ops = graph.op_counts()
    assert ops["Conv"] == 45 and ops["Gemm"] == 1 and ops["GlobalAveragePool"] == 7


@pytest.mark.slow
def test_check_fails_for_wrong_model(exported, capsys):
    rc = E.main(["--model", exported["other"], "--out", exported["out"], "--check-only"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "EXPORT CHECK FAILED" in err and "jax_export" in err and "onnx" in err
    rep = json.load(open(os.path.join(exported["out"], E.CHECK_FILE)))
    assert not rep["passed"] and not any(r["ok"] for r in rep["results"])
    assert "artifacts" in rep  # kept from the export


@pytest.mark.slow
def test_check_fails_for_corrupted_deploy_param_and_onnx(exported, tmp_path, capsys):
    import onnx
    from onnx import numpy_helper

    out = tmp_path / "corrupt"
    shutil.copytree(exported["out"], out)
    # One BN variance in the deploy model dir, off by 30%: only model_dir must fail.
    md = load_model_dir(out)
    v = jax.tree_util.tree_map(np.array, md.variables)  # writable copies
    v["batch_stats"]["backbone"]["stages_3_1"]["pw_conv"]["bn"]["var"][3] *= 1.3
    save_model_dir(
        out, md.arch, md.model, v, preprocess=md.preprocess, features=md.features, overwrite=True
    )
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
    rc = E.main(["--model", exported["src"], "--out", str(out), "--check-only"])
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


@pytest.fixture
def source(tmp_path):
    return make_model_dir(tmp_path / "src", seed=0)


def test_user_errors_are_one_line(source, tmp_path, capsys):
    def err_of(*args):
        assert E.main(list(args)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        return err

    assert "not a jaxrec model directory" in err_of(
        "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")
    )
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    msg = err_of("--model", source, "--out", str(full))
    assert "exists and is not empty" in msg and "--overwrite" in msg
    assert os.listdir(full) == ["keep.txt"]
    assert "--platforms" in err_of(
        "--model", source, "--out", str(tmp_path / "o"), "--platforms", "cpu,gpu"
    )
    assert "--check-images" in err_of(
        "--model", source, "--out", str(tmp_path / "o"), "--check-images", "/nope"
    )
    assert "--check-only" in err_of("--model", source, "--out", str(tmp_path / "o"), "--check-only")
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        E.main(["--out", str(tmp_path / "o")])  # needs --model or --workdir


def test_interrupted_export_leaves_no_partial_directory(source, tmp_path, monkeypatch):
    """Interrupted while writing ONNX (after the model dir and jax.export were written): no OUT,
    no temporary directory left; an existing OUT is untouched even with --overwrite."""
    from jaxrec.export import artifacts

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("simulated Ctrl-C while writing ONNX")

    monkeypatch.setattr(artifacts, "build_onnx", interrupted)
    root = tmp_path / "exports"
    root.mkdir()
    with pytest.raises(KeyboardInterrupt):
        E.main(["--model", source, "--out", str(root / "out")])
    assert os.listdir(root) == []
    kept = root / "kept"
    kept.mkdir()
    (kept / "old.txt").write_text("previous export")
    with pytest.raises(KeyboardInterrupt):
        E.main(["--model", source, "--out", str(kept), "--overwrite"])
    assert os.listdir(root) == ["kept"] and os.listdir(kept) == ["old.txt"]


@pytest.mark.slow
def test_without_onnx_the_rest_is_written_and_checked(source, tmp_path, monkeypatch, capsys):
    """`import onnx` fails (as without the [onnx] extra): one note line, the other artifacts
    written and checked. --image-size overrides the model's size with a note."""
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert E.onnx_missing() == "onnx"
    out = tmp_path / "out"
    rc = E.main(["--model", source, "--out", str(out), "--image-size", "40"])
    assert rc == 0
    stdout = capsys.readouterr().out
    notes = [ln for ln in stdout.splitlines() if ln.startswith("note:")]
    assert len(notes) == 2
    assert 'pip install -e ".[onnx]"' in notes[1] and "onnx is not installed" in notes[1]
    assert "--image-size 40 overrides the model's" in notes[0]
    assert sorted(os.listdir(out)) == [
        "config.json",
        E.CHECK_FILE,
        E.JAX_EXPORT_FILE,
        "inference_rec.yaml",
        "variables",
    ]
    rep = json.load(open(out / E.CHECK_FILE))
    assert rep["passed"] and {r["artifact"] for r in rep["results"]} == {"model_dir", "jax_export"}
    md = load_model_dir(out)
    assert md.preprocess.input_size == (40, 40) and md.preprocess.mean == OWN.mean
    # A later re-check feeds the artifacts what the export recorded (40 px), with no flag.
    assert E.main(["--model", source, "--out", str(out), "--check-only"]) == 0


@pytest.mark.slow
def test_export_from_workdir(tmp_path, capsys):
    """A training workdir written by jaxrec's own checkpoint and config code, at 40 px: the
    export takes the run's preprocessing (no size flag) and the chosen checkpoint. A CUDA-only
    jax.export artifact is listed as not checked on this CPU, not as a failure."""
    import optax
    from train_data_util import make_tiny_dataset, tiny_config

    from jaxrec.config import resolve
    from jaxrec.training.checkpoint import Checkpoints
    from jaxrec.training.train_step import TrainState
    from jaxrec.training.workdir import save_config

    data = make_tiny_dataset(str(tmp_path / "data"), per_class=2)
    cfg = tiny_config(data, size=40)
    run = resolve(cfg)
    model = build_model(run.arch, **run.model_options(training=False))
    wd = tmp_path / "run"
    save_config(cfg, wd)
    ck = Checkpoints(str(wd))
    variables = {}
    for step, seed in ((3, 4), (7, 5)):
        variables[step] = random_variables(model, seed)
        params = {"model": variables[step]["params"], "loss": {}}
        state = TrainState(
            step=np.asarray(step, np.int32),
            params=params,
            batch_stats=variables[step]["batch_stats"],
            opt_state=optax.sgd(0.1).init(params),
        )
        ck.save(step, jax.tree_util.tree_map(jax.numpy.asarray, state), {"epoch": 0})
    ck.close()
    out = tmp_path / "out"
    args = ["--workdir", str(wd), "--out", str(out), "--step", "3", "--no-onnx"]
    assert E.main([*args, "--platforms", "cuda"]) == 0, capsys.readouterr()
    rep = json.load(open(out / E.CHECK_FILE))
    assert rep["passed"] and "step 3" in rep["source"]
    skipped = [r for r in rep["results"] if r["skipped"]]  # a CUDA-only artifact on this CPU
    assert [r["artifact"] for r in skipped] == ["jax_export"] and "cuda" in skipped[0]["detail"]
    md = load_model_dir(out)
    assert md.preprocess.input_size == (40, 40)
    want = E.deploy_variables(variables[3])
    got = md.variables["params"]["backbone"]["stages_3_0"]["dw_conv"]["kernel"]
    np.testing.assert_array_equal(
        got, want["params"]["backbone"]["stages_3_0"]["dw_conv"]["kernel"]
    )
    assert E.main(["--workdir", str(wd), "--out", str(tmp_path / "o"), "--step", "5"]) == 2
    assert "no checkpoint for step 5" in capsys.readouterr().err
