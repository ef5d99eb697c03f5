"""Export a recognition model for inference, and prove each artifact equals the trained model.

`python -m jaxrec.export --model DIR | --workdir DIR --out OUT [--check-images PATH]` writes to OUT:

- a jaxrec model directory (`config.json` + `variables/`, see `jaxrec.models.save_model_dir`)
  holding the deploy form: rep blocks re-parameterized (spec 2.6), classifier head dropped.
  `jaxrec.extract` and `jaxrec.search` load it like any model directory.
- `inference.jaxexport`: a serialized `jax.export` artifact (StableHLO, lowered for CPU and
  CUDA) of the BN-folded network with the weights embedded. Load it without jaxrec:
      exp = jax.export.deserialize(open("inference.jaxexport", "rb").read())
      feats = exp.call(x)     # x: float32 [b, 224, 224, 3], NHWC, normalized; any b
- `inference.onnx`: the same BN-folded network as an ONNX graph (opset 17), input `x`
  float32 [batch, 3, 224, 224] **NCHW** normalized (the layout PP-ShiTu's `predict_rec.py` feeds
  with `use_onnx: True`), output `features` [batch, D].
- `export_check.json`: the equality check results.

Inputs are normalized images: RGB, `(x * 0.00392157 - mean) / std` with ImageNet mean/std
(`jaxrec.data.image.normalize(x, SCALE_DEPLOY)`), resized to 224x224 with cv2 INTER_LINEAR
(`jaxrec.data.image.load_for_rec`). Outputs are the BNNeck features, NOT L2-normalized, exactly
as PaddleClas exports them (spec 9.1); normalize them before searching (spec 9.2).

Folding (all exact in eval mode, up to float32 rounding; done in float64):
- every conv+BN becomes a conv with bias: W' = W*t, b' = beta - mean*t, t = gamma/sqrt(var+eps);
- fused rep depthwise convs already carry a bias (spec 2.6);
- global pool -> last_conv (+bias) -> dropout (eval: x0.8) -> BNNeck is one affine map of the
  pooled features, so it becomes a single dense layer [C, D].

The equality check runs the training-form model (eval mode, `features` output) and every
artifact on the same images (the given ones, or deterministic synthetic ones) and requires, per
artifact, the minimum per-image cosine >= 0.9999 and max|err| <= 1e-4 * max|reference|
(the second catches pure scale errors that the cosine cannot see). Otherwise it exits non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

JAX_EXPORT_FILE = "inference.jaxexport"
ONNX_FILE = "inference.onnx"
CHECK_FILE = "export_check.json"
BN_EPS = 1e-5
MIN_COSINE = 0.9999
MAX_REL_ERR = 1e-4
ONNX_OPSET = 17
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ExportError(ValueError):
    """Export cannot proceed (bad input, unsupported architecture)."""


# --------------------------------------------------------------------------------------------
# BN folding: deploy variables -> a flat list of ops with float32 numpy weights


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _fold_convbn(p: Mapping[str, Any], s: Mapping[str, Any], stride: int, groups: int, relu: bool):
    t = _f64(p["bn"]["scale"]) / np.sqrt(_f64(s["bn"]["var"]) + BN_EPS)
    w = _f64(p["conv"]["kernel"]) * t
    b = _f64(p["bn"]["bias"]) - _f64(s["bn"]["mean"]) * t
    return _conv_op(w, b, stride, groups, relu)


def _conv_op(w: np.ndarray, b: np.ndarray, stride: int, groups: int, relu: bool) -> dict:
    return {
        "op": "conv",
        "w": np.asarray(w, np.float32),  # HWIO
        "b": np.asarray(b, np.float32),
        "stride": int(stride),
        "groups": int(groups),
        "relu": bool(relu),
    }


def _block_ops(p: Mapping[str, Any], s: Mapping[str, Any], spec: Mapping[str, Any]) -> list[dict]:
    cin, cout, stride = spec["in_channels"], spec["out_channels"], spec["stride"]
    shortcut = spec.get("use_shortcut", False) and stride == 1 and cin == cout
    ops: list[dict] = [{"op": "save"}] if shortcut else []
    dw = p["dw_conv"]
    if "kernel" in dw:  # fused rep form: plain depthwise conv with bias, then ReLU
        ops.append(_conv_op(_f64(dw["kernel"]), _f64(dw["bias"]), stride, cin, True))
    else:
        ops.append(_fold_convbn(dw, s["dw_conv"], stride, cin, True))
    if spec.get("use_se", False):
        se = p["se"]
        ops.append(
            {
                "op": "se",
                "w1": np.asarray(se["conv1"]["kernel"], np.float32)[0, 0],
                "b1": np.asarray(se["conv1"]["bias"], np.float32),
                "w2": np.asarray(se["conv2"]["kernel"], np.float32)[0, 0],
                "b2": np.asarray(se["conv2"]["bias"], np.float32),
            }
        )
    names = ["pw_conv_1", "pw_conv_2"] if spec.get("split_pw", False) else ["pw_conv"]
    for n in names:
        ops.append(_fold_convbn(p[n], s[n], 1, 1, True))
    if shortcut:
        ops.append({"op": "add"})
    return ops


def _simplify(ops: list[dict]) -> list[dict]:
    """Merge dense -> affine and affine -> affine pairs (exact algebra, float64)."""
    out: list[dict] = []
    for op in ops:
        prev = out[-1] if out else None
        if op["op"] == "affine" and prev is not None and prev["op"] in ("dense", "affine"):
            a, c = _f64(op["a"]), _f64(op["c"])
            if prev["op"] == "dense":
                out[-1] = {"op": "dense", "w": _f64(prev["w"]) * a, "b": _f64(prev["b"]) * a + c}
            else:
                out[-1] = {"op": "affine", "a": _f64(prev["a"]) * a, "c": _f64(prev["c"]) * a + c}
            continue
        out.append(op)
    for op in out:
        for k, v in op.items():
            if isinstance(v, np.ndarray):
                op[k] = v.astype(np.float32)
    return out


def fold_network(model: Any, variables: Mapping[str, Any]) -> list[dict]:
    """The BN-folded op list of a RecModel (training or deploy form variables; head ignored).

    Ops: conv (HWIO weights, bias, stride, groups, relu), se, save/add (residual), pool (global
    mean to [N, C]), dense ([in, out] + bias), relu, affine (per-feature a*x + c).
    """
    from jaxrec.models import reparameterize  # noqa: PLC0415
    from jaxrec.models.lcnetv2 import block_specs, make_divisible  # noqa: PLC0415

    variables = reparameterize(variables)  # no-op on deploy-form variables
    bb = model.backbone
    params, stats = variables["params"], variables.get("batch_stats", {})
    if "backbone" not in params:
        raise ExportError("variables have no `backbone` params; is this a RecModel's variables?")
    P, S = params["backbone"], stats.get("backbone", {})
    if not bb._active("avg_pool"):
        raise ExportError("BackboneStopLayer before avg_pool gives a feature map; not exportable")
    s = bb.scale
    c32, c64 = make_divisible(32 * s), make_divisible(64 * s)
    ops = [_fold_convbn(P["stem_0"], S["stem_0"], 2, 1, True)]
    stem1 = dict(in_channels=c32, out_channels=c64, stride=1)
    ops += _block_ops(P["stem_1"], S["stem_1"], stem1)
    for name, spec in block_specs(s, tuple(bb.depths), bb.shitu):
        ops += _block_ops(P[name], S.get(name, {}), spec)
    ops.append({"op": "pool"})
    if bb.use_last_conv:
        if bb._active("last_conv"):
            lc = P["last_conv"]
            w = _f64(lc["kernel"])[0, 0]
            b = _f64(lc["bias"]) if "bias" in lc else np.zeros(w.shape[1])
            ops.append({"op": "dense", "w": w, "b": b})
        if bb._active("act") and not bb.shitu:
            ops.append({"op": "relu"})
        if bb._active("dropout") and bb.dropout_prob > 0:
            keep = float(np.float32(1.0 - bb.dropout_prob))  # the float32 factor flax/Paddle use
            d = _width(ops)
            ops.append({"op": "affine", "a": np.full(d, keep), "c": np.zeros(d)})
    if bb._active("fc"):
        fc = P["fc"]
        ops.append({"op": "dense", "w": _f64(fc["kernel"]), "b": _f64(fc["bias"])})
    if model.neck is not None:
        bn_p, bn_s = params["neck"]["feat_bn"], stats["neck"]["feat_bn"]
        t = _f64(bn_p["scale"]) / np.sqrt(_f64(bn_s["var"]) + BN_EPS)
        ops.append({"op": "affine", "a": t, "c": _f64(bn_p["bias"]) - _f64(bn_s["mean"]) * t})
    return _simplify(ops)


def _width(ops: list[dict]) -> int:
    for op in reversed(ops):
        if op["op"] == "conv":
            return op["w"].shape[-1]
        if op["op"] == "dense":
            return op["w"].shape[1]
    raise ExportError("cannot infer the feature width")


def ops_summary(ops: Sequence[dict]) -> dict[str, int]:
    """Counts of ops and parameters of a folded network."""
    out = {"ops": len(ops), "params": 0}
    for op in ops:
        out[op["op"]] = out.get(op["op"], 0) + 1
        out["params"] += sum(int(v.size) for v in op.values() if isinstance(v, np.ndarray))
    return out


# --------------------------------------------------------------------------------------------
# The folded network in JAX (NHWC) and its jax.export artifact


def apply_folded(ops: Sequence[dict], x):
    """Run a folded op list on normalized NHWC float32 images; returns [N, D] features."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    saved = None
    for op in ops:
        kind = op["op"]
        if kind == "conv":
            x = _conv_nhwc(x, op) + jnp.asarray(op["b"])
            if op["relu"]:
                x = jax.nn.relu(x)
        elif kind == "se":
            s = jnp.mean(x, axis=(1, 2))
            s = jax.nn.relu(s @ jnp.asarray(op["w1"]) + jnp.asarray(op["b1"]))
            s = jax.nn.sigmoid(s @ jnp.asarray(op["w2"]) + jnp.asarray(op["b2"]))
            x = x * s[:, None, None, :]
        elif kind == "save":
            saved = x
        elif kind == "add":
            x = x + saved
        elif kind == "pool":
            x = jnp.mean(x, axis=(1, 2))
        elif kind == "dense":
            x = x @ jnp.asarray(op["w"]) + jnp.asarray(op["b"])
        elif kind == "relu":
            x = jax.nn.relu(x)
        elif kind == "affine":
            x = x * jnp.asarray(op["a"]) + jnp.asarray(op["c"])
        else:
            raise ExportError(f"unknown op {kind!r}")
    return x


