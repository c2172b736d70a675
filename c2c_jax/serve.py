"""An OpenAI-compatible HTTP server for the receiver alone and for C2C, with continuous batching.

    python -m c2c_jax.serve --config=configs/qwen.py --config.generate.fuser=runs/qwen/final --port=8000
    python -m c2c_jax.serve --config=configs/qwen.py --route=c2c-llama=runs/llama/final@meta-llama/Llama-3.2-1B-Instruct

Endpoints: POST /v1/chat/completions and /v1/completions (streaming with `"stream": true`),
GET /v1/models, /health and /metrics (Prometheus). The request's `model` picks the route: the
receiver alone ("receiver" unless --receiver_name says otherwise), "c2c" for the config's fuser,
or any --route NAME. Every route decodes in the same slots (`engine.Engine`); this module only
translates HTTP to engine requests and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from c2c_jax.infer.engine import (ENGINE_PHASES, SERVER_LIMITS, Engine, InvalidRequest, Metrics, QueueFull, Request,
                                  Sampling)


# ------------------------------------------------------------------------------------------------
# Request bodies (the OpenAI fields this server reads; others are ignored, as OpenAI's own do).


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n != 1:
            raise ValueError(f"only n=1 is supported, not {n}")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stop


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def as_chat(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError(f"give one prompt, not {len(prompt)}")
            prompt = prompt[0]
        return prompt


# ------------------------------------------------------------------------------------------------
# Text out: incremental detokenization and stop strings.


class LoopDelivery:
    """Hands the engine thread's tokens to asyncio queues on one event loop: a batch of deliveries
    costs one wake-up of the loop, not one per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list = []

    def sink(self, queue: asyncio.Queue):
        def put(ids, finish):
            with self.lock:
                self.items.append((queue, (ids, finish)))
                first = len(self.items) == 1
            if first:
                self.loop.call_soon_threadsafe(self.flush)
        return put

    def flush(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


async def waiting_tokens(events: asyncio.Queue):
    """(token ids, finish reason or None) from a request's queue until it finishes, each time with
    every token waiting there: while the event loop keeps up that is one token, and when it falls
    behind (many streams) it sends fewer, longer pieces instead of falling further behind."""
    finish = None
    while finish is None:
        ids, finish = await events.get()
        while finish is None and not events.empty():
            more, finish = events.get_nowait()
            ids = ids + more
        yield ids, finish


class TextAssembler:
    """Token ids in, text out in whole characters, cut at the first stop string.

    Each new token's text is the difference between decoding a short window that ends with it and
    the same window without it (vLLM's method): constant work per token, and a byte-level token
    that ends in the middle of a character waits for the rest. Text that could still become a stop
    string is held back.
    """

    def __init__(self, tokenizer, stop: list[str], incremental: bool = True):
        """incremental=False: text only at the end, one decode (for a whole answer without stop strings)."""
        self.tokenizer = tokenizer
        self.stop = stop
        self.incremental = incremental or bool(stop)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # window [prefix, read) is already text
        self.text = ""
        self.sent = 0
        self.stopped = False

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, ids: list[int], final: bool = False) -> None:
        if not self.incremental:
            self.ids += ids
            if final:
                self.text = self._decode(self.ids)
            return
        for token in ids:
            self.ids.append(token)
            self._advance(final=False)
        if final:
            self._advance(final=True)
        if self.stop and not self.stopped:
            hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True

    def _advance(self, final: bool) -> None:
        done = self._decode(self.ids[self.prefix:self.read])
        whole = self._decode(self.ids[self.prefix:])
        if len(whole) > len(done) and (final or not whole.endswith("\ufffd")):
            self.text += whole[len(done):]
            self.prefix, self.read = self.read, len(self.ids)

    def take(self, final: bool) -> str:
        """The text not handed out yet; unless `final`, without a tail a stop string may still start with."""
        end = len(self.text)
        if not final and self.stop and not self.stopped:
            end -= max(len(s) for s in self.stop) - 1
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out


