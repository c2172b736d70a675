"""The C2C fuser: maps a sharer's per-layer K/V into the receiver's K/V space.

One projector per receiver layer and per branch (K and V), exactly the reference C2CProjector
(docs/upstream_reference.md §1):

    a = in_proj(concat(flat sharer kv, flat receiver kv))          sharer first
    a = trunk(a)                                                   one FFN block
    P = proj_out(proj_blocks(a))                                   (num_layers - 2) FFN blocks
    alpha = sigmoid(weight_head(weight_block(a)))                  one weight per token and receiver head
    out = receiver + gate * alpha * P                              residual; gate in [0, 1]

FFN block: x + dropout(W2 gelu(W1 rmsnorm(x))), exact GELU, bias-free, RMSNorm eps 1e-6.
Gate: one scalar logit per layer and branch; a Gumbel-sigmoid sample with annealed temperature
in training, hard `logit > 0` at inference.

All projectors have the same shapes, so their parameters are stacked on leading
(receiver layer, branch) axes and run as one vmapped computation instead of 2 x layers small ones
(at inference on large batches, in groups of layers: `INFERENCE_ROWS_AT_ONCE`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from c2c_jax.c2c.controls import check_sharer_input, zeros_like
from c2c_jax.models.config import ModelConfig
from c2c_jax.models.kv_cache import KVCache

GateNoise = Literal["gumbel", "logistic"]
# The reference's AblationProjector levels (docs/upstream_reference.md §1.8) under readable names.
ABLATIONS = {
    "none": 0,  # full C2C: receiver + gate * alpha * P
    "no_weight": 1,  # alpha := 1
    "no_weight_no_gate": 2,  # alpha := 1, gate := 1
    "project": 3,  # paper's "Project" row: the sharer alone is projected, output = P (no residual)
    "fuse": 4,  # paper's "+Fuse" row: gate := 1, output = receiver + alpha * P
}
BRANCHES = ("key", "value")
# All projectors at once hold [layers, 2, B, S, hidden] activations: 12 GiB for 32 prompts of 512 tokens
# at the paper's sizes (24 layers, hidden 1024). Past this many rows (layers x branches x B x S), inference
# runs the layers in groups (`lax.map`), which bounds that to a few hundred MiB per activation while each
# group's matmuls still fill an accelerator. Training keeps every layer's activations for the backward
# pass anyway, so it runs them all at once.
INFERENCE_ROWS_AT_ONCE = 2**17


@dataclasses.dataclass(frozen=True)
class FuserConfig:
    """Shapes and hyper-parameters of a fuser for one (receiver, sharer) pair. Hashable."""

    receiver_layers: int
    receiver_kv_heads: int
    receiver_head_dim: int
    sharer_kv_heads: int
    sharer_head_dim: int
    layer_map: tuple[int, ...]  # sharer layer read by each receiver layer
    hidden_dim: int = 1024
    intermediate_dim: int = 1024
    num_layers: int = 3
    dropout: float = 0.1
    initial_temperature: float = 1.0
    final_temperature: float = 0.001
    anneal_steps: int = 1929
    gate_noise: GateNoise = "gumbel"  # "gumbel": the reference's single-Gumbel form; "logistic": P(open)=sigmoid(logit)
    ablation: str = "none"
    zero_init: bool = False  # zero the output projections so a new fuser starts as the identity
    dtype: str = "bfloat16"  # compute dtype; parameters are always float32
    # What the fuser reads as the sharer's K/V (`controls.substitute_sharer_cache`): "real", or "zeros" /
    # "noise" for the trained control (the same recipe with the sharer withheld), in training and inference.
    sharer_input: str = "real"
    # Decode-time fusion (upstream's `include_response`): the fuser also rewrites the K/V of the
    # unfused suffix and of every generated token, with the sharer decoding in lockstep. A fuser
    # trained this way is only used this way (`c2c.model.C2CModel`).
    include_response: bool = False

    def __post_init__(self):
        check_sharer_input(self.sharer_input, trained=True)
        if self.num_layers < 3:
            raise ValueError(f"fuser num_layers must be >= 3 (got {self.num_layers}), as in the reference")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"unknown fuser ablation {self.ablation!r}; choose one of {', '.join(ABLATIONS)}")
        if self.gate_noise not in ("gumbel", "logistic"):
            raise ValueError(f"unknown gate_noise {self.gate_noise!r}; choose 'gumbel' or 'logistic'")
        if len(self.layer_map) != self.receiver_layers:
            raise ValueError(f"layer_map has {len(self.layer_map)} entries for {self.receiver_layers} receiver layers")

    @property
    def sharer_dim(self) -> int:
        return self.sharer_kv_heads * self.sharer_head_dim

    @property
    def receiver_dim(self) -> int:
        return self.receiver_kv_heads * self.receiver_head_dim

    @property
    def uses_receiver(self) -> bool:
        return ABLATIONS[self.ablation] != 3

    @property
    def uses_weight(self) -> bool:
        return ABLATIONS[self.ablation] in (0, 4)

    @property
    def uses_gate(self) -> bool:
        return ABLATIONS[self.ablation] in (0, 1)

    @property
    def in_dim(self) -> int:
        return self.sharer_dim + (self.receiver_dim if self.uses_receiver else 0)

    @property
    def sharer_depth(self) -> int:
        """Sharer layers its prefix pass must run: up to the deepest mapped one."""
        return max(self.layer_map) + 1

    def num_params(self) -> int:
        """Closed form of docs/upstream_reference.md §1.7 (both branches, all receiver layers)."""
        h, m, out = self.hidden_dim, self.intermediate_dim, self.receiver_dim
        ffn = lambda inner: h + 2 * h * inner  # noqa: E731
        branch = (self.in_dim * h + h) + ffn(m) + (self.num_layers - 2) * ffn(m) + (h * out + out)
        if self.uses_weight:
            branch += ffn(h) + h * self.receiver_kv_heads + self.receiver_kv_heads
        return self.receiver_layers * (2 * branch + (2 if self.uses_gate else 0))


def gate_temperature(step, config: FuserConfig):
    """T0 * (Tf / T0) ** min(step / anneal_steps, 1): geometric decay over `anneal_steps` optimizer steps."""
    t0, tf = config.initial_temperature, config.final_temperature
    progress = jnp.minimum(jnp.asarray(step, jnp.float32) / config.anneal_steps, 1.0)
    return t0 * (tf / t0) ** progress


def _torch_linear_init(fan_in: int):
    # PyTorch's nn.Linear default: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _linear(din, dout, *, bias, dtype, rngs, zero=False):
    init = nnx.initializers.zeros if zero else _torch_linear_init(din)
    return nnx.Linear(din, dout, use_bias=bias, kernel_init=init, bias_init=init, dtype=dtype,
                      param_dtype=jnp.float32, rngs=rngs)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU in PyTorch's form, 0.5 x (1 + erf(x / sqrt 2)), computed in float32.

    `jax.nn.gelu(approximate=False)` goes through erfc, which XLA evaluates with both of its
    branches and an exp; this form is the same function at a fraction of the cost.
    """
    x32 = x.astype(jnp.float32)
    return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * np.float32(1 / np.sqrt(2))))).astype(x.dtype)


