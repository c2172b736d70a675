"""The training suffix pass's attention in isolation, forward + backward (issue 4).

The receiver's pass over the answer (R queries) attends to the fused prefix cache (P keys, each row's
real ones first, as `data.TrainBatch` lays them out) and causally to the answer itself. `jax.nn.dot_product_attention` only offers top-left causal
masking, so one call needs a mask, which cuDNN reads as a bias over the whole R x (P + R) rectangle.
This times that against `c2c_jax.models.attention.prefix_attention`, which `Decoder.extend` (the
train step) uses: the answer's queries over the prefix keys with a key-length mask plus the answer's
causal self-attention, merged by their logsumexp with a custom VJP; and against the cheap bounds
(the rectangle unmasked, the two parts unmerged). It also checks `prefix_attention` against a
float32 masked softmax, at a prefix padded to random lengths, next to the masked rectangle's error.

    python bench/bench_attention.py [--smoke] [--batch 4 --prefix 1024 --suffix 1024]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import Report, time_ms  # noqa: E402

from c2c_jax.models.attention import prefix_attention  # noqa: E402


def reference(q, k, v, mask):
    """float32 softmax attention with an explicit mask [B, 1, T, S]."""
    group = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x.astype(jnp.float32), group, axis=2) for x in (k, v))
    scores = jnp.einsum("btnd,bsnd->bnts", q.astype(jnp.float32), k) / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
    return jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1), v)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--suffix", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for a CPU check of this script")
    args = parser.parse_args()
    b, p, r, h, kv, d = (1, 64, 32, 4, 2, 16) if args.smoke else (
        args.batch, args.prefix, args.suffix, args.heads, args.kv_heads, args.head_dim)
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, r, h, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, p + r, kv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, p + r, kv, d), jnp.bfloat16)
    g = jax.random.normal(keys[3], (b, r, h, d), jnp.bfloat16)
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    mask = (jnp.arange(p + r)[None, :] <= p + jnp.arange(r)[:, None])[None, None]  # bottom-right causal

    def rectangle(q, k, v):  # one call with a mask: what the suffix pass did before prefix_attention
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)

    def unmasked(q, k, v):  # the rectangle without its bias (wrong numbers; what the bias costs)
        return jax.nn.dot_product_attention(q, k, v, implementation=impl)

    def split(q, k, v):  # both halves the cheap way (their merge, which needs the softmax statistics, left out)
        prefix = jax.nn.dot_product_attention(q, k[:, :p], v[:, :p], implementation=impl)
        answer = jax.nn.dot_product_attention(q, k[:, p:], v[:, p:], is_causal=True, implementation=impl)
        return prefix + answer

    def halves(q, k, v):  # the rectangle cut into two query blocks, each over the keys it can see
        m = r // 2
        first = jax.nn.dot_product_attention(q[:, :m], k[:, :p + m], v[:, :p + m], mask=mask[..., :m, :p + m],
                                             implementation=impl)
        second = jax.nn.dot_product_attention(q[:, m:], k, v, mask=mask[..., m:, :], implementation=impl)
        return jnp.concatenate([first, second], axis=1)

    full = jnp.full((b,), p, jnp.int32)

    def merged(q, k, v, lengths=full):  # what Decoder.extend does (prefix keys real-first, lengths per row)
        return prefix_attention(q, k[:, :p], v[:, :p], lengths, k[:, p:], v[:, p:], implementation="auto")

    report = Report("attention")
    flops_fwd = 4 * b * h * d * r * (p + r / 2)  # the useful work: QK^T and PV over the unmasked part
    for name, fn in (("rectangle_masked", rectangle), ("prefix_attention_merged", merged),
                     ("rectangle_unmasked", unmasked), ("split_unmerged", split),
                     ("query_halves_masked", halves)):
        fwd = jax.jit(fn)
        fwd_bwd = jax.jit(lambda q, k, v, fn=fn: jax.vjp(fn, q, k, v)[1](g))
        fwd_ms, fwd_bwd_ms = time_ms(fwd, q, k, v, iters=20), time_ms(fwd_bwd, q, k, v, iters=20)
        report.add(what=name, batch=b, prefix=p, suffix=r, heads=h, kv_heads=kv, head_dim=d,
                   forward_ms=round(fwd_ms, 3), forward_backward_ms=round(fwd_bwd_ms, 3),
                   useful_tflops_fwd_bwd=round(3.5 * flops_fwd / fwd_bwd_ms / 1e9, 1))

    # Accuracy at a padded prefix: row i's first lengths[i] prefix keys are real, as in a training batch.
    lengths = jnp.asarray(jax.random.randint(keys[3], (b,), 1, p + 1), jnp.int32)
    real = jnp.arange(p)[None, :] < lengths[:, None]
    padded_mask = mask & jnp.concatenate([real, jnp.ones((b, r), bool)], axis=1)[:, None, None, :]

    def out_and_grads(fn):
        out, vjp = jax.jit(lambda q, k, v: jax.vjp(fn, q, k, v))(q, k, v)
        return (out, *vjp(g.astype(out.dtype)))

    truth = out_and_grads(lambda q, k, v: reference(q, k, v, padded_mask))
    for name, fn in (
            ("rectangle_masked", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=padded_mask,
                                                                              implementation=impl)),
            ("prefix_attention_merged", lambda q, k, v: merged(q, k, v, lengths))):
        errors = {what: round(float(jnp.max(jnp.abs(got.astype(jnp.float32) - want))), 5)
                  for what, got, want in zip(("out", "dq", "dk", "dv"), out_and_grads(fn), truth)}
        report.add(what=f"max_abs_error_vs_float32/{name}", batch=b, prefix=p, suffix=r,
                   prefix_lengths=[int(x) for x in lengths], **errors)


if __name__ == "__main__":
    main()
