"""PaddleClas config out: a run's config as a PaddleClas YAML, and PP-ShiTu's deploy YAML.

`paddleclas_yaml(config)` writes the PaddleClas equivalent of a jaxrec config, so that a
PaddleClas user can reproduce or continue the run with `python tools/train.py -c FILE.yaml`.
jaxrec's config mirrors PaddleClas's sections key for key, so the YAML is the config itself
with jaxrec's own keys (`defaults.JAXREC_KEYS`) taken out. PaddleClas reads `Global.seed`
under the same name, so it stays; `Global.sync_bn: True` becomes PaddleClas's
`Arch.use_sync_bn: True`; every other jaxrec key is dropped, and a comment above its section
gives its value and what PaddleClas does instead. jaxrec's backbone size keys
(`scale`/`depths`/`dropout_prob`) are dropped where they equal what PaddleClas's backbone
builds in. Parts that PaddleClas cannot run as they are (a jaxrec model directory as
`Global.pretrained_model`, a `PreparedDataset`, other backbone sizes) stay, with a comment
saying what to change.

Round trip: `resolve(load_yaml(written))` equals `resolve(config)` except for the dropped
jaxrec keys, which fall back to their defaults: `Global.checkpoint_every_steps`,
`keep_checkpoints`, `eval_batch_size_per_device`, `allow_config_change`,
`eval_before_training`, `drop_excluded`, `AMP.dtype` and `DataLoader.Train.augment_on_device`
(and dropped backbone size keys leave `Run.arch`, though the model is the same). The seed
survives.
(`Global.sync_bn: True` comes back only once the YAML reader honours `Arch.use_sync_bn`.)

`inference_rec_yaml(preprocess)` writes PP-ShiTu's `deploy/configs/inference_rec.yaml` for a
model: its `RecPreProcess` feeds images exactly as the model's own `Preprocess` does (input
size, resize or resize-short + centre crop, NormalizeImage scale/mean/std).
"""

from __future__ import annotations

import collections
import copy
import os
import textwrap
from collections.abc import Mapping
from typing import Any

import yaml

from jaxrec.config import defaults
from jaxrec.config.plain import to_plain
from jaxrec.data.preprocess import Preprocess

#: File names written next to a run or an exported model.
PADDLECLAS_YAML = "paddleclas.yaml"
INFERENCE_REC_YAML = "inference_rec.yaml"

#: jaxrec keys PaddleClas reads under the same name: kept.
NATIVE = frozenset({"Global.seed"})

#: jaxrec keys PaddleClas does not have: dropped, with what PaddleClas does instead.
DROPPED: dict[str, str] = {
    "Global.sync_bn": "PaddleClas's switch is Arch.use_sync_bn (written there when True)",
    "Global.checkpoint_every_steps": "PaddleClas checkpoints at epoch ends only "
    "(Global.save_interval)",
    "Global.keep_checkpoints": "PaddleClas keeps every epoch_N checkpoint plus best_model and "
    "latest",
    "Global.eval_batch_size_per_device": "PaddleClas evaluates DataLoader.Eval.*.sampler."
    "batch_size images per device",
    "Global.allow_config_change": "jaxrec's resume check; PaddleClas resumes from "
    "Global.checkpoints",
    "Global.eval_before_training": "PaddleClas evaluates after training epochs only",
    "Global.drop_excluded": "PaddleClas ranks excluded pairs (same label and id) at similarity 0",
    "AMP.dtype": "PaddleClas's AMP computes in float16, with AMP.scale_loss loss scaling",
    "DataLoader.Train.augment_on_device": "PaddleClas augments on the host (same distributions)",
    "DataLoader.Train.dataset.prepared_dir": "jaxrec's prepared set (python -m jaxrec.prepare); "
    "PaddleClas reads the images of cls_label_path",
}

