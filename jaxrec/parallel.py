"""Devices: the 1-D "data" mesh over every device of every process, shardings, multi-host setup.

Data parallelism is `jax.shard_map` over this mesh. Each device runs the model on its own shard,
like one GPU of PaddleClas's DataParallel run: per-device BatchNorm statistics (unless sync BN)
and per-device triplet mining.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrec.errors import JaxrecError

AXIS = "data"


def make_mesh(devices: Iterable[jax.Device] | None = None) -> jax.sharding.Mesh:
    """1-D "data" mesh over all devices of all processes, with an Auto axis type (so unsharded
    host arrays can be passed to `shard_map(in_specs=P("data"))` after a `device_put`)."""
    devs = list(devices) if devices is not None else jax.devices()
    return jax.sharding.Mesh(np.asarray(devs), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def global_batch(mesh: jax.sharding.Mesh, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global arrays sharded over "data" (multi-host safe)."""
    sharding = data_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


def host_array(x: jax.Array) -> np.ndarray:
    """Gather a (possibly multi-host) global array to a numpy array on every process."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def host_copy(tree):
    """Numpy copy of a replicated pytree from this process's first device (no collectives)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    initialize: Callable[..., None] | None = None,
) -> bool:
    """Start `jax.distributed` when flags are given or a cluster is detected.

    Explicit flags win. Without them `jax.distributed.initialize()` is called only when the
    environment looks like a multi-process launch JAX can auto-detect (SLURM with several tasks,
    Open MPI, or `JAX_COORDINATOR_ADDRESS`); a plain single-machine run stays single-process.
    On CPU the collectives go through gloo. `initialize` replaces `jax.distributed.initialize`
    (train.py passes `jaxrec.training.peers.initialize`). Returns True when initialized.
    """
    if coordinator_address or num_processes:
        if not (coordinator_address and num_processes is not None and process_id is not None):
            raise JaxrecError(
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
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError) as e:  # the option or its value is gone from this jax
        warnings.warn(f"could not select gloo CPU collectives: {e}", stacklevel=2)
    (initialize or jax.distributed.initialize)(**kwargs)
    return True
