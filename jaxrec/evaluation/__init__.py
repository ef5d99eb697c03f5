"""Retrieval evaluation: metrics with PaddleClas semantics, exact on-device kernels,
re-ranking, the per-run evaluator, workdir evaluation and the rank-list picture."""

from jaxrec.evaluation.evaluator import RetrievalEvaluator
from jaxrec.evaluation.retrieval import retrieval_metrics, topk_neighbors
from jaxrec.evaluation.workdir import evaluate_workdir

__all__ = ["RetrievalEvaluator", "evaluate_workdir", "retrieval_metrics", "topk_neighbors"]
