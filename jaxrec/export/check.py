"""The export equality check: every artifact against the training-form model.

Each artifact (the exported model dir, the jax.export artifact, the ONNX graph) and the source
model in eval mode run on the same images, fed through the model's own preprocessing; per
artifact the minimum per-image cosine must be >= MIN_COSINE and max|err| <= MAX_REL_ERR *
max|reference| (the second catches pure scale errors that the cosine cannot see).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxrec.data.preprocess import FeatureSpec
from jaxrec.errors import ExportError
from jaxrec.export.artifacts import (
    CHECK_FILE,
    JAX_EXPORT_FILE,
    NCHW,
    ONNX_FILE,
    ONNX_INPUT,
    ONNX_OUTPUT,
    onnx_missing,
    onnx_session,
)
from jaxrec.models.features import feature_fn

MIN_COSINE = 0.9999
MAX_REL_ERR = 1e-4


@dataclasses.dataclass
class CheckResult:
    """Agreement of one artifact with the training-form model."""

    artifact: str
    min_cosine: float
    max_abs_err: float
    max_abs_ref: float
    ok: bool
    detail: str = ""
    skipped: bool = False

    def line(self) -> str:
        status = "SKIP" if self.skipped else "OK  " if self.ok else "FAIL"
        return (
            f"  {status} {self.artifact:<14} min cosine {self.min_cosine:.8f}   "
            f"max |err| {self.max_abs_err:.3e} (max |ref| {self.max_abs_ref:.3g}) {self.detail}"
        )


def compare(name: str, ref: np.ndarray, got: np.ndarray) -> CheckResult:
    """Per-row cosine and max abs error of `got` against `ref`, with the pass rule applied."""
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    scale = float(np.abs(ref).max())
    if got.shape != ref.shape:
        return CheckResult(
            name, float("nan"), float("inf"), scale, False, f"shape {got.shape} != {ref.shape}"
        )
    num = np.sum(ref * got, axis=1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-300), 0.0)
    min_cos = float(np.min(cos)) if np.all(np.isfinite(got)) else float("nan")
    err = float(np.max(np.abs(ref - got)))
    ok = bool(min_cos >= MIN_COSINE and err <= MAX_REL_ERR * max(scale, 1e-12))
    return CheckResult(name, min_cos, err, scale, ok)


def synthetic_images(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Deterministic uint8 RGB test images [n, h, w, 3]: gradients, stripes, blobs, noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / h, xx / w
    imgs = []
    for i in range(n):
        f = rng.uniform(1, 8, size=3)
        ph = rng.uniform(0, 2 * np.pi, size=3)
        base = np.stack(
            [
                np.sin(2 * np.pi * f[c] * (xx * np.cos(ph[c]) + yy * np.sin(ph[c])) + ph[c])
                for c in range(3)
            ],
            axis=-1,
        )
        cy, cx = rng.uniform(0.2, 0.8, size=2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)[..., None]
        img = 127.5 + 80 * base + 60 * blob * rng.uniform(-1, 1, size=3)
        img = img + rng.normal(0, 12 if i % 2 else 3, size=img.shape)
        imgs.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(imgs)


def load_check_images(path: str | None, preprocess: Any, limit: int = 16) -> np.ndarray:
    """Normalized float32 NHWC check images fed through `preprocess` (a `Preprocess`): decoded
    from `path` (an image, a folder or a list file; at most `limit`), or 8 synthetic ones."""
    from jaxrec.data.image import decode_image  # noqa: PLC0415
    from jaxrec.data.lists import resolve_images  # noqa: PLC0415

    if path is None:
        raw = list(synthetic_images(8, preprocess.input_size))
    else:
        try:  # DatasetError, ImageDecodeError: both name the file
            raw = [decode_image(file, name) for name, file in resolve_images(path)[:limit]]
        except ValueError as err:
            raise ExportError(f"--check-images: {err}") from None
    try:
        fed = np.stack([preprocess.apply(img) for img in raw])
    except ValueError as err:
        raise ExportError(f"--check-images: {err}") from None
    return np.asarray(preprocess.normalize(fed), np.float32)


def reference_features(
    model: Any, variables: Mapping[str, Any], images: np.ndarray, output_key: str
) -> np.ndarray:
    """The source model's `output_key` output in eval mode."""
    import jax  # noqa: PLC0415

    fn = jax.jit(feature_fn(model, FeatureSpec(output_key, normalize=False)))
    return np.asarray(fn(variables, images))


