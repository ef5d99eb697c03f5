"""PaddleClas reads what `jaxrec.paddle.yaml_out` writes: the training YAML of a run and
PP-ShiTu's `inference_rec.yaml` of a model.

    .venv/bin/python tools/paddle_config_check.py [--workdir W] [--work /tmp/jaxrec_pcc] \
        [--paddle-python /work/paddle_venv/bin/python] [--paddleclas /work/PaddleClas] \
        [--export E --ort-path DIR]

jaxrec side (this venv): `paddleclas_yaml` of configs/general_v2.py, configs/demo.py, the demo
at full width (`Arch.Backbone.scale=1.0`, the width PaddleClas's PPLCNetV2_base_ShiTu builds)
and, with --workdir, of the run's config.json; `inference_rec_yaml` of four `Preprocess`es
(PP-ShiTu's 224 px, jaxrec's 1/255 224 px, a non-square resize with another normalization, a
resize-short + non-square centre crop) and of the --workdir run's. Test photos are decoded as
`deploy/python/predict_rec.py` does (cv2.imread, BGR -> RGB) and fed through
`Preprocess.apply` + `Preprocess.normalize` (numpy, and jitted jax on uint8).

Paddle side (the same file with --paddle-side, in the Paddle venv, PaddleClas on sys.path):
- every training YAML through `ppcls.utils.config.get_config` as `tools/train.py` reads it
  (`-o Global.device=cpu -o Arch.Backbone.pretrained=False`: no GPU, no download), then
  `ppcls.data.create_operators` on every transform_ops list, `ppcls.loss.build_loss` (Train,
  Eval) and `ppcls.arch.build_model` + `ppcls.optimizer.build_optimizer`; where the data is
  in the repo (the demo YAMLs) `build_dataloader` for Train, Gallery and Query with one batch
  each; for the full-width demo `Engine(config, mode="train")`, as `tools/train.py` builds it,
  and one training step (forward, loss, backward, optimizer step). The half-width demo's
  build_model is expected to fail (its YAML says why).
- every inference_rec YAML through the deploy `utils.config.get_config`, and
  `create_operators(config["RecPreProcess"]["transform_ops"])` run on the same decoded images:
  compared with jaxrec's arrays (bitwise count, max ulp distance).
- PP-ShiTu's `RecPredictor` and `predict_rec.main` on the 224 px YAML, with a Paddle Inference
  export of the general_v2 RecModel (random init) as `rec_inference_model_dir`.
- with --export E (a `python -m jaxrec.export` folder): its `inference_rec_yaml(...,
  use_onnx=True)` through PP-ShiTu's `RecPredictor`, which then runs E/inference.onnx with
  onnxruntime on the photos (--ort-path: a folder holding onnxruntime for the Paddle venv);
  its L2-normalized features are compared with `jaxrec.extract.extract_features` of E.

Exit 0 when every check passes. Run from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import glob
import io
import json
import os
import subprocess
import sys
import time
import traceback

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
PREDICTOR_YAML = "inference_rec_224"


def collect_images(paddleclas: str) -> list[str]:
    photos = sorted(glob.glob(os.path.join(paddleclas, "deploy", "images", "*.jpg")))
    photos += sorted(glob.glob(os.path.join(paddleclas, "deploy", "images", "ImageNet", "*")))
    demo = sorted(
        glob.glob(os.path.join(REPO, "data", "demo", "images", "**", "*.png"), recursive=True)
    )
    return photos + demo[:2]


def ulp_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Largest distance in float32 units in the last place (0: bitwise equal)."""

    def ordered(x: np.ndarray) -> np.ndarray:
        i = np.ascontiguousarray(x, np.float32).view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)

    return int(np.abs(ordered(a) - ordered(b)).max()) if a.size else 0


