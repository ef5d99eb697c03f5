"""`python -m jaxrec.search`: build, append, remove, query, info and repair a gallery index."""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxrec.data.lists import GalleryItem, read_gallery_list
from jaxrec.errors import GalleryError, ImageDecodeError, JaxrecError, warnings_as_lines
from jaxrec.search import store
from jaxrec.search.backends import BACKENDS, METHODS, METRICS
from jaxrec.search.index import GalleryIndex, check_threshold

if TYPE_CHECKING:
    from jaxrec.models import ModelDir


def parse_delimiter(text: str) -> str:
    """Read a delimiter from the command line; accepts escapes such as '\\t'."""
    if text.lower() in ("tab", "\\t"):
        return "\t"
    if text.lower() == "space":
        return " "
    out = codecs.decode(text, "unicode_escape")
    if not out:
        raise GalleryError("the delimiter must not be empty")
    return out


def _short(fp: str | None) -> str:
    return "none recorded" if fp is None else fp[:12]


# ---- the model and its features ---------------------------------------------------------------


def _load_model(model: str | None, index: GalleryIndex | None, index_dir: str) -> ModelDir:
    from jaxrec.training.checkpoint import open_model  # noqa: PLC0415 - jax only when embedding

    path = model or (index.model_dir if index is not None else None)
    if not path:
        raise GalleryError(f"{index_dir} records no model dir; pass --model")
    if not os.path.isdir(path):
        where = "--model" if model else f"the model dir recorded in {index_dir}"
        raise GalleryError(f"{where} {path} does not exist (see `python -m jaxrec.export`)")
    return open_model(path)


def model_mismatch(
    index: GalleryIndex, index_dir: str, fingerprint: str, model_path: str
) -> str | None:
    """None if features of this model may join/query the index, else why not: the message names
    both models (paths and short fingerprints). Indexes without a fingerprint accept any model."""
    if index.model_fingerprint is None or index.model_fingerprint == fingerprint:
        return None
    if index.model_dir and os.path.abspath(model_path) == os.path.abspath(index.model_dir):
        what = f"the model in {model_path} has changed since the index was built"
    else:
        what = f"{model_path} is not the model the index was built with ({index.model_dir})"
    return (
        f"{what}: its fingerprint is {_short(fingerprint)}, {index_dir}/{store.INDEX_FILE} "
        f"records {_short(index.model_fingerprint)}; features of two models are not comparable"
    )


def _refuse_mix(index: GalleryIndex, index_dir: str, fingerprint: str, model_path: str) -> None:
    problem = model_mismatch(index, index_dir, fingerprint, model_path)
    if problem:
        raise GalleryError(
            f"{problem}. append never mixes two models in one index; rebuild it with this model: "
            f"{store.rebuild_hint(index_dir, model_path)}"
        )


def _embed(
    md: ModelDir,
    items: Sequence[str],
    batch_size: int,
    progress: bool,
    runtime: str = "jax",
    model_path: str | None = None,
) -> np.ndarray:
    """Unit features of image files through `jaxrec.extract` with the model's preprocessing.
    The gallery always holds L2-normalized features (as PP-ShiTu's), whatever the model's spec.
    `runtime` "onnx" / "int8" runs the model dir's float32 / int8 ONNX graph instead of JAX."""
    from jaxrec.extract import extract_features  # noqa: PLC0415 - jax only when embedding
    from jaxrec.models import FeatureSpec  # noqa: PLC0415 - as above

    if batch_size < 1:
        raise GalleryError(f"--batch-size must be positive, got {batch_size}")
    forward = None
    if runtime != "jax":
        from jaxrec.export.int8 import onnx_forward  # noqa: PLC0415 - optional onnxruntime path

        forward = onnx_forward(model_path, md.preprocess, True, int8=runtime == "int8")
    try:
        feats, _ = extract_features(
            md,
            list(items),
            batch_size=batch_size,
            features=FeatureSpec(md.features.output_key, normalize=True),
            progress=progress,
            forward=forward,
        )
    except ImageDecodeError as e:
        raise GalleryError(str(e)) from None
    zero = np.flatnonzero(np.linalg.norm(feats, axis=1) < 0.5)
    if zero.size:
        raise GalleryError(f"image {items[zero[0]]} gives an all-zero feature; remove it")
    return feats


