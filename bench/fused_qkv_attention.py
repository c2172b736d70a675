"""An experiment for issue 3: the decode kernel reading the qkv projection's output directly.

One new token's attention (`attention.decode_attention`) takes q, k and v as its operands. A custom
call's operands must be materialised, so per layer XLA first runs three kernels on the token's qkv
row: q norm + RoPE, k norm + RoPE, and a copy of v. Here the kernel takes the qkv row as it comes out
of the projection and does that work itself (each program for its query head; the first key block's
also for the new key). The layer's new K/V for the cache write are still XLA's, off the chain that
leads to the next layer.

`patched()` routes `Decoder.__call__`'s one-token attention through it for tracing (`ttft_programs.py`'s
`*_two_programs_qkv_kernel` variants), `patch_process()` for the rest of a process
(`bench_inference.py` and `profile_kernels.py --qkv-kernel`). Bench-only until a GPU says whether it pays.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from c2c_jax.models import attention, decoder


class RawQKV(NamedTuple):
    """One token's qkv projection output and what turns it into q, k and v (`Attention.__call__`)."""

    qkv: jax.Array  # [rows, 1, (heads + 2 kv_heads) * head_dim]; rows >= the cache's batch (paired: 2)
    q_scale: jax.Array | None  # q_norm's scale [head_dim] (None: no q/k norm)
    k_scale: jax.Array | None
    eps: float
    cos: jax.Array  # float32 [B, 1, head_dim]
    sin: jax.Array
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def q(self):
        """q [B, 1, heads, head_dim] as `Attention.__call__` computes it (XLA)."""
        b = self.cos.shape[0]
        q = self.qkv[:b, :, : self.num_heads * self.head_dim].reshape(b, 1, self.num_heads, self.head_dim)
        if self.q_scale is not None:
            q = decoder.rms_norm(q, self.q_scale, self.eps)
        return decoder.apply_rope(q, self.cos, self.sin)


