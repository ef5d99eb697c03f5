"""Training checkpoints: saving, and restoring for training or for use.

The paths are `jaxrec.training.workdir.Workdir`'s. Each checkpoint is an orbax step folder
(WORKDIR/checkpoints/STEP or WORKDIR/best/STEP) with two items:

    state   orbax tree of the TrainState {step, params{model, loss}, batch_stats, opt_state},
            saved as the state's (sharded, possibly multi-host) jax arrays
    meta    JSON: epoch, iteration, step, best metric, loader state, signature of the
            parameter tree, largest |parameter|, device count and, with the class-sharded
            head, its real class count (`head_classes`)

With the class-sharded head (jaxrec.training.sharded_head) the head's arrays are saved padded
to a multiple of the device count (zero columns). The signature names their real class count;
training restores onto the current placement (orbax pads or cuts the zero columns, so another
device count reshards), and the read-only path cuts them off: evaluate, export and convert see
the `[embedding, class_num]` weight as before.

orbax writes each checkpoint into a temporary directory and renames it when complete, so a
process killed mid-save leaves the previous checkpoints intact; every read goes through orbax's
CheckpointManager, which lists completed steps only.

Which checkpoint is used is decided in one place, `candidates` (an explicit step; else the
newest "latest", or the best with the newest "latest" ones as fall-backs), and read in one
place, `_restore`. Two ways in: `Checkpoints` (training: saves, and restores the full state; an
unreadable checkpoint is moved aside to STEP.unreadable, with a warning, and the previous one is
used), and `restore_variables` / `restore_model` / `read_checkpoint` (evaluation, export,
extraction, conversion, tools: read-only, they never move or delete anything).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxrec.config import resolve_arch
from jaxrec.errors import (
    CheckpointMismatchError,
    JaxrecError,
    ModelDirError,
    disk_full,
    is_disk_full,
)
from jaxrec.models import ModelDir, abstract_variables, build_model, load_model_dir
from jaxrec.training.sharded_head import is_head_path, unpad_head
from jaxrec.training.workdir import KINDS, Workdir, load_run
from jaxrec.treepath import path_names


def signature(params: Any, batch_stats: Any, head_classes: int | None = None) -> list[str]:
    """`path shape dtype` of every parameter and BN statistic (to detect mismatched restores).
    With `head_classes` the head's class axis is given as that real count (not the padding)."""
    out = []
    for part, tree in (("params", params), ("batch_stats", batch_stats)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = path_names(path)
            shape = list(np.shape(leaf))
            if head_classes is not None and is_head_path(names):
                shape[-1] = head_classes
            dtype = np.dtype(leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype)
            out.append(f"{part}/{'/'.join(names)} {shape} {dtype}")
    return out


@jax.jit
def _max_abs(tree: Any) -> jax.Array:
    leaves = [jax.numpy.max(jax.numpy.abs(x)) for x in jax.tree.leaves(tree) if x.size]
    return jax.numpy.max(jax.numpy.stack(leaves)) if leaves else jax.numpy.float32(0)


def _mismatch(where: str, got: list[str], want: list[str]) -> CheckpointMismatchError:
    pairs = zip(got, want, strict=False)
    diff = [f"  checkpoint: {a}\n  config:     {b}" for a, b in pairs if a != b][:5]
    if len(got) != len(want):
        diff.append(f"  {len(got)} arrays in the checkpoint, {len(want)} in the model")
    return CheckpointMismatchError(
        f"checkpoint {where} does not match the model the config builds (different Arch or "
        "Loss?):\n" + "\n".join(diff) + "\nUse a fresh --workdir for a different model, or "
        "restore the run's own config."
    )


def _manager(wd: Workdir, which: str, keep: int | None = None) -> ocp.CheckpointManager:
    """The orbax manager of WORKDIR/checkpoints or WORKDIR/best: read-only unless `keep`."""
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=keep is not None,
        read_only=keep is None,
        enable_async_checkpointing=False,
        # The trainer (the workdir lock makes it the only writer) removes what a killed or
        # failed save left; orbax never lists such a folder as a step.
        cleanup_tmp_directories=keep is not None,
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(wd.checkpoints(which), options=opts, item_handlers=handlers)


def _steps(wd: Workdir, which: str) -> list[int]:
    """Completed checkpoint steps of `which`, oldest first. Listing a live run's folder can
    meet a step that the trainer deletes meanwhile: the listing is then taken again."""
    for attempt in range(5):
        if not wd.checkpoints(which).is_dir():
            return []
        try:
            mgr = _manager(wd, which)
            try:
                return sorted(mgr.all_steps())
            finally:
                mgr.close()
        except OSError:
            if attempt == 4:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def candidates(
    wd: Workdir, which: str = "latest", step: int | None = None
) -> list[tuple[str, int]]:
    """The checkpoints to try, in order, as (which, step): the one step-selection rule.

    With `step`: that step, from checkpoints/ or else best/ (an error when neither has it).
    Otherwise `which` "latest" gives the latest steps newest first; "best" gives the best one,
    then the latest steps newest first as fall-backs.
    """
    if which not in KINDS:
        raise JaxrecError(f"which={which!r}: use best or latest")
    latest, best = _steps(wd, "latest"), _steps(wd, "best")
    if step is not None:
        if step in latest:
            return [("latest", step)]
        if step in best:
            return [("best", step)]
        raise CheckpointMismatchError(
            f"no checkpoint for step {step} in {wd}; available: {sorted(set(latest) | set(best))}"
        )
    out = [("latest", s) for s in reversed(latest)]
    if which == "best":
        out = [("best", s) for s in reversed(best)][:1] + out
    return out


def _restore(mgr: ocp.CheckpointManager, step: int, target: Any = None) -> tuple[Any, dict]:
    """(state, meta) of one checkpoint; `target` gives structure, dtypes and shardings, and the
    head's padding is cut or extended to it (the signature has checked the real shapes).
    None: as saved, on this process's first device (whatever device count wrote it), with the
    head's padding cut off."""
    if target is not None:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target
        )
    else:
        tree = mgr.item_metadata(step)["state"]
        tree = getattr(tree, "tree", tree)
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree
        )
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract, strict=target is None),
        meta=ocp.args.JsonRestore(),
    )
    restored = mgr.restore(step, args=args)
    state, meta = restored["state"], dict(restored["meta"])
    if target is None and meta.get("head_classes") is not None:
        state = unpad_head(state, int(meta["head_classes"]))
    return state, meta


