"""Class-disjoint retrieval protocols: the classes a set keeps, and hold-out splits.

The metric-learning benchmarks (CUB-200-2011, Cars196, Stanford Online Products) train on one
part of the classes and measure retrieval on the rest, with every test image in turn the query
and all the others the gallery (query == gallery, the image itself excluded). This module holds
the two operations these protocols need on any :class:`~jaxrec.data.datasets.Source`:

* :func:`select_classes`: keep the records whose label lies in an inclusive range (the
  ``classes`` dataset key), e.g. CUB's first 100 classes for training and the last 100 for
  retrieval;
* :func:`holdout_split`: the same protocol for a user's own list file or folder: the last
  classes (in sorted label order) are held out for retrieval (``python -m jaxrec.holdout``).

When a set is its own gallery, every image needs an id of its own so that it does not match
itself (ref §8.3 excludes gallery items with the query's label *and* id): :func:`with_index_uids`
gives records without a third-column id their record index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxrec.data.datasets import Source
from jaxrec.errors import DatasetError


def select_classes(source: Source, classes: Sequence[int], where: str = "classes") -> Source:
    """The records of ``source`` whose label lies in ``[classes[0], classes[1]]`` (inclusive).

    Labels keep their values (``relabel`` maps them to 0..K-1 afterwards when training needs
    it). A range that selects nothing is an error naming ``where`` (the config key).
    """
    lo, hi = (int(v) for v in classes)
    keep = np.flatnonzero((source.labels >= lo) & (source.labels <= hi))
    if keep.size == 0:
        found = np.unique(source.labels)
        raise DatasetError(
            f"{where}: [{lo}, {hi}] selects no image of {source.name}, whose labels run from "
            f"{int(found[0])} to {int(found[-1])}"
        )
    return source.subset(keep)


def relabelled(source: Source) -> Source:
    """``source`` with labels mapped to 0..K-1 in sorted order (PaddleClas ``relabel``)."""
    _, dense = np.unique(source.labels, return_inverse=True)
    return dataclasses.replace(source, labels=dense.astype(np.int64))


def with_index_uids(source: Source) -> Source:
    """``source`` with its record index as the id of every image when it has no ids, so that
    an image never retrieves itself when the set is both query and gallery."""
    if source.uids is not None:
        return source
    return dataclasses.replace(source, uids=np.arange(len(source), dtype=np.int64))


def holdout_classes(labels: np.ndarray, holdout: float) -> np.ndarray:
    """The held-out labels: the last ``holdout`` classes in sorted order (a count >= 1) or that
    fraction of them (0 < holdout < 1, rounded, at least one); both sides keep a class."""
    classes = np.unique(labels)
    if holdout <= 0:
        raise DatasetError(f"--holdout-classes must be positive, got {holdout:g}")
    if holdout < 1:
        n = max(1, int(round(classes.size * holdout)))
    elif float(holdout).is_integer():
        n = int(holdout)
    else:
        raise DatasetError(
            f"--holdout-classes {holdout:g}: give a fraction below 1 or a whole number of classes"
        )
    if n >= classes.size:
        raise DatasetError(
            f"--holdout-classes {holdout:g} holds out {n} of {classes.size} classes: training "
            "needs at least one"
        )
    return classes[classes.size - n :]


def holdout_split(source: Source, holdout: float) -> tuple[Source, Source]:
    """(train, retrieval) sources with disjoint classes, the last classes held out."""
    held = holdout_classes(source.labels, holdout)
    mask = np.isin(source.labels, held)
    return source.subset(np.flatnonzero(~mask)), source.subset(np.flatnonzero(mask))
