"""Image lists: the one image-extension list and the one reader of list files.

Every command that takes images by path goes through this module:

* `resolve_images(path)`: an image file, a folder (searched recursively) or a text file listing
  one image per line; used by `jaxrec.extract` and the export check images.
* `read_gallery_list(list_file)`: PP-ShiTu gallery lists, `path<delimiter>label[...]` with
  string labels; used by `jaxrec.search`.
* `parse_label_lines(lines, file)`: PaddleClas training/eval lists with integer labels
  (`path label [unique_id]`); used by `jaxrec.data.datasets`.

All of them read files with `read_lines` (UTF-8, a leading BOM dropped) and raise
`jaxrec.errors.DatasetError` with the file and 1-based line number of the first problem.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from jaxrec.errors import DatasetError

#: File name suffixes (lower case) taken as images when a folder is scanned.
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif",
    ".ppm", ".pgm", ".pbm", ".pnm",
)  # fmt: skip
#: Suffixes always read as list files by `resolve_images` (others are sniffed for text).
LIST_EXTENSIONS = (".txt", ".lst", ".list", ".csv", ".tsv")


def is_image_path(path: str | os.PathLike) -> bool:
    """Whether a file name has an image extension and is not hidden (no leading dot)."""
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def read_lines(list_file: str | os.PathLike, what: str = "list file") -> list[str]:
    """The lines of a UTF-8 text file (a leading BOM is not part of the first path)."""
    p = Path(list_file)
    if not p.is_file():
        raise DatasetError(f"{what} {p} does not exist (or is not a file)")
    try:
        return p.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{p}: not a UTF-8 text file ({e})") from None


# ---- PaddleClas label lists (integer labels) ----------------------------------------------------


def _parse_int(text: str, what: str, file: str, lineno: int, line: str) -> int:
    try:
        if text.strip() != text or not text:
            raise ValueError
        value = int(text, 10)
    except ValueError:
        raise DatasetError(
            f"{file}:{lineno}: {what} {text!r} is not an integer (line: {line!r}). "
            f"Each line must be 'path label' with an integer label."
        ) from None
    if not -(2**63) <= value < 2**63:
        raise DatasetError(f"{file}:{lineno}: {what} {value} does not fit in int64")
    return value


def parse_label_lines(
    text_lines: Sequence[str],
    file: str,
    *,
    delimiter: str | None = " ",
    min_fields: int = 2,
    max_used_fields: int = 2,
) -> tuple[list[str], list[int], list[int] | None, list[int]]:
    """Parse list lines into (paths, labels, third-column ids or None, 1-based line numbers).

    ``delimiter=None`` splits on any whitespace (VeriWild); a string splits on exactly that
    string (ImageNetDataset). Blank lines are skipped. Fields past ``max_used_fields`` are ignored,
    as in the reference. All-or-nothing third column: mixing 2- and 3-field lines is an error.
    """
    paths: list[str] = []
    labels: list[int] = []
    uids: list[int] = []
    linenos: list[int] = []
    uid_state: bool | None = None
    for lineno, raw in enumerate(text_lines, start=1):
        line = raw.strip()
        if not line:
            continue
        fields = line.split() if delimiter is None else line.split(delimiter)
        if len(fields) < min_fields:
            sep = "whitespace" if delimiter is None else repr(delimiter)
            raise DatasetError(
                f"{file}:{lineno}: expected 'path label' separated by {sep}, got {len(fields)} "
                f"field(s) in {line!r}. Check the delimiter option."
            )
        if not fields[0]:
            raise DatasetError(f"{file}:{lineno}: empty image path in {line!r}")
        if delimiter is not None and fields[1] == "":
            raise DatasetError(
                f"{file}:{lineno}: empty label field in {line!r}: the delimiter is {delimiter!r} "
                "and the line has two delimiters in a row. Use exactly one, or set delimiter."
            )
        label = _parse_int(fields[1], "label", file, lineno, line)
        if max_used_fields >= 3:
            has_uid = len(fields) >= 3
            if uid_state is None:
                uid_state = has_uid
            elif uid_state != has_uid:
                raise DatasetError(
                    f"{file}:{lineno}: this line has {len(fields)} fields but earlier lines have "
                    f"{3 if uid_state else 2}; either every line carries the third column "
                    "(unique id) or none does."
                )
            if has_uid:
                uids.append(_parse_int(fields[2], "unique id", file, lineno, line))
        paths.append(fields[0])
        labels.append(label)
        linenos.append(lineno)
    return paths, labels, (uids if uid_state else None), linenos


# ---- image lists, folders and single images (extract, export check) ----------------------------


def read_image_list(list_file: str | os.PathLike) -> list[tuple[str, str]]:
    """(name as written, resolved path) for each line of an image list file.

    One image per line; blank lines and lines starting with ``#`` are skipped. Relative paths are
    resolved against the list file's folder. PaddleClas label lists (``path label [id]``) work
    too: when the whole line is not an existing file, its first whitespace-separated field is used.
    """
    list_file = Path(list_file)
    base = list_file.parent
    out = []
    for raw in read_lines(list_file, "image list"):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        rel = line
        if not (base / rel).is_file() and len(line.split()) > 1:
            rel = line.split()[0]
        out.append((rel, str(base / rel)))
    if not out:
        raise DatasetError(f"image list {str(list_file)!r} has no image paths")
    return out


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


def find_images(folder: str | os.PathLike) -> list[tuple[str, str]]:
    """(path relative to `folder`, path) of every image under `folder`, sorted by relative path.

    Hidden files and folders (leading dot) are skipped."""
    root = Path(folder)
    found = sorted(
        str(q.relative_to(root))
        for q in root.rglob("*")
        if q.is_file()
        and is_image_path(q)
        and not any(part.startswith(".") for part in q.relative_to(root).parts)
    )
    if not found:
        raise DatasetError(
            f"no images found under folder {str(root)!r} "
            f"(extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    return [(name, str(root / name)) for name in found]


def resolve_images(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(name, path) pairs for PATH = an image file, a folder or a list file.

    A folder is searched recursively (`find_images`); names are paths relative to it. A list file
    (`read_image_list`) gives the paths as written in it. A single image is named by its file
    name. A file with another suffix is read as a list if it is UTF-8 text, else as one image.
    """
    p = Path(path)
    if p.is_dir():
        return find_images(p)
    if not p.exists():
        raise DatasetError(f"{str(p)!r} does not exist")
    if is_image_path(p):
        return [(p.name, str(p))]
    if p.suffix.lower() in LIST_EXTENSIONS or _looks_like_text(p):
        return read_image_list(p)
    return [(p.name, str(p))]


