"""`python -m jaxrec.convert`: PaddleClas `.pdparams` <-> jaxrec models (no Paddle needed).

PaddleClas -> jaxrec model directory:

    python -m jaxrec.convert --pdparams general_PPLCNetV2_base_pretrained_v1.0.pdparams --out DIR
    python -m jaxrec.convert --pdparams PPLCNetV2_base_ssld_pretrained.pdparams --out DIR \
        --class-num 192612

jaxrec model -> PaddleClas training-form state dict (for `Global.pretrained_model`,
`load_dygraph_pretrain`, PaddleClas's `tools/export_model.py` and PP-ShiTu's deployment):

    python -m jaxrec.convert --to-pdparams --model DIR --out model.pdparams
    python -m jaxrec.convert --to-pdparams --workdir WORKDIR [--which best|latest | --step N] \
        --out model.pdparams

The conversion itself lives in `jaxrec.paddle.convert`. Converted models record PaddleClas's
deploy preprocessing (`inference_rec.yaml`: 224x224, scale 0.00392157, ImageNet mean/std).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxrec.data.preprocess import INFERENCE_REC
from jaxrec.errors import JaxrecError
from jaxrec.models import FeatureSpec, save_model_dir
from jaxrec.paddle.convert import convert_pdparams, export_pdparams, paddleclas_notes
from jaxrec.paddle.naming import is_fusion_target
from jaxrec.paddle.pdparams import PdparamsError
from jaxrec.training.checkpoint import open_model
from jaxrec.training.workdir import Workdir


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
    model = open_model(args.model or args.workdir, which=args.which or "best", step=args.step)
    state = export_pdparams(model, out, head=not args.no_head, overwrite=args.overwrite)
    n_fused = sum(1 for k in state if is_fusion_target(k, state))
    print(f"wrote {out}: {len(state)} tensors, {sum(v.size for v in state.values()):,} values")
    print(f"  from {model.source}; {n_fused} rep-block fusion targets set to the fused branches")
    print(f"Arch: {json.dumps(model.arch)}")
    prefix = str(out.absolute())[: -len(".pdparams")]
    print(f"PaddleClas loads it with -o Global.pretrained_model={prefix}")
    run_yaml = Workdir(args.workdir).paddleclas_yaml if args.workdir else None
    if run_yaml is not None and run_yaml.is_file():
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
