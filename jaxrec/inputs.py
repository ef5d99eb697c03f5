"""Runtime data objects from the resolved run: sources, samplers, loaders, eval batches.

The config resolver (`jaxrec.config`) has already read and checked every key; this module only
opens the files the specs name and builds the pipeline objects, checking the labels against the
classifier head on the way (a label outside the head is an error naming the list line).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from jaxrec.config.spec import DatasetSpec, EvalDataSpec, TFDSSpec, TrainDataSpec
from jaxrec.data import datasets, protocols
from jaxrec.data.loader import EvalLoader, TrainLoader
from jaxrec.data.preprocess import Preprocess
from jaxrec.data.sampler import PKSampler
from jaxrec.errors import LabelError


def host_threads(num_workers: int | None) -> int | None:
    """Decode threads of this host for PaddleClas's `loader.num_workers`, which counts per GPU
    process: jaxrec runs one process for all local devices, so it is multiplied by their
    number (capped at the host's cores). None keeps the loader's default (all cores)."""
    if not num_workers:
        return None
    return max(1, min(num_workers * jax.local_device_count(), os.cpu_count() or 1))


def load_source(spec: DatasetSpec, size: int | None = None) -> datasets.Source:
    """The dataset a spec names (list files are parsed and every image checked to exist; a
    prepared dataset must have been prepared at the training `size`), restricted to the
    spec's `classes` and then relabelled when it says so."""
    if spec.classes is None:
        return _open_source(spec, size)
    source = protocols.select_classes(
        _open_source(dataclasses.replace(spec, relabel=False), size),
        spec.classes,
        f"{spec.key}.classes",
    )
    return protocols.relabelled(source) if spec.relabel else source


def _open_source(spec: DatasetSpec, size: int | None) -> datasets.Source:
    if spec.kind == "TFDSDataset":
        source = tfds_source(spec.tfds)
        return protocols.relabelled(source) if spec.relabel else source
    if spec.kind == "PreparedDataset":
        source = datasets.load_prepared(spec.prepared_dir, size=size, relabel=spec.relabel)
        if spec.label_path is not None:
            _check_prepared_from(source, spec)
        return source
    if spec.kind == "VeriWild":
        return datasets.load_query_gallery_list(
            spec.label_path, spec.image_root, relabel=spec.relabel
        )
    return datasets.load_list(
        spec.label_path, spec.image_root, delimiter=spec.delimiter, relabel=spec.relabel
    )


def tfds_source(t: TFDSSpec) -> datasets.Source:
    """The tfds split a `TFDSSpec` names (offline; a clear error when it is not prepared)."""
    return datasets.load_tfds(
        t.name,
        t.split,
        data_dir=t.data_dir,
        image_key=t.image_key,
        label_key=t.label_key,
        uid_key=t.uid_key,
    )


def _check_prepared_from(prepared: datasets.Source, spec: DatasetSpec) -> None:
    """A prepared set used with a list in the config must have been prepared from that list
    (its images, minus those `prepare --skip-bad` left out)."""
    listed = datasets.load_list(
        spec.label_path, spec.image_root, delimiter=spec.delimiter, check_files=False
    )
    manifest = datasets.read_prepared_manifest(spec.prepared_dir)

    def norm(paths):
        return [os.path.normpath(os.path.abspath(p)) for p in paths]

    skipped = set(norm(item["path"] for item in manifest.get("skipped", [])))
    want = [p for p in norm(listed.paths) if p not in skipped]
    got = norm(prepared.paths)
    if got != want:
        extra = sorted(set(got) - set(want))[:3]
        raise datasets.DatasetError(
            f"{spec.prepared_dir} was not prepared from {spec.label_path} (image_root "
            f"{spec.image_root}): {len(got)} prepared images vs {len(want)} listed"
            + (f", e.g. {extra} is not in the list" if extra else "")
            + f". Prepare it again from that list, or point {spec.key}.prepared_dir elsewhere."
        )


def check_labels(source: datasets.Source, class_num: int, where: str, relabel: bool) -> None:
    """Every label must lie in [0, class_num): JAX gathers and one-hots do not raise on an
    out-of-range index (a -1 silently becomes the last class), so this is checked on the host
    before anything is compiled."""
    labels = np.asarray(source.labels)
    bad = np.flatnonzero((labels < 0) | (labels >= class_num))
    if bad.size == 0:
        return
    i = int(bad[0])
    line = f" line {int(source.lines[i])}" if source.lines is not None else ""
    fix = (
        f"the list has {np.unique(labels).size} distinct labels (relabelled to 0..K-1): raise "
        f"{where} to at least that"
        if relabel
        else f"fix the list, raise {where}, or set relabel: True to map the labels to 0..K-1"
    )
    raise LabelError(
        f"{source.name}{line}: label {int(labels[i])} (image {source.paths[i]}) is outside the "
        f"classifier's {class_num} classes [0, {class_num - 1}] set by {where}; "
        f"{bad.size} label(s) of {labels.size} are out of range: {fix}."
    )


def train_loader(
    spec: TrainDataSpec, mesh: Any, seed: int, class_num: int | None = None
) -> TrainLoader:
    """The PK-sampled, augmented, device-sharded training loader (one PxK group per device)."""
    source = load_source(spec.dataset, size=spec.transform.size)
    if class_num is not None:
        check_labels(source, class_num, "Arch.Head.class_num", spec.dataset.relabel)
    s = spec.sampler
    sampler = PKSampler(
        source.labels,
        s.batch_size,
        s.sample_per_id,
        sample_method=s.sample_method,
        id_list=list(s.id_list) or None,
        ratio=list(s.ratio) or None,
        seed=seed,
        num_shards=mesh.devices.size,
        shuffle=s.shuffle,
    )
    kwargs = {}
    if spec.augment_on_device:
        kwargs["augment_on_host"] = False
    return TrainLoader(
        source,
        sampler,
        spec.transform,
        mesh=mesh,
        seed=seed,
        num_workers=host_threads(spec.num_workers),
        **kwargs,
    )


def eval_batches(
    source: datasets.Source,
    preprocess: Preprocess,
    batch_size: int,
    mesh: Any,
    num_workers: int | None = None,
) -> Iterator[Any]:
    """Global uint8 image batches of a query/gallery source, in order, the last one padded."""
    with EvalLoader(source, batch_size, preprocess, mesh=mesh, num_workers=num_workers) as loader:
        for batch in loader:
            yield batch["image"]


def eval_sources(spec: EvalDataSpec) -> tuple[datasets.Source, datasets.Source]:
    """(query, gallery) sources; the same object when both sections name the same list (a tfds
    set without ids then gets its record index as ids)."""
    query = load_source(spec.query)
    if spec.same_lists and spec.query.kind == "TFDSDataset":
        # The benchmarks' query == gallery protocol: no image retrieves itself.
        query = protocols.with_index_uids(query)
    gallery = query if spec.same_lists else load_source(spec.gallery)
    return query, gallery
