"""Data-parallel training over the GPUs of one host: numerics against one GPU, and scaling.

The same global micro-batch (default 8 x 2048 tokens at the configs/qwen.py shapes, random bf16
weights) runs a few optimizer steps on a one-device mesh and on a data-parallel mesh over all local
devices, from the same initial fuser and with the same keys. Reports the largest loss and parameter
differences between the two (all-reduced gradients only change the order of float sums) and the
step times; strong-scaling efficiency = t(1 device) / (n x t(n devices)).

    python bench/bench_scaling.py [--smoke] [--steps 3] [--batch 8] [--micro-batches 1] [--unroll 1]

With --micro-batches M every optimizer step accumulates M micro-batches (as configs/qwen.py does with
16); the gradients cross devices once per step either way.

On a CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=2 python bench/bench_scaling.py --smoke`
checks the script itself.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from bench_train import TrainRun, random_batch, step_flops  # noqa: E402
from common import QWEN2_5_0_5B, QWEN3_0_6B, SMOKE_RECEIVER, SMOKE_SHARER, Report, device_name, random_decoder, \
    time_ms  # noqa: E402



def run_on(devices, models, fuser_config, batch, steps: int):
    """(losses, final fuser params as NumPy, ms per step) for `steps` steps on a data mesh over `devices`."""
    run = TrainRun(*models, fuser_config, batch, devices=devices)
    losses = [float(jax.device_get(run.step())) for _ in range(steps)]
    params = jax.tree.map(np.asarray, jax.device_get(run.state.params))
    return losses, params, time_ms(run.step, warmup=1, iters=5)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="global micro-batch (sequences)")
    parser.add_argument("--micro-batches", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--suffix", type=int, default=1024)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--unroll", type=int, default=1, help="layers per scan iteration (1 compiles fastest)")
    args = parser.parse_args()
    common.SCAN_UNROLL = args.unroll
    devices = jax.local_devices()
    if len(devices) < 2:
        raise SystemExit(f"needs at least 2 local devices, found {len(devices)}: {devices}")
    receiver_cfg, sharer_cfg = (SMOKE_RECEIVER, SMOKE_SHARER) if args.smoke else (QWEN3_0_6B, QWEN2_5_0_5B)
    hidden = 32 if args.smoke else 1024
    b, p, r = (4, 32, 16) if args.smoke else (args.batch, args.prefix, args.suffix)
    if b % len(devices):
        raise SystemExit(f"global batch {b} does not split over {len(devices)} devices")

    models = (random_decoder(receiver_cfg), random_decoder(sharer_cfg, seed=1))
    rc, sc = models[0].config, models[1].config
    fc = common.fuser_config(*models, hidden)
    m = args.micro_batches
    batch_np = random_batch(b, p, r, rc.vocab_size, micro_batches=m)
    one = run_on(devices[:1], models, fc, batch_np, args.steps)
    many = run_on(devices, models, fc, batch_np, args.steps)

    loss_rel = max(abs(x - y) / abs(x) for x, y in zip(one[0], many[0]))
    param_abs = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(one[1]), jax.tree.leaves(many[1])))
    param_scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(one[1]))
    flops = step_flops(rc, sc, fc, b, p, r)["total"] * m
    n = len(devices)
    report = Report("scaling")
    report.add(device=device_name(), devices=n, global_batch=b, micro_batches=m, prefix=p, suffix=r, steps=args.steps,
               losses_1=one[0], losses_n=many[0], max_loss_rel_diff=loss_rel, max_param_abs_diff=param_abs,
               max_param_abs=param_scale, step_ms_1=round(one[2], 2), step_ms_n=round(many[2], 2),
               tokens_per_s_1=round(m * b * (p + r) / one[2] * 1e3), tokens_per_s_n=round(m * b * (p + r) / many[2] * 1e3),
               scaling_efficiency=round(one[2] / (n * many[2]), 3),
               mfu_n=round(flops / (many[2] / 1e3) / (n * args.peak_tflops * 1e12), 4))


if __name__ == "__main__":
    main()
