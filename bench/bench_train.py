"""Training throughput at the configs/qwen.py shapes with random bf16 weights.

Qwen3-0.6B receiver <- Qwen2.5-0.5B sharer, fuser h = m = 1024, L = 3 (477,848,056 parameters),
micro-batch 4 x 2048 tokens (prefix P + suffix R = 2048, default 1024 + 1024), one optimizer
update per `--micro-batches` micro-batches (default 16, as `configs/qwen.py`). Reports step time,
tokens/s and MFU: the model FLOPs the step executes (forward of the frozen prefix passes, forward +
backward of the fuser, forward + activation-backward of the receiver's suffix pass and its LM head,
causal attention counted as half a square), over the card's dense bf16 peak.

    python bench/bench_train.py [--smoke] [--prefix 1024 --suffix 1024 --batch 4] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import common  # noqa: E402
from common import QWEN2_5_0_5B, QWEN3_0_6B, SMOKE_RECEIVER, SMOKE_SHARER, Report, device_name, random_decoder, \
    time_ms  # noqa: E402

from c2c_jax import sharding  # noqa: E402
from c2c_jax.c2c.fuser import Fuser, FuserConfig  # noqa: E402
from c2c_jax.config import default_config  # noqa: E402
from c2c_jax.models import ModelConfig  # noqa: E402
from c2c_jax.train.batching import TrainBatch  # noqa: E402
from c2c_jax.train.step import StepSettings, build_steps  # noqa: E402


def layer_flops_per_token(c: ModelConfig, context: float) -> tuple[float, float]:
    """(matmul FLOPs per token per layer, attention FLOPs per token per layer at this mean context)."""
    d, h, kv, hd, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    linear = 2 * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f)
    attention = 2 * 2 * h * hd * context  # QK^T and PV
    return linear, attention


def kv_only_flops(c: ModelConfig, depth: int, tokens: int, seq: int) -> float:
    """Prefix pass stopping after layer depth-1's K/V projection; causal mean context seq / 2."""
    linear, attention = layer_flops_per_token(c, seq / 2)
    kv_proj = 2 * 2 * c.hidden_size * c.num_kv_heads * c.head_dim
    return tokens * ((depth - 1) * (linear + attention) + kv_proj)


def step_flops(rc: ModelConfig, sc: ModelConfig, fc: FuserConfig, b: int, p: int, r: int) -> dict:
    prefix_tokens, suffix_tokens = b * p, b * r
    receiver_prefix = kv_only_flops(rc, rc.num_layers, prefix_tokens, p)
    sharer_prefix = kv_only_flops(sc, fc.sharer_depth, prefix_tokens, p)
    # Forward, weight gradients, and activation gradients everywhere but into the fuser's input
    # (the frozen caches): in_proj needs no input gradient.
    in_proj = fc.receiver_layers * 2 * (fc.in_dim * fc.hidden_dim + fc.hidden_dim)
    fuser = 2 * prefix_tokens * (3 * fc.num_params() - in_proj)
    linear, attention = layer_flops_per_token(rc, p + r / 2)
    suffix_forward = suffix_tokens * rc.num_layers * (linear + attention)
    head_forward = 2 * suffix_tokens * rc.hidden_size * rc.vocab_size
    # No weight gradients for the frozen receiver: backward = activation gradients only (~1x forward);
    # the chunked cross-entropy recomputes the head's logits once more in the backward pass.
    receiver_suffix = 2 * suffix_forward + 3 * head_forward
    parts = dict(receiver_prefix=receiver_prefix, sharer_prefix=sharer_prefix, fuser=fuser,
                 receiver_suffix=receiver_suffix)
    parts["total"] = sum(parts.values())
    return parts


def random_batch(b, p, r, vocab, seed=0, micro_batches=1) -> TrainBatch:
    rng = np.random.default_rng(seed)
    m = micro_batches
    prefix = rng.integers(0, vocab, (m, b, p)).astype(np.int32)
    suffix = rng.integers(0, vocab, (m, b, r)).astype(np.int32)
    ones_p, ones_r = np.ones((m, b, p), bool), np.ones((m, b, r), bool)
    pos_p = np.broadcast_to(np.arange(p, dtype=np.int32), (m, b, p))
    pos_r = np.broadcast_to(np.arange(p, p + r, dtype=np.int32), (m, b, r))
    targets = np.roll(suffix, -1, axis=-1)
    return TrainBatch(prefix_tokens=prefix, prefix_valid=ones_p, prefix_positions=pos_p, sharer_prefix_tokens=prefix,
                      sharer_prefix_valid=ones_p, sharer_prefix_positions=pos_p, sharer_columns=pos_p, fuse_mask=ones_p,
                      prefix_section=np.zeros((m, b, p), np.int32), suffix_tokens=suffix, suffix_valid=ones_r, suffix_positions=pos_r, targets=targets,
                      loss_mask=ones_r)


