"""Training the fuser: the jitted train/eval steps and the loop around them.

Only the fuser is trained. Per micro-batch:
    1. receiver and sharer run the prompt prefix, KV only, outside the gradient;
    2. inside `value_and_grad` w.r.t. the fuser parameters: fuse (sampled gates, dropout), then the
       receiver runs the suffix (last instruction token + answer) on the fused cache, and the loss
       is the summed next-token cross-entropy of the answer tokens.
Micro-batches are scanned inside one jitted step; each device accumulates the gradients of its rows
and the devices reduce them once per step. Gradients are normalised by the global count of answer
tokens (or, optionally, upstream's mean of micro-batch means), clipped, and applied by AdamW.
The frozen weights are closed over, never differentiated, never in the optimizer, never saved.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from c2c_jax import build, cli, sharding
from c2c_jax.alignment import pad_id_of
from c2c_jax.checkpoint import TrainCheckpointer, export_upstream_fuser, load_fuser, save_fuser
from c2c_jax.controls import substitute_sharer_cache
from c2c_jax.fuser import Fuser, FuserNoise, gate_temperature
from c2c_jax.models import Decoder, KVCache
from c2c_jax.pipeline import fuse_in_sections, kv_pass

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


def _prefix_caches(receiver: Decoder, sharer: Decoder, fuser_depth: int, mb) -> tuple[KVCache, KVCache]:
    """The receiver's prefix cache and the sharer's, the latter moved onto the receiver's columns."""
    # Each model's real tokens come first in its row (`data.TrainBatch`): causality alone keeps them
    # from the padding after them, so both passes run without a mask.
    receiver_cache = kv_pass(receiver, mb.prefix_tokens, mb.prefix_positions, None, receiver.config.num_layers)
    receiver_cache = dataclasses.replace(receiver_cache, valid=mb.prefix_valid)
    sharer_cache = kv_pass(sharer, mb.sharer_prefix_tokens, mb.sharer_prefix_positions, None, fuser_depth)
    columns = mb.sharer_columns
    on_receiver_columns = columns[None, :, :, None, None]  # [layers, B, S, kv_heads, head_dim]
    sharer_cache = KVCache(k=jnp.take_along_axis(sharer_cache.k, on_receiver_columns, axis=2),
                           v=jnp.take_along_axis(sharer_cache.v, on_receiver_columns, axis=2),
                           valid=jnp.take_along_axis(mb.sharer_prefix_valid, columns, axis=1), end=sharer_cache.end)
    return jax.lax.stop_gradient((receiver_cache, sharer_cache))


def _response_caches(receiver: Decoder, sharer: Decoder, fuser_depth: int, mb) -> tuple[KVCache, KVCache, jax.Array]:
    """Decode-time fusion's unfused receiver cache and sharer cache over prefix and answer columns
    ([B, P + R]), and the columns to fuse: the prefix's fused ones and every real answer token."""
    if mb.fused_sections != 1 or mb.trailing_section:
        raise ValueError("decode-time fusion (fuser.include_response) trains on chats whose every prefix column is "
                         "fused, as for a sharer with the receiver's tokenizer; token-aligned pairs are not supported")
    tokens = jnp.concatenate([mb.prefix_tokens, mb.suffix_tokens], axis=1)
    positions = jnp.concatenate([mb.prefix_positions, mb.suffix_positions], axis=1)
    valid = jnp.concatenate([mb.prefix_valid, mb.suffix_valid], axis=1)
    # The sharer reads the receiver's ids and positions (the same tokenizer, no alignment pads).
    receiver_cache = kv_pass(receiver, tokens, positions, valid, receiver.config.num_layers)
    sharer_cache = kv_pass(sharer, tokens, positions, valid, fuser_depth)
    fuse_mask = jnp.concatenate([mb.fuse_mask, mb.suffix_valid], axis=1)
    return (*jax.lax.stop_gradient((receiver_cache, sharer_cache)), fuse_mask)


