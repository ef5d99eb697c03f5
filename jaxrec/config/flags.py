"""Command-line parsing for train.py and evaluate.py: short errors instead of tracebacks."""

from __future__ import annotations

import sys

from absl import flags


def parse_flags_with_config_errors(argv: list[str]) -> list[str]:
    """absl flags parser that turns an unknown `--config.X` override into a short clear error."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        bad = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        print(
            f"error: unknown config key in {bad} ({e}). Check the spelling against the config "
            "file; keys are case-sensitive (e.g. Global.epochs, Optimizer.lr.learning_rate).",
            file=sys.stderr,
        )
        sys.exit(2)
    except flags.Error as e:
        print(f"error: {e}\nPass --helpfull to see all flags.", file=sys.stderr)
        sys.exit(2)


def define_distributed_flags() -> tuple:
    """The multi-host flags of train.py and evaluate.py: (coordinator_address, num_processes,
    process_id) holders, for `parallel.maybe_initialize_distributed`."""
    return (
        flags.DEFINE_string(
            "coordinator_address", None, "Multi-host: host:port of process 0's coordinator."
        ),
        flags.DEFINE_integer("num_processes", None, "Multi-host: total number of processes."),
        flags.DEFINE_integer("process_id", None, "Multi-host: this process's index (0-based)."),
    )
