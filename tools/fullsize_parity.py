"""Full-size parity: PaddleClas PPLCNetV2_base_ShiTu RecModel vs jaxrec on real photos.

    /work/venv/bin/python tools/fullsize_parity.py --photos DIR --work /tmp/parity \
        --paddle-python /work/paddle_venv/bin/python --paddleclas /work/PaddleClas

1. (paddle venv, a subprocess running this file with --paddle-side) build the full
   GeneralRecognitionV2 RecModel (PPLCNetV2_base_ShiTu + BNNeck 512 + a small FC head) with
   PaddleClas's own ``build_model``, give every BN random statistics and affine parameters and the
   ``last_conv`` bias random values (convs keep Paddle's random init), save ``model.pdparams``;
   preprocess each photo exactly as ``deploy/python/predict_rec.py`` does (``cv2.imread``,
   BGR->RGB, the ``RecPreProcess`` ops of ``deploy/configs/inference_rec.yaml``) and run the
   model in eval mode; also export it like ``tools/export_model.py`` (eval, ``re_parameterize``,
   ``paddle.jit.save``) and run that with Paddle Inference.
2. ``python -m jaxrec.convert`` turns ``model.pdparams`` into a jaxrec model directory and
   ``python -m jaxrec.extract`` computes features of the same photos (training form, and
   ``--fuse`` deploy form), with ``--pixel-scale deploy`` like inference_rec.yaml.
3. Features are compared: raw model outputs and L2-normalized ones.

DIR holds real photos; we used scikit-image 0.26's sample data (``pip download scikit-image==0.26.0
--no-deps`` and unzip ``skimage/data/*``), none of them committed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np

PHOTO_EXTS = (".jpg", ".jpeg", ".png")
HEAD_CLASSES = 16


def arch_config(class_num: int = HEAD_CLASSES) -> dict:
    """Arch of GeneralRecognitionV2_PPLCNetV2_base.yaml with a small head and no download."""
    return {
        "name": "RecModel",
        "infer_output_key": "features",
        "infer_add_softmax": False,
        "Backbone": {
            "name": "PPLCNetV2_base_ShiTu",
            "pretrained": False,
            "use_ssld": False,
            "class_expand": 512,
        },
        "BackboneStopLayer": {"name": "flatten"},
        "Neck": {"name": "BNNeck", "num_features": 512},
        "Head": {"name": "FC", "embedding_size": 512, "class_num": class_num, "bias_attr": False},
    }


# ------------------------------------------------------------------------------- paddle side
def paddle_side(args: argparse.Namespace) -> None:
    import cv2
    import paddle
    import yaml
    from paddleclas.ppcls.arch import build_model

    sys.path.insert(0, os.path.join(args.paddleclas, "deploy", "python"))
    import preprocess as deploy_pre  # PaddleClas deploy/python/preprocess.py

    paddle.set_device("cpu")
    paddle.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = build_model({"Arch": arch_config(), "Global": {"device": "cpu"}})
    state = model.state_dict()
    new_state = {}
    for key, t in state.items():
        v = t.numpy()
        shape = v.shape
        if key.endswith("._mean"):
            v = rng.normal(0.0, 0.2, shape)
        elif key.endswith("._variance"):
            v = rng.uniform(0.5, 2.0, shape)
        elif ".bn." in key or "feat_bn" in key:
            if key.endswith(".weight"):
                v = rng.uniform(0.5, 1.5, shape)
            elif key.endswith(".bias"):
                v = rng.normal(0.0, 0.2, shape)
        elif key == "backbone.last_conv.bias":
            v = rng.normal(0.0, 0.1, shape)
        if key == "neck.feat_bn.bias":
            v = np.zeros(shape)  # frozen at 0 in training (learning rate 1e-20)
        new_state[key] = np.asarray(v, dtype=np.float32)
    model.set_state_dict(new_state)
    with open(os.path.join(args.paddleclas, "deploy", "configs", "inference_rec.yaml")) as f:
        rec_cfg = yaml.safe_load(f)
    ops = deploy_pre.create_operators(rec_cfg["RecPreProcess"]["transform_ops"])
    photos = sorted(
        p for p in glob.glob(os.path.join(args.photos, "*")) if p.lower().endswith(PHOTO_EXTS)
    )
    batch = []
    for p in photos:
        img = cv2.imread(p)[:, :, ::-1]
        for op in ops:
            img = op(img)
        batch.append(img)
    x = np.array(batch)
    # Calibrate: set every BN's running statistics to these photos' batch statistics (one pass
    # with momentum 0, dropout in eval mode), so that features depend on the image rather than
    # being dominated by random BN offsets. Affine parameters and convs stay random.
    model.eval()
    bns = [m for m in model.sublayers() if isinstance(m, paddle.nn.layer.norm._BatchNormBase)]
    for bn in bns:
        bn.train()
        bn._momentum = 0.0
    with paddle.no_grad():
        model(paddle.to_tensor(x))
    for bn in bns:
        bn._momentum = 0.9
    model.eval()
    os.makedirs(args.work, exist_ok=True)
    paddle.save(model.state_dict(), os.path.join(args.work, "model.pdparams"))

    with paddle.no_grad():
        t0 = time.perf_counter()
        feats = model(paddle.to_tensor(x))["features"].numpy()
        dt = time.perf_counter() - t0
    with open(os.path.join(args.work, "images.txt"), "w") as f:
        f.write("".join(os.path.abspath(p) + "\n" for p in photos))
    np.save(os.path.join(args.work, "paddle_raw.npy"), feats)
    np.save(os.path.join(args.work, "paddle_input.npy"), x)

    # Export as tools/export_model.py does, then Paddle Inference (oneDNN) on the same input.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from paddle_ref import export_inference_model, onednn_predictor

    prefix = os.path.join(args.work, "inference", "inference")
    export_inference_model(model, prefix)
    pred = onednn_predictor(prefix, 2, quiet=False)
    inp = pred.get_input_handle(pred.get_input_names()[0])
    inp.copy_from_cpu(x.astype(np.float32))
    pred.run()
    infer = pred.get_output_handle(pred.get_output_names()[0]).copy_to_cpu()
    np.save(os.path.join(args.work, "paddle_infer_raw.npy"), infer)
    info = {
        "paddle": paddle.__version__,
        "opencv": cv2.__version__,
        "photos": [os.path.basename(p) for p in photos],
        "dygraph_eval_seconds": dt,
        "state_dict_tensors": len(new_state),
    }
    with open(os.path.join(args.work, "paddle_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info))


# ------------------------------------------------------------------------------- jaxrec side
def _run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.sum(np.square(x), axis=1, keepdims=True))


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    cos = np.sum(_l2(ref) * _l2(got), axis=1)
    return {
        "worst_cosine": float(cos.min()),
        "max_abs_raw": float(np.abs(ref - got).max()),
        "max_abs_raw_over_max_abs_ref": float(np.abs(ref - got).max() / np.abs(ref).max()),
        "max_abs_normalized": float(np.abs(_l2(ref) - _l2(got)).max()),
        "ref_raw_abs_max": float(np.abs(ref).max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--photos", required=True, help="folder of real photos (.jpg/.png)")
    ap.add_argument("--work", default="/tmp/jaxrec_parity", help="scratch folder")
    ap.add_argument("--paddle-python", default="/work/paddle_venv/bin/python")
    ap.add_argument("--paddleclas", default="/work/PaddleClas", help="PaddleClas source checkout")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--paddle-side", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip-paddle", action="store_true", help="reuse the paddle outputs in --work")
    ap.add_argument("--json", default=None, help="also write the comparison to this JSON file")
    args = ap.parse_args()
    if args.paddle_side:
        paddle_side(args)
        return

    env_cmd = [args.paddle_python, os.path.abspath(__file__), "--paddle-side"]
    if not args.skip_paddle:
        _run(env_cmd + ["--photos", args.photos, "--work", args.work,
                        "--paddleclas", args.paddleclas, "--seed", str(args.seed)])  # fmt: skip
    w = args.work
    model_dir = os.path.join(w, "jaxrec_model")
    py = sys.executable
    _run([py, "-m", "jaxrec.convert", "--pdparams", os.path.join(w, "model.pdparams"),
          "--out", model_dir, "--overwrite"])  # fmt: skip
    images = os.path.join(w, "images.txt")
    common = ["--images", images, "--pixel-scale", "deploy", "--batch-size", "4", "--quiet"]
    _run([py, "-m", "jaxrec.extract", "--model", model_dir, "--out", os.path.join(w, "jax_raw.npy"),
          "--no-normalize", *common])  # fmt: skip
    _run([py, "-m", "jaxrec.extract", "--model", model_dir, "--out", os.path.join(w, "jax.npy"),
          *common])  # fmt: skip
    _run([py, "-m", "jaxrec.extract", "--model", model_dir, "--fuse",
          "--out", os.path.join(w, "jax_fused_raw.npy"), "--no-normalize", *common])  # fmt: skip

    paddle_raw = np.load(os.path.join(w, "paddle_raw.npy"))
    paddle_infer = np.load(os.path.join(w, "paddle_infer_raw.npy"))
    jax_raw = np.load(os.path.join(w, "jax_raw.npy"))
    jax_norm = np.load(os.path.join(w, "jax.npy"))
    jax_fused = np.load(os.path.join(w, "jax_fused_raw.npy"))
    names = open(os.path.join(w, "jax.txt")).read().split()
    expect = [os.path.abspath(p) for p in open(images).read().split()]
    assert names == expect, "jaxrec.extract changed the image order"
    info = json.load(open(os.path.join(w, "paddle_info.json")))
    from jaxrec.data import image as image_lib

    paddle_input = np.load(os.path.join(w, "paddle_input.npy"))
    jax_input = np.stack(
        [
            image_lib.normalize(
                image_lib.preprocess_for_rec(image_lib.decode_image(p)),
                scale=image_lib.SCALE_DEPLOY,
            ).transpose(2, 0, 1)
            for p in names
        ]
    )
    result = {
        "n_images": len(names),
        "photos": info["photos"],
        "paddle": info["paddle"],
        "opencv": info["opencv"],
        "preprocessed_input_bitwise_equal": bool(
            paddle_input.dtype == jax_input.dtype and np.array_equal(paddle_input, jax_input)
        ),
        "preprocessed_input_max_abs": float(np.abs(paddle_input - jax_input).max()),
        "jaxrec_train_form_vs_paddle_dygraph_eval": compare(paddle_raw, jax_raw),
        "jaxrec_normalized_vs_predict_rec_normalization": {
            "max_abs": float(np.abs(_l2(paddle_raw) - jax_norm).max())
        },
        "jaxrec_fused_vs_paddle_inference_onednn": compare(paddle_infer, jax_fused),
        "paddle_inference_vs_paddle_dygraph": compare(paddle_raw, paddle_infer),
        "jaxrec_fused_vs_jaxrec_train_form": compare(jax_raw, jax_fused),
        "feature_spread": {
            "min_pairwise_cosine_distance_paddle": float(
                np.min(1 - (_l2(paddle_raw) @ _l2(paddle_raw).T)[np.triu_indices(len(names), 1)])
            ),
        },
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
