"""Writing an export: everything goes into a temporary directory next to OUT, which is renamed
into place only once every artifact and the equality check have been written. A failed or
interrupted export therefore leaves no partial OUT (a process killed outright may leave the
hidden `.OUT.partial-*` directory behind, never OUT itself)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxrec.errors import ExportError
from jaxrec.export import artifacts as A
from jaxrec.export.check import check
from jaxrec.models import count_params, save_model_dir
from jaxrec.paddle.yaml_out import save_inference_rec_yaml, save_paddleclas_yaml

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def check_out(out: Path, overwrite: bool) -> None:
    """Raise ExportError if OUT cannot take an export (before anything is computed)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(
            f"{out} exists and is not empty; pass --overwrite to replace the export there "
            "(or --check-only to re-check it)"
        )


def check_platforms(platforms: Sequence[str]) -> list[str]:
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms:
        raise ExportError(f"--platforms: {','.join(bad) or '(none)'}; use some of {PLATFORMS}")
    return list(platforms)


def _install(tmp: Path, out: Path) -> None:
    """Move the finished export `tmp` to `out`, replacing what is there."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_export(
    source: Any,
    reference: Any,
    out: str | os.PathLike,
    *,
    preprocess: Any,
    images: np.ndarray,
    image_source: str,
    platforms: Sequence[str],
    onnx: bool,
    overwrite: bool,
    paddle_config: dict[str, Any] | None = None,
) -> tuple[bool, dict[str, Any]]:
    """Export `source` (a ModelDir) to OUT and check it against `reference` (its float32
    model). Returns (check passed, summary). OUT is replaced only when all is written.

    OUT also gets PP-ShiTu's `inference_rec.yaml` with the model's own preprocessing and, given
    the training run's config (`paddle_config`), the run as a PaddleClas YAML (`paddleclas.yaml`).
    """
    out = Path(out).absolute()
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    key = source.features.output_key
    hw = tuple(preprocess.input_size)
    t0 = time.time()
    d_arch, d_vars = A.deploy_arch(source.arch), A.deploy_variables(source.variables)
    d_model = A.deploy_models(d_arch)[0]
    model, variables = A.folded(d_arch, d_vars)  # the one folding step (tests inject defects)
    info: dict[str, Any] = {
        "platforms": list(platforms),
        "input_size": list(hw),
        "output_key": key,
        "folded_params": count_params(variables),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; OUT gets the usual permissions
        save_model_dir(
            tmp, d_arch, d_model, d_vars, preprocess=preprocess, features=source.features
        )
        exp = A.export_jax(model, variables, key, hw, platforms)
        (tmp / A.JAX_EXPORT_FILE).write_bytes(exp.serialize())
        if onnx:
            import onnx as onnx_lib  # noqa: PLC0415 - optional dependency (jaxrec[onnx])

            proto, graph = A.build_onnx(model, variables, key, hw)
            onnx_lib.save(proto, str(tmp / A.ONNX_FILE))
            info["onnx"] = {"params": graph.param_count(), "ops": graph.op_counts()}
        save_inference_rec_yaml(preprocess, tmp, model_dir_name=str(out), use_onnx=onnx)
        if paddle_config is not None:
            save_paddleclas_yaml(paddle_config, tmp)
        ok, _ = check(
            reference.model,
            reference.variables,
            key,
            tmp,
            images,
            image_source,
            extra={"source": source.source, "artifacts": artifact_notes(hw, key, onnx)},
            arch=reference.arch,
            form={"deploy": reference.deploy, "fold_bn": reference.fold_bn},
        )
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info["seconds"] = round(time.time() - t0, 1)
    return ok, info


def artifact_notes(hw: tuple[int, int], key: str, onnx: bool) -> dict[str, str]:
    """How to feed each artifact (also written to export_check.json)."""
    h, w = hw
    feed = "float32 images fed through config.json's `preprocess` (resize, scale, mean/std)"
    notes = {
        "model_dir": f"config.json + variables/: deploy form; jaxrec feeds it itself ({key})",
        A.JAX_EXPORT_FILE: f"input [b, {h}, {w}, 3] NHWC {feed}; output {key} [b, D], raw",
    }
    if onnx:
        notes[A.ONNX_FILE] = (
            f"input `{A.ONNX_INPUT}` [batch, 3, {h}, {w}] NCHW {feed}; "
            f"output `{A.ONNX_OUTPUT}` [batch, D], raw"
        )
    return notes
