"""Training: schedule, optimizer, TrainState, the data-parallel step, checkpoints, the loop.

Data parallelism is `jax.shard_map` over a 1-D mesh with axis "data" spanning every device of
every process. Each device runs the model on its own shard, exactly like one GPU of the
reference's DataParallel run (spec 6.5):

* BatchNorm uses per-device batch statistics (`Global.sync_bn=True` switches to statistics
  synchronized over the "data" axis instead).
* Triplet mining sees only the device's own samples.
* The optimized loss is the mean over devices of the per-device loss. The step runs with
  `check_vma=False` (the model's custom-VJP depthwise convolutions do not carry varying-axis
  types), so each device differentiates its own loss and the gradients are `pmean`-ed once.
  (With `check_vma=True` one would `pmean` the loss instead and must not also `pmean` the
  gradients: they would come out N times too large; see environment_facts.md.) The tests
  compare the step against an explicit per-shard computation.
* BN running statistics are averaged over devices after each step so that the replicated state
  (and the checkpoint) holds one set. The reference keeps rank 0's statistics; the average is the
  natural data-parallel equivalent and is what we store.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrec import config_lib, logging_lib

AXIS = "data"
PyTree = Any


# --------------------------------------------------------------------------------------------
# Mesh and distributed setup


def make_mesh(devices: Iterable[jax.Device] | None = None) -> jax.sharding.Mesh:
    """1-D "data" mesh over all devices of all processes (Auto axis type, see env facts)."""
    devs = list(devices) if devices is not None else jax.devices()
    return jax.sharding.Mesh(np.asarray(devs), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Start `jax.distributed` when flags are given or a cluster is detected.

    Explicit flags win. Without them we call `jax.distributed.initialize()` only when the
    environment looks like a multi-process launch that JAX can auto-detect (SLURM with several
    tasks, Open MPI, or `JAX_COORDINATOR_ADDRESS`); a plain single-machine run stays
    single-process. On CPU the collectives go through gloo. Returns True when initialized.
    """
    if coordinator_address or num_processes:
        if not (coordinator_address and num_processes is not None and process_id is not None):
            raise ValueError(
                "multi-process training needs all of --coordinator_address, --num_processes "
                "and --process_id (or none of them to auto-detect a cluster)"
            )
        kwargs = dict(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    else:
        env = os.environ
        slurm = int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env
        mpi = int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
        if not (slurm or mpi or env.get("JAX_COORDINATOR_ADDRESS")):
            return False
        kwargs = {}
    _use_gloo_on_cpu()
    jax.distributed.initialize(**kwargs)
    return True


def _use_gloo_on_cpu() -> None:
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception as e:  # noqa: BLE001 - optional speed/feature knob
        warnings.warn(f"could not select gloo CPU collectives: {e}", stacklevel=2)


# --------------------------------------------------------------------------------------------
# Learning-rate schedule and optimizer (spec 7)


def cosine_warmup_schedule(
    learning_rate: float,
    steps_per_epoch: int,
    epochs: float,
    warmup_epoch: float = 0.0,
    eta_min: float = 0.0,
    warmup_start_lr: float = 0.0,
) -> Callable[[Any], jax.Array]:
    """Per-iteration cosine decay with linear warmup from `warmup_start_lr` (spec 7.2).

    W = round(warmup_epoch * S) warmup steps, then a cosine over T = (epochs - warmup_epoch) * S
    steps from `learning_rate` down to `eta_min` in closed form. lr(0) = warmup_start_lr (0).
    """
    s = int(steps_per_epoch)
    if s <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    w = int(round(warmup_epoch * s))
    t_total = (epochs - warmup_epoch) * s
    if t_total <= 0:
        raise ValueError(
            f"Optimizer.lr.warmup_epoch ({warmup_epoch}) must be smaller than Global.epochs "
            f"({epochs})"
        )

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        warm = warmup_start_lr + (learning_rate - warmup_start_lr) * t / max(w, 1)
        progress = jnp.clip((t - w) / t_total, 0.0, 1.0)
        cos = eta_min + (learning_rate - eta_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(t < w, warm, cos)

    return schedule


def _path_names(path) -> tuple[str, ...]:
    out = []
    for k in path:
        if hasattr(k, "key"):
            out.append(str(k.key))
        elif hasattr(k, "name"):
            out.append(str(k.name))
        elif hasattr(k, "idx"):
            out.append(str(k.idx))
        else:
            out.append(str(k))
    return tuple(out)


def _bn_module_paths(batch_stats: PyTree) -> set[tuple[str, ...]]:
    """Paths of BatchNorm modules: the parents of `mean` leaves in `batch_stats`."""
    paths = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(batch_stats)[0]:
        names = _path_names(path)
        if names and names[-1] == "mean":
            paths.add(names[:-1])
    return paths


def param_labels(
    params: PyTree,
    batch_stats: PyTree,
    freeze_neck_bias: bool = True,
    model_key: str = "model",
) -> PyTree:
    """Label every parameter leaf as "decay", "no_decay" or "frozen" (spec 7.1, 7.3).

    * "no_decay": BatchNorm gamma/beta inside the backbone (their L2Decay(0.0) attribute) and
      the rep blocks' unused `dw_conv` fusion targets (they never get a gradient, so the
      reference's optimizer skips them on a single device).
    * "frozen": the BNNeck bias (LR multiplier 1e-20): zero updates, kept in the tree.
    * "decay": everything else (convs, SE biases, last_conv weight and bias, BNNeck gamma and
      beta, head, learnable loss parameters).

    `params` is `{"model": model_params, "loss": loss_params}`; `batch_stats` belongs to the model.
    """
    bn = _bn_module_paths(batch_stats)

    def label(path, _leaf):
        names = _path_names(path)
        if names[0] != model_key:
            return "decay"
        inner = names[1:]
        parent, leaf = inner[:-1], inner[-1]
        is_bn = parent in bn and leaf in ("scale", "bias")
        if is_bn and inner[0] == "backbone":
            return "no_decay"
        if is_bn and inner[0] == "neck" and leaf == "bias" and freeze_neck_bias:
            return "frozen"
        if inner[0] == "backbone" and len(parent) >= 1 and parent[-1] == "dw_conv" and not is_bn:
            # The rep fusion target is a bare conv named dw_conv next to dw_conv_list.*;
            # non-rep blocks' dw_conv is a ConvBN whose conv lives one level deeper.
            return "no_decay"
        return "decay"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
    schedule: Callable[[Any], jax.Array],
    labels: PyTree,
    momentum: float = 0.9,
    weight_decay: float = 1e-5,
) -> optax.GradientTransformation:
    """Paddle Momentum with coupled L2: v = mu*v + (g + lambda*theta); theta -= lr*v.

    The decay is added to the gradient before the momentum trace (spec 7.1) for "decay"
    leaves only; "frozen" leaves get zero updates (they still carry momentum state, harmlessly).
    """
    decay_mask = jax.tree.map(lambda lab: lab == "decay", labels)
    frozen_mask = jax.tree.map(lambda lab: lab == "frozen", labels)
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
    parts += [
        optax.trace(decay=momentum, nesterov=False),
        optax.scale_by_learning_rate(schedule),
        optax.masked(optax.set_to_zero(), frozen_mask),
    ]
    return optax.chain(*parts)


def optimizer_from_config(
    config: Any, steps_per_epoch: int, labels: PyTree
) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
    """Build (tx, schedule) from the config's `Optimizer` section."""
    opt = config.Optimizer
    if opt.name != "Momentum":
        raise ValueError(f"Optimizer.name={opt.name!r}: only Momentum is implemented")
    lr = opt.lr
    if lr.name != "Cosine":
        raise ValueError(f"Optimizer.lr.name={lr.name!r}: only Cosine is implemented")
    schedule = cosine_warmup_schedule(
        float(lr.learning_rate),
        steps_per_epoch,
        float(config.Global.epochs),
        float(config_lib.get(lr, "warmup_epoch", 0.0)),
        eta_min=float(config_lib.get(lr, "eta_min", 0.0)),
        warmup_start_lr=float(config_lib.get(lr, "warmup_start_lr", 0.0)),
    )
    wd = 0.0
    reg = config_lib.get(opt, "regularizer")
    if reg is not None:
        if reg.name != "L2":
            raise ValueError(f"Optimizer.regularizer.name={reg.name!r}: only L2 is implemented")
        wd = float(reg.coeff)
    tx = make_optimizer(schedule, labels, momentum=float(opt.momentum), weight_decay=wd)
    return tx, schedule


# --------------------------------------------------------------------------------------------
# Train state and steps


@flax.struct.dataclass
class TrainState:
    """Everything a training step changes. `params = {"model": ..., "loss": ...}`."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def to_float_image(images: jax.Array) -> jax.Array:
    """uint8 NHWC RGB -> ImageNet-normalized float32 (identity for float input)."""
    if images.dtype == jnp.uint8:
        from jaxrec.data import image as image_lib

        return image_lib.normalize(images)
    return images.astype(jnp.float32)


def _cast_floats(tree: PyTree, dtype) -> PyTree:
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def make_train_step(
    model: Any,
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    schedule: Callable[[Any], jax.Array] | None = None,
    compute_dtype: Any = jnp.float32,
) -> Callable[[TrainState, Mapping[str, jax.Array], jax.Array], tuple[TrainState, dict]]:
    """Jitted `train_step(state, batch, rng) -> (state, metrics)`, data parallel over `mesh`.

    `batch = {"image": uint8 or float NHWC [B,H,W,3], "label": int [B]}` sharded over "data"
    (B divisible by the device count). `rng` is a replicated PRNG key; each device folds in its
    axis index for dropout. `metrics` holds the loss terms (averaged over devices), `lr` (the LR
    used by this update) and `grad_norm` (global L2 norm of the averaged gradient). The model is
    called as `model.apply(vars, x, labels=..., train=True, mutable=["batch_stats"],
    rngs={"dropout": key})` and must return a dict of outputs; `loss_fn(loss_params, outputs,
    labels) -> (total, terms)`. With a low-precision `compute_dtype` the model is expected to
    compute in that dtype while parameters, outputs and losses stay float32.
    """

    def per_device(state: TrainState, images, labels, rng):
        rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS))
        x = to_float_image(images).astype(compute_dtype)

        def objective(params):
            out, mutated = model.apply(
                {"params": params["model"], "batch_stats": state.batch_stats},
                x,
                labels=labels,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": rng},
            )
            out = _cast_floats(out, jnp.float32)
            total, terms = loss_fn(params["loss"], out, labels)
            return total, (terms, mutated["batch_stats"])

        (_, (terms, new_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        # check_vma=False: these are this device's gradients; average them exactly once.
        grads = jax.lax.pmean(grads, AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_stats = jax.lax.pmean(new_stats, AXIS)
        metrics = {k: jax.lax.pmean(jnp.asarray(v, jnp.float32), AXIS) for k, v in terms.items()}
        metrics["grad_norm"] = optax.tree.norm(grads)
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
        )
        return new_state, metrics

    sharded = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(AXIS), P(AXIS), P()),
        out_specs=(P(), P()),
        check_vma=False,
    )

    @jax.jit
    def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array):
        return sharded(state, batch["image"], batch["label"], rng)

    return train_step


def make_feature_fn(
    model: Any,
    mesh: jax.sharding.Mesh,
    feature_from: str = "features",
    normalize: bool = True,
    compute_dtype: Any = jnp.float32,
) -> Callable[[PyTree, jax.Array], jax.Array]:
    """Jitted `features(variables, images) -> [B, D]` float32 in eval mode, sharded over "data".

    Features are L2-normalized with max(norm, 1e-12) when `normalize` (spec 8.1).
    """
    key = {"features": "features", "backbone": "backbone"}.get(feature_from)
    if key is None:
        raise ValueError(
            f"Global.retrieval_feature_from={feature_from!r}: use 'features' or 'backbone'"
        )

    def fn(variables, images):
        x = to_float_image(images).astype(compute_dtype)
        out = model.apply(variables, x, train=False)
        f = out[key].astype(jnp.float32)
        if normalize:
            f = f / jnp.maximum(jnp.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        return f

    return jax.jit(
        fn,
        in_shardings=(replicated(mesh), data_sharding(mesh)),
        out_shardings=data_sharding(mesh),
    )


def init_train_state(
    model: Any,
    loss: Any,
    tx_builder: Callable[[PyTree, PyTree], optax.GradientTransformation],
    image_shape: tuple[int, int, int],
    rng: jax.Array,
    mesh: jax.sharding.Mesh,
    pretrained: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]] | None = None,
) -> tuple[TrainState, optax.GradientTransformation]:
    """Initialize model and loss variables and the optimizer, replicated over `mesh`.

    `tx_builder(params, batch_stats)` returns the optimizer (it needs the tree for its masks);
    `pretrained(params, batch_stats)` may replace weights before the optimizer state is made.
    """
    h, w, c = image_shape
    model_rng, loss_rng, drop_rng = jax.random.split(rng, 3)

    @jax.jit
    def init_vars():
        v = model.init(
            {"params": model_rng, "dropout": drop_rng},
            jnp.zeros((2, h, w, c), jnp.float32),
            train=False,
        )
        return v["params"], v.get("batch_stats", {})

    model_params, batch_stats = init_vars()
    loss_params = loss.init(loss_rng) if loss is not None else {}
    params = {"model": model_params, "loss": loss_params}
    if pretrained is not None:
        params, batch_stats = pretrained(params, batch_stats)
    tx = tx_builder(params, batch_stats)
    opt_state = tx.init(params)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    state = jax.device_put(state, replicated(mesh))
    return state, tx


def global_batch(mesh: jax.sharding.Mesh, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global arrays sharded over "data" (multi-host safe)."""
    sharding = data_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


def host_array(x: jax.Array) -> np.ndarray:
    """Gather a (possibly multi-host) global array to a numpy array on every process."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# --------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model/optimizer the config builds."""


def state_signature(state: TrainState) -> list[str]:
    """`path shape dtype` of every parameter and BN statistic (to detect mismatched restores)."""
    out = []
    for part in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(state, part))[0]:
            out.append(f"{part}/{'/'.join(_path_names(path))} {list(leaf.shape)} {leaf.dtype}")
    return out


