"""The training loop: `train(run, workdir)`.

Data flow: Run (resolved by train.py; `run.config` is the config it came from) -> (inputs:
loader) -> (step: jitted, donated train step) -> checkpoint (WORKDIR/checkpoints, best/) with
evaluation (evaluation.RetrievalEvaluator, built once) at epoch ends.

Per step the loop only dispatches work: metrics stay on device, summed by a small jitted
accumulator that also records the first update with a non-finite value. They are fetched at
log steps, and checked before every checkpoint and evaluation, so a checkpoint never holds a
diverged state. Rerunning with the same workdir resumes from the newest readable checkpoint
(model, optimizer, BN statistics, data position, RNG): a killed run ends bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from tqdm import tqdm

from jaxrec import inputs
from jaxrec.config import Run
from jaxrec.data.device_aug import DeviceAugment
from jaxrec.errors import CheckpointMismatchError, ConfigError, TrainingDivergedError
from jaxrec.evaluation import RetrievalEvaluator
from jaxrec.losses import build_loss
from jaxrec.models import build_model
from jaxrec.paddle.yaml_out import save_paddleclas_yaml
from jaxrec.parallel import AXIS, make_mesh
from jaxrec.training import tensorboard as logging_lib
from jaxrec.training import workdir_lock
from jaxrec.training.checkpoint import Checkpoints
from jaxrec.training.optimizer import build_optimizer
from jaxrec.training.preemption import PreemptionWatch
from jaxrec.training.pretrained import apply_pretrained
from jaxrec.training.sharded_head import plan_head
from jaxrec.training.train_step import create_state, init_params, make_train_step
from jaxrec.training.workdir import Workdir, check_resume_config, save_config


def _log0(msg: str) -> None:
    if jax.process_index() == 0:
        logging_lib.log(msg)


@jax.jit
def _accumulate(acc: dict, metrics: dict, update: jax.Array) -> dict:
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in metrics.values()]))
    first_bad = jnp.where((acc["first_bad"] < 0) & ~finite, update, acc["first_bad"])
    total = {k: acc["sum"][k] + metrics[k] for k in metrics}
    return {"sum": total, "n": acc["n"] + 1, "first_bad": first_bad, "last": metrics}


def _fresh_acc(example: dict) -> dict:
    zeros = {k: jnp.zeros((), jnp.float32) for k in example}
    return {"sum": zeros, "n": jnp.zeros((), jnp.int32), "first_bad": jnp.int32(-1), "last": zeros}


class _Divergence:
    """Raises TrainingDivergedError with what the user can do about it."""

    def __init__(self, ckpt: Checkpoints, workdir: str) -> None:
        self.ckpt, self.workdir = ckpt, workdir

    def check(self, acc_host: dict) -> None:
        bad = int(acc_host["first_bad"])
        if bad < 0:
            return
        steps = self.ckpt.steps("latest")
        good = [s for s in steps if s < bad]
        where = f"{self.workdir}/checkpoints"
        if good:
            meta = self.ckpt.meta(good[-1])
            size = meta.get("param_max_abs")
            where = f"the last good checkpoint is step {good[-1]} in {where}"
            if size is not None:
                where += f" (largest |parameter| {size:.3g})"
                if size > 1e4:
                    earlier = good[:-1]
                    where += (
                        "; its parameters are already very large, so resuming from it will "
                        "likely diverge again: "
                        + (
                            f"resume from an earlier step with `train.py ... --restore_step N` "
                            f"(kept: {earlier}) and a lower learning rate"
                            if earlier
                            else "no earlier checkpoint is kept, so start a fresh --workdir "
                            "with a lower learning rate"
                        )
                    )
        else:
            where = f"no checkpoint was saved before it in {where}"
        last_vals = {k: float(v) for k, v in acc_host["last"].items()}
        where = where[0].upper() + where[1:]
        raise TrainingDivergedError(
            f"a loss term or the gradient norm became NaN/inf at step {bad} (values at the last "
            f"step: {logging_lib.format_metrics(last_vals)}); stopped without saving. {where}. "
            "Lower Optimizer.lr.learning_rate, use a longer Optimizer.lr.warmup_epoch, or check "
            "the training data."
        )


@workdir_lock.held_during
def train(run: Run, workdir: str, restore_step: int | None = None) -> dict:
    """Train with the run's recipe, evaluating and checkpointing into `workdir`; returns the
    last evaluation metrics (may be empty). `run.config` (the config the run was resolved from)
    is what WORKDIR/config.json and paddleclas.yaml record and what a resume is checked
    against."""
    workdir = os.path.abspath(workdir)
    if os.path.isdir(workdir) and jax.process_count() == 1:
        workdir_lock.acquire(workdir)  # a resubmitted run stops here, before any work
    check_resume_config(run.config, workdir, run.loop.allow_config_change)
    if run.train is None:
        raise ConfigError("DataLoader.Train", "is required to train (the config has none)")
    mesh = make_mesh()
    model = build_model(run.arch, **run.model_options(training=True, axis_name=AXIS))
    loss = build_loss(run.loss)
    loader = inputs.train_loader(run.train, mesh, run.seed, class_num=run.class_num)
    os.makedirs(workdir, exist_ok=True)  # only once the config and the data are known good
    workdir_lock.acquire(workdir)  # one run per workdir, before anything is written
    spe, epochs = loader.steps_per_epoch, run.loop.epochs
    total_steps = spe * epochs

    params, stats = init_params(model, loss, (run.image_size, run.image_size, 3), _key(run.seed))
    if run.loop.pretrained_model:
        params, stats = apply_pretrained(params, stats, run.loop.pretrained_model, log=_log0)
    tx, schedule = build_optimizer(run.optim, spe, epochs, params, stats)
    head_plan, replicated_why = plan_head(model, loss, mesh.devices.size, run.loop.shard_head)
    if head_plan is not None and run.eval.feature.output_key == "logits":
        head_plan, replicated_why = None, "evaluation reads the logits"
    state = create_state(params, stats, tx, mesh, head_plan)
    augment = None
    if run.train.augment_on_device:
        augment = DeviceAugment.from_transform(run.train.transform)
    train_step = make_train_step(
        model,
        loss,
        tx,
        mesh,
        pixel=run.train.pixel,
        schedule=schedule,
        compute_dtype=jnp.dtype(run.compute_dtype),
        augment=augment,
        head_plan=head_plan,
    )

    head_classes = head_plan.class_num if head_plan is not None else None
    ckpt = Checkpoints(workdir, run.loop.keep_checkpoints, head_classes=head_classes)
    if restore_step is not None:
        ckpt.discard_after(restore_step, log=_log0)
    restored = ckpt.restore(state, step=restore_step)
    best, last_metrics, loader_state = -math.inf, {}, None
    start_epoch = start_it = 0
    if restored is not None:
        state, meta = restored
        start_epoch, start_it = int(meta["epoch"]), int(meta["iteration"])
        loader_state = meta.get("loader")
        best = -math.inf if meta.get("best_metric") is None else float(meta["best_metric"])
        last_metrics = dict(meta.get("eval_metrics", {}))
        if int(meta.get("steps_per_epoch", spe)) != spe:
            saved_devices = meta.get("devices", mesh.devices.size)
            why = (
                f"it ran on {saved_devices} devices, this run has {mesh.devices.size} (the "
                "global batch is DataLoader.Train.sampler.batch_size per device): resume on "
                f"{saved_devices} devices, or change the per-device batch size so that the "
                "global batch stays the same"
                if saved_devices != mesh.devices.size
                else "the training list changed"
            )
            raise CheckpointMismatchError(
                f"the checkpoint was written with {meta['steps_per_epoch']} steps per epoch, the "
                f"data now gives {spe}: {why}"
            )
        _log0(
            f"resumed from step {int(state.step)} (epoch {start_epoch + 1}, iteration {start_it})"
            + (
                f", resharded from {meta['devices']} to {mesh.devices.size} devices"
                if meta.get("devices", mesh.devices.size) != mesh.devices.size
                else ""
            )
        )
    if jax.process_index() == 0:  # only once the checkpoint is known to fit the config
        save_config(run.config, workdir)
        save_paddleclas_yaml(run.config, workdir)

    ev = run.eval
    evaluator = None
    if ev.enabled or (ev.before_training and ev.data is not None):
        eval_model = build_model(run.arch, **run.model_options(training=False))
        if head_plan is not None:  # evaluation reads features only; the head stays sharded
            eval_model = eval_model.clone(head=None)
        evaluator = RetrievalEvaluator.for_model(ev, eval_model, mesh)
    writer = logging_lib.EventWriter(str(Workdir(workdir).tensorboard)) if _is0() else None
    gbs = loader.global_rows
    _log0(
        f"training on {mesh.devices.size} device(s) / {jax.process_count()} process(es): global "
        f"batch {gbs} ({gbs // mesh.devices.size} per device), {spe} steps/epoch, {epochs} epochs,"
        f" compute {run.compute_dtype}, workdir {workdir}; head "
        + (
            f"sharded over {head_plan.n_shards} devices ({head_plan.class_num} classes, "
            f"{head_plan.per_shard} per device)"
            if head_plan is not None
            else f"replicated ({replicated_why})"
        )
    )
    if restored is None and evaluator is not None and ev.before_training:
        m0 = evaluator.evaluate(_eval_variables(state, head_plan))
        _log0(f"eval before training: {logging_lib.format_metrics(m0)}")
        _scalars(writer, 0, "eval", m0)

    def meta_for(epoch: int, it: int) -> dict:
        return {
            "epoch": epoch,
            "iteration": it,
            "step": epoch * spe + it,
            "steps_per_epoch": spe,
            "best_metric": best if math.isfinite(best) else None,
            "eval_metrics": last_metrics,
            "seed": run.seed,
            "loader": {**loader.state(), "epoch": epoch, "step": it},
        }

    diverged = _Divergence(ckpt, workdir)
    bar = _progress(total_steps, int(state.step))
    base_rng = _key(run.seed + 1)
    acc = None
    t_last, step0, t0 = time.perf_counter(), int(state.step), time.perf_counter()
    preempt = PreemptionWatch(mesh)  # SIGTERM: checkpoint the step all hosts agree on, stop
    preempt.install()
    try:
        try:
            loader.restore(loader_state or {"epoch": start_epoch, "step": start_it})
        except ValueError as e:
            saved = (restored[1] if restored is not None else {}).get("devices")
            hint = (
                f" (the checkpoint was written on {saved} devices, this run has "
                f"{mesh.devices.size}: the model state reshards, the data order does not; "
                f"resume on {saved} devices)"
                if saved is not None and saved != mesh.devices.size
                else ""
            )
            raise CheckpointMismatchError(f"cannot resume the data pipeline: {e}{hint}") from e
        for epoch in range(start_epoch, epochs):
            it0 = start_it if epoch == start_epoch else 0
            for it, batch in enumerate(loader.iter_epoch(), start=it0):
                update = epoch * spe + it + 1  # 1-based number of this update, as logged
                state, metrics = train_step(state, batch, jax.random.fold_in(base_rng, update - 1))
                acc = _accumulate(acc or _fresh_acc(metrics), metrics, jnp.int32(update))
                if bar is not None:
                    bar.update(1)
                last_in_epoch = it + 1 == spe
                if update % run.loop.print_every == 0 or last_in_epoch:
                    host = jax.device_get(acc)
                    diverged.check(host)
                    now = time.perf_counter()
                    ips = int(host["n"]) * gbs / max(now - t_last, 1e-9)
                    eta = (now - t0) / max(update - step0, 1) * (total_steps - update)
                    means = {k: float(v) / int(host["n"]) for k, v in host["sum"].items()}
                    means["lr"] = float(host["last"].get("lr", float("nan")))
                    line = (
                        f"epoch {epoch + 1}/{epochs} iter {it + 1}/{spe} step {update}: "
                        f"{logging_lib.format_metrics(means)}, {ips:.1f} img/s, "
                        f"eta {logging_lib.format_duration(eta)}"
                    )
                    _write(bar, line, means)
                    _scalars(writer, update, "train", {**means, "img_per_sec": ips})
                    acc, t_last = None, now
                every = run.loop.checkpoint_every_steps
                if every and update % every == 0 and not last_in_epoch:
                    if acc is not None:
                        diverged.check(jax.device_get(acc))
                    ckpt.save(update, state, meta_for(epoch, it + 1))
                # SIGTERM on a host: checkpoint this step and stop (at an epoch's end: after it)
                if preempt.after_step(state.step) and not last_in_epoch:
                    if acc is not None:
                        diverged.check(jax.device_get(acc))
                    ckpt.save(update, state, meta_for(epoch, it + 1))
                    raise preempt.stopped(update, os.fspath(ckpt.latest.directory))
            is_best = False
            if evaluator is not None and ev.enabled and (epoch + 1) % ev.interval == 0:
                if epoch + 1 >= ev.start_epoch:
                    tev = time.perf_counter()
                    last_metrics = evaluator.evaluate(_eval_variables(state, head_plan))
                    value = last_metrics[ev.best_metric]
                    if value >= best or not math.isfinite(best):
                        best, is_best = value, True
                    _write(
                        bar,
                        f"eval epoch {epoch + 1}: {logging_lib.format_metrics(last_metrics)} "
                        f"(best {ev.best_metric} {best:.5f}, {time.perf_counter() - tev:.1f}s)",
                    )
                    _scalars(writer, int(state.step), "eval", last_metrics)
            # Checkpoint after the evaluation (with its metrics): a kill during evaluation
            # re-runs it after resuming.
            ckpt.save(int(state.step), state, meta_for(epoch + 1, 0))
            if is_best:
                ckpt.save(int(state.step), state, meta_for(epoch + 1, 0), best=True)
            if epoch + 1 < epochs and preempt.stop_now():
                raise preempt.stopped(int(state.step), os.fspath(ckpt.latest.directory))
    finally:
        preempt.uninstall()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        ckpt.close()
        loader.close()
    return last_metrics


def _eval_variables(state: Any, head_plan: Any) -> dict:
    """The model variables the evaluator needs (without a sharded head: features only)."""
    v = state.model_variables
    if head_plan is None:
        return v
    return {
        "params": {k: p for k, p in v["params"].items() if k != "head"},
        **{k: x for k, x in v.items() if k != "params"},
    }


def _key(seed: int) -> jax.Array:
    return jax.random.PRNGKey(seed)


def _is0() -> bool:
    return jax.process_index() == 0


def _progress(total: int, initial: int):
    if not _is0():
        return None
    return tqdm(
        total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr, disable=None
    )


def _write(bar, line: str, postfix: dict | None = None) -> None:
    if bar is None:
        return
    if postfix is not None:
        bar.set_postfix(loss=f"{postfix.get('loss', float('nan')):.4f}", refresh=False)
    bar.write(line, file=sys.stdout)


def _scalars(writer, step: int, prefix: str, values: dict) -> None:
    if writer is not None:
        writer.scalars(step, {f"{prefix}/{k}": v for k, v in values.items()})
        writer.flush()