# ------------------------------------------------------------------------------- jaxrec side
def jaxrec_side(args: argparse.Namespace) -> dict:
    import cv2
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(REPO, "configs"))
    import demo
    import general_v2

    from jaxrec.config import resolve
    from jaxrec.data.preprocess import INFERENCE_REC, LEGACY, Preprocess
    from jaxrec.paddle.yaml_out import inference_rec_yaml, paddleclas_yaml
    from jaxrec.training.workdir import load_config

    w = os.path.abspath(args.work)
    os.makedirs(os.path.join(w, "train"), exist_ok=True)
    os.makedirs(os.path.join(w, "deploy"), exist_ok=True)
    full = demo.get_config()
    full.Arch.Backbone.scale = 1.0
    configs = {"general_v2": general_v2.get_config(), "demo": demo.get_config(), "demo_full": full}
    preprocesses = {
        PREDICTOR_YAML: INFERENCE_REC,
        "legacy_224": LEGACY,
        "resize_64x48_other_norm": Preprocess(
            resize=(64, 48), scale=0.5 / 255, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)
        ),
        "short_256_crop_224x200": Preprocess(resize=None, resize_short=256, crop=(224, 200)),
    }
    if args.workdir:
        configs["workdir"] = load_config(args.workdir)
        preprocesses["workdir"] = resolve(configs["workdir"]).preprocess
    spec: dict = {"train": {}, "deploy": {}, "work": w}
    for name, config in configs.items():
        path = os.path.join(w, "train", f"{name}.yaml")
        text = paddleclas_yaml(config)
        with open(path, "w") as f:
            f.write(text)
        dataset = config["DataLoader"]["Train"]["dataset"]
        spec["train"][name] = {
            "path": path,
            "data": os.path.exists(str(dataset.get("cls_label_path"))),
            "model_expected": "is a jaxrec size extension" not in text,
            "engine": name == "demo_full",
        }
    images = collect_images(args.paddleclas)
    rgb = [cv2.imread(p)[:, :, ::-1] for p in images]  # as predict_rec.py reads them
    np.savez(os.path.join(w, "inputs.npz"), *rgb)
    for name, pre in preprocesses.items():
        path = os.path.join(w, "deploy", f"{name}.yaml")
        with open(path, "w") as f:
            f.write(inference_rec_yaml(pre, model_dir_name=os.path.join(w, "inference")))
        geo = [pre.apply(img) for img in rgb]
        norm_jax = jax.jit(pre.normalize)
        np.savez(
            os.path.join(w, f"jaxrec_{name}.npz"),
            numpy=np.stack([pre.normalize(g) for g in geo]),
            jax=np.stack([np.asarray(norm_jax(jnp.asarray(g[None])))[0] for g in geo]),
        )
        spec["deploy"][name] = {"path": path, "preprocess": pre.describe()}
    spec["images"] = images
    if args.export:
        spec["export"] = _export_side(args.export, images, w)
    with open(os.path.join(w, "spec.json"), "w") as f:
        json.dump(spec, f, indent=1)
    cmd = [args.paddle_python, os.path.abspath(__file__), "--paddle-side", "--work", w,
           "--paddleclas", args.paddleclas]  # fmt: skip
    print("+ " + " ".join(cmd), flush=True)
    log = os.path.join(w, "paddle_side.log")
    env = dict(os.environ)
    if args.ort_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.ort_path, env.get("PYTHONPATH")]))
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=w, stdout=f, stderr=subprocess.STDOUT, env=env)
    result_path = os.path.join(w, "result.json")
    if proc.returncode or not os.path.exists(result_path):
        raise SystemExit(f"paddle side failed (exit {proc.returncode}); see {log}")
    with open(result_path) as f:
        return json.load(f)


def _export_side(export: str, images: list[str], w: str) -> dict:
    """inference_rec.yaml (ONNX) of a jaxrec export and jaxrec's features of the photos."""
    from jaxrec.config import resolve_arch
    from jaxrec.extract import extract_features
    from jaxrec.models import load_model_dir
    from jaxrec.paddle.yaml_out import inference_rec_yaml

    export = os.path.abspath(export)
    md = load_model_dir(export, resolve_arch)
    path = os.path.join(w, "deploy", "export_onnx.yaml")
    with open(path, "w") as f:
        f.write(inference_rec_yaml(md.preprocess, model_dir_name=export, use_onnx=True))
    feats, _ = extract_features(md, images)
    np.save(os.path.join(w, "jaxrec_export_features.npy"), feats)
    return {
        "path": path,
        "normalize": md.features.normalize,
        "preprocess": md.preprocess.describe(),
    }