class Checkpoints:
    """Two orbax CheckpointManagers in WORKDIR: `checkpoints/` (last K) and `best/` (1).

    Each checkpoint holds the `TrainState` (StandardSave) and a JSON `meta` item with the
    epoch, the position inside the epoch, the best metric so far and a signature of the
    state tree. orbax writes into a temporary directory and renames it when complete, so a
    process killed mid-save leaves the previous checkpoints intact.
    """

    def __init__(self, workdir: str | os.PathLike, max_to_keep: int = 3) -> None:
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.latest = self._manager("checkpoints", max_to_keep)
        self.best = self._manager("best", 1)

    def _manager(self, sub: str, keep: int):
        ocp = self._ocp
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        return ocp.CheckpointManager(
            os.path.join(self.workdir, sub), options=opts, item_names=("state", "meta")
        )

    def _args(self, state, meta):
        ocp = self._ocp
        return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))

    def save(self, step: int, state: TrainState, meta: dict, best: bool = False) -> None:
        meta = dict(meta, signature=state_signature(state))
        mgr = self.best if best else self.latest
        if step in mgr.all_steps():
            return
        # Replicated state: save this process's host copy (numpy). Handing orbax the 8-device
        # jax arrays makes its first save compile a transfer per array shape (~30 s on CPU).
        host = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state)
        mgr.save(step, args=self._args(host, meta), force=True)
        mgr.wait_until_finished()

    def steps(self, which: str = "latest") -> list[int]:
        mgr = self.best if which == "best" else self.latest
        return sorted(mgr.all_steps())

    def restore(
        self, target: TrainState, which: str = "latest", step: int | None = None
    ) -> tuple[TrainState, dict] | None:
        """Restore into the structure/shardings of `target`; None when there is no checkpoint.

        `which` is "latest" (newest readable checkpoint; an unreadable one is skipped with a
        warning and moved aside) or "best". A given `step` is looked up in both managers.
        """
        ocp = self._ocp
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target
        )
        want_sig = state_signature(target)
        if step is not None:
            if step in self.latest.all_steps():
                mgr = self.latest
            elif step in self.best.all_steps():
                mgr = self.best
            else:
                raise FileNotFoundError(
                    f"no checkpoint for step {step} in {self.workdir}; available: "
                    f"{sorted(set(self.latest.all_steps()) | set(self.best.all_steps()))}"
                )
            candidates = [(mgr, step)]
        else:
            mgr = self.best if which == "best" else self.latest
            candidates = [(mgr, s) for s in sorted(mgr.all_steps(), reverse=True)]
        for mgr, s in candidates:
            try:
                meta = mgr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint
                self._skip_corrupt(mgr, s, e)
                continue
            sig = meta.get("signature")
            if sig is not None and sig != want_sig:
                diff = [
                    f"  checkpoint: {a}\n  config:     {b}"
                    for a, b in zip(sig, want_sig, strict=False)
                    if a != b
                ][:5]
                if len(sig) != len(want_sig):
                    diff.append(
                        f"  {len(sig)} arrays in the checkpoint, {len(want_sig)} "
                        "in the model the config builds"
                    )
                raise CheckpointMismatchError(
                    f"checkpoint {mgr.directory}/{s} does not match the model the config builds "
                    "(different Arch or Loss?):\n" + "\n".join(diff) + "\nUse a fresh --workdir "
                    "for a different model, or restore the run's own config."
                )
            try:
                restored = mgr.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # noqa: BLE001
                self._skip_corrupt(mgr, s, e)
                continue
            return restored["state"], dict(restored["meta"])
        return None

    def _skip_corrupt(self, mgr, step: int, err: Exception) -> None:
        path = os.path.join(os.fspath(mgr.directory), str(step))
        aside = f"{path}.unreadable"
        warnings.warn(
            f"checkpoint {path} is unreadable ({type(err).__name__}: {str(err)[:300]}); "
            f"falling back to the previous one and moving it to {aside}",
            stacklevel=3,
        )
        if jax.process_index() == 0 and os.path.exists(path):
            os.replace(path, aside)
        mgr.reload()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


