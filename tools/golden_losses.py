"""Produce loss fixtures with the real PaddleClas losses (run in the paddle venv).

    PYTHONPATH=/work/PaddleClas /work/paddle_venv/bin/python tools/golden_losses.py \
        --out tests/fixtures/loss_golden.npz

For several random P x K batches it records, per case, the inputs (features, logits, labels,
CenterLoss centers), each loss value and the gradients with respect to features, logits and
centers, computed by ``ppcls.loss`` classes in Paddle (float32, CPU).
"""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np


def run_case(paddle, build_loss, cfg, feats, logits, labels, centers):
    loss_fn = build_loss(copy.deepcopy(cfg))
    if centers is not None:
        for layer in loss_fn.loss_func:
            if type(layer).__name__ == "CenterLoss":
                layer.centers.set_value(paddle.to_tensor(centers))
    f = paddle.to_tensor(feats, stop_gradient=False)
    z = paddle.to_tensor(logits, stop_gradient=False)
    y = paddle.to_tensor(labels.reshape(-1, 1).astype("int64"))
    out = loss_fn({"features": f, "logits": z}, y)
    params = [f, z] + [p for p in loss_fn.parameters()]
    grads = paddle.grad(out["loss"], params, allow_unused=True)
    result = {k: float(v.numpy()) for k, v in out.items()}
    g = {
        "grad_features": grads[0],
        "grad_logits": grads[1],
        "grad_centers": grads[2] if len(grads) > 2 else None,
    }
    g = {
        k: (np.zeros(shape, np.float32) if v is None else v.numpy().astype(np.float32))
        for (k, v), shape in zip(
            g.items(),
            [feats.shape, logits.shape, centers.shape if centers is not None else (0,)],
            strict=True,
        )
    }
    return result, g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/fixtures/loss_golden.npz")
    args = parser.parse_args()

    import paddle
    from ppcls.loss import build_loss
    from ppcls.utils import logger

    logger.init_logger()

    paddle.set_device("cpu")
    rng = np.random.default_rng(20261128)
    ppshitu = [
        {"CELoss": {"weight": 1.0, "epsilon": 0.1}},
        {
            "TripletAngularMarginLoss": {
                "weight": 1.0,
                "feature_from": "features",
                "margin": 0.5,
                "reduction": "mean",
                "add_absolute": True,
                "absolute_loss_weight": 0.1,
                "normalize_feature": True,
                "ap_value": 0.8,
                "an_value": 0.4,
            }
        },
    ]
    configs = {
        "ppshitu": ppshitu,
        "ce_smooth_only": [{"CELoss": {"weight": 3.0, "epsilon": 0.1}}],
        "ce_plain_weighted": [
            {"CELoss": {"weight": 0.5}},
            {"TripletLossV2": {"weight": 2.0, "margin": 0.5}},
        ],
        "tam_default": [{"TripletAngularMarginLoss": {"weight": 1.0}}],
        "tam_unnormalized": [
            {
                "TripletAngularMarginLoss": {
                    "weight": 1.0,
                    "normalize_feature": False,
                    "add_absolute": True,
                    "absolute_loss_weight": 0.3,
                }
            }
        ],
        "tripletv2": [{"TripletLossV2": {"weight": 1.0, "margin": 0.3}}],
        "center_ce": [
            {"CELoss": {"weight": 1.0, "epsilon": 0.2}},
            {"CenterLoss": {"weight": 0.01, "num_classes": 12, "feat_dim": 24}},
        ],
    }
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, dict] = {}
    for name, cfg in configs.items():
        for trial in range(2):
            p, k = (4, 4) if trial == 0 else (6, 2)
            n, d, c = p * k, 24, 12
            ids = rng.choice(c, size=p, replace=False)
            labels = np.repeat(ids, k)
            rng.shuffle(labels)
            scale = 1.0 if trial == 0 else 3.0
            feats = (rng.standard_normal((n, d)) * scale).astype(np.float32)
            # Make same-label features correlated so that both hinge branches occur.
            feats += rng.standard_normal((c, d)).astype(np.float32)[labels] * scale
            logits = (rng.standard_normal((n, c)) * 2).astype(np.float32)
            centers = rng.standard_normal((c, d)).astype(np.float32)
            use_centers = any("CenterLoss" in e for e in cfg)
            values, grads = run_case(
                paddle, build_loss, cfg, feats, logits, labels, centers if use_centers else None
            )
            key = f"{name}_{trial}"
            arrays[f"{key}/features"] = feats
            arrays[f"{key}/logits"] = logits
            arrays[f"{key}/labels"] = labels.astype(np.int64)
            if use_centers:
                arrays[f"{key}/centers"] = centers
            for g_name, g in grads.items():
                if g.size:
                    arrays[f"{key}/{g_name}"] = g
            meta[key] = {"config": cfg, "values": values}
            print(key, values)

    # Spec 5.3 worked example through the reference as a sanity anchor.
    feats = np.array([[2, 0, 0, 0], [0.8, 0.6, 0, 0], [0, 3, 0, 0], [0, 0.3, 0.4, 0]], np.float32)
    logits = np.array([[2, -1, 0.5], [0, 0, 0], [1, 3, -2], [-1, 0.5, 0.25]], np.float32)
    labels = np.array([0, 0, 1, 1])
    values, grads = run_case(paddle, build_loss, ppshitu, feats, logits, labels, None)
    arrays["spec53/features"], arrays["spec53/logits"] = feats, logits
    arrays["spec53/labels"] = labels.astype(np.int64)
    arrays["spec53/grad_features"], arrays["spec53/grad_logits"] = (
        grads["grad_features"],
        grads["grad_logits"],
    )
    meta["spec53"] = {"config": ppshitu, "values": values}
    print("spec53", values)

    arrays["meta_json"] = np.array(json.dumps(meta))
    np.savez_compressed(args.out, **arrays)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