# ------------------------------------------------------------------------------- paddle side
def _train_checks(name: str, item: dict) -> dict:
    import paddle
    from ppcls.arch import build_model
    from ppcls.data import build_dataloader, create_operators
    from ppcls.loss import build_loss
    from ppcls.optimizer import build_optimizer
    from ppcls.utils import config as ppcls_config

    r: dict = {}
    overrides = ["Global.device=cpu", "Arch.Backbone.pretrained=False"]
    cfg = ppcls_config.get_config(item["path"], overrides=overrides, show=False)
    r["get_config"] = "ok"
    loader = cfg["DataLoader"]
    op_lists = [loader["Train"]["dataset"]["transform_ops"]]
    op_lists += [part["dataset"]["transform_ops"] for part in loader["Eval"].values()]
    r["transform_ops_built"] = sum(len(create_operators(copy.deepcopy(o))) for o in op_lists)
    r["losses"] = {
        k: [type(f).__name__ for f in build_loss(copy.deepcopy(cfg["Loss"][k])).loss_func]
        for k in ("Train", "Eval")
    }
    try:
        model = build_model(copy.deepcopy(cfg))
        r["model_parameters"] = int(sum(int(np.prod(p.shape)) for p in model.parameters()))
    except Exception as e:  # the half-width demo's documented failure
        model = None
        r["model_error"] = f"{type(e).__name__}: {e}"
    r["model_as_expected"] = (model is not None) == item["model_expected"]
    if model is not None:
        optim, lr = build_optimizer(
            copy.deepcopy(cfg["Optimizer"]), cfg["Global"]["epochs"], 10, [model]
        )
        r["optimizer"] = f"{type(optim[0]).__name__}, lr {type(lr[0]).__name__}"
    if item["data"]:
        device = paddle.set_device("cpu")
        train = dict(copy.deepcopy(loader), epochs=cfg["Global"]["epochs"])  # as Engine adds it
        for mode, conf in (
            ("Train", train),
            ("Gallery", loader["Eval"]),
            ("Query", loader["Eval"]),
        ):
            dl = build_dataloader(copy.deepcopy(conf), mode, device, use_dali=False)
            images, labels = next(iter(dl))[:2]
            r[f"{mode}_batch"] = [list(images.shape), list(labels.shape)]
    if item["engine"]:
        r["engine_train_step"] = _engine_step(cfg)
    return r


def _engine_step(cfg) -> dict:
    """`Engine(config, mode="train")` as tools/train.py builds it, then two training steps as
    its train_epoch runs them (the first at the warmup's start LR, 0)."""
    from ppcls.engine.engine import Engine

    engine = Engine(copy.deepcopy(cfg), mode="train")
    engine.model.train()
    before = [p.numpy().copy() for p in engine.model.parameters()]
    it = iter(engine.train_dataloader)
    steps = []
    for _ in range(2):
        batch = next(it)
        labels = batch[1].reshape([batch[0].shape[0], -1])
        losses = engine.train_loss_func(engine.model(batch[0], labels), labels)
        losses["loss"].backward()
        lr = engine.optimizer[0].get_lr()
        engine.optimizer[0].step()
        engine.optimizer[0].clear_grad()
        engine.lr_sch[0].step()
        steps.append({"lr": float(lr), **{k: float(v) for k, v in losses.items()}})
    after = [p.numpy() for p in engine.model.parameters()]
    return {
        "batch": list(batch[0].shape),
        "steps": steps,
        "parameters_updated": sum(
            int(not np.array_equal(a, b)) for a, b in zip(before, after, strict=True)
        ),
        "parameters": len(after),
        "iter_per_epoch": int(engine.iter_per_epoch),
        "eval_loaders": bool(engine.gallery_dataloader and engine.query_dataloader),
    }


