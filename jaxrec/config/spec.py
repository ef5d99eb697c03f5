"""The resolved run: frozen, typed, every default applied. Built only by `config.resolve`.

Everything downstream (trainer, evaluator, checkpoints, export of a workdir) reads these objects
and never a config key, so a key is interpreted exactly once and in one place. No field has a
default: the resolver sets every one (defaults live in `defaults.py`), so a half-filled spec
cannot be built.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxrec.data.preprocess import FeatureSpec, PixelNorm, Preprocess
from jaxrec.data.transforms import TrainTransform
from jaxrec.losses import LossSpec
from jaxrec.models.arch import Arch


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """One labelled image list (or a prepared or tfds dataset), and where in the config it came
    from."""

    key: str  # e.g. "DataLoader.Train.dataset", for messages
    kind: str  # "ImageNetDataset" | "VeriWild" | "PreparedDataset" | "TFDSDataset"
    label_path: str | None
    image_root: str | None
    delimiter: str | None  # None: any whitespace (VeriWild)
    relabel: bool
    prepared_dir: str | None
    classes: tuple[int, int] | None  # inclusive label range kept (a protocol's classes)
    tfds: TFDSSpec | None  # with kind TFDSDataset


@dataclasses.dataclass(frozen=True, kw_only=True)
class TFDSSpec:
    """A tensorflow-datasets split read offline from a prepared ``data_dir``."""

    name: str
    split: str
    data_dir: str | None  # None: tfds's default (~/tensorflow_datasets)
    image_key: str
    label_key: str
    uid_key: str | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerSpec:
    """PKSampler: `batch_size` per device = P ids x `sample_per_id` images."""

    batch_size: int
    sample_per_id: int
    sample_method: str
    id_list: tuple[int, ...]
    ratio: tuple[float, ...]
    shuffle: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainDataSpec:
    dataset: DatasetSpec
    sampler: SamplerSpec
    transform: TrainTransform
    pixel: PixelNorm
    num_workers: int | None
    augment_on_device: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalDataSpec:
    query: DatasetSpec
    gallery: DatasetSpec
    same_lists: bool
    preprocess: Preprocess
    sampler_batch_size: int  # global, as DistributedBatchSampler x devices
    batch_size_per_device: int  # 0: ceil(sampler_batch_size / devices)
    num_workers: int | None

    def global_batch(self, num_devices: int) -> int:
        per = self.batch_size_per_device or -(-self.sampler_batch_size // num_devices)
        return per * num_devices


@dataclasses.dataclass(frozen=True, kw_only=True)
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class LRSpec:
    """Cosine with linear warmup, per iteration."""

    learning_rate: float
    warmup_epoch: float
    eta_min: float
    warmup_start_lr: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimSpec:
    """Momentum with coupled L2 decay; the BNNeck bias frozen by its LR multiplier."""

    lr: LRSpec
    momentum: float
    weight_decay: float
    freeze_neck_bias: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopSpec:
    epochs: int
    print_every: int
    checkpoint_every_steps: int
    keep_checkpoints: int
    pretrained_model: str | None
    allow_config_change: bool
    shard_head: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
    """A training/evaluation run, fully resolved from a config."""

    config: dict[str, Any]  # the plain config as given (WORKDIR/config.json, paddleclas.yaml)
    arch: Arch  # the model (build_model input)
    arch_section: dict[str, Any]  # the Arch section as given (what model dirs record)
    loss: tuple[LossSpec, ...]  # Loss.Train (build_loss input)
    optim: OptimSpec
    train: TrainDataSpec | None  # None when the config has no usable DataLoader.Train
    eval: EvalSpec
    loop: LoopSpec
    seed: int
    compute_dtype: str  # "float32" | "bfloat16"
    sync_bn: bool
    image_size: int

    @property
    def class_num(self) -> int | None:
        """Classes of the classifier head (labels must lie below it); None without a head."""
        return None if self.arch.head is None else self.arch.head.class_num

    def model_options(self, training: bool, axis_name: str | None = None) -> dict[str, Any]:
        """build_model's runtime options: the compute dtype (training or evaluation), and
        sync-BN's mesh axis when training with Global.sync_bn / Arch.use_sync_bn."""
        dtype = self.compute_dtype if training else self.eval.compute_dtype
        axis = axis_name if training and self.sync_bn else None
        return {"dtype": dtype, "bn_axis_name": axis}

    @property
    def preprocess(self) -> Preprocess:
        """How the trained model is fed at evaluation/inference time."""
        if self.eval.data is not None:
            return self.eval.data.preprocess
        assert self.train is not None
        p = self.train.pixel
        s = self.image_size
        return Preprocess(resize=(s, s), scale=p.scale, mean=p.mean, std=p.std)