def _conv_nhwc(x, op: Mapping[str, Any]):
    """One conv of the folded net. XLA:CPU runs grouped convolutions slowly (about 30x slower
    than this) and dense ones with 3 input channels poorly, so depthwise convs are written as
    k*k shifted multiply-adds (XLA fuses them into one loop), 1x1 convs as matrix products and
    other dense convs as im2col + matrix product. The arithmetic is the same convolution."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    w, s, g = jnp.asarray(op["w"]), op["stride"], op["groups"]
    k, cin, cout = w.shape[0], x.shape[-1], w.shape[-1]
    p = (k - 1) // 2
    if k == 1 and s == 1 and g == 1:
        return jnp.einsum("nhwc,cd->nhwd", x, w[0, 0])
    n, h, wd = x.shape[0], x.shape[1], x.shape[2]
    ho, wo = (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    taps = [
        jax.lax.slice(
            xp, (0, i, j, 0), (n, i + (ho - 1) * s + 1, j + (wo - 1) * s + 1, cin), (1, s, s, 1)
        )
        for i in range(k)
        for j in range(k)
    ]
    if g == cin == cout and w.shape[2] == 1:  # depthwise
        acc = taps[0] * w[0, 0, 0]
        for t, tap in enumerate(taps[1:], 1):
            acc = acc + tap * w[t // k, t % k, 0]
        return acc
    if g == 1:  # im2col: patches [n, ho, wo, k*k*cin] in (i, j, c) order times [k*k*cin, cout]
        return jnp.einsum("nhwk,kd->nhwd", jnp.concatenate(taps, axis=-1), w.reshape(-1, cout))
    return jax.lax.conv_general_dilated(
        x,
        w,
        (s, s),
        ((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=g,
    )


def export_jax(ops: Sequence[dict], image_size: int = 224, platforms: Sequence[str] = ("cpu",)):
    """A `jax.export.Exported` of the folded network, batch dimension symbolic ("b")."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    (b,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b, image_size, image_size, 3), jnp.float32)
    fn = jax.jit(lambda x: apply_folded(ops, x))
    return jax.export.export(fn, platforms=tuple(platforms))(spec)


