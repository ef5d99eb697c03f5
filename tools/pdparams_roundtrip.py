"""Proof that a jaxrec-trained model goes back into PaddleClas and PP-ShiTu's deployment.

    /work/main/.venv/bin/python tools/pdparams_roundtrip.py --train --work /tmp/pdrt \
        --paddle-python /work/paddle_venv/bin/python --paddleclas /work/PaddleClas

1. (with --train) a short jaxrec demo run, `train.py --config configs/demo.py` for one epoch at
   full width (`Arch.Backbone.scale=1.0`: PaddleClas's `PPLCNetV2_base_ShiTu` always builds
   scale 1.0, so the demo's half-width backbone has no PaddleClas YAML); or an existing
   `--workdir` / model dir `--model`.
2. `python -m jaxrec.convert --to-pdparams` writes it as `model.pdparams` (no Paddle involved).
3. (paddle venv, this file with --paddle-side, the PaddleClas checkout on sys.path) PaddleClas
   reads the stock `GeneralRecognitionV2_PPLCNetV2_base.yaml` with `-o` overrides for the model's
   Arch, builds the RecModel with `ppcls.arch.build_model`, loads the file with its own
   `ppcls.utils.save_load.load_dygraph_pretrain`, checks that every tensor arrived bit for bit,
   and runs the dygraph model in eval mode on the photos, read as `deploy/python/predict_rec.py`
   reads them (cv2.imread, BGR->RGB) and preprocessed by the ops of PP-ShiTu's
   `deploy/configs/inference_rec.yaml` with `-o` overrides for the model's own input size and
   normalization. Then PaddleClas's own `tools/export_model.py` exports the file
   (`Global.pretrained_model`), PP-ShiTu's `RecPredictor` (Paddle Inference, oneDNN) runs the
   export on the same images, `deploy/python/predict_rec.py` is run once as a user would, and
   PP-ShiTu's gallery manager (`deploy/python/build_gallery.py`, faiss Flat) indexes the images.
   Paddle 3.3.1's `Config.enable_memory_optim()` breaks every CPU predictor (see
   `_memory_optim_broken`); when it does, PP-ShiTu's scripts run with that call disabled.
4. `python -m jaxrec.extract` computes the features of the same photos (training form, and
   `--fuse`), each with the model's recorded preprocessing; all are compared (raw features; the
   gallery index holds L2-normalized ones).

Passes (exit 0) when PaddleClas loaded every tensor bit for bit, `paddle.save` of the loaded state
dict gives the same pickle structure (protocol, globals, types, keys, bytes of every array), and
the worst per-image cosine of jaxrec against every Paddle path (dygraph, Paddle Inference, the
gallery index) is at least 0.9999. Run from the repository root.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fullsize_parity import _l2, _run, compare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAML = "ppcls/configs/GeneralRecognitionV2/GeneralRecognitionV2_PPLCNetV2_base.yaml"
DEPLOY_YAML = "deploy/configs/inference_rec.yaml"
GALLERY_YAML = "deploy/configs/inference_general.yaml"
# Runs a script with Paddle Inference's enable_memory_optim() as a no-op (see
# _memory_optim_broken): python -c NO_MEMORY_OPTIM script.py args...
NO_MEMORY_OPTIM = (
    "import os, runpy, sys; from paddle import inference; "
    "inference.Config.enable_memory_optim = lambda self, *a, **k: None; "
    "sys.argv = sys.argv[1:]; sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0])); "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)
MIN_COSINE = 0.9999
DEFAULT_IMAGES = [
    os.path.join(REPO, "tests", "fixtures", "image_files"),
    os.path.join(REPO, "data", "demo", "images", "eval"),
]
JAXREC_ONLY_ARCH_KEYS = ("dtype", "bn_axis_name", "deploy", "fold_bn")


# ------------------------------------------------------------------- Arch -> YAML overrides
def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def arch_overrides(arch: dict, yaml_arch: dict) -> list[str]:
    """`-o Arch.x=v` overrides turning the stock YAML's Arch into the model's Arch."""
    from jaxrec.paddle.convert import paddleclas_notes

    notes = paddleclas_notes(arch)
    if notes:
        raise SystemExit("; ".join(notes) + " (train at full width for this proof)")
    arch = {k: v for k, v in arch.items() if k not in JAXREC_ONLY_ARCH_KEYS}
    # PaddleClas's backbone functions pass their own scale/depths: equal values are dropped.
    arch["Backbone"] = {k: v for k, v in arch["Backbone"].items() if k not in ("scale", "depths")}
    want, have = _flatten(arch), _flatten(yaml_arch)
    missing = sorted(set(have) - set(want))
    if missing:
        raise SystemExit(f"the model's Arch lacks {missing} that the YAML sets; cannot override")
    return [
        f"Arch.{k}={json.dumps(v) if isinstance(v, list) else v}"
        for k, v in want.items()
        if k not in have or have[k] != v
    ]


# ------------------------------------------------------------------------------- paddle side
def paddle_side(args: argparse.Namespace) -> None:
    # The checkout's ppcls; appended (as its tools/export_model.py does) so that `paddleclas`
    # stays the pip package, from which the deploy code imports.
    sys.path.append(args.paddleclas)
    import cv2
    import paddle
    from paddleclas.deploy.python.predict_rec import RecPredictor
    from paddleclas.deploy.python.preprocess import create_operators
    from paddleclas.deploy.utils import config as deploy_config
    from ppcls.arch import build_model
    from ppcls.utils import config as ppcls_config
    from ppcls.utils.logger import init_logger
    from ppcls.utils.save_load import load_dygraph_pretrain

    paddle.set_device("cpu")
    init_logger()
    w = args.work
    spec = json.load(open(os.path.join(w, "model_spec.json")))
    prefix = os.path.join(w, "model")
    overrides = [f"Global.pretrained_model={prefix}", "Global.device=cpu", *spec["overrides"]]
    cfg = ppcls_config.get_config(os.path.join(args.paddleclas, YAML), overrides, show=False)
    model = build_model(cfg)
    load_dygraph_pretrain(model, cfg["Global"]["pretrained_model"])
    model.eval()

    # Every tensor of PaddleClas's model came from the file, bit for bit, in the same order.
    on_disk = paddle.load(prefix + ".pdparams", return_numpy=True)
    state = model.state_dict()
    loaded = {
        "tensors_in_file": len(on_disk),
        "tensors_in_model": len(state),
        "same_keys_same_order": list(on_disk) == list(state),
        "all_bitwise_equal": all(
            k in on_disk
            and tuple(t.shape) == on_disk[k].shape
            and t.numpy().tobytes() == on_disk[k].tobytes()
            for k, t in state.items()
        ),
    }
    # jaxrec's file vs paddle.save of the same state dict: same pickle protocol, globals, types,
    # keys and order, bitwise equal arrays, same name-table keys.
    resaved = os.path.join(w, "paddle_resaved.pdparams")
    paddle.save(state, resaved)
    ours, theirs = _pickle_facts(prefix + ".pdparams"), _pickle_facts(resaved)
    loaded["paddle_save_same_format"] = {
        k: ours[k] == theirs[k] for k in ours if k not in ("arrays", "names")
    }
    loaded["paddle_save_same_format"]["arrays_bitwise"] = ours["arrays"] == theirs["arrays"]
    loaded["paddle_save_same_format"]["name_table_keys"] = list(ours["names"]) == list(
        theirs["names"]
    )
    loaded["paddle_save_globals"] = sorted(".".join(g) for g in theirs["globals"])
    # The rep-block fusion targets jaxrec wrote vs what Paddle's re_parameterize() computes.
    repped = copy.deepcopy(model)
    diffs = []
    for name, layer in repped.named_sublayers():
        if hasattr(layer, "re_parameterize") and getattr(layer, "use_rep", False):
            layer.re_parameterize()
            for leaf in ("weight", "bias"):
                got = getattr(layer.dw_conv, leaf).numpy()
                diffs.append(float(np.abs(got - on_disk[f"{name}.dw_conv.{leaf}"]).max()))
    loaded["fusion_targets"] = len(diffs)
    loaded["fusion_targets_vs_paddle_re_parameterize_max_abs"] = max(diffs) if diffs else None

    # PP-ShiTu's recognition config with the model's input size and normalization.
    deploy_yaml = os.path.join(args.paddleclas, DEPLOY_YAML)
    inference_dir = os.path.join(w, "inference")
    base = [f"Global.rec_inference_model_dir={inference_dir}", "Global.cpu_num_threads=2"]
    deploy_overrides = [*base, *spec["deploy_overrides"]]
    dcfg = deploy_config.get_config(deploy_yaml, overrides=deploy_overrides, show=False)
    images = open(os.path.join(w, "images.txt")).read().split("\n")[:-1]
    rgb = [cv2.imread(p)[:, :, ::-1] for p in images]  # predict_rec.py: cv2.imread, BGR->RGB

    ops = create_operators(dcfg["RecPreProcess"]["transform_ops"])
    batch = []
    for img in rgb:
        for op in ops:
            img = op(img)
        batch.append(img)
    x = np.array(batch).astype(np.float32)
    np.save(os.path.join(w, "paddle_input.npy"), x)
    with paddle.no_grad():
        feats = model(paddle.to_tensor(x))["features"].numpy()
    np.save(os.path.join(w, "paddle_raw.npy"), feats)

    # PaddleClas's own exporter on the file, then PP-ShiTu's Paddle Inference predictor.
    export_cmd = [
        sys.executable, "tools/export_model.py", "-c", YAML,
        *[a for o in overrides for a in ("-o", o)],
        "-o", f"Global.save_inference_dir={inference_dir}",
        "-o", f"Global.image_shape={json.dumps([3, *spec['input_size']], separators=(',', ':'))}",
        "-o", f"Global.output_dir={os.path.join(w, 'ppcls_output')}",
    ]  # fmt: skip
    _logged_run(export_cmd, args.paddleclas, os.path.join(w, "export_model.log"))
    patched = _memory_optim_broken(inference_dir)
    if patched:
        paddle.inference.Config.enable_memory_optim = lambda self, *a, **k: None
    predictor = RecPredictor(dcfg)
    infer = predictor.predict([im.copy() for im in rgb], feature_normalize=False)
    np.save(os.path.join(w, "paddle_infer_raw.npy"), infer)
    # ... and the deployment script itself, as a user runs it (smoke test: it prints features).
    folder = os.path.dirname(images[0])
    rec_cmd = [
        sys.executable, *(["-c", NO_MEMORY_OPTIM] if patched else []),
        "python/predict_rec.py", "-c", "configs/inference_rec.yaml",
        *[a for o in deploy_overrides for a in ("-o", o)], "-o", f"Global.infer_imgs={folder}",
    ]  # fmt: skip
    deploy_dir = os.path.join(args.paddleclas, "deploy")
    out = _logged_run(rec_cmd, deploy_dir, os.path.join(w, "predict_rec.log"))
    # PP-ShiTu's gallery manager indexes the same images (faiss Flat, inner product).
    with open(os.path.join(w, "gallery.txt"), "w") as f:
        f.write("".join(f"{p}\t{os.path.basename(os.path.dirname(p))}\n" for p in images))
    index_dir = os.path.join(w, "index")
    gallery_cmd = [
        sys.executable, *(["-c", NO_MEMORY_OPTIM] if patched else []),
        "python/build_gallery.py", "-c", "configs/inference_general.yaml",
        *[a for o in (*base, "Global.use_gpu=False", *spec["gallery_overrides"])
          for a in ("-o", o)],
        "-o", "IndexProcess.image_root=/", "-o", f"IndexProcess.data_file={w}/gallery.txt",
        "-o", f"IndexProcess.index_dir={index_dir}", "-o", "IndexProcess.index_method=Flat",
        "-o", f"IndexProcess.embedding_size={infer.shape[1]}",
    ]  # fmt: skip
    _logged_run(gallery_cmd, deploy_dir, os.path.join(w, "build_gallery.log"))
    import faiss

    index = faiss.read_index(os.path.join(index_dir, "vector.index"))
    np.save(
        os.path.join(w, "gallery_vectors.npy"),
        np.stack([index.reconstruct(i) for i in range(index.ntotal)]),
    )
    info = {
        "paddle": paddle.__version__,
        "opencv": cv2.__version__,
        "load_dygraph_pretrain": loaded,
        "export_model_command": " ".join(export_cmd),
        "predict_rec_command": " ".join(rec_cmd),
        "paddle_inference_memory_optim_disabled": patched,
        "predict_rec_feature_lines": sum(":\t[" in line for line in out.splitlines()),
        "build_gallery_command": " ".join(gallery_cmd),
    }
    with open(os.path.join(w, "paddle_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))


def _pickle_facts(path: str) -> dict:
    """Protocol, globals, container types, keys and array bytes of a .pdparams pickle."""
    import pickle

    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            seen.add((module, name))
            return super().find_class(module, name)

    data = open(path, "rb").read()
    obj = Recorder(io.BytesIO(data), encoding="latin1").load()
    names = obj.get("StructuredToParameterName@@", {})
    arrays = {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in obj.items() if k in names}
    return {
        "protocol": data[1],
        "globals": seen,
        "top_level_type": type(obj).__name__,
        "keys_in_order": list(obj),
        "name_table_type": type(names).__name__,
        "arrays": arrays,
        "names": names,
    }


def _memory_optim_broken(inference_dir: str) -> bool:
    """Whether `Config.enable_memory_optim()`, which PP-ShiTu's Predictor always calls, makes
    Paddle Inference fail on this export. Paddle 3.3.1 on CPU fails so for every PIR program
    (also a two-layer conv+BN model): "Not find predictor_id 0 and pass_name
    memory_optimize_pass". The tool then runs PP-ShiTu's predictor without that call."""
    from paddle import inference

    cfg = inference.Config(inference_dir, "inference")
    cfg.disable_gpu()
    cfg.disable_glog_info()
    cfg.enable_memory_optim()
    try:
        inference.create_predictor(cfg)
    except ValueError as e:
        if "memory_optimize_pass" in str(e):
            print("note: Paddle Inference fails with enable_memory_optim(); disabled", flush=True)
            return True
        raise
    return False


