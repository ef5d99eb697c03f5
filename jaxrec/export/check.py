"""The export equality check: every artifact against a float64 reference of the trained model.

Each artifact (the exported model dir, the jax.export artifact, the ONNX graph) and the source
model in eval mode run on the same images, fed through the model's own preprocessing. The
reference is the source model (in the form its variables have: the training form for a workdir
or a converted PaddleClas model) computed in float64, so the rule follows float32 accuracy
instead of a fixed fraction of the largest activation:

- `eps_model`: the largest per-image relative error ||f32 - f64|| / ||f64|| of the source
  model itself run in float32 (how much float32 rounding this model amplifies; at least
  NOISE_FLOOR, 16 units of float32 roundoff);
- tolerance `tol = min(FACTOR * eps_model, MAX_TOL)`: an artifact computes the same function in
  float32 with a different operation order (BN folded, rep blocks fused, another runtime), so
  its rounding error is of the same order; a wrong fold, a missing normalization or a
  transposed weight is orders of magnitude larger;
- per image: ||artifact - f64|| / ||f64|| <= tol (catches scale errors too) and cosine >=
  1 - tol**2 (implied by the first for finite outputs; reported, and fails on NaN).

Default images have natural-image statistics (dead-leaves: occluding shapes with a power-law
size distribution, smooth shading and texture) plus a few synthetic patterns.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxrec.config import resolve_arch
from jaxrec.data.image import decode_image
from jaxrec.data.lists import resolve_images
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
from jaxrec.models import build_model, load_model_dir
from jaxrec.models.features import feature_fn

NOISE_FLOOR = 16 * 2.0**-24  # 16 units of float32 roundoff (about 9.5e-7)
FACTOR = 32.0
MAX_TOL = 1e-3  # cap on FACTOR x eps_model
HEADROOM = 8.0  # an artifact may always err HEADROOM x what the float32 source model errs
CEILING = 5e-2  # never more: a model that unstable in float32 cannot vouch for an export
RULE = (
    f"per image ||artifact - ref|| / ||ref|| <= tol and cosine >= 1 - tol^2, against a float64 "
    f"reference; tol = min(max(min({FACTOR:g} x eps_model, {MAX_TOL:g}), {HEADROOM:g} x "
    f"eps_model), {CEILING:g}), eps_model = the float32 source model's own largest relative "
    f"error (at least {NOISE_FLOOR:.1e})"
)


@dataclasses.dataclass
class CheckResult:
    """Agreement of one artifact with the reference."""

    artifact: str
    min_cosine: float
    max_rel_err: float
    tolerance: float
    max_abs_err: float
    max_abs_ref: float
    ok: bool
    detail: str = ""
    skipped: bool = False

    def line(self) -> str:
        status = "SKIP" if self.skipped else "OK  " if self.ok else "FAIL"
        return (
            f"  {status} {self.artifact:<14} min cosine {self.min_cosine:.10f}   max rel err "
            f"{self.max_rel_err:.2e} (tol {self.tolerance:.2e})   max |err| "
            f"{self.max_abs_err:.3e} (max |ref| {self.max_abs_ref:.3g}) {self.detail}"
        )


def relative_errors(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per-row ||got - ref|| / ||ref|| in float64."""
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    norm = np.linalg.norm(ref, axis=1)
    return np.linalg.norm(got - ref, axis=1) / np.maximum(norm, 1e-300)


def tolerance(eps_model: float) -> float:
    """The relative-error tolerance for a model whose float32 form errs by `eps_model`: FACTOR
    x eps_model up to MAX_TOL, but never below HEADROOM x eps_model (a model whose own float32
    error exceeds MAX_TOL on an image, measured 2.9e-3 on one of 50 freshly trained full-size
    models, would otherwise fail every correct export), and never above CEILING."""
    eps = max(eps_model, NOISE_FLOOR)
    return float(min(max(min(FACTOR * eps, MAX_TOL), HEADROOM * eps), CEILING))


