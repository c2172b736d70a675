"""Training the fuser: the loss and the jitted train/eval steps (the loop is `train.loop`).

Only the fuser is trained. Per micro-batch, the route's phases (`c2c.prefix`), as inference runs them:
    1. prefill_kv: receiver and sharer run the prompt prefix, KV only, outside the gradient;
    2. fuse_prefix, inside `value_and_grad` w.r.t. the fuser parameters (sampled gates, dropout);
    3. finish: the receiver runs the suffix (last instruction token + answer) on the fused cache, and
       the loss is the summed next-token cross-entropy of the answer tokens.
Micro-batches are scanned inside one jitted step; each device accumulates the gradients of its rows
and the devices reduce them once per step. Gradients are normalised by the global count of answer
tokens (or, optionally, upstream's mean of micro-batch means), clipped, and applied by AdamW.
The frozen weights are closed over, never differentiated, never in the optimizer, never saved.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from c2c_jax import sharding
from c2c_jax.c2c.controls import fuser_sharer_caches
from c2c_jax.c2c.fuser import Fuser, FuserNoise, gate_temperature
from c2c_jax.c2c.model import fuse_prefix, prefill_kv
from c2c_jax.models import Decoder, KVCache

log = logging.getLogger("c2c_jax.train")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 []: optimizer steps taken
    params: Any  # fuser parameters, float32 (a plain nested dict)
    opt_state: Any


# ------------------------------------------------------------------------------------------------
# Loss.


def answer_row_losses(receiver: Decoder, hidden: jax.Array, targets: jax.Array, mask: jax.Array,
                      chunk: int = 256) -> jax.Array:
    """float32 [B]: each row's summed cross-entropy over its masked positions, in sequence chunks.

    Full-vocabulary logits for a long answer are large ([B, R, 151936] float32); each chunk's logits
    are recomputed in the backward pass instead of being kept.
    """
    b, r, d = hidden.shape
    chunk = min(chunk, r)
    pad = (-r) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, mask = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))
    n = hidden.shape[1] // chunk

    @jax.checkpoint
    def chunk_loss(h, t, m):
        logits = receiver.logits(h)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logit) * m, axis=-1)

    split = lambda x: x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
    losses = jax.lax.map(lambda xs: chunk_loss(*xs), (split(hidden), split(targets), split(mask)))
    return losses.sum(axis=0)


def micro_batch_loss(params, frozen, mb, noise, temperature, *, graphdefs, mesh=None):
    """(answer loss of every row [B], answer-token count) of one micro-batch; differentiable in `params`.

    The route's own phases (`c2c.prefix`): prefill_kv and fuse_prefix as inference runs them, then the
    receiver's answer on the fused cache.
    noise: the fuser's training noise for these rows (`Fuser.sample_noise`), or None for
      inference-mode fusion (hard gates, no dropout).
    mesh: None, or the training mesh: `params` then carries a leading axis of one copy per
      data-parallel replica (`mesh.shape["data"]`), and replica r's copy fuses the r-th contiguous
      block of rows, so the gradient w.r.t. `params` is each replica's own. Only the fuser is mapped
      over replicas; the frozen models run on the whole batch (also because jax's cuDNN attention
      cannot be vmapped over a mask that broadcasts over heads).
    """
    receiver_def, sharer_def, fuser_def = graphdefs
    receiver = nnx.merge(receiver_def, frozen[0])
    sharer = nnx.merge(sharer_def, frozen[1])
    config = nnx.merge(fuser_def, params).config  # static; merging does not look at the arrays' shapes
    # Decode-time fusion (docs/upstream_reference.md §2.6) fuses the answer's columns too.
    prefix = mb.prefix_with_answer() if config.include_response else mb.prefix()

    # 1. prefill: the frozen models' KV-only passes, outside the gradient.
    receiver_cache, sharer_caches = jax.lax.stop_gradient(
        prefill_kv(receiver, [sharer], [config.sharer_depth], prefix))

    # 2. fuse, with the fuser's own sharer input (the trained control withholds the sharer); its
    # noise comes from the micro-batch's fuser noise (fixed in eval).
    key = jax.random.key(0) if noise is None else jax.random.fold_in(noise.dropout_keys[0], 1)
    sharer_caches = fuser_sharer_caches(sharer_caches, [config.sharer_input], key=key)
    sharer_caches, apply_fuser = _fuser(params, fuser_def, sharer_caches, noise, temperature, mesh)
    fused = fuse_prefix(receiver, prefix, receiver_cache, sharer_caches, apply_fuser)

    # 3. finish: the answer on the fused cache. The prefix's real columns come first and the answer's
    # padding follows its real tokens (`train.batching.collate`), as `extend` requires.
    if config.include_response:  # the answer pass attends to its fused K/V in every layer
        p = mb.prefix_tokens.shape[1]
        prompt = KVCache(k=fused.k[:, :, :p], v=fused.v[:, :, :p], valid=mb.prefix_valid, end=jnp.asarray(p))
        hidden = receiver.extend(mb.suffix_tokens, mb.suffix_positions, prompt,
                                 held=(fused.k[:, :, p:], fused.v[:, :, p:]))
    else:
        if mb.trailing_section:  # columns after a row's last fused one (a chat template) run on the fused cache
            rewound = dataclasses.replace(fused, end=jnp.zeros_like(fused.end))
            _, rerun = receiver(prefix.tokens, prefix.positions, rewound, output="kv",
                                held=prefix.section < prefix.fused_sections)
            fused = dataclasses.replace(rerun, valid=fused.valid, end=fused.end)
        hidden = receiver.extend(mb.suffix_tokens, mb.suffix_positions, fused)
    row_losses = answer_row_losses(receiver, hidden, mb.targets, mb.loss_mask.astype(jnp.float32))
    return row_losses, mb.loss_mask.sum()


def _fuser(params, fuser_def, sharer_caches, noise, temperature, mesh):
    """(sharer caches, apply_fusers) for `fuse_prefix`: the trained fuser, or with a mesh, one copy
    per data-parallel replica, each fusing its own block of rows (`micro_batch_loss`)."""
    def fuse(p, sharer_cache, receiver_cache, fuse_mask, noise):
        return nnx.merge(fuser_def, p)(sharer_cache, receiver_cache, fuse_mask, noise=noise, temperature=temperature)

    if mesh is None:
        def apply_fuser(receiver_cache, sharer_caches, fuse_masks):
            (sharer_cache,), (fuse_mask,) = sharer_caches, fuse_masks
            return fuse(params, sharer_cache, receiver_cache, fuse_mask, noise)

        return sharer_caches, apply_fuser

    replica_axis, row_axis = sharding.BATCH_AXES  # ("data", "fsdp")
    replicas = mesh.shape[replica_axis]

    def split(x, axis):
        """[..., B, ...] -> [replicas, ..., B / replicas, ...]: replicas over "data", rows over "fsdp"."""
        x = jnp.moveaxis(x.reshape(x.shape[:axis] + (replicas, -1) + x.shape[axis + 1:]), axis, 0)
        spec = [replica_axis] + [None] * (x.ndim - 1)
        spec[axis + 1] = row_axis
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))

    def merge(x, axis):
        x = jnp.moveaxis(x, 0, axis)
        return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])

    def split_cache(cache):
        return dataclasses.replace(cache, k=split(cache.k, 1), v=split(cache.v, 1), valid=split(cache.valid, 0))

    cache_axes = KVCache(k=0, v=0, valid=0, end=None)
    noise_rows = None if noise is None else FuserNoise(split(noise.gate_uniform, 2), split(noise.dropout_keys, 0))

    def apply_fuser(receiver_cache, replica_sharer_caches, fuse_masks):
        (replica_sharer_cache,), (fuse_mask,) = replica_sharer_caches, fuse_masks
        fused = jax.vmap(fuse, in_axes=(0, cache_axes, cache_axes, 0, 0), out_axes=cache_axes,
                         spmd_axis_name=replica_axis)(
            params, replica_sharer_cache, split_cache(receiver_cache), split(fuse_mask, 0), noise_rows)
        return dataclasses.replace(fused, k=merge(fused.k, 1), v=merge(fused.v, 1), valid=merge(fused.valid, 0))

    return [split_cache(c) for c in sharer_caches], apply_fuser


# ------------------------------------------------------------------------------------------------
# Settings, optimizer and steps.


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """AdamW with linear warmup and decay (`config.optim`; each field is described there)."""

    lr: float
    warmup_fraction: float
    b1: float
    b2: float
    eps: float
    weight_decay: float
    clip_norm: float
    decay_gates: bool = True
    gate_lr_multiplier: float = 1.0
    warmup_from_zero: bool = False

    @classmethod
    def from_config(cls, optim: ml_collections.ConfigDict) -> "OptimSettings":
        """From `config.optim`; a field it lacks (a config older than the field) takes its default."""
        return cls(**{f.name: optim[f.name] for f in dataclasses.fields(cls)
                      if f.name in optim or f.default is dataclasses.MISSING})


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What the train step reads of a config: the optimizer, the loss's normalisation, the parameters'
    dtype and whether the train state is sharded (`config.train`, `config.mesh`; described there)."""

    optim: OptimSettings
    loss_normalization: str = "tokens"
    reference_group_size: int = 4
    param_dtype: str = "float32"
    shard_fuser: bool = True

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "StepSettings":
        t = config.train
        return cls(OptimSettings.from_config(config.optim), loss_normalization=t.loss_normalization,
                   reference_group_size=t.reference_group_size, param_dtype=t.param_dtype,
                   shard_fuser=config.mesh.shard_fuser)