# --------------------------------------------------------------------------------------------
# Pretrained weights


def _flatten(tree: PyTree) -> dict[tuple[str, ...], Any]:
    return {_path_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def merge_pretrained(
    variables: Mapping[str, PyTree], loaded: Mapping[str, PyTree], source: str
) -> tuple[dict, list[str]]:
    """Copy every loaded array whose path and shape match into `variables` (non-strict, like
    the reference's `pretrained_model`); returns the new variables and messages about the rest.
    """
    notes = []
    out = {}
    for col in ("params", "batch_stats"):
        cur = variables.get(col, {})
        new = _flatten(loaded.get(col, {}))
        used = set()

        def pick(path, leaf, new=new, used=used, col=col):
            names = _path_names(path)
            if names not in new:
                notes.append(f"{col}/{'/'.join(names)}: missing from {source}, kept at init")
                return leaf
            val = np.asarray(new[names])
            used.add(names)
            if tuple(val.shape) != tuple(leaf.shape):
                notes.append(
                    f"{col}/{'/'.join(names)}: shape {list(val.shape)} in {source} vs "
                    f"{list(leaf.shape)} in the model, kept at init"
                )
                return leaf
            return jnp.asarray(val, leaf.dtype)

        out[col] = jax.tree_util.tree_map_with_path(pick, cur)
        for names in sorted(set(new) - used):
            notes.append(f"{col}/{'/'.join(names)}: in {source} but not in the model, ignored")
    return out, notes


def load_pretrained_variables(path: str) -> dict:
    """Variables from a jaxrec model directory or a PaddleClas `.pdparams` file (or prefix)."""
    if os.path.isdir(path):
        from jaxrec.models import load_model_dir

        _, variables, _ = load_model_dir(path)
        return dict(variables)
    candidates = [path, path + ".pdparams"]
    for c in candidates:
        if os.path.isfile(c):
            from jaxrec import convert

            return dict(convert.load_pdparams_variables(c))
    raise FileNotFoundError(
        f"Global.pretrained_model={path!r}: neither a jaxrec model directory nor a .pdparams "
        "file (a prefix without .pdparams also works)"
    )


# --------------------------------------------------------------------------------------------
# Config -> model, loss, data


_AMP_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def compute_dtype(config: Any) -> Any:
    """The model compute dtype: `AMP.dtype` when `AMP.use_amp`, else float32."""
    if not config_lib.get(config, "AMP.use_amp", False):
        return jnp.float32
    name = config_lib.get(config, "AMP.dtype", "bfloat16")
    if name not in _AMP_DTYPES:
        raise ValueError(f"AMP.dtype={name!r}: use one of {sorted(_AMP_DTYPES)}")
    return _AMP_DTYPES[name]


def arch_dict(config: Any, for_training: bool = True) -> dict:
    """The Arch section as a plain dict for `build_model`, with jaxrec compute dtype/sync BN."""
    arch = config_lib.to_plain(config.Arch)
    dt = compute_dtype(config)
    if dt != jnp.float32:
        arch["dtype"] = jnp.dtype(dt).name
    if for_training and config_lib.get(config, "Global.sync_bn", False):
        arch["bn_axis_name"] = AXIS
    return arch


def build_model_from_config(config: Any, for_training: bool = True):
    from jaxrec.models import build_model

    return build_model(arch_dict(config, for_training))


def build_loss_from_config(config: Any):
    from jaxrec.losses import build_loss

    entries = config_lib.to_plain(config.Loss.Train)
    return build_loss(entries)


def freeze_neck_bias(config: Any) -> bool:
    """True when the config gives the BNNeck bias a negligible LR multiplier (spec 7.3)."""
    lr_mult = config_lib.get(config, "Arch.Neck.bias_attr.learning_rate", 1.0)
    return float(lr_mult) < 1e-8


def image_size(config: Any) -> int:
    """Training/eval square image side, from `Global.image_shape` ([3, H, W])."""
    shape = list(config_lib.get(config, "Global.image_shape", [3, 224, 224]))
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"Global.image_shape={shape}: expected [3, S, S]")
    return int(shape[1])


