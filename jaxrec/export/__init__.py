"""Export a recognition model for inference, and prove each artifact equals the trained model.

`python -m jaxrec.export --model DIR | --workdir DIR --out OUT` (help: `--help`) writes a deploy
model directory, a `jax.export` artifact and an ONNX graph, all from the BN-folded Flax model
(`jaxrec.models.fold`), and checks each against the source model computed in float64.

- `artifacts`: deploy form, `export_jax`, `build_onnx`, `onnx_session`, file names;
- `jaxpr_onnx` + `passes`: the ONNX graph, traced from the model (no second description);
- `check`: the equality check; `writer`: the all-or-nothing writing of OUT; `cli`: the command.
"""

from jaxrec.export.artifacts import (
    CHECK_FILE,
    JAX_EXPORT_FILE,
    ONNX_FILE,
    build_onnx,
    deploy_arch,
    deploy_variables,
    export_jax,
    folded,
    onnx_missing,
    onnx_session,
)
from jaxrec.export.check import (
    CEILING,
    FACTOR,
    HEADROOM,
    MAX_TOL,
    NOISE_FLOOR,
    RULE,
    CheckResult,
    check,
    compare,
    dead_leaves_images,
    default_check_images,
    load_check_images,
    reference_features,
    reference_features64,
    relative_errors,
    synthetic_images,
    tolerance,
)
from jaxrec.export.cli import main
from jaxrec.export.passes import ONNX_OPSET
from jaxrec.export.writer import write_export

__all__ = [
    "CHECK_FILE",
    "JAX_EXPORT_FILE",
    "CEILING",
    "FACTOR",
    "HEADROOM",
    "MAX_TOL",
    "NOISE_FLOOR",
    "RULE",
    "ONNX_FILE",
    "ONNX_OPSET",
    "CheckResult",
    "build_onnx",
    "check",
    "compare",
    "deploy_arch",
    "deploy_variables",
    "export_jax",
    "folded",
    "load_check_images",
    "main",
    "onnx_missing",
    "onnx_session",
    "reference_features",
    "dead_leaves_images",
    "default_check_images",
    "reference_features64",
    "relative_errors",
    "synthetic_images",
    "tolerance",
    "write_export",
]
