"""Training checkpoints: the workdir layout, saving, and restoring for training or for use.

Layout of a training workdir (the only place that knows it):

    WORKDIR/config.json              the run's config (jaxrec.training.workdir)
    WORKDIR/checkpoints/STEP/state   orbax tree of the TrainState {step, params{model, loss},
                                     batch_stats, opt_state}, saved as host numpy arrays
    WORKDIR/checkpoints/STEP/meta    JSON: epoch, iteration, step, best metric, loader state,
                                     signature of the parameter tree
    WORKDIR/best/STEP/...            the same for the best evaluation so far (one kept)

orbax writes each checkpoint into a temporary directory and renames it when complete, so a
process killed mid-save leaves the previous checkpoints intact.

Two ways in: `Checkpoints` (training: saves, and restores the full state; an unreadable newest
checkpoint is moved aside to STEP.unreadable, with a warning, and the previous one is used), and
`restore_variables` / `restore_model` (evaluation, export, extraction: read-only, they never
move or delete anything).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxrec.errors import CheckpointMismatchError, JaxrecError, disk_full, is_disk_full
from jaxrec.treepath import path_names

LATEST, BEST = "checkpoints", "best"
WHICH = {"latest": LATEST, "best": BEST}


def signature(params: Any, batch_stats: Any) -> list[str]:
    """`path shape dtype` of every parameter and BN statistic (to detect mismatched restores)."""
    out = []
    for part, tree in (("params", params), ("batch_stats", batch_stats)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = "/".join(path_names(path))
            out.append(f"{part}/{names} {list(np.shape(leaf))} {np.asarray(leaf).dtype}")
    return out


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


def quiet_orbax_background_errors() -> None:
    """Keep orbax's background-thread reports of a failed save off the terminal: the error
    reaches `Checkpoints.save` anyway (and becomes one line there). Drops orbax's ERROR log of
    a signaling thread's exception, and tensorstore callbacks' "Event loop is closed" after a
    failed save's event loop has shut down. Idempotent."""
    import logging  # noqa: PLC0415
    import sys  # noqa: PLC0415

    if getattr(quiet_orbax_background_errors, "done", False):
        return
    quiet_orbax_background_errors.done = True

    def drop(record: logging.LogRecord) -> bool:
        return not (
            record.levelno >= logging.ERROR
            and "orbax" in record.pathname
            and "raised an exception" in record.getMessage()
        )

    logging.getLogger("absl").addFilter(drop)
    logging.getLogger().addFilter(drop)
    hook = sys.excepthook

    def excepthook(kind, value, tb):
        if kind is RuntimeError and str(value) == "Event loop is closed":
            return
        hook(kind, value, tb)

    sys.excepthook = excepthook
    unraisable = sys.unraisablehook

    def unraisablehook(info):  # tensorstore reports callback errors this way
        if isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == (
            "Event loop is closed"
        ):
            return
        unraisable(info)

    sys.unraisablehook = unraisablehook


