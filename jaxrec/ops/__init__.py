"""Numerical kernels shared by the model, training, evaluation and deployment."""

from jaxrec.ops.l2 import l2_normalize

__all__ = ["l2_normalize"]
