"""`RetrievalEvaluator`: built once per run, evaluates any variables of its model.

It opens the query/gallery lists once and jits the feature function once (its inputs always
have one batch shape), and the rank kernels of `retrieval.py` are cached per shape, so the
evaluations after the first compile nothing. Query/gallery labels are only compared for
equality, as in PaddleClas, so any integer labels work there (no range check).
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec import inputs
from jaxrec.config.spec import EvalSpec
from jaxrec.errors import ConfigError
from jaxrec.evaluation.metrics import blocks_without_positives, has_positive
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
            raise ConfigError(
                "DataLoader.Eval",
                "is required to evaluate: add Query and Gallery sections (or one) to the config",
            )
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
        if any(np.isnan(v) for v in metrics.values()):
            self._explain_nan(metrics)
        if return_features:
            return {"metrics": metrics, "query_features": qf, "gallery_features": gf}
        return metrics

    def _explain_nan(self, metrics: dict[str, float]) -> None:
        """Say why a metric is NaN when a query block holds no query with a relevant item."""
        valid = has_positive(
            self.query.labels, self.gallery.labels, self.query.uids, self.gallery.uids
        )
        blocks = blocks_without_positives(valid, self.spec.block_size)
        if not blocks:
            return
        nan = [k for k, v in metrics.items() if np.isnan(v)]
        size = self.spec.block_size
        shown = ", ".join(f"{b * size}-{min((b + 1) * size, valid.size) - 1}" for b in blocks[:5])
        more = f" and {len(blocks) - 5} more" if len(blocks) > 5 else ""
        warnings.warn(
            f"{', '.join(nan)} NaN: {int((~valid).sum())} of {valid.size} queries have no item "
            f"of their class in the gallery, and the query rows {shown}{more} (blocks of {size}) "
            "hold only such queries; PaddleClas averages per block, so a block without a "
            "query that can be answered makes the metric NaN (ref §8.4). Shuffle the query list "
            "so unknown queries are spread out, or list them separately.",
            stacklevel=2,
        )
