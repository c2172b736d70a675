"""Serving benchmark: the OpenAI-compatible server under concurrent streaming clients, receiver-only
and C2C side by side, at Qwen3-0.6B <- Qwen2.5-0.5B shapes with random bf16 weights.

The script starts the server (`c2c_jax.serve.create_app` over an `engine.Engine`, in a process of
its own, on 127.0.0.1), compiles every program it will run, then for each number of clients and
each route runs that many clients, spread over several processes so that the load generator is
not the bottleneck. Each client streams one /v1/completions request after another (prompt of
--prompt-tokens random tokens, exactly --max-tokens new tokens: end of sequence is off) until
--seconds have passed. Reported per row: output tokens/s (all tokens the clients received over
the row's wall time) and p50/p99 time to first token and inter-token latency, as the clients see
them (time to the first and between consecutive streamed chunks, one token each).

    python bench/bench_serve.py [--clients 1,8,32,128] [--seconds 12] [--slots 128]
    python bench/bench_serve.py --smoke     # tiny models on the CPU, a few seconds per row
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import subprocess
import sys
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
    from c2c_jax.serve import create_app

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
                          max_queue=4 * max(args.clients_list), max_prefill_batch=args.prefill_batch)
    engine = Engine(receiver, routes, limits, eos_ids=(), pad_id=0)  # no end of sequence: fixed lengths
    start = time.perf_counter()
    if not args.smoke:  # the smoke run compiles on first use instead: fewer programs, sooner done
        engine.warm_up([args.prompt_tokens])
    settings = dict(device=common.device_name(), library=common.library_digest(), capacity=engine.capacity,
                    warm_up_s=round(time.perf_counter() - start, 1), scan_unroll=receiver.scan_unroll,
                    backend=jax.default_backend(), xla_flags=os.environ.get("XLA_FLAGS", ""))
    print("SETTINGS " + json.dumps(settings), flush=True)
    app = create_app(engine, tokenizer, defaults=Sampling(max_tokens=args.max_tokens))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


# ------------------------------------------------------------------------------------------------
# The load: clients in several processes.


async def client_loop(url: str, model: str, prompt: str, max_tokens: int, deadline: float, records: list):
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            stamps, ok = [], False
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        ok = True
                        break
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0]["text"]:
                        stamps.append(time.perf_counter())
            records.append({"sent": sent, "stamps": stamps, "ok": ok and response.status_code == 200})


def client_process(url, model, prompt, max_tokens, clients, start, seconds, queue):
    async def main():
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        records = []
        await asyncio.gather(*(client_loop(url, model, prompt, max_tokens, start + seconds, records)
                               for _ in range(clients)))
        return records

    queue.put(asyncio.run(main()))


def run_load(url, model, prompt, max_tokens, clients, seconds, processes):
    """Records of every request that `clients` clients made in `seconds` (plus their last requests)."""
    processes = min(processes, clients)
    share = [clients // processes + (i < clients % processes) for i in range(processes)]
    queue = multiprocessing.get_context("spawn").Queue()
    start = time.perf_counter() + 2.0  # every process running before the first request
    procs = [multiprocessing.get_context("spawn").Process(
        target=client_process, args=(url, model, prompt, max_tokens, n, start, seconds, queue)) for n in share]
    for p in procs:
        p.start()
    records = [r for _ in procs for r in queue.get()]
    for p in procs:
        p.join()
    return records


def summarize(records, max_tokens) -> dict:
    ttft = [1e3 * (r["stamps"][0] - r["sent"]) for r in records if r["stamps"]]
    itl = [1e3 * d for r in records for d in np.diff(r["stamps"])]
    tokens = sum(len(r["stamps"]) for r in records)
    span = max(r["stamps"][-1] for r in records if r["stamps"]) - min(r["sent"] for r in records)
    pct = lambda xs, q: round(float(np.percentile(xs, q)), 2) if len(xs) else None  # noqa: E731
    return dict(requests=len(records), failed=sum(not r["ok"] or len(r["stamps"]) != max_tokens for r in records),
                output_tokens_per_s=round(tokens / span, 1), ttft_p50_ms=pct(ttft, 50), ttft_p99_ms=pct(ttft, 99),
                itl_p50_ms=pct(itl, 50), itl_p99_ms=pct(itl, 99))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, short rows")
    parser.add_argument("--clients", default="1,8,32,128", help="concurrent clients per row")
    parser.add_argument("--seconds", type=float, default=12.0, help="load time per row")
    parser.add_argument("--slots", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prefill-batch", type=int, default=8)
    parser.add_argument("--processes", type=int, default=8, help="client processes")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.clients_list = [int(c) for c in args.clients.split(",")]
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
               f"--prefill-batch={args.prefill_batch}"] + (["--smoke"] if args.smoke else [])
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
                   max_tokens=args.max_tokens, prefill_batch=args.prefill_batch, seconds=args.seconds)
        # A prompt of exactly --prompt-tokens receiver tokens, different in every row.
        rng = np.random.default_rng(0)
        vocab = 512 if args.smoke else 151936
        for clients in args.clients_list:
            for model in ("receiver", "c2c"):
                prompt = " ".join(f"t{i}" for i in rng.integers(1, vocab, args.prompt_tokens))
                records = run_load(url, model, prompt, args.max_tokens, clients, args.seconds, args.processes)
                report.add(model=model, clients=clients, **summarize(records, args.max_tokens))
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
