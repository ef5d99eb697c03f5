"""Image files -> L2-normalized feature vectors, the way PaddleClas's ``predict_rec`` computes them.

Library: :func:`extract_features` (used by search and evaluation) and :func:`resolve_images`.
CLI: ``python -m jaxrec.extract --model DIR --images PATH --out FILE.npy`` (see ``--help``).

Per image: decode (OpenCV semantics, RGB) -> bilinear resize to 224x224 (cv2 bit-exact) ->
``(x/255 - mean)/std`` -> model in eval mode -> ``features`` -> ``x / ||x||``. Decoding runs on a
thread pool while the device computes the previous batch; every batch has the same shape (the
last one is padded) so the forward pass compiles once.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxrec.data import image as image_lib

IMAGE_EXTS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
IMAGE_EXTS += (".ppm", ".pgm", ".pbm", ".pnm")
LIST_EXTS = (".txt", ".lst", ".list", ".csv", ".tsv")

PIXEL_SCALES = {"1/255": image_lib.SCALE_TRAIN, "deploy": image_lib.SCALE_DEPLOY}


class ImageListError(ValueError):
    """A problem with an image list file; the message names the file and line."""


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_image_list(list_file: str | os.PathLike) -> list[tuple[str, str]]:
    """(display name, resolved path) for each line of an image list file.

    One image per line; blank lines and lines starting with ``#`` are skipped. Relative paths are
    resolved against the list file's folder. PaddleClas label lists (``path label [id]``) work
    too: when the whole line is not an existing file, its first whitespace-separated field is used.
    """
    list_file = Path(list_file)
    base = list_file.parent
    out = []
    with open(list_file, encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            rel = line
            if not (base / rel).is_file() and len(line.split()) > 1:
                rel = line.split()[0]
            out.append((rel, str(base / rel)))
    if not out:
        raise ImageListError(f"image list {str(list_file)!r} has no image paths")
    return out


def resolve_images(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(name, path) pairs for PATH = an image file, a folder or a list file.

    Folders are searched recursively for image extensions (``IMAGE_EXTS``) and sorted by their
    relative path; names are paths relative to the folder. A list file gives the paths as written
    in it. A single image is named by its file name.
    """
    p = Path(path)
    if p.is_dir():
        found = sorted(
            str(q.relative_to(p)) for q in p.rglob("*") if q.is_file() and _is_image_name(q)
        )
        if not found:
            raise FileNotFoundError(
                f"no images found under folder {str(p)!r} (extensions: {', '.join(IMAGE_EXTS)})"
            )
        return [(name, str(p / name)) for name in found]
    if not p.exists():
        raise FileNotFoundError(f"--images {str(p)!r} does not exist")
    if _is_image_name(p):
        return [(p.name, str(p))]
    if p.suffix.lower() in LIST_EXTS or _looks_like_text(p):
        return read_image_list(p)
    return [(p.name, str(p))]


def _load(path: str, size: int) -> np.ndarray:
    return image_lib.preprocess_for_rec(image_lib.decode_image(path), size)


@functools.cache
def _jitted_forward():
    import jax

    def forward(model, output_key, pixel_scale, variables, x):
        x = image_lib.normalize(x, scale=pixel_scale)
        return model.apply(variables, x, train=False)[output_key]

    # The model is a static argument: equal models (same Arch) share compiled executables.
    return jax.jit(forward, static_argnums=(0, 1, 2))


def make_forward(
    model: Any, output_key: str = "features", pixel_scale: float = image_lib.SCALE_TRAIN
) -> Callable[[Any, Any], Any]:
    """Jitted ``(variables, uint8 NHWC) -> model(normalize(x), train=False)[output_key]``."""
    fwd = _jitted_forward()
    return functools.partial(fwd, model, output_key, float(pixel_scale))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm, as predict_rec does; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.sqrt(np.sum(np.square(x), axis=1, keepdims=True))
    return x / np.maximum(norm, np.float32(1e-12))


