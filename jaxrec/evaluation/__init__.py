"""Retrieval evaluation: metrics with PaddleClas semantics, exact on-device kernels,
re-ranking, the per-run evaluator and the rank-list picture. Evaluating a training workdir
(`evaluate.py`) is `jaxrec.evaluate`."""

from jaxrec.evaluation.evaluator import RetrievalEvaluator
from jaxrec.evaluation.retrieval import retrieval_metrics, topk_neighbors

__all__ = ["RetrievalEvaluator", "retrieval_metrics", "topk_neighbors"]
