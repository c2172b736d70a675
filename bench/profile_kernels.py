"""Where does the time go? Profiles decode, prefill, fusion or a train step and summarises GPU kernels.

Writes a Perfetto trace with `jax.profiler` and reads it back: wall time of the profiled calls, the
sum of device kernel time inside it (busy), the number of kernels, and the kernels taking most time.
Busy << wall means launch/host gaps; busy ~ wall means the kernels themselves are slow. With
`--hlo-dump DIR`, kernel time is also summed per c2c-jax source line (from the optimized-HLO dumps'
metadata) and the fused computations behind the costliest kernels are printed. Times in the output
are totals over the profiled calls (3); `device_span_ms` runs from the first call's first kernel to
the last call's last one, so it includes the host gaps between calls.

With `--hlo-dump`, `phases` also times each part of a route by its `jax.named_scope` (`ttft`:
`C2CModel.prefill` as one program; `ttft_library`: the library's two programs,
`InferencePrograms.next_token_logits`; parts `receiver_prefix`, `sharer_prefix_0`, `fusion`, `suffix`):
start and end from each call's first kernel, averaged over the calls. `host_us_per_call` sums the
trace's host events; the profiler itself slows host work down (CUDA graph launches above all), so
for the host's true share compare one synchronised call with queued ones.

    python bench/profile_kernels.py --what decode,prefill,fuse,ttft,ttft_library,train [--top 15] [--window 40:100]

--window prints the kernels of that index range of the profiled calls in launch order (one layer's
worth shows what XLA emits per layer).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
if "--hlo-dump" in sys.argv:  # XLA reads its flags when the backend starts, so set them before importing jax
    _dump = sys.argv[sys.argv.index("--hlo-dump") + 1]
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={_dump} --xla_dump_hlo_as_text"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import bench_inference as bi  # noqa: E402
from c2c_jax.infer.generator import InferencePrograms  # noqa: E402
from c2c_jax.models.kv_cache import decode_capacity  # noqa: E402
from common import QWEN2_5_0_5B, QWEN3_0_6B, SMOKE_RECEIVER, SMOKE_SHARER, random_decoder  # noqa: E402


def _frames(text: str) -> dict:
    """stack_frame_id -> "file:line function" (innermost frame) from an HLO dump's frame tables."""
    tables, current = {}, None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
        elif current is not None and re.match(r"^\d+ ", line):
            key, value = line.split(" ", 1)
            current[key] = value
        elif current is not None and line.strip() and not re.match(r"^\d+ ", line):
            current = None
    files, functions = tables.get("FileNames", {}), tables.get("FunctionNames", {})
    locations = {}
    for key, value in tables.get("FileLocations", {}).items():
        f = dict(re.findall(r"(\w+)=(\d+)", value))
        path = files.get(f.get("file_name_id"), "?").strip('"')
        locations[key] = f"{os.path.basename(path)}:{f.get('line')} {functions.get(f.get('function_name_id'), '').strip(chr(34))}"
    return {key: locations.get(dict(re.findall(r"(\w+)=(\d+)", value)).get("file_location_id"), "?")
            for key, value in tables.get("StackFrames", {}).items()}


def hlo_sources(dump_dir: str) -> tuple[dict, dict, dict]:
    """From XLA's optimized-HLO text dumps, per module: instruction name -> "file:line function [op]",
    fusion instruction name -> the text of the computation it calls, and instruction name -> its
    phase (the outermost `jax.named_scope` under the jit, e.g. `C2CModel.prefill`'s "fusion"). Names
    use "_" for ".", as the kernels of the trace do."""
    sources, bodies, phases = (collections.defaultdict(dict) for _ in range(3))
    pattern = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*metadata=\{([^}]*)\}")
    for path in glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")):
        module = os.path.basename(path).split(".")[1]  # module_0007.jit_fuse.sm_9.0_gpu_after_optimizations.txt
        with open(path) as f:
            text = f.read()
        frames = _frames(text)
        computations = dict(re.findall(r"\n(%?[\w.\-]+) (?:\([^\n]*\) -> [^\n]*)\{\n(.*?)\n\}", text, re.S))
        for line in text.splitlines():
            m = pattern.match(line)
            if not m:
                continue
            name, meta = m.group(1).replace(".", "_"), m.group(2)
            op_path = (re.search(r'op_name="([^"]*)"', meta) or [None, ""])[1].split("/")
            frame = re.search(r"stack_frame_id=(\d+)", meta)
            sources[module][name] = f"{frames.get(frame.group(1), '?') if frame else '?'} [{op_path[-1]}]"
            scopes = [part for part in op_path[:-1] if not part.startswith("jit(")]
            phases[module][name] = scopes[0] if scopes else "(none)"
            called = re.search(r"calls=(%?[\w.\-]+)", line)
            if called and called.group(1) in computations:
                bodies[module][name] = computations[called.group(1)][:1500]
    return sources, bodies, phases