def micro_batch_loss(params, frozen, mb, noise, temperature, *, graphdefs, mesh=None):
    """(answer loss of every row [B], answer-token count) of one micro-batch; differentiable in `params`.

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
    if config.include_response:
        receiver_cache, sharer_cache, fuse_mask = _response_caches(receiver, sharer, config.sharer_depth, mb)
    else:
        receiver_cache, sharer_cache = _prefix_caches(receiver, sharer, config.sharer_depth, mb)
        fuse_mask = mb.fuse_mask
    if config.sharer_input != "real":
        # The trained control: the same recipe with the sharer's K/V withheld, through the function the
        # evaluation controls use. Its noise comes from the micro-batch's fuser noise (fixed in eval).
        key = jax.random.key(0) if noise is None else jax.random.fold_in(noise.dropout_keys[0], 1)
        sharer_cache = substitute_sharer_cache(sharer_cache, config.sharer_input, key=key)

    def fuse(p, sharer_cache, receiver_cache, fuse_mask, noise):
        return nnx.merge(fuser_def, p)(sharer_cache, receiver_cache, fuse_mask, noise=noise, temperature=temperature)

    if mesh is None:
        def fuse_pass(receiver_cache, in_pass):
            return fuse(params, sharer_cache, receiver_cache, fuse_mask & in_pass, noise)
    else:
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
        replica_sharer_cache = split_cache(sharer_cache)

        def fuse_pass(receiver_cache, in_pass):
            fused = jax.vmap(fuse, in_axes=(0, cache_axes, cache_axes, 0, 0), out_axes=cache_axes,
                             spmd_axis_name=replica_axis)(
                params, replica_sharer_cache, split_cache(receiver_cache), split(fuse_mask & in_pass, 0), noise_rows)
            return dataclasses.replace(fused, k=merge(fused.k, 1), v=merge(fused.v, 1), valid=merge(fused.valid, 0))

    if config.include_response:
        # Decode-time fusion (c2c_reference.md §2.6): the answer's K/V are fused too, from the
        # receiver's unfused pass, and the answer pass attends to its fused K/V in every layer.
        fused = fuse_pass(receiver_cache, jnp.ones(fuse_mask.shape, bool))
        p = mb.prefix_tokens.shape[1]
        prefix = KVCache(k=fused.k[:, :, :p], v=fused.v[:, :, :p], valid=mb.prefix_valid, end=jnp.asarray(p))
        hidden = receiver.extend(mb.suffix_tokens, mb.suffix_positions, prefix,
                                 held=(fused.k[:, :, p:], fused.v[:, :, p:]))
        row_losses = answer_row_losses(receiver, hidden, mb.targets, mb.loss_mask.astype(jnp.float32))
        return row_losses, mb.loss_mask.sum()
    # Upstream's sections (c2c_reference.md §2.3): each run of fused columns is fused from receiver
    # K/V that saw the runs before it fused; a trailing template then runs on the fused cache.
    # One pass and one fusion when the whole prefix is fused (a sharer with the receiver's tokenizer).
    passes = mb.fused_sections
    fused = fuse_in_sections(receiver, mb.prefix_tokens, mb.prefix_positions, None, receiver_cache, fuse_pass,
                             mb.prefix_section, passes)
    if mb.trailing_section:
        rewound = dataclasses.replace(fused, end=jnp.zeros_like(fused.end))
        _, rerun = receiver(mb.prefix_tokens, mb.prefix_positions, rewound, output="kv",
                            held=mb.prefix_section < passes)
        fused = dataclasses.replace(rerun, valid=fused.valid, end=fused.end)
    # The prefix's real columns come first and the answer's padding follows its real tokens
    # (`data.collate`), as `extend` requires.
    hidden = receiver.extend(mb.suffix_tokens, mb.suffix_positions, fused)
    row_losses = answer_row_losses(receiver, hidden, mb.targets, mb.loss_mask.astype(jnp.float32))
    return row_losses, mb.loss_mask.sum()


# ------------------------------------------------------------------------------------------------
# Optimizer and steps.


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup over `warmup_fraction` of the steps, then linear decay toward 0 at `total_steps`.

    As HF's "linear" scheduler, shifted by one step so that the first update is not wasted at lr 0:
    step k (0-based) uses lr * (k + 1) / warmup while warming up; `optim.warmup_from_zero` keeps HF's
    (and so upstream's) lr * k / warmup.
    """
    warmup = int(optim.warmup_fraction * total_steps)
    shift = 0.0 if optim.get("warmup_from_zero", False) else 1.0

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        rising = optim.lr * (step + shift) / max(warmup, 1)
        falling = optim.lr * (total_steps - step) / max(total_steps - warmup, 1)
        return jnp.where(step < warmup, rising, jnp.clip(falling, 0.0, optim.lr))

    return schedule


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
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
    normalisation (c2c_reference.md §4.4): the token mean of each group of `group_size` consecutive
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


