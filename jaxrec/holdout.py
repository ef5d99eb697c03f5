"""The benchmarks' class-disjoint protocol for any labelled set: ``python -m jaxrec.holdout``.

    python -m jaxrec.holdout --list data/all_list.txt --holdout-classes 0.5 --out splits/mine
    python -m jaxrec.holdout --folder images/ --holdout-classes 100 --out splits/mine

CUB-200-2011, Cars196 and Stanford Online Products measure retrieval on classes the model never
saw in training. This writes the same split of a list file or an image folder (one sub-folder
per class): the last classes in sorted label order are held out (a count, or a fraction below
1), and two lists come out, usable by any config:

* ``OUT/train_list.txt``: ``path label`` for the training classes
  (``DataLoader.Train.dataset``, name ImageNetDataset, with ``relabel: True`` and
  ``Arch.Head.class_num`` = the number printed);
* ``OUT/query_gallery_list.txt``: ``path label index`` for the held-out classes, the third
  column unique per image so that, used as both Query and Gallery (name VeriWild), no image
  retrieves itself (ref §8.3).

Paths are written absolute, so ``image_root`` can be ``OUT``. The split is deterministic (sorted
labels; records keep their order).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxrec.data import datasets
from jaxrec.data.protocols import holdout_split
from jaxrec.errors import DatasetError, JaxrecError
from jaxrec.prepare import add_source_args, source_from_args

TRAIN_LIST = "train_list.txt"
EVAL_LIST = "query_gallery_list.txt"


def _lines(source: datasets.Source, with_index: bool) -> str:
    rows = []
    for i, (path, label) in enumerate(zip(source.paths, source.labels, strict=True)):
        full = os.path.abspath(path)
        if any(c.isspace() for c in full):
            raise DatasetError(
                f"{source.describe(i)}: the path contains whitespace, which list files cannot "
                "hold; rename the file or folder"
            )
        rows.append(f"{full} {int(label)}" + (f" {i}" if with_index else ""))
    return "\n".join(rows) + "\n"


def write_holdout(source: datasets.Source, holdout: float, out: str | os.PathLike) -> dict:
    """Split ``source`` by class and write the two lists into ``out``; returns a summary."""
    train, held = holdout_split(source, holdout)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / TRAIN_LIST).write_text(_lines(train, False), encoding="utf-8")
    (out / EVAL_LIST).write_text(_lines(held, True), encoding="utf-8")
    return {
        "train_list": str(out / TRAIN_LIST),
        "eval_list": str(out / EVAL_LIST),
        "train_images": len(train),
        "train_classes": int(np.unique(train.labels).size),
        "eval_images": len(held),
        "eval_classes": int(np.unique(held.labels).size),
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m jaxrec.holdout",
        description="Split a labelled set by class into training and retrieval lists (the "
        "CUB/Cars/SOP protocol): the last classes in sorted order are held out.",
    )
    add_source_args(ap, tfds=False, classes=False)
    ap.add_argument(
        "--holdout-classes",
        type=float,
        required=True,
        help="classes held out for retrieval: a count (100) or a fraction (0.5)",
    )
    ap.add_argument("--out", required=True, help="output folder for the two lists")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        source = source_from_args(args)
        summary = write_holdout(source, args.holdout_classes, args.out)
    except JaxrecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"train: {summary['train_images']} images of {summary['train_classes']} classes -> "
        f"{summary['train_list']} (relabel: True, Arch.Head.class_num={summary['train_classes']})"
    )
    print(
        f"query == gallery: {summary['eval_images']} images of {summary['eval_classes']} "
        f"classes -> {summary['eval_list']} (name VeriWild)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
