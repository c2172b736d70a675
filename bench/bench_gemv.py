"""Could a Pallas GEMV speed up the last prompt token's projections? One layer chain, three ways.

The C2C route's last prompt token runs through 28 receiver layers as one row (batch 1). Its four
projections per layer (qkv, o, gate_up, down of Qwen3-0.6B: 31.5 MB of bf16 weights) took about
21 us per layer on an H200 as XLA's two-row GEMMs (`Decoder.__call__` with `one_row_gemm`), about
1.5 TB/s of the card's 4.8 (docs/performance.md, session 11). This times the same chain of 28 x 4
one-row products in one program, each product's input taken from the previous one's output:

    xla_rows    the library's route: the row and a copy of it through XLA's GEMM
    xla_vector  the plain vector-matrix product, which XLA rewrites into a reduction
    pallas      a Pallas (Triton) kernel: each program reduces a [K/splits, 128] block of the
                weights, read straight from the stacked [layers, K, N] parameter, into float32
                partial sums that the consumer adds up

    python bench/bench_gemv.py [--layers 28] [--splits-target 256] [--smoke]

Prints and saves (bench_gemv.jsonl) us per product and the weights' read bandwidth, plus each way's
largest difference from a float32 reference. On an H200 (session 11) this first Pallas kernel was
no faster than the library's route: 9.0 against 8.5 us per product over 28 layers.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from c2c_jax.config import use_inference_xla_flags  # noqa: E402

use_inference_xla_flags()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as pallas_triton  # noqa: E402

import common  # noqa: E402

BLOCK_N = 128  # 256 contiguous bytes of a bf16 weight row per block row


def _partial_sums_kernel(x_ref, w_ref, out_ref):
    x = x_ref[...].astype(jnp.float32)
    w = w_ref[...].astype(jnp.float32)
    out_ref[...] = jnp.sum(x[:, None] * w, axis=0)[None]


def pallas_gemv(x, weights, layer: int, splits_target: int, interpret: bool, *, block_n: int = BLOCK_N,
                num_warps: int = 4, num_stages: int = 2):
    """x [K] @ weights[layer] ([K, N]) -> float32 [N]. weights: stacked [layers, K, N], whose layer is
    read in place (a kernel per layer), or a list of per-layer [K, N] arrays (a kernel per shape)."""
    stacked = not isinstance(weights, (list, tuple))
    k, n = weights.shape[1:] if stacked else weights[layer].shape
    block_n = min(block_n, n)
    # K blocks of a power of two (Triton's rule), halved until the programs cover the card.
    block_k = k & -k
    while (n // block_n) * (k // block_k) < splits_target and block_k >= 32:
        block_k //= 2
    splits = k // block_k
    if stacked:
        w, w_spec = weights, pl.BlockSpec((pl.squeezed, block_k, block_n), lambda j, s: (layer, s, j))
    else:
        w, w_spec = weights[layer], pl.BlockSpec((block_k, block_n), lambda j, s: (s, j))
    partial_sums = pl.pallas_call(
        _partial_sums_kernel,
        out_shape=jax.ShapeDtypeStruct((splits, n), jnp.float32),
        grid=(n // block_n, splits),
        in_specs=[pl.BlockSpec((block_k,), lambda j, s: (s,)), w_spec],
        out_specs=pl.BlockSpec((1, block_n), lambda j, s: (s, j)),
        compiler_params=pallas_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(x, w)
    return partial_sums.sum(axis=0)


def xla_rows(x, stacked_w, layer):
    """Two copies of the row through XLA's GEMM; `stacked_w` may also be a list of layers."""
    row = x[None]
    return jnp.dot(jnp.concatenate([row, row]), stacked_w[layer], preferred_element_type=jnp.float32)[0]


def xla_vector(x, stacked_w, layer):
    return jnp.dot(x, stacked_w[layer], preferred_element_type=jnp.float32)


def layer_chain(product, x, weights):
    """x through every layer's qkv, o, gate_up and down, each input cut or taken from the last output."""
    qkv, o, gate_up, down = weights  # each stacked [layers, K, N], or a list of per-layer [K, N]
    for layer in range(len(qkv)):
        y = product(x, qkv, layer)[: o[0].shape[0]].astype(x.dtype)
        h = product(y, o, layer).astype(x.dtype) + x
        g = product(h, gate_up, layer)
        half = g.shape[0] // 2
        z = (jax.nn.silu(g[:half]) * g[half:]).astype(x.dtype)
        x = (product(z, down, layer).astype(x.dtype) + h) * np.float32(0.5).astype(x.dtype)
    return x


def chain_inputs(cfg: dict, layers: int):
    """Random bf16 weights of `layers` layers' qkv, o, gate_up and down (stacked [layers, K, N]) for
    the HF config `cfg`, and an input row [hidden]."""
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q_width = cfg["num_attention_heads"] * cfg.get("head_dim", hidden // cfg["num_attention_heads"])
    kv_width = cfg["num_key_value_heads"] * cfg.get("head_dim", hidden // cfg["num_attention_heads"])
    shapes = [(hidden, q_width + 2 * kv_width), (q_width, hidden), (hidden, 2 * inter), (inter, hidden)]
    keys = jax.random.split(jax.random.key(0), 5)
    weights = [(jax.random.normal(kk, (layers, *s), jnp.float32) / np.sqrt(s[0])).astype(jnp.bfloat16)
               for kk, s in zip(keys[:4], shapes)]
    return weights, jax.random.normal(keys[4], (hidden,), jnp.float32).astype(jnp.bfloat16)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, Pallas in interpret mode (CPU check)")
    parser.add_argument("--splits-target", type=int, default=256, help="programs per product to aim for")
    parser.add_argument("--layers", type=int, default=None, help="layers in the chain (default: the model's; "
                        "each layer compiles its own Pallas kernels)")
    args = parser.parse_args()
    cfg = common.SMOKE_RECEIVER if args.smoke else common.QWEN3_0_6B
    layers = args.layers or cfg["num_hidden_layers"]
    weights, x = chain_inputs(cfg, layers)
    interpret = args.smoke or jax.default_backend() != "gpu"
    ways = {
        "xla_rows": xla_rows,
        "xla_vector": xla_vector,
        "pallas": functools.partial(pallas_gemv, splits_target=args.splits_target, interpret=interpret),
    }
    report = common.Report("bench_gemv")
    reference = layer_chain(xla_vector, x.astype(jnp.float32), [w.astype(jnp.float32) for w in weights])
    weight_bytes = sum(w.size for w in weights) * 2
    for name, product in ways.items():
        chain = jax.jit(functools.partial(layer_chain, product))
        out = chain(x, weights)
        diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) - reference)))
        ms = common.time_ms(chain, x, weights)
        report.add(what=name, layers=layers, products=4 * layers, us_per_product=round(ms * 1e3 / (4 * layers), 2),
                   weights_tb_per_s=round(weight_bytes / (ms * 1e-3) / 1e12, 2), chain_ms=round(ms, 3),
                   max_abs_diff_vs_float32=diff, reference_max_abs=float(jnp.max(jnp.abs(reference))))
    report.save()


if __name__ == "__main__":
    main()