def topk_from_config(config: Any) -> tuple[int, ...]:
    for entry in config_lib.get(config, "Metric.Eval", []) or []:
        name, kw = config_lib.one_key(entry, "Metric.Eval")
        if name == "Recallk":
            return tuple(int(k) for k in kw.get("topk", (1, 5)))
    return (1, 5)


# --------------------------------------------------------------------------------------------
# Evaluation


def extract_features(
    feature_fn: Callable,
    variables: PyTree,
    batches: Iterable[np.ndarray],
    mesh: jax.sharding.Mesh,
    total: int,
) -> np.ndarray:
    """Run `feature_fn` over uint8 batches (global arrays or process-local numpy); returns the
    first `total` features (the rest is padding)."""
    out = []
    for images in batches:
        if isinstance(images, np.ndarray):
            images = global_batch(mesh, {"image": images})["image"]
        out.append(host_array(feature_fn(variables, images)))
    feats = np.concatenate(out, axis=0) if out else np.zeros((0, 0), np.float32)
    return feats[:total]


def evaluate_retrieval(
    config: Any,
    model: Any,
    variables: PyTree,
    mesh: jax.sharding.Mesh,
    data: Any | None = None,
    return_features: bool = False,
) -> dict:
    """Retrieval metrics (spec 8) of `variables` on the config's Eval query/gallery sets."""
    from jaxrec import eval_lib

    if data is None:
        data = EvalData.from_config(config, mesh)
    feature_fn = make_feature_fn(
        model,
        mesh,
        feature_from=config_lib.get(config, "Global.retrieval_feature_from", "features"),
        normalize=bool(config_lib.get(config, "Global.feature_normalize", True)),
        compute_dtype=compute_dtype(config),
    )
    variables = jax.device_put(variables, replicated(mesh))
    qf = extract_features(feature_fn, variables, data.batches("query"), mesh, len(data.query))
    if data.same_lists:
        gf = qf
    else:
        gf = extract_features(
            feature_fn, variables, data.batches("gallery"), mesh, len(data.gallery)
        )
    kwargs = {}
    if config_lib.get(config, "Global.re_ranking", False):
        kwargs["re_ranking"] = True
    metrics = eval_lib.retrieval_metrics(
        qf,
        data.query.labels,
        gf,
        data.gallery.labels,
        query_ids=data.query.uids,
        gallery_ids=data.gallery.uids,
        topk=topk_from_config(config),
        **kwargs,
    )
    metrics = {k: float(v) for k, v in metrics.items()}
    if return_features:
        return {"metrics": metrics, "query_features": qf, "gallery_features": gf, "data": data}
    return metrics


