"""int8 post-training quantization of the exported ONNX graph, with its accuracy measured.

PaddleClas ships PTQ variants of this model for CPU and edge deployment; here onnxruntime's own
static quantization does it: calibration images are fed with the model's preprocessing (the
export's `config.json`), activation ranges are MinMax-calibrated, weights are quantized per
output channel, and the graph is written in QDQ form, which onnxruntime's graph optimizer fuses
into its integer kernels (QLinearConv, QGemm). Activations are uint8 and weights int8 with
`reduce_range` (7-bit weights): on x86 CPUs without VNNI (AVX2) the u8 x s8 multiply-add
instruction saturates at int16, which without reduce_range wrecked some features outright
(BENCHMARKS.md: min cosine -0.35 on the demo model; 0.83 with it).

An int8 graph cannot meet the export's 0.9999 cosine, so it is judged by what matters for
retrieval, against the float32 graph on the same images:

- the distribution of per-image feature cosines (min, 1st/5th percentile, median, mean);
- top-1 agreement: the fraction of queries whose nearest neighbour (leave-one-out among the
  calibration images, and among the eval list's gallery) is the same image for both graphs;
- with an eval list (`path label [unique_id]`, query == gallery as in PaddleClas): Recall@1/5 and
  mAP of both; the graph is refused when Recall@1 drops by more than `max_drop` (default 0.01,
  one point), or when 5% of its eval features are further than MIN_P5_COSINE from float32's
  (features pointing elsewhere are broken even where Recall@1 happens to survive). Without an
  eval list Recall@1 cannot be measured; the graph is then refused only
  when the median cosine is below MIN_MEDIAN_COSINE (a broken quantization), and the report says
  that accuracy was not measured.

The graph is written as `inference.int8.onnx` beside `inference.onnx` only if it passes;
`int8_check.json` records the figures either way.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxrec.data.image import decode_image
from jaxrec.data.lists import parse_label_lines, read_lines, resolve_images
from jaxrec.errors import ExportError, ImageDecodeError
from jaxrec.evaluation.metrics import retrieval_metrics_from_similarity
from jaxrec.export.artifacts import NCHW, ONNX_FILE, ONNX_INPUT, ONNX_OUTPUT, onnx_session

INT8_FILE = "inference.int8.onnx"
INT8_CHECK_FILE = "int8_check.json"
DEFAULT_MAX_DROP = 0.01
DEFAULT_CALIB_LIMIT = 300
MIN_MEDIAN_COSINE = 0.9
MIN_P5_COSINE = 0.9
_BATCH = 32


def load_nchw(
    paths: Sequence[str], preprocess: Any, what: str = "--int8", limit: int | None = None
) -> np.ndarray:
    """Images (files) fed through `preprocess` as normalized float32 NCHW, the ONNX input. With
    `limit`, at most that many, evenly spaced over the list (lists are often sorted by class)."""
    paths = list(paths)
    if limit and len(paths) > limit:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]
    try:
        raw = [preprocess.apply(decode_image(p)) for p in paths]
    except (ImageDecodeError, OSError, ValueError) as err:
        raise ExportError(f"{what}: {err}") from None
    if not raw:
        raise ExportError(f"{what}: no images")
    x = np.asarray(preprocess.normalize(np.stack(raw)), np.float32)
    return np.ascontiguousarray(x.transpose(NCHW))


def calibration_paths(spec: str) -> list[str]:
    """The image files of --int8 CALIB_IMAGES: an image, a folder or a list file."""
    try:
        return [p for _, p in resolve_images(spec)]
    except ValueError as err:
        raise ExportError(f"--int8 {spec}: {err}") from None


def quantize(float_onnx: str | Path, out: str | Path, calib: np.ndarray) -> None:
    """Static int8 quantization of `float_onnx` calibrated on `calib` (NCHW float32)."""
    from onnxruntime.quantization import (  # noqa: PLC0415 - optional dependency (jaxrec[onnx])
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import (  # noqa: PLC0415 - as above
        quant_pre_process,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(range(0, len(calib), _BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self._it, None)
            return None if i is None else {ONNX_INPUT: calib[i : i + _BATCH]}

    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        # shape inference and constant folding first, as onnxruntime recommends; the graph's
        # shapes are static but for the batch, so the symbolic pass (needs sympy) is skipped
        quant_pre_process(str(float_onnx), pre, skip_symbolic_shape=True)
        quantize_static(
            pre,
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )


def run_onnx(path: str | Path, x: np.ndarray, batch: int = _BATCH) -> np.ndarray:
    """Features of NCHW float32 `x` from an ONNX graph, in batches."""
    sess = onnx_session(str(path))
    parts = [
        sess.run([ONNX_OUTPUT], {ONNX_INPUT: x[i : i + batch]})[0] for i in range(0, len(x), batch)
    ]
    return np.concatenate(parts).astype(np.float32)


def _unit(f: np.ndarray) -> np.ndarray:
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def cosine_stats(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """The distribution of per-row cosines between two feature sets."""
    cos = np.sum(_unit(ref.astype(np.float64)) * _unit(got.astype(np.float64)), axis=1)
    return {
        "min": float(cos.min()),
        "p1": float(np.percentile(cos, 1)),
        "p5": float(np.percentile(cos, 5)),
        "median": float(np.median(cos)),
        "mean": float(cos.mean()),
    }


def top1_agreement(ref: np.ndarray, got: np.ndarray, exclude_self: bool = True) -> float:
    """Fraction of rows whose nearest other row (cosine) is the same under both feature sets."""
    if len(ref) < 2:
        return float("nan")

    def nn(f: np.ndarray) -> np.ndarray:
        u = _unit(f.astype(np.float64))
        s = u @ u.T
        if exclude_self:
            np.fill_diagonal(s, -np.inf)
        return np.argmax(s, axis=1)

    return float(np.mean(nn(ref) == nn(got)))


def read_eval_list(path: str) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """(image files, labels, unique ids or None) of a PaddleClas query/gallery list
    (`path label [unique_id]`, whitespace-separated, paths relative to the list's folder)."""
    try:
        rel, labels, ids, _ = parse_label_lines(
            read_lines(path, "eval list"), path, delimiter=None, max_used_fields=3
        )
    except ValueError as err:
        raise ExportError(f"--int8-eval: {err}") from None
    root = os.path.dirname(os.path.abspath(path))
    files = [os.path.join(root, p) for p in rel]
    return files, np.asarray(labels), None if ids is None else np.asarray(ids)


def retrieval(feats: np.ndarray, labels: np.ndarray, ids: np.ndarray | None) -> dict[str, float]:
    """Recall@1/5 and mAP with query == gallery (PaddleClas semantics; ids exclude self-matches,
    without ids the diagonal is excluded the same way, each image its own id)."""
    u = _unit(feats.astype(np.float64))
    ids = np.arange(len(u)) if ids is None else ids
    m = retrieval_metrics_from_similarity(u @ u.T, labels, labels, ids, ids, topk=(1, 5))
    return {k: float(v) for k, v in m.items()}


def measure(
    float_onnx: str | Path,
    int8_onnx: str | Path,
    calib: np.ndarray,
    eval_set: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None,
    max_drop: float = DEFAULT_MAX_DROP,
) -> dict[str, Any]:
    """The int8 graph against the float32 one: cosines, top-1 agreement, retrieval metrics, and
    the verdict (`ok`, `reason`). `eval_set` is (NCHW images, labels, ids) or None."""
    f32, i8 = run_onnx(float_onnx, calib), run_onnx(int8_onnx, calib)
    rep: dict[str, Any] = {
        "calibration": {
            "images": len(calib),
            "cosine": cosine_stats(f32, i8),
            "top1_agreement": top1_agreement(f32, i8),
        },
        "max_recall1_drop": max_drop,
    }
    if eval_set is not None:
        x, labels, ids = eval_set
        e32, e8 = run_onnx(float_onnx, x), run_onnx(int8_onnx, x)
        m32, m8 = retrieval(e32, labels, ids), retrieval(e8, labels, ids)
        rep["eval"] = {
            "images": len(x),
            "cosine": cosine_stats(e32, e8),
            "top1_agreement": top1_agreement(e32, e8),
            "float32": m32,
            "int8": m8,
            "recall1_drop": m32["recall1"] - m8["recall1"],
        }
        drop = rep["eval"]["recall1_drop"]
        p5 = rep["eval"]["cosine"]["p5"]
        rep["ok"] = bool(drop <= max_drop + 1e-12 and p5 >= MIN_P5_COSINE)
        rep["reason"] = (
            f"Recall@1 {m8['recall1']:.4f} (int8) vs {m32['recall1']:.4f} (float32): drop "
            f"{100 * drop:.2f} points, limit {100 * max_drop:.2f}; 5th-percentile cosine "
            f"{p5:.4f} (refused below {MIN_P5_COSINE})"
        )
    else:
        med = rep["calibration"]["cosine"]["median"]
        rep["ok"] = bool(med >= MIN_MEDIAN_COSINE)
        rep["reason"] = (
            f"Recall@1 not measured (no --int8-eval list); median feature cosine {med:.4f} "
            f"(refused below {MIN_MEDIAN_COSINE})"
        )
    return rep


def report_lines(rep: dict[str, Any]) -> list[str]:
    """The int8 check as terminal lines."""

    def cos(c: dict[str, float]) -> str:
        return (
            f"cosine min {c['min']:.4f} p1 {c['p1']:.4f} p5 {c['p5']:.4f} median "
            f"{c['median']:.5f} mean {c['mean']:.5f}"
        )

    c = rep["calibration"]
    lines = [
        f"int8 check against the float32 graph ({'OK' if rep['ok'] else 'REFUSED'}):",
        f"  calibration images ({c['images']}): {cos(c['cosine'])}; top-1 agreement "
        f"{c['top1_agreement']:.3f}",
    ]
    if "eval" in rep:
        e = rep["eval"]
        lines.append(
            f"  eval list ({e['images']}): {cos(e['cosine'])}; top-1 agreement "
            f"{e['top1_agreement']:.3f}"
        )
        for name in ("float32", "int8"):
            m = e[name]
            lines.append(
                f"    {name:<8} Recall@1 {m['recall1']:.4f}  Recall@5 {m['recall5']:.4f}  "
                f"mAP {m['mAP']:.4f}"
            )
    lines.append(f"  {rep['reason']}")
    return lines


def add_int8(
    out: str | Path,
    preprocess: Any,
    calib_spec: str,
    eval_list: str | None = None,
    max_drop: float = DEFAULT_MAX_DROP,
    limit: int = DEFAULT_CALIB_LIMIT,
    log: Callable[[str], None] = print,
) -> tuple[bool, dict[str, Any]]:
    """Quantize OUT/inference.onnx, measure it, and install OUT/inference.int8.onnx if it passes.
    Returns (ok, report); OUT/int8_check.json holds the report either way."""
    out = Path(out)
    float_onnx = out / ONNX_FILE
    if not float_onnx.is_file():
        raise ExportError(f"--int8: {float_onnx} does not exist (export with ONNX first)")
    if not 0 <= max_drop < 1:
        raise ExportError(f"--int8-max-drop {max_drop}: must lie in [0, 1) (0.01 = one point)")
    t0 = time.time()
    paths = calibration_paths(calib_spec)
    calib = load_nchw(paths, preprocess, f"--int8 {calib_spec}", limit)
    eval_set = None
    if eval_list is not None:
        files, labels, ids = read_eval_list(eval_list)
        eval_set = (load_nchw(files, preprocess, f"--int8-eval {eval_list}"), labels, ids)
    tmp = out / f".{INT8_FILE}.tmp-{os.getpid()}"
    try:
        quantize(float_onnx, tmp, calib)
        rep = measure(float_onnx, tmp, calib, eval_set, max_drop)
        rep.update(
            calibration_source=calib_spec,
            eval_list=eval_list,
            seconds=round(time.time() - t0, 1),
            settings="onnxruntime quantize_static: QDQ, uint8 activations (MinMax), int8 "
            "per-channel weights, reduce_range",
            file=INT8_FILE if rep["ok"] else None,
        )
        (out / INT8_CHECK_FILE).write_text(json.dumps(rep, indent=1))
        if rep["ok"]:
            os.replace(tmp, out / INT8_FILE)
    finally:
        if tmp.exists():
            tmp.unlink()
    for line in report_lines(rep):
        log(line)
    return rep["ok"], rep


def onnx_forward(
    model_dir: str | Path, preprocess: Any, normalize: bool, int8: bool
) -> Callable[[Any, Any], np.ndarray]:
    """A `jaxrec.extract.extract_features` forward that runs the model dir's ONNX graph
    (`inference.int8.onnx` with `int8`) on uint8 NHWC batches fed by `preprocess`."""
    name = INT8_FILE if int8 else ONNX_FILE
    path = Path(model_dir) / name
    if not path.is_file():
        how = (
            "python -m jaxrec.export --model DIR --out DIR --int8 CALIB_IMAGES --int8-only"
            if int8
            else "python -m jaxrec.export"
        )
        raise ExportError(f"{path} does not exist; write it with `{how}`")
    sess = onnx_session(str(path))

    def forward(_variables: Any, batch: Any) -> np.ndarray:
        x = np.asarray(preprocess.normalize(np.asarray(batch)), np.float32)
        f = sess.run([ONNX_OUTPUT], {ONNX_INPUT: np.ascontiguousarray(x.transpose(NCHW))})[0]
        return _unit(f).astype(np.float32) if normalize else f

    return forward