class Checkpoints:
    """The workdir's two orbax CheckpointManagers, for training: `checkpoints/` keeps the last
    `max_to_keep`, `best/` keeps one. Each checkpoint holds the state and a JSON `meta`."""

    def __init__(self, workdir: str | os.PathLike, max_to_keep: int = 3) -> None:
        import orbax.checkpoint as ocp

        self._ocp = ocp
        quiet_orbax_background_errors()
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.latest = self._manager(LATEST, max_to_keep)
        self.best = self._manager(BEST, 1)

    def _manager(self, sub: str, keep: int):
        ocp = self._ocp
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        return ocp.CheckpointManager(
            os.path.join(self.workdir, sub), options=opts, item_names=("state", "meta")
        )

    def save(self, step: int, state: Any, meta: dict, best: bool = False) -> None:
        """Save a replicated state (this process's host copy) with its meta."""
        from jaxrec.parallel import host_copy

        host = host_copy(state)
        largest = max((float(np.max(np.abs(a))) for a in jax.tree.leaves(host.params)), default=0)
        meta = dict(meta, signature=signature(host.params, host.batch_stats), param_max_abs=largest)
        mgr = self.best if best else self.latest
        if step in mgr.all_steps():
            return
        ocp = self._ocp
        args = ocp.args.Composite(state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta))
        try:
            mgr.save(step, args=args, force=True)
            mgr.wait_until_finished()
        except Exception as e:
            if not is_disk_full(e):
                raise
            raise self._disk_full(mgr, step, host) from None

    def _disk_full(self, mgr, step: int, host: Any) -> JaxrecError:
        """Remove the half-written checkpoint (orbax never lists it) and say what happened."""
        directory = os.fspath(mgr.directory)
        for name in os.listdir(directory) if jax.process_index() == 0 else []:
            if name.startswith(f"{step}.") and "tmp" in name:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        needed = sum(int(np.asarray(a).nbytes) for a in jax.tree.leaves(host))
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
        mgr = self.best if which == "best" else self.latest
        return sorted(mgr.all_steps())

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict] | None:
        """Restore the newest readable checkpoint (or `step`) into the structure and shardings
        of `target`; None when there is none. Unreadable checkpoints are moved aside."""
        ocp = self._ocp
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target
        )
        want = signature(target.params, target.batch_stats)
        if step is not None:
            mgr = self.latest if step in self.latest.all_steps() else self.best
            if step not in mgr.all_steps():
                raise CheckpointMismatchError(
                    f"no checkpoint for step {step} in {self.workdir}; available: "
                    f"{sorted(set(self.latest.all_steps()) | set(self.best.all_steps()))}"
                )
            candidates = [(mgr, step)]
        else:
            candidates = [(self.latest, s) for s in sorted(self.latest.all_steps(), reverse=True)]
        for mgr, s in candidates:
            try:
                meta = mgr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint
                self._quarantine(mgr, s, e)
                continue
            sig = meta.get("signature")
            if sig is not None and sig != want:
                raise _mismatch(f"{mgr.directory}/{s}", sig, want)
            try:
                args = ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                )
                restored = mgr.restore(s, args=args)
            except Exception as e:  # noqa: BLE001
                self._quarantine(mgr, s, e)
                continue
            return restored["state"], dict(restored["meta"])
        return None

    def meta(self, step: int) -> dict:
        """The JSON meta of checkpoint `step` in checkpoints/."""
        ocp = self._ocp
        return self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def discard_after(self, step: int, log=print) -> None:
        """`train.py --restore_step N`: move the checkpoints after N aside (STEP.discarded) so
        that N is the newest one training resumes from."""
        available = sorted(set(self.steps("latest")) | set(self.steps("best")))
        if step not in available:
            raise CheckpointMismatchError(
                f"--restore_step {step}: no such checkpoint in {self.workdir}; available: "
                f"{available}"
            )
        for mgr in (self.latest, self.best):
            for s in [s for s in mgr.all_steps() if s > step]:
                path = os.path.join(os.fspath(mgr.directory), str(s))
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
            f"checkpoint {path} is unreadable ({type(err).__name__}: {str(err)[:300]}); "
            f"training moves it to {aside} and falls back to the previous one",
            stacklevel=3,
        )
        if jax.process_index() == 0 and os.path.exists(path):
            os.replace(path, aside)
        mgr.reload()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


# --------------------------------------------------------------------------------------------
# Read-only access (evaluate, export, extract, convert)


def steps_in(workdir: str | os.PathLike, which: str) -> list[int]:
    """Completed checkpoint steps in WORKDIR/checkpoints ("latest") or WORKDIR/best ("best")."""
    d = Path(workdir) / WHICH[which]
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def _read(ckpt: Path) -> tuple[dict, dict]:
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    try:
        state = ckptr.restore(ckpt / "state")
    finally:
        ckptr.close()
    meta_file = ckpt / "meta" / "metadata"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if not isinstance(state, dict) or "params" not in state or "model" not in state["params"]:
        raise ValueError("not a jaxrec TrainState (no params/model)")
    return state, meta


def read_checkpoint(
    workdir: str | os.PathLike, which: str = "latest", step: int | None = None
) -> tuple[int, dict, dict]:
    """(step, state tree as numpy, meta) of the newest checkpoint in `which` (or of `step`),
    read-only and without any check: for tools and tests that inspect a run."""
    wd = Path(workdir)
    if step is None:
        steps = steps_in(wd, which)
        if not steps:
            raise CheckpointMismatchError(f"no checkpoint in {wd / WHICH[which]}")
        step = steps[-1]
    kind = which if step in steps_in(wd, which) else ("best" if which == "latest" else "latest")
    state, meta = _read(wd / WHICH[kind] / str(step))
    return step, jax.tree.map(np.asarray, state), meta


class _Vanished(Exception):
    """The checkpoint directory disappeared while it was read (rotated out by a live run)."""


def _read_live(ckpt: Path) -> tuple[dict, dict]:
    """`_read` for a workdir a trainer may be writing: a checkpoint deleted while being read
    (the trainer keeps only the last K) raises `_Vanished`, not a damage error. A read that
    fails on a checkpoint that is still there is retried once before it counts as damage."""
    for attempt in range(2):
        try:
            return _read(ckpt)
        except Exception:  # noqa: BLE001 - orbax raises many kinds for damaged files
            for _ in range(10):  # a rotation deletes file by file: give it a moment
                if not (ckpt / "state").is_dir():
                    raise _Vanished(str(ckpt)) from None
                time.sleep(0.05)
            if attempt:
                raise
    raise AssertionError("unreachable")


