"""One generic decoder for Qwen2/2.5, Qwen3, Llama 3.x and other Llama-architecture models.

The families differ only in flags of `ModelConfig`: q/k/v bias (Qwen2), per-head q/k RMSNorm and an
explicit head_dim (Qwen3), llama3 RoPE scaling and tied embeddings (Llama 3.2). Layer parameters are
stacked on a leading layer axis and run with `jax.lax.scan` (or, fully unrolled, a Python loop).

One forward serves prefill and decode: tokens, positions and a `KVCache` in; logits (or the final
hidden states, or nothing) and the updated cache out. New keys/values are written at columns
`[cache.end, cache.end + T)` of every row, so a batch of prompts is left-padded to a common end.
`Decoder.extend` runs new tokens after a whole prefix cache without writing to it: the training
suffix pass, whose attention needs no mask (`attention.prefix_attention`).
"""

from __future__ import annotations

import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from c2c_jax.models.attention import AttentionImpl, cache_attention, check_implementation, prefix_attention
from c2c_jax.models.config import ModelConfig, RopeConfig
from c2c_jax.models.kv_cache import KVCache

Output = Literal["logits", "hidden", "kv"]
# attend(q, k_new, v_new) -> attention output [B, T, heads, head_dim]: one layer's new queries [B, T,
# heads, head_dim] over whatever keys the caller's route gives that layer, their own K/V
# [B, T, kv_heads, head_dim] among them.
Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32 and cast back, then scaled in x's dtype, as transformers does."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


class RMSNorm(nnx.Module):
    """`rms_norm` with a learned scale."""

    def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs | None = None):
        del rngs
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


@functools.lru_cache(maxsize=None)
def _inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    return rope.inverse_frequencies(head_dim)


