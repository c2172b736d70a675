"""The OpenAI-compatible server against a real uvicorn on 127.0.0.1, tiny random models (configs/tiny.py).

Greedy answers are checked token for token against `Generator` on each prompt alone; everything
goes through HTTP: the official `openai` client, raw httpx for bad input and concurrency.
"""

import asyncio
import dataclasses
import json
import socket
import threading
import time

import httpx
import jax
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from c2c_jax import build
from c2c_jax.infer.decode import SamplingConfig
from c2c_jax.infer.engine import ENGINE_PHASES, Engine, EngineLimits, Sampling, filtered_logits
from c2c_jax.infer.fuser_io import save_fuser
from c2c_jax.infer.generator import Generator
from c2c_jax.serve import TextAssembler, build_engine, create_app, waiting_tokens
from configs import tiny

LIMITS = EngineLimits(slots=8, max_prompt_tokens=120, max_tokens=12, max_queue=256, max_prefill_batch=2)
# Two prompt buckets (64 and 128 columns), different lengths in each.
PROMPTS = ["hi", "what is the capital of france?", "count: one two three four five six seven eight nine ten",
           "x" * 70]


class Server:
    """uvicorn serving `app` on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[self.socket]), daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join()
        self.socket.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    config = tiny.get_config()
    receiver, _, sharer, _ = build.load_pair(config)
    fuser = build.new_fuser(config, receiver, sharer)
    fuser.projectors.gate_logit[...] = 1.0 + 0 * fuser.projectors.gate_logit[...]  # open: C2C differs
    config.generate.fuser = str(tmp_path_factory.mktemp("fuser") / "fuser")
    save_fuser(fuser, config.generate.fuser)
    engine, tokenizer = build_engine(config, LIMITS)
    server = Server(create_app(engine, tokenizer, defaults=Sampling(max_tokens=8)))
    yield server, engine, tokenizer
    server.close()


@pytest.fixture(scope="module")
def expected(served):
    """route -> prompt -> Generator's greedy new token ids (end of sequence dropped) for the prompt alone."""
    _, engine, _ = served
    out = {}
    for name, route in engine.routes.items():
        generator = Generator(route.model, route.encoder, eos_ids=sorted(engine.eos_ids))
        out[name] = {}
        for prompt in PROMPTS:
            batch = route.encoder.batch([route.encoder.encode_chat([{"role": "user", "content": prompt}])])
            g = jax.device_get(generator.generate_batch(batch, SamplingConfig(max_new_tokens=LIMITS.max_tokens),
                                                        fuse=route.fuse))
            out[name][prompt] = [int(t) for t in g.tokens[0, : g.lengths[0]] if int(t) not in engine.eos_ids]
    return out


def engine_like(engine, limits=LIMITS):
    """A new engine over `engine`'s receiver and routes (models and compiled prefills shared), with its own
    slots and `limits`."""
    return Engine(engine.receiver, list(engine.routes.values()), limits, eos_ids=engine.eos_ids, pad_id=engine.pad_id)


def text_of(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


def chat_body(model, prompt, **kw):
    return {"model": model, "messages": [{"role": "user", "content": prompt}], **kw}


def wait_until_idle(engine):
    for _ in range(400):
        if not engine.busy_rows and not engine.waiting:
            return
        time.sleep(0.05)
    raise AssertionError(f"{engine.busy_rows} rows still busy, {len(engine.waiting)} waiting")


def test_openai_client_streaming_and_not(served, expected):
    openai = pytest.importorskip("openai")
    server, engine, tokenizer = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert {m.id for m in client.models.list().data} == {"receiver", "c2c"}
    for model in ("receiver", "c2c"):
        prompt = PROMPTS[1]
        want = expected[model][prompt][:6]
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=6, temperature=0)
        assert reply.choices[0].message.content == text_of(tokenizer, want)
        assert reply.choices[0].finish_reason == ("length" if len(want) == 6 else "stop")
        n_prompt = len(engine.routes[model].encoder.encode_chat([{"role": "user", "content": prompt}]).tokens)
        assert reply.usage.prompt_tokens == n_prompt
        assert reply.usage.completion_tokens == 6 and reply.usage.total_tokens == n_prompt + 6

        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=6, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text_of(tokenizer, want)
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
            reply.choices[0].finish_reason]
        assert chunks[-1].usage.completion_tokens == 6
    # Text completion: the raw prompt, no chat template.
    route = engine.routes["c2c"]
    generator = Generator(route.model, route.encoder, eos_ids=sorted(engine.eos_ids))
    g = jax.device_get(generator.generate_batch(route.encoder.batch([route.encoder.encode_text("the sun is")]),
                                                SamplingConfig(max_new_tokens=LIMITS.max_tokens)))
    want = [int(t) for t in g.tokens[0, : g.lengths[0]] if int(t) not in engine.eos_ids][:5]
    reply = client.completions.create(model="c2c", prompt="the sun is", max_tokens=5, temperature=0)
    assert reply.choices[0].text == text_of(tokenizer, want)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="c2c", prompt="the sun is", max_tokens=5, temperature=0, stream=True))
    assert streamed == reply.choices[0].text