def artifact_runners(out_dir: str | Path, batch: int = 4) -> dict[str, Callable]:
    """Callables running each artifact present in `out_dir` on NHWC normalized images."""
    import jax  # noqa: PLC0415

    out = Path(out_dir)
    runners: dict[str, Callable[[np.ndarray], np.ndarray]] = {}

    def chunks(fn):
        # Odd-sized chunks also exercise the symbolic batch dimension.
        return lambda x: np.concatenate(
            [np.asarray(fn(x[i : i + batch])) for i in range(0, len(x), batch)]
        )

    if (out / "config.json").is_file():
        from jaxrec.models import load_model_dir  # noqa: PLC0415

        def run_model_dir(x):
            md = load_model_dir(out)
            f = jax.jit(feature_fn(md.model, FeatureSpec(md.features.output_key, normalize=False)))
            return f(md.variables, x)

        runners["model_dir"] = run_model_dir
    if (out / JAX_EXPORT_FILE).is_file():

        def run_jax(x):
            exp = jax.export.deserialize(bytearray((out / JAX_EXPORT_FILE).read_bytes()))
            here = jax.default_backend()
            if not {here, *_GPU.get(here, ())} & set(exp.platforms):
                raise _NotRunnableHere(
                    f"lowered for {','.join(exp.platforms)}; this machine runs {here}"
                )
            return chunks(exp.call)(x)

        runners["jax_export"] = run_jax
    if (out / ONNX_FILE).is_file():

        def run_onnx(x):
            if onnx_missing() == "onnxruntime":
                raise _NotRunnableHere('onnxruntime is not installed (pip install -e ".[onnx]")')
            sess = onnx_session(str(out / ONNX_FILE))
            feed = lambda a: {ONNX_INPUT: np.ascontiguousarray(a.transpose(NCHW))}  # noqa: E731
            return chunks(lambda a: sess.run([ONNX_OUTPUT], feed(a))[0])(x)

        runners["onnx"] = run_onnx
    return runners


class _NotRunnableHere(Exception):
    """An artifact that this machine's platform cannot run (e.g. jax.export for cuda only)."""


_GPU = {"gpu": ("cuda", "rocm")}


def run_checks(ref: np.ndarray, runners: Mapping[str, Callable], images: np.ndarray):
    """Run every artifact on `images` and compare with `ref`; errors count as failures, an
    artifact this machine cannot run is listed as skipped."""
    results = []
    for name, run in runners.items():
        try:
            results.append(compare(name, ref, np.asarray(run(images))))
        except _NotRunnableHere as why:
            nan = float("nan")
            results.append(CheckResult(name, nan, nan, nan, True, f"not run: {why}", True))
        except Exception as err:  # noqa: BLE001 - a broken artifact must fail the check
            scale = float(np.abs(ref).max())
            detail = f"error: {type(err).__name__}: {str(err)[:300]}"
            results.append(CheckResult(name, float("nan"), float("inf"), scale, False, detail))
    return results


def report_checks(results: Sequence[CheckResult], n_images: int, source: str) -> bool:
    """Print the check table; loud message on failure. Returns whether all passed."""
    print(f"equality check on {n_images} images ({source}) against the training-form model:")
    for r in results:
        print(r.line())
    ok = bool(results) and all(r.ok for r in results)
    if not ok:
        bad = ", ".join(r.artifact for r in results if not r.ok) or "(no artifacts)"
        bar = "!" * 78
        print(
            f"\n{bar}\nEXPORT CHECK FAILED for: {bad}\n"
            f"An artifact does not reproduce the trained model (need min cosine >= {MIN_COSINE}"
            f" and max|err| <= {MAX_REL_ERR} x max|ref|). Do NOT deploy these files.\n{bar}",
            file=sys.stderr,
        )
    return ok


def check(
    model: Any,
    variables: Mapping[str, Any],
    output_key: str,
    out_dir: str | Path,
    images: np.ndarray,
    source: str,
    extra: Mapping[str, Any] | None = None,
) -> tuple[bool, list[CheckResult]]:
    """Compare every artifact in out_dir with the source model; write export_check.json."""
    ref = reference_features(model, variables, images, output_key)
    results = run_checks(ref, artifact_runners(out_dir), images)
    ok = report_checks(results, len(images), source)
    payload = {
        "passed": ok,
        "images": source,
        "n_images": int(len(images)),
        "rule": {"min_cosine": MIN_COSINE, "max_abs_err_rel": MAX_REL_ERR},
        "results": [dataclasses.asdict(r) for r in results],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **dict(extra or {}),
    }
    tmp = Path(out_dir, CHECK_FILE + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(Path(out_dir, CHECK_FILE))
    return ok, results