def kernel_op(event) -> tuple[str, str]:
    """(HLO module, instruction) a GPU kernel event belongs to, as far as the trace records it."""
    args = event.get("args", {})
    op = str(args.get("hlo_op", ""))
    # Kernels replayed from a CUDA graph report the command buffer; their own name is the fusion's.
    op = event["name"] if not op or op.startswith("command_buffer") else op
    return str(args.get("hlo_module", "")), op.replace(".", "_")


def phase_timeline(kernels: list, phases: dict, calls: int) -> dict:
    """Per phase, averaged over the profiled calls: when its first kernel starts and its last one ends
    (ms from the call's first kernel), its kernel time and kernel count. Overlapping spans are phases
    that ran at the same time. Every call launches the same kernels, so launch order splits them."""
    ordered = sorted(kernels, key=lambda e: e["ts"])
    per_call = len(ordered) // calls
    starts, ends = collections.defaultdict(list), collections.defaultdict(list)
    busy, count = collections.Counter(), collections.Counter()
    by_kernel = collections.defaultdict(collections.Counter)
    for c in range(calls):
        chunk = ordered[c * per_call:(c + 1) * per_call]
        first, last = {}, {}
        for e in chunk:
            module, op = kernel_op(e)
            phase = phases.get(module, {}).get(op, "(no HLO op: library kernel)")
            start, end = (e["ts"] - chunk[0]["ts"]) / 1e3, (e["ts"] + e.get("dur", 0) - chunk[0]["ts"]) / 1e3
            first[phase], last[phase] = min(first.get(phase, start), start), max(last.get(phase, end), end)
            busy[phase] += e.get("dur", 0) / 1e3
            count[phase] += 1
            by_kernel[phase][e["name"][:60]] += e.get("dur", 0) / 1e3 / calls
        for phase in first:
            starts[phase].append(first[phase])
            ends[phase].append(last[phase])
    rows = {phase: {"start_ms": round(statistics.mean(starts[phase]), 3), "end_ms": round(statistics.mean(ends[phase]), 3),
                    "busy_ms": round(busy[phase] / calls, 3), "kernels": round(count[phase] / calls, 1),
                    "top_ms": [(name, round(ms, 3)) for name, ms in by_kernel[phase].most_common(8)]}
            for phase in starts}
    return dict(sorted(rows.items(), key=lambda kv: kv[1]["start_ms"]))