class FFNBlock(nnx.Module):
    """y = x + dropout(W2 gelu(W1 rmsnorm(x)))."""

    def __init__(self, dim: int, inner: int, *, dtype, rngs: nnx.Rngs):
        self.norm_scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.w1 = _linear(dim, inner, bias=False, dtype=dtype, rngs=rngs)
        self.w2 = _linear(inner, dim, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x, dropout_rate: float, row_keys):
        """x [B, S, dim]; row_keys: one PRNG key per row [B] (None: no dropout)."""
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6) * self.norm_scale[...]
        y = self.w2(gelu(self.w1(normed.astype(x.dtype))))
        if row_keys is not None and dropout_rate > 0:
            keep = jax.vmap(lambda key: jax.random.bernoulli(key, 1.0 - dropout_rate, y.shape[1:]))(row_keys)
            y = jnp.where(keep, y / (1.0 - dropout_rate), 0).astype(y.dtype)
        return x + y


class BranchProjector(nnx.Module):
    """One (receiver layer, branch) projector; `Fuser` stacks these."""

    def __init__(self, config: FuserConfig, *, rngs: nnx.Rngs):
        c, dtype = config, jnp.dtype(config.dtype)
        h, m = c.hidden_dim, c.intermediate_dim
        self.in_proj = _linear(c.in_dim, h, bias=True, dtype=dtype, rngs=rngs)
        self.trunk = FFNBlock(h, m, dtype=dtype, rngs=rngs)
        self.proj_blocks = nnx.List([FFNBlock(h, m, dtype=dtype, rngs=rngs) for _ in range(c.num_layers - 2)])
        self.proj_out = _linear(h, c.receiver_dim, bias=True, dtype=dtype, rngs=rngs, zero=c.zero_init)
        # Ablations without the head-wise weight or the gate have no parameters for them (as upstream).
        self.weight_block = FFNBlock(h, h, dtype=dtype, rngs=rngs) if c.uses_weight else None
        self.weight_head = _linear(h, c.receiver_kv_heads, bias=True, dtype=dtype, rngs=rngs) if c.uses_weight else None
        self.gate_logit = nnx.Param(jnp.zeros((), jnp.float32)) if c.uses_gate else None
        self.config = config

    def __call__(self, x, row_keys, gate_uniform, temperature):
        """x [B, S, in_dim] (sharer K or V, then receiver's, flattened over heads; compute dtype)
        -> the update [B, S, Ht*Dt]: gate * alpha * P, which `Fuser` adds to the receiver's K or V
        (or, for the "project" ablation, P, which replaces it).

        At inference `row_keys` and `gate_uniform` are None (no dropout, hard gate); in training
        `row_keys` [B] are the rows' dropout keys and `gate_uniform` [B, S, Ht, 1] holds the U[0, 1)
        draws behind the sampled gate.
        """
        c = self.config
        b, s, _ = x.shape
        dtype = jnp.dtype(c.dtype)
        num_keys = len(self.proj_blocks) + 2
        if row_keys is None:
            keys = [None] * num_keys
        else:  # [B, num_keys] -> one [B] array of row keys per FFN block
            keys = list(jnp.moveaxis(jax.vmap(lambda key: jax.random.split(key, num_keys))(row_keys), 1, 0))
        a = self.trunk(self.in_proj(x), c.dropout, keys[0])
        p = a
        for block, block_key in zip(self.proj_blocks, keys[2:]):
            p = block(p, c.dropout, block_key)
        projection = self.proj_out(p).reshape(b, s, c.receiver_kv_heads, c.receiver_head_dim)
        weight = jnp.ones((), dtype)
        if c.uses_weight:
            weight = jax.nn.sigmoid(self.weight_head(self.weight_block(a, c.dropout, keys[1])))[..., None]
        gate = self._gate(gate_uniform, temperature).astype(dtype) if c.uses_gate else jnp.ones((), dtype)
        return (gate * weight * projection).reshape(b, s, -1)

    def _gate(self, uniform, temperature):
        logit = self.gate_logit[...]
        if uniform is None:
            return (logit > 0).astype(jnp.float32)
        if self.config.gate_noise == "gumbel":  # one Gumbel sample, as the reference: P(open | 0) = 0.63
            noise = -jnp.log(-jnp.log(uniform + 1e-20) + 1e-20)
        else:  # logistic noise (difference of two Gumbels): P(open) = sigmoid(logit)
            noise = jnp.log(uniform + 1e-20) - jnp.log1p(-uniform + 1e-20)
        return jax.nn.sigmoid((logit + noise) / temperature)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FuserNoise:
    """The randomness of one training-mode fusion: gate draws and dropout.

    Dropout masks come from one key per row, so slicing both fields along the batch axis (as the
    trainer does to give each device its replica of a micro-batch) leaves every row's noise as it was.
    """

    gate_uniform: jax.Array  # float32 [receiver layers, 2, B, S, receiver kv_heads, 1], U[0, 1)
    dropout_keys: jax.Array  # PRNG keys [B], one per row