def restore_variables(
    workdir: str | os.PathLike, which: str = "best", step: int | None = None
) -> tuple[Any, dict[str, Any], int, str]:
    """(run, model variables, step, description) of a training run's checkpoint, read-only.

    `step` picks a checkpoint explicitly (an unreadable one is an error). Otherwise `which` is
    "best" (the best evaluation) or "latest". If that checkpoint is missing or unreadable, the
    newest readable checkpoint in WORKDIR/checkpoints is used with a warning naming it. Nothing
    in the workdir is moved or deleted. Variables are float32 numpy arrays.

    Safe beside a running trainer: a checkpoint that the trainer rotates out while it is read
    is not "unreadable"; the newest checkpoint is picked again (with a warning naming both).
    """
    from jaxrec.models import abstract_variables, build_model
    from jaxrec.training.workdir import load_run

    wd = Path(workdir).absolute()
    run = load_run(str(wd))
    if which not in WHICH:
        raise JaxrecError(f"which={which!r}: use best or latest")
    model = build_model(run.model_arch(training=False))
    want = abstract_variables(model)
    rotated: list[str] = []
    for _attempt in range(_LIVE_RETRIES):
        try:
            found = _pick(wd, which, step, want, rotated)
        except _Vanished as gone:
            if step is not None:
                avail = sorted(set(steps_in(wd, "latest")) | set(steps_in(wd, "best")))
                raise CheckpointMismatchError(
                    f"checkpoint {gone} was removed while it was read (a running trainer keeps "
                    f"only its last checkpoints); pick a newer --step: available {avail}"
                ) from None
            rotated.append(str(gone))
            continue
        kind, s, variables = found
        variables = jax.tree.map(lambda a: np.asarray(a, np.float32), variables)
        return run, variables, int(s), f"workdir {wd} ({WHICH[kind]} step {s})"
    raise CheckpointMismatchError(
        f"{wd}: the running trainer removed {_LIVE_RETRIES} checkpoints in a row while they were "
        f"read ({', '.join(rotated)}); raise Global.keep_checkpoints or try again"
    )


_LIVE_RETRIES = 5


def _pick(wd: Path, which: str, step: int | None, want: Any, rotated: list[str]):
    """(kind, step, variables) of the checkpoint `restore_variables` picks; `_Vanished` when
    the one being read disappears."""
    if step is not None:
        dirs = [d for d in ("latest", "best") if step in steps_in(wd, d)]
        if not dirs:
            avail = sorted(set(steps_in(wd, "latest")) | set(steps_in(wd, "best")))
            raise CheckpointMismatchError(
                f"{wd}: no checkpoint for step {step}; available: {avail}"
            )
        candidates = [(dirs[0], step)]
    else:
        candidates = [(which, s) for s in reversed(steps_in(wd, which))]
        if which == "best":
            candidates = candidates[:1]
        candidates += [("latest", s) for s in reversed(steps_in(wd, "latest"))]
    if not candidates:
        raise CheckpointMismatchError(f"no checkpoint found in {wd}/{LATEST} or {wd}/{BEST}")
    problems = []
    if step is None and which == "best" and not steps_in(wd, "best"):
        problems.append(f"{wd}/{BEST} holds no checkpoint (no evaluation ran)")
    for kind, s in candidates:
        ckpt = wd / WHICH[kind] / str(s)
        try:
            state, _meta = _read_live(ckpt)
        except _Vanished:
            raise
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds for damaged files
            if step is not None:
                raise CheckpointMismatchError(
                    f"checkpoint {ckpt} is unreadable ({type(e).__name__}: {str(e)[:200]})"
                ) from None
            problems.append(f"{ckpt} is unreadable ({type(e).__name__}: {str(e)[:200]})")
            continue
        variables = {"params": state["params"]["model"], "batch_stats": state["batch_stats"]}
        got_sig = signature(variables["params"], variables["batch_stats"])
        want_sig = signature(want["params"], want.get("batch_stats", {}))
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
                "; ".join(problems) + f"; using {ckpt} instead (nothing was moved)", stacklevel=3
            )
        return kind, s, variables
    raise CheckpointMismatchError(
        f"no readable checkpoint in {wd}: " + "; ".join(problems) + ". Training (train.py on "
        "this workdir) moves unreadable checkpoints aside and resumes from the last good one."
    )


def restore_model(workdir: str | os.PathLike, which: str = "best", step: int | None = None):
    """The model of a training run as a `ModelDir` (variables, the run's preprocessing and
    feature spec), read-only; see `restore_variables`."""
    from jaxrec.models import ModelDir, build_model

    run, variables, _, desc = restore_variables(workdir, which, step)
    arch = run.model_arch(training=False)
    return ModelDir(
        model=build_model(arch),
        variables=variables,
        arch=arch,
        preprocess=run.preprocess,
        features=run.eval.feature,
        source=desc,
    )


def is_workdir(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a training workdir (config.json and a checkpoint folder)."""
    p = Path(path)
    return (p / "config.json").is_file() and ((p / LATEST).is_dir() or (p / BEST).is_dir())