# --------------------------------------------------------------------------------------------
# The training loop


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or infinite."""


class ConfigMismatchError(ValueError):
    """A resumed run was started with a config that differs from the run's saved config."""


_NON_TRAINING_KEYS = {
    "Global.allow_config_change",
    "Global.print_batch_step",
    "Global.output_dir",
    "Global.save_inference_dir",
    "Global.use_visualdl",
}


def check_resume_config(config: Any, workdir: str) -> None:
    """Compare the config with WORKDIR/config.json; error (or warn) on differences."""
    old = config_lib.load_plain_config(workdir)
    if old is None:
        return
    new = config_lib.to_plain(config)
    diffs = [
        d for d in config_lib.config_diff(old, new) if d.split(":")[0] not in _NON_TRAINING_KEYS
    ]
    if not diffs:
        return
    listing = "\n  ".join(diffs[:40])
    if config_lib.get(config, "Global.allow_config_change", False):
        warnings.warn(
            f"resuming {workdir} with a changed config (Global.allow_config_change=True); "
            f"the run is no longer reproducible:\n  {listing}",
            stacklevel=2,
        )
        return
    raise ConfigMismatchError(
        f"{workdir} holds a run with a different config ({len(diffs)} difference(s), saved -> "
        f"now):\n  {listing}\nUse a new --workdir, rerun with the saved config "
        f"({os.path.join(workdir, config_lib.CONFIG_FILE)}), or pass "
        "--config.Global.allow_config_change=True to resume anyway."
    )


def _log0(msg: str) -> None:
    if jax.process_index() == 0:
        logging_lib.log(msg)


def _check_finite(
    metrics: Mapping[str, float], epoch: int, it: int, step: int, ckpt: Checkpoints
) -> None:
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        last = ckpt.steps("latest")
        where = f"the last good checkpoint is step {last[-1]}" if last else "no checkpoint yet"
        raise TrainingDivergedError(
            f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step} "
            f"(epoch {epoch + 1}, iteration {it + 1}); stopped without saving: {where} in "
            f"{ckpt.latest.directory}. Lower Optimizer.lr.learning_rate, enable warmup, or check "
            "the training data."
        )


