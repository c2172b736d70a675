"""Device mesh, parameter shardings and batch placement.

Mesh axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose devices also split
parameters). Batches are split over both. Parameters are replicated, or split over `fsdp` along
their largest evenly divisible dimension (never along a stacked layer/branch axis). At 0.5-8B
parameters this covers single GPUs, multi-GPU hosts and TPU pod slices without tensor parallelism.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed() -> bool:
    """Joins a multi-process run when launched as one; must run before anything touches a device.

    Explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (multi-node GPU, local
    tests). Auto-detected by JAX: SLURM jobs of several tasks, and C2C_DISTRIBUTED=1 (set by the
    TPU pod launch scripts; Cloud TPU VMs discover their peers themselves).
    """
    if getattr(maybe_initialize_distributed, "done", False):
        return True
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]),
                                   process_id=int(env["JAX_PROCESS_ID"]))
    elif env.get("C2C_DISTRIBUTED") == "1" or int(env.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
    else:
        return False
    maybe_initialize_distributed.done = True
    return True


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
    """A (data, fsdp) mesh over all devices (data=-1), or over the first data x fsdp of them."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    fsdp = mesh_config.fsdp
    data = mesh_config.data if mesh_config.data > 0 else n // max(fsdp, 1)
    if fsdp < 1 or data < 1 or data * fsdp > n or (mesh_config.data <= 0 and data * fsdp != n):
        raise ValueError(f"mesh data={mesh_config.data} x fsdp={fsdp} does not fit the {n} available devices")
    return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[: data * fsdp])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, stacked_dims: int) -> P:
    """Shard the largest dimension (after the stacked ones) that `fsdp_size` divides; else replicate."""
    if fsdp_size <= 1:
        return P()
    candidates = [(size, axis) for axis, size in enumerate(shape) if axis >= stacked_dims and size % fsdp_size == 0]
    if not candidates:
        return P()
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return P(*spec)


def param_sharding_fn(mesh: Mesh, shard: bool):
    """The `param_sharding` callback of `load_model`: stacked layer params keep their layer axis whole."""
    fsdp_size = mesh.shape["fsdp"] if shard else 1

    def sharding(names: tuple[str, ...], shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(mesh, fsdp_spec(shape, fsdp_size, stacked_dims=1 if names[0] == "layers" else 0))

    return sharding


def tree_shardings(tree, mesh: Mesh, *, shard: bool, stacked_dims: int = 0):
    """NamedShardings for every array leaf of `tree` (fuser params and optimizer state: 2 stacked dims)."""
    fsdp_size = mesh.shape["fsdp"] if shard else 1

    def leaf(x):
        shape = np.shape(x)
        return NamedSharding(mesh, fsdp_spec(shape, fsdp_size, stacked_dims if len(shape) > stacked_dims else 0))

    return jax.tree.map(leaf, tree)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int) -> NamedSharding:
    spec = [None] * ndim
    spec[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def place_batch(batch, mesh: Mesh, batch_axis: int):
    """Per-process rows of a batch pytree -> global arrays split over the batch axes."""
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, batch_axis), x)

    return jax.tree.map(put, batch)