# --------------------------------------------------------------------------------------------
# ONNX graph, built node by node from the folded ops (NCHW)


def build_onnx(ops: Sequence[dict], image_size: int = 224, opset: int = ONNX_OPSET):
    """An onnx.ModelProto of the folded network; input `x` [batch, 3, H, W], output `features`."""
    import onnx  # noqa: PLC0415
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    nodes, inits = [], []
    counter = {"n": 0}

    def name(prefix: str) -> str:
        counter["n"] += 1
        return f"{prefix}_{counter['n']}"

    def const(prefix: str, arr: np.ndarray) -> str:
        n = name(prefix)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, np.float32), n))
        return n

    def node(op_type: str, inputs: list[str], **attrs) -> str:
        out = name(op_type.lower())
        nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    x, saved = "x", None
    for op in ops:
        kind = op["op"]
        if kind == "conv":
            w = np.transpose(op["w"], (3, 2, 0, 1))  # HWIO -> OIHW (I = in/groups)
            k = int(w.shape[2])
            p = (k - 1) // 2
            x = node(
                "Conv",
                [x, const("w", w), const("b", op["b"])],
                kernel_shape=[k, k],
                strides=[op["stride"]] * 2,
                pads=[p, p, p, p],
                group=op["groups"],
            )
            if op["relu"]:
                x = node("Relu", [x])
        elif kind == "se":
            s = node("GlobalAveragePool", [x])
            w1 = op["w1"].T[:, :, None, None]
            s = node("Conv", [s, const("w", w1), const("b", op["b1"])], kernel_shape=[1, 1])
            s = node("Relu", [s])
            w2 = op["w2"].T[:, :, None, None]
            s = node("Conv", [s, const("w", w2), const("b", op["b2"])], kernel_shape=[1, 1])
            s = node("Sigmoid", [s])
            x = node("Mul", [x, s])
        elif kind == "save":
            saved = x
        elif kind == "add":
            x = node("Add", [x, saved])
        elif kind == "pool":
            x = node("GlobalAveragePool", [x])
            x = node("Flatten", [x], axis=1)
        elif kind == "dense":
            x = node("Gemm", [x, const("w", op["w"]), const("b", op["b"])])
        elif kind == "relu":
            x = node("Relu", [x])
        elif kind == "affine":
            x = node("Mul", [x, const("a", op["a"])])
            x = node("Add", [x, const("c", op["c"])])
        else:
            raise ExportError(f"unknown op {kind!r}")
    nodes.append(helper.make_node("Identity", [x], ["features"], name="features"))
    dim = _width(list(ops))
    graph = helper.make_graph(
        nodes,
        "jaxrec_rec_features",
        [
            helper.make_tensor_value_info(
                "x", TensorProto.FLOAT, ["batch", 3, image_size, image_size]
            )
        ],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", dim])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="jaxrec.export"
    )
    model.ir_version = min(model.ir_version, 8)  # readable by older runtimes too
    onnx.checker.check_model(model)
    return model


