"""int8 export: onnxruntime static quantization of the ONNX graph, measured against float32
(cosines, top-1 agreement, Recall@1/mAP) and refused when it loses accuracy."""

import json

import numpy as np
import pytest
from PIL import Image

from jaxrec import export as E
from jaxrec.export import int8
from jaxrec.models import save_model_dir

pytest.importorskip("onnxruntime")

from model_testutil import build
from test_export import OWN, SIZE, random_variables, tiny_arch

N_CLASSES, PER_CLASS = 4, 12


def _pattern(c, rng):
    """A class-specific image: stripes of class-dependent frequency and colour, plus noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    stripes = (np.sin((xx * np.cos(c) + yy * np.sin(c)) * (0.3 + 0.25 * c)) > 0).astype(float)
    colour = np.array([[60, 200, 90], [220, 40, 40], [40, 80, 230], [230, 220, 30]][c], float)
    img = stripes[..., None] * colour + (1 - stripes[..., None]) * (255 - colour)
    return np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    arch = tiny_arch()
    m = build(arch)
    v = random_variables(m, 0)
    out = root / "model"
    save_model_dir(out, arch, m, v, preprocess=OWN)
    model, fv = E.folded(E.deploy_arch(arch), E.deploy_variables(v))
    import onnx

    onnx.save(E.build_onnx(model, fv, "features", (SIZE, SIZE))[0], str(out / E.ONNX_FILE))
    rng = np.random.default_rng(0)
    for name in ("eval", "calib", "blank"):
        (root / name).mkdir()
    lines = []
    for c in range(N_CLASSES):
        for i in range(PER_CLASS):
            Image.fromarray(_pattern(c, rng)).save(root / "eval" / f"{c}_{i}.png")
            Image.fromarray(_pattern(c, rng)).save(root / "calib" / f"{c}_{i}.png")
            lines.append(f"eval/{c}_{i}.png {c} {len(lines)}")
    (root / "eval.txt").write_text("\n".join(lines) + "\n")
    for i in range(8):
        Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(root / "blank" / f"{i}.png")
    return root


def test_int8_graph_is_measured_and_installed(model_dir):
    out = model_dir / "model"
    rc = E.main(
        ["--model", str(out), "--out", str(out), "--int8", str(model_dir / "calib"),
         "--int8-eval", str(model_dir / "eval.txt"), "--int8-only"]
    )  # fmt: skip
    rep = json.loads((out / int8.INT8_CHECK_FILE).read_text())
    assert rc == 0 and rep["ok"] and (out / int8.INT8_FILE).is_file(), rep["reason"]
    ev = rep["eval"]
    assert ev["images"] == N_CLASSES * PER_CLASS and ev["cosine"]["median"] > 0.99
    assert ev["float32"]["recall1"] > 0.9  # the eval set is separable, so the check means something
    # near-duplicate images of a class swap places, so agreement is a figure, not a rule
    assert ev["recall1_drop"] <= 0.01 and 0 < ev["top1_agreement"] <= 1
    # the quantized graph really is integer: QDQ nodes around the convolutions
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / int8.INT8_FILE)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    # extract through the int8 graph: unit features close to the float32 model's
    fwd8 = int8.onnx_forward(out, OWN, normalize=True, int8=True)
    fwd32 = int8.onnx_forward(out, OWN, normalize=True, int8=False)
    x = np.stack([np.asarray(Image.open(p)) for p in sorted((model_dir / "eval").glob("*.png"))])
    cos = np.sum(fwd8(None, x) * fwd32(None, x), axis=1)
    assert np.median(cos) > 0.99 and np.allclose(np.linalg.norm(fwd8(None, x), axis=1), 1, 1e-5)


def test_broken_quantization_is_refused(model_dir, capsys):
    out = model_dir / "model"
    (out / int8.INT8_FILE).unlink(missing_ok=True)
    rc = E.main(
        ["--model", str(out), "--out", str(out), "--int8", str(model_dir / "blank"),
         "--int8-eval", str(model_dir / "eval.txt"), "--int8-only"]
    )  # fmt: skip
    rep = json.loads((out / int8.INT8_CHECK_FILE).read_text())
    assert rc == 1 and not rep["ok"] and not (out / int8.INT8_FILE).exists()
    assert rep["eval"]["cosine"]["p5"] < int8.MIN_P5_COSINE or rep["eval"]["recall1_drop"] > 0.01
    assert "refused and not written" in capsys.readouterr().err
    assert not list(out.glob(".*tmp*"))  # no temporary file left behind


def test_int8_user_errors(model_dir, capsys):
    out = model_dir / "model"
    assert E.main(["--model", str(out), "--out", str(out), "--int8-only"]) == 2
    assert "go with --int8" in capsys.readouterr().err
    rc = E.main(["--model", str(out), "--out", str(out), "--int8", str(model_dir / "nope"),
                 "--int8-only"])  # fmt: skip
    assert rc == 2 and "does not exist" in capsys.readouterr().err