# ---- commands -----------------------------------------------------------------------------------


def _read_items(args, delimiter: str, check_exists: bool = True) -> list[GalleryItem]:
    return read_gallery_list(args.images, args.image_root, delimiter, check_exists)


def _runtime(args, index: GalleryIndex) -> str:
    """--runtime if given, else the runtime the index was built with."""
    return args.runtime or index.runtime


def _cmd_build(args) -> int:
    index_json = os.path.join(args.index, store.INDEX_FILE)
    if os.path.exists(index_json) and not args.overwrite:
        raise GalleryError(
            f"{args.index} already holds an index; use `append`, or pass --overwrite to replace it"
        )
    delim = parse_delimiter(args.delimiter)
    items = _read_items(args, delim)
    if not items:
        raise GalleryError(f"{args.images} lists no images")
    md = _load_model(args.model, None, args.index)
    runtime = args.runtime or "jax"
    feats = _embed(md, [it.path for it in items], args.batch_size, True, runtime, args.model)
    index = GalleryIndex(
        feats.shape[1],
        args.metric,
        args.method,
        backend=args.backend,
        model_dir=os.path.abspath(args.model),
        delimiter=delim,
        ef_search=args.ef_search,
        nprobe=args.nprobe,
        model_fingerprint=md.fingerprint(),
    )
    index.runtime = runtime
    index.add(
        feats, [it.label for it in items], [it.rel_path for it in items], [it.line for it in items]
    )
    with store.locked(args.index):
        if os.path.exists(index_json) and not args.overwrite:
            raise GalleryError(f"{args.index}: another process built an index there meanwhile")
        store.write(index, args.index)
    print(
        f"built {args.method}/{args.metric} index of {len(index)} images "
        f"({index.backend.name} backend, model {_short(index.model_fingerprint)}) in {args.index}"
    )
    return 0


def _new_items(index: GalleryIndex, items: Sequence[GalleryItem]) -> list[GalleryItem]:
    seen = {e.line for e in index.entries}
    out = []
    for it in items:
        if it.line not in seen:
            seen.add(it.line)
            out.append(it)
    return out


def _cmd_append(args) -> int:
    index = store.load(args.index, backend=args.backend)
    delim = index.delimiter if args.delimiter is None else parse_delimiter(args.delimiter)
    items = _read_items(args, delim)
    new = _new_items(index, items)
    fingerprint = None
    feats = np.zeros((0, index.dim), np.float32)
    if new:
        md = _load_model(args.model, index, args.index)
        model_path = args.model or index.model_dir
        fingerprint = md.fingerprint()
        _refuse_mix(index, args.index, fingerprint, model_path)
        feats = _embed(
            md, [it.path for it in new], args.batch_size, True, _runtime(args, index), model_path
        )
        if feats.shape[1] != index.dim:
            raise GalleryError(
                f"the model gives {feats.shape[1]}-d features, the index {index.dim}"
            )
    keep: list[int] = []

    def add_new(index: GalleryIndex) -> bool:
        # Under the lock, on the index as committed now: it may have changed while we extracted.
        if fingerprint is not None:
            _refuse_mix(index, args.index, fingerprint, model_path)
        still_new = {it.line for it in _new_items(index, new)}
        keep[:] = [i for i, it in enumerate(new) if it.line in still_new]
        if not keep:
            return False
        if index.model_fingerprint is None:
            index.model_fingerprint = fingerprint  # an index from an older version: record it
        index.add(
            feats[keep],
            [new[i].label for i in keep],
            [new[i].rel_path for i in keep],
            [new[i].line for i in keep],
        )
        return True

    index = store.update(args.index, add_new, backend=args.backend)
    print(
        f"appended {len(keep)} images ({len(items) - len(keep)} already present, skipped); "
        f"index now holds {len(index)}"
    )
    return 0


def _cmd_remove(args) -> int:
    result: list = []

    def remove(index: GalleryIndex) -> bool:
        delim = index.delimiter if args.delimiter is None else parse_delimiter(args.delimiter)
        items = _read_items(args, delim, check_exists=False)
        result[:] = index.remove_lines([it.line for it in items])
        return result[0] > 0

    index = store.update(args.index, remove, backend=args.backend)
    removed, missing = result
    for line in missing:
        print(f"warning: not in the index: {line!r}", file=sys.stderr)
    print(f"removed {removed} images; index now holds {len(index)}")
    return 0