class Fuser(nnx.Module):
    """Projectors for every receiver layer and both branches, parameters stacked on (layer, branch)."""

    def __init__(self, config: FuserConfig, *, rngs: nnx.Rngs):
        self.config = config

        @nnx.split_rngs(splits=config.receiver_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def per_layer(rngs):
            @nnx.split_rngs(splits=len(BRANCHES))
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def per_branch(rngs):
                return BranchProjector(config, rngs=rngs)

            return per_branch(rngs)

        self.projectors = per_layer(rngs)

    def gates_open(self) -> jax.Array:
        """bool [receiver layers, 2]: which (layer, branch) gates are open at inference."""
        if not self.config.uses_gate:
            return jnp.ones((self.config.receiver_layers, len(BRANCHES)), bool)
        return self.projectors.gate_logit[...] > 0

    def sample_noise(self, key, batch: int, capacity: int) -> FuserNoise:
        c = self.config
        gate_key, dropout_key = jax.random.split(key)
        shape = (c.receiver_layers, len(BRANCHES), batch, capacity, c.receiver_kv_heads, 1)
        return FuserNoise(jax.random.uniform(gate_key, shape, jnp.float32), jax.random.split(dropout_key, batch))

    def __call__(self, sharer: KVCache, receiver: KVCache, fuse_mask: jax.Array, *,
                 noise: FuserNoise | None = None, temperature=None, receiver_input: bool = True) -> KVCache:
        """Fuses the sharer's cache into the receiver's at the columns where `fuse_mask` [B, S] is True.

        Both caches must be column-aligned (same batch and capacity). Passing `noise` (from
        `sample_noise`) switches on training behaviour: dropout and sampled gates at `temperature`.
        `receiver_input=False` (a control) feeds the projectors zeros in place of the receiver's K/V;
        the update still goes onto the receiver's cache.
        """
        c = self.config
        if noise is not None and temperature is None:
            raise ValueError("training-mode fusion (noise given) needs the gate temperature")
        if sharer.k.shape[1:3] != receiver.k.shape[1:3]:
            raise ValueError(f"sharer cache {sharer.k.shape} and receiver cache {receiver.k.shape} are not "
                             "column-aligned (batch and capacity must match)")
        if sharer.num_layers < c.sharer_depth:
            raise ValueError(f"the fuser reads sharer layer {c.sharer_depth - 1}, the sharer cache has "
                             f"{sharer.num_layers} layers")
        layer_map = jnp.asarray(c.layer_map)
        dtype = jnp.dtype(c.dtype)

        def projector_input(sharer_cache, receiver_cache):
            """[L, B, S, in_dim]: in_proj's input per receiver layer, the mapped sharer layer first."""
            if not receiver_input:
                receiver_cache = zeros_like(receiver_cache)
            parts = [sharer_cache[layer_map]] + ([receiver_cache] if c.uses_receiver else [])
            return jnp.concatenate([p.reshape(*p.shape[:3], -1).astype(dtype) for p in parts], axis=-1)

        # One array, written once: [L, 2 (K, V), B, S, in_dim].
        x = jnp.stack([projector_input(sharer.k, receiver.k), projector_input(sharer.v, receiver.v)], axis=1)

        graphdef, params = nnx.split(self.projectors)
        if noise is None:
            dropout_keys = gate_uniform = None
        else:
            batch = receiver.k.shape[1]
            if noise.dropout_keys.shape != (batch,) or noise.gate_uniform.shape[2] != batch:
                raise ValueError(f"fuser noise for batch {noise.dropout_keys.shape}/{noise.gate_uniform.shape} does "
                                 f"not match a batch of {batch} rows (sample it with `sample_noise`)")
            # Row keys -> [layers, 2, B]: every projector draws its own dropout masks for every row.
            per_row = jax.vmap(lambda key: jax.random.split(key, (c.receiver_layers, len(BRANCHES))))
            dropout_keys = jnp.moveaxis(per_row(noise.dropout_keys), 0, 2)
            gate_uniform = noise.gate_uniform

        def project(p, x, k, u):
            return nnx.merge(graphdef, p)(x, k, u, temperature)

        axis = None if noise is None else 0
        project_layer = jax.vmap(project, in_axes=(0, 0, axis, axis))  # both branches of one receiver layer
        rows_per_layer = len(BRANCHES) * x.shape[2] * x.shape[3]
        layers_at_once = max(1, INFERENCE_ROWS_AT_ONCE // rows_per_layer)
        if noise is None and layers_at_once < c.receiver_layers:
            updates = jax.lax.map(lambda px: project_layer(*px, None, None), (params, x), batch_size=layers_at_once)
        else:
            updates = jax.vmap(project_layer, in_axes=(0, 0, axis, axis))(params, x, dropout_keys, gate_uniform)
        updates = updates.reshape(x.shape[:-1] + (c.receiver_kv_heads, c.receiver_head_dim))
        select = fuse_mask[None, :, :, None, None]

        def apply(cached, update):
            # The residual add and the column selection in one pass over the cache.
            fused = cached.astype(update.dtype) + update if c.uses_receiver else update
            return jnp.where(select, fused.astype(cached.dtype), cached)

        return dataclasses.replace(receiver, k=apply(receiver.k, updates[:, 0]), v=apply(receiver.v, updates[:, 1]))


def count_params(fuser: Fuser) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(fuser, nnx.Param)))


