"""`python -m jaxrec.export`: command-line interface (see `build_parser` for the help text)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxrec.config import resolve_arch
from jaxrec.errors import ExportError, JaxrecError, warnings_as_lines
from jaxrec.export import artifacts as A
from jaxrec.export.check import check, load_check_images
from jaxrec.export.int8 import add_int8
from jaxrec.export.writer import check_out, check_platforms, write_export
from jaxrec.extract import feeding_from_flags
from jaxrec.models import build_model
from jaxrec.models.modeldir import read_specs
from jaxrec.training.checkpoint import open_model
from jaxrec.training.workdir import Workdir, load_config

DESCRIPTION = """\
Export a recognition model for inference and prove every artifact equals the trained model.

OUT becomes a jaxrec model directory (config.json + variables/: the deploy form, rep blocks
fused, classifier head dropped, with the source model's preprocessing and feature spec) that
also holds:
  inference.jaxexport  jax.export artifact of the BN-folded model (weights embedded, lowered
                       for --platforms; depthwise convs as shifted slices on CPU and grouped
                       convs on GPU). Load it without jaxrec:
                         exp = jax.export.deserialize(open(path, "rb").read())
                         feats = exp.call(x)   # x float32 [b, H, W, 3] NHWC, any b
  inference.onnx       the same network as an ONNX graph (opset 17) traced from the model:
                       input `x` float32 [batch, 3, H, W] NCHW (as PP-ShiTu's predict_rec
                       feeds it), output `features` [batch, D]
  export_check.json    the equality check results and how to feed each artifact

Inputs of both artifacts are images already fed through config.json's `preprocess`: resized
(and cropped) to the model's input size H x W, RGB, (x * scale - mean) / std. Outputs are the raw
features (e.g. BNNeck), not L2-normalized, exactly as PaddleClas exports them; normalize them
before searching when config.json's `features.normalize` is true.

The check runs every artifact and the source model (in its own form: the training form for a
workdir) on the same images
(the given ones, or 12 default ones: 8 with natural-image statistics and 4 synthetic patterns,
fed through the same preprocessing) and compares them per image with that model computed in
float64. Tolerances follow float32 accuracy: eps_model is the float32 source model's own
largest relative error ||f32 - f64|| / ||f64|| on these images (at least 9.5e-7, 16 units of
float32 roundoff), tol = min(max(min(32 x eps_model, 1e-3), 8 x eps_model), 0.05), and every
artifact needs, per image,
||artifact - f64|| / ||f64|| <= tol and cosine >= 1 - tol^2 (an artifact this machine cannot
run, e.g. a CUDA-only jax.export on a CPU host, is listed as skipped). Exit
status 1 if the check fails (OUT is still written, and export_check.json says so), 2 on bad
input. Everything is written to a temporary directory next to OUT and moved into place at the
end, so an export that stops with an error or is interrupted leaves no partial OUT."""

EPILOG = """\
Without onnx/onnxruntime installed the ONNX graph is skipped with a note; install them with
pip install -e ".[onnx]"."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxrec.export",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="jaxrec model directory of the trained model")
    src.add_argument("--workdir", help="training workdir (train.py); see --which and --step")
    p.add_argument("--step", type=int, default=None, help="with --workdir: this checkpoint step")
    p.add_argument(
        "--which",
        default="best",
        choices=("best", "latest"),
        help="with --workdir: the best checkpoint (default) or the newest",
    )
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument(
        "--check-images",
        default=None,
        help="images for the equality check: an image, a folder or a list file (at most 16; "
        "default: 8 deterministic synthetic images)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input size N of the artifacts (a plain N x N resize); default: the model's own "
        "input size from its preprocessing",
    )
    p.add_argument(
        "--platforms",
        default="cpu,cuda",
        help="jax.export lowering platforms, comma-separated: cpu, cuda, rocm, tpu (cpu,cuda)",
    )
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX artifact")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in OUT")
    p.add_argument(
        "--int8",
        metavar="CALIB_IMAGES",
        default=None,
        help="also write inference.int8.onnx: onnxruntime static quantization calibrated on "
        "these images (an image, folder or list file; the first --int8-limit), checked against "
        "the float32 graph (int8_check.json)",
    )
    p.add_argument(
        "--int8-eval",
        metavar="LIST",
        default=None,
        help="query == gallery list (`path label [unique_id]`) on which int8 Recall@1/mAP are "
        "measured against float32; the int8 graph is refused when Recall@1 drops by more than "
        "--int8-max-drop",
    )
    p.add_argument(
        "--int8-max-drop",
        type=float,
        default=0.01,
        help="largest Recall@1 loss accepted for int8 (default 0.01, one point)",
    )
    p.add_argument(
        "--int8-limit", type=int, default=300, help="calibration images used (default 300)"
    )
    p.add_argument(
        "--int8-only",
        action="store_true",
        help="export nothing; add the int8 graph to the existing export in OUT",
    )
    p.add_argument(
        "--check-only",
        action="store_true",
        help="export nothing; re-run the equality check of the artifacts in OUT (fed with the "
        "preprocessing recorded in OUT/config.json)",
    )
    return p


