"""Serving benchmark: the OpenAI-compatible server under open-loop load, receiver-only and C2C side by
side, at Qwen3-0.6B <- Qwen2.5-0.5B shapes with random bf16 weights.

The script starts the server (`c2c_jax.serve.create_app` over an `engine.Engine`, in a process of its
own, on 127.0.0.1) and compiles every program it will run (`Engine.warm_up`; the time and the number of
programs are in the settings row, with what is measured before any HTTP request: `decode_step_ms`,
a decode step per slot width (calls of --decode-steps steps, each call's tokens read on the host),
`prefill_ms`, a prefill call per route and prefill batch size, and `engine_alone`, every slot filled
at once through the engine without HTTP). Requests then arrive on
their own schedule, whether or not earlier ones have finished, so queueing shows in the time to first
token: each is one streamed /v1/completions request (a prompt of --prompt-tokens random tokens, exactly
--max-tokens new tokens: end of sequence is off), sent at seeded Poisson arrival times over --seconds,
from several processes so that the load generator is not the bottleneck. A 429 (queue full) is counted
as refused.

Load levels, two kinds (`--loads`). An open level N ("load": "open") offers N / T1 requests/s, where
T1 is the median latency of one request alone on the receiver-only route (measured first; the
calibration row). N clients that each sent their next request as soon as the last one ended would
send at that rate if every request kept its batch-1 latency; it is an offered load, not a cap on
concurrency, so when the server falls behind, requests pile up and the concurrency reached exceeds N.
A closed level N ("load": "closed") is N clients, each sending its next request as soon as its last
one has ended, for --seconds (their first requests spread over T1): exactly N requests in flight,
whatever the server's speed. Both routes get the same rate, arrival times and prompts at each level,
so that their rows differ only by the route.
Reported per row: output tokens/s (tokens received over the span from the first arrival to the last
token), p50/p99 time to first token and inter-token latency as the clients see them (between
streamed chunks: a chunk holds one token while the server keeps up, several when it falls behind;
`chunks_per_token` says how many), the median time per output token after the first (TPOT), and
the concurrency reached (mean number of requests in flight over the span, and
its maximum); and, from the server's metrics over the row, what the engine saw: the median first
token and wait for a prefill from each request's arrival (no HTTP), and the mean ms of each phase of
an engine iteration (`engine.ENGINE_PHASES`: the device's two waits, the host's admitting, dispatching
the prefill and the decode call, and delivering).

    python bench/bench_serve.py [--clients 1,8,32,128] [--loads open,closed] [--seconds 10] [--slots 256]
                                [--decode-steps 4]
    python bench/bench_serve.py --smoke     # tiny models on the CPU, a few seconds per row
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import itertools
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this tree's c2c_jax

import numpy as np  # noqa: E402


def numbered_tokenizer(vocab_size: int):
    """A word-level tokenizer with one word per id ("t123"): any id decodes to text, any prompt of
    N words is N tokens. Stands in for the real tokenizer, which random weights have no use for."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", unk_token="t0")


