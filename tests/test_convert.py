"""jaxrec.convert and jaxrec.paddle.pdparams: safe .pdparams reading, key/layout mapping, mismatch
reports, writing PaddleClas state dicts (round trips), the CLI, and model directories."""

import collections
import json
import os
import pickle
import pickletools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import convert as convert_cli
from jaxrec.data.preprocess import INFERENCE_REC, Preprocess
from jaxrec.errors import ModelDirError
from jaxrec.models import (
    abstract_variables,
    build_model,
    load_model_dir,
    read_arch,
    reparameterize,
    save_model_dir,
)
from jaxrec.paddle import convert, naming, pdparams
from jaxrec.paddle.convert import convert_pdparams, convert_state_dict
from jaxrec.paddle.naming import to_paddle_state_dict
from jaxrec.paddle.pdparams import PdparamsError, read_pdparams
from jaxrec.training.workdir import Workdir

FIX = Path(__file__).parent / "fixtures"
SHITU = FIX / "model_shitu.pdparams"
IMAGENET = FIX / "model_imagenet.pdparams"


# ---------------------------------------------------------------- safe unpickling


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pdparams"
    bad.write_bytes(pickle.dumps({"w": np.ones(2, np.float32), "x": _Evil(marker)}, protocol=4))
    with pytest.raises(PdparamsError) as e:
        read_pdparams(bad)
    msg = str(e.value)
    assert str(bad) in msg and "system" in msg and "refusing" in msg
    assert not marker.exists()
    # through the CLI too
    rc = convert_cli.main(["--pdparams", str(bad), "--out", str(tmp_path / "out")])
    assert rc == 1 and not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("glob", ["builtins.eval", "subprocess.Popen", "numpy.load"])
def test_other_globals_are_refused(tmp_path, glob):
    mod, name = glob.rsplit(".", 1)
    # protocol-2 GLOBAL opcode naming the callable, then an empty-tuple REDUCE
    payload = b"\x80\x02c" + f"{mod}\n{name}\n".encode() + b")R."
    f = tmp_path / "g.pdparams"
    f.write_bytes(payload)
    with pytest.raises(PdparamsError, match=f"{mod}.{name}"):
        read_pdparams(f)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_pickles_of_all_protocols_load(tmp_path, protocol):
    state = collections.OrderedDict(
        a=np.arange(6, dtype=np.float32).reshape(2, 3),
        b=np.float32([1.5]),
    )
    state["StructuredToParameterName@@"] = {"a": "linear_0.w_0", "b": "linear_0.b_0"}
    f = tmp_path / "ok.pdparams"
    f.write_bytes(pickle.dumps(state, protocol=protocol))
    got = read_pdparams(f)
    assert set(got) == {"a", "b"}
    np.testing.assert_array_equal(got["a"], state["a"])


def test_real_paddle_file_loads():
    state = read_pdparams(SHITU)
    assert "StructuredToParameterName@@" not in state
    assert state["backbone.stem.0.conv.weight"].shape == (8, 3, 3, 3)
    assert state["head.fc.weight"].shape == (32, 10)


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(range(40)), "not a .pdparams file"),
        (b'{"a": 1}', "not a .pdparams file"),
        (pickle.dumps([np.ones(2)]), "top-level object is list"),
        (pickle.dumps({"a": 3.0}), "'a' is a float"),
        (pickle.dumps({"StructuredToParameterName@@": {}}), "no tensors"),
        (b"", "not a .pdparams file"),
    ],
)
def test_non_pdparams_files_are_rejected(tmp_path, content, needle):
    f = tmp_path / "x.pdparams"
    f.write_bytes(content)
    with pytest.raises(PdparamsError, match=needle) as e:
        read_pdparams(f)
    assert str(f) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(PdparamsError, match="cannot read"):
        read_pdparams(tmp_path / "nope.pdparams")


# ---------------------------------------------------------------- mapping and reports


@pytest.fixture(scope="module")
def shitu_state():
    return read_pdparams(SHITU)


@pytest.fixture(scope="module")
def shitu_arch(shitu_state):
    return convert.infer_arch(shitu_state)


