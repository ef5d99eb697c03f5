"""The resolved run: frozen, typed, every default applied. Built only by `config.resolve`.

Everything downstream (trainer, evaluator, checkpoints, export of a workdir) reads these objects
and never a config key, so a key is interpreted exactly once and in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxrec.data.preprocess import FeatureSpec, PixelNorm, Preprocess
from jaxrec.data.transforms import TrainTransform


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One labelled image list (or a prepared or tfds dataset), and where in the config it came
    from."""

    key: str  # e.g. "DataLoader.Train.dataset", for messages
    kind: str  # "ImageNetDataset" | "VeriWild" | "PreparedDataset" | "TFDSDataset"
    label_path: str | None = None
    image_root: str | None = None
    delimiter: str | None = " "  # None: any whitespace (VeriWild)
    relabel: bool = False
    prepared_dir: str | None = None
    classes: tuple[int, int] | None = None  # inclusive label range kept (a protocol's classes)
    tfds: TFDSSpec | None = None  # with kind TFDSDataset


@dataclasses.dataclass(frozen=True)
class TFDSSpec:
    """A tensorflow-datasets split read offline from a prepared ``data_dir``."""

    name: str
    split: str
    data_dir: str | None = None  # None: tfds's default (~/tensorflow_datasets)
    image_key: str = "image"
    label_key: str = "label"
    uid_key: str | None = None


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """PKSampler: `batch_size` per device = P ids x `sample_per_id` images."""

    batch_size: int
    sample_per_id: int
    sample_method: str = "sample_avg_prob"
    id_list: tuple[int, ...] = ()
    ratio: tuple[float, ...] = ()
    shuffle: bool = True


@dataclasses.dataclass(frozen=True)
class TrainDataSpec:
    dataset: DatasetSpec
    sampler: SamplerSpec
    transform: TrainTransform
    pixel: PixelNorm
    num_workers: int | None = None
    augment_on_device: bool = False


@dataclasses.dataclass(frozen=True)
class EvalDataSpec:
    query: DatasetSpec
    gallery: DatasetSpec
    same_lists: bool
    preprocess: Preprocess
    sampler_batch_size: int = 64  # global, as DistributedBatchSampler x devices
    batch_size_per_device: int = 0  # 0: ceil(sampler_batch_size / devices)
    num_workers: int | None = None

    def global_batch(self, num_devices: int) -> int:
        per = self.batch_size_per_device or -(-self.sampler_batch_size // num_devices)
        return per * num_devices


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Retrieval evaluation during training and by evaluate.py."""

    enabled: bool
    interval: int
    start_epoch: int
    before_training: bool
    metrics: tuple[str, ...]  # names for evaluation.retrieval_metrics
    topk: tuple[int, ...]
    keys: tuple[str, ...]  # output keys in PaddleClas order; keys[0] selects the best model
    feature: FeatureSpec
    re_ranking: bool
    block_size: int  # PaddleClas sim_block_size (query blocks for block-weighted metrics)
    drop_excluded: bool  # excluded pairs leave the ranking (else similarity 0, PaddleClas)
    compute_dtype: str
    data: EvalDataSpec | None

    @property
    def best_metric(self) -> str:
        return self.keys[0]


@dataclasses.dataclass(frozen=True)
class LRSpec:
    """Cosine with linear warmup, per iteration."""

    learning_rate: float
    warmup_epoch: float = 0.0
    eta_min: float = 0.0
    warmup_start_lr: float = 0.0


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """Momentum with coupled L2 decay; the BNNeck bias frozen by its LR multiplier."""

    lr: LRSpec
    momentum: float = 0.9
    weight_decay: float = 0.0
    freeze_neck_bias: bool = True


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    epochs: int
    print_every: int
    checkpoint_every_steps: int
    keep_checkpoints: int
    pretrained_model: str | None
    allow_config_change: bool


@dataclasses.dataclass(frozen=True)
class Run:
    """A training/evaluation run, fully resolved from a config."""

    config: dict[str, Any]  # the plain config as given (saved as WORKDIR/config.json)
    arch: dict[str, Any]  # the Arch section, plain (build_model input)
    loss: tuple[dict[str, Any], ...]  # Loss.Train entries, plain (build_loss input)
    optim: OptimSpec
    train: TrainDataSpec | None  # None when the config has no usable DataLoader.Train
    eval: EvalSpec
    loop: LoopSpec
    seed: int
    compute_dtype: str  # "float32" | "bfloat16"
    sync_bn: bool
    image_size: int

    def model_arch(self, training: bool, axis_name: str | None = None) -> dict[str, Any]:
        """Arch for build_model: the compute dtype, and sync-BN's mesh axis when training."""
        arch = dict(self.arch)
        dtype = self.compute_dtype if training else self.eval.compute_dtype
        if dtype != "float32":
            arch["dtype"] = dtype
        if training and self.sync_bn and axis_name is not None:
            arch["bn_axis_name"] = axis_name
        return arch

    @property
    def preprocess(self) -> Preprocess:
        """How the trained model is fed at evaluation/inference time."""
        if self.eval.data is not None:
            return self.eval.data.preprocess
        assert self.train is not None
        p = self.train.pixel
        s = self.image_size
        return Preprocess(resize=(s, s), scale=p.scale, mean=p.mean, std=p.std)