def train_and_evaluate(config: Any, workdir: str) -> dict:
    """Train with the PP-ShiTuV2 recipe, evaluating and checkpointing into `workdir`.

    Rerunning with the same workdir resumes from the newest readable checkpoint (model,
    optimizer, BN statistics, data position and RNG), so the final parameters are identical to
    an uninterrupted run. Returns the last evaluation metrics (may be empty).
    """
    g = config.Global
    workdir = os.path.abspath(workdir)
    if config_lib.get(config, "Global.checkpoints"):
        raise ValueError(
            "Global.checkpoints is not used by jaxrec: training resumes automatically from "
            "--workdir; point --workdir at the run to resume and leave Global.checkpoints null"
        )
    os.makedirs(workdir, exist_ok=True)
    check_resume_config(config, workdir)

    mesh = make_mesh()
    n_dev = mesh.devices.size
    seed = int(config_lib.get(config, "Global.seed", 0))
    dtype = compute_dtype(config)
    size = image_size(config)

    loader = train_loader_from_config(config, mesh, seed)
    steps_per_epoch = loader.steps_per_epoch
    epochs = int(g.epochs)
    total_steps = steps_per_epoch * epochs

    model = build_model_from_config(config)
    loss = build_loss_from_config(config)
    schedule_holder = {}

    def tx_builder(params, stats):
        labels = param_labels(params, stats, freeze_neck_bias=freeze_neck_bias(config))
        tx, sched = optimizer_from_config(config, steps_per_epoch, labels)
        schedule_holder["s"] = sched
        return tx

    pretrained_path = config_lib.get(config, "Global.pretrained_model")

    def pretrained(params, stats):
        if not pretrained_path:
            return params, stats
        loaded = load_pretrained_variables(str(pretrained_path))
        merged, notes = merge_pretrained(
            {"params": params["model"], "batch_stats": stats}, loaded, str(pretrained_path)
        )
        for n in notes:
            _log0(f"pretrained: {n}")
        return {"model": merged["params"], "loss": params["loss"]}, merged["batch_stats"]

    state, tx = init_train_state(
        model, loss, tx_builder, (size, size, 3), jax.random.PRNGKey(seed), mesh, pretrained
    )
    schedule = schedule_holder["s"]
    train_step = make_train_step(model, loss, tx, mesh, schedule=schedule, compute_dtype=dtype)

    ckpt = Checkpoints(workdir, int(config_lib.get(config, "Global.keep_checkpoints", 3)))
    restored = ckpt.restore(state)
    best_metric = -math.inf
    last_metrics: dict = {}
    if restored is None:
        start_epoch, start_it = 0, 0
        loader_state = None
    else:
        state, meta = restored
        start_epoch, start_it = int(meta["epoch"]), int(meta["iteration"])
        loader_state = meta.get("loader")
        bm = meta.get("best_metric")
        best_metric = -math.inf if bm is None else float(bm)
        last_metrics = dict(meta.get("eval_metrics", {}))
        if int(meta.get("steps_per_epoch", steps_per_epoch)) != steps_per_epoch:
            raise CheckpointMismatchError(
                f"the checkpoint was written with {meta['steps_per_epoch']} steps per epoch, "
                f"the data now gives {steps_per_epoch}: the training list changed"
            )
        _log0(
            f"resumed from step {int(state.step)} (epoch {start_epoch + 1}, iteration "
            f"{start_it}) in {ckpt.latest.directory}"
        )

    if jax.process_index() == 0:  # only once the checkpoint is known to fit the config
        config_lib.save_config(config, workdir)
    every = int(config_lib.get(config, "Global.checkpoint_every_steps", 0) or 0)
    eval_interval = int(config_lib.get(config, "Global.eval_interval", 1) or 0)
    eval_on = bool(config_lib.get(config, "Global.eval_during_train", True)) and eval_interval > 0
    print_every = max(1, int(config_lib.get(config, "Global.print_batch_step", 20)))
    start_eval_epoch = int(config_lib.get(config, "Global.start_eval_epoch", 0))
    base_rng = jax.random.PRNGKey(seed + 1)
    eval_data = EvalData.from_config(config, mesh) if eval_on else None

    writer = (
        logging_lib.EventWriter(os.path.join(workdir, "tensorboard"))
        if (jax.process_index() == 0)
        else None
    )
    global_bs = loader.global_rows
    _log0(
        f"training on {n_dev} device(s) / {jax.process_count()} process(es): global batch "
        f"{global_bs} ({global_bs // n_dev} per device), {steps_per_epoch} steps/epoch, "
        f"{epochs} epochs, compute {jnp.dtype(dtype).name}, workdir {workdir}"
    )

    def meta_for(epoch, it):
        return {
            "epoch": epoch,
            "iteration": it,
            "step": epoch * steps_per_epoch + it,
            "steps_per_epoch": steps_per_epoch,
            "best_metric": best_metric if math.isfinite(best_metric) else None,
            "eval_metrics": last_metrics,
            "seed": seed,
            "loader": {**loader.state(), "epoch": epoch, "step": it},
        }

    if restored is None and eval_on and config_lib.get(config, "Global.eval_before_training"):
        variables = {"params": state.params["model"], "batch_stats": state.batch_stats}
        m0 = evaluate_retrieval(config, model, variables, mesh, eval_data)
        _log0(f"eval before training: {logging_lib.format_metrics(m0)}")
        if writer is not None:
            writer.scalars(0, {f"eval/{k}": v for k, v in m0.items()})
            writer.flush()

    bar = None
    if jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(
            total=total_steps,
            initial=int(state.step),
            unit="step",
            dynamic_ncols=True,
            file=__import__("sys").stderr,
            disable=None,
        )
    t_last, n_last = time.perf_counter(), 0
    t_start = time.perf_counter()
    step0 = int(state.step)
    try:
        try:
            loader.restore(loader_state or {"epoch": start_epoch, "step": start_it})
        except ValueError as e:
            raise CheckpointMismatchError(f"cannot resume the data pipeline: {e}") from e
        for epoch in range(start_epoch, epochs):
            it0 = start_it if epoch == start_epoch else 0
            for it, batch in enumerate(loader.iter_epoch(), start=it0):
                step = epoch * steps_per_epoch + it
                rng = jax.random.fold_in(base_rng, step)
                state, metrics = train_step(state, batch, rng)
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                _check_finite(m, epoch, it, step, ckpt)
                n_last += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{m.get('loss', float('nan')):.4f}",
                        lr=f"{m['lr']:.3g}",
                        refresh=False,
                    )
                if (step + 1) % print_every == 0 or it + 1 == steps_per_epoch:
                    dt = time.perf_counter() - t_last
                    ips = n_last * global_bs / max(dt, 1e-9)
                    done = step + 1 - step0
                    eta = (time.perf_counter() - t_start) / max(done, 1) * (total_steps - step - 1)
                    line = (
                        f"epoch {epoch + 1}/{epochs} iter {it + 1}/{steps_per_epoch} "
                        f"step {step + 1}: {logging_lib.format_metrics(m)}, "
                        f"{ips:.1f} img/s, eta {logging_lib.format_duration(eta)}"
                    )
                    if bar is not None:
                        bar.write(line)
                    if writer is not None:
                        writer.scalars(
                            step + 1,
                            {**{f"train/{k}": v for k, v in m.items()}, "train/img_per_sec": ips},
                        )
                        writer.flush()
                    t_last, n_last = time.perf_counter(), 0
                last_in_epoch = it + 1 == steps_per_epoch
                if every and (step + 1) % every == 0 and not last_in_epoch:
                    ckpt.save(step + 1, state, meta_for(epoch, it + 1))
            # epoch end: evaluate, then checkpoint (with the metrics) so a kill during eval
            # re-runs the eval after resuming.
            is_best = False
            if eval_on and (epoch + 1) % eval_interval == 0 and epoch + 1 >= start_eval_epoch:
                variables = {"params": state.params["model"], "batch_stats": state.batch_stats}
                t0 = time.perf_counter()
                last_metrics = evaluate_retrieval(config, model, variables, mesh, eval_data)
                key = next(iter(last_metrics))
                if last_metrics[key] >= best_metric or not math.isfinite(best_metric):
                    best_metric = last_metrics[key]
                    is_best = True
                msg = (
                    f"eval epoch {epoch + 1}: {logging_lib.format_metrics(last_metrics)} "
                    f"(best {key} {best_metric:.5f}, {time.perf_counter() - t0:.1f}s)"
                )
                if bar is not None:
                    bar.write(msg)
                if writer is not None:
                    writer.scalars(
                        int(state.step), {f"eval/{k}": v for k, v in last_metrics.items()}
                    )
                    writer.flush()
            meta = meta_for(epoch + 1, 0)
            ckpt.save(int(state.step), state, meta)
            if is_best:
                ckpt.save(int(state.step), state, meta, best=True)
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        ckpt.close()
        loader.close()
    return last_metrics


