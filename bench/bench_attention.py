"""The training suffix pass's attention in isolation, forward + backward (issue 4).

The receiver's pass over the answer (R queries) attends to the fused prefix cache (P keys, left-padded)
and causally to the answer itself. `jax.nn.dot_product_attention` only offers top-left causal
masking, so the pass gives cuDNN a mask, which becomes a bias over the whole R x (P + R) rectangle.
This times that against what a split would cost: the answer's queries over the prefix keys (no
causality; unmasked here, as in an unpadded batch) plus the answer's causal self-attention.

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

    def rectangle(q, k, v):  # what the suffix pass does now
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

    report = Report("attention")
    flops_fwd = 4 * b * h * d * r * (p + r / 2)  # the useful work: QK^T and PV over the unmasked part
    for name, fn in (("rectangle_masked", rectangle), ("rectangle_unmasked", unmasked), ("split", split),
                     ("query_halves_masked", halves)):
        fwd = jax.jit(fn)
        fwd_bwd = jax.jit(lambda q, k, v, fn=fn: jax.vjp(fn, q, k, v)[1](g))
        fwd_ms, fwd_bwd_ms = time_ms(fwd, q, k, v, iters=20), time_ms(fwd_bwd, q, k, v, iters=20)
        report.add(what=name, batch=b, prefix=p, suffix=r, heads=h, kv_heads=kv, head_dim=d,
                   forward_ms=round(fwd_ms, 3), forward_backward_ms=round(fwd_bwd_ms, 3),
                   useful_tflops_fwd_bwd=round(3.5 * flops_fwd / fwd_bwd_ms / 1e9, 1))


if __name__ == "__main__":
    main()