_SECTIONS = ("Global", "AMP", "Arch", "Loss", "Optimizer", "DataLoader", "Metric")
# The order of GeneralRecognitionV2_PPLCNetV2_base.yaml, for a file that reads like PaddleClas's.
_FIRST = {
    "Global": (
        "checkpoints",
        "pretrained_model",
        "output_dir",
        "device",
        "save_interval",
        "eval_during_train",
        "eval_interval",
        "epochs",
        "print_batch_step",
        "use_visualdl",
        "eval_mode",
        "retrieval_feature_from",
        "re_ranking",
        "use_dali",
        "image_shape",
        "save_inference_dir",
    ),
    "Arch": ("name", "infer_output_key", "infer_add_softmax", "Backbone", "BackboneStopLayer"),
    "Optimizer": ("name", "momentum", "lr", "regularizer"),
    "DataLoader": ("Train", "Eval"),
    "DataLoader.Train": ("dataset", "sampler", "loader"),
    "DataLoader.Eval": ("Gallery", "Query"),
}
#: PaddleClas needs ints here (its Cosine schedule's T_max must be an int in Paddle 3).
_INTEGER_KEYS = ("Global.epochs", "Optimizer.lr.warmup_epoch")
_BACKBONE_EXTENSIONS = ("scale", "depths", "dropout_prob")
_NOTES_TITLE = "jaxrec settings that are not PaddleClas keys, or need a change there:"


class _Dumper(yaml.SafeDumper):
    """PaddleClas's YAML style: nested sequences indented, scalar lists inline, True/False."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
        return super().increase_indent(flow, False)


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, dict | list) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_bool(dumper: yaml.SafeDumper, data: bool) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:bool", "True" if data else "False")


def _represent_dict(dumper: yaml.SafeDumper, data: dict) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=not data)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(bool, _represent_bool)
_Dumper.add_representer(dict, _represent_dict)


def _dump(tree: Mapping[str, Any]) -> str:
    return yaml.dump(dict(tree), Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)


def _inline(value: Any) -> str:
    """A value as it would appear in the YAML, on one line (for comments)."""
    return yaml.dump(value, Dumper=_Dumper, default_flow_style=True, width=10**6).split("\n")[0]


def _comment(text: str) -> str:
    """YAML comment lines; text is wrapped except lines that start with a space (commands)."""
    lines = []
    for para in text.split("\n"):
        lines += [para] if para.startswith(" ") else textwrap.wrap(para, 96, subsequent_indent="  ")
    return "".join(f"# {line}\n" for line in lines)


def _ordered(node: Any, path: str = "") -> Any:
    """`name` first in every mapping, PaddleClas's order where `_FIRST` gives one."""
    if isinstance(node, list):
        return [_ordered(v, path) for v in node]
    if not isinstance(node, dict):
        return node
    first = _FIRST.get(path, ("name",))
    keys = [k for k in first if k in node] + [k for k in node if k not in first]
    return {k: _ordered(node[k], f"{path}.{k}" if path else k) for k in keys}


def _node(tree: dict, dotted: str) -> dict | None:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree if isinstance(tree, dict) else None


def _drop_jaxrec_keys(plain: dict, notes: dict[str, list[str]]) -> None:
    for section, keys in defaults.JAXREC_KEYS.items():
        node = _node(plain, section)
        for key in keys:
            dotted = f"{section}.{key}"
            if dotted in NATIVE or node is None or key not in node:
                continue
            value = node.pop(key)
            if dotted == "Global.sync_bn" and value and isinstance(plain.get("Arch"), dict):
                plain["Arch"]["use_sync_bn"] = True
            if value is None:
                continue  # an unset jaxrec key: nothing was lost
            top = dotted.split(".")[0]
            notes[top].append(f"{dotted}: {_inline(value)} - {DROPPED[dotted]}")