def onnx_session(path: str, threads: int | None = None, spinning: bool = False):
    """An onnxruntime CPU session with all graph optimizations.

    `spinning=False` stops idle worker threads from busy-waiting. On shared/loaded CPUs this
    made batch-1 inference about 1.6x faster (BENCHMARKS.md); onnxruntime's
    own default (spinning) can be slightly faster on an idle machine."""
    import onnxruntime as ort  # noqa: PLC0415

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------
# Equality check


@dataclasses.dataclass
class CheckResult:
    """Agreement of one artifact with the training-form model."""

    artifact: str
    min_cosine: float
    max_abs_err: float
    max_abs_ref: float
    ok: bool
    detail: str = ""

    def line(self) -> str:
        status = "OK  " if self.ok else "FAIL"
        return (
            f"  {status} {self.artifact:<14} min cosine {self.min_cosine:.8f}   "
            f"max |err| {self.max_abs_err:.3e} (max |ref| {self.max_abs_ref:.3g}) {self.detail}"
        )


def compare(name: str, ref: np.ndarray, got: np.ndarray) -> CheckResult:
    """Per-row cosine and max abs error of `got` against `ref`, with the pass rule applied."""
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    if got.shape != ref.shape:
        return CheckResult(
            name,
            float("nan"),
            float("inf"),
            float(np.abs(ref).max()),
            False,
            f"shape {got.shape} != {ref.shape}",
        )
    num = np.sum(ref * got, axis=1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-300), 0.0)
    min_cos = float(np.min(cos)) if np.all(np.isfinite(got)) else float("nan")
    err = float(np.max(np.abs(ref - got)))
    scale = float(np.max(np.abs(ref)))
    ok = bool(min_cos >= MIN_COSINE and err <= MAX_REL_ERR * max(scale, 1e-12))
    return CheckResult(name, min_cos, err, scale, ok)


