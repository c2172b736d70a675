"""The KV cache: an explicit pytree, stacked over layers.

C2C reads, transforms and rewrites the receiver's cache between prefill and decode, and feeds the
sharer's cache into a differentiable fuser, so the cache is a plain value passed in and out of the
model rather than hidden module state.

Layout: every row of a batch shares one write pointer `end` (prompts are left-padded so they all end
at the same column); `valid` marks which columns hold real tokens, which also covers padding
inserted in the middle of a sequence (token alignment between different tokenizers does that).
Keys are stored exactly as Hugging Face caches them: post-RoPE (rotate-half convention), after the
k-norm for Qwen3, bias included for Qwen2.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from c2c_jax.models.attention import DECODE_BLOCK, TPU_BLOCK


def decode_capacity(columns: int, platform: str | None = None) -> int:
    """Columns for a cache that must hold `columns` tokens while decoding: rounded up to a multiple of
    the decode attention kernel's key block, so that it tiles them (`attention.decode_attention`;
    on a TPU `attention.tpu_decode_attention`). platform: the target's (default the host's)."""
    block = TPU_BLOCK if (platform or jax.default_backend()) == "tpu" else DECODE_BLOCK
    return -(-columns // block) * block


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [layers, batch, capacity, kv_heads, head_dim]
    v: jax.Array  # [layers, batch, capacity, kv_heads, head_dim]
    valid: jax.Array  # bool [batch, capacity]: column holds a real (non-padding) token
    end: jax.Array  # int32 []: next column to write, the same for every row

    @classmethod
    def empty(cls, *, num_layers: int, batch: int, capacity: int, num_kv_heads: int, head_dim: int,
              dtype=jnp.bfloat16) -> "KVCache":
        shape = (num_layers, batch, capacity, num_kv_heads, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, capacity), bool),
            end=jnp.zeros((), jnp.int32),
        )

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def lengths(self) -> jax.Array:
        """int32 [batch]: number of real tokens held per row."""
        return self.valid.sum(axis=-1, dtype=jnp.int32)

    def with_capacity(self, capacity: int) -> "KVCache":
        """The same contents in a buffer of `capacity` columns (room for decoding)."""
        extra = capacity - self.capacity
        if extra < 0:
            raise ValueError(f"cannot shrink a cache of {self.capacity} columns to {capacity}")
        pad = ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0))
        return dataclasses.replace(
            self,
            k=jnp.pad(self.k, pad),
            v=jnp.pad(self.v, pad),
            valid=jnp.pad(self.valid, ((0, 0), (0, extra))),
        )
