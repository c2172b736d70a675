"""The server's HTTP side alone: what the event loop adds to a first token under streaming load.

`c2c_jax.serve.create_app` runs over a stand-in engine with no model and no device: a thread that,
every --call-ms (a decode call), hands each request submitted since the last call its first token,
then each running request --decode-steps tokens, in the engine's order. The same open-loop load as
`bench_serve.py` (seeded Poisson arrivals, streamed /v1/completions, several load processes) then
measures the first token as the clients see it; the stand-in records when it handed each first token
out, so the difference is the HTTP side's share: parsing, tokenizing and submitting the request, and
delivering its first chunk behind every other stream's. Runs anywhere (no accelerator); compare
uvicorn's HTTP implementations with --http.

    python bench/bench_serve_http.py [--rate 99] [--call-ms 55] [--http h11|httptools]
    python bench/bench_serve_http.py --smoke     # a second of light load
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this tree's c2c_jax

import numpy as np  # noqa: E402

from bench_serve import free_port, numbered_tokenizer, poisson_arrivals, run_load, summarize  # noqa: E402


class StandInEngine:
    """What `create_app` uses of an `Engine`, with a clock in place of the device."""

    def __init__(self, route, *, slots: int, call_s: float, steps: int, first_token_log: str):
        from c2c_jax.infer.engine import EngineLimits, Metrics

        self.limits = EngineLimits(slots=slots)
        self.metrics = Metrics()
        self.routes = {route.name: route}
        self.call_s, self.steps, self.first_token_log = call_s, steps, first_token_log
        self.waiting, self.live = [], []
        self.lock = threading.Lock()
        self.first_token_s: list[float] = []

    @property
    def busy_rows(self) -> int:
        return len(self.live)

    def submit(self, request) -> None:
        with self.lock:
            self.waiting.append(request)

    def cancel(self, request) -> None:
        request.cancelled = True

    def start(self) -> None:
        self.stopping = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.thread.join()
        np.save(self.first_token_log, np.asarray(self.first_token_s))

    def run(self) -> None:
        due = time.perf_counter()
        while not self.stopping:
            due += self.call_s
            time.sleep(max(0.0, due - time.perf_counter()))
            with self.lock:
                admitted, self.waiting = self.waiting, []
            now = time.perf_counter()
            for request in admitted:  # first the new streams' first tokens, as the engine hands them out
                self.first_token_s.append(now - request.arrival)
                request.generated = 1
                request.on_tokens([7], None)
            live = []
            for request in self.live:  # then the running streams' tokens
                if request.cancelled:
                    continue
                n = min(self.steps, request.sampling.max_tokens - request.generated)
                request.generated += n
                finish = "length" if request.generated == request.sampling.max_tokens else None
                request.on_tokens([7] * n, finish)
                if finish is None:
                    live.append(request)
            self.live = live + admitted


def serve(args) -> None:
    import uvicorn

    from c2c_jax.c2c.prompt import PromptEncoder
    from c2c_jax.infer.engine import Sampling
    from c2c_jax.serve import create_app

    tokenizer = numbered_tokenizer(args.vocab)
    route = argparse.Namespace(name="receiver", encoder=PromptEncoder(tokenizer))
    engine = StandInEngine(route, slots=args.slots, call_s=args.call_ms / 1e3, steps=args.decode_steps,
                           first_token_log=args.first_token_log)
    app = create_app(engine, tokenizer, defaults=Sampling(max_tokens=args.max_tokens))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", http=args.http)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=99.0, help="requests/s (bench_serve's 32 clients on an H100)")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--call-ms", type=float, default=55.0, help="the stand-in decode call's period")
    parser.add_argument("--decode-steps", type=int, default=4, help="tokens per stream per call")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--http", default="h11", choices=("h11", "httptools"), help="uvicorn's HTTP implementation")
    parser.add_argument("--processes", type=int, default=3, help="load generator processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a second of light load")
    parser.add_argument("--vocab", type=int, default=151936, help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--first-token-log", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args)
    if args.smoke:
        args.rate, args.seconds, args.processes = min(args.rate, 20.0), min(args.seconds, 1.0), 1

    os.environ["JAX_PLATFORMS"] = "cpu"
    import tempfile

    import httpx

    from common import Report

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "first_token.npy")
        command = [sys.executable, __file__, "--serve", f"--port={port}", f"--first-token-log={log}",
                   f"--http={args.http}", f"--call-ms={args.call_ms}", f"--decode-steps={args.decode_steps}",
                   f"--max-tokens={args.max_tokens}", f"--slots={args.slots}"]
        server = subprocess.Popen(command)
        try:
            while server.poll() is None:
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            else:
                raise SystemExit(f"the server exited with {server.returncode} before it was ready")
            rng = np.random.default_rng(args.seed)
            offsets = poisson_arrivals(args.rate, args.seconds, seed=args.seed)
            bodies = [{"model": "receiver", "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True},
                       "prompt": " ".join(f"t{i}" for i in rng.integers(1, args.vocab, args.prompt_tokens))}
                      for _ in offsets]
            records = run_load(url, bodies, offsets, args.processes)
        finally:
            server.terminate()
            server.wait()
        engine_first_ms = 1e3 * np.load(log)
    report = Report("serve_http")
    report.add(what="settings", **{k: v for k, v in vars(args).items() if k not in ("serve", "port", "first_token_log", "smoke")})
    row = summarize(records, args.max_tokens)
    report.add(http=args.http, **row, engine_first_token_p50_ms=round(float(np.percentile(engine_first_ms, 50)), 2),
               http_share_of_first_token_p50_ms=round(row["ttft_p50_ms"] - float(np.percentile(engine_first_ms, 50)), 2))


if __name__ == "__main__":
    main()
