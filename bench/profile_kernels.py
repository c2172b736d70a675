"""Where does the time go? Profiles decode, prefill, fusion or a train step and summarises GPU kernels.

Writes a Perfetto trace with `jax.profiler` and reads it back: wall time of the profiled calls, the
sum of device kernel time inside it (busy), the number of kernels, and the kernels taking most time.
Busy << wall means launch/host gaps; busy ~ wall means the kernels themselves are slow.

    python bench/profile_kernels.py --what decode|prefill|fusion|train [--top 15]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import bench_inference as bi  # noqa: E402
from common import QWEN2_5_0_5B, QWEN3_0_6B, SMOKE_RECEIVER, SMOKE_SHARER, random_decoder  # noqa: E402


def summarise(trace_dir: str, top: int) -> dict:
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True) + glob.glob(
        os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(files[0]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pids = {e["pid"]: e["args"].get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = [e for e in events if e.get("ph") == "X" and "gpu" in pids.get(e.get("pid"), "").lower()]
    kernels = [e for e in device if "memcpy" not in e.get("name", "").lower()] or device
    if not kernels:
        return {"note": "no device events found", "processes": sorted(set(pids.values()))}
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e.get("dur", 0) for e in kernels)
    by_name = collections.Counter()
    count = collections.Counter()
    for e in kernels:
        by_name[e["name"][:90]] += e.get("dur", 0)
        count[e["name"][:90]] += 1
    busy = sum(e.get("dur", 0) for e in kernels)
    return {
        "device_span_ms": round((end - start) / 1e3, 3), "kernel_busy_ms": round(busy / 1e3, 3),
        "kernels": len(kernels),
        "top": [(name, round(us / 1e3, 3), count[name]) for name, us in by_name.most_common(top)],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--what", default="decode")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--unroll", type=int, default=None)
    args = parser.parse_args()
    import common

    common.SCAN_UNROLL = args.unroll
    rcfg, scfg = (SMOKE_RECEIVER, SMOKE_SHARER) if args.smoke else (QWEN3_0_6B, QWEN2_5_0_5B)
    t = 32 if args.smoke else 512

    if args.what in ("decode", "prefill"):
        model = random_decoder(rcfg)
        graphdef, state = nnx.split(model)
        if args.what == "prefill":
            fn = bi.prefill_fn(graphdef, "kv")
            tokens = jnp.zeros((1, t), jnp.int32)
            call = lambda: fn(state, tokens)  # noqa: E731
        else:
            steps = 8
            fn = bi.decode_fn(graphdef, steps)
            holder = {"cache": bi._fill(model, model.init_cache(1, t + steps + 1), t)}

            def call():
                holder["cache"], token = fn(state, holder["cache"], jnp.zeros((1, 1), jnp.int32), t)
                holder["cache"] = bi._rewind(holder["cache"], t)
                return token
    elif args.what == "fusion":
        c2c = bi.make_c2c(rcfg, scfg)
        graphdef, state = nnx.split(c2c)
        batch = bi.prompt_batch(1, t, rcfg["vocab_size"])

        @jax.jit
        def ttft(state, batch):
            m = nnx.merge(graphdef, state)
            logits, _ = m.prefill(batch, batch.tokens.shape[1])
            return jnp.argmax(logits, -1)

        call = lambda: ttft(state, batch)  # noqa: E731
    else:
        raise SystemExit(f"unknown --what {args.what}")

    for _ in range(3):
        jax.block_until_ready(call())
    out = tempfile.mkdtemp()
    start = time.perf_counter()
    with jax.profiler.trace(out, create_perfetto_trace=True):
        for _ in range(3):
            jax.block_until_ready(call())
    wall = (time.perf_counter() - start) * 1e3 / 3
    summary = summarise(out, args.top)
    summary = {"what": args.what, "wall_ms_per_call": round(wall, 3), "calls": 3, **summary}
    print(json.dumps(summary, indent=1), flush=True)


if __name__ == "__main__":
    main()
