"""Device mesh, parameter shardings by logical axis rules, and batch placement.

Mesh axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose devices also split
parameters). Batches are split over both. Every parameter has logical axis names (`PARAM_AXES`,
matched on its path), and one table, `LOGICAL_AXIS_RULES`, maps logical axes to mesh axes, as
MaxText's `logical_axis_rules` and jax-llm-examples' `ShardingRules` do. At 0.5-8B parameters this
covers single GPUs, multi-GPU hosts and TPU pod slices without tensor parallelism.

On a TPU slice the default mesh is FSDP over all its chips (`mesh.fsdp=0`): the float32 fuser and
its Adam state (5.3 GiB for Qwen3-0.6B <- Qwen2.5-0.5B) do not fit a 16 GiB v5e chip next to the
activations when every chip holds a copy (docs/design.md, "Sharding on TPU").
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

# Parameter path (names joined by "/", `fullmatch`ed) -> one logical axis name per dimension.
# Decoder layers and fuser projectors are stacked on leading axes ("layers"; "fuser_layers", "branch").
_FUSER = "projectors/(?:.+/)?"
PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Frozen decoders (models.decoder.Decoder).
    ("embed_tokens/embedding", ("vocab", "embed")),
    ("lm_head/kernel", ("embed", "vocab")),
    ("norm/scale", ("norm",)),
    ("layers/(input|post_attention)_layernorm/scale", ("layers", "norm")),
    ("layers/self_attn/qkv_proj/kernel", ("layers", "embed", "qkv")),
    ("layers/self_attn/qkv_proj/bias", ("layers", "qkv")),
    ("layers/self_attn/o_proj/kernel", ("layers", "heads_merged", "embed")),
    ("layers/self_attn/o_proj/bias", ("layers", "embed")),
    ("layers/self_attn/[qk]_norm/scale", ("layers", "head_dim")),
    ("layers/mlp/gate_up_proj/kernel", ("layers", "embed", "mlp")),
    ("layers/mlp/gate_up_proj/bias", ("layers", "mlp")),
    ("layers/mlp/down_proj/kernel", ("layers", "mlp", "embed")),
    ("layers/mlp/down_proj/bias", ("layers", "embed")),
    # The fuser (fuser.Fuser): every projector stacked on (receiver layer, K/V branch).
    ("projectors/gate_logit", ("fuser_layers", "branch")),
    (_FUSER + "in_proj/kernel", ("fuser_layers", "branch", "fuser_in", "fuser_hidden")),
    (_FUSER + "(in_proj/bias|norm_scale)", ("fuser_layers", "branch", "fuser_hidden")),
    (_FUSER + "w1/kernel", ("fuser_layers", "branch", "fuser_hidden", "fuser_mlp")),
    (_FUSER + "w2/kernel", ("fuser_layers", "branch", "fuser_mlp", "fuser_hidden")),
    (_FUSER + "proj_out/kernel", ("fuser_layers", "branch", "fuser_hidden", "fuser_out")),
    (_FUSER + "proj_out/bias", ("fuser_layers", "branch", "fuser_out")),
    (_FUSER + "weight_head/kernel", ("fuser_layers", "branch", "fuser_hidden", "fuser_heads")),
    (_FUSER + "weight_head/bias", ("fuser_layers", "branch", "fuser_heads")),
)

# Logical axis -> mesh axis, in priority order: an array takes the first rule whose logical axis it
# has, whose mesh axis it does not use yet, and whose size that mesh axis divides; later rules are
# the fallbacks (a hidden size the fsdp axis does not divide leaves the mlp axis to shard). Logical
# axes without a rule (layers, branch, norm, head_dim, ...) are never split: stacked axes are
# scanned/vmapped over, and the small ones are not worth a collective.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...]], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("fuser_hidden", "fsdp"),
    ("mlp", "fsdp"),
    ("fuser_mlp", "fsdp"),
    ("qkv", "fsdp"),
    ("heads_merged", "fsdp"),
    ("fuser_in", "fsdp"),
    ("fuser_out", "fsdp"),
    ("vocab", "fsdp"),
)


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


def platform_of(mesh_or_devices) -> str:
    """"tpu", "gpu" or "cpu": what the mesh's devices are (compile-only TPU devices included), which
    during a deviceless TPU compile is not `jax.default_backend()`."""
    devices = mesh_or_devices.devices.flat if isinstance(mesh_or_devices, Mesh) else mesh_or_devices
    return next(iter(devices)).platform


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
    """A (data, fsdp) mesh over all devices (data=-1), or over the first data x fsdp of them.

    fsdp=0 ("auto"): all the devices on a TPU (one slice's ICI carries FSDP's gathers cheaply, and
    the fuser's optimizer state needs the room), 1 elsewhere (pure data parallelism).
    """
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    fsdp = mesh_config.fsdp
    if fsdp == 0:
        fsdp = (n if mesh_config.data <= 0 else n // mesh_config.data) if platform_of(devices) == "tpu" else 1
    data = mesh_config.data if mesh_config.data > 0 else n // max(fsdp, 1)
    if fsdp < 1 or data < 1 or data * fsdp > n or (mesh_config.data <= 0 and data * fsdp != n):
        raise ValueError(f"mesh data={mesh_config.data} x fsdp={mesh_config.fsdp} does not fit the {n} available "
                         "devices")
    return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[: data * fsdp])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def logical_axes(names: Sequence[str], ndim: int) -> tuple[str, ...]:
    """The logical axes of the parameter at path `names` (from `PARAM_AXES`)."""
    path = "/".join(str(n) for n in names)
    for pattern, axes in PARAM_AXES:
        if re.fullmatch(pattern, path):
            if len(axes) != ndim:
                raise ValueError(f"parameter {path} has {ndim} dimensions, its logical axes {axes} name {len(axes)}")
            return axes
    raise ValueError(f"parameter {path} has no logical axes: add its path to sharding.PARAM_AXES")


def logical_to_spec(axes: Sequence[str], shape: Sequence[int], mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> P:
    """The PartitionSpec that `rules` give an array with logical `axes` and `shape` on `mesh`."""
    spec: list = [None] * len(axes)
    used: set[str] = set()
    for logical, mesh_axes in rules:
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape.get(a, 1) > 1)
        if not mesh_axes or used.intersection(mesh_axes):
            continue
        size = int(np.prod([mesh.shape[a] for a in mesh_axes]))
        for dim, name in enumerate(axes):
            if name == logical and spec[dim] is None and shape[dim] % size == 0:
                spec[dim] = mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes
                used.update(mesh_axes)
                break
    return P(*spec)


def param_sharding(names: Sequence[str], shape: Sequence[int], mesh: Mesh, *, shard: bool) -> NamedSharding:
    """A parameter's sharding: by the logical axis rules, or replicated (`shard=False`)."""
    axes = logical_axes(names, len(shape))  # checked even when replicated: every parameter has its axes
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh) if shard else P())


