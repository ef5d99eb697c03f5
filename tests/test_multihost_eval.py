"""Evaluation over two jax.distributed processes (2 x 4 CPU devices, gloo; each process loads
its slice of every batch, the gallery is sharded over all 8 devices of both) equals evaluation
in this one process with 8 devices, on the shipped demo data (400 query = gallery images)."""

from __future__ import annotations

import json
import os

import multiproc_util
import numpy as np
import pytest

pytestmark = pytest.mark.slow

DEMO_CONFIG = os.path.join(multiproc_util.REPO, "configs", "demo.py")

# The demo config's model with seeded random weights (no trained demo model is shipped; the
# features still depend on the images: recall1 is far from chance).
_SETUP = r"""
import importlib.util
import jax
import numpy as np
from jaxrec.config import resolve
from jaxrec.models import build_model, init_variables


def demo_evaluation(config_path):
    spec = importlib.util.spec_from_file_location("demo_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = resolve(module.get_config())
    model = build_model(run.arch, **run.model_options(training=False))
    size = run.preprocess.input_size[0]
    variables = jax.tree.map(np.asarray, init_variables(model, seed=3, image_size=size))
    return run, model, variables
"""

_WORKER = (
    multiproc_util.PREAMBLE
    + _SETUP
    + r"""
from jaxrec.evaluation import RetrievalEvaluator
from jaxrec.parallel import make_mesh
run, model, variables = demo_evaluation(sys.argv[4])
mesh = make_mesh()
res = RetrievalEvaluator.for_model(run.eval, model, mesh).evaluate(
    variables, return_features=True
)
np.save(sys.argv[5] + f"/features{pid}.npy", res["query_features"])
print(json.dumps({"metrics": res["metrics"], "devices": int(mesh.devices.size),
                  "processes": jax.process_count()}))
"""
)


def test_two_process_evaluation_equals_one_process_on_the_demo(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    outs = multiproc_util.run_processes(script, DEMO_CONFIG, str(tmp_path), timeout=500)

    import jax

    from jaxrec.evaluation import RetrievalEvaluator
    from jaxrec.parallel import make_mesh

    namespace: dict = {}
    exec(_SETUP, namespace)  # the same model and weights, in this single process
    run, model, variables = namespace["demo_evaluation"](DEMO_CONFIG)
    assert jax.process_count() == 1 and jax.device_count() == 8
    evaluator = RetrievalEvaluator.for_model(run.eval, model, make_mesh())
    res = evaluator.evaluate(variables, return_features=True)
    want = res["metrics"]
    assert set(want) == {"recall1", "recall5", "mAP"} and want["recall1"] > 0.4
    for i, out in enumerate(outs):
        assert out["processes"] == 2 and out["devices"] == 8
        for k, v in want.items():
            assert out["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (k, out, want)
        feats = np.load(tmp_path / f"features{i}.npy")
        assert feats.shape == res["query_features"].shape == (400, 128)
        np.testing.assert_allclose(feats, res["query_features"], rtol=1e-6, atol=1e-6)
    print(json.dumps({"one_process": want, "two_processes": outs[0]["metrics"]}))