class TrainRun:
    """The sharded train step over `devices` (default: all) with a fixed batch and key, stepping its state."""

    def __init__(self, receiver, sharer, fuser_config, batch: TrainBatch, devices=None):
        config = default_config()
        if devices is not None:
            config.mesh.data = len(devices)
        mesh = sharding.make_mesh(config.mesh, devices=devices)
        fuser = nnx.jit(lambda: Fuser(fuser_config, rngs=nnx.Rngs(0)))()
        steps = build_steps(StepSettings.from_config(config), mesh, receiver, sharer, fuser, total_steps=1000)
        self.step_fn, self.state = steps.step_fn, steps.state
        self.frozen = jax.device_put(steps.frozen, sharding.replicated(mesh))
        self.batch = sharding.place_batch(batch, mesh, batch_axis=1)
        self.key = jax.random.key(0)

    def step(self) -> jax.Array:
        """One optimizer step; returns its loss (not synchronised)."""
        self.state, metrics = self.step_fn(self.state, self.frozen, self.batch, self.key)
        return metrics["loss"]

    def compile(self):
        return self.step_fn.lower(self.state, self.frozen, self.batch, self.key).compile()


def build(receiver_cfg, sharer_cfg, hidden, b, p, r, remat=False, micro_batches=1):
    """(one_step callable returning the loss, compiled step, flops split, shapes) at these shapes."""
    receiver = random_decoder(receiver_cfg, remat=remat)
    sharer = random_decoder(sharer_cfg, seed=1)
    fc = common.fuser_config(receiver, sharer, hidden)
    run = TrainRun(receiver, sharer, fc, random_batch(b, p, r, receiver.config.vocab_size, micro_batches=micro_batches))
    flops = {k: v * micro_batches for k, v in step_flops(receiver.config, sharer.config, fc, b, p, r).items()}
    return run.step, run.compile(), flops, (receiver, fc)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--suffix", type=int, default=1024)
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--micro-batches", type=int, default=16,
                        help="micro-batches per optimizer step (configs/qwen.py: 16 of 16 sequences)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card (H100/H200 SXM)")
    parser.add_argument("--unroll", type=int, default=None, help="layers per scan iteration (default: Decoder's)")
    args = parser.parse_args()
    common.SCAN_UNROLL = args.unroll
    print("device:", device_name(), flush=True)
    receiver_cfg, sharer_cfg = (SMOKE_RECEIVER, SMOKE_SHARER) if args.smoke else (QWEN3_0_6B, QWEN2_5_0_5B)
    hidden = 32 if args.smoke else 1024
    b, p, r = (2, 32, 16) if args.smoke else (args.batch, args.prefix, args.suffix)

    start = time.perf_counter()
    one_step, compiled, flops, (receiver, fc) = build(receiver_cfg, sharer_cfg, hidden, b, p, r, args.remat,
                                                      args.micro_batches)
    build_s = time.perf_counter() - start  # model creation + the train step's compilation
    xla_flops = (compiled.cost_analysis() or {}).get("flops", float("nan")) if hasattr(compiled, "cost_analysis") else float("nan")
    if isinstance(xla_flops, (list, tuple)):
        xla_flops = xla_flops[0].get("flops", float("nan")) if xla_flops else float("nan")
    memory = compiled.memory_analysis()
    ms = time_ms(one_step, warmup=2, iters=10)
    tokens = args.micro_batches * b * (p + r)
    report = Report("train")
    report.add(device=device_name(), batch=b, micro_batches=args.micro_batches, prefix=p, suffix=r, fuser_params=fc.num_params(), step_ms=round(ms, 2),
               tokens_per_s=round(tokens / ms * 1e3), model_tflop_per_step=round(flops["total"] / 1e12, 3),
               flops_split={k: round(v / 1e12, 3) for k, v in flops.items()},
               xla_cost_analysis_tflop=round(float(xla_flops) / 1e12, 3) if xla_flops == xla_flops else None,
               achieved_tflops=round(flops["total"] / ms / 1e9, 1),
               mfu=round(flops["total"] / (ms / 1e3) / (args.peak_tflops * 1e12), 4),
               peak_tflops=args.peak_tflops, remat=args.remat, scan_unroll=receiver.scan_unroll,
               build_and_compile_s=round(build_s, 1),
               temp_gib=round(getattr(memory, "temp_size_in_bytes", 0) / 2**30, 2) if memory else None,
               loss=float(jax.device_get(one_step())))
    report.save()


if __name__ == "__main__":
    main()
