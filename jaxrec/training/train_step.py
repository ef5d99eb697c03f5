"""The training state and the jitted, data-parallel training step.

`train_step(state, batch, rng) -> (state, metrics)` runs under `jax.shard_map` over the "data"
mesh. Each device runs the model on its own shard, exactly like one GPU of the reference's
DataParallel run:

* BatchNorm uses per-device batch statistics (sync BN: averaged over "data" inside the model).
* Triplet mining sees only the device's own samples.
* The optimized loss is the mean over devices of the per-device loss. The step runs with
  `check_vma=False` (the model's custom-VJP depthwise convolutions do not carry varying-axis
  types), so each device differentiates its own loss and the gradients are `pmean`-ed exactly
  once. (With `check_vma=True` one would `pmean` the loss instead and must not also `pmean` the
  gradients: they would come out N times too large.) tests/test_train_step.py compares the step
  with an explicit per-shard computation.
* BN running statistics are averaged over devices after each step, so the replicated state
  (and the checkpoint) holds one set. (The reference keeps rank 0's; the average is the
  data-parallel equivalent.)

The state argument is donated: the caller must use the returned state, never the one passed in.
Images arrive as uint8 NHWC and are normalized on device with the run's `NormalizeImage`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from jaxrec.data.preprocess import PixelNorm
from jaxrec.parallel import AXIS, replicated

PyTree = Any
StepFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[Any, dict]]


@flax.struct.dataclass
class TrainState:
    """Everything a training step changes. `params = {"model": ..., "loss": ...}`."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree

    @property
    def model_variables(self) -> dict[str, PyTree]:
        return {"params": self.params["model"], "batch_stats": self.batch_stats}


def init_params(
    model: Any, loss: Any, image_shape: tuple[int, int, int], rng: jax.Array
) -> tuple[PyTree, PyTree]:
    """Fresh `({"model", "loss"} params, batch_stats)` for `model` and the loss."""
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
    return {"model": model_params, "loss": loss_params}, batch_stats


def create_state(
    params: PyTree, batch_stats: PyTree, tx: optax.GradientTransformation, mesh
) -> TrainState:
    """A replicated TrainState at step 0."""
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
    )
    return jax.device_put(state, replicated(mesh))


def _cast_floats(tree: PyTree, dtype) -> PyTree:
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def to_model_input(images: jax.Array, pixel: PixelNorm, dtype: Any) -> jax.Array:
    """uint8 NHWC -> normalized `dtype` (float input is taken as already normalized)."""
    x = pixel(images) if images.dtype == jnp.uint8 else images.astype(jnp.float32)
    return x.astype(dtype)


def make_train_step(
    model: Any,
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    mesh,
    *,
    pixel: PixelNorm | None = None,
    schedule: Callable[[Any], jax.Array] | None = None,
    compute_dtype: Any = jnp.float32,
    augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> StepFn:
    """Jitted `train_step(state, batch, rng) -> (state, metrics)`, data parallel over `mesh`.

    `batch = {"image": uint8 NHWC [B,H,W,3], "label": int [B]}` sharded over "data" (B divisible
    by the device count). `rng` is a replicated PRNG key; each device folds in its axis index
    for dropout (and, with `augment`, for on-device augmentation of its uint8 images).
    `metrics` holds the loss terms (averaged over devices), `lr` (the LR of this update) and
    `grad_norm` (global L2 norm of the averaged gradient). With a low-precision
    `compute_dtype` the model computes in that dtype while parameters, outputs and losses stay
    float32. The `state` argument is donated.
    """

    pixel = pixel or PixelNorm()

    def per_device(state: TrainState, images, labels, rng):
        rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS))
        if augment is not None:
            images = augment(images, jax.random.fold_in(rng, 0x5EED))
        x = to_model_input(images, pixel, compute_dtype)

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
        grads = jax.lax.pmean(grads, AXIS)  # check_vma=False: this device's own gradients
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

    def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array):
        return sharded(state, batch["image"], batch["label"], rng)

    return jax.jit(train_step, donate_argnums=(0,))