def compare(name: str, ref: np.ndarray, got: np.ndarray, tol: float | None = None) -> CheckResult:
    """Per-row cosine and relative error of `got` against the float64 `ref`, rule applied
    (`tol` default: the tolerance of a model at the float32 noise floor)."""
    tol = tolerance(0.0) if tol is None else tol
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    scale = float(np.abs(ref).max())
    if got.shape != ref.shape:
        inf, nan = float("inf"), float("nan")
        return CheckResult(
            name, nan, inf, tol, inf, scale, False, f"shape {got.shape} != {ref.shape}"
        )
    num = np.sum(ref * got, axis=1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-300), 0.0)
    finite = bool(np.all(np.isfinite(got)))
    min_cos = float(np.min(cos)) if finite else float("nan")
    rel = float(np.max(relative_errors(ref, got))) if finite else float("inf")
    err = float(np.max(np.abs(ref - got))) if finite else float("inf")
    ok = bool(finite and rel <= tol and min_cos >= 1.0 - tol**2)
    return CheckResult(name, min_cos, rel, tol, err, scale, ok)


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


def dead_leaves_images(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Deterministic uint8 RGB images [n, h, w, 3] with natural-image statistics: the
    dead-leaves model (opaque discs and rectangles whose sizes follow a 1/r^3 law, drawn over
    each other), with shading, correlated colours and sensor-like noise."""
    rng = np.random.default_rng(seed + 1_000_003)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rmin, rmax = 0.01 * max(h, w), 0.5 * max(h, w)
    imgs = []
    for _ in range(n):
        img = np.empty((h, w, 3), np.float32)
        img[:] = rng.uniform(40, 215, size=3)
        palette = rng.uniform(0, 255, size=(6, 3))  # a scene's few dominant colours
        for _ in range(int(rng.integers(60, 160))):
            u = rng.uniform()
            r = (rmin**-2 - u * (rmin**-2 - rmax**-2)) ** -0.5  # density ~ 1/r^3
            cy, cx = rng.uniform(-0.1 * h, 1.1 * h), rng.uniform(-0.1 * w, 1.1 * w)
            if rng.uniform() < 0.5:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                mask = (np.abs(yy - cy) <= r * rng.uniform(0.3, 1)) & (
                    np.abs(xx - cx) <= r * rng.uniform(0.3, 1)
                )
            colour = palette[rng.integers(len(palette))] + rng.normal(0, 25, size=3)
            shade = 1 + 0.3 * ((yy - cy) * rng.normal() + (xx - cx) * rng.normal()) / max(h, w)
            img[mask] = (colour[None, :] * shade[mask][:, None]).astype(np.float32)
        img += rng.normal(0, rng.uniform(1, 6), size=img.shape)
        imgs.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(imgs)


def default_check_images(size: tuple[int, int]) -> np.ndarray:
    """12 images: 8 with natural-image statistics, 4 synthetic patterns (edges, stripes)."""
    return np.concatenate([dead_leaves_images(8, size), synthetic_images(4, size)])


def load_check_images(path: str | None, preprocess: Any, limit: int = 16) -> np.ndarray:
    """Normalized float32 NHWC check images fed through `preprocess` (a `Preprocess`): decoded
    from `path` (an image, a folder or a list file; at most `limit`), or the 12 default ones."""
    if path is None:
        raw = list(default_check_images(preprocess.input_size))
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
    """The source model's `output_key` output in eval mode (in the model's own dtype)."""
    fn = jax.jit(feature_fn(model, FeatureSpec(output_key, normalize=False)))
    return np.asarray(fn(variables, images))


def reference_features64(
    arch: Mapping[str, Any],
    variables: Mapping[str, Any],
    images: np.ndarray,
    output_key: str,
    *,
    deploy: bool = False,
    fold_bn: bool = False,
) -> np.ndarray:
    """The source model (its Arch section `arch`, in the form `deploy` / `fold_bn` that its
    variables have) computed in float64 (x64 enabled only for this call). Not
    `models.features.feature_fn`: that one casts to float32, this must not."""
    model = build_model(resolve_arch(arch), dtype="float64", deploy=deploy, fold_bn=fold_bn)
    with jax.enable_x64(True):
        v64 = jax.tree.map(lambda a: np.asarray(a, np.float64), dict(variables))
        fn = jax.jit(lambda v, x: model.apply(v, x, train=False)[output_key])
        return np.asarray(fn(v64, np.asarray(images, np.float64)), np.float64)


def artifact_runners(out_dir: str | Path, batch: int = 4) -> dict[str, Callable]:
    """Callables running each artifact present in `out_dir` on NHWC normalized images."""
    out = Path(out_dir)
    runners: dict[str, Callable[[np.ndarray], np.ndarray]] = {}

    def chunks(fn):
        # Odd-sized chunks also exercise the symbolic batch dimension.
        return lambda x: np.concatenate(
            [np.asarray(fn(x[i : i + batch])) for i in range(0, len(x), batch)]
        )

    if (out / "config.json").is_file():

        def run_model_dir(x):
            md = load_model_dir(out, resolve_arch)
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
            feed = lambda a: {ONNX_INPUT: np.ascontiguousarray(a.transpose(NCHW))}
            return chunks(lambda a: sess.run([ONNX_OUTPUT], feed(a))[0])(x)

        runners["onnx"] = run_onnx
    return runners


class _NotRunnableHere(Exception):
    """An artifact that this machine's platform cannot run (e.g. jax.export for cuda only)."""


