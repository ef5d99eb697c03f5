"""Image files -> feature vectors, fed the way the model was trained and evaluated.

Library: :func:`load_model` (a model directory or a training workdir -> ``ModelDir``) and
:func:`extract_features` (the one feature-extraction entry point of jaxrec; search and the CLI use
it). CLI: ``python -m jaxrec.extract --model DIR --images PATH --out FILE.npy`` (see ``--help``).

Per image: decode (OpenCV semantics, RGB) and ``ModelDir.preprocess.apply`` (resize, optional
centre crop) on a host thread pool, while the device runs the previous batch: uint8 pixels ->
``preprocess.normalize`` -> model in eval mode -> output ``features.output_key`` ->
``jaxrec.ops.l2_normalize`` when ``features.normalize``, all inside one jitted function. Every
batch has the same shape (the last one is padded), so that function compiles once. Batches are
split over all local devices (a 1-D mesh; the variables are replicated once per call), so the
batch size is rounded up to a multiple of the device count; features are per image, so the
device count does not change them.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxrec.config import resolve_arch
from jaxrec.data import image as image_lib
from jaxrec.data.lists import resolve_images
from jaxrec.data.preprocess import FeatureSpec, Preprocess
from jaxrec.errors import JaxrecError, warnings_as_lines
from jaxrec.models import ModelDir, build_model, reparameterize
from jaxrec.models.features import feature_fn
from jaxrec.parallel import data_sharding, make_mesh, replicated
from jaxrec.training.checkpoint import open_model

PIXEL_SCALES = {"1/255": image_lib.SCALE_TRAIN, "deploy": image_lib.SCALE_DEPLOY}


# ---- loading a model --------------------------------------------------------------------------


def load_model(path: str | os.PathLike) -> ModelDir:
    """The model at `path` (a model directory, or a training workdir's best checkpoint); see
    `jaxrec.training.checkpoint.open_model`."""
    return open_model(path)


# ---- the forward function ---------------------------------------------------------------------


@functools.cache
def make_forward(
    model: Any, preprocess: Preprocess, features: FeatureSpec
) -> Callable[[Mapping[str, Any], Any], Any]:
    """Jitted ``(variables, uint8 NHWC) -> float32 features``: `jaxrec.models.feature_fn` with
    the model's pixel normalization. Cached: equal models (same Arch) and specs share one
    compiled function."""
    return jax.jit(feature_fn(model, features, preprocess.pixel))


def _load(path: str, preprocess: Preprocess) -> np.ndarray:
    return preprocess.apply(image_lib.decode_image(path))


def extract_features(
    model: ModelDir,
    paths: Sequence[str],
    *,
    batch_size: int = 32,
    preprocess: Preprocess | None = None,
    features: FeatureSpec | None = None,
    skip_bad: bool = False,
    errors: dict[str, str] | None = None,
    num_workers: int | None = None,
    progress: bool = False,
    forward: Callable[[Any, Any], Any] | None = None,
    devices: Sequence[Any] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Features [N, D] float32 of the images at ``paths`` and the paths they belong to, in order.

    Images are fed with ``model.preprocess`` and read out with ``model.features`` unless
    ``preprocess`` / ``features`` override them. An unreadable image raises (the message names
    it) unless ``skip_bad``; skipped paths are then left out of the result and, if ``errors`` is a
    dict, recorded there as path -> message. ``forward`` may be a prebuilt :func:`make_forward`
    for the same model and specs (to share its compilation across calls). Each batch is sharded
    over ``devices`` (default: all of this process's devices); ``batch_size`` is rounded up to a
    multiple of their number.
    """
    preprocess = model.preprocess if preprocess is None else preprocess
    features = model.features if features is None else features
    paths = list(paths)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if forward is None:
        forward = make_forward(model.model, preprocess, features)
    mesh = make_mesh(jax.local_devices() if devices is None else devices)
    n_dev = mesh.devices.size
    bs = -(-max(1, min(batch_size, len(paths))) // n_dev) * n_dev
    rows = data_sharding(mesh)
    variables = jax.device_put(model.variables, replicated(mesh))
    workers = num_workers or min(8, (os.cpu_count() or 2) + 2)
    bar = None
    if progress:
        bar = tqdm(total=len(paths), unit="img", desc="extract", file=sys.stderr)

    def batches(pool: cf.Executor) -> Iterator[tuple[np.ndarray, list[str]]]:
        # Keep a window of decode jobs in flight, consumed in order.
        window = max(2 * bs, 2 * workers)
        pending: list[tuple[str, cf.Future]] = []
        it = iter(paths)
        imgs: list[np.ndarray] = []
        kept: list[str] = []
        exhausted = False
        while True:
            while not exhausted and len(pending) < window:
                try:
                    p = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending.append((p, pool.submit(_load, p, preprocess)))
            if not pending:
                break
            p, fut = pending.pop(0)
            try:
                imgs.append(fut.result())
                kept.append(p)
            except (image_lib.ImageDecodeError, OSError) as e:
                if not skip_bad:
                    for _, f in pending:
                        f.cancel()
                    raise
                if errors is not None:
                    errors[p] = str(e)
            if bar is not None:
                bar.update(1)
            if len(imgs) == bs:
                yield np.stack(imgs), kept
                imgs, kept = [], []
        if imgs:
            yield np.stack(imgs), kept

    feats: list[np.ndarray] = []
    names: list[str] = []
    in_flight: tuple[Any, int] | None = None  # device result of the previous batch, its size
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for batch, kept in batches(pool):
                n = len(batch)
                if n < bs:
                    batch = np.concatenate(
                        [batch, np.zeros((bs - n, *batch.shape[1:]), batch.dtype)]
                    )
                out = forward(variables, jax.device_put(batch, rows))  # dispatched asynchronously
                if in_flight is not None:
                    feats.append(np.asarray(in_flight[0], dtype=np.float32)[: in_flight[1]])
                in_flight = (out, n)
                names.extend(kept)
            if in_flight is not None:
                feats.append(np.asarray(in_flight[0], dtype=np.float32)[: in_flight[1]])
        finally:
            if bar is not None:
                bar.close()
    result = np.concatenate(feats, axis=0) if feats else np.zeros((0, 0), np.float32)
    return result, names


# ---- command line -----------------------------------------------------------------------------


def _geometry(p: Preprocess) -> str:
    h, w = p.input_size
    if p.resize is not None and p.crop is None:
        return f"{h}x{w} input"
    return f"{h}x{w} input ({p.describe().split(' (')[0]})"


def feeding_from_flags(
    model: ModelDir,
    *,
    image_size: int | None = None,
    pixel_scale: float | None = None,
    output_key: str | None = None,
    normalize: bool | None = None,
) -> tuple[Preprocess, FeatureSpec, list[str]]:
    """The model's own preprocessing and feature spec with the given flags applied, and one note
    per flag whose value differs from the model's own (for the CLI to print)."""
    pre, feat, notes = model.preprocess, model.features, []
    if image_size is not None:
        new = dataclasses.replace(
            pre, resize=(image_size, image_size), resize_short=None, crop=None
        )
        if new != pre:
            notes.append(f"--image-size {image_size} overrides the model's {_geometry(pre)}")
        pre = new
    if pixel_scale is not None and float(pixel_scale) != float(pre.scale):
        name = {v: k for k, v in PIXEL_SCALES.items()}
        notes.append(
            f"--pixel-scale {name.get(pixel_scale, pixel_scale)} ({pixel_scale:.8g}) overrides "
            f"the model's pixel scale {pre.scale:.8g}"
        )
        pre = dataclasses.replace(pre, scale=float(pixel_scale))
    if output_key is not None and output_key != feat.output_key:
        notes.append(
            f"--output-key {output_key} overrides the model's feature output {feat.output_key!r}"
        )
        feat = FeatureSpec(output_key, feat.normalize)
    if normalize is not None and normalize != feat.normalize:
        if not normalize:
            notes.append(
                "--no-normalize: writing raw outputs (the model's features are L2-normalized)"
            )
        feat = FeatureSpec(feat.output_key, normalize)
    return pre, feat, notes


def _out_paths(out: str) -> tuple[Path, Path, Path]:
    out_p = Path(out)
    if out_p.suffix != ".npy":
        out_p = out_p.with_name(out_p.name + ".npy")
    stem = out_p.with_suffix("")
    return out_p, stem.with_name(stem.name + ".txt"), stem.with_name(stem.name + ".bad.txt")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m jaxrec.extract",
        description=(
            "Compute recognition features for images, as PaddleClas's predict_rec does, with the "
            "model's own preprocessing: decode (OpenCV semantics), resize (and crop) to the size "
            "the model was trained and evaluated at, normalize pixels with its scale/mean/std, "
            "run the model in eval mode and L2-normalize each feature (as the model directory's "
            "config.json records). The flags below override single values; each override that "
            "differs from the model's own value is printed as a note."
        ),
        epilog=(
            "Outputs: FILE.npy (N x D float32, rows in input order), FILE.txt (one image name per "
            "line, same order: the path relative to the folder, as written in the list, or the "
            "file name for a single image) and, with --skip-bad, FILE.bad.txt (path<TAB>error of "
            "each skipped image). Model directories written before preprocessing was recorded "
            "(format v1) are fed at 224x224, scale 1/255, ImageNet mean/std, as they were then."
        ),
    )
    ap.add_argument(
        "--model",
        required=True,
        help="jaxrec model directory (jaxrec.export / jaxrec.convert output), or a training "
        "workdir (its best checkpoint, with the run's preprocessing)",
    )
    ap.add_argument(
        "--images",
        required=True,
        help=(
            "an image file, a folder (searched recursively, sorted by relative path), or a text "
            "file listing one image path per line; relative paths in a list are resolved against "
            "the list file's folder, '#' lines are comments, and PaddleClas 'path label' lists "
            "work (the first field is taken)"
        ),
    )
    ap.add_argument("--out", required=True, help="output FILE.npy")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="images per forward pass (32; rounded up to a multiple of the local devices)",
    )
    ap.add_argument(
        "--no-normalize",
        action="store_true",
        help="write raw model outputs instead of L2-normalized features",
    )
    ap.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unreadable images (listed on stderr and in FILE.bad.txt) instead of failing",
    )
    ap.add_argument(
        "--pixel-scale",
        choices=sorted(PIXEL_SCALES),
        default=None,
        help="override the model's NormalizeImage scale: 1/255 (training/eval configs) or deploy "
        "(0.00392157, PaddleClas deploy/configs/inference_rec.yaml)",
    )
    ap.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="override the model's input size with a plain square resize to N x N",
    )
    ap.add_argument(
        "--output-key",
        default=None,
        help="override the model output saved: features (BNNeck) or backbone",
    )
    ap.add_argument(
        "--fuse",
        action="store_true",
        help="re-parameterize rep blocks (deploy form) first: faster, equal to float32 rounding",
    )
    rt = ap.add_mutually_exclusive_group()
    rt.add_argument(
        "--onnx",
        action="store_true",
        help="run the model dir's inference.onnx with onnxruntime instead of JAX",
    )
    rt.add_argument(
        "--int8",
        action="store_true",
        help="run the model dir's inference.int8.onnx (python -m jaxrec.export ... --int8)",
    )
    ap.add_argument("--workers", type=int, default=None, help="decoding threads")
    ap.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar or preprocessing line (notes about overrides are always printed)",
    )
    return ap


