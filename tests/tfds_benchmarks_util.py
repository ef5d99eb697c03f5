"""Small stand-ins of CUB-200-2011, Cars196 and Stanford Online Products, built offline.

Each builder subclasses tensorflow-datasets' real builder (its `_info`: the real feature names,
types and ClassLabel sizes, and its version), keeps the real dataset name and only replaces
the download with generated PNG images, so `tfds.data_source(<real name>, data_dir=...)` reads
the result exactly as it would read a `tfds build` of the real set copied to that folder.
Images are 12x10 and coloured by class (plus noise), so retrieval has something to find.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

#: (real tfds name, splits -> labels per image): CUB and Cars use all 200 / 196 classes (the
#: protocol splits by class over train+test); SOP keeps its class-disjoint official splits.
CUB_CLASSES, CARS_CLASSES = 200, 196
SOP_TRAIN = [0, 1, 2, 3, 11316, 11317]  # labels of the train split's classes (a few of them)
SOP_TEST = [11318, 11319, 11320, 22632, 22633]


def _png(label: int, k: int, channels: int = 3) -> bytes:
    rs = np.random.RandomState(label * 7 + k)
    base = np.random.RandomState(label).randint(20, 235, size=channels)
    img = np.clip(base + rs.randint(-15, 16, size=(12, 10, channels)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if channels == 1 else img).save(buf, format="PNG")
    return buf.getvalue()


@functools.cache
def _builders() -> dict:
    """Defined once (tfds registers builder classes when they are created)."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.image_classification.caltech_birds import CaltechBirds2011
    from tensorflow_datasets.image_classification.cars196 import Cars196

    sop_cls = tfds.builder_cls("stanford_online_products")

    def per_class(num_classes: int, per: int, odd: bool):
        # train gets images 0, 2, ...; test 1, 3, ...: every class is in both tfds splits.
        for c in range(num_classes):
            for k in range(int(odd), per, 2):
                yield c, k

    class MockCub(CaltechBirds2011, skip_registration=True):
        name = "caltech_birds2011"

        def _split_generators(self, dl_manager):
            return {"train": self._gen(False), "test": self._gen(True)}

        def _gen(self, odd):
            for c, k in per_class(CUB_CLASSES, 4, odd):
                yield (
                    f"{c}_{k}",
                    {
                        "image": _png(c, k),
                        "image/filename": f"{c + 1:03d}.bird/{k}.jpg",
                        "label": c,
                        "label_name": f"bird{c}",
                        "bbox": tfds.features.BBox(0.0, 0.0, 1.0, 1.0),
                        "segmentation_mask": _png(c, k, channels=1),
                    },
                )

    class MockCars(Cars196, skip_registration=True):
        name = "cars196"

        def _split_generators(self, dl_manager):
            return {"train": self._gen(False), "test": self._gen(True)}

        def _gen(self, odd):
            for c, k in per_class(CARS_CLASSES, 4, odd):
                yield (
                    f"{c}_{k}",
                    {
                        "image": _png(c, k),
                        "label": c,
                        "bbox": tfds.features.BBox(0.0, 0.0, 1.0, 1.0),
                        "id": f"{c}_{k}",
                    },
                )

    class MockSop(sop_cls, skip_registration=True):
        name = "stanford_online_products"

        def _split_generators(self, dl_manager):
            return {"train": self._gen(SOP_TRAIN), "test": self._gen(SOP_TEST)}

        def _gen(self, labels):
            for c in labels:
                for k in range(4):
                    yield (
                        f"{c}_{k}",
                        {
                            "class_id": c,
                            "super_class_id/num": c % 12,
                            "super_class_id": c % 12,
                            "image": _png(c, k),
                        },
                    )

    return {"caltech_birds2011": MockCub, "cars196": MockCars, "stanford_online_products": MockSop}


def build(name: str, data_dir: str) -> None:
    """Write the stand-in of tfds dataset `name` into `data_dir` (array_record, as `tfds build
    --file_format=array_record` does)."""
    _builders()[name](data_dir=str(data_dir), file_format="array_record").download_and_prepare()