# ------------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class Run:
    """Everything a training run holds between steps (built by `setup`, used by `train_and_evaluate`)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    graphdefs: tuple
    frozen: tuple
    state: TrainState
    step_fn: Any
    eval_fn: Any
    train_iter: Any
    eval_examples: list
    total_steps: int
    fuser_template: Fuser
    tokenizers: tuple
    data_stats: dict


def setup(config: ml_collections.ConfigDict) -> Run:
    from c2c_jax import data as data_lib
    from c2c_jax.config import resolve_micro_batch, resolve_reproduce

    config = resolve_reproduce(config)
    check_train_settings(config)
    sharding.maybe_initialize_distributed()
    mesh = sharding.make_mesh(config.mesh)
    config = resolve_micro_batch(config, mesh.size, sharding.platform_of(mesh))
    n_devices = mesh.size
    micro, batch_size = config.train.micro_batch_size, config.train.batch_size
    if batch_size % micro:
        raise ValueError(f"train.batch_size {batch_size} is not a multiple of train.micro_batch_size {micro}")
    if micro % n_devices:
        raise ValueError(f"train.micro_batch_size {micro} must be divisible by the {n_devices} devices")
    data_lib.check_source(config.data.source)
    build.check_before_loading(config, [(config.fuser.init_from, config.sharer.path)] if config.fuser.init_from else [])
    param_sharding = sharding.param_sharding_fn(mesh, config.mesh.shard_frozen)
    receiver, receiver_tok, sharer, sharer_tok = build.load_pair(
        config, param_sharding=param_sharding, remat=config.train.remat, platform=sharding.platform_of(mesh))
    fuser = build.new_fuser(config, receiver, sharer)

    cli.phase(f"reading and tokenizing the training data ({config.data.source})")
    train_examples, eval_examples, stats = data_lib.load_train_data(
        config, receiver_tok, sharer_tok, receiver.config.vocab_size, sharer.config.vocab_size)
    train_iter = data_lib.batch_iterator(
        config, train_examples, pad_id=pad_id_of(receiver_tok), sharer_pad_id=pad_id_of(sharer_tok),
        process_index=jax.process_index(), process_count=jax.process_count())
    steps_per_epoch = train_iter.num_steps_per_epoch()
    total_steps = config.train.max_steps if config.train.max_steps > 0 else config.train.epochs * steps_per_epoch
    if total_steps <= 0:
        raise ValueError(f"no training steps: {len(train_examples)} examples do not fill one batch of {batch_size}")

    steps = build_steps(config, mesh, receiver, sharer, fuser, total_steps)
    return Run(config, mesh, steps.graphdefs, steps.frozen, steps.state, steps.step_fn, steps.eval_fn, train_iter,
               eval_examples, total_steps, fuser, (receiver_tok, sharer_tok), stats)


def check_train_settings(config: ml_collections.ConfigDict) -> None:
    """Clear errors for bad precision, normalisation and shuffle settings (before any model loads)."""
    t = config.train
    if t.patience < 0:
        raise ValueError(f"train.patience must be >= 0 (0: no early stopping), not {t.patience}")
    if t.patience and not config.data.eval_fraction:
        raise ValueError("train.patience stops on the held-out loss, but data.eval_fraction is 0: nothing is held out")
    if t.param_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"train.param_dtype must be 'float32' or 'bfloat16', not {t.param_dtype!r}")
    if t.loss_normalization not in ("tokens", "reference"):
        raise ValueError(f"train.loss_normalization must be 'tokens' or 'reference', not {t.loss_normalization!r}")
    if t.loss_normalization == "reference" and (t.reference_group_size < 1
                                                or t.batch_size % t.reference_group_size):
        raise ValueError(f"train.batch_size {t.batch_size} is not a multiple of train.reference_group_size "
                         f"{t.reference_group_size} (the sequences of one token mean in the 'reference' loss)")
    if config.data.shuffle not in ("bucketed", "uniform"):
        raise ValueError(f"data.shuffle must be 'bucketed' or 'uniform', not {config.data.shuffle!r}")


@dataclasses.dataclass
class Steps:
    graphdefs: tuple
    frozen: tuple
    state: TrainState
    step_fn: Any
    eval_fn: Any


def build_steps(config: ml_collections.ConfigDict, mesh, receiver: Decoder, sharer: Decoder, fuser: Fuser,
                total_steps: int) -> Steps:
    """The initial train state (placed on `mesh`) and the jitted train and eval steps."""
    receiver_def, receiver_state = nnx.split(receiver)
    sharer_def, sharer_state = nnx.split(sharer)
    fuser_def, fuser_state = nnx.split(fuser)
    params = nnx.to_pure_dict(fuser_state)
    if config.train.param_dtype == "bfloat16":
        # As upstream: the parameters themselves in bfloat16, so gradients and Adam's moments
        # (`zeros_like` the parameters) are too, and updates below a bfloat16 step are lost.
        params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    tx = make_optimizer(config.optim, total_steps)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    state_sharding = train_state_shardings(config, mesh, tx, state)
    state = jax.device_put(state, state_sharding)
    graphdefs = (receiver_def, sharer_def, fuser_def)
    step_fn = jit_train_step(config, graphdefs, tx, fuser.config, total_steps, state_sharding)
    eval_fn = jax.jit(functools.partial(eval_step, graphdefs=graphdefs))
    return Steps(graphdefs, (receiver_state, sharer_state), state, step_fn, eval_fn)


def train_state_shardings(config: ml_collections.ConfigDict, mesh, tx, state: TrainState) -> TrainState:
    """Where the train state lives (`state` may be abstract): the fuser's parameters and Adam moments
    by the logical axis rules when `mesh.shard_fuser`, else replicated."""
    params = sharding.tree_shardings(state.params, mesh, shard=config.mesh.shard_fuser)
    return TrainState(sharding.replicated(mesh), params,
                      sharding.optimizer_state_shardings(tx, state.opt_state, params, mesh))


def jit_train_step(config: ml_collections.ConfigDict, graphdefs, tx, fuser_config, total_steps: int,
                   state_sharding: TrainState):
    """The jitted `train_step` (state donated): the same placement in and out of every step, so the
    step compiles once per batch shape."""
    return jax.jit(
        functools.partial(train_step, graphdefs=graphdefs, tx=tx, fuser_config=fuser_config,
                          normalization=config.train.loss_normalization,
                          group_size=config.train.reference_group_size,
                          schedule=make_schedule(config.optim, total_steps), param_shardings=state_sharding.params),
        out_shardings=(state_sharding, None), donate_argnums=(0,))


def _batch_tokens(batch) -> int:
    return int(np.sum(batch.prefix_valid) + np.sum(batch.suffix_valid))


def evaluate_loss(run: Run, params) -> float:
    from c2c_jax import data as data_lib

    if not run.eval_examples:
        return float("nan")
    c = run.config
    eval_config = c.copy_and_resolve_references()
    eval_config.train.batch_size = c.train.micro_batch_size  # one micro-batch per eval step
    it = data_lib.batch_iterator(
        eval_config, run.eval_examples, pad_id=pad_id_of(run.tokenizers[0]),
        sharer_pad_id=pad_id_of(run.tokenizers[1]), process_index=jax.process_index(),
        process_count=jax.process_count(), seed=c.seed + 1)
    n = min(c.train.eval_batches, max(it.num_steps_per_epoch(), 1))
    total_loss, total_count = 0.0, 0
    for _ in range(n):
        batch = sharding.place_batch(next(it), run.mesh, batch_axis=1)
        loss, count = jax.device_get(run.eval_fn(params, run.frozen, batch))
        total_loss, total_count = total_loss + float(loss), total_count + int(count)
    return total_loss / max(total_count, 1)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains a fuser; checkpoints under `workdir/checkpoints`, exports `workdir/final`. Resumes if it can."""
    from tqdm import tqdm

    if str(workdir).startswith(("gs://", "s3://", "http://", "https://")):
        raise ValueError(f"workdir {workdir} is a URL; c2c_jax writes through the local filesystem. Mount the bucket "
                         "(gcsfuse, as launch/tpu_vm.sh does on every TPU worker) and pass the mount path.")
    workdir = Path(workdir)
    run = setup(config)
    config = run.config  # with `reproduce` applied
    is_main = jax.process_index() == 0
    checkpointer = TrainCheckpointer(workdir / "checkpoints", keep=config.ckpt.keep,
                                     async_save=config.ckpt.async_save)
    resumed = checkpointer.restore_newest_intact(run.state)
    best = None  # {"step", "eval_loss"} of the lowest held-out loss so far
    if resumed is not None:
        run.state, meta, _ = resumed
        run.train_iter.restore(meta["data"])
        best = meta.get("best")
        cli.phase(f"resuming from the checkpoint of step {int(run.state.step)}")
    elif is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    writer = _summary_writer(workdir) if is_main else None
    start = int(run.state.step)
    if is_main:
        stats, buckets = run.data_stats, run.train_iter.bucket_counts
        cli.phase(f"data {config.data.source!r}: {stats['train']} training and {stats['eval']} held-out examples "
                  f"of {stats['rows']} rows; {len(buckets)} batch shape(s) (prompt x answer tokens: "
                  + ", ".join(f"{p}x{a}" for p, a in sorted(buckets)) + ")")
        cli.phase(f"fuser: {run.fuser_template.config.num_params():,} parameters; steps {start + 1}-{run.total_steps}")

    base_key = jax.random.key(config.seed)
    summary_file = workdir / "train_summary.json"
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())
        if start >= run.total_steps or summary.get("stopped_at") == start:
            log.info("%s already finished at step %d; nothing to do", workdir, start)
            return summary
    bar = tqdm(total=run.total_steps, initial=start, disable=not is_main, dynamic_ncols=True, desc="train",
               smoothing=0.1)
    history, compiled = [], {}
    patience, stopped_at = config.train.patience, None
    tokens_since, time_since = 0, time.perf_counter()

    def pause(seconds: float) -> None:  # compiling and held-out evaluation stay out of the reported rates
        nonlocal time_since
        time_since += seconds
        if not bar.disable:
            bar.unpause()

    def step_program(batch):
        """The train step compiled for this batch shape, announced, and kept out of the bar's rate."""
        shape = (batch.prefix_tokens.shape[-1], batch.suffix_tokens.shape[-1])
        if shape not in compiled:
            cli.phase(f"compiling the train step for {shape[0]} prompt + {shape[1]} answer tokens "
                      f"(once per batch shape; {len(compiled)} compiled so far)")
            began = time.perf_counter()
            compiled[shape] = run.step_fn.lower(run.state, run.frozen, batch, base_key).compile()
            took = time.perf_counter() - began
            cli.phase(f"compiled in {took:.0f} s")
            pause(took)
        return compiled[shape]

    for step in range(start, run.total_steps):
        host_batch = next(run.train_iter)
        tokens_since += _batch_tokens(host_batch) * jax.process_count()
        batch = sharding.place_batch(host_batch, run.mesh, batch_axis=1)
        run.state, metrics = step_program(batch)(run.state, run.frozen, batch, base_key)
        done = step + 1
        jax.block_until_ready(metrics["loss"])  # the bar counts finished steps, not queued ones
        bar.update(1)
        if done % config.train.log_every == 0 or done == run.total_steps:
            m = jax.device_get(metrics)
            elapsed = time.perf_counter() - time_since
            tokens_per_s = tokens_since / max(elapsed, 1e-9)
            tokens_since, time_since = 0, time.perf_counter()
            record = {"step": done, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                      "lr": float(m["lr"]), "temperature": float(m["temperature"]), "tokens_per_s": tokens_per_s}
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            if writer:
                for key in ("loss", "grad_norm", "lr", "temperature", "tokens_per_s"):
                    writer.add_scalar(f"train/{key}", record[key], done)
                for (layer, branch), logit in np.ndenumerate(np.asarray(m["gate_logits"]).reshape(-1, 2)):
                    writer.add_scalar(f"gates/layer{layer:02d}_{'kv'[branch]}", float(logit), done)
        if (done % config.train.eval_every == 0 or done == run.total_steps) and run.eval_examples:
            began = time.perf_counter()
            eval_loss = evaluate_loss(run, run.state.params)
            pause(time.perf_counter() - began)
            if is_main:
                cli.phase(f"step {done}: held-out loss {eval_loss:.4f} (train loss {history[-1]['loss']:.4f})"
                          if history else f"step {done}: held-out loss {eval_loss:.4f}")
            if history:
                history[-1]["eval_loss"] = eval_loss
            if writer:
                writer.add_scalar("eval/loss", eval_loss, done)
            if best is None or eval_loss < best["eval_loss"]:
                best = {"step": done, "eval_loss": eval_loss}
                if patience and is_main:
                    save_fuser(nnx.merge(run.graphdefs[2], jax.device_get(run.state.params)), workdir / "best")
            elif patience and (done - best["step"]) // config.train.eval_every >= patience:
                stopped_at = done
                cli.phase(f"step {done}: no lower held-out loss in {patience} evaluations; stopping, keeping "
                          f"the fuser of step {best['step']} (held-out loss {best['eval_loss']:.4f})")
        if done % config.ckpt.every == 0 or done == run.total_steps or stopped_at:
            checkpointer.save(done, run.state, {"data": run.train_iter.state(), "step": done, "best": best})
        if stopped_at:
            break
    bar.close()
    checkpointer.wait()
    shapes = sorted(compiled)
    log.info("compiled %d distinct batch shapes: %s", len(shapes), shapes)

    fuser = nnx.merge(run.graphdefs[2], jax.device_get(run.state.params))
    summary = {"steps": run.total_steps, "history": history, "batch_shapes": shapes, "best": best,
               "stopped_at": stopped_at}
    if is_main:
        if patience and best is not None:  # `final` is the fuser of the lowest held-out loss
            fuser = load_fuser(workdir / "best")
        save_fuser(fuser, workdir / "final")
        if config.ckpt.export_upstream:
            export_upstream_fuser(fuser, workdir / "final_upstream")
        plot_gates(fuser, workdir / "gates.png")
        summary_file.write_text(json.dumps(summary, indent=2))
    if writer:
        writer.close()
    return summary