def synthetic_images(n: int = 8, size: int = 224, seed: int = 0) -> np.ndarray:
    """Deterministic uint8 RGB test images: smooth gradients, stripes and blobs plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    imgs = []
    for i in range(n):
        f = rng.uniform(1, 8, size=3)
        ph = rng.uniform(0, 2 * np.pi, size=3)
        base = np.stack(
            [
                np.sin(2 * np.pi * f[c] * (xx * np.cos(ph[c]) + yy * np.sin(ph[c])) + ph[c])
                for c in range(3)
            ],
            axis=-1,
        )
        cy, cx = rng.uniform(0.2, 0.8, size=2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)[..., None]
        img = 127.5 + 80 * base + 60 * blob * rng.uniform(-1, 1, size=3)
        img = img + rng.normal(0, 12 if i % 2 else 3, size=img.shape)
        imgs.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(imgs)


def _image_paths(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ExportError(f"--check-images {path}: no image files ({', '.join(IMAGE_EXTS)})")
        return files
    if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
        return [str(p)]
    if p.is_file():  # a list file: first field of each line, relative to the list's folder
        out = []
        for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            f = line.split("\t")[0].split(" ")[0]
            f = f if os.path.isabs(f) else str(p.parent / f)
            if not os.path.isfile(f):
                raise ExportError(f"{path}:{lineno}: image {f} not found")
            out.append(f)
        return out
    raise ExportError(f"--check-images {path}: no such file or directory")


def load_check_images(path: str | None, image_size: int = 224, limit: int = 16) -> np.ndarray:
    """Normalized float32 NHWC check images: decoded from `path` (image, folder or list file,
    at most `limit`) with the deploy preprocessing, or synthetic when `path` is None."""
    from jaxrec.data import image as im  # noqa: PLC0415

    if path is None:
        raw = synthetic_images(8, image_size)
    else:
        raw = np.stack([im.load_for_rec(f, image_size) for f in _image_paths(path)[:limit]])
    return np.asarray(im.normalize(raw, im.SCALE_DEPLOY), np.float32)


def reference_features(model: Any, variables: Mapping[str, Any], images: np.ndarray) -> np.ndarray:
    """`features` of the (training-form) model in eval mode."""
    import jax  # noqa: PLC0415

    fn = jax.jit(lambda v, x: model.apply(v, x, train=False)["features"])
    return np.asarray(fn(variables, images))


def run_checks(
    ref: np.ndarray, runners: Mapping[str, Callable[[np.ndarray], np.ndarray]], images: np.ndarray
) -> list[CheckResult]:
    """Run every artifact on `images` and compare with `ref`; errors count as failures."""
    results = []
    for name, run in runners.items():
        try:
            got = np.asarray(run(images))
            results.append(compare(name, ref, got))
        except Exception as err:  # a broken artifact must fail the check, not crash it
            results.append(
                CheckResult(
                    name,
                    float("nan"),
                    float("inf"),
                    float(np.abs(ref).max()),
                    False,
                    f"error: {type(err).__name__}: {err}",
                )
            )
    return results


def artifact_runners(out_dir: str, batch: int = 4) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Callables running each artifact present in `out_dir` on NHWC normalized images."""
    import jax  # noqa: PLC0415

    runners: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    out = Path(out_dir)

    def chunks(fn):
        # Odd-sized chunks also exercise the symbolic batch dimension.
        return lambda x: np.concatenate(
            [np.asarray(fn(x[i : i + batch])) for i in range(0, len(x), batch)]
        )

    if (out / "config.json").is_file():
        from jaxrec.models import load_model_dir  # noqa: PLC0415

        def run_model_dir(x):
            model, variables, _ = load_model_dir(out)
            f = jax.jit(lambda v, a: model.apply(v, a, train=False)["features"])
            return f(variables, x)

        runners["model_dir"] = run_model_dir
    if (out / JAX_EXPORT_FILE).is_file():

        def run_jax(x):
            exp = jax.export.deserialize(bytearray((out / JAX_EXPORT_FILE).read_bytes()))
            return chunks(exp.call)(x)

        runners["jax_export"] = run_jax
    if (out / ONNX_FILE).is_file():

        def run_onnx(x):
            sess = onnx_session(str(out / ONNX_FILE))
            return chunks(lambda a: sess.run(["features"], {"x": a.transpose(0, 3, 1, 2)})[0])(x)

        runners["onnx"] = run_onnx
    return runners


