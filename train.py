"""Train a PP-ShiTuV2 recognition model (data parallel over all devices and hosts).

    python train.py --config configs/general_v2.py --workdir runs/general_v2
    python train.py --config configs/demo.py --workdir /tmp/demo --config.Global.epochs=2

Re-running the same command resumes from the newest checkpoint in --workdir (model, optimizer,
data position and RNG), so an interrupted run ends exactly where an uninterrupted one would.
`--restore_step N` resumes from an earlier checkpoint instead (later ones are moved aside).
Multi-host: start one process per host with --coordinator_address/--num_processes/--process_id
(or let SLURM / Open MPI / JAX_COORDINATOR_ADDRESS be auto-detected).
Preemption: on SIGTERM (to any host) the run finishes its step, saves that step's checkpoint on
every host and exits with status 143; rerunning the command resumes from it
(jaxrec/training/preemption.py).
Outputs in --workdir: config.json, checkpoints/ (last K), best/ (best recall1), tensorboard/.
Every config key is honoured or rejected by name; docs/CONFIG.md lists the few inert ones.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxrec import parallel
from jaxrec.config import resolve
from jaxrec.config.flags import define_distributed_flags
from jaxrec.errors import JaxrecError
from jaxrec.training import loop as trainer
from jaxrec.training import peers
from jaxrec.training.preemption import EXIT_STATUS, Preempted

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Training config file (e.g. configs/general_v2.py). Override fields with "
    "--config.Section.key=value, e.g. --config.Global.epochs=2 or "
    "--config.Loss.Train[1].TripletAngularMarginLoss.margin=0.3; unknown keys are errors.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints, logs and config.json; reused to resume."
)
_DISTRIBUTED = define_distributed_flags()
_RESTORE = flags.DEFINE_integer(
    "restore_step",
    None,
    "Resume from this checkpoint step instead of the newest (e.g. after a divergence); the "
    "later checkpoints are moved aside to STEP.discarded.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if logging.get_verbosity() == logging.INFO and not any(
        a.startswith(("-v", "--v")) for a in sys.argv
    ):
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO

    try:
        parallel.maybe_initialize_distributed(
            *(f.value for f in _DISTRIBUTED), initialize=peers.initialize
        )
        peers.set_workdir(_WORKDIR.value)
        run = resolve(_CONFIG.value)  # the only reading of the config; run.config keeps it
        trainer.train(run, _WORKDIR.value, restore_step=_RESTORE.value)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(EXIT_STATUS)
    except JaxrecError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:
        peers.exit_on_peer_failure(e)  # multi-host: a lost peer is one line, not a traceback
        raise


if __name__ == "__main__":
    from jaxrec.config.flags import parse_flags_with_config_errors

    app.run(main, flags_parser=parse_flags_with_config_errors)
