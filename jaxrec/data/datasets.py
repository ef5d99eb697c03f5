"""Dataset sources with one record shape: PaddleClas list files, query/gallery lists, tfds, folders.

Every loader returns a :class:`Source`: image names, int64 labels, optional int64 third-column ids
(camera or unique id, used to exclude self-matches when query and gallery are the same list), the
list line each record came from, and ``read(i)`` giving the encoded image bytes (or, for sources
that only hold pixels, a uint8 array). Decoding and augmentation live elsewhere.

:func:`load_prepared` opens a prepared dataset written by ``python -m jaxrec.prepare`` (images
decoded once and stored at the training size; see ``jaxrec/prepare.py``); the layout constants
below are shared with that writer.

List semantics follow PaddleClas (ref §6.1/6.2/12.2):

* training lists (``ImageNetDataset``): ``path<delim>label`` with a single-space delimiter by
  default, fields beyond the second ignored; ``relabel`` maps labels to 0..K-1 in sorted order;
* query/gallery lists (``VeriWild``): ``path label [unique_id]`` split on any whitespace.

Unlike the reference, blank lines are skipped, a malformed line raises :class:`DatasetError`
naming the file, the line number and what is wrong, and all missing images are reported at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

# The list-line parser and the extension list live in lists.py (shared with extract and search);
# they stay importable from here.
from jaxrec.data.lists import IMAGE_EXTENSIONS, parse_label_lines, read_lines
from jaxrec.errors import DatasetError

MAX_REPORTED = 20


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """A random-access image dataset with one record shape.

    Attributes:
      name: human-readable origin (list file, folder or tfds name), used in error messages.
      paths: image path (or synthetic name for tfds) per record.
      labels: int64 labels, ``[N]``.
      uids: int64 third-column ids (camera or unique id), ``[N]``, or None when absent.
      lines: 1-based line number in the list file per record, or None for non-list sources.
      class_names: names for labels 0..K-1 when known (folders, tfds ClassLabel).
      reader: ``reader(i)`` returns the encoded bytes (or a uint8 HWC/HW array) of record i.
    """

    name: str
    paths: Sequence[str]
    labels: np.ndarray
    reader: Callable[[int], bytes | np.ndarray]
    uids: np.ndarray | None = None
    lines: np.ndarray | None = None
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.paths)
        if self.labels.shape != (n,):
            raise ValueError(f"labels shape {self.labels.shape} does not match {n} paths")
        if self.uids is not None and self.uids.shape != (n,):
            raise ValueError(f"uids shape {self.uids.shape} does not match {n} paths")

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> bytes | np.ndarray:
        """Encoded bytes (or pixels) of record ``i``."""
        return self.reader(int(i))

    def describe(self, i: int) -> str:
        """Where record ``i`` comes from, for error messages: path and list line."""
        where = f"{self.paths[i]}"
        if self.lines is not None:
            where += f" ({self.name} line {int(self.lines[i])})"
        else:
            where += f" (from {self.name})"
        return where

    @property
    def num_classes(self) -> int:
        """Number of distinct labels."""
        return int(np.unique(self.labels).size)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Source:
        """A new source holding only ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        base = self

        return Source(
            name=self.name,
            paths=[self.paths[i] for i in idx],
            labels=self.labels[idx],
            reader=lambda j: base.read(int(idx[j])),
            uids=None if self.uids is None else self.uids[idx],
            lines=None if self.lines is None else self.lines[idx],
            class_names=self.class_names,
        )


def _file_reader(paths: Sequence[str]) -> Callable[[int], bytes]:
    def read(i: int) -> bytes:
        with open(paths[i], "rb") as f:
            return f.read()

    return read


def _check_files(paths: Sequence[str], lines: Sequence[int], list_file: str) -> None:
    missing = [(p, n) for p, n in zip(paths, lines, strict=True) if not os.path.isfile(p)]
    if missing:
        shown = "\n".join(f"  line {n}: {p}" for p, n in missing[:MAX_REPORTED])
        more = (
            f"\n  ... and {len(missing) - MAX_REPORTED} more" if len(missing) > MAX_REPORTED else ""
        )
        raise DatasetError(
            f"{len(missing)} of {len(paths)} images listed in {list_file} do not exist:\n"
            f"{shown}{more}\nCheck image_root (paths are joined onto it) and the list file."
        )