def report_checks(results: Sequence[CheckResult], n_images: int, source: str) -> bool:
    """Print the check table; loud message on failure. Returns whether all passed."""
    print(f"equality check on {n_images} images ({source}) against the training-form model:")
    for r in results:
        print(r.line())
    ok = bool(results) and all(r.ok for r in results)
    if not ok:
        bad = ", ".join(r.artifact for r in results if not r.ok) or "(no artifacts)"
        bar = "!" * 78
        print(
            f"\n{bar}\nEXPORT CHECK FAILED for: {bad}\n"
            f"An artifact does not reproduce the trained model (need min cosine >= {MIN_COSINE}"
            f" and max|err| <= {MAX_REL_ERR} x max|ref|). Do NOT deploy these files.\n{bar}",
            file=sys.stderr,
        )
    return ok


# --------------------------------------------------------------------------------------------
# Loading the source model


def deploy_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
    """The Arch of the exported model: deploy form, no classifier head."""
    out = json.loads(json.dumps(dict(arch)))
    out["deploy"] = True
    out.pop("Head", None)
    return out


def deploy_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Re-parameterized variables without the head's params."""
    from jaxrec.models import reparameterize  # noqa: PLC0415

    v = reparameterize(variables)
    return {
        "params": {k: x for k, x in v["params"].items() if k != "head"},
        "batch_stats": {k: x for k, x in v.get("batch_stats", {}).items() if k != "head"},
    }


def load_source(
    model_dir: str | None, workdir: str | None, step: int | None = None, which: str = "best"
):
    """(model, variables, arch, description) of the training-form model to export."""
    from jaxrec.models import build_model, load_model_dir  # noqa: PLC0415

    if (model_dir is None) == (workdir is None):
        raise ExportError("give exactly one of --model DIR or --workdir DIR")
    if model_dir is not None:
        if not Path(model_dir, "config.json").is_file():
            raise ExportError(f"--model {model_dir}: not a jaxrec model directory (no config.json)")
        model, variables, arch = load_model_dir(model_dir)
        if arch.get("dtype", "float32") != "float32":
            # The reference for the check (and the export) computes in float32.
            arch = {k: v for k, v in arch.items() if k != "dtype"}
            model = build_model(arch)
        return model, variables, arch, f"model dir {model_dir}"
    return load_workdir(workdir, step, which)


