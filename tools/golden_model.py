"""Golden fixtures for the model parity tests, produced by the real PaddleClas (pip package).

Run with the paddle venv (not jaxrec's):
    /work/paddle_venv/bin/python tools/golden_model.py --out tests/fixtures

It builds REDUCED-size reference models with random weights and random BN running statistics:
- the PPLCNetV2_base_ShiTu RecModel (BNNeck + FC head) at scale 0.125, depths [1,1,2,2],
  class_expand 32, 10 classes. Every block type occurs: stride-2 rep block without the 1x1 branch
  (stages.2.0, with SE and split pw), stride-1 rep block with SE + split pw + 1x1 branch
  (stages.2.1), stride-1 stage-4 rep block with the 1x1 branch (stages.3.0) and with the shortcut
  (stages.3.1). The ShiTu edits are applied by PaddleClas's own PPLCNetV2_base_ShiTu function;
  only its hard-wired base scale/depths are swapped for the reduced ones.
- the ImageNet classifier PPLCNetV2 at the same scale/depths (class_expand 48, 7 classes).
- standalone ArcMargin (both easy_margin settings), CosMargin and CircleMargin heads.

Train-mode outputs are recorded with the backbone Dropout's p set to 0 (Paddle's
downscale_in_infer dropout draws its own mask, which cannot be reproduced in JAX); everything
else (BN batch statistics, running-stat updates, parameter gradients of a fixed random projection
of logits and features, margin heads with labels) is the real train path.
The dropout itself is checked separately in the tests against the reference semantics
(docs/REFERENCE.md).

Files written (all small): model_shitu.pdparams, model_shitu.npz, model_imagenet.pdparams,
model_imagenet.npz, model_heads.npz.
"""

from __future__ import annotations

import argparse
import copy
import os

import numpy as np
import paddle

SCALE = 0.125
DEPTHS = [1, 1, 2, 2]
N, H, W = 4, 36, 36
GRAD_KEYS = (
    "backbone.stem.0.conv.weight",
    "backbone.stem.0.bn.weight",
    "backbone.stages.2.0.dw_conv_list.0.conv.weight",
    "backbone.stages.2.1.dw_conv_list.2.conv.weight",
    "backbone.stages.2.1.se.conv1.weight",
    "backbone.stages.2.1.se.conv2.bias",
    "backbone.stages.3.1.pw_conv.bn.bias",
    "backbone.last_conv.weight",
    "backbone.stages.3.0.dw_conv_list.2.bn.weight",
    "neck.feat_bn.weight",
    "neck.feat_bn.bias",
    "head.fc.weight",
)


def randomize(layer: paddle.nn.Layer, rng: np.random.Generator) -> None:
    """Random weights (fan-in scaled) and random BN statistics for every tensor of `layer`."""
    for key, t in layer.state_dict().items():
        shape = list(t.shape)
        if key.endswith("._variance"):
            v = rng.uniform(0.5, 2.0, shape)
        elif key.endswith("._mean"):
            v = rng.normal(0.0, 0.2, shape)
        elif key.endswith(".weight") and len(shape) == 1:  # BN gamma
            v = rng.uniform(0.5, 1.5, shape)
        elif key.endswith(".bias"):
            v = rng.normal(0.0, 0.2, shape)
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            v = rng.normal(0.0, (2.0 / fan_in) ** 0.5, shape)
        elif len(shape) == 2:
            v = rng.normal(0.0, (1.0 / shape[0]) ** 0.5, shape)
        else:
            raise ValueError(f"unexpected tensor {key} {shape}")
        t.set_value(v.astype("float32"))


def outputs(model, x, label=None):
    if label is None:
        out = model(paddle.to_tensor(x))
    else:
        out = model(paddle.to_tensor(x), paddle.to_tensor(label))
    if isinstance(out, dict):
        return {k: v.numpy() for k, v in out.items()}
    return {"logits": out.numpy()}