def test_layouts(shitu_state, shitu_arch):
    v, report = convert_state_dict(shitu_state, shitu_arch)
    assert report.ok
    bb = v["params"]["backbone"]
    np.testing.assert_array_equal(
        bb["stem_0"]["conv"]["kernel"],
        shitu_state["backbone.stem.0.conv.weight"].transpose(2, 3, 1, 0),
    )
    dw = shitu_state["backbone.stages.3.1.dw_conv_list.1.conv.weight"]  # [C,1,3,3]
    np.testing.assert_array_equal(
        bb["stages_3_1"]["dw_conv_list_1"]["conv"]["kernel"][:, :, 0, :],
        dw[:, 0].transpose(1, 2, 0),
    )
    # Linear [in, out] is NOT transposed
    np.testing.assert_array_equal(
        v["params"]["head"]["fc"]["kernel"], shitu_state["head.fc.weight"]
    )
    np.testing.assert_array_equal(
        v["batch_stats"]["neck"]["feat_bn"]["var"], shitu_state["neck.feat_bn._variance"]
    )
    np.testing.assert_array_equal(
        v["params"]["neck"]["feat_bn"]["scale"], shitu_state["neck.feat_bn.weight"]
    )
    # round trip back to Paddle names/layouts
    back = to_paddle_state_dict(v)
    for key, val in back.items():
        np.testing.assert_array_equal(val, shitu_state[key])
    assert set(shitu_state) - set(back) == set(report.ignored_fusion_targets)


def test_missing_unexpected_and_misshaped_keys_are_reported(shitu_state, shitu_arch):
    state = dict(shitu_state)
    del state["backbone.stages.2.1.se.conv1.bias"]
    state["backbone.stages.9.0.extra.weight"] = np.zeros(3, np.float32)
    state["neck.feat_bn.weight"] = np.ones(7, np.float32)
    v, report = convert_state_dict(state, shitu_arch)
    assert report.missing == ["backbone.stages.2.1.se.conv1.bias"]
    assert report.unexpected == ["backbone.stages.9.0.extra.weight"]
    assert report.mismatched == [("neck.feat_bn.weight", [7], [32])]
    text = report.summary()
    for key in ("se.conv1.bias", "stages.9.0.extra.weight", "neck.feat_bn.weight"):
        assert key in text
    # left at fresh init with the right shapes (SE bias init is 0, BN gamma init is 1)
    assert v["params"]["backbone"]["stages_2_1"]["se"]["conv1"]["bias"].shape == (16,)
    assert not np.asarray(v["params"]["backbone"]["stages_2_1"]["se"]["conv1"]["bias"]).any()
    assert (np.asarray(v["params"]["neck"]["feat_bn"]["scale"]) == 1).all()


def test_strict_mode_names_the_keys(tmp_path, shitu_state):
    state = dict(shitu_state)
    del state["backbone.last_conv.bias"]
    f = tmp_path / "m.pdparams"
    f.write_bytes(pickle.dumps(state, protocol=4))
    with pytest.raises(PdparamsError, match="backbone.last_conv.bias"):
        convert_pdparams(f, strict=True)


def test_imagenet_checkpoint_into_shitu_recmodel():
    """The pretraining path: ImageNet PPLCNetV2 weights -> ShiTu RecModel (ref §2.4)."""
    assert "Head" not in convert.infer_arch(read_pdparams(IMAGENET))
    # with --class-num the head is added at its N(0, 0.001) init
    arch, v, report = convert_pdparams(IMAGENET, class_num=11)
    assert report.source_kind == "backbone"
    assert arch["Backbone"]["name"] == "PPLCNetV2_base_ShiTu"
    assert arch["Backbone"]["class_expand"] == 512
    branch = "backbone.stages.3.0.dw_conv_list.2"
    assert sorted(report.missing) == sorted(
        ["backbone.last_conv.bias"]
        + [f"{branch}.conv.weight", f"{branch}.bn.weight", f"{branch}.bn.bias"]
        + [f"{branch}.bn._mean", f"{branch}.bn._variance"]
        + [f"neck.feat_bn.{t}" for t in ("weight", "bias", "_mean", "_variance")]
        + ["head.fc.weight"]
    )
    assert report.mismatched == [("backbone.last_conv.weight", [48, 128, 1, 1], [512, 128, 1, 1])]
    assert sorted(report.unexpected) == ["backbone.fc.bias", "backbone.fc.weight"]
    # stage-4 fusion targets of the ImageNet file are recognised as such
    assert "backbone.stages.3.0.dw_conv.weight" in report.ignored_fusion_targets
    state = read_pdparams(IMAGENET)
    np.testing.assert_array_equal(
        v["params"]["backbone"]["stages_3_0"]["dw_conv_list_0"]["conv"]["kernel"],
        state["stages.3.0.dw_conv_list.0.conv.weight"].transpose(2, 3, 1, 0),
    )
    assert arch["Head"]["class_num"] == 11
    assert v["params"]["head"]["fc"]["kernel"].shape == (512, 11)
    assert float(np.std(v["params"]["head"]["fc"]["kernel"])) < 0.01