def evaluate_workdir(
    workdir: str,
    which: str = "best",
    step: int | None = None,
    output: str | None = None,
    num_visualize: int = 8,
) -> dict:
    """Restore a checkpoint of a training run and evaluate it with the run's own config.

    `which` is "best" or "latest" (ignored when `step` is given). Writes
    `eval_step{N}.json` and, when `num_visualize > 0`, a rank-list PNG next to it (in `output`,
    default WORKDIR/eval). Returns `{"step", "metrics", "json", "png"}`.
    """
    import json

    workdir = os.path.abspath(workdir)
    config = config_lib.load_config(workdir)
    mesh = make_mesh()
    seed = int(config_lib.get(config, "Global.seed", 0))
    size = image_size(config)
    model = build_model_from_config(config)
    loss = build_loss_from_config(config)
    train_data_steps = 1  # the schedule does not change the optimizer-state structure

    def tx_builder(params, stats):
        labels = param_labels(params, stats, freeze_neck_bias=freeze_neck_bias(config))
        return optimizer_from_config(config, train_data_steps, labels)[0]

    target, _ = init_train_state(
        model, loss, tx_builder, (size, size, 3), jax.random.PRNGKey(seed), mesh
    )
    ckpt = Checkpoints(workdir)
    try:
        if step is None and which == "best" and not ckpt.steps("best"):
            warnings.warn(
                f"{workdir} has no best checkpoint (no evaluation ran); using the latest",
                stacklevel=2,
            )
            which = "latest"
        restored = ckpt.restore(target, which=which, step=step)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint found in {workdir}/checkpoints or /best")
    state, _meta = restored
    eval_model = build_model_from_config(config, for_training=False)
    variables = {"params": state.params["model"], "batch_stats": state.batch_stats}
    res = evaluate_retrieval(config, eval_model, variables, mesh, return_features=True)
    metrics = res["metrics"]
    n = int(state.step)
    out_dir = output or os.path.join(workdir, "eval")
    result = {"step": n, "metrics": metrics, "json": None, "png": None}
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        jpath = os.path.join(out_dir, f"eval_step{n}.json")
        with open(jpath, "w") as f:
            json.dump({"workdir": workdir, "step": n, "metrics": metrics}, f, indent=2)
            f.write("\n")
        result["json"] = jpath
        if num_visualize > 0:
            result["png"] = _visualize(
                res, os.path.join(out_dir, f"ranklist_step{n}.png"), num_visualize
            )
    return result


# --------------------------------------------------------------------------------------------
# Data adapters (config DataLoader section -> process-local uint8 batches)


def _source_from_dataset_cfg(ds: Mapping[str, Any], where: str):
    from jaxrec.data import datasets

    name = ds.get("name")
    root = ds.get("image_root")
    path = ds.get("cls_label_path")
    if name == "ImageNetDataset":
        return datasets.load_list(
            path, root, delimiter=ds.get("delimiter", " "), relabel=bool(ds.get("relabel", False))
        )
    if name == "VeriWild":
        return datasets.load_query_gallery_list(path, root, relabel=bool(ds.get("relabel", False)))
    raise ValueError(f"{where}.dataset.name={name!r}: use ImageNetDataset or VeriWild")


