"""The labelled-set arguments the data CLIs share (`jaxrec.prepare`, `jaxrec.holdout`).

One place for the choice list file / image folder / tfds split, its options, and turning the
parsed arguments into a :class:`~jaxrec.data.datasets.Source`, so the commands accept the same
sources with the same flags and messages.
"""

from __future__ import annotations

import argparse

from jaxrec.data import datasets
from jaxrec.data.protocols import select_classes


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
        from jaxrec.config.spec import TFDSSpec
        from jaxrec.data.builders import tfds_source

        source = tfds_source(
            TFDSSpec(args.tfds, args.split, args.data_dir, args.image_key, args.label_key)
        )
    else:
        source = datasets.load_image_folder(args.folder)
    if getattr(args, "classes", None):
        source = select_classes(source, args.classes, "--classes")
    return source