# ------------------------------------------------------------------------------------------------
# Metrics.


class PrometheusMetrics(Metrics):
    """The engine's metrics and the server's request counts, in a registry of their own."""

    def __init__(self, window_s: float = 10.0):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        latency = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
                   5.0, 10.0, 30.0)
        self.requests = Counter("c2c_requests", "HTTP requests by route and status code.", ["model", "status"],
                                registry=self.registry)
        self.queue = Gauge("c2c_queue_depth", "Requests waiting for a decode slot.", registry=self.registry)
        self.busy = Gauge("c2c_slots_busy", "Decode slots in use.", registry=self.registry)
        self.slots = Gauge("c2c_slots", "Decode slots.", registry=self.registry)
        self.ttft = Histogram("c2c_time_to_first_token_seconds", "From a request's arrival to its first token.",
                              buckets=latency, registry=self.registry)
        self.itl = Histogram("c2c_inter_token_latency_seconds", "Between a request's consecutive tokens.",
                             buckets=latency, registry=self.registry)
        self.queued = Histogram("c2c_queue_wait_seconds", "From a request's arrival to its prefill.",
                                buckets=latency, registry=self.registry)
        self.phases = Histogram("c2c_engine_phase_seconds", "The engine thread's time in each phase of an "
                                "iteration: waiting for the decode call and the prefill (the device); admitting, "
                                "dispatching the prefill, handing out first tokens, dispatching the decode call "
                                "and delivering (the host).", ["phase"],
                                buckets=latency, registry=self.registry)
        self._phase = {phase: self.phases.labels(phase=phase) for phase in ENGINE_PHASES}  # resolved once
        self.generated = Counter("c2c_generated_tokens", "Tokens generated.", registry=self.registry)
        rate = Gauge("c2c_tokens_per_second", f"Tokens generated per second over the last {window_s:g} s.",
                     registry=self.registry)
        self.window_s = window_s
        self._recent: list[tuple[float, int]] = []
        rate.set_function(self._rate)

    def queue_depth(self, n):
        self.queue.set(n)

    def slots_busy(self, n):
        self.busy.set(n)

    def queue_wait(self, seconds):
        self.queued.observe(seconds)

    def engine_phase(self, phase, seconds):
        self._phase[phase].observe(seconds)

    def first_token(self, seconds):
        self.ttft.observe(seconds)

    def inter_token(self, seconds):
        self.itl.observe(seconds)

    def tokens(self, n):
        self.generated.inc(n)
        now = time.monotonic()
        if self._recent and now - self._recent[-1][0] < 0.1:  # one bucket per 0.1 s
            self._recent[-1] = (self._recent[-1][0], self._recent[-1][1] + n)
        else:
            self._recent.append((now, n))
            cutoff = now - self.window_s
            while self._recent and self._recent[0][0] < cutoff:
                self._recent.pop(0)

    def _rate(self) -> float:
        cutoff = time.monotonic() - self.window_s
        return sum(n for t, n in self._recent if t >= cutoff) / self.window_s

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ------------------------------------------------------------------------------------------------
# The app.


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def create_app(engine: Engine, tokenizer, *, defaults: Sampling, metrics: PrometheusMetrics | None = None,
               start_engine: bool = True):
    """The FastAPI app over `engine`; `defaults` fill the sampling fields a request leaves out."""
    metrics = metrics or PrometheusMetrics()
    metrics.slots.set(engine.limits.slots)
    engine.metrics = metrics

    delivery: LoopDelivery | None = None  # set on the server's event loop

    @contextlib.asynccontextmanager
    async def lifespan(app):
        nonlocal delivery
        delivery = LoopDelivery(asyncio.get_running_loop())
        if start_engine:
            engine.start()
        yield
        if start_engine:
            engine.stop()

    app = FastAPI(title="c2c-jax", lifespan=lifespan)

    def error_response(error: APIError, model: str = "") -> JSONResponse:
        metrics.requests.labels(model=model, status=str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(APIError)
    async def _api_error(request, error: APIError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, error: RequestValidationError):
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, f"the request body is not valid JSON: {first.get('msg')}"))
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        return error_response(APIError(400, f"{param}: {message}" if param else message, param=param))

    @app.exception_handler(Exception)
    async def _unexpected(request, error: Exception):
        return error_response(APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "slots": engine.limits.slots, "slots_busy": engine.busy_rows,
                "queue_depth": len(engine.waiting)}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "c2c-jax"}
                                           for name in engine.routes]}

    def sampling_of(body: SamplingFields) -> Sampling:
        pick = lambda value, default: default if value is None else value  # noqa: E731
        top_k = pick(body.top_k, defaults.top_k)
        return Sampling(max_tokens=pick(body.max_completion_tokens, pick(body.max_tokens, defaults.max_tokens)),
                        temperature=pick(body.temperature, defaults.temperature), top_k=max(top_k, 0),
                        top_p=pick(body.top_p, defaults.top_p),
                        seed=pick(body.seed, int.from_bytes(uuid.uuid4().bytes[:8], "little")))

    def route_of(body: SamplingFields):
        if body.model not in engine.routes:
            raise APIError(404, f"the model {body.model!r} does not exist; this server has "
                           f"{', '.join(map(repr, engine.routes))}", param="model", code="model_not_found")
        return engine.routes[body.model]

    async def serve(http: HTTPRequest, body: SamplingFields, chat: bool):
        route = route_of(body)
        try:
            prompt = (route.encoder.encode_chat([m.as_chat() for m in body.messages]) if chat
                      else route.encoder.encode_text(body.prompt))
        except Exception as error:  # noqa: BLE001 - a template or tokenizer that rejects this input
            raise APIError(400, f"cannot encode the prompt: {error}", param="messages" if chat else "prompt")
        sampling = sampling_of(body)
        events: asyncio.Queue = asyncio.Queue()
        request = Request(route, prompt, sampling, delivery.sink(events))
        try:
            engine.submit(request)
        except InvalidRequest as error:
            raise APIError(400, str(error), param="messages" if chat else "prompt",
                           code="context_length_exceeded" if "context" in str(error) else None)
        except QueueFull as error:
            raise APIError(429, f"the server is busy: {error}; try again later", type="rate_limit_error")
        name = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        chunks = pieces(request, events, body.stop, incremental=body.stream or bool(body.stop))
        if body.stream:
            metrics.requests.labels(model=body.model, status="200").inc()
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(sse(chunks, request, name, body.model, chat, include_usage),
                                     media_type="text/event-stream")
        return await complete(http, chunks, request, name, body.model, chat)

    async def pieces(request: Request, events: asyncio.Queue, stop: list[str], incremental: bool):
        """(text, finish reason or None) as tokens arrive; cancels the request if abandoned."""
        text = TextAssembler(tokenizer, stop, incremental=incremental)
        finish = None
        try:
            async with contextlib.aclosing(waiting_tokens(events)) as tokens:
                async for ids, finish in tokens:
                    text.add(ids, final=finish is not None)
                    if text.stopped and finish is None:
                        engine.cancel(request)
                        finish = "stop"
                    yield text.take(final=finish is not None), finish
                    if finish is not None:
                        break
        finally:
            if finish is None:  # the client went away (or a stop string ended it): free the slot
                engine.cancel(request)

    def usage(request: Request) -> dict:
        n, m = request.prompt_tokens, request.generated
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    def choice(chat: bool, text: str, finish, delta: bool) -> dict:
        if chat:
            return {"index": 0, ("delta" if delta else "message"): {"role": "assistant", "content": text},
                    "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    async def complete(http: HTTPRequest, chunks, request: Request, name: str, model: str, chat: bool):
        async def collect():
            parts, finish = [], None
            async for part, finish in chunks:
                parts.append(part)
            return "".join(parts), finish

        async def disconnected():
            while not await http.is_disconnected():
                await asyncio.sleep(0.25)

        collecting, watching = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
        watching.cancel()
        if not collecting.done():  # the client left: stop generating for it
            collecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collecting
            await chunks.aclose()
            metrics.requests.labels(model=model, status="499").inc()
            return Response(status_code=499)
        text, finish = collecting.result()
        if finish.startswith("error"):
            raise APIError(500, f"generation failed: {finish.removeprefix('error: ')}", type="server_error")
        metrics.requests.labels(model=model, status="200").inc()
        return {"id": name, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model, "choices": [choice(chat, text, finish, delta=False)], "usage": usage(request)}

    async def sse(chunks, request: Request, name: str, model: str, chat: bool, include_usage: bool):
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices, **extra) -> str:
            return "data: " + json.dumps({"id": name, "object": kind, "created": created, "model": model,
                                          "choices": choices, **extra}) + "\n\n"

        if chat:  # OpenAI's first chunk announces the role
            yield event([choice(chat, "", None, delta=True)])
        try:
            async for text, finish in chunks:
                if finish is not None and finish.startswith("error"):
                    error = APIError(500, f"generation failed: {finish.removeprefix('error: ')}", type="server_error")
                    yield "data: " + json.dumps(error.body()) + "\n\n"
                    break
                if text:
                    yield event([choice(chat, text, None, delta=True)])
                if finish is not None:
                    final = choice(chat, "", finish, delta=True)
                    if chat:
                        final["delta"] = {}
                    yield event([final])
        finally:  # a client that disconnects mid-stream closes this generator: free its slot
            engine.cancel(request)
        if include_usage:
            yield event([], usage=usage(request))
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest, body: ChatRequest):
        return await serve(http, body, chat=True)

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest, body: CompletionRequest):
        return await serve(http, body, chat=False)

    return app