def _backbone_extensions(plain: dict, notes: dict[str, list[str]]) -> None:
    """jaxrec's `scale`/`depths`/`dropout_prob` backbone keys: PaddleClas's backbone functions
    pass their own values and fail on these keys. Dropped where they equal those values;
    otherwise kept with a note (PaddleClas has no architecture for such a model)."""
    from jaxrec.models.recmodel import BACKBONES  # noqa: PLC0415 - models import jax

    arch = _node(plain, "Arch") or {}
    backbone = arch.get("Backbone") if isinstance(arch.get("Backbone"), dict) else arch
    where = "Arch.Backbone" if backbone is not arch else "Arch"
    name = backbone.get("name")
    scale, depths, dropout, _ = BACKBONES.get(name, (None, None, None, False))
    fixed = {"scale": scale, "depths": depths, "dropout_prob": dropout}
    for key in (k for k in _BACKBONE_EXTENSIONS if k in backbone):
        value, own = backbone[key], fixed[key]
        try:
            same = own is not None and (
                list(value) == list(own) if key == "depths" else float(value) == float(own)
            )
        except (TypeError, ValueError):
            same = False
        if same:
            backbone.pop(key)
            notes["Arch"].append(
                f"{where}.{key}: {_inline(value)} dropped - PaddleClas's {name} has it built in "
                "and fails on the key"
            )
        else:
            notes["Arch"].append(
                f"{where}.{key}: {_inline(value)} is a jaxrec size extension of {name}: "
                f"PaddleClas's backbone function fixes {key} and fails on this key, so "
                "PaddleClas has no architecture for this model"
            )


def _integers(plain: dict, notes: dict[str, list[str]]) -> None:
    for dotted in _INTEGER_KEYS:
        parent, key = dotted.rsplit(".", 1)
        node = _node(plain, parent)
        value = None if node is None else node.get(key)
        if isinstance(value, float) and value.is_integer():
            node[key] = int(value)
        elif isinstance(value, float):
            notes[dotted.split(".")[0]].append(
                f"{dotted}: {value} - PaddleClas needs a whole number here (its Cosine "
                "schedule's T_max must be an int)"
            )


def _note_unrunnable(plain: dict, notes: dict[str, list[str]]) -> None:
    pretrained = (_node(plain, "Global") or {}).get("pretrained_model")
    if isinstance(pretrained, str) and os.path.isdir(pretrained):
        notes["Global"].append(
            "Global.pretrained_model is a jaxrec model directory; PaddleClas loads .pdparams, "
            "so convert it and point this key at the file:\n"
            f"    python -m jaxrec.convert --to-pdparams --model {pretrained} --out "
            f"{pretrained.rstrip('/')}.pdparams"
        )
    _backbone_extensions(plain, notes)
    train = _node(plain, "DataLoader.Train.dataset") or {}
    if train.get("name") == "PreparedDataset":
        notes["DataLoader"].append(
            "DataLoader.Train.dataset is a jaxrec PreparedDataset, which PaddleClas does not "
            "have: use name ImageNetDataset with the image_root and cls_label_path it was "
            "prepared from (prepared.json: source)"
        )
    _note_benchmark_keys(plain, notes)


def _note_benchmark_keys(plain: dict, notes: dict[str, list[str]]) -> None:
    """jaxrec's TFDSDataset, `classes` and MAP@R (the benchmark protocols): kept, with what
    PaddleClas needs instead."""
    sections = {"DataLoader.Train.dataset": _node(plain, "DataLoader.Train.dataset")}
    for part in _node(plain, "DataLoader.Eval") or {}:
        key = f"DataLoader.Eval.{part}.dataset"
        sections[key] = _node(plain, key)
    for key, node in sections.items():
        node = node if isinstance(node, dict) else {}
        if node.get("name") == "TFDSDataset":
            notes["DataLoader"].append(
                f"{key} is a jaxrec TFDSDataset ({node.get('tfds_name')}, split "
                f"{node.get('split')}), which PaddleClas does not have: write the split as a "
                "list file and use ImageNetDataset (training) or VeriWild (query/gallery)"
            )
        if node.get("classes") is not None:
            notes["DataLoader"].append(
                f"{key}.classes: {_inline(node['classes'])} is jaxrec's label range; PaddleClas "
                "reads every listed image: list only those classes (python -m jaxrec.holdout)"
            )
    for entry in (_node(plain, "Metric") or {}).get("Eval") or []:
        if isinstance(entry, dict) and "MAP@R" in entry:
            notes["Metric"].append("Metric.Eval MAP@R is jaxrec's metric; PaddleClas has none")