def test_margin_head_checkpoint(shitu_state, shitu_arch):
    state = {k: v for k, v in shitu_state.items() if not k.startswith("head.")}
    w = np.random.default_rng(0).normal(size=(32, 9)).astype(np.float32)
    state["head.weight"] = w
    with pytest.raises(PdparamsError, match="--head"):
        convert.infer_arch(state)
    arch = convert.infer_arch(state, head="CosMargin")
    assert arch["Head"] == {"name": "CosMargin", "embedding_size": 32, "class_num": 9}
    v, report = convert_state_dict(state, arch)
    assert report.ok
    np.testing.assert_array_equal(v["params"]["head"]["weight"], w)


def test_deploy_conversion(shitu_state):
    arch, v, _ = convert_pdparams(SHITU, deploy=True, no_head=True)
    assert arch["deploy"] is True and "Head" not in arch
    want = abstract_variables(build_model(arch))
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(want)


# ---------------------------------------------------------------- CLI and model directories


def test_cli_writes_a_loadable_model_dir(tmp_path, capsys):
    out = tmp_path / "model"
    assert convert_cli.main(["--pdparams", str(SHITU), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "loaded 135 tensors" in printed and str(out) in printed
    assert (out / "config.json").is_file() and (out / "conversion_report.json").is_file()
    md = load_model_dir(out)
    assert md.arch == read_arch(out) and md.arch["Head"]["class_num"] == 10
    # converted PaddleClas models are fed like PaddleClas's deploy inference_rec.yaml
    assert md.preprocess == INFERENCE_REC and not md.legacy
    assert md.features.output_key == "features"
    _, ref, _ = convert_pdparams(SHITU)
    for a, b in zip(
        jax.tree_util.tree_leaves(md.variables), jax.tree_util.tree_leaves(ref), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # refuses to overwrite, and says so in one line
    assert convert_cli.main(["--pdparams", str(SHITU), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "exists" in err and err.count("\n") == 1


def test_cli_bad_input_message(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("hello\n")
    assert convert_cli.main(["--pdparams", str(f), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert str(f) in err and "not a .pdparams file" in err


def test_cli_arch_json_and_deploy(tmp_path):
    arch = convert.infer_arch(read_pdparams(SHITU), no_head=True)
    aj = tmp_path / "arch.json"
    aj.write_text(json.dumps({"Arch": arch}))
    out = tmp_path / "d"
    rc = convert_cli.main(
        ["--pdparams", str(SHITU), "--out", str(out), "--arch-json", str(aj), "--deploy"]
    )
    assert rc == 0
    md = load_model_dir(out)
    assert md.arch["deploy"] is True
    assert "dw_conv" in md.variables["params"]["backbone"]["stages_3_1"]
    report = json.loads((out / "conversion_report.json").read_text())
    assert "head.fc.weight" in report["unexpected"]


def test_model_dir_round_trip_and_errors(tmp_path):
    arch = {
        "name": "RecModel",
        "Backbone": {
            "name": "PPLCNetV2_base_ShiTu",
            "scale": 0.125,
            "depths": [1, 1, 1, 1],
            "class_expand": 8,
        },
        "BackboneStopLayer": {"name": "flatten"},
        "Neck": {"name": "BNNeck", "num_features": 8},
        "dtype": "bfloat16",
    }
    av = abstract_variables(build_model(arch))
    rng = np.random.default_rng(0)
    v = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32), av)
    pre = Preprocess(resize=(48, 48))
    d = save_model_dir(tmp_path / "m", arch, v, preprocess=pre)
    md = load_model_dir(d)
    assert md.arch == arch and md.model.backbone.dtype == jnp.bfloat16 and md.preprocess == pre
    for a, b in zip(
        jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(md.variables), strict=True
    ):
        np.testing.assert_array_equal(a, np.asarray(b))
    with pytest.raises(FileExistsError):
        save_model_dir(tmp_path / "m", arch, v, preprocess=pre)
    save_model_dir(tmp_path / "m", arch, v, preprocess=pre, overwrite=True)
    with pytest.raises(ModelDirError, match="deploy"):
        save_model_dir(tmp_path / "m2", {**arch, "deploy": True}, v, preprocess=pre)
    with pytest.raises(ModelDirError, match="not a jaxrec model directory"):
        load_model_dir(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{\n  oops\n")
    with pytest.raises(ModelDirError, match="line 2"):
        load_model_dir(tmp_path / "bad")


def test_load_pdparams_variables_matches_the_model_mapping(shitu_state, shitu_arch):
    loaded = convert.load_pdparams_variables(SHITU)
    v, _ = convert_state_dict(shitu_state, shitu_arch)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(v)
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(v), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    bare = convert.load_pdparams_variables(IMAGENET)
    assert bare["params"]["backbone"]["fc"]["kernel"].shape == (48, 7)
    assert "dw_conv" not in bare["params"]["backbone"]["stages_3_0"]


# ---------------------------------------------------------------- .pdparams out


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()  # bitwise (also for -0.0 and NaN payloads)


@pytest.fixture(scope="module")
def shitu_model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "model"
    assert convert_cli.main(["--pdparams", str(SHITU), "--out", str(out)]) == 0
    return out


def test_writer_reproduces_a_paddle_file(tmp_path):
    """Re-encoding a file paddle.save wrote gives the same objects, order and name table."""
    obj = pdparams.load_pickle(SHITU)
    state = read_pdparams(SHITU)
    data = pdparams.encode_state_dict(state, obj[pdparams.NAME_TABLE])
    back = pickle.loads(data)  # the plain unpickler (as paddle.load uses it) reads it too
    assert type(back) is dict and list(back) == list(obj)
    assert back[pdparams.NAME_TABLE] == obj[pdparams.NAME_TABLE]
    for k in state:
        assert back[k].dtype == np.float32 and back[k].flags.c_contiguous
        assert back[k].tobytes() == obj[k].tobytes() and back[k].shape == obj[k].shape
    # opcodes: protocol 4, only the numpy globals paddle.save writes under numpy 1.x
    ops = list(pickletools.genops(data))
    assert ops[0][0].name == "PROTO" and ops[0][1] == 4
    strings = [arg for op, arg, _ in ops if op.name == "SHORT_BINUNICODE"]
    globs = {
        (strings[i - 1], strings[i])
        for i in range(1, len(strings))
        if strings[i] in ("_reconstruct", "ndarray", "dtype")
    }
    assert globs == {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
    assert sum(op.name == "STACK_GLOBAL" for op, _, _ in ops) == 3  # memoized once each


def test_internal_names_follow_paddle_layer_kinds():
    obj = pdparams.load_pickle(SHITU)
    state = read_pdparams(SHITU)
    names = pdparams.internal_names(state)
    assert len(set(names.values())) == len(names)

    def kind_and_leaf(name):
        layer, leaf = name.split(".")
        return layer.rsplit("_", 1)[0], leaf

    for k in state:
        assert kind_and_leaf(names[k]) == kind_and_leaf(obj[pdparams.NAME_TABLE][k]), k


def test_export_matches_paddleclas_keys_order_shapes_and_values(shitu_state, shitu_arch):
    v, _ = convert_state_dict(shitu_state, shitu_arch, strict=True)
    out = convert.paddle_state_dict(v)
    # every key PaddleClas's RecModel has (fusion targets included), in its order, same shapes
    assert list(out) == list(shitu_state)
    assert {k: a.shape for k, a in out.items()} == {k: a.shape for k, a in shitu_state.items()}
    fused = reparameterize(v)["params"]["backbone"]
    for k, a in out.items():
        assert a.dtype == np.float32
        if not naming.is_fusion_target(k, out):
            assert a.tobytes() == shitu_state[k].tobytes(), k
    # fusion targets hold the fused branches (what Paddle's re_parameterize() computes)
    dw = fused["stages_2_1"]["dw_conv"]
    np.testing.assert_array_equal(
        out["backbone.stages.2.1.dw_conv.weight"], np.asarray(dw["kernel"]).transpose(3, 2, 0, 1)
    )
    np.testing.assert_array_equal(out["backbone.stages.2.1.dw_conv.bias"], dw["bias"])
    assert list(convert.paddle_state_dict(v, head=False)) == [
        k for k in shitu_state if not k.startswith("head.")
    ]


def test_full_size_key_list():
    """The full PPLCNetV2_base_ShiTu RecModel: PaddleClas's 286 tensors / 4,778,880 values
    without the head; the FC head adds head.fc.weight [512, classes]."""
    arch = convert.infer_arch(read_pdparams(SHITU))
    arch["Backbone"] = {"name": "PPLCNetV2_base_ShiTu", "class_expand": 512}
    arch["Neck"]["num_features"] = 512
    arch["Head"].update(embedding_size=512, class_num=7)
    av = abstract_variables(build_model(arch))
    v = jax.tree_util.tree_map(lambda s: np.ones(s.shape, np.float32), av)
    out = convert.paddle_state_dict(v)
    assert len(out) == 287 and sum(a.size for a in out.values()) == 4_778_880 + 512 * 7
    shapes = {k: list(a.shape) for k, a in out.items()}
    assert list(out)[:2] == ["backbone.stem.0.conv.weight", "backbone.stem.0.bn.weight"]
    assert list(out)[-7:] == [
        "backbone.last_conv.weight",
        "backbone.last_conv.bias",
        "neck.feat_bn.weight",
        "neck.feat_bn.bias",
        "neck.feat_bn._mean",
        "neck.feat_bn._variance",
        "head.fc.weight",
    ]
    assert shapes["backbone.stem.0.conv.weight"] == [32, 3, 3, 3]
    assert shapes["backbone.stages.2.0.dw_conv.weight"] == [256, 1, 5, 5]
    assert shapes["backbone.stages.2.0.se.conv1.weight"] == [64, 256, 1, 1]
    assert shapes["backbone.stages.3.0.dw_conv_list.2.conv.weight"] == [512, 1, 1, 1]
    assert shapes["backbone.stages.3.1.pw_conv.conv.weight"] == [1024, 1024, 1, 1]
    assert shapes["backbone.last_conv.weight"] == [512, 1024, 1, 1]
    assert shapes["head.fc.weight"] == [512, 7]
    assert sum(naming.is_fusion_target(k, out) for k in out) == 2 * 8  # 8 rep blocks


def test_import_export_import_is_bitwise_identity(tmp_path, shitu_model_dir, capsys):
    f = tmp_path / "back.pdparams"
    rc = convert_cli.main(["--to-pdparams", "--model", str(shitu_model_dir), "--out", str(f)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"wrote {f}: 143 tensors" in printed and "Global.pretrained_model=" in printed
    # read back by the project's own restricted unpickler
    back = read_pdparams(f)
    assert list(back) == list(read_pdparams(SHITU))
    # import -> export -> import: the same variables, bit for bit
    _, v1, _ = convert_pdparams(SHITU, strict=True)
    _, v2, report = convert_pdparams(f, strict=True)
    assert report.ok and len(report.ignored_fusion_targets) == 8  # 4 rep blocks
    _leaves_equal(v1, v2)
    # export -> import -> export: the same file, byte for byte
    again = tmp_path / "again"
    assert convert_cli.main(["--pdparams", str(f), "--out", str(again)]) == 0
    g = tmp_path / "again.pdparams"
    assert convert_cli.main(["--to-pdparams", "--model", str(again), "--out", str(g)]) == 0
    assert g.read_bytes() == f.read_bytes()
    # --no-head
    h = tmp_path / "nohead.pdparams"
    assert (
        convert_cli.main(["--to-pdparams", "--model", str(again), "--out", str(h), "--no-head"])
        == 0
    )
    assert "head.fc.weight" not in read_pdparams(h)


@pytest.mark.parametrize(
    "extra,needle",
    [
        ([], "exactly one of --model DIR or --workdir DIR"),
        (["--model", "M", "--workdir", "W"], "exactly one of"),
        (["--model", "M", "--step", "3"], "--step and --which"),
        (["--model", "M", "--class-num", "3"], "--class-num: import options"),
        (["--model", "M", "--pdparams", "x.pdparams"], "--pdparams: import options"),
        (["--model", "M", "--out-is-dir"], "must end with .pdparams"),
        (["--model", "NOPE"], "not a jaxrec model directory"),
        (["--model", "DEPLOY"], "deploy"),
        (["--model", "M", "--out-exists"], "exists (use --overwrite)"),
    ],
)
def test_to_pdparams_errors(tmp_path, capsys, shitu_model_dir, extra, needle):
    deploy = tmp_path / "deploy"
    if "DEPLOY" in extra:
        assert convert_cli.main(["--pdparams", str(SHITU), "--out", str(deploy), "--deploy"]) == 0
        capsys.readouterr()
    out = tmp_path / "o.pdparams"
    if "--out-exists" in extra:
        out.write_bytes(b"keep")
    if "--out-is-dir" in extra:
        out = tmp_path / "o"
    subs = {"M": str(shitu_model_dir), "NOPE": str(tmp_path / "nope"), "DEPLOY": str(deploy)}
    args = [subs.get(a, a) for a in extra if not a.startswith("--out-")]
    assert convert_cli.main(["--to-pdparams", *args, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not out.exists() or out.read_bytes() == b"keep"


def test_import_refuses_export_options(tmp_path, capsys):
    rc = convert_cli.main(
        ["--pdparams", str(SHITU), "--out", str(tmp_path / "m"), "--which", "best"]
    )
    assert rc == 1 and "--which need --to-pdparams" in capsys.readouterr().err


def test_to_pdparams_from_workdir_error_is_one_line(tmp_path, capsys):
    out = tmp_path / "x.pdparams"
    rc = convert_cli.main(["--to-pdparams", "--workdir", str(tmp_path / "nope"), "--out", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_write_pdparams_refuses_bad_input(tmp_path):
    a = {"w": np.ones(2, np.float32)}
    with pytest.raises(PdparamsError, match="end with .pdparams"):
        pdparams.write_pdparams(tmp_path / "x.bin", a)
    with pytest.raises(PdparamsError, match="float32"):
        pdparams.write_pdparams(tmp_path / "x.pdparams", {"w": np.ones(2, np.float64)})
    with pytest.raises(PdparamsError, match="name exactly"):
        pdparams.encode_state_dict(a, {"v": "x"})
    with pytest.raises(PdparamsError, match="empty"):
        pdparams.encode_state_dict({})
    assert not list(tmp_path.iterdir())
    f = pdparams.write_pdparams(tmp_path / "x.pdparams", a)
    with pytest.raises(PdparamsError, match="exists"):
        pdparams.write_pdparams(f, a)
    assert pdparams.load_pickle(f)[pdparams.NAME_TABLE] == {"w": "create_parameter_0.w_0"}


@pytest.mark.slow
def test_to_pdparams_from_a_training_workdir(tmp_path, capsys):
    """--workdir: the run's best checkpoint as PaddleClas's state dict; importing it back gives
    the run's variables bit for bit; the run's Arch is printed for PaddleClas."""
    from train_data_util import make_tiny_dataset, tiny_config

    from jaxrec.training import loop as trainer
    from jaxrec.training.checkpoint import restore_model

    data = make_tiny_dataset(str(tmp_path / "data"), train_classes=2, per_class=4)
    cfg = tiny_config(data, epochs=1, size=24)
    cfg.Optimizer.lr.warmup_epoch = 0
    workdir = str(tmp_path / "run")
    trainer.train(cfg, workdir)
    capsys.readouterr()
    f = tmp_path / "run.pdparams"
    assert convert_cli.main(["--to-pdparams", "--workdir", workdir, "--out", str(f)]) == 0
    printed = capsys.readouterr().out
    assert "from workdir" in printed and "this model has 0.25" in printed  # no stock YAML
    assert f"tools/export_model.py -c {Workdir(workdir).paddleclas_yaml}" in printed
    md = restore_model(workdir, which="best")
    _, back, report = convert_pdparams(f, arch=md.arch, strict=True)
    assert report.ok
    _leaves_equal(
        {"params": md.variables["params"], "batch_stats": md.variables["batch_stats"]}, back
    )
    assert list(read_pdparams(f)) == list(convert.paddle_state_dict(md.variables))