def _cmd_query(args) -> int:
    index = store.load(args.index, backend=args.backend)
    thr = index.default_threshold() if args.threshold is None else args.threshold
    try:
        thr = check_threshold(index.metric, thr)
    except GalleryError as e:
        raise GalleryError(f"--threshold: {e}") from None
    if args.topk < 1:
        raise GalleryError(f"--topk must be positive, got {args.topk}")
    for p in args.image:
        if not os.path.isfile(p):
            raise GalleryError(f"query image {p} not found")
    if args.ef_search is not None or args.nprobe is not None:
        index.set_search_params(
            args.ef_search if args.ef_search is not None else index.ef_search,
            args.nprobe if args.nprobe is not None else index.nprobe,
        )
    md = _load_model(args.model, index, args.index)
    model_path = args.model or index.model_dir
    problem = model_mismatch(index, args.index, md.fingerprint(), model_path)
    if problem and not args.allow_model_change:
        raise GalleryError(
            f"{problem}. Pass --allow-model-change to query anyway, or rebuild the index with "
            f"this model: {store.rebuild_hint(args.index, model_path)}"
        )
    if problem:
        print(f"warning: --allow-model-change: {problem}", file=sys.stderr)
    feats = _embed(md, args.image, args.batch_size, False, _runtime(args, index), model_path)
    results = index.query(feats, args.topk, thr)
    if args.json:
        out = [{"image": p, **r.to_dict()} for p, r in zip(args.image, results, strict=True)]
        print(json.dumps(out, ensure_ascii=False, indent=1))
        return 0
    kind = "similarity >=" if index.metric == "IP" else "distance <="
    cal = index.calibration
    how = (
        "given"
        if args.threshold is not None
        else f"calibrated, {cal['rule']}"
        if cal is not None
        else "default; calibrate it with `calibrate`"
    )
    if args.threshold is None and cal is not None and cal.get("gallery_size") != len(index):
        print(
            f"note: the threshold was calibrated on a gallery of {cal.get('gallery_size')} "
            f"images, the index now holds {len(index)}; re-run calibrate",
            file=sys.stderr,
        )
    for p, r in zip(args.image, results, strict=True):
        print(f"{p}: {r.prediction}   (known if {kind} {thr:.6g}, {how})")
        for h in r.hits:
            print(f"  {h.rank:>2}  {h.label:<24} {h.score:10.6f}  [{h.gallery_label}] {h.path}")
    return 0


def _cmd_calibrate(args) -> int:
    from jaxrec.search import calibrate_cmd  # noqa: PLC0415 - jax only when embedding

    index = store.load(args.index, backend=args.backend)
    if not len(index):
        raise GalleryError(f"{args.index} is empty; build it first")
    delim = index.delimiter if args.delimiter is None else parse_delimiter(args.delimiter)
    items = read_gallery_list(args.queries, args.image_root, delim)
    if not items:
        raise GalleryError(f"{args.queries} lists no images")
    md = _load_model(args.model, index, args.index)
    model_path = args.model or index.model_dir
    problem = model_mismatch(index, args.index, md.fingerprint(), model_path)
    if problem:
        raise GalleryError(f"{problem}. A threshold calibrated with another model means nothing")
    feats = _embed(
        md, [it.path for it in items], args.batch_size, True, _runtime(args, index), model_path
    )
    scores, top1, selfs = calibrate_cmd.top1(index, feats, [it.rel_path for it in items])
    if selfs:
        print(f"note: {selfs} queries are gallery images; their self-matches were skipped")
    precision = None if args.f1 else args.precision
    report = calibrate_cmd.calibrate(
        index,
        [it.label for it in items],
        scores,
        top1,
        precision,
        args.holdout,
        args.seed,
        args.confidence,
    )
    report["calibration"]["queries_file"] = os.path.abspath(args.queries)
    js, png = calibrate_cmd.write_report(
        report, index.metric, args.out or os.path.join(args.index, "calibration")
    )
    record = report["calibration"]

    def store_it(index: GalleryIndex) -> bool:
        index.calibration = record
        return True

    if not args.dry_run:
        store.update(args.index, store_it, backend=args.backend)
    for line in calibrate_cmd.summary(report, index.metric):
        print(line)
    where = "not stored (--dry-run)" if args.dry_run else f"stored in {args.index}"
    print(f"{where}; curves and error counts: {js}, {png}")
    return 0