class FuserCheckpointError(ValueError):
    """A fuser checkpoint is incomplete, corrupt, or belongs to another model pair."""


def check_pair(config: FuserConfig, receiver: ModelConfig, sharer: ModelConfig, source: str = "fuser") -> None:
    """Raises unless the fuser's shapes fit this (receiver, sharer) pair."""
    expected = (receiver.num_layers, receiver.num_kv_heads, receiver.head_dim, sharer.num_kv_heads, sharer.head_dim)
    actual = (config.receiver_layers, config.receiver_kv_heads, config.receiver_head_dim, config.sharer_kv_heads,
              config.sharer_head_dim)
    if expected != actual or config.sharer_depth > sharer.num_layers:
        raise FuserCheckpointError(
            f"{source} belongs to another model pair: it fuses a sharer with {config.sharer_kv_heads} KV heads x "
            f"{config.sharer_head_dim} (reading up to layer {config.sharer_depth - 1}) into a {config.receiver_layers}-layer "
            f"receiver with {config.receiver_kv_heads} KV heads x {config.receiver_head_dim}; the given receiver has "
            f"{receiver.num_layers} layers with {receiver.num_kv_heads} x {receiver.head_dim} and the sharer "
            f"{sharer.num_layers} layers with {sharer.num_kv_heads} x {sharer.head_dim}")


def inference_copy(fuser: Fuser) -> Fuser:
    """The fuser with parameters stored in its compute dtype.

    Training keeps float32 master weights; at inference, casting ~0.5B parameters to bfloat16 on
    every call would cost more memory traffic than the fusion's matmuls themselves.
    """
    graphdef, state = nnx.split(fuser)
    dtype = jnp.dtype(fuser.config.dtype)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dtype), state))


