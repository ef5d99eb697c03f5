"""Convert between PaddleClas `.pdparams` checkpoints and jaxrec models (no Paddle needed).

PaddleClas -> jaxrec model directory:

    python -m jaxrec.convert --pdparams general_PPLCNetV2_base_pretrained_v1.0.pdparams --out DIR
    python -m jaxrec.convert --pdparams PPLCNetV2_base_ssld_pretrained.pdparams --out DIR \
        --class-num 192612

jaxrec model -> PaddleClas training-form state dict (for `Global.pretrained_model`,
`load_dygraph_pretrain`, PaddleClas's `tools/export_model.py` and PP-ShiTu's deployment):

    python -m jaxrec.convert --to-pdparams --model DIR --out model.pdparams
    python -m jaxrec.convert --to-pdparams --workdir WORKDIR [--which best|latest | --step N] \
        --out model.pdparams

Files are read and written by `jaxrec.pdparams` (restricted unpickler; paddle.save's format).
Two kinds of checkpoint are imported:
- a RecModel checkpoint (keys `backbone.*`, `neck.*`, optional `head.*`);
- a bare backbone checkpoint, e.g. the ImageNet PPLCNetV2_base (SSLD) weights (keys `stem.*`,
  `stages.*`, `last_conv.*`, `fc.*`). Loaded into the ShiTu RecModel it leaves `last_conv`
  (shape differs, bias missing) and `stages.3.0.dw_conv_list.2.*` (branch absent at stride 2) at
  their fresh init, and drops `fc.*`; all of this is reported by name.
The `dw_conv.weight/bias` tensors of rep blocks are Paddle's fusion targets, unused in training
and often stale: import ignores them (reported) and `reparameterize` recomputes the deploy form
from the branches (`--deploy`); export writes them as the fused branches.
Converted models record PaddleClas's deploy preprocessing (`inference_rec.yaml`: 224x224,
scale 0.00392157, ImageNet mean/std).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxrec.data.preprocess import INFERENCE_REC
from jaxrec.errors import JaxrecError
from jaxrec.models import (
    FeatureSpec,
    ModelDir,
    abstract_variables,
    build_model,
    init_variables,
    load_model_dir,
    make_divisible,
    reparameterize,
    save_model_dir,
)
from jaxrec.models.naming import (
    from_paddle_layout,
    jaxrec_path,
    paddle_key,
    paddle_shape,
)
from jaxrec.pdparams import (
    PdparamsError,
    is_fusion_target,
    paddle_state_dict,
    read_pdparams,
    write_pdparams,
)


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
        if is_fusion_target(key, state):
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
        if is_fusion_target(key, state):
            continue
        collection, path = jaxrec_path(key, value.ndim)
        node = out[collection]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = from_paddle_layout(value, path).astype(np.float32)
    return out


# ------------------------------------------------------------------------- jaxrec -> Paddle


def paddleclas_notes(arch: Mapping[str, Any]) -> list[str]:
    """Size keys of the Arch that PaddleClas's backbone function fixes to other values (it then
    cannot build the model from a YAML)."""
    from jaxrec.models.recmodel import BACKBONES  # noqa: PLC0415

    bb = arch.get("Backbone", arch)
    scale, depths, _, _ = BACKBONES.get(bb.get("name"), (None, None, None, None))
    own = {"scale": scale, "depths": depths}
    return [
        f"PaddleClas's {bb['name']} always builds {key} {own[key]}, this model has {bb[key]}: "
        "PaddleClas has no YAML for it"
        for key in own
        if key in bb
        and own[key] is not None
        and np.ravel(bb[key]).tolist() != np.ravel(own[key]).tolist()
    ]


def export_pdparams(
    model: ModelDir, out: str | Path, *, head: bool = True, overwrite: bool = False
) -> dict[str, np.ndarray]:
    """Write a loaded model as a PaddleClas .pdparams file (see `paddle_state_dict`)."""
    try:
        state = paddle_state_dict(model.variables, head=head)
    except PdparamsError as e:
        raise PdparamsError(f"{model.source}: {e}") from None
    write_pdparams(out, state, overwrite=overwrite)
    return state


def _to_pdparams(args: argparse.Namespace) -> int:
    if (args.model is None) == (args.workdir is None):
        raise PdparamsError("--to-pdparams needs exactly one of --model DIR or --workdir DIR")
    if args.model is not None and (args.step is not None or args.which is not None):
        raise PdparamsError("--step and --which select a checkpoint of --workdir, not --model")
    out = Path(args.out)
    if out.suffix != ".pdparams":
        raise PdparamsError(f"--out {out}: the file name must end with .pdparams")
    if out.exists() and not args.overwrite:
        raise PdparamsError(f"--out {out} exists (use --overwrite)")
    if args.model is not None:
        model = load_model_dir(args.model)
    else:
        from jaxrec.checkpoint import restore_model  # noqa: PLC0415

        model = restore_model(args.workdir, which=args.which or "best", step=args.step)
    state = export_pdparams(model, out, head=not args.no_head, overwrite=args.overwrite)
    n_fused = sum(1 for k in state if is_fusion_target(k, state))
    print(f"wrote {out}: {len(state)} tensors, {sum(v.size for v in state.values()):,} values")
    print(f"  from {model.source}; {n_fused} rep-block fusion targets set to the fused branches")
    print(f"Arch: {json.dumps(model.arch)}")
    prefix = str(out.absolute())[: -len(".pdparams")]
    print(f"PaddleClas loads it with -o Global.pretrained_model={prefix}")
    run_yaml = Path(args.workdir or "", "paddleclas.yaml")  # written by the trainer
    if args.workdir and run_yaml.is_file():
        print(
            f"export it for PP-ShiTu from a PaddleClas checkout: python tools/export_model.py "
            f"-c {run_yaml.absolute()} -o Global.pretrained_model={prefix} "
            "-o Global.save_inference_dir=./inference"
        )
    for note in paddleclas_notes(model.arch):
        print(f"note: {note}")
    return 0


_IMPORT_ONLY = ("arch_json", "class_num", "head", "target", "deploy", "strict", "seed")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m jaxrec.convert",
        description="Convert a PaddleClas .pdparams checkpoint (PP-LCNetV2 ImageNet backbone or "
        "PP-ShiTuV2 RecModel) into a jaxrec model directory (config.json + orbax variables), "
        "or, with --to-pdparams, a jaxrec model back into a PaddleClas .pdparams.",
    )
    ap.add_argument("--pdparams", help="input .pdparams file")
    ap.add_argument("--out", required=True, help="output model directory, or FILE.pdparams")
    ap.add_argument("--arch-json", help="JSON file with the Arch dict (default: inferred)")
    ap.add_argument("--class-num", type=int, help="classes of the head (default: the file's)")
    ap.add_argument(
        "--head",
        choices=["FC", "ArcMargin", "CosMargin", "CircleMargin"],
        help="head type (needed for margin-head checkpoints; default FC)",
    )
    ap.add_argument("--no-head", action="store_true", help="drop the head (features only)")
    ap.add_argument(
        "--target",
        choices=["shitu", "imagenet"],
        help="model to build when inferring the Arch: the PP-ShiTuV2 RecModel (default) or the "
        "ImageNet PPLCNetV2 classifier",
    )
    ap.add_argument("--deploy", action="store_true", help="write the fused (deploy) form")
    ap.add_argument("--strict", action="store_true", help="fail on any tensor not matching")
    ap.add_argument("--seed", type=int, help="seed for tensors left at init (default 0)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    exp = ap.add_argument_group("jaxrec -> PaddleClas (--to-pdparams)")
    exp.add_argument(
        "--to-pdparams",
        action="store_true",
        help="write a jaxrec model (--model or --workdir) as a PaddleClas training-form "
        ".pdparams (--out FILE.pdparams) for load_dygraph_pretrain / Global.pretrained_model",
    )
    exp.add_argument("--model", help="jaxrec model directory (training form)")
    exp.add_argument("--workdir", help="training workdir (train.py)")
    exp.add_argument("--step", type=int, help="with --workdir: this checkpoint step")
    exp.add_argument("--which", choices=["best", "latest"], help="with --workdir (default best)")
    return ap


def _from_pdparams(args: argparse.Namespace) -> int:
    given = [f"--{o}" for o in ("model", "workdir", "step", "which") if getattr(args, o)]
    if given:
        raise PdparamsError(f"{', '.join(given)} need --to-pdparams")
    if args.pdparams is None:
        raise PdparamsError("give --pdparams FILE (import) or --to-pdparams (export)")
    arch = None
    if args.arch_json:
        try:
            arch = json.loads(Path(args.arch_json).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PdparamsError(f"--arch-json {args.arch_json}: {e}") from None
        arch = arch.get("Arch", arch)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise PdparamsError(f"{out} exists and is not empty (use --overwrite)")
    arch, variables, report = convert_pdparams(
        args.pdparams,
        arch=arch,
        class_num=args.class_num,
        head=args.head,
        no_head=args.no_head,
        target=args.target or "shitu",
        deploy=args.deploy,
        strict=args.strict,
        seed=args.seed or 0,
    )
    # A converted PaddleClas model is fed as PaddleClas's deploy inference_rec.yaml feeds it.
    features = FeatureSpec(arch.get("infer_output_key", "features"))
    save_model_dir(
        out, arch, variables, preprocess=INFERENCE_REC, features=features, overwrite=args.overwrite
    )
    (out / "conversion_report.json").write_text(json.dumps(report.to_json(), indent=1) + "\n")
    print(report.summary())
    print(f"wrote {out} (Arch: {json.dumps(arch)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.to_pdparams:
            bad = [f"--{o.replace('_', '-')}" for o in _IMPORT_ONLY if getattr(args, o)]
            if args.pdparams or bad:
                raise PdparamsError(
                    f"{', '.join((['--pdparams'] if args.pdparams else []) + bad)}: "
                    "import options, not used with --to-pdparams"
                )
            return _to_pdparams(args)
        return _from_pdparams(args)
    except JaxrecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
