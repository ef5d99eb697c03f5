"""Import PaddleClas `.pdparams` weights into a jaxrec model directory.

    python -m jaxrec.convert --pdparams general_PPLCNetV2_base_pretrained_v1.0.pdparams --out DIR
    python -m jaxrec.convert --pdparams PPLCNetV2_base_ssld_pretrained.pdparams --out DIR \
        --class-num 192612

A `.pdparams` file is a pickle of {structured name: numpy array}. It is read with a restricted
unpickler that only admits the globals numpy needs to rebuild arrays (and plain containers);
anything else is refused before it can run. Paddle is not needed.

Two kinds of checkpoint are understood:
- a RecModel checkpoint (keys `backbone.*`, `neck.*`, optional `head.*`);
- a bare backbone checkpoint, e.g. the ImageNet PPLCNetV2_base (SSLD) weights (keys `stem.*`,
  `stages.*`, `last_conv.*`, `fc.*`). Loaded into the ShiTu RecModel it leaves `last_conv`
  (shape differs, bias missing) and `stages.3.0.dw_conv_list.2.*` (branch absent at stride 2) at
  their fresh init, and drops `fc.*`; all of this is reported by name.
The `dw_conv.weight/bias` tensors of rep blocks are Paddle's fusion targets, unused in training
and often stale: they are ignored (reported), and the deploy form is recomputed exactly from the
branches by `reparameterize` (`--deploy`).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import pickle
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxrec.models import (
    abstract_variables,
    build_model,
    init_variables,
    make_divisible,
    reparameterize,
    save_model_dir,
)
from jaxrec.models.naming import from_paddle_layout, jaxrec_path, paddle_key, paddle_shape

# Globals a numpy-array pickle (protocols 2-5, numpy 1.x and 2.x) may reference.
ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("collections", "OrderedDict"),
    }
)
META_KEYS = ("StructuredToParameterName@@",)


class PdparamsError(ValueError):
    """A .pdparams file that cannot be read or converted."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise PdparamsError(
                f"{self._path}: refusing to unpickle global {module}.{name}; a .pdparams file "
                "only needs numpy array globals. The file is not a plain Paddle state dict "
                "(possibly malicious); convert it in a trusted Paddle environment first."
            )
        if module.startswith("numpy.core") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core" + module[len("numpy.core") :]
        elif module.startswith("numpy._core") and int(np.__version__.split(".")[0]) < 2:
            module = "numpy.core" + module[len("numpy._core") :]
        return super().find_class(module, name)


def read_pdparams(path: str | Path) -> dict[str, np.ndarray]:
    """{structured name: float32 array} from a .pdparams file, read safely (see module doc)."""
    path = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PdparamsError(f"{path}: cannot read ({e.strerror})") from e
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except PdparamsError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a pdparams"
        raise PdparamsError(
            f"{path}: not a .pdparams file (pickle load failed: {type(e).__name__}: {e}); "
            "expected a file written by paddle.save(model.state_dict())"
        ) from e
    if not isinstance(obj, Mapping):
        raise PdparamsError(
            f"{path}: not a .pdparams state dict (top-level object is {type(obj).__name__})"
        )
    if "UnpackBigParamInfor@@" in obj:
        raise PdparamsError(
            f"{path}: holds tensors split into pieces (UnpackBigParamInfor@@, Paddle protocol-2 "
            "save of >1 GiB tensors); re-save it with paddle.save(..., protocol=4)"
        )
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if key in META_KEYS:
            continue
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise PdparamsError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a numpy array"
            )
        out[key] = value
    if not out:
        raise PdparamsError(f"{path}: contains no tensors")
    return out