def summarise(trace_dir: str, top: int, window: tuple[int, int] = (0, 0), sources: dict | None = None,
              bodies: dict | None = None, phases: dict | None = None, calls: int = 3) -> dict:
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True) + glob.glob(
        os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(files[0]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pids = {e["pid"]: e["args"].get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = [e for e in events if e.get("ph") == "X" and "gpu" in pids.get(e.get("pid"), "").lower()]
    kernels = [e for e in device if "memcpy" not in e.get("name", "").lower()] or device
    if not kernels:  # CPU: XLA's thunks, which the trace records with their HLO module and op
        kernels = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    if not kernels:
        return {"note": "no device events found", "processes": sorted(set(pids.values()))}
    sources, bodies = sources or {}, bodies or {}
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e.get("dur", 0) for e in kernels)
    by_name, count, by_source, fusion_text = (collections.Counter(), collections.Counter(), collections.Counter(),
                                              {})
    for e in kernels:
        name, us = e["name"][:90], e.get("dur", 0)
        by_name[name] += us
        count[name] += 1
        module, op = kernel_op(e)
        by_source[sources.get(module, {}).get(op, "library kernel " + e["name"][:40])] += us
        if op in bodies.get(module, {}):
            fusion_text[name] = bodies[module][op]
    busy = sum(e.get("dur", 0) for e in kernels)
    # Host-side work per call (dispatch, command-buffer updates and launches, synchronisation).
    host, host_count, kernel_ids = collections.Counter(), collections.Counter(), {id(e) for e in kernels}
    for e in events:
        if e.get("ph") == "X" and id(e) not in kernel_ids and "gpu" not in pids.get(e.get("pid"), "").lower():
            host[e["name"][:80]] += e.get("dur", 0) / calls
            host_count[e["name"][:80]] += 1 / calls
    ordered = sorted(kernels, key=lambda e: e["ts"])
    return {
        "device_span_ms": round((end - start) / 1e3, 3), "kernel_busy_ms": round(busy / 1e3, 3),
        "kernels": len(kernels),
        "top": [(name, round(us / 1e3, 3), count[name]) for name, us in by_name.most_common(top)],
        "sequence_us": [(e["name"][:70], round(e.get("dur", 0), 1)) for e in ordered[window[0]:window[1]]],
        "by_source_ms": [(src, round(us / 1e3, 3)) for src, us in by_source.most_common(top)] if sources else [],
        # The fused computations behind the costliest XLA-generated kernels (library kernels have none).
        "top_fusions": {name: fusion_text[name] for name, _ in by_name.most_common(top) if name in fusion_text},
        "phases": phase_timeline(kernels, phases, calls) if phases else {},
        "host_us_per_call": [(name, round(us, 1), round(host_count[name], 1)) for name, us in host.most_common(top)],
    }


def make_call(what: str, rcfg, scfg, t: int):
    """A zero-argument callable running one `what` on device."""
    if what in ("decode", "prefill"):
        model = random_decoder(rcfg)
        graphdef, state = nnx.split(model)
        if what == "prefill":
            fn = bi.prefill_fn(graphdef, "kv")
            tokens = jnp.zeros((1, t), jnp.int32)
            return lambda: fn(state, tokens)
        steps = 8
        fn = bi.decode_fn(graphdef, steps)
        holder = {"cache": bi._fill(model, model.init_cache(1, decode_capacity(t + steps + 1)), t)}

        def call():
            holder["cache"], token = fn(state, holder["cache"], jnp.zeros((1, 1), jnp.int32), t)
            holder["cache"] = bi._rewind(holder["cache"], t)
            return token
        return call
    if what in ("fuse", "ttft", "ttft_library"):
        c2c = bi.make_c2c(rcfg, scfg)
        graphdef, state = nnx.split(c2c)
        batch = bi.prompt_batch(1, t, rcfg["vocab_size"])
        if what == "fuse":
            @jax.jit
            def caches(state, batch):
                return nnx.merge(graphdef, state).prefill_kv(batch.prefix())

            @jax.jit
            def fuse(state, receiver_cache, sharer_caches, mask):
                return nnx.merge(graphdef, state).fuse(receiver_cache, sharer_caches, [mask]).k

            receiver_cache, sharer_caches = caches(state, batch)
            return lambda: fuse(state, receiver_cache, sharer_caches, batch.fuse_mask[0])

        if what == "ttft_library":  # the library's route: its two programs (`InferencePrograms`)
            programs = InferencePrograms(graphdef)
            return lambda: programs.next_token_logits(state, batch)

        @jax.jit
        def ttft(state, batch):
            logits, _ = nnx.merge(graphdef, state).prefill(batch, batch.tokens.shape[1])
            return jnp.argmax(logits, -1)
        return lambda: ttft(state, batch)
    if what == "train":
        import bench_train

        small = rcfg is SMOKE_RECEIVER
        one_step, _, _, _ = bench_train.build(rcfg, scfg, 32 if small else 1024, *((2, 32, 16) if small else (4, 1024, 1024)))
        return one_step
    raise SystemExit(f"unknown --what {what}")


def profile(call, top: int, window: tuple[int, int], dump_dir: str | None, keep_trace: str | None = None) -> dict:
    for _ in range(3):
        jax.block_until_ready(call())
    out = keep_trace or tempfile.mkdtemp()
    start = time.perf_counter()
    with jax.profiler.trace(out, create_perfetto_trace=True):
        for _ in range(3):
            jax.block_until_ready(call())
    wall = (time.perf_counter() - start) * 1e3 / 3
    sources, bodies, phases = hlo_sources(dump_dir) if dump_dir else (None, None, None)
    return {"wall_ms_per_call": round(wall, 3), "calls": 3, **summarise(out, top, window, sources, bodies, phases)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--what", default="decode", help="comma-separated: decode, prefill, fuse, ttft, "
                        "ttft_library, train")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--window", default="0:0", help="launch-order index range of kernels to list")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--unroll", type=int, default=None)
    parser.add_argument("--keep-trace", default=None,
                        help="directory to keep the Perfetto traces in (one subdirectory per --what)")
    parser.add_argument("--hlo-dump", default=None,
                        help="directory for XLA's HLO dumps; kernel time is then also summed per source line")
    parser.add_argument("--xla-attention", action="store_true",
                        help="one new token's attention over a cache as XLA fusions, not the Pallas kernel")
    args = parser.parse_args()
    if args.xla_attention:
        from unittest import mock

        mock.patch("c2c_jax.models.attention._pallas_decode_fits", lambda *_: False).start()
    import common

    common.SCAN_UNROLL = args.unroll
    rcfg, scfg = (SMOKE_RECEIVER, SMOKE_SHARER) if args.smoke else (QWEN3_0_6B, QWEN2_5_0_5B)
    t = 32 if args.smoke else 512
    window = tuple(int(x) for x in args.window.split(":"))
    for what in args.what.split(","):
        summary = {"what": what, "device": jax.devices()[0].device_kind, **profile(
            make_call(what, rcfg, scfg, t), args.top, window, args.hlo_dump,
            os.path.join(args.keep_trace, what) if args.keep_trace else None)}
        print(json.dumps(summary, indent=1), flush=True)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], f"profile_{what}.json"), "w") as f:
                json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