def test_greedy_matches_generator_under_concurrent_mixed_requests(served, expected):
    """Both routes, both prompt buckets and several max_tokens at once, with sampled requests in the
    same batch: every greedy answer is Generator's for its prompt alone."""
    server, engine, tokenizer = served
    jobs = []
    for i, prompt in enumerate(PROMPTS):
        for j, model in enumerate(("receiver", "c2c")):
            jobs.append((model, prompt, 3 + (i + j) % 10, None))
            jobs.append((model, prompt, 8, 0.8))  # sampled neighbours
    bodies = [chat_body(model, prompt, max_tokens=m, **({"temperature": 0} if t is None else
                                                        {"temperature": t, "seed": k}))
              for k, (model, prompt, m, t) in enumerate(jobs)]

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=None) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))

    replies = asyncio.run(fire())
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    for (model, prompt, m, temperature), reply in zip(jobs, replies):
        if temperature is None:
            assert reply.json()["choices"][0]["message"]["content"] == text_of(tokenizer, expected[model][prompt][:m])
    wait_until_idle(engine)


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(served, expected):
    server, _, tokenizer = served
    with httpx.Client(base_url=server.url, timeout=None) as client:
        def ask(**kw):
            r = client.post("/v1/chat/completions", json=chat_body("c2c", PROMPTS[1], max_tokens=10, **kw))
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        assert ask(temperature=1.5, seed=7) == ask(temperature=1.5, seed=7)
        assert len({ask(temperature=2.0, seed=s) for s in range(4)}) > 1
        assert ask(temperature=1.5, top_k=1, seed=3) == text_of(tokenizer, expected["c2c"][PROMPTS[1]][:10])


