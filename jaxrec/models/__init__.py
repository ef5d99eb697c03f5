"""PP-ShiTuV2 recognition model in Flax: backbone, neck, heads, RecModel, reparameterization and
BN folding (`fold`), model directories. See docs/ARCHITECTURE.md for the interfaces."""

from jaxrec.models.arch import Arch, BackboneArch, HeadArch, Initializer, NeckArch
from jaxrec.models.fold import fold_variables, reparameterize
from jaxrec.models.heads import ArcMargin, BNNeck, CircleMargin, CosMargin, FCHead, FoldedBN
from jaxrec.models.layers import (
    SE,
    ConvBN,
    DepthwiseConv,
    DownscaleInInferDropout,
    RepDepthwiseSeparable,
)
from jaxrec.models.lcnetv2 import PPLCNetV2, make_divisible
from jaxrec.models.modeldir import (
    FeatureSpec,
    ModelDir,
    fingerprint,
    load_model_dir,
    read_arch,
    save_model_dir,
)
from jaxrec.models.recmodel import (
    RecModel,
    abstract_variables,
    build_model,
    count_params,
    init_variables,
)

__all__ = [
    "ArcMargin",
    "Arch",
    "BackboneArch",
    "BNNeck",
    "CircleMargin",
    "ConvBN",
    "CosMargin",
    "DepthwiseConv",
    "DownscaleInInferDropout",
    "FeatureSpec",
    "FCHead",
    "FoldedBN",
    "HeadArch",
    "Initializer",
    "ModelDir",
    "NeckArch",
    "PPLCNetV2",
    "RecModel",
    "RepDepthwiseSeparable",
    "SE",
    "abstract_variables",
    "build_model",
    "count_params",
    "fingerprint",
    "fold_variables",
    "init_variables",
    "load_model_dir",
    "make_divisible",
    "read_arch",
    "reparameterize",
    "save_model_dir",
]