def _read_meta(mgr: ocp.CheckpointManager, step: int) -> dict:
    return dict(mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def _why(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err)[:300]}"


def _orbax_background_noise(exc: BaseException | None) -> bool:
    """An error Python can only print ("Exception ignored in ..."), never raise: tensorstore
    callbacks after a failed save's event loop closed, or an orbax read coroutine that was
    abandoned (its sibling read failed first, the caller already has that error) and turned the
    GeneratorExit of its closing into an Exception of its own."""
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    return (
        isinstance(exc, Exception)
        and isinstance(exc.__cause__, GeneratorExit)
        and _raised_in_orbax(exc.__traceback__)
    )


def _raised_in_orbax(tb: TracebackType | None) -> bool:
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def quiet_orbax_background_errors() -> None:
    """Keep orbax's background-thread reports of a failed save off the terminal: the error
    reaches `Checkpoints.save` anyway (and becomes one line there). Drops orbax's ERROR log of
    a signaling thread's exception, asyncio's reports of orbax write futures whose exception was
    never retrieved, and what `_orbax_background_noise` describes. Idempotent."""
    if getattr(quiet_orbax_background_errors, "done", False):
        return
    quiet_orbax_background_errors.done = True

    def drop(record: logging.LogRecord) -> bool:
        return not (
            record.levelno >= logging.ERROR
            and "orbax" in record.pathname
            and "raised an exception" in record.getMessage()
        )

    def drop_unretrieved(record: logging.LogRecord) -> bool:
        # A failed sharded save fails several write futures; asyncio logs the ones that were
        # not awaited when their event loop is collected.
        if "exception was never retrieved" not in record.getMessage():
            return True
        if record.exc_info and _raised_in_orbax(record.exc_info[2]):
            return False
        return "orbax" not in record.getMessage()

    logging.getLogger("absl").addFilter(drop)
    logging.getLogger().addFilter(drop)
    logging.getLogger("asyncio").addFilter(drop_unretrieved)
    hook = sys.excepthook

    def excepthook(kind, value, tb):
        if kind is RuntimeError and str(value) == "Event loop is closed":
            return
        hook(kind, value, tb)

    sys.excepthook = excepthook
    unraisable = sys.unraisablehook

    def unraisablehook(info):
        if _orbax_background_noise(info.exc_value):
            return
        unraisable(info)

    sys.unraisablehook = unraisablehook


_TMP_SUFFIX = ocp.path.step.TMP_DIR_SUFFIX  # STEP.orbax-checkpoint-tmp[-TIMESTAMP]