def test_stop_strings_cut_the_answer(served, expected):
    server, _, tokenizer = served
    full = text_of(tokenizer, expected["receiver"][PROMPTS[2]][:12])
    stop = next(full[i:i + 2] for i in range(2, len(full) - 1) if full[i:i + 2] not in full[:i + 1])
    with httpx.Client(base_url=server.url, timeout=None) as client:
        r = client.post("/v1/chat/completions", json=chat_body("receiver", PROMPTS[2], max_tokens=12, temperature=0,
                                                               stop=[stop, "never seen"]))
        choice = r.json()["choices"][0]
        assert choice["message"]["content"] == full[: full.index(stop)] and choice["finish_reason"] == "stop"
        with client.stream("POST", "/v1/chat/completions", json=chat_body(
                "receiver", PROMPTS[2], max_tokens=12, temperature=0, stop=stop, stream=True)) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == full[: full.index(stop)]


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "gpt-9"),
    ({"model": "c2c", "messages": [{"role": "user", "content": "word " * 40}]}, 400, "max_prompt_tokens"),
    ({"model": "c2c", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"model": "c2c", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"model": "c2c", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n=1"),
    ({"model": "c2c", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 999}, 400, "max_tokens"),
    ({"model": "c2c", "messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, 400, "stop"),
    ({"model": "c2c", "messages": []}, 400, "messages"),
    ({"model": "c2c", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ({"model": "c2c"}, 400, "messages"),
    ({"model": "c2c", "prompt": ["a", "b"]}, 400, "one prompt"),
])
def test_bad_requests_get_openai_errors_and_the_server_lives_on(served, body, status, fragment):
    server, _, _ = served
    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
    with httpx.Client(base_url=server.url, timeout=None) as client:
        r = (client.post(path, content=body, headers={"content-type": "application/json"}) if isinstance(body, bytes)
             else client.post(path, json=body))
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert fragment in error["message"] and error["type"]
        assert client.get("/health").json()["status"] == "ok"


def test_a_failing_program_fails_its_requests_not_the_server(served, expected, monkeypatch):
    server, engine, tokenizer = served
    wait_until_idle(engine)

    def broken(*args, **static):
        raise RuntimeError("out of device memory (simulated)")

    monkeypatch.setattr(engine.routes["receiver"].programs, "run", broken)
    with httpx.Client(base_url=server.url, timeout=None) as client:
        r = client.post("/v1/chat/completions", json=chat_body("receiver", "hi", max_tokens=4))
        assert r.status_code == 500 and "simulated" in r.json()["error"]["message"]
        monkeypatch.undo()
        r = client.post("/v1/chat/completions", json=chat_body("c2c", PROMPTS[0], max_tokens=4, temperature=0))
        assert r.json()["choices"][0]["message"]["content"] == text_of(tokenizer, expected["c2c"][PROMPTS[0]][:4])


@pytest.fixture
def idle_server(served):
    """A server whose engine does not run: requests stay queued (1 slot, 2 places in the queue)."""
    _, engine, tokenizer = served
    idle = engine_like(engine, EngineLimits(slots=1, max_queue=2, max_tokens=4))
    server = Server(create_app(idle, tokenizer, defaults=Sampling(max_tokens=4), start_engine=False))
    yield server, idle
    server.close()


def test_a_full_queue_answers_429_and_clients_that_leave_are_cancelled(idle_server):
    server, idle = idle_server

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=None) as client:
            async def stream_one_event():
                async with client.stream("POST", "/v1/chat/completions",
                                         json=chat_body("c2c", "hi", stream=True)) as s:
                    async for _ in s.aiter_lines():
                        return  # leave after the first event

            waiting = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat_body("c2c", "hi")))
            streaming = asyncio.ensure_future(stream_one_event())
            while len(idle.waiting) < 2:
                await asyncio.sleep(0.02)
            refused = await client.post("/v1/chat/completions", json=chat_body("receiver", "hi"))
            await streaming
            waiting.cancel()  # the non-streaming client gives up
            return refused

    refused = asyncio.run(fire())
    assert refused.status_code == 429 and "busy" in refused.json()["error"]["message"]
    for _ in range(200):
        if all(r.cancelled for r in idle.waiting):
            break
        time.sleep(0.05)
    assert len(idle.waiting) == 2 and all(r.cancelled for r in idle.waiting)


def test_a_cancelled_request_frees_its_row_at_once(served):
    _, engine, _ = served
    from c2c_jax.infer.engine import Request

    local = Engine(engine.receiver, list(engine.routes.values()),
                   EngineLimits(slots=2, max_tokens=12, max_prompt_tokens=64, max_prefill_batch=1),
                   eos_ids=(), pad_id=engine.pad_id)
    route = local.routes["c2c"]
    local.warm_up([64])  # every program this test runs, compiled ahead
    programs = (local.decode.step, local.decode.compact, local.decode.move_row, route.programs.prefill)
    compiled = [len(p.compiled) for p in programs]
    seen = {"long": [], "other": []}
    long = Request(route, route.encoder.encode_chat([{"role": "user", "content": "hi"}]), Sampling(max_tokens=12),
                   lambda ids, finish: seen["long"].append((ids, finish)))
    other = Request(route, route.encoder.encode_chat([{"role": "user", "content": "yo"}]), Sampling(max_tokens=3),
                    lambda ids, finish: seen["other"].append((ids, finish)))
    local.submit(long)
    local.iteration()  # admits it (first token) and dispatches a step
    local.iteration()  # reads the step's token, dispatches the next step, then delivers it
    assert local.busy_rows == 1 and len(seen["long"]) == 2
    local.cancel(long)
    local.submit(other)
    local.iteration()  # frees the row, admits the other request into it; the old row's token is dropped
    assert local.rows.count(other) == 1 and long not in local.rows and len(seen["long"]) == 2
    while local.busy_rows or local.pending is not None:
        local.iteration()
    assert [f for _, f in seen["other"]] == [None, None, "length"] and len(seen["long"]) == 2
    assert [len(p.compiled) for p in programs] == compiled


def test_the_engine_programs_hold_no_conditional_and_only_counted_loops(served):
    """What the engine dispatches never makes the host wait for the device: on a GPU, XLA reads a
    conditional's predicate, or the condition of a loop whose trip count it does not know, back to
    the host and blocks the dispatching thread until the device has computed it. The greedy and
    sampling variants of the decode step and of both routes' prefills, as compiled."""
    import re

    _, engine, _ = served
    local = engine_like(engine, dataclasses.replace(LIMITS, decode_steps=3))
    local.warm_up([64])
    programs = {("step", key): compiled for key, compiled in local.decode.step.compiled.items()}
    programs.update({(name, key): compiled for name, route in local.routes.items()  # with other engines'
                     for key, compiled in route.programs.prefill.compiled.items()})
    variants = (("sampled", False), ("sampled", True))
    assert {("step", (w, v)) for w in local.widths for v in variants} <= set(programs)
    assert {(name, (((size, 64), local.slots.cache.k.shape), v)) for name in local.routes
            for size in local.prefill_sizes() for v in variants} <= set(programs)
    for name, compiled in programs.items():
        text = compiled.as_text()
        assert " conditional(" not in text, name
        loops = re.findall(r" while\(.*", text)
        assert all("known_trip_count" in loop for loop in loops), (name, loops)


def test_a_request_that_arrives_during_a_call_is_prefilled_before_the_next_call(served, expected):
    """The engine waits for the decode call in flight before it admits: a request submitted while the
    host waits for a call's tokens gets its first token from that same iteration, and the next call
    already decodes its row (admitting first and waiting after would leave it for one more call).
    That first token is handed out before the waited-for call's tokens of the running request (so it
    leads the server's event loop). Both answers are still Generator's."""
    _, engine, _ = served
    from c2c_jax.infer.engine import Request

    local = engine_like(engine)
    got = {"early": [], "late": []}
    handed_out = []  # request names, in the order the engine hands tokens out

    def request(name, model, prompt):
        route = local.routes[model]

        def sink(ids, finish):
            got[name].extend(ids)
            handed_out.append(name)

        return Request(route, route.encoder.encode_chat([{"role": "user", "content": prompt}]),
                       Sampling(max_tokens=LIMITS.max_tokens), sink)

    early, late = request("early", "receiver", PROMPTS[0]), request("late", "c2c", PROMPTS[1])
    local.submit(early)
    local.iteration()  # admits `early`, dispatches the first call

    class ArrivesWhileWaited:  # the call's tokens; reading them is when `late` arrives
        def __init__(self, tokens):
            self.tokens = tokens

        def __array__(self, dtype=None, copy=None):
            local.submit(late)
            return np.asarray(self.tokens, dtype)

    tokens, rows = local.pending
    local.pending = (ArrivesWhileWaited(tokens), rows)
    local.iteration()
    assert len(got["late"]) == 1 and late.row is not None
    assert handed_out[-2:] == ["late", "early"], handed_out
    assert [request for _, request in local.pending[1]] == [early, late]
    while local.busy_rows or local.pending is not None:
        local.iteration()
    assert got["early"] == expected["receiver"][PROMPTS[0]] and got["late"] == expected["c2c"][PROMPTS[1]]


def test_the_engine_restarts_after_stop_and_puts_the_switch_interval_back(served, expected):
    """Start, serve, stop, twice over: each run answers as `Generator` does, a second `start` while
    running is refused, and `stop` leaves the interpreter's GIL switch interval as `start` found it."""
    import sys

    from c2c_jax.infer.engine import SWITCH_INTERVAL_S, Request

    _, engine, _ = served
    local = engine_like(engine)
    route = local.routes["receiver"]
    previous = sys.getswitchinterval()
    sys.setswitchinterval(0.004)
    try:
        for _ in range(2):
            local.start()
            assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)
            with pytest.raises(RuntimeError, match="running already"):
                local.start()
            got, done = [], threading.Event()
            local.submit(Request(route, route.encoder.encode_chat([{"role": "user", "content": PROMPTS[1]}]),
                                 Sampling(max_tokens=LIMITS.max_tokens),
                                 lambda ids, finish: got.extend(ids) or (finish is not None and done.set())))
            assert done.wait(timeout=600)
            local.stop()
            assert got == expected["receiver"][PROMPTS[1]]
            assert sys.getswitchinterval() == pytest.approx(0.004)
    finally:
        sys.setswitchinterval(previous)