def rope_tables(positions: jax.Array, rope: RopeConfig, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin: float32 [B, T, head_dim] for the rotate-half convention."""
    inv_freq = jnp.asarray(_inverse_frequencies(rope, head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, heads, head_dim]; rotates pairs (i, i + head_dim/2) like HF's rotate_half."""
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def attention_mask(valid: jax.Array, end: jax.Array, num_new: int) -> jax.Array:
    """bool [B, 1, T, S]: query t (at column end + t) sees real tokens at columns <= its own.

    Every query also sees itself, so a padding query has a well-defined (finite) output: NaN in a
    padded row would otherwise leak into everyone through 0 * NaN in the value product.
    """
    columns = jnp.arange(valid.shape[1])
    query_columns = end + jnp.arange(num_new)
    causal = columns[None, :] <= query_columns[:, None]
    itself = columns[None, :] == query_columns[:, None]
    return ((valid[:, None, :] & causal[None]) | itself[None])[:, None]


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        linear = functools.partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # q, k and v projections as one matmul (HF's q_proj, k_proj, v_proj concatenated): fewer,
        # larger kernels, which is what decides speed at small batch.
        self.qkv_proj = linear(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, use_bias=c.qkv_bias)
        self.o_proj = linear(c.num_heads * c.head_dim, c.hidden_size, use_bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, param_dtype=param_dtype)
            self.k_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim

    def _project(self, x, kernel_slice: slice):
        """x @ qkv_proj restricted to some of its output columns (q, k, v are contiguous blocks)."""
        kernel = self.qkv_proj.kernel[...][:, kernel_slice]
        out = jnp.dot(x, kernel.astype(x.dtype))
        if self.qkv_proj.bias is not None:
            out = out + self.qkv_proj.bias[...][kernel_slice].astype(out.dtype)
        return out

    def _keys_values(self, kv, cos, sin):
        b, t, _ = kv.shape
        k, v = jnp.split(kv.reshape(b, t, 2 * self.num_kv_heads, self.head_dim), 2, axis=2)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return apply_rope(k, cos, sin), v

    def project_kv(self, x, cos, sin) -> tuple[jax.Array, jax.Array]:
        """Keys and values of new tokens exactly as HF caches them: [B, T, kv_heads, head_dim]."""
        return self._keys_values(self._project(x, slice(self.num_heads * self.head_dim, None)), cos, sin)

    def __call__(self, x, cos, sin, attend: Attend, paired: bool = False):
        """Attention of the new tokens x [B, T, hidden], through `attend` (see `Attend`).

        Returns the attention output and the new tokens' K/V [B, T, kv_heads, head_dim].
        paired: x is one token as two identical rows (`Decoder.__call__`'s `one_row_gemm`): the
        attention runs on the first and its output goes back to both; K/V [1, 1, ...].
        """
        q_width = self.num_heads * self.head_dim
        qkv = self.qkv_proj(x)
        if paired:
            qkv = qkv[:1]
        b, t, _ = qkv.shape
        q = qkv[..., :q_width].reshape(b, t, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = apply_rope(q, cos, sin)
        k_new, v_new = self._keys_values(qkv[..., q_width:], cos, sin)
        out = attend(q, k_new, v_new).reshape(b, t, q_width)
        if paired:
            out = jnp.concatenate([out, out])
        return self.o_proj(out), k_new, v_new


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        linear = functools.partial(nnx.Linear, use_bias=c.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_up_proj = linear(c.hidden_size, 2 * c.intermediate_size)  # HF gate_proj and up_proj, one matmul
        self.down_proj = linear(c.intermediate_size, c.hidden_size)

    def __call__(self, x):
        gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = functools.partial(RMSNorm, config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.input_layernorm = norm()
        self.self_attn = Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def kv(self, x, cos, sin):
        return self.self_attn.project_kv(self.input_layernorm(x), cos, sin)

    def __call__(self, x, cos, sin, attend: Attend, paired: bool = False):
        h, k_new, v_new = self.self_attn(self.input_layernorm(x), cos, sin, attend, paired)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k_new, v_new


class Decoder(nnx.Module):
    """A decoder-only LM with an explicit, layer-stacked KV cache."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.bfloat16, param_dtype=None, scan_unroll: int | None = None,
                 remat: bool = False, attention_impl: AttentionImpl = "auto", platform: str | None = None,
                 rngs: nnx.Rngs):
        """scan_unroll: layers per scan iteration. Default: all of them on GPU, where a rolled loop's
        per-layer kernel launches dominate at small batch and its stacked residuals and per-layer
        weight slices cost a training step ~9 % (docs/performance.md); 1 elsewhere (TPUs compile a
        rolled scan faster and lose little by it).
        platform: what the model is compiled for ("tpu", "gpu", "cpu"), which picks its kernels;
        default `jax.default_backend()`. A deviceless TPU compile runs on a CPU host: it passes
        the target mesh's platform (`sharding.platform_of`)."""
        param_dtype = dtype if param_dtype is None else param_dtype
        self.config = config
        self.dtype = dtype
        self.platform = platform or jax.default_backend()
        if scan_unroll is None:
            scan_unroll = config.num_layers if self.platform == "gpu" else 1
        self.scan_unroll = scan_unroll
        self.remat = remat
        check_implementation(attention_impl)
        self.attention_impl = attention_impl
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_layers(rngs):
            return DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.layers = stacked_layers(rngs)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if config.tie_word_embeddings else nnx.Linear(
            config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def init_cache(self, batch: int, capacity: int, num_layers: int | None = None) -> KVCache:
        c = self.config
        return KVCache.empty(num_layers=c.num_layers if num_layers is None else num_layers, batch=batch,
                             capacity=capacity, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=self.dtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache, token_mask: jax.Array | None = None,
                 *, output: Output = "logits", one_row_gemm: bool = False, held: jax.Array | None = None
                 ) -> tuple[jax.Array | None, KVCache]:
        """Runs `tokens` [B, T] at `positions` [B, T] on top of `cache`.

        token_mask: bool [B, T], False for padding tokens (default: all real).
        held: bool [B, T], or None: new columns whose K/V the cache already holds at [cache.end,
          cache.end + T) (fused ones). Every layer attends to, and keeps, those instead of the K/V it
          computes there: a pass that recomputes only the other columns of a partly fused prompt,
          one section after another, as upstream C2C runs aligned chats.
        The new tokens go to columns [cache.end, cache.end + T), which must fit in the cache. New
        tokens that fill a cache exactly are a fresh prefill (cache.end must then be 0): attention
        skips the cache and, without a token_mask, needs no mask at all.
        output: "logits" (float32 [B, T, vocab]), "hidden" (final-normed [B, T, hidden]) or "kv".
          "kv" fills only the cache's `num_layers` layers and stops right after the deepest one's
          K/V projection: no attention/MLP in that layer, no final norm, no lm_head.
        one_row_gemm: run a single token (batch 1) through the layers as two identical rows, so that
          its projections stay GEMMs. XLA rewrites a vector-matrix product into a multiply and a
          reduction over the weights' major axis, which reads them at about 1 TB/s on an H200;
          carrying the copy from the embedding on (attention runs once) spares a concatenation
          before each projection. Faster in a one-off program such as prefill's last prompt token
          (0.9-1.3 ms off a 512-token receiver-only prefill on an H200), slower in a decode loop.
        """
        cfg = self.config
        b, t = tokens.shape
        if output != "kv" and cache.num_layers != cfg.num_layers:
            raise ValueError(f"a cache of {cache.num_layers} layers can only be filled with output='kv' "
                             f"(the model has {cfg.num_layers})")
        if cache.num_layers > cfg.num_layers:
            raise ValueError(f"cache has {cache.num_layers} layers, the model only {cfg.num_layers}")
        end = cache.end
        # New tokens that fill the whole cache can only start at column 0 (prefill into a fresh cache).
        fresh = t == cache.capacity
        # ... and if none of them is padding, causality is the whole mask (cuDNN then reads no bias).
        unpadded_fresh = fresh and token_mask is None
        if token_mask is None:
            token_mask = jnp.ones((b, t), bool)
        valid = jax.lax.dynamic_update_slice(cache.valid, token_mask, (0, end))
        mask = None if unpadded_fresh else attention_mask(valid, end, t)
        cache_k, cache_v = (None, None) if fresh else (cache.k, cache.v)

        def keep_held(new, stacked, layer=None):  # new [(layers,) B, T, ...]; stacked: the cache's k or v
            held_part = stacked if layer is None else stacked[layer]
            held_part = jax.lax.dynamic_slice_in_dim(held_part, end, t, axis=-3)
            return jnp.where(held[:, :, None, None], held_part.astype(new.dtype), new)

        def attend(q, k_new, v_new, layer):  # layer i reads its slice of the stacked cache in place
            if held is not None:
                k_new, v_new = keep_held(k_new, cache.k, layer), keep_held(v_new, cache.v, layer)
            return cache_attention(q, k_new, v_new, cache_k, cache_v, layer, mask=mask, end=end,
                                   implementation=self.attention_impl, platform=self.platform)

        cos, sin = rope_tables(positions, cfg.rope, cfg.head_dim)
        num_full = cache.num_layers - 1 if output == "kv" else cache.num_layers
        x = self.embed_tokens(tokens)
        paired = one_row_gemm and b * t == 1
        if paired:  # the token as two identical rows through every layer (see one_row_gemm)
            x = jnp.concatenate([x, x])
        x, new_k, new_v = self._layers(x, cos, sin, attend, None, num_full, paired)
        if paired:
            x = x[:1]
        if output == "kv":
            k_last, v_last = self._layer_getter()(cache.num_layers - 1).kv(x, cos, sin)
            new_k.append(k_last[None])
            new_v.append(v_last[None])
        new_k = jnp.concatenate(new_k).astype(cache.k.dtype)
        new_v = jnp.concatenate(new_v).astype(cache.v.dtype)
        if held is not None:
            new_k, new_v = keep_held(new_k, cache.k), keep_held(new_v, cache.v)
        if fresh:
            k, v = new_k, new_v
        else:
            k = jax.lax.dynamic_update_slice(cache.k, new_k, (0, 0, end, 0, 0))
            v = jax.lax.dynamic_update_slice(cache.v, new_v, (0, 0, end, 0, 0))
        new_cache = KVCache(k=k, v=v, valid=valid, end=end + t)
        if output == "kv":
            return None, new_cache
        hidden = self.norm(x)
        return (hidden if output == "hidden" else self.logits(hidden)), new_cache

    def extend(self, tokens: jax.Array, positions: jax.Array, prefix: KVCache, *,
               output: Literal["logits", "hidden"] = "hidden", held: tuple | None = None) -> jax.Array:
        """Runs `tokens` [B, T] at `positions` [B, T] after `prefix`'s real columns, writing nothing.

        The training route: a receiver's answer on its fused prompt cache. Row b's real prefix
        columns must be its first `prefix.lengths[b]` (`prefix.valid` a leading block; `prefix.end`
        is not read), and padding among the new tokens must follow each row's real ones: each real
        token then sees the real prefix and the new tokens up to itself (what a padding token
        computes is unspecified). With that layout (`train.batching.TrainBatch`) the attention needs no mask
        (`attention.prefix_attention`), unlike `__call__`'s over a cache it writes into.
        held: None, or K and V [layers, B, T, kv_heads, head_dim] that every layer attends to in place
          of the new tokens' own (decode-time fusion's fused K/V of the answer).
        Returns final-normed hidden states [B, T, hidden] or float32 logits [B, T, vocab].
        """
        if prefix.num_layers != self.config.num_layers:
            raise ValueError(f"a prefix cache of {prefix.num_layers} layers for a model of {self.config.num_layers}")
        if not isinstance(prefix.valid, jax.core.Tracer):  # checkable outside jit
            valid = np.asarray(prefix.valid)
            if (valid != (np.arange(valid.shape[1]) < valid.sum(axis=1, keepdims=True))).any():
                raise ValueError("extend needs each row's real prefix columns first (prefix.valid a leading block)")
        lengths = prefix.lengths

        def attend(q, k_new, v_new, layer, prefix_k, prefix_v, *held_kv):
            del layer  # its prefix K/V (and held K/V) come sliced (`_layers`' per_layer)
            if held_kv:
                k_new, v_new = (h.astype(k_new.dtype) for h in held_kv)
            return prefix_attention(q, prefix_k, prefix_v, lengths, k_new, v_new, implementation=self.attention_impl,
                                    platform=self.platform)

        cos, sin = rope_tables(positions, self.config.rope, self.config.head_dim)
        per_layer = materialized_cotangent((prefix.k, prefix.v) + (() if held is None else tuple(held)))
        x, _, _ = self._layers(self.embed_tokens(tokens), cos, sin, attend, per_layer, self.config.num_layers)
        hidden = self.norm(x)
        return hidden if output == "hidden" else self.logits(hidden)

    def _layer_getter(self):
        """i -> layer i, its weights sliced out of the stack (in place when i is static)."""
        graphdef, layer_params = nnx.split(self.layers)
        return lambda i: nnx.merge(graphdef, jax.tree.map(lambda p: p[i], layer_params))

    def _layers(self, x, cos, sin, attend, per_layer, num_layers, paired: bool = False):
        """x through layers [0, num_layers), layer i attending with `attend(q, k_new, v_new, i, *layer_inputs)`
        (i an int when unrolled, a traced int32 in a scan). paired: see `Attention.__call__`.

        per_layer: None, or arrays [layers, ...] whose slice i is layer i's `layer_inputs` (its prefix cache).
        Returns x and the layers' new K/V as lists of [layers, B, T, kv_heads, head_dim] blocks.
        """
        # Each layer reads its own cache slice and returns its new K/V; the caller writes them once,
        # after the loop. The cache is thus never a loop carry, whose gradient would be a full-size
        # buffer updated in every layer's backward step.
        layer_at = self._layer_getter()

        def body(x, inputs):
            i, layer_inputs = inputs
            x, k_new, v_new = layer_at(i)(x, cos, sin, lambda q, k, v: attend(q, k, v, i, *layer_inputs), paired)
            return x, (k_new, v_new)

        if self.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        if self.scan_unroll >= num_layers:
            # Fully unrolled: a Python loop, so every layer index is static and each layer's weights
            # are read in place. An unrolled scan keeps the index dynamic, and XLA then copies every
            # layer's weights out of the stack before each matmul (0.42 ms of a 3.5 ms 512-token
            # Qwen3-0.6B prefill on an H200).
            new_k, new_v = [], []
            unstacked = () if per_layer is None else tuple(unstack_layers(a) for a in per_layer)
            for i in range(num_layers):
                x, (k_i, v_i) = body(x, (i, tuple(layers[i] for layers in unstacked)))
                new_k.append(k_i[None])
                new_v.append(v_i[None])
            return x, new_k, new_v
        layer_inputs = () if per_layer is None else tuple(a[:num_layers] for a in per_layer)
        x, (k_stack, v_stack) = jax.lax.scan(body, x, (jnp.arange(num_layers), layer_inputs), unroll=self.scan_unroll)
        return x, [k_stack], [v_stack]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits from final-normed hidden states."""
        if self.lm_head is None:
            weight = self.embed_tokens.embedding[...].T
        else:
            weight = self.lm_head.kernel[...]
        return vocab_projection(hidden, weight.astype(hidden.dtype))


@jax.custom_vjp
def unstack_layers(stacked: jax.Array) -> tuple[jax.Array, ...]:
    """[layers, ...] -> one array per layer.

    Its transpose stacks the layers' cotangents, one concatenation. Autodiff of indexing pads each
    layer's cotangent to the whole stack and adds the 28 up: 3.9 ms for the prefix cache's gradient
    in a C2C train micro-batch on an H200 (docs/performance.md).
    """
    return tuple(stacked[i] for i in range(stacked.shape[0]))


def _unstack_layers_fwd(stacked):
    return unstack_layers(stacked), None


def _unstack_layers_bwd(_, cotangents):
    return (jnp.stack(cotangents),)


unstack_layers.defvjp(_unstack_layers_fwd, _unstack_layers_bwd)


@jax.custom_vjp
def materialized_cotangent(x):
    """The identity, whose cotangent is written to memory whole before anything reads it.

    `extend`'s gradient w.r.t. its prefix cache is 28 layers' attention gradients stacked. Left to
    itself, XLA fused that stacking into the fuser's backward reductions, which became one 17.8 ms
    kernel per C2C train micro-batch on an H200 (docs/performance.md); the barrier keeps them apart.
    """
    return x


def _materialized_cotangent_fwd(x):
    return x, None


def _materialized_cotangent_bwd(_, cotangent):
    return (jax.lax.optimization_barrier(cotangent),)


materialized_cotangent.defvjp(_materialized_cotangent_fwd, _materialized_cotangent_bwd)


@jax.custom_vjp
def vocab_projection(hidden: jax.Array, weight: jax.Array) -> jax.Array:
    """hidden [..., D] @ weight [D, V] with float32 output, differentiable in the compute dtype.

    The float32 cotangent of the logits is cast to the weights' dtype before the backward matmuls:
    left to autodiff, the mixed float32 x bfloat16 product becomes a float32 GEMM over the whole
    vocabulary plus a float32 copy of the weights (3.4 ms of a 120 ms C2C train step on an H200).
    """
    return jnp.dot(hidden, weight, preferred_element_type=jnp.float32)


def _vocab_projection_fwd(hidden, weight):
    return vocab_projection(hidden, weight), (hidden, weight)


def _vocab_projection_bwd(residuals, cotangent):
    hidden, weight = residuals
    cotangent = cotangent.astype(weight.dtype)
    d_hidden = jnp.dot(cotangent, weight.T, preferred_element_type=jnp.float32).astype(hidden.dtype)
    # Unused (and removed by XLA) when the weights are frozen, as in C2C training.
    d_weight = jnp.einsum("...d,...v->dv", hidden, cotangent, preferred_element_type=jnp.float32)
    return d_hidden, d_weight.astype(weight.dtype)


vocab_projection.defvjp(_vocab_projection_fwd, _vocab_projection_bwd)