# ---- gallery lists (string labels, PP-ShiTu) ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GalleryItem:
    """One line of a gallery list file: `path<delimiter>label[<delimiter>more...]`."""

    path: str  # resolved against the image root
    rel_path: str  # as written
    label: str
    line: str  # the stripped line
    lineno: int


def read_gallery_list(
    list_file: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    delimiter: str = "\t",
    check_exists: bool = True,
) -> list[GalleryItem]:
    """Parse a PP-ShiTu gallery list. Blank lines are skipped; the label is the second field
    (labels may contain spaces when the delimiter is a tab); paths are relative to `image_root`
    (default: the list file's folder). With `check_exists`, a missing image is an error naming
    the line (and how many others are missing)."""
    name = str(list_file)
    root = os.path.dirname(os.path.abspath(list_file)) if image_root is None else str(image_root)
    items = []
    for lineno, raw in enumerate(read_lines(list_file, "list file"), 1):
        line = raw.strip()
        if not line:
            continue
        fields = line.split(delimiter)
        if len(fields) < 2 or not fields[0] or not fields[1]:
            raise DatasetError(
                f"{name}:{lineno}: expected 'path{delimiter!r}label', got {line!r}; "
                "fix the line or pass the right delimiter"
            )
        items.append(GalleryItem(os.path.join(root, fields[0]), fields[0], fields[1], line, lineno))
    if check_exists:
        missing = [it for it in items if not os.path.isfile(it.path)]
        if missing:
            more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
            raise DatasetError(
                f"{name}:{missing[0].lineno}: image {missing[0].path} not found{more}; paths are "
                f"relative to the image root {root} (set it with --image-root)"
            )
    return items