def make_schedule(optim: OptimSettings, total_steps: int) -> optax.Schedule:
    """Linear warmup over `warmup_fraction` of the steps, then linear decay toward 0 at `total_steps`.

    As HF's "linear" scheduler, shifted by one step so that the first update is not wasted at lr 0:
    step k (0-based) uses lr * (k + 1) / warmup while warming up; `optim.warmup_from_zero` keeps HF's
    (and so upstream's) lr * k / warmup.
    """
    warmup = int(optim.warmup_fraction * total_steps)
    shift = 0.0 if optim.warmup_from_zero else 1.0

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        rising = optim.lr * (step + shift) / max(warmup, 1)
        falling = optim.lr * (total_steps - step) / max(total_steps - warmup, 1)
        return jnp.where(step < warmup, rising, jnp.clip(falling, 0.0, optim.lr))

    return schedule


def make_optimizer(optim: OptimSettings, total_steps: int) -> optax.GradientTransformation:
    def is_gate(path) -> bool:
        return "gate_logit" in jax.tree_util.keystr(path)

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: optim.decay_gates or not is_gate(path), params)

    stages = [optax.clip_by_global_norm(optim.clip_norm),
              optax.adamw(make_schedule(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                          weight_decay=optim.weight_decay, mask=decay_mask)]
    if optim.gate_lr_multiplier != 1:
        # The gates' own learning rate, as a parameter group of their own would have (decay included).
        # Left out at 1, so the optimizer state keeps the structure older checkpoints have.
        gates = lambda params: jax.tree_util.tree_map_with_path(lambda path, _: is_gate(path), params)  # noqa: E731
        stages.append(optax.masked(optax.scale(optim.gate_lr_multiplier), gates))
    return optax.chain(*stages)


def loss_weights(loss_mask: jax.Array, normalization: str, group_size: int = 4) -> jax.Array:
    """float32 [micro-batches, B]: each row's weight in the step's loss (its summed answer-token losses
    times this), from the answer masks [micro-batches, B, R] of one step.

    "tokens": 1 / the step's answer tokens (every token counts the same). "reference": upstream's
    normalisation (docs/upstream_reference.md §4.4): the token mean of each group of `group_size` consecutive
    rows (upstream's per-GPU micro-batch), averaged over the groups, at any micro-batch size.
    """
    counts = loss_mask.sum(axis=-1).astype(jnp.float32)
    if normalization == "tokens":
        return jnp.full(counts.shape, 1.0) / jnp.maximum(counts.sum(), 1.0)
    groups = counts.reshape(-1, group_size)
    per_group = 1.0 / (jnp.maximum(groups.sum(axis=1, keepdims=True), 1.0) * groups.shape[0])
    return jnp.broadcast_to(per_group, groups.shape).reshape(counts.shape)


def train_step(state: TrainState, frozen, batch, base_key, *, graphdefs, tx, fuser_config, normalization,
               schedule, param_shardings, group_size: int = 4):
    """One optimizer step over `batch` ([micro_batches, B, ...]); returns the new state and metrics.

    Each data-parallel replica (the devices of one index along the mesh's "data" axis) accumulates
    the gradients of its rows, sharded like the parameters; the replicas are summed once, after
    the last micro-batch. So data parallelism all-reduces the fuser's gradients once per optimizer
    step, not once per micro-batch (FSDP's reduce-scatter within a replica stays per micro-batch).
    """
    mesh = jax.tree.leaves(param_shardings)[0].mesh
    # Traced under the mesh, so that the attention kernels run per device (`attention._per_device_rows`).
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return _train_step(state, frozen, batch, base_key, mesh, graphdefs=graphdefs, tx=tx,
                           fuser_config=fuser_config, normalization=normalization, schedule=schedule,
                           param_shardings=param_shardings, group_size=group_size)


def _train_step(state: TrainState, frozen, batch, base_key, mesh, *, graphdefs, tx, fuser_config, normalization,
                schedule, param_shardings, group_size):
    temperature = gate_temperature(state.step, fuser_config)
    replica_axis = sharding.BATCH_AXES[0]
    replicas = mesh.shape[replica_axis]
    key = jax.random.fold_in(base_key, state.step)
    counts = batch.loss_mask.sum(axis=(1, 2)).astype(jnp.float32)
    weights = loss_weights(batch.loss_mask, normalization, group_size)  # [micro-batches, B]
    fuser: Fuser = nnx.merge(graphdefs[2], state.params)

    def by_replica(x, spec):  # [replicas, ...]: one copy (or one gradient) per replica, sharded like the parameters
        return jax.lax.with_sharding_constraint(
            jnp.broadcast_to(x, (replicas,) + x.shape), NamedSharding(mesh, P(replica_axis, *spec.spec)))

    replica_params = jax.tree.map(by_replica, state.params, param_shardings)

    def scaled(replica_params, mb, noise, row_weights):
        row_losses, _ = micro_batch_loss(replica_params, frozen, mb, noise, temperature, graphdefs=graphdefs,
                                         mesh=mesh)
        weighted = (row_losses * row_weights).reshape(replicas, -1).sum(axis=1)
        return weighted.sum(), weighted

    def accumulate(grads_sum, xs):
        mb, mb_key, row_weights = xs
        # The noise of the whole micro-batch: the same numbers on any number of devices.
        rows, width = mb.prefix_tokens.shape
        if fuser_config.include_response:  # the answer's columns are fused too
            width += mb.suffix_tokens.shape[1]
        noise = fuser.sample_noise(mb_key, rows, width)
        (_, weighted), grads = jax.value_and_grad(scaled, has_aux=True)(replica_params, mb, noise, row_weights)
        return jax.tree.map(jnp.add, grads_sum, grads), weighted

    keys = jax.random.split(key, counts.shape[0])
    zeros = jax.tree.map(lambda p, s: by_replica(jnp.zeros_like(p), s), state.params, param_shardings)
    grads_by_replica, weighted = jax.lax.scan(accumulate, zeros, (batch, keys, weights))
    grads = jax.tree.map(lambda g: g.sum(axis=0), grads_by_replica)  # the one cross-replica reduction
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    loss = weighted.sum()  # weighted: [micro-batches, replicas]
    metrics = {
        "loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
        "temperature": temperature, "answer_tokens": counts.sum(),
        "gate_logits": state.params["projectors"]["gate_logit"] if "gate_logit" in state.params["projectors"]
        else jnp.zeros(()),
    }
    return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(params, frozen, batch, *, graphdefs):
    """(summed loss, token count) over `batch` with inference-mode fusion (hard gates, no dropout)."""

    def one(carry, mb):
        row_losses, count = micro_batch_loss(params, frozen, mb, None, None, graphdefs=graphdefs)
        return (carry[0] + row_losses.sum(), carry[1] + count), None

    (loss, count), _ = jax.lax.scan(one, (jnp.zeros(()), jnp.zeros((), jnp.int32)), batch)
    return loss, count


@dataclasses.dataclass
class Steps:
    graphdefs: tuple
    frozen: tuple
    state: TrainState
    step_fn: Any
    eval_fn: Any


def build_steps(settings: StepSettings, mesh, receiver: Decoder, sharer: Decoder, fuser: Fuser,
                total_steps: int) -> Steps:
    """The initial train state (placed on `mesh`) and the jitted train and eval steps."""
    receiver_def, receiver_state = nnx.split(receiver)
    sharer_def, sharer_state = nnx.split(sharer)
    fuser_def, fuser_state = nnx.split(fuser)
    params = nnx.to_pure_dict(fuser_state)
    if settings.param_dtype == "bfloat16":
        # As upstream: the parameters themselves in bfloat16, so gradients and Adam's moments
        # (`zeros_like` the parameters) are too, and updates below a bfloat16 step are lost.
        params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    tx = make_optimizer(settings.optim, total_steps)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    state_sharding = train_state_shardings(mesh, tx, state, shard_fuser=settings.shard_fuser)
    state = jax.device_put(state, state_sharding)
    graphdefs = (receiver_def, sharer_def, fuser_def)
    step_fn = jit_train_step(settings, graphdefs, tx, fuser.config, total_steps, state_sharding)
    eval_fn = jax.jit(functools.partial(eval_step, graphdefs=graphdefs))
    return Steps(graphdefs, (receiver_state, sharer_state), state, step_fn, eval_fn)


def train_state_shardings(mesh, tx, state: TrainState, *, shard_fuser: bool) -> TrainState:
    """Where the train state lives (`state` may be abstract): the fuser's parameters and Adam moments
    by the logical axis rules when `shard_fuser`, else replicated."""
    params = sharding.tree_shardings(state.params, mesh, shard=shard_fuser)
    return TrainState(sharding.replicated(mesh), params,
                      sharding.optimizer_state_shardings(tx, state.opt_state, params, mesh))


def jit_train_step(settings: StepSettings, graphdefs, tx, fuser_config, total_steps: int,
                   state_sharding: TrainState):
    """The jitted `train_step` (state donated): the same placement in and out of every step, so the
    step compiles once per batch shape."""
    return jax.jit(
        functools.partial(train_step, graphdefs=graphdefs, tx=tx, fuser_config=fuser_config,
                          normalization=settings.loss_normalization, group_size=settings.reference_group_size,
                          schedule=make_schedule(settings.optim, total_steps), param_shardings=state_sharding.params),
        out_shardings=(state_sharding, None), donate_argnums=(0,))
