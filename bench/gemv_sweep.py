"""Does any Pallas GEMV setting beat XLA's two-row GEMM for the last token's projections? A sweep.

`bench_gemv.py`'s layer chain (Qwen3-0.6B's qkv, o, gate_up and down through 28 layers, one row),
with each layer's weights as its own array so that a kernel compiles once per shape, timed for:

    xla_rows_stacked    bench_gemv's `xla_rows` on the stacked [layers, K, N] weights (the library's reads)
    xla_rows            the same two-row GEMM on per-layer arrays (first and last: the run's drift)
    single_bn*_t*_w*    bench_gemv's `pallas_gemv`: one [block_k, block_n] weight block per program,
                        float32 partial sums over K splits that XLA adds up; block_n, the programs
                        to aim for, and num_warps
    loop_bn*_s*_c*_w*_st*   programs of block_n columns and K / splits rows, looping over chunks of
                        rows (Triton pipelines the loads over num_stages)

    python bench/gemv_sweep.py [--smoke]

On an H200 (session 13) no setting was faster than the two-row GEMM: 7.63 us per product at best
against 7.64-9.93 for XLA in the same run; per-product cost is launch and dependency latency, not
the weights' bandwidth (docs/performance.md). SWEEP_SECONDS (default 330) bounds the sweep's time.
"""

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from c2c_jax.config import use_inference_xla_flags  # noqa: E402

use_inference_xla_flags()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as pallas_triton  # noqa: E402

import bench_gemv as bg  # noqa: E402
import common  # noqa: E402


def gemv_loop(x, ws, layer, *, block_n, splits, chunk, num_warps, num_stages, interpret):
    """The same product, each program looping over `chunk`-row pieces of its K / splits rows."""
    w = ws[layer]
    k, n = w.shape
    block_n = min(block_n, n)
    per_split = k // splits
    chunk = min(chunk, per_split)
    steps = per_split // chunk
    def kernel(x_ref, w_ref, out_ref):
        def body(i, acc):
            xs = x_ref[pl.ds(i * chunk, chunk)].astype(jnp.float32)
            ws = w_ref[pl.ds(i * chunk, chunk), :].astype(jnp.float32)
            return acc + jnp.sum(xs[:, None] * ws, axis=0)
        out_ref[...] = jax.lax.fori_loop(0, steps, body, jnp.zeros((block_n,), jnp.float32))[None]
    ps = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((splits, n), jnp.float32),
        grid=(n // block_n, splits),
        in_specs=[pl.BlockSpec((per_split,), lambda j, s: (s,)),
                  pl.BlockSpec((per_split, block_n), lambda j, s: (s, j))],
        out_specs=pl.BlockSpec((1, block_n), lambda j, s: (s, j)),
        compiler_params=pallas_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret)(x, w)
    return ps.sum(axis=0)


def main():
    smoke = "--smoke" in sys.argv
    cfg = common.SMOKE_RECEIVER if smoke else common.QWEN3_0_6B
    layers = cfg["num_hidden_layers"]
    weights, x = bg.chain_inputs(cfg, layers)
    interp = smoke or jax.default_backend() != "gpu"
    ref = bg.layer_chain(bg.xla_vector, x.astype(jnp.float32), [w.astype(jnp.float32) for w in weights])
    wbytes = sum(w.size for w in weights) * 2
    report = common.Report("gemv_sweep")
    # Per-layer arrays, so that a Pallas kernel compiles once per shape; xla_rows_stacked reads the
    # stack, as the library does.
    lists = [[w[i] for i in range(layers)] for w in weights]
    ways = [("xla_rows_stacked", bg.xla_rows, weights), ("xla_rows", bg.xla_rows, lists)]
    if smoke:
        grid_single = [(128, 256, 4)]
        grid_loop = [(64, 4, 32, 4, 2)]
    else:
        grid_single = [(bn, st, nw) for bn in (64, 128, 256) for st in (128, 256, 512) for nw in (2, 4, 8)]
        grid_loop = [(bn, sp, ch, nw, ns) for bn in (64, 128) for sp in (4, 8) for ch in (32, 64)
                     for nw in (4,) for ns in (2, 4)]
    for bn, st, nw in grid_single:
        product = functools.partial(bg.pallas_gemv, splits_target=st, interpret=interp, block_n=bn, num_warps=nw,
                                    num_stages=1)
        ways.append((f"single_bn{bn}_t{st}_w{nw}", product, lists))
    for bn, sp, ch, nw, ns in grid_loop:
        product = functools.partial(gemv_loop, block_n=bn, splits=sp, chunk=ch, num_warps=nw, num_stages=ns,
                                    interpret=interp)
        ways.append((f"loop_bn{bn}_s{sp}_c{ch}_w{nw}_st{ns}", product, lists))
    ways.append(("xla_rows_again", bg.xla_rows, lists))
    reference_max_abs = float(jnp.max(jnp.abs(ref)))
    deadline = time.time() + float(os.environ.get("SWEEP_SECONDS", "330"))
    for name, product, layer_weights in ways:
        if time.time() > deadline and name != "xla_rows_again":
            continue
        try:
            chain = jax.jit(functools.partial(bg.layer_chain, product))
            out = chain(x, layer_weights)
            diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
            ms = common.time_ms(chain, x, layer_weights, iters=20)
        except Exception as e:  # noqa: BLE001 - a setting Triton rejects is reported and skipped
            print(name, "failed", str(e)[:200], flush=True)
            continue
        print(f"{name}: {ms*1e3/(4*layers):.2f} us/product diff {diff:.2e}", flush=True)
        report.add(what=name, layers=layers, us_per_product=round(ms * 1e3 / (4 * layers), 2),
                   weights_tb_per_s=round(wbytes / (ms * 1e-3) / 1e12, 2), chain_ms=round(ms, 3), max_abs_diff=diff,
                   reference_max_abs=reference_max_abs)
    report.save()

if __name__ == "__main__":
    main()