def _info(index: GalleryIndex) -> dict[str, Any]:
    return {
        **index.config,
        "model_fingerprint": index.model_fingerprint,
        "backend": index.backend.name,
        "size": len(index),
        "labels": len({e.label for e in index.entries}),
        "threshold": index.default_threshold(),
        "calibration": index.calibration
        or "none: query uses PP-ShiTu's fixed default; see `calibrate`",
    }


def _cmd_info(args) -> int:
    print(json.dumps(_info(store.load(args.index, backend=args.backend)), indent=1))
    return 0


def _cmd_repair(args) -> int:
    index = store.update(args.index, lambda index: True, backend=args.backend)
    print(f"rewrote {args.index}: {len(index)} entries ({index.backend.name} backend)")
    return 0


# ---- parser and main ----------------------------------------------------------------------------

DESCRIPTION = """\
Build, update and query a gallery index of image features (PP-ShiTu style). List files hold one
`path<TAB>label` line per gallery image. Images are embedded with the model's own preprocessing
(as its model directory records) and L2-normalized."""

EPILOG = """\
examples:
  python -m jaxrec.search build  --model export_dir --images gallery/label.txt --index idx
  python -m jaxrec.search append --index idx --images new_items.txt
  python -m jaxrec.search remove --index idx --images discontinued.txt
  python -m jaxrec.search calibrate --index idx --queries labelled_queries.txt --precision 0.95
  python -m jaxrec.search query  --index idx --image photo.jpg --topk 5

Files in the index dir: index.json (config, model fingerprint, id -> label/path/line; JSON),
features-<gen>.npy (the normalized gallery features, the source of truth), vector-<gen>.index
(faiss only, rebuilt from the features when damaged) and index.lock. Writers (build, append,
remove, repair) hold the lock and commit by replacing index.json, so concurrent appends
serialize and an interrupted write leaves the previous index intact.

The index records the fingerprint of its model (variables, Arch, preprocessing, feature spec).
append refuses a model with another fingerprint (also when the model dir was replaced in place):
an index never mixes features of two models; rebuild it with `build --overwrite`. query refuses
it too unless --allow-model-change (scores then compare features of two models). Indexes from
older versions have no fingerprint: they load with a warning and the next append records it.

Hits whose score fails the threshold (IP: similarity < threshold, range [-1, 1]; L2: squared
distance > threshold, range [0, 4]) are labelled "unknown". The threshold is the one `calibrate`
stored in the index (chosen from labelled queries for a target precision or the best F1), else
PP-ShiTu's fixed 0.5 (IP). PP-ShiTu instead keeps only the
top-1 hit and drops it below score_thres."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxrec.search",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, list_required: bool, batch: bool = True):
        sp.add_argument("--index", required=True, help="index directory")
        sp.add_argument(
            "--backend",
            default="auto",
            choices=BACKENDS,
            help="faiss, exact numpy search, or auto (faiss if installed)",
        )
        if list_required:
            sp.add_argument(
                "--images",
                required=True,
                help="list file: `path<delimiter>label[<delimiter>more]` per line",
            )
            sp.add_argument(
                "--image-root",
                default=None,
                help="directory the list paths are relative to "
                "(default: the list file's directory)",
            )
        if batch:
            sp.add_argument("--batch-size", type=int, default=32, help="extraction batch size")
            sp.add_argument(
                "--runtime",
                default=None,
                choices=("jax", "onnx", "int8"),
                help="run the model with JAX, or its model dir's inference.onnx / "
                "inference.int8.onnx with onnxruntime (default: build: jax; others: what the "
                "index was built with)",
            )

    model_help = "model directory or training workdir (default: the index's model)"
    b = sub.add_parser("build", help="create a new index from a list file")
    common(b, True)
    b.add_argument(
        "--model", required=True, help="model directory (jaxrec.export output) or training workdir"
    )
    b.add_argument("--method", default="HNSW32", choices=METHODS)
    b.add_argument(
        "--metric",
        default="IP",
        choices=METRICS,
        help="IP: cosine on normalized features; L2: squared distance",
    )
    b.add_argument("--delimiter", default="\t", help="list field delimiter (default: tab)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index")
    b.add_argument(
        "--ef-search",
        type=int,
        default=None,
        help="HNSW efSearch stored with the index (default: faiss's 16)",
    )
    b.add_argument(
        "--nprobe",
        type=int,
        default=None,
        help="IVF lists searched, stored with the index (default: faiss's 1)",
    )
    b.set_defaults(func=_cmd_build)

    a = sub.add_parser(
        "append",
        help="add the list's images that are not yet in the index (same model only)",
    )
    common(a, True)
    a.add_argument("--model", default=None, help=model_help)
    a.add_argument("--delimiter", default=None, help="default: the index's delimiter")
    a.set_defaults(func=_cmd_append)

    r = sub.add_parser("remove", help="remove the images whose list lines match")
    common(r, True, batch=False)
    r.add_argument("--delimiter", default=None, help="default: the index's delimiter")
    r.set_defaults(func=_cmd_remove)

    q = sub.add_parser("query", help="search the index with query images")
    common(q, False)
    q.add_argument("--image", required=True, action="append", help="query image (repeatable)")
    q.add_argument("--model", default=None, help=model_help)
    q.add_argument("--topk", type=int, default=5, help="hits per query (default 5)")
    q.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="IP: min similarity in [-1, 1]; L2: max squared distance in [0, 4] (default: the "
        "index's calibrated threshold, else 0.5 for IP and 1.0 for L2)",
    )
    q.add_argument("--json", action="store_true", help="print JSON")
    q.add_argument("--ef-search", type=int, default=None, help="override HNSW efSearch")
    q.add_argument("--nprobe", type=int, default=None, help="override IVF nprobe")
    q.add_argument(
        "--allow-model-change",
        action="store_true",
        help="query with a model whose fingerprint differs from the index's (warns)",
    )
    q.set_defaults(func=_cmd_query)

    c = sub.add_parser(
        "calibrate",
        help="choose the known/unknown threshold from labelled queries and store it in the index",
    )
    common(c, False)
    c.add_argument(
        "--queries",
        required=True,
        help="labelled query list (`path<delimiter>label` per line); classes absent from the "
        "gallery are the unknown queries the threshold should reject",
    )
    c.add_argument("--image-root", default=None, help="default: the list file's directory")
    c.add_argument("--delimiter", default=None, help="default: the index's delimiter")
    c.add_argument("--model", default=None, help=model_help)
    rule = c.add_mutually_exclusive_group()
    rule.add_argument(
        "--precision",
        type=float,
        default=0.95,
        help="target precision of accepted answers; the threshold with the highest recall "
        "that meets it (default 0.95)",
    )
    rule.add_argument("--f1", action="store_true", help="the threshold with the best F1 instead")
    c.add_argument(
        "--confidence",
        type=float,
        default=0.9,
        help="with --precision: the one-sided Wilson lower bound of precision at this "
        "confidence must meet the target (default 0.9; 0 uses the measured precision itself)",
    )
    c.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="fraction of the queries held out of the choice and used to report it (e.g. 0.5)",
    )
    c.add_argument("--seed", type=int, default=0, help="seed of the --holdout split")
    c.add_argument(
        "--out", default=None, help="report folder (default INDEX/calibration): json and png"
    )
    c.add_argument("--dry-run", action="store_true", help="report only; store nothing")
    c.set_defaults(func=_cmd_calibrate)

    i = sub.add_parser("info", help="print the index config, model fingerprint and size")
    common(i, False, batch=False)
    i.set_defaults(func=_cmd_info)

    f = sub.add_parser(
        "repair",
        help="rewrite the index files from index.json and the features (e.g. after a damaged "
        "vector index was reported)",
    )
    common(f, False, batch=False)
    f.set_defaults(func=_cmd_repair)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings_as_lines():
        try:
            return args.func(args)
        except JaxrecError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