def _fused(md: ModelDir) -> ModelDir:
    if md.deploy:
        return md
    dtype = jnp.dtype(md.model.backbone.dtype).name
    model = build_model(resolve_arch(md.arch), deploy=True, dtype=dtype)
    return dataclasses.replace(md, model=model, variables=reparameterize(md.variables))


def main(argv: Sequence[str] | None = None) -> int:
    with warnings_as_lines():
        return _main(build_parser().parse_args(argv))


def _main(args: argparse.Namespace) -> int:

    out_npy, out_txt, out_bad = _out_paths(args.out)
    if args.batch_size < 1 or (args.image_size is not None and args.image_size < 1):
        print("error: --batch-size and --image-size must be positive", file=sys.stderr)
        return 2
    try:
        entries = resolve_images(args.images)
        md = load_model(args.model)
    except JaxrecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        pre, feat, notes = feeding_from_flags(
            md,
            image_size=args.image_size,
            pixel_scale=None if args.pixel_scale is None else PIXEL_SCALES[args.pixel_scale],
            output_key=args.output_key,
            normalize=False if args.no_normalize else None,
        )
    except ValueError as e:  # a flag value the Preprocess/FeatureSpec rejects
        print(f"error: {e}", file=sys.stderr)
        return 2
    if md.legacy:
        notes.insert(
            0,
            f"{args.model} has no preprocessing record (model directory format v1); using the "
            f"defaults jaxrec used for such models: {md.preprocess.describe()}",
        )
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    if not args.quiet:
        print(
            f"preprocessing: {pre.describe()}; features: {feat.output_key!r}"
            f"{', L2-normalized' if feat.normalize else ', raw'}",
            file=sys.stderr,
        )
    if args.fuse:
        md = _fused(md)
    forward = None
    if args.onnx or args.int8:
        if args.image_size is not None or args.output_key is not None:
            print(
                "error: --image-size and --output-key cannot change an ONNX graph; re-export",
                file=sys.stderr,
            )
            return 2
        from jaxrec.export.int8 import onnx_forward  # noqa: PLC0415 - export imports this module

        try:
            forward = onnx_forward(args.model, pre, feat.normalize, int8=args.int8)
        except JaxrecError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    names_by_path = {p: n for n, p in entries}
    errors: dict[str, str] = {}
    try:
        feats, kept = extract_features(
            md,
            [p for _, p in entries],
            batch_size=args.batch_size,
            preprocess=pre,
            features=feat,
            skip_bad=args.skip_bad,
            errors=errors,
            num_workers=args.workers,
            progress=not args.quiet,
            forward=forward,
        )
    except (image_lib.ImageDecodeError, OSError) as e:
        print(f"error: {e}\n(pass --skip-bad to skip unreadable images)", file=sys.stderr)
        return 1
    out_npy.parent.mkdir(parents=True, exist_ok=True)
    replaced = [p for p in (out_npy, out_txt) if p.exists()]
    np.save(out_npy, feats)
    out_txt.write_text("".join(names_by_path[p] + "\n" for p in kept))
    if replaced:
        print(f"note: replaced the existing {' and '.join(map(str, replaced))}", file=sys.stderr)
    if errors:
        for p, msg in errors.items():
            print(f"skipped {p}: {msg}", file=sys.stderr)
        out_bad.write_text("".join(f"{p}\t{msg}\n" for p, msg in errors.items()))
        print(f"{len(errors)} unreadable image(s) skipped, listed in {out_bad}", file=sys.stderr)
    elif out_bad.exists():
        out_bad.unlink()
    print(
        f"wrote {feats.shape[0]} x {feats.shape[1] if feats.ndim == 2 else 0} features to "
        f"{out_npy} and names to {out_txt}",
        file=sys.stderr,
    )
    return 0 if len(kept) else 1


if __name__ == "__main__":
    sys.exit(main())