def qkv_decode_attention(raw: RawQKV, cache_k, cache_v, layer, cached_visible):
    """`attention.decode_attention` with q, k and v made from `raw` inside the kernel."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pallas_triton

    n, kv_heads, d = raw.num_heads, raw.num_kv_heads, raw.head_dim
    half, group = d // 2, n // kv_heads
    _, b, s, _, _ = cache_k.shape
    block = min(s & -s, attention.DECODE_BLOCK)
    parts = s // block
    dtype = raw.qkv.dtype
    qkv = raw.qkv.reshape(raw.qkv.shape[0], -1)
    width = qkv.shape[1]
    normed = raw.q_scale is not None
    ones = jnp.ones((d,), jnp.float32)
    q_scale = raw.q_scale if normed else ones
    k_scale = raw.k_scale if normed else ones
    bias = jnp.where(cached_visible, np.float32(0), np.float32(attention._MASKED))
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    scale = float(1 / np.sqrt(d))

    def kernel(qkv_ref, q_scale_ref, k_scale_ref, cos_ref, sin_ref, k_ref, v_ref, layer_ref, bias_ref,
               acc_ref, stats_ref):
        row, head, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        kv_head, index, keys = head // group, layer_ref[0], pl.ds(part * block, block)
        lo, hi = pl.ds(0, half), pl.ds(half, half)

        def normed_rotated(offset, scale_ref):
            """The head at `offset` of the qkv row: RMSNorm (bf16 product, as `decoder.rms_norm`) and RoPE
            (float32, cast back, as `apply_rope`); float32 halves."""
            first, second = qkv_ref[pl.ds(offset, half)], qkv_ref[pl.ds(offset + half, half)]
            if normed:
                f32, s32 = first.astype(jnp.float32), second.astype(jnp.float32)
                r = jax.lax.rsqrt((jnp.sum(f32 * f32) + jnp.sum(s32 * s32)) / d + raw.eps)
                first = scale_ref[lo].astype(dtype) * (f32 * r).astype(dtype)
                second = scale_ref[hi].astype(dtype) * (s32 * r).astype(dtype)
            f32, s32 = first.astype(jnp.float32), second.astype(jnp.float32)
            out_first = f32 * cos_ref[lo] - s32 * sin_ref[lo]
            out_second = s32 * cos_ref[hi] + f32 * sin_ref[hi]
            return out_first.astype(dtype).astype(jnp.float32), out_second.astype(dtype).astype(jnp.float32)

        q_first, q_second = normed_rotated(head * d, q_scale_ref)
        k_first = k_ref[index, row, keys, kv_head, lo].astype(jnp.float32)
        k_second = k_ref[index, row, keys, kv_head, hi].astype(jnp.float32)
        scores = (jnp.sum(k_first * q_first[None, :], axis=1) + jnp.sum(k_second * q_second[None, :], axis=1)) * scale
        scores = scores + bias_ref[keys]
        new_first, new_second = normed_rotated((n + kv_head) * d, k_scale_ref)
        new_score = (jnp.sum(q_first * new_first) + jnp.sum(q_second * new_second)) * scale
        new_score = jnp.where(part == 0, new_score, np.float32(attention._MASKED))
        top = jnp.maximum(jnp.max(scores), new_score)
        p, p_new = jnp.exp(scores - top), jnp.exp(new_score - top)
        v = v_ref[index, row, keys, kv_head, :].astype(jnp.float32)
        v_new = qkv_ref[pl.ds((n + kv_heads + kv_head) * d, d)].astype(jnp.float32)
        acc_ref[...] = jnp.sum(p[:, None] * v, axis=0) + p_new * v_new
        stats_ref[...] = jnp.where(jnp.arange(2) == 0, top, jnp.sum(p) + p_new)

    whole = pl.BlockSpec(cache_k.shape, lambda i, h, j: (0,) * 5)
    vector = pl.BlockSpec((d,), lambda i, h, j: (0,))
    per_row = pl.BlockSpec((pl.squeezed, d), lambda i, h, j: (i, 0))
    acc, stats = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((b, n, parts, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, n, parts, 2), jnp.float32)],
        grid=(b, n, parts),
        in_specs=[pl.BlockSpec((pl.squeezed, width), lambda i, h, j: (i, 0)), vector, vector, per_row, per_row,
                  whole, whole, pl.BlockSpec((1,), lambda i, h, j: (0,)),
                  pl.BlockSpec((pl.squeezed, s), lambda i, h, j: (i, 0))],
        out_specs=[pl.BlockSpec((pl.squeezed, pl.squeezed, pl.squeezed, d), lambda i, h, j: (i, h, j, 0)),
                   pl.BlockSpec((pl.squeezed, pl.squeezed, pl.squeezed, 2), lambda i, h, j: (i, h, j, 0))],
        compiler_params=pallas_triton.CompilerParams(num_warps=4, num_stages=1),
        interpret=jax.default_backend() != "gpu",
    )(qkv, q_scale, k_scale, raw.cos.reshape(-1, d), raw.sin.reshape(-1, d), cache_k, cache_v, layer, bias)
    return attention.merge_decode_blocks(acc, stats).astype(dtype)


_original_call = decoder.Attention.__call__
_original_cache_attention = decoder.cache_attention


def _attention_call(self, x, cos, sin, attend, paired=False):
    """`Attention.__call__` handing one token's raw qkv row to `attend` (the new K/V stay XLA's)."""
    if x.shape[1] != 1:
        return _original_call(self, x, cos, sin, attend, paired)
    q_width = self.num_heads * self.head_dim
    rows = self.qkv_proj(x)
    qkv = rows[:1] if paired else rows
    b = qkv.shape[0]
    k_new, v_new = self._keys_values(qkv[..., q_width:], cos, sin)
    raw = RawQKV(rows, None if self.q_norm is None else self.q_norm.scale[...],
                 None if self.k_norm is None else self.k_norm.scale[...],
                 None if self.q_norm is None else self.q_norm.eps, cos, sin, self.num_heads, self.num_kv_heads,
                 self.head_dim)
    out = attend(raw, k_new, v_new).reshape(b, 1, q_width)
    if paired:
        out = jnp.concatenate([out, out])
    return self.o_proj(out), k_new, v_new


def _cache_attention(q, k_new, v_new, cache_k=None, cache_v=None, layer=None, *, mask, end, implementation):
    if not isinstance(q, RawQKV):
        return _original_cache_attention(q, k_new, v_new, cache_k, cache_v, layer, mask=mask, end=end,
                                         implementation=implementation)
    b = cache_k.shape[1] if cache_k is not None else 0
    q_shape = jax.ShapeDtypeStruct((b, 1, q.num_heads, q.head_dim), q.qkv.dtype)
    if cache_k is not None and attention.resolve_implementation(implementation, q_shape, 1, cache_k) == "pallas":
        cached_visible = mask[:, 0, 0, :] & (jnp.arange(cache_k.shape[2]) < end)
        return qkv_decode_attention(q, cache_k, cache_v, layer, cached_visible)
    return _original_cache_attention(q.q(), k_new, v_new, cache_k, cache_v, layer, mask=mask, end=end,
                                     implementation=implementation)


@contextlib.contextmanager
def patched():
    """While tracing: one new token's attention through `qkv_decode_attention` where the decode
    kernel applies (on a GPU, or anywhere with attention_impl="pallas")."""
    with mock.patch.object(decoder.Attention, "__call__", _attention_call), \
            mock.patch.object(decoder, "cache_attention", _cache_attention):
        yield


_PROCESS_PATCH = contextlib.ExitStack()


def patch_process() -> None:
    """`patched()` for the rest of the process (a benchmark's `--qkv-kernel`). The context is held
    here: entered on a temporary, it would be undone as soon as the temporary was collected."""
    _PROCESS_PATCH.enter_context(patched())


def process_patched() -> bool:
    return decoder.Attention.__call__ is _attention_call