def test_the_step_narrows_with_the_load_and_moved_rows_decode_on(served, expected):
    """Three requests in rows 0-2; when the two short ones finish, the long one moves to row 0 and
    the step runs over one row, not eight: every answer is still Generator's for its prompt alone."""
    _, engine, _ = served
    from c2c_jax.infer.engine import Request

    local = engine_like(engine)
    assert local.widths == (1, 8)
    long_model, long_prompt = max(((m, p) for m in expected for p in PROMPTS[:3]),
                                  key=lambda mp: len(expected[mp[0]][mp[1]]))
    jobs = [("receiver", PROMPTS[0], 2), ("c2c", PROMPTS[1], 3), (long_model, long_prompt, LIMITS.max_tokens)]
    got = {k: [] for k in range(len(jobs))}
    for k, (model, prompt, m) in enumerate(jobs):
        route = local.routes[model]
        local.submit(Request(route, route.encoder.encode_chat([{"role": "user", "content": prompt}]),
                             Sampling(max_tokens=m), lambda ids, finish, k=k: got[k].extend(ids)))
    widths, moves = [], []
    step, move = local.decode.step, local.decode.move_row
    local.decode.step = lambda width, *args, **static: widths.append(width) or step(width, *args, **static)
    local.decode.move_row = lambda key, slots, source, target: moves.append((int(source), int(target))) or move(
        key, slots, source, target)
    while local.waiting or local.busy_rows or local.pending is not None:
        local.iteration()
    for k, (model, prompt, m) in enumerate(jobs):
        assert got[k] == expected[model][prompt][:m], (model, prompt)
    assert len(got[2]) > 4  # it outlived the others by more than a step or two
    assert len(moves) == 1 and moves[0][0] > 0 == moves[0][1] and widths[0] == 8 and widths[-1] == 1


