"""The schema of a gallery index's `index.json`, checked on every load.

`check_meta(meta, where)` raises `GalleryError` naming the first key that is missing, unknown, of
the wrong type or inconsistent (duplicate ids), so that a hand-edited file gives one clear
`error: ...` line instead of a traceback deep in the loader.

Version 2 (written by this jaxrec):
    {"format": "jaxrec-gallery-index", "version": 2,
     "config": {"dim", "metric", "method", "model_dir", "delimiter", "ef_search", "nprobe",
                "runtime" (optional, "jax" when absent)},
     "model_fingerprint": hex str | null, "backend": "faiss" | "exact",
     "files": {"features": "features-000007.npy", "faiss": "vector-000007.index" | null},
     "entries": [{"id", "label", "path", "line"}, ...],
     "calibration": {"threshold", "rule", ...} (optional: written by `calibrate`)}
Version 1 (older jaxrec) had no `model_fingerprint` and `files`; its data files were
`features.npy` and `vector.index`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from jaxrec.errors import GalleryError
from jaxrec.search.backends import METHODS, METRICS

FORMAT_NAME = "jaxrec-gallery-index"
FORMAT_VERSION = 2
LEGACY_FILES = {"features": "features.npy", "faiss": "vector.index"}
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a plain name inside the index dir


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(v: Any) -> bool:
    return _is_int(v) and v > 0


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _str(v: Any) -> bool:
    return isinstance(v, str)


# key -> (required, check, what a valid value is)
_CONFIG = {
    "dim": (True, _positive_int, "a positive integer"),
    "metric": (True, lambda v: v in METRICS, f"one of {list(METRICS)}"),
    "method": (True, lambda v: v in METHODS, f"one of {list(METHODS)}"),
    "model_dir": (False, _opt(_str), "a path string or null"),
    "delimiter": (False, lambda v: _str(v) and v != "", "a non-empty string"),
    "ef_search": (False, _opt(_positive_int), "a positive integer or null"),
    "nprobe": (False, _opt(_positive_int), "a positive integer or null"),
    "runtime": (False, lambda v: v in ("jax", "onnx", "int8"), "'jax', 'onnx' or 'int8'"),
}
_ENTRY = {
    "id": (True, lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "label": (True, _str, "a string"),
    "path": (True, _str, "a string"),
    "line": (True, _str, "a string"),
}
_FILES = {
    "features": (True, lambda v: _str(v) and bool(_FILE_NAME.match(v)), "a file name"),
    "faiss": (False, _opt(lambda v: _str(v) and bool(_FILE_NAME.match(v))), "a file name or null"),
}
_TOP = {
    "format": (True, lambda v: v == FORMAT_NAME, repr(FORMAT_NAME)),
    "version": (True, lambda v: v in (1, FORMAT_VERSION), f"1 or {FORMAT_VERSION}"),
    "config": (True, lambda v: isinstance(v, dict), "an object"),
    "backend": (False, lambda v: v in ("faiss", "exact"), "'faiss' or 'exact'"),
    "model_fingerprint": (
        False,
        _opt(lambda v: _str(v) and bool(re.fullmatch(r"[0-9a-f]{8,128}", v))),
        "a hex string or null",
    ),
    "files": (False, lambda v: isinstance(v, dict), "an object"),
    "entries": (True, lambda v: isinstance(v, list), "a list"),
    "calibration": (
        False,
        lambda v: isinstance(v, dict) and isinstance(v.get("threshold"), int | float),
        "an object with a numeric threshold",
    ),
}


def _check_object(
    obj: Any, spec: Mapping[str, tuple[bool, Callable[[Any], bool], str]], key: str, where: str
) -> None:
    if not isinstance(obj, dict):
        raise GalleryError(f"{where}: {key or 'the file'} must be an object, got {_kind(obj)}")
    prefix = f"{key}." if key else ""
    unknown = sorted(set(obj) - set(spec))
    if unknown:
        raise GalleryError(
            f"{where}: unknown key {prefix}{unknown[0]} (known keys: {', '.join(spec)}); "
            "the file was edited by hand or written by another program"
        )
    for name, (required, check, want) in spec.items():
        if name not in obj:
            if required:
                raise GalleryError(f"{where}: missing key {prefix}{name} ({want})")
            continue
        if not check(obj[name]):
            raise GalleryError(
                f"{where}: {prefix}{name} must be {want}, got {obj[name]!r} ({_kind(obj[name])})"
            )


def check_meta(meta: Any, where: str) -> dict[str, Any]:
    """Validate a parsed index.json; returns it with v1 defaults filled in (`files`,
    `model_fingerprint`). `where` (the file path) prefixes every message."""
    if isinstance(meta, dict) and _is_int(meta.get("version")) and meta["version"] > FORMAT_VERSION:
        raise GalleryError(
            f"{where}: index format version {meta['version']} was written by a newer jaxrec "
            f"(this one reads versions 1 and {FORMAT_VERSION})"
        )
    _check_object(meta, _TOP, "", where)
    if meta["version"] >= 2:
        for name in ("model_fingerprint", "files", "backend"):
            if name not in meta:
                raise GalleryError(f"{where}: missing key {name} (version {meta['version']})")
    _check_object(meta["config"], _CONFIG, "config", where)
    files = meta.get("files", dict(LEGACY_FILES))
    _check_object(files, _FILES, "files", where)
    seen: dict[int, int] = {}
    for i, e in enumerate(meta["entries"]):
        _check_object(e, _ENTRY, f"entries[{i}]", where)
        if e["id"] in seen:
            raise GalleryError(
                f"{where}: entries[{i}].id {e['id']} is a duplicate of entries[{seen[e['id']]}].id"
                "; ids must be unique"
            )
        seen[e["id"]] = i
    return {
        **meta,
        "files": {"faiss": None, **files},
        "model_fingerprint": meta.get("model_fingerprint"),
    }