def load_source(args: argparse.Namespace) -> Any:
    """The ModelDir to export: a model directory, or a training run's checkpoint."""
    if args.model is not None and args.step is not None:
        raise ExportError("--step goes with --workdir, not --model")
    if args.workdir is not None and not Workdir(args.workdir).is_workdir():
        raise ExportError(
            f"--workdir {args.workdir}: not a training workdir (no config.json with checkpoints/)"
        )
    return open_model(args.model or args.workdir, which=args.which, step=args.step)


def float32_reference(source: Any) -> Any:
    """The source model computing in float32 (the check's reference and the export's form)."""
    if jnp.dtype(source.model.backbone.dtype) == jnp.float32:
        return source
    spec = resolve_arch(source.arch)
    model = build_model(spec, deploy=source.deploy, fold_bn=source.fold_bn)
    return dataclasses.replace(source, model=model)


def feeding(source: Any, image_size: int | None) -> Any:
    """The export's preprocessing: the model's own, or --image-size (with a note)."""
    if image_size is not None and image_size < 1:
        raise ExportError(f"--image-size {image_size}: must be positive")
    pre, _, notes = feeding_from_flags(source, image_size=image_size)
    if source.legacy:
        notes.append(
            f"{source.source} predates recorded preprocessing; exporting with jaxrec's old "
            f"defaults ({pre.describe()})"
        )
    for note in notes:
        print(f"note: {note}")
    return pre


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings_as_lines():
            return _main(args)
    except JaxrecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _int8(args: argparse.Namespace, out: Path, pre: Any) -> bool:
    if A.onnx_missing():
        raise ExportError(f'--int8 needs {A.onnx_missing()}: pip install -e ".[onnx]"')
    print(f"quantizing {out / A.ONNX_FILE} to int8, calibrated on {args.int8}")
    ok, _ = add_int8(out, pre, args.int8, args.int8_eval, args.int8_max_drop, args.int8_limit)
    if not ok:
        print(
            f"error: the int8 graph was refused and not written (see {out / 'int8_check.json'}); "
            "calibrate on images like the deployment's, or raise --int8-max-drop",
            file=sys.stderr,
        )
    return ok


def _main(args: argparse.Namespace) -> int:
    out = Path(args.out).absolute()
    if (args.int8_eval or args.int8_only) and not args.int8:
        raise ExportError("--int8-eval and --int8-only go with --int8 CALIB_IMAGES")
    if args.int8_only:
        if not (out / A.ONNX_FILE).is_file():
            raise ExportError(f"--int8-only: {out / A.ONNX_FILE} does not exist")
        return 0 if _int8(args, out, read_specs(out)[0]) else 1
    platforms = check_platforms([s for s in args.platforms.split(",") if s])
    if not args.check_only:
        check_out(out, args.overwrite)
    elif not out.is_dir():
        raise ExportError(f"--check-only: {args.out} does not exist")
    source = float32_reference(load_source(args))
    key = source.features.output_key
    if key not in ("features", "backbone", "neck"):
        raise ExportError(
            f"the model's feature output is {key!r}; export writes feature extractors "
            "(features, backbone or neck), without the classifier head"
        )
    if args.check_only and args.image_size is None and (out / "config.json").is_file():
        pre = read_specs(out)[0]  # the artifacts take what the export recorded
    else:
        pre = feeding(source, args.image_size)
    images = load_check_images(args.check_images, pre)
    image_source = args.check_images or "default: 8 dead-leaves + 4 patterns"
    if args.check_only:
        old = out / A.CHECK_FILE
        keep = json.loads(old.read_text()) if old.is_file() else {}
        extra = {k: keep[k] for k in ("source", "artifacts") if k in keep}
        ok, _ = check(
            source.model,
            source.variables,
            key,
            out,
            images,
            image_source,
            extra,
            source.arch,
            form={"deploy": source.deploy, "fold_bn": source.fold_bn},
        )
        return 0 if ok else 1
    onnx = not args.no_onnx
    missing = A.onnx_missing() if onnx else None
    if missing:
        print(
            f"note: no ONNX graph: {missing} is not installed; add it with "
            f'pip install -e ".[onnx]" (or pass --no-onnx)'
        )
        onnx = False
    print(f"exporting {source.source}: {pre.describe()}, output {key!r}")
    ok, info = write_export(
        source,
        source,
        out,
        preprocess=pre,
        images=images,
        image_source=image_source,
        platforms=platforms,
        onnx=onnx,
        overwrite=args.overwrite,
        paddle_config=load_config(args.workdir) if args.workdir else None,
    )
    parts = [
        f"BN-folded model {info['folded_params']:,} params",
        f"jax.export for {','.join(info['platforms'])}",
    ]
    if "onnx" in info:
        ops = info["onnx"]["ops"]
        parts.append(f"ONNX ({ops.get('Conv', 0)} Conv, {info['onnx']['params']:,} params)")
    print(f"exported to {out} in {info['seconds']:.1f}s: " + ", ".join(parts))
    if ok and args.int8:
        if not onnx:
            raise ExportError("--int8 quantizes the ONNX graph; drop --no-onnx")
        ok = _int8(args, out, pre)
    return 0 if ok else 1