def answer_in_the_engine(local, jobs):
    """Runs `jobs` [(model, prompt, max_tokens, temperature)] through the engine `local` on this thread,
    job k with seed k, until all have finished; checks that each finished once, last. Returns
    {k: new token ids}."""
    from c2c_jax.infer.engine import Request

    got, finishes = {k: [] for k in range(len(jobs))}, {k: [] for k in range(len(jobs))}

    def sink(k):
        return lambda ids, finish: got[k].extend(ids) or finishes[k].append(finish)

    for k, (model, prompt, m, t) in enumerate(jobs):
        route = local.routes[model]
        local.submit(Request(route, route.encoder.encode_chat([{"role": "user", "content": prompt}]),
                             Sampling(max_tokens=m, temperature=t, seed=k), sink(k)))
    while local.waiting or local.busy_rows or local.pending is not None:
        local.iteration()
    for reasons in finishes.values():
        assert reasons[-1] in ("stop", "length") and reasons[:-1] == [None] * (len(reasons) - 1), reasons
    return got


def test_several_decode_steps_per_call_answer_as_one_step_per_call(served, expected):
    """Three decode steps per dispatch, both routes, max_tokens ending inside a call and after it, the
    cache compacted while rows decode, then a request alone (a step over one row of eight): greedy
    answers are Generator's for each prompt alone, and seeded samples are those of an engine that
    decodes one step per dispatch."""

    _, engine, _ = served
    mixed = [(model, prompt, 1 + (i + j + r) % LIMITS.max_tokens, t)
             for r in range(3) for i, prompt in enumerate(PROMPTS[:3]) for j, model in enumerate(("receiver", "c2c"))
             for t in (0.0, 0.9)]
    # The answer that varies most: the one that tells a lost column of the cache best.
    alone = [max(((m, p, LIMITS.max_tokens, 0.0) for m in expected for p in PROMPTS[:3]),
                 key=lambda job: len(set(expected[job[0]][job[1]])))]

    several = engine_like(engine, dataclasses.replace(LIMITS, decode_steps=3))
    # Its write column starts 10 columns before the end of the cache: it compacts within a few calls.
    several.end = several.capacity - 10
    several.slots = dataclasses.replace(several.slots, cache=dataclasses.replace(several.slots.cache,
                                                                                 end=jax.numpy.int32(several.end)))
    shifts, widths = [], []
    compact, step = several.decode.compact, several.decode.step
    several.decode.compact = lambda key, slots, shift: shifts.append(int(shift)) or compact(key, slots, shift)
    several.decode.step = lambda width, *args, **static: widths.append(width) or step(width, *args, **static)
    got = answer_in_the_engine(several, mixed)
    assert got == answer_in_the_engine(engine_like(engine), mixed)
    assert shifts  # the cache filled up and was compacted
    widths.clear()
    got_alone = answer_in_the_engine(several, alone)
    assert set(widths) == {1} and len(widths) >= 3
    for jobs, answers in ((mixed, got), (alone, got_alone)):
        for k, (model, prompt, m, t) in enumerate(jobs):
            if t == 0.0:
                assert answers[k] == expected[model][prompt][:m], (model, prompt, m)