def param_sharding_fn(mesh: Mesh, shard: bool):
    """The `param_sharding` callback of `load_model`."""
    return lambda names, shape: param_sharding(names, shape, mesh, shard=shard)


def _names(path) -> tuple[str, ...]:
    from c2c_jax.models.loading import path_names

    return path_names(path)


def tree_shardings(params, mesh: Mesh, *, shard: bool):
    """NamedShardings for a parameter tree (an NNX state or a pure dict), by path."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: param_sharding(_names(path), np.shape(x), mesh, shard=shard), params)


def optimizer_state_shardings(tx, opt_state, param_shardings, mesh: Mesh):
    """Every optimizer slot shaped like the parameters (Adam's moments) sharded as its parameter;
    the rest (step counts) replicated."""
    import optax

    return optax.tree_map_params(tx, lambda _, sharding: sharding, opt_state, param_shardings,
                                 transform_non_params=lambda _: replicated(mesh))


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int) -> NamedSharding:
    spec = [None] * ndim
    spec[batch_axis] = dict(LOGICAL_AXIS_RULES)["batch"]
    return NamedSharding(mesh, P(*spec))


def place_batch(batch, mesh: Mesh, batch_axis: int):
    """Per-process rows of a batch pytree -> global arrays split over the batch axes."""
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, batch_axis), x)

    return jax.tree.map(put, batch)