def relabel_map(labels: np.ndarray) -> dict[int, int]:
    """Sorted-unique map old label -> 0..K-1 (PaddleClas ``relabel`` for dense labels)."""
    return {int(old): new for new, old in enumerate(np.unique(labels))}


def _resolve_root(list_path: str | os.PathLike, image_root: str | os.PathLike | None) -> str:
    root = Path(image_root) if image_root is not None else Path(list_path).parent
    if not root.is_dir():
        raise DatasetError(f"image_root {root} does not exist (or is not a directory)")
    return str(root)


def load_list(
    list_path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    delimiter: str | None = " ",
    relabel: bool = False,
    check_files: bool = True,
) -> Source:
    """PaddleClas ``ImageNetDataset`` list: ``path label`` per line, joined onto ``image_root``.

    ``image_root`` defaults to the list file's folder. ``relabel`` maps labels to 0..K-1 by sorted
    order. Every referenced file must exist (``check_files``); all missing ones are reported.
    """
    return _list_source(
        list_path, image_root, relabel, check_files, delimiter=delimiter, max_used_fields=2
    )


def load_query_gallery_list(
    list_path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    relabel: bool = False,
    check_files: bool = True,
) -> Source:
    """VeriWild-style eval list: ``path label [unique_id]`` split on any whitespace.

    The optional third column (camera or unique id) lands in ``Source.uids``; when query and
    gallery are the same list it must be unique per image so an image does not match itself.
    """
    return _list_source(
        list_path, image_root, relabel, check_files, delimiter=None, max_used_fields=3
    )


def _list_source(
    list_path: str | os.PathLike,
    image_root: str | os.PathLike | None,
    relabel: bool,
    check_files: bool,
    *,
    delimiter: str | None,
    max_used_fields: int,
) -> Source:
    """Parse a label list, resolve and check its paths, optionally relabel (both list loaders)."""
    name = str(list_path)
    paths, labels, uids, linenos = parse_label_lines(
        read_lines(list_path, "label list"),
        name,
        delimiter=delimiter,
        max_used_fields=max_used_fields,
    )
    if not paths:
        raise DatasetError(f"{name}: the list has no entries")
    root = _resolve_root(list_path, image_root)
    full = [os.path.join(root, p) for p in paths]
    if check_files:
        _check_files(full, linenos, name)
    lab = np.asarray(labels, dtype=np.int64)
    if relabel:
        mapping = relabel_map(lab)
        lab = np.asarray([mapping[int(v)] for v in lab], dtype=np.int64)
    return Source(
        name=name,
        paths=full,
        labels=lab,
        reader=_file_reader(full),
        uids=None if uids is None else np.asarray(uids, dtype=np.int64),
        lines=np.asarray(linenos, dtype=np.int64),
    )


def load_image_folder(
    root: str | os.PathLike, *, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> Source:
    """A folder tree with one sub-folder per class; labels follow sorted class-folder names.

    Files are taken in sorted order within each class; hidden files and files with other
    extensions are ignored; classes without images are an error (they would shift labels).
    """
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"image folder {base} does not exist (or is not a directory)")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"{base}: no class sub-folders found (expected root/<class>/<image>)")
    exts = tuple(e.lower() for e in extensions)
    paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, cls in enumerate(classes):
        files = sorted(
            f.name
            for f in (base / cls).iterdir()
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in exts
        )
        if not files:
            empty.append(cls)
        paths.extend(str(base / cls / f) for f in files)
        labels.extend([label] * len(files))
    if empty:
        raise DatasetError(
            f"{base}: class folder(s) without images: {empty[:MAX_REPORTED]} "
            f"(accepted extensions: {', '.join(exts)}). Remove them or add images."
        )
    return Source(
        name=str(base),
        paths=paths,
        labels=np.asarray(labels, dtype=np.int64),
        reader=_file_reader(paths),
        class_names=tuple(classes),
    )


# ---- prepared datasets (written by jaxrec.prepare) ---------------------------------------------

