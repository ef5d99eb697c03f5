"""Write Fashion-MNIST (IDX files) as PNG images plus PaddleClas-format list files.

The Debian package ``dataset-fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``) puts the
four IDX files in /usr/share/datasets/fashion-mnist. This tool splits the ten classes into
*training classes* and *unseen retrieval classes*, the usual metric-learning protocol:

    out/
      images/train/<class>/<n>.png      training classes (from the IDX train split)
      images/eval/<class>/<n>.png       unseen classes (from the IDX test split)
      train_list.txt                    "images/train/<class>/<n>.png <class>"   (ImageNetDataset)
      query_gallery_list.txt            "images/eval/<class>/<n>.png <class> <unique id>"
      classes.txt                       "<class> <name>"

Examples::

    python tools/prepare_fashion_mnist.py --out data/demo --train-per-class 300 --eval-per-class 100
    python tools/prepare_fashion_mnist.py --out /data/fmnist_full        # all 70,000 images

The demo data in data/demo was written with the first command.
"""

from __future__ import annotations

import argparse
import gzip
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array; errors name the file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SystemExit(
            f"{path} not found. Install it with 'apt-get install -y dataset-fashion-mnist' or "
            "pass --idx-dir."
        ) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise SystemExit(f"{path}: not an IDX file (bad magic {data[:4]!r})")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise SystemExit(f"{path}: only unsigned-byte IDX files are supported (type {dtype_code})")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise SystemExit(f"{path}: truncated ({body.size} bytes of data, header says {shape})")
    return body.reshape(shape)


def parse_classes(text: str) -> list[int]:
    """'0-5' or '6,7,9' -> list of class ids."""
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def write_split(
    images: np.ndarray,
    labels: np.ndarray,
    classes: list[int],
    per_class: int | None,
    root: Path,
    sub: str,
) -> list[tuple[str, int]]:
    """Save the first ``per_class`` images of each class as PNG; returns (relpath, label)."""
    rows: list[tuple[str, int]] = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if per_class is not None:
            idx = idx[:per_class]
        folder = root / "images" / sub / str(c)
        folder.mkdir(parents=True, exist_ok=True)
        for n, i in enumerate(idx):
            rel = f"images/{sub}/{c}/{n:05d}.png"
            Image.fromarray(images[i]).save(root / rel, format="PNG", optimize=True)
            rows.append((rel, int(c)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--idx-dir", default=DEFAULT_DIR, help="folder with the four IDX(.gz) files")
    ap.add_argument("--out", required=True, help="output folder (image_root of the lists)")
    ap.add_argument("--train-classes", default="0-5", help="classes for training (default 0-5)")
    ap.add_argument("--eval-classes", default="6-9", help="unseen retrieval classes (6-9)")
    ap.add_argument("--train-per-class", type=int, default=None, help="default: all images")
    ap.add_argument("--eval-per-class", type=int, default=None, help="default: all images")
    args = ap.parse_args()

    d = Path(args.idx_dir)

    def find(stem: str) -> Path:
        for cand in (d / f"{stem}.gz", d / stem):
            if cand.exists():
                return cand
        return d / f"{stem}.gz"

    tr_x = read_idx(find("train-images-idx3-ubyte"))
    tr_y = read_idx(find("train-labels-idx1-ubyte"))
    te_x = read_idx(find("t10k-images-idx3-ubyte"))
    te_y = read_idx(find("t10k-labels-idx1-ubyte"))
    train_classes = parse_classes(args.train_classes)
    eval_classes = parse_classes(args.eval_classes)
    if set(train_classes) & set(eval_classes):
        raise SystemExit(
            "--train-classes and --eval-classes overlap; retrieval classes must be unseen"
        )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = write_split(tr_x, tr_y, train_classes, args.train_per_class, out, "train")
    evals = write_split(te_x, te_y, eval_classes, args.eval_per_class, out, "eval")
    (out / "train_list.txt").write_text("".join(f"{p} {c}\n" for p, c in train))
    (out / "query_gallery_list.txt").write_text(
        "".join(f"{p} {c} {uid}\n" for uid, (p, c) in enumerate(evals))
    )
    (out / "classes.txt").write_text("".join(f"{c} {n}\n" for c, n in enumerate(CLASS_NAMES)))
    print(
        f"wrote {len(train)} training images ({len(train_classes)} classes) and {len(evals)} "
        f"retrieval images ({len(eval_classes)} classes) to {out}"
    )


if __name__ == "__main__":
    main()
