"""Evaluate a training run: restore a checkpoint and the run's own config from --workdir.

    python evaluate.py --workdir runs/general_v2            # best checkpoint (by recall1)
    python evaluate.py --workdir runs/general_v2 --latest   # newest checkpoint
    python evaluate.py --workdir runs/general_v2 --step 5000

Prints Recall@k / mAP on the config's Eval query/gallery sets, writes
WORKDIR/eval/eval_step{N}.json and a rank-list picture WORKDIR/eval/ranklist_step{N}.png.
Multi-host: start one process per host with --coordinator_address/--num_processes/--process_id
(or let SLURM / Open MPI / JAX_COORDINATOR_ADDRESS be auto-detected); each host extracts its
share of every batch and the gallery is sharded over all devices of all hosts, with the same
metrics as one process; process 0 prints and writes the results.
Read-only: nothing in the workdir is moved or deleted. If the best checkpoint is unreadable,
the newest readable checkpoint is evaluated instead, with a warning naming it (an explicit
--step must be readable).

Beside a running trainer:

    python evaluate.py --workdir runs/general_v2 --follow   # each new checkpoint as it appears

A checkpoint that the trainer rotates out while it is read is not an error: the newest one is
read instead, and the step evaluated is printed.
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging

from jaxrec import parallel
from jaxrec.config.flags import define_distributed_flags
from jaxrec.errors import JaxrecError, warnings_as_lines
from jaxrec.evaluate import evaluate_workdir, follow_workdir
from jaxrec.evaluation.open_set import open_set_lines

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (written by train.py).")
_STEP = flags.DEFINE_integer("step", None, "Evaluate the checkpoint of this training step.")
_BEST = flags.DEFINE_bool("best", False, "Evaluate the best checkpoint (the default).")
_LATEST = flags.DEFINE_bool("latest", False, "Evaluate the newest checkpoint.")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder (default WORKDIR/eval).")
_NUM_VIS = flags.DEFINE_integer(
    "num_visualize", 8, "Queries shown in the rank-list picture (0 = no picture)."
)
_DISTRIBUTED = define_distributed_flags()
_FOLLOW = flags.DEFINE_bool(
    "follow",
    False,
    "Evaluate the newest checkpoint, then each newer one as the running trainer saves it; "
    "stops after --follow_idle_seconds without a new checkpoint (or on Ctrl-C).",
)
_POLL = flags.DEFINE_float("poll_seconds", 10.0, "With --follow: how often to look for one.")
_IDLE = flags.DEFINE_float(
    "follow_idle_seconds", 600.0, "With --follow: stop after this long without a new checkpoint."
)
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if sum([_STEP.value is not None, _BEST.value, _LATEST.value]) > 1:
        raise app.UsageError("use at most one of --step, --best, --latest")

    if not any(a.startswith(("-v", "--v")) for a in sys.argv):
        logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO

    which = "latest" if _LATEST.value else "best"
    if _FOLLOW.value and (_STEP.value is not None or _BEST.value):
        raise app.UsageError("--follow evaluates the newest checkpoints: no --step or --best")
    try:
        parallel.maybe_initialize_distributed(*(f.value for f in _DISTRIBUTED))
        with warnings_as_lines():
            if _FOLLOW.value:
                results = follow_workdir(
                    _WORKDIR.value,
                    _print,
                    poll_seconds=_POLL.value,
                    idle_seconds=_IDLE.value,
                    output=_OUTPUT.value,
                    num_visualize=_NUM_VIS.value,
                )
                if jax.process_index() == 0:
                    print(f"no new checkpoint for {_IDLE.value:g}s: {len(results)} evaluated")
                return
            res = evaluate_workdir(
                _WORKDIR.value,
                which=which,
                step=_STEP.value,
                output=_OUTPUT.value,
                num_visualize=_NUM_VIS.value,
            )
    except JaxrecError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    _print(res)


def _print(res: dict) -> None:
    if jax.process_index() != 0:  # process 0 reports for all
        return
    print(f"evaluated {res['source']}")
    print(f"{'metric':<12}{'value':>10}")
    for k, v in res["metrics"].items():
        print(f"{k:<12}{v:>10.4f}")
    if res.get("open_set"):
        print("\n".join(open_set_lines(res["open_set"])))
    if res["json"]:
        print(f"metrics: {res['json']}")
    if res["png"]:
        print(f"rank list: {res['png']}")
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