def _ckpt_steps(d: Path) -> list[int]:
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def load_workdir(workdir: str, step: int | None = None, which: str = "best"):
    """(model, variables, arch, description) from a training workdir written by train.py.

    Layout (jaxrec.train_lib): WORKDIR/config.json (the run config, `Arch` section) and orbax
    checkpoints WORKDIR/checkpoints/STEP/state and WORKDIR/best/STEP/state, whose `state` tree
    holds params {"model", "loss"}, batch_stats, step and opt_state. `which` is "best" (falls
    back to the newest if no evaluation ran) or "latest"; `step` picks one explicitly.
    """
    import jax  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415

    from jaxrec.models import abstract_variables, build_model  # noqa: PLC0415

    wd = Path(workdir).absolute()
    cfg_path = wd / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{cfg_path} not found: is {workdir} a training workdir (train.py)?")
    try:
        arch = json.loads(cfg_path.read_text()).get("Arch")
    except json.JSONDecodeError as err:
        raise ExportError(f"{cfg_path}: not valid JSON ({err})") from err
    if not isinstance(arch, dict):
        raise ExportError(f"{cfg_path}: no Arch section")
    # Export float32 whatever the training compute dtype was; sync-BN is a training detail.
    arch = {k: v for k, v in arch.items() if k not in ("dtype", "bn_axis_name")}
    dirs = {"latest": wd / "checkpoints", "best": wd / "best"}
    if step is not None:
        found = [d for d in dirs.values() if step in _ckpt_steps(d)]
        if not found:
            avail = sorted(set(_ckpt_steps(dirs["latest"])) | set(_ckpt_steps(dirs["best"])))
            raise ExportError(f"{workdir}: no checkpoint for step {step}; available: {avail}")
        ckpt = found[0] / str(step)
    else:
        if which not in dirs:
            raise ExportError(f"--which {which!r}: use best or latest")
        if which == "best" and not _ckpt_steps(dirs["best"]):
            print(f"{workdir} has no best checkpoint (no evaluation ran); using the latest")
            which = "latest"
        steps = _ckpt_steps(dirs[which])
        if not steps:
            raise ExportError(f"{workdir}: no checkpoint in {dirs[which]}")
        ckpt = dirs[which] / str(steps[-1])
    ckptr = ocp.StandardCheckpointer()
    try:
        state = ckptr.restore(ckpt / "state")
    except Exception as err:  # noqa: BLE001 - orbax raises many kinds
        raise ExportError(f"checkpoint {ckpt} is unreadable: {type(err).__name__}: {err}") from err
    finally:
        ckptr.close()
    try:
        variables = {"params": state["params"]["model"], "batch_stats": state["batch_stats"]}
    except (KeyError, TypeError) as err:
        raise ExportError(f"{ckpt}/state: not a jaxrec TrainState (missing {err})") from err
    model = build_model(arch)
    want = abstract_variables(model)
    got_sig = {
        jax.tree_util.keystr(k): tuple(np.shape(v))
        for k, v in jax.tree_util.tree_leaves_with_path(variables)
    }
    want_sig = {
        jax.tree_util.keystr(k): tuple(v.shape)
        for k, v in jax.tree_util.tree_leaves_with_path(want)
    }
    if got_sig != want_sig:
        diff = sorted(set(got_sig.items()) ^ set(want_sig.items()))[:5]
        raise ExportError(
            f"checkpoint {ckpt} does not match the Arch in {cfg_path}; first differences: {diff}"
        )
    variables = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), variables)
    return model, variables, arch, f"workdir {workdir} ({ckpt.parent.name} step {ckpt.name})"


# --------------------------------------------------------------------------------------------
# Export driver