PREPARED_MANIFEST = "prepared.json"  # written last: its presence marks a finished preparation
PREPARED_KIND = "jaxrec-prepared"
PREPARED_VERSION = 1
PREPARED_RECORDS = "records.npy"  # one row per kept image, in list order
PREPARED_PATHS = "paths.txt"  # the original image path per record, one a line
PREPARED_SHARDS = "shards"  # shards/NNNNN.bin: the encoded images, back to back
#: Row of records.npy. ``line`` is the list line (0 when unknown), ``uid`` the third column
#: (only meaningful when the manifest says ``has_uids``).
PREPARED_RECORD_DTYPE = np.dtype(
    [
        ("label", "<i8"),
        ("uid", "<i8"),
        ("line", "<i8"),
        ("shard", "<i4"),
        ("length", "<i4"),
        ("offset", "<i8"),
    ]
)


def prepared_shard_path(root: str | os.PathLike, shard: int) -> str:
    return os.path.join(os.fspath(root), PREPARED_SHARDS, f"{shard:05d}.bin")


def read_prepared_manifest(root: str | os.PathLike) -> dict:
    """The manifest of a finished prepared dataset, or a DatasetError saying what is wrong."""
    path = os.path.join(os.fspath(root), PREPARED_MANIFEST)
    if not os.path.isfile(path):
        hint = (
            "the preparation has not finished: run the same python -m jaxrec.prepare command "
            "again to complete it"
            if os.path.isdir(os.path.join(os.fspath(root), PREPARED_SHARDS))
            else "create it with python -m jaxrec.prepare"
        )
        raise DatasetError(f"{root} is not a prepared dataset (no {PREPARED_MANIFEST}): {hint}")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("kind") != PREPARED_KIND or manifest.get("version") != PREPARED_VERSION:
        raise DatasetError(
            f"{path}: not a version-{PREPARED_VERSION} jaxrec prepared dataset (kind "
            f"{manifest.get('kind')!r}, version {manifest.get('version')!r}); prepare it again"
        )
    return manifest


def load_prepared(
    root: str | os.PathLike, *, size: int | None = None, relabel: bool = False
) -> Source:
    """A dataset prepared by ``python -m jaxrec.prepare``: small images, read from shards.

    Records are the original list's images in list order (minus those skipped as unreadable),
    with their labels, list lines and third-column ids; ``read(i)`` returns the stored JPEG bytes
    (decoded like any file) or, for the ``raw`` codec, the uint8 ``[size, size, 3]`` pixels.
    ``size``, when given, must equal the size the set was prepared at (the training size).
    ``relabel`` maps labels to 0..K-1 as :func:`load_list` does.
    """
    root = os.fspath(root)
    manifest = read_prepared_manifest(root)
    stored = int(manifest["size"])
    if size is not None and int(size) != stored:
        raise DatasetError(
            f"{root} holds images prepared at {stored}x{stored} px but training uses {size}x{size}:"
            f" run python -m jaxrec.prepare again with --size {size} (into another folder)"
        )
    rec = np.load(os.path.join(root, PREPARED_RECORDS))
    with open(os.path.join(root, PREPARED_PATHS), encoding="utf-8") as f:
        paths = f.read().split("\n")[: rec.size]
    if rec.dtype != PREPARED_RECORD_DTYPE or len(paths) != rec.size:
        raise DatasetError(f"{root}: {PREPARED_RECORDS} or {PREPARED_PATHS} is damaged")
    labels = rec["label"].copy()
    if relabel:
        mapping = relabel_map(labels)
        labels = np.asarray([mapping[int(v)] for v in labels], dtype=np.int64)
    shards, offsets, lengths = rec["shard"], rec["offset"], rec["length"]
    raw_shape = (stored, stored, 3) if manifest["codec"] == "raw" else None

    def read(i: int) -> bytes | np.ndarray:
        path = prepared_shard_path(root, int(shards[i]))
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, int(lengths[i]), int(offsets[i]))
        finally:
            os.close(fd)
        if len(data) != int(lengths[i]):
            raise DatasetError(f"{path} is shorter than its index says (damaged or truncated)")
        return data if raw_shape is None else np.frombuffer(data, np.uint8).reshape(raw_shape)

    lines = rec["line"].copy()
    return Source(
        name=str(manifest.get("source") or root),
        paths=paths,
        labels=labels,
        reader=read,
        uids=rec["uid"].copy() if manifest.get("has_uids") else None,
        lines=lines if (lines > 0).all() else None,
        class_names=tuple(manifest["class_names"]) if manifest.get("class_names") else None,
    )