# ------------------------------------------------------------------------------------------------
# From a config to an engine, and the command line.


def parse_route(spec: str) -> tuple[str, str, str]:
    """"NAME=FUSER_DIR[@SHARER]" -> (name, fuser dir, sharer path or "")."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--route {spec!r}: write NAME=FUSER_DIR or NAME=FUSER_DIR@SHARER_MODEL")
    fuser, _, sharer = rest.partition("@")
    return name, fuser, sharer


def build_engine(config, limits, *, routes: list[str] = (), receiver_name: str = "receiver", c2c_name: str = "c2c"):
    """The engine for a config: the receiver alone, the config's fuser (if `generate.fuser`) and each
    --route, each C2C route with its own sharer (default: the config's). Returns (engine, tokenizer)."""
    import ml_collections

    from c2c_jax import build
    from c2c_jax.c2c.model import C2CModel
    from c2c_jax.infer.engine import Engine, Route, stop_token_ids
    from c2c_jax.infer.fuser_io import load_any_fuser

    specs = [(c2c_name, config.generate.fuser, "")] if config.generate.fuser else []
    specs += [parse_route(s) for s in routes]
    names = [receiver_name] + [name for name, _, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"route names must differ: {names}")
    # A missing fuser, or one for another pair, fails here, before any model loads.
    build.check_before_loading(config, [(fuser_dir, sharer_path or config.sharer.path)
                                        for _, fuser_dir, sharer_path in specs])
    receiver, receiver_tok = build.load_frozen(config.receiver)
    built = [Route(receiver_name, C2CModel(receiver), build.prompt_encoder(config, receiver_tok), fuse=False)]
    sharers = {}
    for name, fuser_dir, sharer_path in specs:
        key = sharer_path or config.sharer.path
        if key not in sharers:
            if key == config.receiver.path:
                sharers[key] = receiver, receiver_tok
            else:
                sharers[key] = build.load_frozen(ml_collections.ConfigDict(dict(path=key, dtype=config.sharer.dtype)))
        sharer, sharer_tok = sharers[key]
        fuser = load_any_fuser(fuser_dir, receiver.config, sharer.config)
        built.append(Route(name, C2CModel(receiver, [sharer], [fuser]),
                           build.prompt_encoder(config, receiver_tok, [sharer_tok]), fuse=True))
    engine = Engine(receiver, built, limits, eos_ids=stop_token_ids(receiver, receiver_tok),
                    pad_id=built[0].encoder.pad_id)
    return engine, receiver_tok


def use_compilation_cache(directory: str) -> None:
    """Keeps every compiled program in `directory` (JAX's persistent cache), so that a restart with the
    same models, limits and --warm_up loads them instead of compiling; call before the first compile."""
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # the small decode programs too
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main() -> None:
    from c2c_jax import cli

    cli.starting("serve")
    from absl import app, flags
    from ml_collections import config_flags

    from c2c_jax.config import use_inference_xla_flags

    use_inference_xla_flags()
    config_flag = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    host = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
    port = flags.DEFINE_integer("port", 8000, "Port to listen on.", lower_bound=0, upper_bound=65535)
    default = SERVER_LIMITS
    slots = flags.DEFINE_integer("slots", default.slots, "Decode slots: requests generating at the same time.",
                                 lower_bound=1)
    max_queue = flags.DEFINE_integer("max_queue", default.max_queue, "Requests waiting for a slot before new ones "
                                     "get 429.", lower_bound=0)
    max_prompt = flags.DEFINE_integer("max_prompt_tokens", default.max_prompt_tokens,
                                      "Longest prompt, in receiver tokens.", lower_bound=1)
    max_tokens = flags.DEFINE_integer("max_tokens", default.max_tokens, "Most new tokens one request may ask for.",
                                      lower_bound=1)
    prefill_batch = flags.DEFINE_integer("max_prefill_batch", default.max_prefill_batch, "Requests prefilled together.",
                                         lower_bound=1)
    decode_steps = flags.DEFINE_integer(
        "decode_steps", default.decode_steps, "Decode steps per dispatch: more divide the host's work per token, and "
        "stream tokens that many at a time.", lower_bound=1)
    route_flag = flags.DEFINE_multi_string("route", [], "Another C2C route: NAME=FUSER_DIR[@SHARER_MODEL].")
    receiver_name = flags.DEFINE_string("receiver_name", "receiver", "The receiver-alone route's model name.")
    c2c_name = flags.DEFINE_string("c2c_name", "c2c", "The model name of --config.generate.fuser's route.")
    warm_up = flags.DEFINE_list("warm_up", [], "Prompt lengths (tokens) whose programs are compiled before the "
                                "server listens, e.g. 256,1024; other lengths compile on their first request.")
    flags.register_validator("warm_up", lambda lengths: all(n.isdigit() and int(n) > 0 for n in lengths),
                             "--warm_up takes prompt lengths in tokens, e.g. --warm_up=256,1024")
    cache_dir = flags.DEFINE_string("compilation_cache_dir", "", "Directory of JAX's persistent compilation cache: "
                                    "a restart loads the programs compiled before instead of compiling them.")
    flags.mark_flags_as_required(["config"])

    def run():
        import uvicorn

        from c2c_jax.infer.engine import EngineLimits

        g = config_flag.value.generate
        if cache_dir.value:
            use_compilation_cache(cache_dir.value)
        limits = EngineLimits(slots=slots.value, max_prompt_tokens=max_prompt.value, max_tokens=max_tokens.value,
                              max_queue=max_queue.value, max_prefill_batch=prefill_batch.value,
                              decode_steps=decode_steps.value)
        try:
            engine, tokenizer = build_engine(config_flag.value, limits, routes=route_flag.value,
                                             receiver_name=receiver_name.value, c2c_name=c2c_name.value)
            engine.warm_up([int(w) for w in warm_up.value])
        except ValueError as error:
            raise app.UsageError(str(error))
        defaults = Sampling(max_tokens=min(g.max_new_tokens, limits.max_tokens), temperature=g.temperature,
                            top_k=g.top_k, top_p=g.top_p)
        uvicorn.run(create_app(engine, tokenizer, defaults=defaults), host=host.value, port=port.value,
                    log_level="warning")

    cli.run(run)


if __name__ == "__main__":
    main()