def _remove_partial_save(directory: str, step: int, quiet_s: float = 0.5, limit_s: float = 15):
    """Remove the temporary folder of the failed save of `step`. Tensorstore writes that were
    already issued can still land after the error reached us and recreate parts of it, so the
    folder is removed until it has stayed away for `quiet_s` (at most `limit_s`)."""
    deadline = time.monotonic() + limit_s
    clean_since = None
    while time.monotonic() < deadline:
        partial = [n for n in os.listdir(directory) if n.startswith(f"{step}{_TMP_SUFFIX}")]
        for name in partial:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        now = time.monotonic()
        if partial:
            clean_since = None
        elif clean_since is None:
            clean_since = now
        elif now - clean_since >= quiet_s:
            return
        time.sleep(0.05)


class Checkpoints:
    """The workdir's two orbax CheckpointManagers, for training: `checkpoints/` keeps the last
    `max_to_keep`, `best/` keeps one. Each checkpoint holds the state and a JSON `meta`."""

    def __init__(
        self, workdir: str | os.PathLike, max_to_keep: int = 3, head_classes: int | None = None
    ) -> None:
        """`head_classes`: the real class count of a class-sharded (padded) head, else None."""
        self.head_classes = head_classes
        quiet_orbax_background_errors()
        self.wd = Workdir(workdir)
        self.workdir = str(self.wd)
        self.latest = _manager(self.wd, "latest", max_to_keep)
        self.best = _manager(self.wd, "best", 1)

    def _mgr(self, which: str) -> ocp.CheckpointManager:
        return self.best if which == "best" else self.latest

    def save(self, step: int, state: Any, meta: dict, best: bool = False) -> None:
        """Save the state's (possibly sharded, multi-host) arrays with its meta; every process
        calls it."""
        meta = dict(
            meta,
            signature=signature(state.params, state.batch_stats, self.head_classes),
            param_max_abs=float(_max_abs(state.params)),
            devices=jax.device_count(),
        )
        if self.head_classes is not None:
            meta["head_classes"] = self.head_classes
        mgr = self.best if best else self.latest
        if step in mgr.all_steps():
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            mgr.save(step, args=args, force=True)
            mgr.wait_until_finished()
        except Exception as e:
            if not is_disk_full(e):
                raise
            raise self._disk_full(mgr, step, state) from None

    def _disk_full(self, mgr, step: int, state: Any) -> JaxrecError:
        """Remove the half-written checkpoint (orbax never lists it) and say what happened."""
        directory = os.fspath(mgr.directory)
        if jax.process_index() == 0:
            _remove_partial_save(directory, step)
        leaves = jax.tree.leaves(state)
        needed = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in leaves)
        done = self.steps("latest")
        return disk_full(
            f"checkpoint step {step}",
            directory,
            needed,
            (
                f"the last complete checkpoint is step {done[-1]}"
                if done
                else "no checkpoint was completed yet"
            )
            + "; rerun the same command to resume from it",
        )

    def steps(self, which: str = "latest") -> list[int]:
        return sorted(self._mgr(which).all_steps())

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict] | None:
        """Restore the newest readable checkpoint (or `step`) into the structure and shardings
        of `target`; None when there is none. Unreadable checkpoints are moved aside.

        The signature (real shapes) must match; the head's zero padding is cut or extended to
        the target's, so a checkpoint of another device count reshards."""
        want = signature(target.params, target.batch_stats, self.head_classes)
        for which, s in candidates(self.wd, "latest", step):
            mgr = self._mgr(which)
            try:
                meta = _read_meta(mgr, s)
            except Exception as e:  # noqa: BLE001 - orbax raises many kinds for damaged files
                self._quarantine(mgr, s, e)
                continue
            sig = meta.get("signature")
            if sig is not None and sig != want:
                raise _mismatch(f"{mgr.directory}/{s}", sig, want)
            try:
                return _restore(mgr, s, target)
            except Exception as e:  # noqa: BLE001 - orbax raises many kinds for damaged files
                self._quarantine(mgr, s, e)
        return None

    def meta(self, step: int) -> dict:
        """The JSON meta of checkpoint `step` in checkpoints/."""
        return _read_meta(self.latest, step)

    def discard_after(self, step: int, log=print) -> None:
        """`train.py --restore_step N`: move the checkpoints after N aside (STEP.discarded) so
        that N is the newest one training resumes from."""
        available = sorted(set(self.steps("latest")) | set(self.steps("best")))
        if step not in available:
            raise CheckpointMismatchError(
                f"--restore_step {step}: no such checkpoint in {self.workdir}; available: "
                f"{available}"
            )
        for which in KINDS:
            mgr = self._mgr(which)
            for s in [s for s in mgr.all_steps() if s > step]:
                path = self.wd.checkpoint(which, s)
                log(
                    f"--restore_step {step}: moving the later checkpoint {path} to {path}.discarded"
                )
                if jax.process_index() == 0:
                    os.replace(path, f"{path}.discarded")
            mgr.reload()

    def _quarantine(self, mgr, step: int, err: Exception) -> None:
        path = os.path.join(os.fspath(mgr.directory), str(step))
        aside = f"{path}.unreadable"
        warnings.warn(
            f"checkpoint {path} is unreadable ({_why(err)}); training moves it to {aside} and "
            "falls back to the previous one",
            stacklevel=3,
        )
        if jax.process_index() == 0 and os.path.exists(path):
            os.replace(path, aside)
        mgr.reload()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