_GPU = {"gpu": ("cuda", "rocm")}


def run_checks(
    ref: np.ndarray, runners: Mapping[str, Callable], images: np.ndarray, tol: float
) -> list[CheckResult]:
    """Run every artifact on `images` and compare with `ref`; errors count as failures, an
    artifact this machine cannot run is listed as skipped."""
    results = []
    for name, run in runners.items():
        try:
            results.append(compare(name, ref, np.asarray(run(images)), tol))
        except _NotRunnableHere as why:
            nan = float("nan")
            results.append(
                CheckResult(name, nan, nan, tol, nan, nan, True, f"not run: {why}", True)
            )
        except Exception as err:  # noqa: BLE001 - a broken artifact must fail the check
            scale, inf = float(np.abs(ref).max()), float("inf")
            detail = f"error: {type(err).__name__}: {str(err)[:300]}"
            results.append(CheckResult(name, float("nan"), inf, tol, inf, scale, False, detail))
    return results


def report_checks(
    results: Sequence[CheckResult], n_images: int, source: str, eps_model: float
) -> bool:
    """Print the check table; loud message on failure. Returns whether all passed."""
    tol = tolerance(eps_model)
    print(
        f"equality check on {n_images} images ({source}) against the source model in float64"
        f" (the source model in float32 errs by {eps_model:.2e}; tolerance {tol:.2e}):"
    )
    for r in results:
        print(r.line())
    ok = bool(results) and all(r.ok for r in results)
    if not ok:
        bad = ", ".join(r.artifact for r in results if not r.ok) or "(no artifacts)"
        bar = "!" * 78
        print(
            f"\n{bar}\nEXPORT CHECK FAILED for: {bad}\n"
            f"An artifact does not reproduce the trained model ({RULE}). Do NOT deploy these "
            f"files.\n{bar}",
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
    arch: Mapping[str, Any] | None = None,
    form: Mapping[str, bool] | None = None,
) -> tuple[bool, list[CheckResult]]:
    """Compare every artifact in out_dir with the float64 reference of the source model (its
    Arch section `arch` in the `form` {deploy, fold_bn} of `variables`; without `arch` the
    float32 model itself is the reference); write export_check.json."""
    ref32 = reference_features(model, variables, images, output_key)
    if arch is not None:
        ref = reference_features64(arch, variables, images, output_key, **(form or {}))
        eps_model = float(np.max(relative_errors(ref, ref32)))
    else:
        ref, eps_model = np.asarray(ref32, np.float64), 0.0
    tol = tolerance(eps_model)
    results = run_checks(ref, artifact_runners(out_dir), images, tol)
    ok = report_checks(results, len(images), source, eps_model)
    payload = {
        "passed": ok,
        "images": source,
        "n_images": int(len(images)),
        "rule": {
            "text": RULE,
            "reference": "float64" if arch is not None else "float32",
            "eps_model": eps_model,
            "tolerance": tol,
            "factor": FACTOR,
            "noise_floor": NOISE_FLOOR,
            "max_tolerance": MAX_TOL,
        },
        "results": [dataclasses.asdict(r) for r in results],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **dict(extra or {}),
    }
    tmp = Path(out_dir, CHECK_FILE + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(Path(out_dir, CHECK_FILE))
    return ok, results