def test_decode_calls_longer_than_the_answers_stay_within_the_cache(served, expected):
    """40 steps a call, more than any answer (12 tokens) or prompt bucket (64): every call's columns
    lie within the cache, which is compacted between calls, and every answer is still Generator's."""

    _, engine, _ = served
    local = engine_like(engine, dataclasses.replace(LIMITS, max_prompt_tokens=60, decode_steps=40))
    shifts, spans = [], []
    compact, step = local.decode.compact, local.decode.step
    local.decode.compact = lambda key, slots, shift: shifts.append(int(shift)) or compact(key, slots, shift)

    def spanned_step(width, *args, **static):
        spans.append((local.end, local.end + 40))
        return step(width, *args, **static)

    local.decode.step = spanned_step
    jobs = [(model, prompt, 1 + (3 * i + j) % LIMITS.max_tokens, 0.0) for i in range(6)
            for prompt in PROMPTS[:2] for j, model in enumerate(("receiver", "c2c"))]
    got = answer_in_the_engine(local, jobs)
    assert len(shifts) >= 2 and all(end <= local.capacity for _, end in spans), (shifts, spans, local.capacity)
    for k, (model, prompt, m, _) in enumerate(jobs):
        assert got[k] == expected[model][prompt][:m], (model, prompt, m)