def serve(args) -> None:
    """The server process: random models at real shapes, every program compiled, then uvicorn."""
    from c2c_jax.config import use_inference_xla_flags

    use_inference_xla_flags()
    import jax
    import jax.numpy as jnp
    import uvicorn
    from flax import nnx

    import common
    from c2c_jax.infer.engine import Engine, EngineLimits, Route, Sampling
    from c2c_jax.c2c.fuser import Fuser
    from c2c_jax.c2c.model import C2CModel
    from c2c_jax.c2c.prompt import PromptEncoder
    from c2c_jax.serve import create_app, use_compilation_cache

    # Of the source just imported: the tree may change on disk during the minutes of warm-up.
    library = common.library_digest()
    if args.compilation_cache_dir:
        use_compilation_cache(args.compilation_cache_dir)
    receiver_cfg, sharer_cfg = ((common.SMOKE_RECEIVER, common.SMOKE_SHARER) if args.smoke
                                else (common.QWEN3_0_6B, common.QWEN2_5_0_5B))
    receiver = common.random_decoder(receiver_cfg)
    sharer = common.random_decoder(sharer_cfg, seed=1)
    fuser_config = common.fuser_config(receiver, sharer, 32 if args.smoke else 1024)
    fuser = nnx.jit(lambda: Fuser(fuser_config, rngs=nnx.Rngs(2)))()
    fuser.projectors.gate_logit[...] = jnp.ones_like(fuser.projectors.gate_logit[...])  # open gates
    tokenizer = numbered_tokenizer(receiver_cfg["vocab_size"])
    routes = [Route("receiver", C2CModel(receiver), PromptEncoder(tokenizer), fuse=False),
              Route("c2c", C2CModel(receiver, [sharer], [fuser]), PromptEncoder(tokenizer, [tokenizer]), fuse=True)]
    limits = EngineLimits(slots=args.slots, max_prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                          max_queue=args.max_queue, max_prefill_batch=args.prefill_batch,
                          decode_steps=args.decode_steps)
    engine = Engine(receiver, routes, limits, eos_ids=(), pad_id=0)  # no end of sequence: fixed lengths
    start = time.perf_counter()
    engine.warm_up([args.prompt_tokens], sampling=False)  # every request is greedy
    settings = dict(device=common.device_name(), library=library, capacity=engine.capacity,
                    warm_up_s=round(time.perf_counter() - start, 1), programs=engine.compiled_programs,
                    slot_widths=list(engine.widths), scan_unroll=receiver.scan_unroll,
                    backend=jax.default_backend(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                    # uvicorn's event loop and HTTP parser: uvloop and httptools where installed
                    uvloop=importlib.util.find_spec("uvloop") is not None,
                    httptools=importlib.util.find_spec("httptools") is not None)
    settings["decode_step_ms"] = decode_step_ms(engine)
    settings["prefill_ms"] = {route.name: prefill_ms(engine, route) for route in routes}
    settings["engine_alone"] = {route.name: engine_alone(engine, route, args) for route in routes}
    print("SETTINGS " + json.dumps(settings), flush=True)
    app = create_app(engine, tokenizer, defaults=Sampling(max_tokens=args.max_tokens))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def call_ms(engine, call, calls: int) -> float:
    """ms of one `call(slots) -> (slots, tokens)` on the engine's (donated) slots, its tokens read on the
    host each time (no overlap with the next call), after one untimed call."""
    engine.slots, tokens = call(engine.slots)
    np.asarray(tokens)
    start = time.perf_counter()
    for _ in range(calls):
        engine.slots, tokens = call(engine.slots)
        np.asarray(tokens)
    return (time.perf_counter() - start) / calls * 1e3


def decode_step_ms(engine, calls: int = 40) -> dict:
    """{slot width: ms} of one decode step over that many busy rows, its tokens read on the host after
    each decode call of --decode-steps steps (no overlap with the next, no admission, no HTTP): the
    device's share of a token. Every width starts from the same cache: each row sees a whole prompt
    (columns [0, prompt width)) and then the columns its steps write, as a request does."""
    import jax.numpy as jnp

    steps = engine.limits.decode_steps
    start = engine.prompt_width
    calls = min(calls, (engine.capacity - start) // steps - 1)  # every step writes a column
    times = {}
    for width in engine.widths:
        # A fresh mask per width: the decode step donates the slots, and with them the last one.
        seen = jnp.broadcast_to(jnp.arange(engine.capacity) < start, engine.slots.cache.valid.shape)
        engine.slots = dataclasses.replace(engine.slots, cache=dataclasses.replace(
            engine.slots.cache, valid=seen, end=jnp.asarray(start, jnp.int32)))
        active = np.ones((width,), bool)

        def step(slots, width=width, active=active):
            return engine.decode.step(width, engine.receiver_state, slots, active, sampled=False)

        times[width] = round(call_ms(engine, step, calls) / steps, 3)
    engine.end = int(engine.slots.cache.end)  # past the columns these steps wrote; compaction reclaims them
    return times


def prefill_ms(engine, route, calls: int = 10) -> dict:
    """{prefill batch size: ms} of one prefill call of `route` (prompt cache, fusion, first tokens, rows
    written into the slots) at the longest prompt bucket, its first tokens read on the host: the
    device's share of an admission."""
    from c2c_jax.infer.engine import Sampling, row_sampling

    times = {}
    for size in engine.prefill_sizes():
        prompt = route.encoder.encode_ids(np.full((engine.prompt_width,), 1, np.int32))
        batch = route.encoder.batch([prompt] * size, width=engine.prompt_width)
        rows = np.arange(size, dtype=np.int32) % engine.limits.slots
        sampling = row_sampling([Sampling(max_tokens=1)] * size)

        def prefill(slots, batch=batch, rows=rows, sampling=sampling):
            return route.programs.run(route.state, slots, batch, rows, sampling, sampled=False)

        times[size] = round(call_ms(engine, prefill, calls), 3)
    return times


def engine_alone(engine, route, args) -> dict:
    """The engine without HTTP: every slot filled with one route's requests at once, tokens counted on
    the engine thread. Output tokens/s and the time per decode step at full occupancy: the server's
    ceiling, against which the HTTP rows show what serving the streams costs."""
    from c2c_jax.infer.engine import Request, Sampling

    rng = np.random.default_rng(args.seed)
    prompt_ids = rng.integers(1, 512 if args.smoke else 151936, (args.slots, args.prompt_tokens))
    done = threading.Event()
    counts = {"tokens": 0, "finished": 0, "first": None}

    def sink(ids, finish):  # engine thread
        counts["tokens"] += len(ids)
        if counts["first"] is None and counts["tokens"] >= args.slots:
            counts["first"] = time.perf_counter()  # every row has its first token: decoding from here
        if finish is not None:
            counts["finished"] += 1
            if counts["finished"] == args.slots:
                done.set()

    engine.start()
    try:
        start = time.perf_counter()
        for ids in prompt_ids:
            engine.submit(Request(route, route.encoder.encode_ids(ids), Sampling(max_tokens=args.max_tokens), sink))
        done.wait()
        end = time.perf_counter()
    finally:
        engine.stop()
    steps = args.max_tokens - 1
    return dict(tokens_per_s=round(counts["tokens"] / (end - start), 1),
                decode_step_ms=round((end - counts["first"]) / steps * 1e3, 3))


# ------------------------------------------------------------------------------------------------
# The load: seeded Poisson arrivals, sent from several processes.


async def stream_one(client, body: dict, sent: float) -> dict:
    """One streamed request: its send time, the arrival time of each chunk with text (a chunk holds
    every token the server had for it: one while the server keeps up), the tokens generated (the
    usage chunk's count) and its status (0: the connection failed, as when the server's listen queue
    overflows)."""
    import httpx

    stamps, ok, status, tokens = [], False, 0, 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            status = response.status_code
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    ok = True
                    break
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.TransportError:
        ok = False
    return {"sent": sent, "stamps": stamps, "tokens": tokens, "ok": ok and status == 200, "status": status,
            "done": time.perf_counter()}


def load_client(url):
    """An HTTP client for the load, as many connections at once as requests in flight."""
    import httpx

    return httpx.AsyncClient(base_url=url, timeout=None,
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


def client_process(url, bodies, arrivals, queue):
    """Sends bodies[i] at perf_counter time arrivals[i], whether or not earlier requests have finished."""
    async def main():
        async with load_client(url) as c:
            tasks = []
            for body, at in zip(bodies, arrivals):
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                tasks.append(asyncio.create_task(stream_one(c, body, max(at, time.perf_counter()))))
            return await asyncio.gather(*tasks)

    queue.put(asyncio.run(main()))


def closed_clients_process(url, client_bodies, starts, stop_at, queue):
    """Client k sends client_bodies[k] in turn (cycling), each as soon as its last one has ended, the first
    at perf_counter time starts[k], until stop_at: each client has one request in flight at a time."""
    async def client(c, bodies, start):
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        records = []
        for body in itertools.cycle(bodies):
            if time.perf_counter() >= stop_at:
                return records
            records.append(await stream_one(c, body, time.perf_counter()))

    async def main():
        async with load_client(url) as c:
            per_client = await asyncio.gather(*(client(c, b, t) for b, t in zip(client_bodies, starts)))
            return [r for records in per_client for r in records]

    queue.put(asyncio.run(main()))


def poisson_arrivals(rate: float, seconds: float, seed: int) -> np.ndarray:
    """Arrival offsets (s) of a Poisson process of `rate` per second over [0, seconds), the first at 0."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=int(rate * seconds * 2) + 16)
    times = np.cumsum(gaps) - gaps[0]
    return times[times < seconds]


def run_load(url, bodies, offsets, processes):
    """Records of requests bodies[i] sent at offsets[i] (s from a common start), arrival k from process
    k mod P: every process sends a thinned Poisson stream, all of them together the exact schedule."""
    processes = max(1, min(processes, len(bodies)))
    start = time.perf_counter() + 2.0  # every process running before the first arrival
    return _in_processes(client_process, [(url, bodies[p::processes], [start + t for t in offsets[p::processes]])
                                          for p in range(processes)])


def run_closed_load(url, client_bodies, spread, seconds, processes):
    """Records of len(client_bodies) closed-loop clients (`closed_clients_process`), client k from process
    k mod P, their first requests spread evenly over `spread` s, sending for `seconds` s from the first."""
    processes = max(1, min(processes, len(client_bodies)))
    start = time.perf_counter() + 2.0
    starts = [start + spread * k / len(client_bodies) for k in range(len(client_bodies))]
    return _in_processes(closed_clients_process, [(url, client_bodies[p::processes], starts[p::processes],
                                                   start + seconds) for p in range(processes)])


def _in_processes(target, per_process_args):
    """The records that target(*args, queue) puts on the queue, one process per args, all joined."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=target, args=(*args, queue)) for args in per_process_args]
    for p in procs:
        p.start()
    records = [r for _ in procs for r in queue.get()]
    for p in procs:
        p.join()
    return records


def summarize(records, max_tokens) -> dict:
    """Throughput, latency percentiles and the concurrency reached: the time average of the number of
    requests in flight (the sum of their durations over the span, Little's law) and its maximum.
    The span runs from the first arrival to the last answer's end. Refused: a 429 (queue full);
    failed: any other request without exactly `max_tokens` tokens and a clean end."""
    served = [r for r in records if r["status"] != 429]
    ttft = [1e3 * (r["stamps"][0] - r["sent"]) for r in served if r["stamps"]]
    itl = [1e3 * d for r in served for d in np.diff(r["stamps"])]  # between chunks, as a client sees them
    # Time per output token after the first (vLLM's TPOT): a chunk of several tokens counts as several.
    tpot = [1e3 * (r["stamps"][-1] - r["stamps"][0]) / (r["tokens"] - 1) for r in served
            if len(r["stamps"]) > 1 and r["tokens"] > 1]
    tokens = sum(r["tokens"] for r in served)
    busy = [(r["sent"], r["done"]) for r in served]
    first = min(r["sent"] for r in records)
    span = max((end for _, end in busy), default=first + 1e-9) - first
    changes = sorted([(t, 1) for t, _ in busy] + [(t, -1) for _, t in busy])  # an end before a start at a tie
    in_flight = np.cumsum([0] + [d for _, d in changes])
    pct = lambda xs, q: round(float(np.percentile(xs, q)), 2) if len(xs) else None  # noqa: E731
    return dict(requests=len(records), refused=len(records) - len(served),
                failed=sum(not r["ok"] or r["tokens"] != max_tokens for r in served),
                output_tokens_per_s=round(tokens / span, 1),
                concurrency_mean=round(sum(end - sent for sent, end in busy) / span, 1),
                concurrency_max=int(in_flight.max()),
                ttft_p50_ms=pct(ttft, 50), ttft_p99_ms=pct(ttft, 99), itl_p50_ms=pct(itl, 50), itl_p99_ms=pct(itl, 99),
                tpot_p50_ms=pct(tpot, 50), chunks_per_token=round(sum(len(r["stamps"]) for r in served) / max(tokens, 1), 3))


def scrape(url) -> dict:
    """The server's /metrics samples: {(name, le or phase label): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, s.labels.get("le", s.labels.get("phase"))): s.value
            for family in text_string_to_metric_families(httpx.get(url + "/metrics").text) for s in family.samples}


def histogram_p50(before: dict, after: dict, name: str) -> float | None:
    """The median of what histogram `name` observed between two scrapes, interpolated linearly within
    its bucket (as Prometheus' histogram_quantile does)."""
    buckets = sorted((float(le), after[key] - before.get(key, 0.0)) for key in after
                     if key[0] == name + "_bucket" for le in [key[1]])
    total = buckets[-1][1] if buckets else 0.0
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= total / 2 and total:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (total / 2 - below) / max(count - below, 1e-9)
        lower, below = upper, count
    return None


def engine_breakdown(before: dict, after: dict) -> dict:
    """What the engine saw of a row, from its metrics: the median first token and wait for a prefill
    from a request's arrival (no HTTP), and the mean ms of each phase of an iteration."""
    from c2c_jax.infer.engine import ENGINE_PHASES

    delta = lambda key: after.get(key, 0.0) - before.get(key, 0.0)  # noqa: E731
    iterations = delta(("c2c_engine_phase_seconds_count", ENGINE_PHASES[0]))
    ms = lambda seconds: None if seconds is None else round(seconds * 1e3, 2)  # noqa: E731
    return dict(engine_ttft_p50_ms=ms(histogram_p50(before, after, "c2c_time_to_first_token_seconds")),
                engine_queue_wait_p50_ms=ms(histogram_p50(before, after, "c2c_queue_wait_seconds")),
                engine_iterations=int(iterations),
                engine_iteration_ms={phase: round(1e3 * delta(("c2c_engine_phase_seconds_sum", phase))
                                                  / max(iterations, 1), 2) for phase in ENGINE_PHASES})


def batch1_latency(url, body, repeats: int) -> float:
    """Median seconds of one request alone, sent one after another (the rates' calibration)."""
    import httpx

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=None) as client:
            return [await stream_one(client, body, time.perf_counter()) for _ in range(repeats)]

    records = asyncio.run(main())
    if not all(r["ok"] for r in records):
        raise SystemExit(f"a calibration request failed with status {[r['status'] for r in records]}")
    return float(np.median([r["done"] - r["sent"] for r in records]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, short rows")
    parser.add_argument("--clients", default="1,8,32,128",
                        help="load levels N: N / (batch-1 request latency) requests/s offered (open), N clients in "
                             "turn (closed)")
    parser.add_argument("--loads", default="open,closed",
                        help="kinds of load level: open (N / T1 requests/s offered), closed (N clients in turn)")
    parser.add_argument("--seconds", type=float, default=10.0, help="arrivals per row span this long")
    parser.add_argument("--seed", type=int, default=0, help="of the arrival times and prompts")
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--max-queue", type=int, default=512, help="the server's queue; more requests get 429")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prefill-batch", type=int, default=8)
    parser.add_argument("--decode-steps", type=int, default=4, help="the engine's decode steps per dispatch")
    parser.add_argument("--processes", type=int, default=8, help="load generator processes")
    parser.add_argument("--compilation-cache-dir", default="", help="JAX's persistent compilation cache")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.clients_list = [int(c) for c in args.clients.split(",")]
    args.loads_list = args.loads.split(",")
    if set(args.loads_list) - {"open", "closed"}:
        parser.error(f"--loads: a comma-separated list of open and closed, not {args.loads!r}")
    if args.smoke:
        args.slots, args.prompt_tokens, args.max_tokens = min(args.slots, 8), min(args.prompt_tokens, 32), \
            min(args.max_tokens, 8)
        args.prefill_batch, args.seconds = min(args.prefill_batch, 2), min(args.seconds, 2.0)
    if args.serve:
        return serve(args)

    # This process only generates load: JAX here stays off the accelerator, which the server needs whole.
    server_env = dict(os.environ)
    os.environ["JAX_PLATFORMS"] = "cpu"
    import httpx

    from common import Report

    port = free_port()
    command = [sys.executable, __file__, "--serve", f"--port={port}", f"--clients={args.clients}",
               f"--slots={args.slots}", f"--prompt-tokens={args.prompt_tokens}", f"--max-tokens={args.max_tokens}",
               f"--prefill-batch={args.prefill_batch}", f"--max-queue={args.max_queue}",
               f"--decode-steps={args.decode_steps}",
               f"--compilation-cache-dir={args.compilation_cache_dir}"] + (["--smoke"] if args.smoke else [])
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=server_env)
    url = f"http://127.0.0.1:{port}"
    try:
        settings = None
        for line in server.stdout:
            if line.startswith("SETTINGS "):
                settings = json.loads(line[len("SETTINGS "):])
                break
        if settings is None:
            raise SystemExit(f"the server exited with {server.wait()} before it was ready")
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        report = Report("serve")
        report.header.update(settings)
        report.add(what="settings", **settings, slots=args.slots, prompt_tokens=args.prompt_tokens,
                   max_tokens=args.max_tokens, prefill_batch=args.prefill_batch,
                   decode_steps=args.decode_steps, seconds=args.seconds,
                   max_queue=args.max_queue, seed=args.seed)
        rng = np.random.default_rng(args.seed)
        vocab = 512 if args.smoke else 151936

        def bodies(model, n):  # n prompts of exactly --prompt-tokens receiver tokens; end of sequence is off
            return [{"model": model, "prompt": " ".join(f"t{i}" for i in rng.integers(1, vocab, args.prompt_tokens)),
                     "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                     "stream_options": {"include_usage": True}} for _ in range(n)]

        for model in ("receiver", "c2c"):  # every program each route runs at batch 1 has run once
            batch1_latency(url, bodies(model, 1)[0], repeats=1)
        latency = batch1_latency(url, bodies("receiver", 1)[0], repeats=5)
        report.add(what="calibration", batch1_latency_s=round(latency, 4))
        for load, (level, clients) in itertools.product(args.loads_list, enumerate(args.clients_list)):
            if load == "open":
                rate = clients / latency
                offsets = poisson_arrivals(rate, args.seconds, seed=args.seed + level)
                prompts = bodies("receiver", len(offsets))
            else:  # each client's own prompts, enough for the row at batch-1 speed (then they cycle)
                rate, prompts = None, [bodies("receiver", int(args.seconds / latency) + 2) for _ in range(clients)]
            for model in ("receiver", "c2c"):  # the same arrivals and prompts for both routes
                before = scrape(url)
                if load == "open":
                    records = run_load(url, [dict(b, model=model) for b in prompts], offsets, args.processes)
                else:
                    records = run_closed_load(url, [[dict(b, model=model) for b in own] for own in prompts],
                                              latency, args.seconds, args.processes)
                report.add(model=model, load=load, clients=clients, offered_rps=rate and round(rate, 2),
                           **summarize(records, args.max_tokens), **engine_breakdown(before, scrape(url)))
        metrics = httpx.get(url + "/metrics").text
        report.add(what="server_metrics", requests_200=sum(
            float(line.split()[-1]) for line in metrics.splitlines()
            if line.startswith("c2c_requests_total{") and 'status="200"' in line))
        report.save()
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