def extract_features(
    model: Any,
    variables: Mapping[str, Any],
    paths: Sequence[str],
    batch_size: int = 32,
    normalize: bool = True,
    *,
    image_size: int = 224,
    output_key: str = "features",
    pixel_scale: float = image_lib.SCALE_TRAIN,
    skip_bad: bool = False,
    errors: dict[str, str] | None = None,
    num_workers: int | None = None,
    progress: bool = False,
    forward: Callable[[Any, Any], Any] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Features [N, D] float32 of the images at ``paths`` and the paths they belong to, in order.

    An unreadable image raises (the message names it) unless ``skip_bad``; skipped paths are then
    left out of the result and, if ``errors`` is a dict, recorded there as path -> message.
    ``forward`` may be a prebuilt :func:`make_forward` (to share its compilation across calls).
    """
    import jax

    paths = list(paths)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if forward is None:
        forward = make_forward(model, output_key, pixel_scale)
    bs = max(1, min(batch_size, len(paths)))
    workers = num_workers or min(8, (os.cpu_count() or 2) + 2)
    bar = None
    if progress:
        from tqdm import tqdm

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
                pending.append((p, pool.submit(_load, p, image_size)))
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
                out = forward(variables, jax.device_put(batch))  # dispatched asynchronously
                if in_flight is not None:
                    feats.append(np.asarray(in_flight[0], dtype=np.float32)[: in_flight[1]])
                in_flight = (out, n)
                names.extend(kept)
            if in_flight is not None:
                feats.append(np.asarray(in_flight[0], dtype=np.float32)[: in_flight[1]])
        finally:
            if bar is not None:
                bar.close()
    if feats:
        result = np.concatenate(feats, axis=0)
    else:
        result = np.zeros((0, 0), np.float32)
    if normalize and len(result):
        result = l2_normalize(result)
    return result, names


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
            "Compute recognition features for images, as PaddleClas's predict_rec does: decode "
            "(OpenCV semantics), resize to 224x224 (bilinear, aspect ratio not kept), normalize "
            "with ImageNet mean/std, run the model in eval mode and L2-normalize each feature."
        ),
        epilog=(
            "Outputs: FILE.npy (N x D float32, rows in input order), FILE.txt (one image name per "
            "line, same order: the path relative to the folder, as written in the list, or the "
            "file name for a single image) and, with --skip-bad, FILE.bad.txt (path<TAB>error of "
            "each skipped image)."
        ),
    )
    ap.add_argument("--model", required=True, help="jaxrec model directory (jaxrec.convert output)")
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
    ap.add_argument("--batch-size", type=int, default=32, help="images per forward pass (32)")
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
        default="1/255",
        help="NormalizeImage scale: 1/255 (training/eval configs, default) or deploy "
        "(0.00392157, deploy/configs/inference_rec.yaml)",
    )
    ap.add_argument("--image-size", type=int, default=224, help="square input size (224)")
    ap.add_argument(
        "--output-key",
        default=None,
        help="model output to save: features (BNNeck, default from the Arch's infer_output_key) "
        "or backbone",
    )
    ap.add_argument(
        "--fuse",
        action="store_true",
        help="re-parameterize rep blocks (deploy form) first: faster, equal to float32 rounding",
    )
    ap.add_argument("--workers", type=int, default=None, help="decoding threads")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jaxrec import models

    out_npy, out_txt, out_bad = _out_paths(args.out)
    try:
        entries = resolve_images(args.images)
    except (FileNotFoundError, ImageListError, UnicodeDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        model, variables, arch = models.load_model_dir(args.model)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: --model {args.model}: {e}", file=sys.stderr)
        return 2
    if args.fuse and not arch.get("deploy", False):
        model = models.build_model({**arch, "deploy": True})
        variables = models.reparameterize(variables)
    output_key = args.output_key or arch.get("infer_output_key", "features")
    names_by_path = {p: n for n, p in entries}
    errors: dict[str, str] = {}
    try:
        feats, kept = extract_features(
            model,
            variables,
            [p for _, p in entries],
            batch_size=args.batch_size,
            normalize=not args.no_normalize,
            image_size=args.image_size,
            output_key=output_key,
            pixel_scale=PIXEL_SCALES[args.pixel_scale],
            skip_bad=args.skip_bad,
            errors=errors,
            num_workers=args.workers,
            progress=not args.quiet,
        )
    except (image_lib.ImageDecodeError, OSError) as e:
        print(f"error: {e}\n(pass --skip-bad to skip unreadable images)", file=sys.stderr)
        return 1
    out_npy.parent.mkdir(parents=True, exist_ok=True)
    np.save(out_npy, feats)
    out_txt.write_text("".join(names_by_path[p] + "\n" for p in kept))
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