def test_bounded_load_no_error_no_mixup(served, expected):
    """32 concurrent clients, 192 requests in all: every answer is its own prompt's greedy answer."""
    server, engine, tokenizer = served
    models = ("receiver", "c2c")
    jobs = [(models[k % 2], PROMPTS[k % len(PROMPTS)], 1 + k % 4) for k in range(192)]

    async def client_loop(client, queue, results):
        while queue:
            k = queue.pop()
            model, prompt, m = jobs[k]
            r = await client.post("/v1/chat/completions", json=chat_body(model, prompt, max_tokens=m, temperature=0))
            results[k] = r

    async def fire():
        queue, results = list(range(len(jobs))), {}
        async with httpx.AsyncClient(base_url=server.url, timeout=None,
                                     limits=httpx.Limits(max_connections=32)) as client:
            await asyncio.gather(*(client_loop(client, queue, results) for _ in range(32)))
        return results

    results = asyncio.run(fire())
    assert len(results) == len(jobs)
    for k, (model, prompt, m) in enumerate(jobs):
        assert results[k].status_code == 200, results[k].text
        assert results[k].json()["choices"][0]["message"]["content"] == text_of(tokenizer, expected[model][prompt][:m])
    wait_until_idle(engine)
    with httpx.Client(base_url=server.url) as client:
        iterations = None
        for _ in range(100):  # until the engine's last iteration has timed all its phases
            metrics = client.get("/metrics").text
            samples = {(s.name, s.labels.get("le", s.labels.get("phase"))): s.value
                       for family in text_string_to_metric_families(metrics) for s in family.samples}
            last, iterations = iterations, [samples["c2c_engine_phase_seconds_count", p] for p in ENGINE_PHASES]
            if iterations == last:
                break
            time.sleep(0.05)
    for name in ("c2c_requests_total", "c2c_queue_depth", "c2c_slots_busy", "c2c_time_to_first_token_seconds_bucket",
                 "c2c_inter_token_latency_seconds_bucket", "c2c_generated_tokens_total", "c2c_tokens_per_second"):
        assert name in metrics
    served_ok = sum(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("c2c_requests_total{") and 'status="200"' in line)
    assert served_ok >= len(jobs)
    # A request's wait for its prefill ends before its first token: at every bound, at least as many
    # requests had waited no longer than it as had their first token within it.
    bounds = [le for name, le in samples if name == "c2c_time_to_first_token_seconds_bucket"]
    assert samples["c2c_time_to_first_token_seconds_count", None] >= len(jobs)
    for le in bounds:
        assert samples["c2c_queue_wait_seconds_bucket", le] >= samples["c2c_time_to_first_token_seconds_bucket", le]
    # An iteration times its phases in order, each once (all of them unless a program failed in it),
    # and admits at most max_prefill_batch requests.
    assert iterations == sorted(iterations, reverse=True) and iterations[-1] >= len(jobs) // LIMITS.max_prefill_batch


def test_tokens_waiting_together_leave_together_and_the_finish_ends_the_stream():
    """A request's stream takes every token queued by the time it reads (a behind event loop sends
    fewer, longer pieces), in order, and nothing after the finish."""
    async def main():
        events = asyncio.Queue()
        for item in (([1], None), ([2], None), ([3, 4], None)):
            events.put_nowait(item)
        stream = waiting_tokens(events)
        first = await anext(stream)
        for item in (([5], None), ([], "length"), ([9], None)):
            events.put_nowait(item)
        return first, [item async for item in stream], events.qsize()

    first, rest, left = asyncio.run(main())
    assert first == ([1, 2, 3, 4], None)
    assert rest == [([5], "length")]
    assert left == 1


def test_text_assembler_streams_exactly_the_whole_decode():
    from c2c_jax.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    ids = tok("héllo wörld — ✓ ok", add_special_tokens=False)["input_ids"] + [258]
    ids = ids + list(np.random.default_rng(0).integers(0, 259, 40))  # arbitrary bytes, broken UTF-8 among them
    text = TextAssembler(tok, [])
    pieces = []
    for i in ids:
        text.add([int(i)])
        pieces.append(text.take(final=False))
    text.add([], final=True)
    pieces.append(text.take(final=True))
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces[:5])  # multi-byte characters come out whole


def test_per_row_filtering_matches_a_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 50)).astype(np.float32)
    temperature = np.array([1.0, 0.5, 2.0, 1.0, 0.7], np.float32)
    top_k = np.array([0, 3, 0, 10, 1], np.int32)
    top_p = np.array([1.0, 1.0, 0.6, 0.3, 1.0], np.float32)
    got = np.asarray(filtered_logits(logits, temperature, top_k, top_p))
    for r in range(5):
        scaled = logits[r] / temperature[r]
        order = np.argsort(-scaled)
        keep = order[: top_k[r]] if top_k[r] else order
        p = np.exp(scaled[keep] - scaled[keep].max())
        p /= p.sum()
        n = max(1, int(np.sum(np.cumsum(p) <= top_p[r]))) if top_p[r] < 1 else len(keep)
        assert set(np.flatnonzero(np.isfinite(got[r]))) == set(keep[:n]), r
        np.testing.assert_allclose(got[r][keep[:n]], scaled[keep[:n]], rtol=1e-6)