def tfds_build_hint(name: str, data_dir: str | os.PathLike | None) -> str:
    """How to get a tfds dataset onto an offline machine (one line, for error messages)."""
    where = data_dir or "~/tensorflow_datasets"
    return (
        f"prepare it on a connected machine with `tfds build {name.split(':')[0]} "
        f"--file_format=array_record --data_dir=DIR`, then copy DIR/{name.split(':')[0]} "
        f"into {where}"
    )


def load_tfds(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    image_key: str = "image",
    label_key: str = "label",
    uid_key: str | None = None,
    download: bool = False,
) -> Source:
    """A tensorflow-datasets dataset through ``tfds.data_source`` (array_record; no TensorFlow).

    Images are read undecoded (``SkipDecoding``) so the pipeline decodes them exactly like files.
    The dataset must already be prepared under ``data_dir`` (``tfds build`` on a connected
    machine, then copy the folder); an absent one is a one-line :class:`DatasetError` saying so.
    """
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415 - optional dependency (jaxrec[tfds])
    except ImportError:
        raise DatasetError(
            f"tfds dataset {name!r} needs the optional tensorflow-datasets package: "
            'pip install -e ".[tfds]" (or pip install "jaxrec[tfds]")'
        ) from None
    folder = os.path.join(os.fspath(data_dir), name.split(":")[0]) if data_dir else None
    if folder is not None and not download and not os.path.isdir(folder):
        raise DatasetError(
            f"tfds dataset {name!r} is not prepared in data_dir {data_dir} (no folder {folder}): "
            f"{tfds_build_hint(name, data_dir)}"
        )
    try:
        builder = tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))
        if download:
            builder.download_and_prepare(file_format="array_record")
        # Every image feature stays encoded: the pipeline decodes the one it uses, and reading
        # the labels must not decode the others (e.g. CUB's segmentation masks).
        skip = {
            key: tfds.decode.SkipDecoding()
            for key, feature in builder.info.features.items()
            if isinstance(feature, tfds.features.Image)
        }
        skip[image_key] = tfds.decode.SkipDecoding()
        ds = builder.as_data_source(split=split, decoders=skip)
    except Exception as e:  # tfds raises several unrelated types for "not found"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatasetError(
            f"tfds dataset {name!r} split {split!r} could not be opened from data_dir={data_dir} "
            f"({first}): {tfds_build_hint(name, data_dir)}"
        ) from e
    n = len(ds)
    if n == 0:
        raise DatasetError(f"tfds dataset {name}[{split}] is empty")
    labels = np.empty(n, dtype=np.int64)
    uids = np.empty(n, dtype=np.int64) if uid_key else None
    chunk = 1024
    for start in range(0, n, chunk):
        keys = list(range(start, min(n, start + chunk)))
        items = ds.__getitems__(keys) if hasattr(ds, "__getitems__") else [ds[k] for k in keys]
        for k, item in zip(keys, items, strict=True):
            for key in (image_key, label_key) + ((uid_key,) if uid_key else ()):
                if key not in item:
                    raise DatasetError(
                        f"tfds dataset {name}[{split}] has no feature {key!r}; "
                        f"features: {sorted(item)}"
                    )
            labels[k] = int(item[label_key])
            if uids is not None:
                uids[k] = int(item[uid_key])
    class_names = None
    try:
        class_names = tuple(ds.dataset_info.features[label_key].names)
    except (AttributeError, KeyError, TypeError):
        pass  # labels are plain integers

    def read(i: int) -> bytes | np.ndarray:
        value = ds[i][image_key]
        return value if isinstance(value, bytes | np.ndarray) else bytes(value)

    return Source(
        name=f"tfds:{name}/{split}",
        paths=[f"tfds:{name}/{split}[{i}]" for i in range(n)],
        labels=labels,
        reader=read,
        uids=uids,
        class_names=class_names,
    )
