"""The exported artifacts, all derived from the BN-folded Flax model itself.

- `deploy_arch` / `deploy_variables`: the exported model directory's form (deploy: rep blocks
  fused; no classifier head; float32).
- `export_jax`: `jax.export` of `model.apply(folded_variables, x)[output_key]`, batch dimension
  symbolic, lowered for the given platforms (depthwise convs pick their lowering per platform,
  see `jaxrec.ops.depthwise`).
- `build_onnx`: the ONNX graph of the same function (`jaxrec.export.jaxpr_onnx`), input NCHW.
- `onnx_session`: the onnxruntime session jaxrec uses for it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.config import resolve_arch
from jaxrec.data.preprocess import FeatureSpec
from jaxrec.errors import ExportError
from jaxrec.export.jaxpr_onnx import convert
from jaxrec.models import build_model, fold_variables, reparameterize
from jaxrec.models.features import feature_fn

JAX_EXPORT_FILE = "inference.jaxexport"
ONNX_FILE = "inference.onnx"
CHECK_FILE = "export_check.json"
ONNX_INPUT, ONNX_OUTPUT = "x", "features"
NCHW = (0, 3, 1, 2)


def deploy_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
    """The Arch section of the exported model dir: no classifier head (the form, deploy, is
    recorded beside it)."""
    out = json.loads(json.dumps(dict(arch)))
    out.pop("Head", None)
    return out


def deploy_models(arch: Mapping[str, Any]) -> tuple[Any, Any]:
    """(deploy-form model, BN-folded model) of an Arch section, float32."""
    spec = resolve_arch(arch)
    return build_model(spec, deploy=True), build_model(spec, deploy=True, fold_bn=True)


def deploy_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Re-parameterized float32 numpy variables without the head's."""
    v = reparameterize(variables)
    out = {k: {m: x for m, x in v[k].items() if m != "head"} for k in ("params", "batch_stats")}
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), out)


def folded(arch: Mapping[str, Any], variables: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(model, variables) of the BN-folded form of a deploy-form model."""
    return deploy_models(arch)[1], fold_variables(variables)


def features_fn(model: Any, variables: Mapping[str, Any], output_key: str):
    """x (normalized float32 NHWC) -> the model's `output_key` output (`feature_fn`, without L2
    normalization: deployments normalize), weights closed over."""
    fn = feature_fn(model, FeatureSpec(output_key, normalize=False))
    return lambda x: fn(variables, x)


def export_jax(
    model: Any,
    variables: Mapping[str, Any],
    output_key: str,
    input_hw: tuple[int, int],
    platforms: Sequence[str] = ("cpu", "cuda"),
):
    """A `jax.export.Exported` of the model's `output_key` output; input [b, H, W, 3] float32
    NHWC normalized with a symbolic batch `b`; the weights are embedded."""
    (b,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b, *input_hw, 3), jnp.float32)
    consts = jax.tree_util.tree_map(jnp.asarray, variables)
    try:
        return jax.export.export(
            jax.jit(features_fn(model, consts, output_key)), platforms=tuple(platforms)
        )(spec)
    except (ValueError, NotImplementedError) as err:
        if "platform" in str(err).lower():
            raise ExportError(f"--platforms {','.join(platforms)}: {err}") from None
        raise


def build_onnx(
    model: Any,
    variables: Mapping[str, Any],
    output_key: str,
    input_hw: tuple[int, int],
    platform: str = "cuda",
):
    """(onnx.ModelProto, graph) of the model's `output_key` output: input `x` [batch, 3, H, W]
    float32 NCHW normalized, output `features` [batch, D]; depthwise convs as grouped `Conv`s
    (the lowering of `platform`), affine ops merged into the convs (`passes.simplify`)."""
    (b,) = jax.export.symbolic_shape("batch")
    host = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), variables)
    graph, _ = convert(features_fn(model, host, output_key), (b, *input_hw, 3), NCHW, platform)
    graph.simplify()
    return graph.to_onnx(ONNX_INPUT, ONNX_OUTPUT), graph


def onnx_session(path: str, threads: int | None = None, spinning: bool = False):
    """An onnxruntime CPU session with all graph optimizations.

    `spinning=False` stops idle worker threads from busy-waiting: on shared or loaded CPUs that
    made batch-1 inference about 1.6x faster (BENCHMARKS.md); onnxruntime's own default
    (spinning) can be slightly faster on an idle machine."""
    import onnxruntime as ort  # noqa: PLC0415 - optional dependency (jaxrec[onnx])

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def onnx_missing() -> str | None:
    """None if onnx and onnxruntime import, else the name of the first missing one."""
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            return name
    return None
