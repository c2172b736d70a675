"""Sampling and the decode loop: tokens from the receiver's (fused) cache, one `lax.while_loop`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from c2c_jax.models import Decoder, KVCache

@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off


def sample_tokens(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """int32 [B] from float32 logits [B, vocab]."""
    if sampling.temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        # Keep the sorted prefix whose cumulative probability is <= top_p, and always the top token.
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        keep = (cumulative <= sampling.top_p).at[:, 0].set(True)
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Generation:
    tokens: jax.Array  # int32 [B, max_new_tokens], `pad_id` after a row's end
    lengths: jax.Array  # int32 [B]: new tokens per row, EOS included


def decode(receiver: Decoder, first_logits, cache: KVCache, next_positions, key, sampling: SamplingConfig,
           eos_ids: tuple[int, ...], pad_id: int, *, step=None, on_token=None) -> Generation:
    """Samples up to `max_new_tokens` tokens with a `lax.while_loop`; stops when every row hit EOS.

    step: None (the receiver's decode step on `cache`), or `C2CModel.decode_step`'s (decode-time
    fusion; `cache` then its `LockstepCaches`).
    on_token: None, or a host function on_token(tokens [B], new [B]) called, in order, with each
      step's tokens as they are sampled (new: the row had not ended before): streaming.
    """
    def emit(token, new):  # new: a function, so the non-streaming program computes nothing for it
        if on_token is not None:
            io_callback(on_token, None, token, new(), ordered=True)

    decode_one = step or (lambda cache, tokens, positions: receiver(tokens, positions, cache))
    b = first_logits.shape[0]
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)
    first_key, key = jax.random.split(key)
    first = sample_tokens(first_logits, first_key, sampling)
    tokens = jnp.full((b, sampling.max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    finished = jnp.isin(first, eos)
    lengths = jnp.ones((b,), jnp.int32)
    emit(first, lambda: jnp.ones((b,), bool))

    def cond(state):
        step, _, _, finished, _, _ = state
        return (step < sampling.max_new_tokens) & ~jnp.all(finished)

    def body(state):
        step, cache, tokens, finished, lengths, key = state
        key, step_key = jax.random.split(key)
        previous = tokens[:, step - 1]
        logits, cache = decode_one(cache, previous[:, None], (next_positions + step - 1)[:, None])
        token = jnp.where(finished, pad_id, sample_tokens(logits[:, 0], step_key, sampling))
        emit(token, lambda: ~finished)
        tokens = tokens.at[:, step].set(token)
        lengths = lengths + (~finished).astype(jnp.int32)
        finished = finished | jnp.isin(token, eos)
        return step + 1, cache, tokens, finished, lengths, key

    state = (jnp.asarray(1, jnp.int32), cache, tokens, finished, lengths, key)
    _, _, tokens, _, lengths, _ = jax.lax.while_loop(cond, body, state)
    return Generation(tokens, lengths)