def build_shitu():
    from paddleclas.ppcls.arch import RecModel
    from paddleclas.ppcls.arch.backbone.legendary_models import pp_lcnet_v2
    from paddleclas.ppcls.arch.backbone.variant_models import pp_lcnetv2_variant

    def reduced_base(pretrained=False, use_ssld=False, **kwargs):
        return pp_lcnet_v2.PPLCNetV2(scale=SCALE, depths=DEPTHS, dropout_prob=0.2, **kwargs)

    pp_lcnetv2_variant.PPLCNetV2_base = reduced_base
    return RecModel(
        Backbone={"name": "PPLCNetV2_base_ShiTu", "pretrained": False, "class_expand": 32},
        BackboneStopLayer={"name": "flatten"},
        Neck={"name": "BNNeck", "num_features": 32},
        Head={"name": "FC", "embedding_size": 32, "class_num": 10, "bias_attr": False},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    paddle.set_device("cpu")
    paddle.seed(0)
    rng = np.random.default_rng(20261128)
    x = rng.normal(0.0, 1.0, (N, 3, H, W)).astype("float32")
    label = np.array([[1], [3], [3], [7]], dtype="int64")

    # ---- ShiTu RecModel
    model = build_shitu()
    randomize(model, rng)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    paddle.save(model.state_dict(), os.path.join(args.out, "model_shitu.pdparams"))
    model.eval()
    ev = outputs(model, x, label)
    rec = {"x": x, "label": label}
    rec.update({f"eval_{k}": v for k, v in ev.items()})

    deployed = copy.deepcopy(model)
    deployed.eval()
    for layer in deployed.sublayers():
        if hasattr(layer, "re_parameterize"):
            layer.re_parameterize()
    rec.update({f"deploy_{k}": v for k, v in outputs(deployed, x, label).items()})

    trained = copy.deepcopy(model)
    trained.train()
    trained.backbone.dropout.p = 0.0
    rec.update({f"train_{k}": v for k, v in outputs(trained, x, label).items()})
    for k, v in trained.state_dict().items():
        if k.endswith("._mean") or k.endswith("._variance"):
            assert not np.array_equal(v.numpy(), sd[k]), k
            rec[f"stat_{k}"] = v.numpy()

    # Gradients of a fixed scalar of the train-mode outputs (BN batch statistics included).
    # (last_conv.bias is left out: train-mode BNNeck removes any per-batch constant, so its
    # gradient is exactly 0 up to rounding noise.)
    graded = copy.deepcopy(model)
    graded.train()
    graded.backbone.dropout.p = 0.0
    out = graded(paddle.to_tensor(x), paddle.to_tensor(label))
    r_logits = rng.normal(0.0, 1.0, out["logits"].shape).astype("float32")
    r_feats = rng.normal(0.0, 1.0, out["features"].shape).astype("float32")
    scalar = (out["logits"] * paddle.to_tensor(r_logits)).sum() + (
        out["features"] * paddle.to_tensor(r_feats)
    ).sum()
    scalar.backward()
    rec["grad_r_logits"], rec["grad_r_features"] = r_logits, r_feats
    grads = {name: p.grad for name, p in graded.named_parameters() if p.grad is not None}
    for name in GRAD_KEYS:
        rec[f"grad_{name}"] = grads[name].numpy()

    # Dropout semantics of the reference, on the real backbone layer.
    drop = model.backbone.dropout
    ones = paddle.ones([64, 32])
    drop.eval()
    rec["dropout_eval_ones"] = drop(ones).numpy()
    drop.train()
    rec["dropout_train_ones"] = drop(ones).numpy()
    np.savez_compressed(os.path.join(args.out, "model_shitu.npz"), **rec)

    # ---- ImageNet classifier
    from paddleclas.ppcls.arch.backbone.legendary_models import pp_lcnet_v2

    net = pp_lcnet_v2.PPLCNetV2(
        scale=SCALE, depths=DEPTHS, dropout_prob=0.2, class_expand=48, class_num=7
    )
    randomize(net, rng)
    paddle.save(net.state_dict(), os.path.join(args.out, "model_imagenet.pdparams"))
    net.eval()
    rec = {"eval_logits": outputs(net, x)["logits"]}  # input: model_shitu.npz["x"]
    net.train()
    net.dropout.p = 0.0
    rec["train_logits"] = outputs(net, x)["logits"]
    np.savez_compressed(os.path.join(args.out, "model_imagenet.npz"), **rec)

    # ---- margin heads
    from paddleclas.ppcls.arch.gears import ArcMargin, CircleMargin, CosMargin

    emb, cls = 16, 12
    feats = rng.normal(0.0, 1.0, (6, emb)).astype("float32")
    lab = rng.integers(0, cls, (6, 1)).astype("int64")
    lab[0, 0], lab[1, 0] = 0, 1
    rec = {"features": feats, "label": lab}
    heads = {
        "arc": ArcMargin(emb, cls),
        "arc_easy": ArcMargin(emb, cls, margin=0.3, scale=30.0, easy_margin=True),
        "cos": CosMargin(emb, cls),
        "circle": CircleMargin(emb, cls, margin=0.25, scale=32.0),
    }
    for name, head in heads.items():
        w = rng.normal(0.0, 1.0, (emb, cls)).astype("float32")
        # A few columns aligned with (or opposite to) a feature row, so that both branches of
        # ArcMargin's cos > -cos(m) / cos > 0 tests are exercised.
        w[:, 0] = -feats[0] * 3.0
        w[:, 1] = feats[1] * 0.5
        head.weight.set_value(w)
        rec[f"{name}_weight"] = w
        head.eval()
        rec[f"{name}_eval"] = head(paddle.to_tensor(feats), paddle.to_tensor(lab)).numpy()
        head.train()
        rec[f"{name}_train"] = head(paddle.to_tensor(feats), paddle.to_tensor(lab)).numpy()
    np.savez_compressed(os.path.join(args.out, "model_heads.npz"), **rec)
    for f in sorted(os.listdir(args.out)):
        if f.startswith("model_"):
            print(f, os.path.getsize(os.path.join(args.out, f)))


if __name__ == "__main__":
    main()