# --------------------------------------------------------------------------------------------
# Read-only access (evaluate, export, extract, convert, tools)


def steps_in(workdir: str | os.PathLike, which: str) -> list[int]:
    """Completed checkpoint steps in WORKDIR/checkpoints ("latest") or WORKDIR/best ("best")."""
    return _steps(Workdir(workdir), which)


def _read(wd: Workdir, which: str, step: int) -> tuple[dict, dict]:
    """(state tree, meta) of one checkpoint, read-only and as saved."""
    mgr = _manager(wd, which)
    try:
        state, meta = _restore(mgr, step)
    finally:
        mgr.close()
    if not isinstance(state, dict) or "model" not in state.get("params", {}):
        raise ValueError("not a jaxrec TrainState (no params/model)")
    return state, meta


def read_checkpoint(
    workdir: str | os.PathLike, which: str = "latest", step: int | None = None
) -> tuple[int, dict, dict]:
    """(step, state tree as numpy, meta) of the newest checkpoint in `which` (or of `step`),
    read-only and without any check: for tools and tests that inspect a run."""
    wd = Workdir(workdir)
    found = candidates(wd, which, step)
    if not found:
        raise CheckpointMismatchError(f"no checkpoint in {wd.checkpoints(which)}")
    kind, s = found[0]
    state, meta = _read(wd, kind, s)
    return s, jax.tree.map(np.asarray, state), meta


class _Vanished(Exception):
    """The checkpoint directory disappeared while it was read (rotated out by a live run)."""


def _read_live(wd: Workdir, which: str, step: int) -> tuple[dict, dict]:
    """`_read` for a workdir a trainer may be writing: a checkpoint deleted while being read
    (the trainer keeps only the last K) raises `_Vanished`, not a damage error. A read that
    fails on a checkpoint that is still there is retried once before it counts as damage."""
    ckpt = Path(wd.checkpoint(which, step))
    for attempt in range(2):
        try:
            return _read(wd, which, step)
        except Exception:  # orbax raises many kinds for damaged files
            for _ in range(10):  # a rotation deletes file by file: give it a moment
                if not (ckpt / "state").is_dir():
                    raise _Vanished(str(ckpt)) from None
                time.sleep(0.05)
            if attempt:
                raise
    raise AssertionError("unreachable")


_LIVE_RETRIES = 10  # a trainer saving faster than a read completes, 10 times in a row


def restore_variables(
    workdir: str | os.PathLike, which: str = "best", step: int | None = None
) -> tuple[Any, dict[str, Any], int, str]:
    """(run, model variables, step, description) of a training run's checkpoint, read-only.

    `step` picks a checkpoint explicitly (an unreadable one is an error). Otherwise `which` is
    "best" (the best evaluation) or "latest". If that checkpoint is missing or unreadable, the
    newest readable checkpoint in WORKDIR/checkpoints is used with a warning naming it. Nothing
    in the workdir is moved or deleted. Variables are float32 numpy arrays.

    Safe beside a running trainer: a checkpoint that the trainer rotates out while it is read
    is not "unreadable"; the checkpoints are listed again and the newest is read (with a
    warning naming both).
    """
    quiet_orbax_background_errors()  # a read of a vanishing checkpoint stays quiet too
    wd = Workdir(workdir)
    run = load_run(wd.root)
    model = build_model(run.arch, **run.model_options(training=False))
    want = abstract_variables(model)
    want_sig = signature(want["params"], want.get("batch_stats", {}))
    rotated: list[str] = []
    for _attempt in range(_LIVE_RETRIES):
        try:
            kind, s, variables = _pick(wd, which, step, want_sig, rotated)
        except _Vanished as gone:
            if step is not None:
                avail = sorted(set(_steps(wd, "latest")) | set(_steps(wd, "best")))
                raise CheckpointMismatchError(
                    f"checkpoint {gone} was removed while it was read (a running trainer keeps "
                    f"only its last checkpoints); pick a newer --step: available {avail}"
                ) from None
            rotated.append(str(gone))
            continue
        variables = jax.tree.map(lambda a: np.asarray(a, np.float32), variables)
        return run, variables, int(s), f"workdir {wd} ({KINDS[kind]} step {s})"
    raise CheckpointMismatchError(
        f"{wd}: the running trainer removed {_LIVE_RETRIES} checkpoints in a row while they were "
        f"read ({', '.join(rotated)}); raise Global.keep_checkpoints or try again"
    )