@dataclasses.dataclass
class ConversionReport:
    """What happened to every tensor. Keys are Paddle structured names (RecModel form)."""

    source_kind: str = ""  # "RecModel" or "backbone"
    loaded: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)  # left at fresh init
    mismatched: list[tuple[str, list[int], list[int]]] = dataclasses.field(
        default_factory=list
    )  # (key, checkpoint shape, model shape); left at fresh init
    unexpected: list[str] = dataclasses.field(default_factory=list)  # in file, not in model
    ignored_fusion_targets: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.mismatched or self.unexpected)

    def summary(self) -> str:
        lines = [
            f"source: {self.source_kind} checkpoint; loaded {len(self.loaded)} tensors",
        ]
        if self.source_kind == "backbone" and self.missing:
            lines.append(
                "  (a bare backbone checkpoint, e.g. ImageNet weights: for the ShiTu RecModel the "
                "ShiTu-only last_conv, stages.3.0.dw_conv_list.2, the neck and the head are "
                "expected to start from init)"
            )
        for key in sorted(self.missing):
            lines.append(f"  missing from checkpoint (left at init): {key}")
        for key, got, want in self.mismatched:
            lines.append(f"  shape mismatch (left at init): {key}: checkpoint {got}, model {want}")
        for key in sorted(self.unexpected):
            lines.append(f"  not in model (dropped): {key}")
        if self.ignored_fusion_targets:
            lines.append(
                f"  ignored {len(self.ignored_fusion_targets)} unused rep-block fusion targets "
                "(dw_conv.weight/bias; recomputed by reparameterize)"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _normalize_keys(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    if any(k.startswith("backbone.") for k in state):
        return dict(state), "RecModel"
    return {f"backbone.{k}": v for k, v in state.items()}, "backbone"


_REP_TARGET = re.compile(r"^(.*)\.dw_conv\.(weight|bias)$")


def _is_fusion_target(key: str, state: Mapping[str, Any]) -> bool:
    m = _REP_TARGET.match(key)
    if not m:
        return False
    return f"{m.group(1)}.dw_conv_list.0.conv.weight" in state


def infer_arch(
    state: Mapping[str, np.ndarray],
    *,
    class_num: int | None = None,
    head: str | None = None,
    no_head: bool = False,
    target: str = "shitu",
    head_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A jaxrec Arch dict matching a checkpoint (scale and depths are read from its shapes).

    target "shitu": the GeneralRecognitionV2 RecModel (ShiTu backbone, BNNeck, head from the
    checkpoint or `class_num`). target "imagenet": the bare PPLCNetV2 classifier.
    """
    state, kind = _normalize_keys(state)
    depths = []
    for si in range(4):
        blocks = {
            int(m.group(1))
            for k in state
            if (m := re.match(rf"^backbone\.stages\.{si}\.(\d+)\.", k)) is not None
        }
        if not blocks:
            raise PdparamsError(f"checkpoint has no backbone.stages.{si}.* tensors")
        depths.append(max(blocks) + 1)
    last = depths[3] - 1
    key4 = f"backbone.stages.3.{last}.pw_conv.conv.weight"
    if key4 not in state:
        raise PdparamsError(f"checkpoint has no {key4}; is it a PP-LCNetV2 checkpoint?")
    width4 = int(state[key4].shape[0])
    scale = width4 / 1024.0
    if make_divisible(1024 * scale) != width4:
        raise PdparamsError(f"cannot infer the width scale from {key4} {state[key4].shape}")
    bb: dict[str, Any] = {"scale": scale, "depths": depths}
    lc = state.get("backbone.last_conv.weight")
    if target == "imagenet":
        bb = {"name": "PPLCNetV2", **bb, "dropout_prob": 0.2}
        if lc is not None:
            bb["class_expand"] = int(lc.shape[0])
        else:
            bb["use_last_conv"] = False
        fc = state.get("backbone.fc.weight")
        if class_num is not None:
            bb["class_num"] = int(class_num)
        elif fc is not None:
            bb["class_num"] = int(fc.shape[1])
        if scale == 1.0 and depths == [2, 2, 6, 2]:
            bb["name"] = "PPLCNetV2_base"
            del bb["scale"], bb["depths"], bb["dropout_prob"]
        return bb
    if target != "shitu":
        raise ValueError(f"target must be 'shitu' or 'imagenet', got {target!r}")
    expand = int(lc.shape[0]) if (lc is not None and kind == "RecModel") else 512
    backbone = {"name": "PPLCNetV2_base_ShiTu", "class_expand": expand}
    if not (scale == 1.0 and depths == [2, 2, 6, 2]):
        backbone.update(scale=scale, depths=depths)
    nf = state.get("neck.feat_bn.weight")
    arch: dict[str, Any] = {
        "name": "RecModel",
        "infer_output_key": "features",
        "infer_add_softmax": False,
        "Backbone": backbone,
        "BackboneStopLayer": {"name": "flatten"},
        "Neck": {"name": "BNNeck", "num_features": int(nf.shape[0]) if nf is not None else expand},
    }
    if no_head:
        return arch
    emb = arch["Neck"]["num_features"]
    if "head.fc.weight" in state and head in (None, "FC"):
        w = state["head.fc.weight"]
        arch["Head"] = {
            "name": "FC",
            "embedding_size": int(w.shape[0]),
            "class_num": int(class_num if class_num is not None else w.shape[1]),
            "bias_attr": "head.fc.bias" in state,
        }
    elif "head.weight" in state:
        if head is None or head == "FC":
            raise PdparamsError(
                "checkpoint has a margin head (head.weight); say which with --head "
                "ArcMargin|CosMargin|CircleMargin"
            )
        w = state["head.weight"]
        arch["Head"] = {
            "name": head,
            "embedding_size": int(w.shape[0]),
            "class_num": int(class_num if class_num is not None else w.shape[1]),
        }
    elif class_num is not None:
        arch["Head"] = {
            "name": head or "FC",
            "embedding_size": emb,
            "class_num": int(class_num),
        }
        if arch["Head"]["name"] == "FC":
            arch["Head"]["weight_attr"] = {
                "initializer": {"name": "Normal", "mean": 0.0, "std": 0.001}
            }
            arch["Head"]["bias_attr"] = False
    if "Head" in arch and head_kwargs:
        arch["Head"].update(head_kwargs)
    return arch


def convert_state_dict(
    state: Mapping[str, np.ndarray],
    arch: Mapping[str, Any],
    *,
    seed: int = 0,
    strict: bool = False,
) -> tuple[dict[str, Any], ConversionReport]:
    """Variables (training form) for `build_model(arch)` filled from a Paddle state dict.

    Tensors absent from the checkpoint or of another shape keep a fresh init (seed `seed`);
    every such case is listed in the report (`strict=True`: PdparamsError instead). Requires a
    training-form arch (deploy False).
    """
    if arch.get("deploy"):
        raise ValueError("convert into the training form, then call reparameterize()")
    state, kind = _normalize_keys(state)
    report = ConversionReport(source_kind=kind)
    model = build_model(arch)
    abstract = abstract_variables(model)
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    values: dict[tuple, np.ndarray] = {}
    consumed: set[str] = set()
    need_init = False
    for kp, leaf in flat:
        names = tuple(k.key for k in kp)
        collection, path = names[0], names[1:]
        key = paddle_key(collection, path)
        want = paddle_shape(tuple(leaf.shape), path)
        if key not in state:
            report.missing.append(key)
            need_init = True
            continue
        consumed.add(key)
        got = tuple(state[key].shape)
        if got != want:
            report.mismatched.append((key, list(got), list(want)))
            need_init = True
            continue
        values[names] = from_paddle_layout(state[key], path).astype(leaf.dtype)
        report.loaded.append(key)
    for key in state:
        if key in consumed:
            continue
        if _is_fusion_target(key, state):
            report.ignored_fusion_targets.append(key)
        else:
            report.unexpected.append(key)
    if strict and not report.ok:
        raise PdparamsError(f"checkpoint does not match the model:\n{report.summary()}")
    fresh = init_variables(model, seed=seed) if need_init else None
    leaves = []
    for kp, _ in flat:
        names = tuple(k.key for k in kp)
        if names in values:
            leaves.append(values[names])
        else:
            node: Any = fresh
            for n in names:
                node = node[n]
            leaves.append(np.asarray(node))
    treedef = jax.tree_util.tree_structure(abstract)
    return dict(jax.tree_util.tree_unflatten(treedef, leaves)), report


def convert_pdparams(
    pdparams: str | Path,
    *,
    arch: Mapping[str, Any] | None = None,
    class_num: int | None = None,
    head: str | None = None,
    no_head: bool = False,
    target: str = "shitu",
    deploy: bool = False,
    strict: bool = False,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, Any], ConversionReport]:
    """(arch, variables, report) from a .pdparams file; `arch` is inferred when not given.

    `deploy=True` returns the fused (re-parameterized) variables and sets arch["deploy"].
    `strict=True` raises PdparamsError if any tensor is missing, mis-shaped or unexpected.
    """
    state = read_pdparams(pdparams)
    if arch is None:
        arch = infer_arch(state, class_num=class_num, head=head, no_head=no_head, target=target)
    arch = {k: v for k, v in dict(arch).items() if k != "deploy"}
    try:
        variables, report = convert_state_dict(state, arch, seed=seed, strict=strict)
    except PdparamsError as e:
        raise PdparamsError(f"{pdparams}: {e}") from e
    if deploy:
        variables = reparameterize(variables)
        arch["deploy"] = True
    return arch, variables, report


def load_pdparams_variables(pdparams: str | Path) -> dict[str, Any]:
    """Model-independent {"params", "batch_stats"} trees (jaxrec names and layouts) of a
    .pdparams file, for non-strict merging into an existing model's variables.

    Bare backbone checkpoints get the `backbone` prefix; rep-block fusion targets are skipped
    (unused in the training form).
    """
    state, _ = _normalize_keys(read_pdparams(pdparams))
    out: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for key, value in state.items():
        if _is_fusion_target(key, state):
            continue
        collection, path = jaxrec_path(key, value.ndim)
        node = out[collection]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = from_paddle_layout(value, path).astype(np.float32)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m jaxrec.convert",
        description="Convert a PaddleClas .pdparams checkpoint (PP-LCNetV2 ImageNet backbone or "
        "PP-ShiTuV2 RecModel) into a jaxrec model directory (config.json + orbax variables).",
    )
    ap.add_argument("--pdparams", required=True, help="input .pdparams file")
    ap.add_argument("--out", required=True, help="output model directory (must not exist)")
    ap.add_argument("--arch-json", help="JSON file with the Arch dict (default: inferred)")
    ap.add_argument(
        "--class-num",
        type=int,
        help="number of classes of the head (default: from the checkpoint's head, or no head)",
    )
    ap.add_argument(
        "--head",
        choices=["FC", "ArcMargin", "CosMargin", "CircleMargin"],
        help="head type (needed for margin-head checkpoints; default FC)",
    )
    ap.add_argument("--no-head", action="store_true", help="drop the head (features only)")
    ap.add_argument(
        "--target",
        choices=["shitu", "imagenet"],
        default="shitu",
        help="model to build when inferring the Arch: the PP-ShiTuV2 RecModel (default) or the "
        "ImageNet PPLCNetV2 classifier",
    )
    ap.add_argument("--deploy", action="store_true", help="write the fused (deploy) form")
    ap.add_argument(
        "--strict", action="store_true", help="fail on any missing/mis-shaped/unexpected tensor"
    )
    ap.add_argument("--seed", type=int, default=0, help="seed for tensors left at init")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    arch = None
    if args.arch_json:
        try:
            arch = json.loads(Path(args.arch_json).read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: --arch-json {args.arch_json}: {e}", file=sys.stderr)
            return 2
        arch = arch.get("Arch", arch)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"error: {out} exists and is not empty (use --overwrite)", file=sys.stderr)
        return 2
    try:
        arch, variables, report = convert_pdparams(
            args.pdparams,
            arch=arch,
            class_num=args.class_num,
            head=args.head,
            no_head=args.no_head,
            target=args.target,
            deploy=args.deploy,
            strict=args.strict,
            seed=args.seed,
        )
    except (PdparamsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    save_model_dir(out, arch, variables, overwrite=args.overwrite)
    (out / "conversion_report.json").write_text(json.dumps(report.to_json(), indent=1) + "\n")
    print(report.summary())
    print(f"wrote {out} (Arch: {json.dumps(arch)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
