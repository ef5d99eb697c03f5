"""Paddle-side helpers shared by the parity and benchmark scripts (run in the paddle venv only).

They do what PaddleClas's `tools/export_model.py` and `deploy/python/predict_rec.py` do with a
RecModel: eval mode, `re_parameterize()` on every rep block, the `features` output, input spec
[None, 3, 224, 224] float32, then Paddle Inference with oneDNN on the CPU.
"""

from __future__ import annotations

import os


def export_inference_model(model, prefix: str) -> str:
    """Fuse and save a PaddleClas RecModel for Paddle Inference; returns the program file."""
    import paddle
    from paddle.static import InputSpec

    model.eval()
    for layer in model.sublayers():
        if hasattr(layer, "re_parameterize"):
            layer.re_parameterize()

    class FeaturesOnly(paddle.nn.Layer):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)["features"]

    wrapped = FeaturesOnly(model)
    wrapped.eval()
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    spec = [InputSpec([None, 3, 224, 224], "float32")]
    paddle.jit.save(paddle.jit.to_static(wrapped, input_spec=spec), prefix)
    return prefix + (".json" if os.path.exists(prefix + ".json") else ".pdmodel")


def onednn_predictor(prefix: str, threads: int, quiet: bool = True):
    """A Paddle Inference predictor with oneDNN and IR optimizations for a saved `prefix`."""
    from paddle import inference

    program = prefix + (".json" if os.path.exists(prefix + ".json") else ".pdmodel")
    cfg = inference.Config(program, prefix + ".pdiparams")
    cfg.disable_gpu()
    cfg.enable_mkldnn()
    cfg.set_cpu_math_library_num_threads(threads)
    cfg.switch_ir_optim(True)
    if quiet:
        cfg.disable_glog_info()
    return inference.create_predictor(cfg)