def _pick(wd: Workdir, which: str, step: int | None, want_sig: list[str], rotated: list[str]):
    """(kind, step, variables) of the checkpoint `restore_variables` uses; `_Vanished` when the
    one being read disappears."""
    found = candidates(wd, which, step)
    if not found:
        raise CheckpointMismatchError(
            f"no checkpoint found in {wd.checkpoints('latest')} or {wd.checkpoints('best')}"
        )
    problems = []
    if step is None and which == "best" and not _steps(wd, "best"):
        problems.append(f"{wd.checkpoints('best')} holds no checkpoint (no evaluation ran)")
    for kind, s in found:
        ckpt = wd.checkpoint(kind, s)
        try:
            state, _meta = _read_live(wd, kind, s)
        except _Vanished:
            raise
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds for damaged files
            if step is not None:
                raise CheckpointMismatchError(
                    f"checkpoint {ckpt} is unreadable ({_why(e)})"
                ) from None
            problems.append(f"{ckpt} is unreadable ({_why(e)})")
            continue
        variables = {"params": state["params"]["model"], "batch_stats": state["batch_stats"]}
        got_sig = signature(variables["params"], variables["batch_stats"])
        if [g.rsplit(" ", 1)[0] for g in got_sig] != [w.rsplit(" ", 1)[0] for w in want_sig]:
            raise _mismatch(str(ckpt), got_sig, want_sig)
        if rotated:
            problems.insert(
                0,
                f"{', '.join(rotated)} was removed by the running trainer while it was read "
                "(it keeps only its last checkpoints)",
            )
        if problems:
            warnings.warn(
                "; ".join(problems) + f"; using {ckpt} instead (nothing was moved)", stacklevel=4
            )
        return kind, s, variables
    raise CheckpointMismatchError(
        f"no readable checkpoint in {wd}: " + "; ".join(problems) + ". Training (train.py on "
        "this workdir) moves unreadable checkpoints aside and resumes from the last good one."
    )


def restore_model(
    workdir: str | os.PathLike, which: str = "best", step: int | None = None
) -> ModelDir:
    """The model of a training run as a `ModelDir` (variables, the run's preprocessing and
    feature spec), read-only; see `restore_variables`."""
    run, variables, _, desc = restore_variables(workdir, which, step)
    return ModelDir(
        model=build_model(run.arch, **run.model_options(training=False)),
        variables=variables,
        arch=run.arch_section,
        preprocess=run.preprocess,
        features=run.eval.feature,
        source=desc,
    )


def open_model(path: str | os.PathLike, which: str = "best", step: int | None = None) -> ModelDir:
    """The model at `path`, the one opener of extract, export, convert and search: a model
    directory (`python -m jaxrec.export` / `convert` output), or a training workdir (its `which`
    checkpoint or `step`, fed with the run's own preprocessing). Raises a `JaxrecError` naming
    what is wrong."""
    p = Path(path)
    if not p.is_dir():
        raise ModelDirError(
            f"{path} is not a directory, so not a jaxrec model directory or a training workdir: "
            "give a model directory (`python -m jaxrec.export` or `python -m jaxrec.convert` "
            "output) or a training workdir (train.py)"
        )
    if Workdir(p).is_workdir():
        return restore_model(p, which=which, step=step)
    if step is not None:
        raise ModelDirError(f"{path} is a model directory, not a training workdir: it has no steps")
    return load_model_dir(p, resolve_arch)


def is_workdir(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a training workdir (config.json and a checkpoint folder)."""
    return Workdir(path).is_workdir()