def train_transform_from_ops(ops: list, size: int, where: str):
    """Map the YAML transform_ops list onto `TrainTransform` (checking what it can express)."""
    from jaxrec.data import transforms

    kw: dict[str, Any] = {"size": size, "flip": False, "pad": 0, "crop": False, "rotate_prob": 0.0}
    for i, entry in enumerate(ops):
        name, args = config_lib.one_key(entry, f"{where}.transform_ops[{i}]")
        if name in ("DecodeImage", "NormalizeImage", "ToCHWImage"):
            continue
        if name in ("ResizeImage", "RandCropImageV2"):
            s = args.get("size", size)
            s = s if isinstance(s, int) else s[0]
            if int(s) != size:
                raise ValueError(
                    f"{where}.transform_ops[{i}] {name} size {s} differs from "
                    f"Global.image_shape ({size}); keep them equal"
                )
            if name == "RandCropImageV2":
                kw["crop"] = True
        elif name == "RandFlipImage":
            if int(args.get("flip_code", 1)) != 1:
                raise ValueError(f"{where}.transform_ops[{i}]: only flip_code 1 is supported")
            kw["flip"] = True
        elif name == "Pad":
            kw["pad"] = int(args.get("padding", 0))
        elif name == "RandomRotation":
            kw["rotate_prob"] = float(args.get("prob", 0.5))
            kw["degrees"] = float(args.get("degrees", 90))
        elif name == "RandomErasing":
            kw["erasing"] = transforms.RandomErasingConfig(
                prob=float(args.get("EPSILON", args.get("prob", 0.5))),
                sl=float(args.get("sl", 0.02)),
                sh=float(args.get("sh", 0.4)),
                r1=float(args.get("r1", 0.3)),
                mean=tuple(args.get("mean", (0.0, 0.0, 0.0))),
                use_log_aspect=bool(args.get("use_log_aspect", False)),
            )
        else:
            raise ValueError(f"{where}.transform_ops[{i}]: {name} is not supported by jaxrec")
    return transforms.TrainTransform(**kw)


def train_loader_from_config(config: Any, mesh, seed: int):
    """`jaxrec.data.loader.TrainLoader` for `DataLoader.Train` (PK sampler, one group/device)."""
    from jaxrec.data.loader import TrainLoader
    from jaxrec.data.sampler import PKSampler

    tr = config.DataLoader.Train
    source = _source_from_dataset_cfg(config_lib.to_plain(tr.dataset), "DataLoader.Train")
    s = config_lib.to_plain(tr.sampler)
    if s.get("name") != "PKSampler":
        raise ValueError(f"DataLoader.Train.sampler.name={s.get('name')!r}: only PKSampler")
    sampler = PKSampler(
        source.labels,
        int(s["batch_size"]),
        int(s["sample_per_id"]),
        sample_method=s.get("sample_method", "sample_avg_prob"),
        id_list=s.get("id_list") or None,
        ratio=s.get("ratio") or None,
        seed=seed,
        num_shards=mesh.devices.size,
        shuffle=bool(s.get("shuffle", True)),
    )
    ops = config_lib.to_plain(tr.dataset.get("transform_ops", []))
    transform = train_transform_from_ops(ops, image_size(config), "DataLoader.Train.dataset")
    workers = int(config_lib.get(tr, "loader.num_workers", 0) or 0) or None
    return TrainLoader(source, sampler, transform, mesh=mesh, seed=seed, num_workers=workers)


class EvalData:
    """Query and gallery sources of `DataLoader.Eval` and how to batch them."""

    def __init__(
        self,
        query,
        gallery,
        size: int,
        batch_size: int,
        mesh,
        same_lists: bool,
        num_workers: int | None = None,
    ) -> None:
        self.query, self.gallery, self.size, self.same_lists = query, gallery, size, same_lists
        self.mesh, self.batch_size, self.num_workers = mesh, batch_size, num_workers

    @classmethod
    def from_config(cls, config: Any, mesh) -> EvalData:
        ev = config.DataLoader.Eval
        keys = list(ev.keys())
        if "Query" in keys and "Gallery" in keys:
            qcfg, gcfg = config_lib.to_plain(ev.Query), config_lib.to_plain(ev.Gallery)
        elif len(keys) == 1:
            qcfg = gcfg = config_lib.to_plain(ev[keys[0]])
        else:
            raise ValueError("DataLoader.Eval needs Query and Gallery sections (or exactly one)")
        query = _source_from_dataset_cfg(qcfg["dataset"], "DataLoader.Eval.Query")
        same = qcfg["dataset"] == gcfg["dataset"]
        gallery = (
            query if same else _source_from_dataset_cfg(gcfg["dataset"], "DataLoader.Eval.Gallery")
        )
        n_dev = mesh.devices.size
        per_dev = int(config_lib.get(config, "Global.eval_batch_size_per_device", 0) or 0)
        if not per_dev:
            per_dev = -(-int(qcfg.get("sampler", {}).get("batch_size", 64)) // n_dev)
        workers = int(qcfg.get("loader", {}).get("num_workers", 0) or 0) or None
        return cls(query, gallery, image_size(config), per_dev * n_dev, mesh, same, workers)

    def batches(self, which: str):
        from jaxrec.data.loader import EvalLoader
        from jaxrec.data.transforms import EvalTransform

        source = self.query if which == "query" else self.gallery
        with EvalLoader(
            source,
            self.batch_size,
            EvalTransform(self.size),
            mesh=self.mesh,
            num_workers=self.num_workers,
        ) as loader:
            for batch in loader:
                yield batch["image"]


def _visualize(res: dict, path: str, num: int, k: int = 5) -> str:
    """Rank-list PNG of `num` evenly spaced queries and their top-k gallery items."""
    from jaxrec import eval_lib, visualize
    from jaxrec.data.loader import to_rgb_array

    data = res["data"]
    q, g = data.query, data.gallery
    rows = np.unique(np.linspace(0, len(q) - 1, num).round().astype(np.int64))
    has_ids = q.uids is not None and g.uids is not None
    scores, idx = eval_lib.topk_neighbors(
        res["query_features"][rows],
        res["gallery_features"],
        min(k, len(g)),
        query_labels=q.labels[rows],
        gallery_labels=g.labels,
        query_ids=q.uids[rows] if has_ids else None,
        gallery_ids=g.uids if has_ids else None,
    )

    def load(src, i):
        return to_rgb_array(src.read(int(i)), src.paths[int(i)])

    gallery_images = {int(j): load(g, j) for j in np.unique(idx)}
    visualize.save_rank_list(
        path, [load(q, i) for i in rows], gallery_images, q.labels[rows], g.labels, idx, scores
    )
    return path