def _summary_writer(workdir: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # TensorBoard logging is optional
        return None
    return SummaryWriter(str(workdir / "tensorboard"))


def plot_gates(fuser: Fuser, path: Path) -> None:
    """Per-layer gate logits of the K and V branches, open ones highlighted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's plotting backend alone

    if not fuser.config.uses_gate:
        return
    logits = np.asarray(fuser.projectors.gate_logit[...], np.float32)
    layers = np.arange(logits.shape[0])
    fig = Figure(figsize=(max(6, 0.3 * len(layers)), 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for branch, (name, offset, marker) in enumerate((("K", -0.2, "o"), ("V", 0.2, "s"))):
        values = logits[:, branch]
        colors = ["tab:green" if v > 0 else "tab:gray" for v in values]
        ax.bar(layers + offset, values, width=0.4, color=colors, edgecolor="black")
        # A marker at each value, so a logit at (or near) 0 is still seen.
        ax.scatter(layers + offset, values, c=colors, marker=marker, edgecolors="black", zorder=3, label=name)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(layers[:: max(1, len(layers) // 16)])  # whole layer numbers only
    ax.legend(loc="best", fontsize="small")
    ax.set_xlabel("receiver layer")
    ax.set_ylabel("gate logit (open if > 0)")
    ax.set_title(f"fuser gates: {int((logits > 0).sum())} of {logits.size} open at inference (green: logit > 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