def _deploy_checks(spec: dict, rgb: list[np.ndarray]) -> dict:
    from paddleclas.deploy.python.preprocess import create_operators
    from paddleclas.deploy.utils import config as deploy_config

    out = {}
    for name, item in spec["deploy"].items():
        cfg = deploy_config.get_config(item["path"], overrides=[], show=False)
        ops = create_operators(cfg["RecPreProcess"]["transform_ops"])
        batch = []
        for img in rgb:
            for op in ops:
                img = op(img)
            batch.append(img.transpose(1, 2, 0))  # ToCHWImage -> HWC, as jaxrec's
        paddle = np.stack(batch)
        ref = np.load(os.path.join(spec["work"], f"jaxrec_{name}.npz"))
        r = {"preprocess": item["preprocess"], "shape": list(paddle.shape)}
        for kind in ("numpy", "jax"):
            ok = paddle.shape == ref[kind].shape and paddle.dtype == ref[kind].dtype
            r[f"{kind}_bitwise_images"] = (
                int(sum(np.array_equal(a, b) for a, b in zip(paddle, ref[kind], strict=True)))
                if ok
                else 0
            )
            r[f"{kind}_max_ulp"] = ulp_distance(paddle, ref[kind]) if ok else None
        r["images"] = len(rgb)
        out[name] = r
    return out


def _predictor_checks(spec: dict, rgb: list[np.ndarray], paddleclas: str) -> dict:
    import paddle
    from paddle_ref import export_inference_model
    from paddleclas.deploy.python import predict_rec
    from paddleclas.deploy.utils import config as deploy_config
    from pdparams_roundtrip import _memory_optim_broken
    from ppcls.arch import build_model
    from ppcls.utils import config as ppcls_config

    cfg = ppcls_config.get_config(
        spec["train"]["general_v2"]["path"],
        overrides=["Global.device=cpu", "Arch.Backbone.pretrained=False", "Arch.Head.class_num=8"],
        show=False,
    )
    model = build_model(cfg)
    inference = os.path.join(spec["work"], "inference")
    export_inference_model(model, os.path.join(inference, "inference"))
    if _memory_optim_broken(inference):
        paddle.inference.Config.enable_memory_optim = lambda self, *a, **k: None
    path = spec["deploy"][PREDICTOR_YAML]["path"]
    dcfg = deploy_config.get_config(path, overrides=["Global.cpu_num_threads=2"], show=False)
    feats = predict_rec.RecPredictor(dcfg).predict(
        [im.copy() for im in rgb], feature_normalize=False
    )
    ref = np.load(os.path.join(spec["work"], f"jaxrec_{PREDICTOR_YAML}.npz"))["numpy"]
    with paddle.no_grad():
        dygraph = model(paddle.to_tensor(ref.transpose(0, 3, 1, 2)))["features"].numpy()
    cos = (feats * dygraph).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(dygraph, axis=1)
    folder = os.path.join(paddleclas, "deploy", "images", "ImageNet")
    dcfg = deploy_config.get_config(
        path, overrides=["Global.cpu_num_threads=2", f"Global.infer_imgs={folder}"], show=False
    )
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        predict_rec.main(dcfg)
    printed = [line for line in stdout.getvalue().splitlines() if ":\t[" in line]
    return {
        "rec_predictor_features": list(feats.shape),
        "worst_cosine_vs_dygraph_on_jaxrec_input": float(cos.min()),
        "predict_rec_main_images": len(printed),
        "predict_rec_main_expected": len(os.listdir(folder)),
    }


def _export_checks(spec: dict, rgb: list[np.ndarray]) -> dict:
    from paddleclas.deploy.python import predict_rec
    from paddleclas.deploy.utils import config as deploy_config

    item = spec["export"]
    dcfg = deploy_config.get_config(
        item["path"], overrides=["Global.cpu_num_threads=2"], show=False
    )
    predictor = predict_rec.RecPredictor(dcfg)
    feats = predictor.predict([im.copy() for im in rgb], feature_normalize=item["normalize"])
    ref = np.load(os.path.join(spec["work"], "jaxrec_export_features.npy"))
    cos = (feats * ref).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(ref, axis=1)
    return {
        "preprocess": item["preprocess"],
        "features": list(feats.shape),
        "onnx_session": type(predictor.predictor).__name__,
        "worst_cosine_vs_jaxrec_extract": float(cos.min()),
        "max_abs_err": float(np.abs(feats - ref).max()),
    }


