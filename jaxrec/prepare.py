"""Prepare a training set once: decode every image, resize it to the training size, store shards.

    python -m jaxrec.prepare --list data/train_list.txt --out /data/shitu_224 --size 224
    python -m jaxrec.prepare --folder images/train --out /data/demo_48 --size 48 --codec raw
    python -m jaxrec.prepare --tfds caltech_birds2011 --split train+test --classes 0 99 \
        --data-dir ~/tensorflow_datasets --out /data/cub_train_224 --size 224

A tensorflow-datasets split (``--tfds``, offline from ``--data-dir``) is a source like a list:
large benchmark sets then feed a GPU the same way (``--classes`` keeps a protocol's training
classes; the config's ``classes`` key may select them again, which changes nothing).

Then train from it with ``DataLoader.Train.dataset.name: PreparedDataset`` and
``DataLoader.Train.dataset.prepared_dir: /data/shitu_224`` (read by
``jaxrec.data.datasets.load_prepared``). Keep the original images (the default path) for small
sets and whenever exactness against PaddleClas matters more than speed.

**Why.** Decoding a full-size photo dominates the host pipeline (several milliseconds for a 1 MP
JPEG with libjpeg-turbo); a GPU needs about 1,000 training images/s per host core. A 224 px JPEG
decodes in well under a millisecond (BENCHMARKS.md), so the loader then spends most of its time
on the augmentation itself.

**What is stored, and how it differs from PaddleClas.** The PP-ShiTuV2 train chain is
``DecodeImage -> ResizeImage(224x224, aspect not kept) -> RandFlipImage -> Pad(10) ->
RandCropImageV2(224) -> RandomRotation -> ResizeImage(224) -> NormalizeImage -> RandomErasing``.
Its first two operators are deterministic and everything random reads only their output, so the
prepared set stores exactly that output (``TrainTransform.prepare``: decode, then the
size x size bilinear resize). The random crops, flips, rotations and erasing then work on the
same size x size image as PaddleClas's: in PaddleClas too the crop comes after the resize (its
margin is the 10 px black padding), never from the full image. Hence:

* ``--codec raw`` (uint8 pixels, size*size*3 bytes per image): batches are bit-identical to the
  original-image path (tested);
* ``--codec jpeg`` (default; quality 95, 4:4:4 chroma, about 33 KiB at 224): the only difference
  is the JPEG error of the stored image, about 1.6/255 mean absolute difference on real photos
  (BENCHMARKS.md, "Input pipeline: OpenCV kernels and the prepared set").

A set stored at "short side = size + crop margin, aspect kept" would be worse for this chain:
every image would be resampled twice (stored size, then the squashing 224x224 resize), so no
pixel would match PaddleClas's, while the chain never reads anything outside the squashed image.
The size is recorded and ``load_prepared(size=...)`` refuses a set prepared at another size.

**Format.** ``OUT/shards/NNNNN.bin`` hold the encoded images back to back (each a complete JPEG
file, or raw pixels); ``OUT/records.npy`` is one structured row per image (label, third-column
id, list line, shard, offset, length; ``jaxrec.data.datasets.PREPARED_RECORD_DTYPE``);
``OUT/paths.txt`` the original paths; ``OUT/prepared.json`` the manifest, written last. Plain
files rather than ArrayRecord: random access needs nothing but an offset table (one ``pread`` per
image, no per-record framing to parse, no extra C++ dependency), numpy reads the index, every
image can be cut out with ``dd``, and a shard is written whole and renamed into place, which is
what makes resuming simple. A grain user can wrap the returned ``Source`` (``len`` and ``read``).

**Parallel and resumable.** Shards of ``--shard-size`` consecutive list entries are prepared by a
thread pool (OpenCV and Pillow release the GIL). Each shard is written to a temporary file,
flushed and renamed, then its small JSON index is renamed into place; a rerun of the same command
after a kill skips finished shards and redoes the rest. The output depends only on the inputs and
settings (not on the worker count or on interruptions), and a rerun with other inputs or settings
is refused unless ``--overwrite`` is given. One process at a time per output folder (locked).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from jaxrec.config.spec import TFDSSpec
from jaxrec.data import datasets
from jaxrec.data.datasets import Source
from jaxrec.data.image import cv2
from jaxrec.data.loader import BadImageError, Decoder, decode_pool
from jaxrec.data.protocols import select_classes
from jaxrec.data.transforms import TrainTransform
from jaxrec.errors import DatasetError, JaxrecError, disk_full, is_disk_full
from jaxrec.inputs import tfds_source

CODECS = ("jpeg", "raw")
_PLAN = "plan.json"
_LOCK = ".lock"
_OWN_FILES = (
    datasets.PREPARED_MANIFEST,
    datasets.PREPARED_RECORDS,
    datasets.PREPARED_PATHS,
    _PLAN,
)
_OWN_NAMES = {*_OWN_FILES, _LOCK, datasets.PREPARED_SHARDS}


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
    """What the stored bytes depend on besides the images (part of the plan a rerun must match)."""

    size: int
    codec: str = "jpeg"
    quality: int = 95
    shard_size: int = 2048

    def __post_init__(self) -> None:
        if self.size < 1:
            raise DatasetError(f"--size must be positive, got {self.size}")
        if self.codec not in CODECS:
            raise DatasetError(f"--codec must be one of {CODECS}, got {self.codec!r}")
        if not 1 <= self.quality <= 100:
            raise DatasetError(f"--quality must be in 1..100, got {self.quality}")
        if self.shard_size < 1:
            raise DatasetError(f"--shard-size must be positive, got {self.shard_size}")

    @property
    def encoder(self) -> str:
        if self.codec == "raw":
            return "raw"
        return f"opencv {cv2.__version__}" if cv2 is not None else "pillow"

    def encode(self, img: np.ndarray) -> bytes:
        """The stored bytes of one prepared uint8 RGB image."""
        if self.codec == "raw":
            return np.ascontiguousarray(img).tobytes()
        if cv2 is not None:
            params = [
                cv2.IMWRITE_JPEG_QUALITY,
                self.quality,
                cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
            ]
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), params)
            if not ok:
                raise RuntimeError("OpenCV could not encode a JPEG")
            return buf.tobytes()
        out = io.BytesIO()
        Image.fromarray(img).save(out, format="JPEG", quality=self.quality, subsampling=0)
        return out.getvalue()


def _plan(source: Source, settings: PrepareSettings) -> dict:
    """Everything the output depends on; its fingerprint decides whether a rerun may resume."""
    h = hashlib.sha256()
    uids = source.uids if source.uids is not None else np.zeros(len(source), np.int64)
    lines = source.lines if source.lines is not None else np.zeros(len(source), np.int64)
    chunk = 65536
    for lo in range(0, len(source), chunk):
        hi = min(len(source), lo + chunk)
        rows = zip(
            source.paths[lo:hi], source.labels[lo:hi], uids[lo:hi], lines[lo:hi], strict=True
        )
        h.update("".join(f"{p}\t{lab}\t{u}\t{n}\n" for p, lab, u, n in rows).encode())
    return {
        "kind": datasets.PREPARED_KIND,
        "version": datasets.PREPARED_VERSION,
        "source": source.name,
        "images": len(source),
        "fingerprint": h.hexdigest(),
        "encoder": settings.encoder,
        **dataclasses.asdict(settings),
    }


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _shard_index_path(out: Path, shard: int) -> Path:
    return out / datasets.PREPARED_SHARDS / f"{shard:05d}.json"


def _shard_done(out: Path, shard: int) -> dict | None:
    """The index of a finished shard, or None (absent, or its data file is incomplete)."""
    try:
        index = json.loads(_shard_index_path(out, shard).read_text())
        size = os.path.getsize(datasets.prepared_shard_path(out, shard))
    except (OSError, ValueError):
        return None
    return index if size == sum(index["lengths"]) else None


def _prepare_shard(
    decoder: Decoder, settings: PrepareSettings, out: Path, shard: int, lo: int, hi: int
) -> int:
    """Decode, resize and encode records lo..hi-1 into shard ``shard``; returns images kept.
    A full disk is one `DiskFullError` (the partial shard is removed; finished ones are kept)."""
    path = Path(datasets.prepared_shard_path(out, shard))
    tmp = path.with_name(path.name + ".tmp")
    try:
        return _write_shard(decoder, settings, out, shard, lo, hi, path, tmp)
    except OSError as e:
        if not is_disk_full(e):
            raise
        tmp.unlink(missing_ok=True)
        raise disk_full(
            f"shard {shard}",
            str(path.parent),
            hint="rerun the same command to continue (finished shards are kept)",
        ) from None


def _write_shard(
    decoder: Decoder,
    settings: PrepareSettings,
    out: Path,
    shard: int,
    lo: int,
    hi: int,
    path: Path,
    tmp: Path,
) -> int:
    kept: list[int] = []
    lengths: list[int] = []
    skipped: list[list] = []
    with open(tmp, "wb") as f:
        for i in range(lo, hi):
            img = decoder.load(i)
            if img is None:
                skipped.append([i, decoder.bad[i]])
                continue
            data = settings.encode(img)
            f.write(data)
            kept.append(i)
            lengths.append(len(data))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    index = {"records": kept, "lengths": lengths, "skipped": skipped}
    _write_atomic(_shard_index_path(out, shard), json.dumps(index).encode())
    return len(kept)


@contextlib.contextmanager
def _claim(out: Path, plan: dict, overwrite: bool) -> Iterator[None]:
    """Lock ``out`` and make sure it holds this plan (new folder, same plan, or --overwrite)."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {out} exists and is not a folder")
    existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [n for n in existing if n.removesuffix(".tmp") not in _OWN_NAMES]
    if foreign:
        raise DatasetError(
            f"--out {out} holds files that are not part of a jaxrec prepared dataset "
            f"({foreign[:5]}); choose a new or empty folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    with open(out / _LOCK, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DatasetError(f"another jaxrec.prepare is writing {out}") from None
        if (out / _PLAN).exists():
            old = json.loads((out / _PLAN).read_text())
            if old != plan:
                if not overwrite:
                    diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
                    raise DatasetError(
                        f"{out} holds a preparation of other inputs or settings (differs in "
                        f"{diff}); use another --out, or --overwrite to replace it"
                    )
                for name in _OWN_FILES:
                    (out / name).unlink(missing_ok=True)
                shutil.rmtree(out / datasets.PREPARED_SHARDS, ignore_errors=True)
        (out / datasets.PREPARED_SHARDS).mkdir(exist_ok=True)
        if not (out / _PLAN).exists():
            _write_atomic(out / _PLAN, json.dumps(plan, indent=1, sort_keys=True).encode())
        yield


def _finish(out: Path, source: Source, plan: dict, num_shards: int) -> dict:
    """Assemble records.npy, paths.txt and the manifest from the finished shards."""
    kept: list[np.ndarray] = []
    shard_of: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    offsets: list[np.ndarray] = []
    skipped = []
    for k in range(num_shards):
        index = _shard_done(out, k)
        assert index is not None, k
        ln = np.asarray(index["lengths"], np.int64)
        kept.append(np.asarray(index["records"], np.int64))
        lengths.append(ln)
        offsets.append(np.concatenate([[0], np.cumsum(ln)[:-1]]).astype(np.int64))
        shard_of.append(np.full(ln.size, k, np.int32))
        skipped += [
            {"path": source.paths[i], "where": source.describe(i), "error": why}
            for i, why in index["skipped"]
        ]
    idx = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    if idx.size == 0:
        raise DatasetError(f"{source.name}: no image could be read; nothing was prepared")
    rec = np.zeros(idx.size, datasets.PREPARED_RECORD_DTYPE)
    rec["label"] = source.labels[idx]
    if source.uids is not None:
        rec["uid"] = source.uids[idx]
    if source.lines is not None:
        rec["line"] = source.lines[idx]
    rec["shard"] = np.concatenate(shard_of)
    rec["length"] = np.concatenate(lengths)
    rec["offset"] = np.concatenate(offsets)
    buf = io.BytesIO()
    np.save(buf, rec)
    _write_atomic(out / datasets.PREPARED_RECORDS, buf.getvalue())
    paths = "\n".join(source.paths[int(i)] for i in idx)
    _write_atomic(out / datasets.PREPARED_PATHS, paths.encode("utf-8"))
    manifest = {
        **plan,
        "records": int(idx.size),
        "shards": num_shards,
        "has_uids": source.uids is not None,
        "class_names": list(source.class_names) if source.class_names else None,
        "skipped": skipped,
    }
    _write_atomic(
        out / datasets.PREPARED_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode()
    )
    return manifest


def prepare(
    source: Source,
    out: str | os.PathLike,
    settings: PrepareSettings,
    *,
    workers: int | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Prepare ``source`` into ``out`` (resuming a partial run of the same plan); the manifest.

    Unreadable images raise :class:`jaxrec.data.loader.BadImageError` naming the file and list
    line (finished shards are kept, so a rerun after fixing it resumes); with ``skip_bad`` they
    are left out and listed in the manifest's ``skipped``.
    """
    out = Path(out)
    plan = _plan(source, settings)
    num_shards = -(-len(source) // settings.shard_size)
    with _claim(out, plan, overwrite):
        if (out / datasets.PREPARED_MANIFEST).exists():
            return datasets.read_prepared_manifest(out)
        decoder = Decoder(source, skip_bad, TrainTransform(size=settings.size).prepare)
        spans = {
            k: (k * settings.shard_size, min(len(source), (k + 1) * settings.shard_size))
            for k in range(num_shards)
            if _shard_done(out, k) is None
        }
        bar = None
        if progress:
            done = len(source) - sum(hi - lo for lo, hi in spans.values())
            bar = tqdm(total=len(source), initial=done, unit="img", file=sys.stderr)
        with decode_pool(workers or os.cpu_count(), "jaxrec-prepare") as pool:
            futures = {
                pool.submit(_prepare_shard, decoder, settings, out, k, lo, hi): hi - lo
                for k, (lo, hi) in spans.items()
            }
            try:
                for f in cf.as_completed(futures):
                    f.result()
                    if bar is not None:
                        bar.update(futures[f])
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            finally:
                if bar is not None:
                    bar.close()
        return _finish(out, source, plan, num_shards)


def add_source_args(ap: argparse.ArgumentParser, *, tfds: bool, classes: bool) -> None:
    """--list | --folder (| --tfds with its options), --image-root, --delimiter (, --classes)."""
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--list", help="PaddleClas list file: 'path label' per line")
    src.add_argument("--folder", help="image folder with one sub-folder per class")
    ap.add_argument(
        "--image-root", help="root the list's paths are relative to (default: its folder)"
    )
    ap.add_argument("--delimiter", default=" ", help="list field delimiter (default: one space)")
    if tfds:
        src.add_argument("--tfds", help="tensorflow-datasets name, read offline from --data-dir")
        ap.add_argument("--split", default="train", help="tfds split (default train)")
        ap.add_argument("--data-dir", help="folder `tfds build` wrote (default: tfds's default)")
        ap.add_argument("--image-key", default="image", help="tfds image feature (default image)")
        ap.add_argument("--label-key", default="label", help="tfds label feature (default label)")
    if classes:
        ap.add_argument(
            "--classes",
            type=int,
            nargs=2,
            metavar=("FIRST", "LAST"),
            help="keep only labels FIRST..LAST (inclusive), e.g. a protocol's training classes",
        )


def source_from_args(args: argparse.Namespace) -> datasets.Source:
    """The source the parsed arguments name (DatasetError when it cannot be opened)."""
    if args.list:
        source = datasets.load_list(args.list, args.image_root, delimiter=args.delimiter)
    elif getattr(args, "tfds", None):
        source = tfds_source(
            TFDSSpec(
                name=args.tfds,
                split=args.split,
                data_dir=args.data_dir,
                image_key=args.image_key,
                label_key=args.label_key,
                uid_key=None,
            )
        )
    else:
        source = datasets.load_image_folder(args.folder)
    if getattr(args, "classes", None):
        source = select_classes(source, args.classes, "--classes")
    return source


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m jaxrec.prepare",
        description="Decode a training set once and store it at the training size, in shards "
        "(resumable: rerun the same command after an interruption).",
    )
    add_source_args(ap, tfds=True, classes=True)
    ap.add_argument("--out", required=True, help="output folder (new, or a partial run to resume)")
    ap.add_argument(
        "--size", type=int, required=True, help="training size (the train chain's ResizeImage)"
    )
    ap.add_argument("--codec", choices=CODECS, default="jpeg", help="jpeg (compact) or raw (exact)")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    ap.add_argument("--shard-size", type=int, default=2048, help="images per shard file")
    ap.add_argument("--workers", type=int, default=None, help="threads (default: all cores)")
    ap.add_argument("--skip-bad", action="store_true", help="leave unreadable images out")
    ap.add_argument("--overwrite", action="store_true", help="replace another preparation in --out")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        settings = PrepareSettings(args.size, args.codec, args.quality, args.shard_size)
        source = source_from_args(args)
        manifest = prepare(
            source,
            args.out,
            settings,
            workers=args.workers,
            skip_bad=args.skip_bad,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except BadImageError as e:
        print(f"error: {e} (or pass --skip-bad to leave it out)", file=sys.stderr)
        return 1
    except JaxrecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for item in manifest["skipped"]:
        print(f"skipped {item['where']}: {item['error']}", file=sys.stderr)
    print(
        f"prepared {manifest['records']} images ({len(manifest['skipped'])} skipped) at "
        f"{manifest['size']}x{manifest['size']} ({manifest['codec']}) in {args.out} "
        f"[{time.perf_counter() - t0:.1f} s]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