def test_load_summary_counts_concurrency_and_refusals():
    """The serving benchmark's summary on hand-made records: concurrency against a count of the
    requests in flight on a fine time grid, tokens/s and latencies by hand, a 429 counted apart."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        import bench_serve
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(0)
    records = []
    for sent in np.sort(rng.uniform(0, 5, 40)):
        stamps = list(sent + 0.05 + np.cumsum(rng.uniform(0.01, 0.2, 4)))
        records.append({"sent": float(sent), "stamps": stamps, "tokens": 4, "ok": True, "status": 200,
                        "done": stamps[-1] + 0.001})
    records.append({"sent": 1.0, "stamps": [], "tokens": 0, "ok": False, "status": 429, "done": 1.01})
    got = bench_serve.summarize(records, max_tokens=4)
    served = records[:-1]
    start, end = min(r["sent"] for r in records), max(r["done"] for r in served)
    grid = np.linspace(start, end, 200_001)
    in_flight = sum((grid >= r["sent"]) & (grid < r["done"]) for r in served)
    assert got["concurrency_max"] == in_flight.max()
    assert got["concurrency_mean"] == pytest.approx(in_flight.mean(), abs=0.06)
    assert (got["requests"], got["refused"], got["failed"]) == (41, 1, 0)
    assert got["output_tokens_per_s"] == pytest.approx(4 * 40 / (end - start), abs=0.1)
    assert got["ttft_p50_ms"] == pytest.approx(np.percentile([1e3 * (r["stamps"][0] - r["sent"]) for r in served], 50),
                                               abs=0.01)
    assert got["tpot_p50_ms"] == pytest.approx(np.median([1e3 * (r["stamps"][-1] - r["stamps"][0]) / 3 for r in served]),
                                               abs=0.01)
    assert got["chunks_per_token"] == 1.0
    arrivals = bench_serve.poisson_arrivals(rate=50.0, seconds=40.0, seed=1)
    assert arrivals[0] == 0 and np.all(np.diff(arrivals) > 0) and arrivals[-1] < 40
    assert len(arrivals) == pytest.approx(50 * 40, rel=0.1)  # 2000 arrivals: 5 standard deviations


def test_compaction_moves_every_row_left_in_place():
    """`compact` against NumPy: columns shift left by `shift`, the freed tail is invalid, `end` follows;
    and the compiled, donated program holds no second copy of the cache (the reason it goes layer by layer)."""
    from c2c_jax.infer.engine import Slots, compact
    from c2c_jax.models import KVCache

    layers, rows, capacity, heads, dim, shift, end = 6, 3, 40, 2, 16, 13, 37
    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal((layers, rows, capacity, heads, dim)).astype(np.float32) for _ in range(2))
    valid = rng.random((rows, capacity)) < 0.7
    valid[:, :shift] = False  # the first `shift` columns are free, as the engine guarantees
    zeros = np.zeros((rows,), np.int32)
    slots = Slots(KVCache(k=jax.numpy.asarray(k), v=jax.numpy.asarray(v), valid=jax.numpy.asarray(valid),
                          end=jax.numpy.asarray(end, jax.numpy.int32)),
                  zeros, zeros, zeros.astype(np.float32), zeros, np.ones((rows,), np.float32),
                  np.zeros((rows, 2), np.uint32), zeros)
    program = jax.jit(compact, donate_argnums=0)
    memory = program.lower(slots, np.int32(shift)).compile().memory_analysis()
    moved = program(slots, np.int32(shift))
    for got, want in ((moved.cache.k, k), (moved.cache.v, v)):
        np.testing.assert_array_equal(np.asarray(got)[:, :, : capacity - shift], want[:, :, shift:])
    expected_valid = np.zeros_like(valid)
    expected_valid[:, : capacity - shift] = valid[:, shift:]
    np.testing.assert_array_equal(np.asarray(moved.cache.valid), expected_valid)
    assert int(moved.cache.end) == end - shift
    if memory is not None:  # backends that report it: scratch space well under one more cache
        assert memory.temp_size_in_bytes < k.nbytes // 2, memory