def paddle_side(args: argparse.Namespace) -> None:
    sys.path.append(args.paddleclas)  # after site-packages: `paddleclas` stays the pip package
    import paddle
    from ppcls.utils.logger import init_logger

    paddle.set_device("cpu")
    init_logger()
    w = args.work
    with open(os.path.join(w, "spec.json")) as f:
        spec = json.load(f)
    inputs = np.load(os.path.join(w, "inputs.npz"))
    rgb = [inputs[f"arr_{i}"] for i in range(len(inputs.files))]
    result: dict = {"paddle": paddle.__version__, "train": {}, "errors": []}
    for name, item in spec["train"].items():
        try:
            result["train"][name] = _train_checks(name, item)
        except Exception:  # reported; the tool fails
            result["errors"].append(f"train {name}: {traceback.format_exc()}")
    try:
        result["deploy"] = _deploy_checks(spec, rgb)
    except Exception:
        result["errors"].append(f"deploy: {traceback.format_exc()}")
    try:
        result["predictor"] = _predictor_checks(spec, rgb, args.paddleclas)
    except Exception:
        result["errors"].append(f"predictor: {traceback.format_exc()}")
    if "export" in spec:
        try:
            result["export"] = _export_checks(spec, rgb)
        except Exception:
            result["errors"].append(f"export: {traceback.format_exc()}")
    with open(os.path.join(w, "result.json"), "w") as f:
        json.dump(result, f, indent=1)


# ------------------------------------------------------------------------------------ verdict
def verdict(result: dict) -> list[str]:
    """Failed checks, one line each (empty: all passed)."""
    bad = [e.splitlines()[0] + " ... " + e.strip().splitlines()[-1] for e in result["errors"]]
    for name, r in result.get("train", {}).items():
        if not r.get("model_as_expected"):
            bad.append(f"train {name}: build_model {r.get('model_error', 'built')} unexpectedly")
        if name == "demo_full" and not r.get("engine_train_step", {}).get("parameters_updated"):
            bad.append("train demo_full: the training step updated nothing")
    for name, r in result.get("deploy", {}).items():
        if r["numpy_bitwise_images"] != r["images"]:
            bad.append(f"deploy {name}: numpy preprocessing differs (max ulp {r['numpy_max_ulp']})")
        if r["jax_max_ulp"] is None or r["jax_max_ulp"] > 1:
            bad.append(f"deploy {name}: jax preprocessing off by {r['jax_max_ulp']} ulp")
    p = result.get("predictor")
    if p and (
        p["worst_cosine_vs_dygraph_on_jaxrec_input"] < 0.9999
        or p["predict_rec_main_images"] != p["predict_rec_main_expected"]
    ):
        bad.append(f"predictor: {p}")
    e = result.get("export")
    if e and e["worst_cosine_vs_jaxrec_extract"] < 0.9999:
        bad.append(f"export: {e}")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", help="also check this jaxrec training workdir's config")
    ap.add_argument("--work", default="/tmp/jaxrec_paddle_config_check", help="scratch folder")
    ap.add_argument("--paddle-python", default="/work/paddle_venv/bin/python")
    ap.add_argument("--paddleclas", default="/work/PaddleClas", help="PaddleClas source checkout")
    ap.add_argument("--export", help="also run this jaxrec export's ONNX through RecPredictor")
    ap.add_argument("--ort-path", help="folder with onnxruntime for the Paddle venv (--export)")
    ap.add_argument("--json", help="also write the result to this JSON file")
    ap.add_argument("--paddle-side", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.paddle_side:
        paddle_side(args)
        return
    t0 = time.time()
    result = jaxrec_side(args)
    result["seconds"] = round(time.time() - t0, 1)
    result["failures"] = verdict(result)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print("PASS" if not result["failures"] else "FAIL: " + "; ".join(result["failures"]))
    sys.exit(1 if result["failures"] else 0)


if __name__ == "__main__":
    main()