def _logged_run(cmd: list[str], cwd: str, log: str) -> str:
    print(f"+ (in {cwd}) " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    with open(log, "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"failed (exit {proc.returncode}); see {log}")
    return proc.stdout


# ------------------------------------------------------------------------------- jaxrec side
def deploy_overrides(preprocess: dict, deploy_yaml: dict) -> list[str]:
    """`-o` overrides of PP-ShiTu's deploy inference_rec.yaml for a jaxrec Preprocess."""
    if preprocess["resize"] is None or preprocess["crop"] is not None:
        raise SystemExit("only plain ResizeImage preprocessing is mapped to inference_rec.yaml")
    ops = deploy_yaml["RecPreProcess"]["transform_ops"]
    resize, norm = ops[0]["ResizeImage"], ops[1]["NormalizeImage"]
    h, w = preprocess["resize"]
    out = []
    if list(resize["size"]) != [w, h]:
        out.append(f"RecPreProcess.transform_ops.0.ResizeImage.size=[{w},{h}]")
    for key in ("scale", "mean", "std"):
        if norm[key] != preprocess[key]:
            value = json.dumps(preprocess[key], separators=(",", ":"))
            out.append(f"RecPreProcess.transform_ops.1.NormalizeImage.{key}={value}")
    return out


def collect_images(sources: list[str], per_source: int) -> list[str]:
    """Absolute image paths: each source file, or up to `per_source` evenly spaced files of
    each folder (recursive, sorted)."""
    from jaxrec.data.lists import resolve_images

    out = []
    for src in sources:
        paths = [os.path.abspath(p) for _, p in resolve_images(src)]
        if len(paths) > per_source:
            paths = paths[:: len(paths) // per_source][:per_source]
        out.extend(paths)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--train", action="store_true", help="train a 1-epoch full-width demo run")
    src.add_argument("--workdir", help="an existing jaxrec training workdir (best checkpoint)")
    src.add_argument("--model", help="an existing jaxrec model directory (training form)")
    ap.add_argument("--work", default="/tmp/jaxrec_pdparams_roundtrip", help="scratch folder")
    ap.add_argument("--paddle-python", default="/work/paddle_venv/bin/python")
    ap.add_argument("--paddleclas", default="/work/PaddleClas", help="PaddleClas source checkout")
    ap.add_argument(
        "--images", nargs="+", default=DEFAULT_IMAGES, help="image files / folders / lists"
    )
    ap.add_argument("--per-source", type=int, default=24, help="images taken from each folder")
    ap.add_argument("--json", default=None, help="also write the result to this JSON file")
    ap.add_argument("--paddle-side", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.paddle_side:
        paddle_side(args)
        return
    if not (args.train or args.workdir or args.model):
        ap.error("give --train, --workdir DIR or --model DIR")
    import yaml

    from jaxrec.data.image import decode_image

    w = os.path.abspath(args.work)
    os.makedirs(w, exist_ok=True)
    py = sys.executable
    if args.train:
        args.workdir = os.path.join(w, "demo_run")
        _run([py, "train.py", "--config", "configs/demo.py", "--workdir", args.workdir,
              "--config.Global.epochs=1", "--config.Optimizer.lr.warmup_epoch=0.2",
              "--config.Arch.Backbone.scale=1.0"])  # fmt: skip
    if args.workdir:
        from jaxrec.training.checkpoint import restore_model

        source, md = ["--workdir", args.workdir], restore_model(args.workdir)
        model_arg = args.workdir
    else:
        from jaxrec.config import resolve_arch
        from jaxrec.models import load_model_dir

        source, md = ["--model", args.model], load_model_dir(args.model, resolve_arch)
        model_arg = args.model
    _run([py, "-m", "jaxrec.convert", "--to-pdparams", *source,
          "--out", os.path.join(w, "model.pdparams"), "--overwrite"])  # fmt: skip
    with open(os.path.join(args.paddleclas, YAML)) as f:
        yaml_arch = yaml.safe_load(f)["Arch"]
    deploy_yamls = {}
    for name in (DEPLOY_YAML, GALLERY_YAML):
        with open(os.path.join(args.paddleclas, name)) as f:
            deploy_yamls[name] = yaml.safe_load(f)
    pre = md.preprocess.to_json()
    spec = {
        "arch": md.arch,
        "preprocess": pre,
        "deploy_overrides": deploy_overrides(pre, deploy_yamls[DEPLOY_YAML]),
        "gallery_overrides": deploy_overrides(pre, deploy_yamls[GALLERY_YAML]),
        "input_size": list(md.preprocess.input_size),
        "overrides": arch_overrides(md.arch, yaml_arch),
    }
    with open(os.path.join(w, "model_spec.json"), "w") as f:
        json.dump(spec, f, indent=1)
    images = collect_images(args.images, args.per_source)
    with open(os.path.join(w, "images.txt"), "w") as f:
        f.write("".join(p + "\n" for p in images))

    env = dict(os.environ, OMP_NUM_THREADS="2")
    cmd = [args.paddle_python, os.path.abspath(__file__), "--paddle-side", "--work", w,
           "--paddleclas", os.path.abspath(args.paddleclas)]  # fmt: skip
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)

    common = ["--images", os.path.join(w, "images.txt"), "--no-normalize", "--quiet"]
    _run([py, "-m", "jaxrec.extract", "--model", model_arg,
          "--out", os.path.join(w, "jax_raw.npy"), *common])  # fmt: skip
    _run([py, "-m", "jaxrec.extract", "--model", model_arg, "--fuse",
          "--out", os.path.join(w, "jax_fused_raw.npy"), *common])  # fmt: skip

    arrays = ("paddle_raw", "paddle_infer_raw", "jax_raw", "jax_fused_raw", "paddle_input")
    arrays += ("gallery_vectors",)
    load = {k: np.load(os.path.join(w, f"{k}.npy")) for k in arrays}
    names = open(os.path.join(w, "jax_raw.txt")).read().split("\n")[:-1]
    assert names == images, "jaxrec.extract changed the image order"
    jax_input = np.stack(
        [md.preprocess.normalize(md.preprocess.apply(decode_image(p))).transpose(2, 0, 1)
         for p in images]
    )  # fmt: skip
    info = json.load(open(os.path.join(w, "paddle_info.json")))
    n = len(images)
    result = {
        "n_images": n,
        "images": [os.path.relpath(p, REPO) for p in images],
        "source": md.source,
        "preprocess": md.preprocess.describe(),
        "paddle": info["paddle"],
        "opencv": info["opencv"],
        "load_dygraph_pretrain": info["load_dygraph_pretrain"],
        "export_model_command": info["export_model_command"],
        "predict_rec_command": info["predict_rec_command"],
        "predict_rec_feature_lines": info["predict_rec_feature_lines"],
        "preprocessed_input_bitwise_equal": bool(np.array_equal(load["paddle_input"], jax_input)),
        "preprocessed_input_max_abs": float(np.abs(load["paddle_input"] - jax_input).max()),
        "jaxrec_vs_paddle_dygraph": compare(load["paddle_raw"], load["jax_raw"]),
        "jaxrec_vs_paddle_inference": compare(load["paddle_infer_raw"], load["jax_raw"]),
        "jaxrec_fused_vs_paddle_inference": compare(
            load["paddle_infer_raw"], load["jax_fused_raw"]
        ),
        "paddle_inference_vs_paddle_dygraph": compare(load["paddle_raw"], load["paddle_infer_raw"]),
        # the index holds L2-normalized features: compare with jaxrec's normalized ones
        "jaxrec_normalized_vs_pp_shitu_gallery_index": compare(
            load["gallery_vectors"], _l2(load["jax_raw"].astype(np.float64))
        ),
        "build_gallery_command": info["build_gallery_command"],
    }
    # How different the features are: median over all pairs, and the closest pair of images
    # whose model inputs differ (the EXIF variants of one photo decode to the same pixels).
    dist = 1 - _l2(load["paddle_raw"]) @ _l2(load["paddle_raw"]).T
    x = load["paddle_input"]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if not np.array_equal(x[i], x[j])]
    result["pairwise_cosine_distance_paddle"] = {
        "median": float(np.median(dist[np.triu_indices(n, 1)])),
        "min_over_distinct_inputs": float(min(dist[i, j] for i, j in pairs)),
    }
    ok = (
        info["load_dygraph_pretrain"]["all_bitwise_equal"]
        and info["load_dygraph_pretrain"]["same_keys_same_order"]
        and all(info["load_dygraph_pretrain"]["paddle_save_same_format"].values())
        and min(result[k]["worst_cosine"] for k in result if k.startswith("jaxrec_")) >= MIN_COSINE
    )
    result["passed"] = bool(ok)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
