"""PaddleClas `.pdparams` <-> jaxrec variables (no Paddle needed): Arch inference, key and
layout mapping with a report, and the training-form state dict PaddleClas loads.

Two kinds of checkpoint are imported:
- a RecModel checkpoint (keys `backbone.*`, `neck.*`, optional `head.*`);
- a bare backbone checkpoint, e.g. the ImageNet PPLCNetV2_base (SSLD) weights (keys `stem.*`,
  `stages.*`, `last_conv.*`, `fc.*`). Loaded into the ShiTu RecModel it leaves `last_conv`
  (shape differs, bias missing) and `stages.3.0.dw_conv_list.2.*` (branch absent at stride 2) at
  their fresh init, and drops `fc.*`; all of this is reported by name.
The `dw_conv.weight/bias` tensors of rep blocks are Paddle's fusion targets, unused in training
and often stale: import ignores them (reported) and `reparameterize` recomputes the deploy form
from the branches; export writes them as the fused branches. Files are read and written by
`jaxrec.paddle.pdparams`; the command line is `python -m jaxrec.convert`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxrec.models import (
    ModelDir,
    abstract_variables,
    build_model,
    init_variables,
    make_divisible,
    reparameterize,
)
from jaxrec.paddle.naming import (
    FUSION_TARGET,
    from_paddle_layout,
    is_fusion_target,
    jaxrec_path,
    paddle_key,
    paddle_order_key,
    paddle_shape,
    to_paddle_state_dict,
)
from jaxrec.paddle.pdparams import PdparamsError, read_pdparams, write_pdparams


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


def paddle_state_dict(variables: Mapping[str, Any], *, head: bool = True) -> dict[str, np.ndarray]:
    """PaddleClas's training-form state dict of training-form jaxrec variables: structured
    names, Paddle layouts, float32, in PaddleClas's order, BN running statistics included.

    Rep blocks also get their `dw_conv.weight/bias` entries. PaddleClas's training-form model
    owns these tensors (the re-parameterization target: unused in training, overwritten by
    `re_parameterize()` before export), so without them loading would warn about missing keys
    and keep stale values. They are written with the fused values of the branches
    (`jaxrec.models.reparameterize`), i.e. what `re_parameterize()` computes: every key
    PaddleClas's model has is present, with honest content. Readers ignore them.
    `head=False` drops the classifier head (`head.*`).
    """
    state = to_paddle_state_dict(variables)
    if any(FUSION_TARGET.match(k) for k in state):
        raise PdparamsError(
            "the variables are in the deploy (re-parameterized) form; PaddleClas's state dict "
            "needs the training form with the rep-block branches"
        )
    for key, value in to_paddle_state_dict(reparameterize(variables)).items():
        if key not in state and is_fusion_target(key, state):
            state[key] = value
    if not head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return {
        k: np.ascontiguousarray(state[k], dtype=np.float32)
        for k in sorted(state, key=paddle_order_key)
    }


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
