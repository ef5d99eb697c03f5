"""`RetrievalEvaluator`: built once per run, evaluates any variables of its model.

It opens the query/gallery lists once and jits the feature function once (its inputs always
have one batch shape), and the rank kernels of `retrieval.py` are cached per shape, so the
evaluations after the first compile nothing. Query/gallery labels are only compared for
equality, as in PaddleClas, so any integer labels work there (no range check).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec import inputs
from jaxrec.config.spec import EvalSpec
from jaxrec.errors import ConfigError
from jaxrec.evaluation.retrieval import retrieval_metrics
from jaxrec.models.features import FeatureFn, feature_fn
from jaxrec.parallel import data_sharding, host_array, replicated

PyTree = Any


class RetrievalEvaluator:
    """Recall@k / mAP (and the other configured metrics) of a feature function on the run's
    eval sets. `features` is `(variables, uint8 NHWC) -> [N, D] float32`
    (`jaxrec.models.feature_fn`); `for_model` builds it from the run's spec."""

    def __init__(self, spec: EvalSpec, features: FeatureFn, mesh: Any) -> None:
        if spec.data is None:
            raise ConfigError("the config has no DataLoader.Eval section to evaluate on")
        self.spec, self.mesh = spec, mesh
        self.data = spec.data
        self.query, self.gallery = inputs.eval_sources(self.data)
        self.batch_size = self.data.global_batch(mesh.devices.size)
        self.feature_fn = jax.jit(
            features,
            in_shardings=(replicated(mesh), data_sharding(mesh)),
            out_shardings=data_sharding(mesh),
        )

    @classmethod
    def for_model(cls, spec: EvalSpec, model: Any, mesh: Any) -> RetrievalEvaluator:
        """The evaluator of `model` fed as the run says: eval pixel normalization, compute
        dtype, feature output key and L2 normalization."""
        if spec.data is None:
            raise ConfigError("the config has no DataLoader.Eval section to evaluate on")
        fn = feature_fn(
            model, spec.feature, spec.data.preprocess.pixel, jnp.dtype(spec.compute_dtype)
        )
        return cls(spec, fn, mesh)

    def features(self, variables: PyTree, which: str) -> np.ndarray:
        """[N, D] float32 features of the query or gallery images, in list order."""
        source = self.query if which == "query" else self.gallery
        variables = jax.device_put(variables, replicated(self.mesh))
        batches = inputs.eval_batches(
            source, self.data.preprocess, self.batch_size, self.mesh, self.data.num_workers
        )
        out = [host_array(self.feature_fn(variables, images)) for images in batches]
        return np.concatenate(out, axis=0)[: len(source)]

    def evaluate(self, variables: PyTree, return_features: bool = False) -> dict:
        """Metrics (keys in the configured order) of `variables` ({"params", "batch_stats"})."""
        qf = self.features(variables, "query")
        gf = qf if self.data.same_lists else self.features(variables, "gallery")
        out = retrieval_metrics(
            qf,
            self.query.labels,
            gf,
            self.gallery.labels,
            query_ids=self.query.uids,
            gallery_ids=self.gallery.uids,
            topk=self.spec.topk,
            metrics=self.spec.metrics,
            sim_block_size=self.spec.block_size,
            mesh=self.mesh,
            re_ranking=self.spec.re_ranking,
            drop_excluded=self.spec.drop_excluded,
        )
        metrics = {k: float(out[k]) for k in self.spec.keys}
        if return_features:
            return {"metrics": metrics, "query_features": qf, "gallery_features": gf}
        return metrics