def export(
    model: Any,
    variables: Mapping[str, Any],
    arch: Mapping[str, Any],
    out_dir: str,
    *,
    image_size: int = 224,
    platforms: Sequence[str] = ("cpu", "cuda"),
    onnx: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the model dir, jax.export and ONNX artifacts of a training-form model to out_dir."""
    from jaxrec.models import build_model, save_model_dir  # noqa: PLC0415

    out = Path(out_dir)
    d_arch = deploy_arch(arch)
    d_vars = deploy_variables(variables)
    save_model_dir(out, d_arch, d_vars, overwrite=overwrite)
    ops = fold_network(build_model(d_arch), d_vars)
    exp = export_jax(ops, image_size, platforms)
    tmp = out / (JAX_EXPORT_FILE + ".tmp")
    tmp.write_bytes(exp.serialize())
    os.replace(tmp, out / JAX_EXPORT_FILE)
    info: dict[str, Any] = {
        "folded": ops_summary(ops),
        "platforms": list(platforms),
        "image_size": image_size,
    }
    if onnx:
        import onnx as onnx_lib  # noqa: PLC0415

        proto = build_onnx(ops, image_size)
        onnx_lib.save(proto, str(out / (ONNX_FILE + ".tmp")))
        os.replace(out / (ONNX_FILE + ".tmp"), out / ONNX_FILE)
    elif (out / ONNX_FILE).exists():
        (out / ONNX_FILE).unlink()
    return info


def check(
    model: Any, variables: Mapping[str, Any], out_dir: str, images: np.ndarray, source: str
) -> tuple[bool, list[CheckResult]]:
    """Compare every artifact in out_dir with the training-form model; write export_check.json."""
    ref = reference_features(model, variables, images)
    results = run_checks(ref, artifact_runners(out_dir), images)
    ok = report_checks(results, len(images), source)
    payload = {
        "passed": ok,
        "images": source,
        "n_images": int(len(images)),
        "rule": {"min_cosine": MIN_COSINE, "max_abs_err_rel": MAX_REL_ERR},
        "results": [dataclasses.asdict(r) for r in results],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(out_dir, CHECK_FILE).write_text(json.dumps(payload, indent=1) + "\n")
    return ok, results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxrec.export",
        description="Export a recognition model (deploy model dir, jax.export, ONNX) and check "
        "every artifact against the training-form model. Exits 1 if a check fails.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="jaxrec model directory of the trained model")
    src.add_argument("--workdir", help="training workdir (latest checkpoint unless --step)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (with --workdir)")
    p.add_argument(
        "--which",
        default="best",
        choices=("best", "latest"),
        help="with --workdir: the best checkpoint (default) or the newest",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--check-images",
        default=None,
        help="images for the equality check: an image, a folder or a list file "
        "(default: 8 deterministic synthetic images)",
    )
    p.add_argument("--image-size", type=int, default=224, help="input size of the artifacts")
    p.add_argument(
        "--platforms",
        default="cpu,cuda",
        help="jax.export lowering platforms, comma-separated (default cpu,cuda)",
    )
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX artifact")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in OUT")
    p.add_argument(
        "--check-only",
        action="store_true",
        help="do not export; re-run the equality check of the artifacts in OUT",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, variables, arch, desc = load_source(args.model, args.workdir, args.step, args.which)
        images = load_check_images(args.check_images, args.image_size)
        src = args.check_images or "synthetic"
        if not args.check_only:
            t0 = time.time()
            info = export(
                model,
                variables,
                arch,
                args.out,
                image_size=args.image_size,
                platforms=[s for s in args.platforms.split(",") if s],
                onnx=not args.no_onnx,
                overwrite=args.overwrite,
            )
            f = info["folded"]
            print(
                f"exported {desc} to {args.out} in {time.time() - t0:.1f}s: "
                f"{f['conv']} convs, {f['params']:,} folded params, "
                f"jax.export for {','.join(info['platforms'])}"
                + ("" if args.no_onnx else f", ONNX opset {ONNX_OPSET}")
            )
        elif not Path(args.out).is_dir():
            raise ExportError(f"--check-only: {args.out} does not exist")
        ok, _ = check(model, variables, args.out, images, src)
    except FileExistsError:
        print(
            f"error: {args.out} exists and is not empty; pass --overwrite to replace the "
            "export there (or --check-only to re-check it)",
            file=sys.stderr,
        )
        return 2
    except (ExportError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