def paddleclas_yaml(config: Any) -> str:
    """The PaddleClas YAML of a config (a ConfigDict or the plain dict of WORKDIR/config.json)."""
    plain = defaults.fill(copy.deepcopy(to_plain(config)))
    notes: dict[str, list[str]] = collections.defaultdict(list)
    _drop_jaxrec_keys(plain, notes)
    _integers(plain, notes)
    _note_unrunnable(plain, notes)
    order = [s for s in _SECTIONS if s in plain] + [s for s in plain if s not in _SECTIONS]
    parts = [
        "# PaddleClas config written by jaxrec (jaxrec.paddle.yaml_out) from a jaxrec run.\n"
        "# Train with PaddleClas: python tools/train.py -c THIS.yaml\n"
    ]
    for section in order:
        head = "".join(_comment(line) for line in notes[section])
        if head:
            head = f"# {_NOTES_TITLE}\n{head}"
        parts.append(head + _dump({section: _ordered(plain[section], section)}))
    return "\n".join(parts)


def save_paddleclas_yaml(config: Any, workdir: str | os.PathLike) -> str:
    """Write `WORKDIR/paddleclas.yaml` (atomically) and return its path."""
    path = os.path.join(os.fspath(workdir), PADDLECLAS_YAML)
    return _write(path, paddleclas_yaml(config))


def _write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def _size(hw: tuple[int, int]) -> list[int]:
    """PaddleClas sizes are [width, height]."""
    return [int(hw[1]), int(hw[0])]


def _scale(scale: float) -> float | str:
    return "1.0/255.0" if scale == 1.0 / 255.0 else scale  # as PaddleClas writes it


def inference_rec_yaml(
    preprocess: Preprocess,
    *,
    model_dir_name: str = "inference",
    batch_size: int = 1,
    use_onnx: bool = False,
) -> str:
    """PP-ShiTu's `inference_rec.yaml` for a model fed by `preprocess`.

    `model_dir_name` becomes `Global.rec_inference_model_dir` (a Paddle Inference model
    directory, or with `use_onnx` one holding `inference.onnx`, as jaxrec's export writes).
    """
    resize: dict[str, Any] = (
        {"size": _size(preprocess.resize)}
        if preprocess.resize is not None
        else {"resize_short": int(preprocess.resize_short)}  # type: ignore[arg-type]
    )
    resize.update(return_numpy=False, interpolation=preprocess.interpolation, backend="cv2")
    ops: list[dict[str, Any]] = [{"ResizeImage": resize}]
    if preprocess.crop is not None:
        ops.append({"CropImage": {"size": _size(preprocess.crop)}})
    ops.append(
        {
            "NormalizeImage": {
                "scale": _scale(float(preprocess.scale)),
                "mean": [float(v) for v in preprocess.mean],
                "std": [float(v) for v in preprocess.std],
                "order": "hwc",
            }
        }
    )
    ops.append({"ToCHWImage": None})
    glob: dict[str, Any] = {
        "infer_imgs": "./images/wangzai.jpg",
        "rec_inference_model_dir": model_dir_name,
        "batch_size": int(batch_size),
        "use_gpu": False,
        "enable_mkldnn": True,
        "cpu_num_threads": 10,
        "enable_benchmark": False,
        "use_fp16": False,
        "ir_optim": True,
        "use_tensorrt": False,
        "gpu_mem": 8000,
        "enable_profile": False,
    }
    if use_onnx:
        glob["use_onnx"] = True
    h, w = preprocess.input_size
    head = _comment(
        "PP-ShiTu recognition config written by jaxrec (jaxrec.paddle.yaml_out) with the "
        f"model's own preprocessing: {preprocess.describe()}; input [batch, 3, {h}, {w}] "
        "float32."
    ) + (
        "# Run from PaddleClas's deploy folder:\n"
        "# python python/predict_rec.py -c THIS.yaml -o Global.infer_imgs=IMAGES\n"
    )
    body = [
        _dump({"Global": glob}),
        _dump({"RecPreProcess": {"transform_ops": ops}}),
        _dump({"RecPostProcess": None}),
    ]
    return head + "\n".join(body)


def save_inference_rec_yaml(preprocess: Preprocess, directory: str | os.PathLike, **kw: Any) -> str:
    """Write `DIRECTORY/inference_rec.yaml` (atomically; `kw` as for `inference_rec_yaml`)."""
    path = os.path.join(os.fspath(directory), INFERENCE_REC_YAML)
    return _write(path, inference_rec_yaml(preprocess, **kw))
