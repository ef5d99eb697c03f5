"""RetrievalEvaluator: built once per run, its second evaluation compiles nothing."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax import monitoring
from model_testutil import compiles_of
from train_data_util import make_tiny_dataset, tiny_config

from jaxrec.config import resolve
from jaxrec.evaluation import RetrievalEvaluator, retrieval_metrics
from jaxrec.models import build_model, init_variables
from jaxrec.parallel import make_mesh

_COMPILES: list[str] = []


def _listener(name: str, _duration: float, **_kw) -> None:
    if name == "/jax/core/compile/backend_compile_duration":
        _COMPILES.append(name)


monitoring.register_event_duration_secs_listener(_listener)


@pytest.fixture
def no_persistent_cache():
    """Programs loaded from the persistent cache emit no compile event: count real compiles."""
    old = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", old)


def test_two_evaluations_compile_once_and_match_the_kernel(tmp_path, no_persistent_cache):
    data = make_tiny_dataset(str(tmp_path), train_classes=2, eval_classes=3, per_class=6)
    cfg = tiny_config(data)
    cfg.DataLoader.Eval.Query.sampler.batch_size = 8
    run = resolve(cfg)
    mesh = make_mesh(jax.devices()[:2])
    model = build_model(run.arch, **run.model_options(training=False))
    v1 = init_variables(model, seed=0, image_size=32)
    v2 = init_variables(model, seed=1, image_size=32)
    evaluator = RetrievalEvaluator.for_model(run.eval, model, mesh)

    with compiles_of(evaluator.feature_fn) as feature_compiles:
        before = len(_COMPILES)
        r1 = evaluator.evaluate(v1, return_features=True)
        first = len(_COMPILES) - before
        before = len(_COMPILES)
        r2 = evaluator.evaluate(v2, return_features=True)
        second = len(_COMPILES) - before
    assert first > 0 and second == 0, (first, second)
    assert len(feature_compiles) == 1  # query, gallery and padded batches: one program
    assert list(r1["metrics"]) == ["recall1", "recall5", "mAP"]
    assert r1["metrics"] != r2["metrics"] or not np.allclose(
        r1["query_features"], r2["query_features"]
    )
    # The features are L2-normalized and the metrics are the kernel's on them.
    np.testing.assert_allclose(np.linalg.norm(r1["query_features"], axis=1), 1.0, rtol=1e-5)
    q = evaluator.query
    want = retrieval_metrics(
        r1["query_features"],
        q.labels,
        r1["gallery_features"],
        q.labels,
        q.uids,
        q.uids,
        mesh=mesh,
    )
    for k, v in r1["metrics"].items():
        assert v == want[k]


def test_a_block_of_unanswerable_queries_gives_nan_and_says_why(tmp_path):
    """PaddleClas semantics: a query block in which no query has an item of its class in the
    gallery makes block-weighted recall/mAP NaN; the evaluator keeps the value and explains."""
    data = make_tiny_dataset(str(tmp_path), train_classes=1, eval_classes=3, per_class=4)
    eval_lines = (tmp_path / "eval.txt").read_text().splitlines()
    unknown = [
        ln + f" {100 + i}"
        for i, ln in enumerate((tmp_path / "train.txt").read_text().split("\n")[:4])
    ]
    (tmp_path / "query.txt").write_text("\n".join(eval_lines + unknown) + "\n")
    cfg = tiny_config(data)
    cfg.DataLoader.Eval.Query.dataset.cls_label_path = str(tmp_path / "query.txt")
    cfg.Global.sim_block_size = 4
    run = resolve(cfg)
    model = build_model(run.arch, **run.model_options(training=False))
    evaluator = RetrievalEvaluator.for_model(run.eval, model, make_mesh(jax.devices()[:1]))
    with pytest.warns(UserWarning) as seen:
        metrics = evaluator.evaluate(init_variables(model, seed=0, image_size=32))
    assert all(np.isnan(v) for v in metrics.values()), metrics
    text = " ".join(str(w.message) for w in seen)
    assert "4 of 16 queries have no item of their class in the gallery" in text
    assert "query rows 12-15 (blocks of 4)" in text and "recall1" in text
