"""Continuous batching: a fixed set of decode slots over one jitted decode step.

The server's engine. `Slots` is the decode batch as a device pytree: one receiver KV cache of `slots`
rows and each row's last token, position and sampling settings. Only the receiver decodes, so
receiver-only and C2C requests share the slots; they differ in their prefill.

Cache layout. `KVCache` has one write column `end` for all rows (`models/kv_cache.py`), and every
decode step writes column `end` of every row. A request is prefilled alone or with others in a
length bucket of W columns (`C2CModel.prompt_cache`, then `finish_prompt`, which gives the first
token) and its W columns are copied into a free row at [end - W, end): its next token then lands at
`end` with everyone else's. Rows hold their tokens at different columns; `valid` hides the rest.
When `end` reaches the capacity, `compact` shifts every row left by the space no live row uses.
Positions are per row, so a row's columns never change what it computes (attention sees keys by
`valid`, RoPE by position), and a request's greedy tokens are those of `Generator` on the prompt alone.

Step widths. A decode step over w rows reads w rows of the cache, so its cost follows the load:
it is compiled for a few widths (1, 8, 32, 128, ...: `slot_widths`) and each step runs the narrowest
that covers the live rows. Requests take the lowest free rows; when the load falls below a width,
the live rows beyond it move into free rows within it (`move_row`, one row's cache copied).

The host loop (`Engine.run`) waits for the decode call in flight, admits one prefill chunk (up to
`max_prefill_batch` waiting requests of one route, run alone or padded to `max_prefill_batch`) and
hands out its first tokens once the prefill has run, dispatches the next decode call of
`decode_steps` steps, and only then delivers the tokens it read: that delivery (stop checks, the
server's chunks), most of the host's work, overlaps the next call. A request that arrived while a
call ran is prefilled right after it, and its first token leaves before the next call is dispatched
and ahead of every running stream's tokens in the server's event loop. End of sequence and
`max_tokens` are checked at delivery: a finished row is freed before the call after next, a
cancelled one before the next. Several steps per call divide the host's work per token by
`decode_steps`, at the price of tokens streamed `decode_steps` at a time, a new request waiting for
the running call to end, and up to `decode_steps - 1` steps computed past a row's last token. No
program the loop dispatches holds a conditional (greedy or sampling is the host's choice,
`sample_rows`), so that on a GPU a dispatch returns at once instead of when its call is nearly done.

The engine thread shares the GIL with whatever else runs in its process (the server's event loop).
It waits on the device with the GIL released and must take it back at once, or the device idles:
`Engine.start` shortens the interpreter's switch interval for that (`SWITCH_INTERVAL_S`).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import sys
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from c2c_jax.models import Decoder, KVCache
from c2c_jax.models.kv_cache import decode_capacity
from c2c_jax.c2c.model import C2CModel
from c2c_jax.c2c.prompt import EncodedPrompt, PromptBatch, PromptEncoder


# ------------------------------------------------------------------------------------------------
# Device state and the pure functions over it.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
    """The decode batch: row r of every field belongs to slot r. All leading axes [S]."""

    cache: KVCache  # the receiver's cache, [layers, S, capacity, ...]
    tokens: jax.Array  # int32: the row's last sampled token, the next step's input
    positions: jax.Array  # int32: that token's position
    temperature: jax.Array  # float32; <= 0: greedy
    top_k: jax.Array  # int32; 0: off
    top_p: jax.Array  # float32; 1: off
    keys: jax.Array  # uint32 [S, 2]: the request's PRNG key data (from its seed)
    steps: jax.Array  # int32: tokens sampled so far (folded into the key)

    @classmethod
    def empty(cls, receiver: Decoder, num_slots: int, capacity: int, end: int) -> "Slots":
        cache = dataclasses.replace(receiver.init_cache(num_slots, capacity), end=jnp.asarray(end, jnp.int32))
        zeros = lambda dtype=jnp.int32: jnp.zeros((num_slots,), dtype)  # noqa: E731 - distinct buffers (donated)
        return cls(cache, zeros(), zeros(), zeros(jnp.float32), zeros(), jnp.ones((num_slots,), jnp.float32),
                   jnp.zeros((num_slots, 2), jnp.uint32), zeros())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSampling:
    """Per-row sampling settings, [B] each (keys [B, 2])."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    keys: jax.Array


def filtered_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """float32 [B, vocab]: logits / temperature with everything outside each row's top-k and top-p
    nucleus at -inf, as `infer.decode.sample_tokens` filters them, but with per-row settings."""
    vocab = logits.shape[-1]
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    descending = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(descending, k[:, None] - 1, axis=-1)
    descending = jnp.where(descending < kth, -jnp.inf, descending)
    # Keep the sorted prefix whose cumulative probability is <= top_p, and always the top token.
    cumulative = jnp.cumsum(jax.nn.softmax(descending, axis=-1), axis=-1)
    keep = ((cumulative <= top_p[:, None]) | (top_p[:, None] >= 1.0)).at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep, descending, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled < jnp.maximum(threshold, kth), -jnp.inf, scaled)


def sample_rows(logits: jax.Array, sampling: RowSampling, steps: jax.Array, sampled: bool) -> jax.Array:
    """int32 [B] from float32 logits [B, vocab], each row with its own settings and key.

    Greedy rows take the argmax, exactly as `infer.decode.sample_tokens`. `sampled` (static): whether
    any row samples, and so whether the sort that sampling needs is in the program. The host chooses,
    having set every row's settings: a `lax.cond` on the device would do too, but on a GPU XLA reads
    a conditional's predicate back to the host and blocks the dispatching thread until it is
    computed, so that a call's dispatch would return only when its last step's logits exist.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not sampled:
        return greedy
    filtered = filtered_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(sampling.keys), steps)
    drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
    return jnp.where(sampling.temperature > 0, drawn, greedy)


def decode_step(receiver: Decoder, slots: Slots, active: jax.Array, sampled: bool) -> tuple[Slots, jax.Array]:
    """One token for every row (inactive rows compute, unseen, and write nothing valid); `sampled`
    as `sample_rows`. Returns the new slots and the sampled tokens int32 [S]."""
    logits, cache = receiver(slots.tokens[:, None], slots.positions[:, None], slots.cache, active[:, None])
    sampling = RowSampling(slots.temperature, slots.top_k, slots.top_p, slots.keys)
    tokens = sample_rows(logits[:, 0], sampling, slots.steps, sampled)
    return dataclasses.replace(slots, cache=cache, tokens=tokens, positions=slots.positions + 1,
                               steps=slots.steps + 1), tokens


def slots_capacity(prompt_width: int, max_tokens: int, decode_steps: int, platform: str | None = None) -> int:
    """Columns of the slots' cache. While it holds its slot a row spans at most prompt_width +
    max_tokens + 2 (k - 1) columns, k = decode_steps (its last call's steps after its last token, and
    the call dispatched before that one's tokens are read); after `compact` the next call needs k more.
    A second `prompt_width`, which spaces compactions out, covers that unless k is large."""
    need = prompt_width + max_tokens + 3 * decode_steps - 2
    return decode_capacity(max(2 * prompt_width + max_tokens, need), platform)


def slot_widths(num_slots: int) -> tuple[int, ...]:
    """The row counts a decode step is compiled for: 1, 8, 32, 128, ... (x4) below `num_slots`, and
    `num_slots`. A step over w rows costs about what w rows need, so few widths keep the cost near
    the load (at most 4x rows) with few programs."""
    widths, w = [1], 8
    while w < num_slots:
        widths.append(w)
        w *= 4
    return tuple(sorted({*widths, num_slots}))


def _rows(x: jax.Array, axis: int, width: int) -> jax.Array:
    return jax.lax.slice_in_dim(x, 0, width, axis=axis)


def decode_rows(receiver: Decoder, slots: Slots, active: jax.Array, steps: int,
                sampled: bool) -> tuple[Slots, jax.Array]:
    """`steps` decode steps (`decode_step`, one after another) over the first w = len(active) rows
    only (the others must be free): they read w rows of the cache, not all. The other rows keep
    their contents; of the cache, only the written columns go back. `sampled` as `sample_rows`.
    Returns the new slots and the sampled tokens int32 [steps, w]."""
    width = active.shape[0]

    def run(slots):
        return jax.lax.scan(lambda s, _: decode_step(receiver, s, active, sampled), slots, length=steps)

    if width == slots.tokens.shape[0]:
        return run(slots)
    cache = slots.cache
    head = Slots(dataclasses.replace(cache, k=_rows(cache.k, 1, width), v=_rows(cache.v, 1, width),
                                     valid=_rows(cache.valid, 0, width)),
                 *(_rows(getattr(slots, f.name), 0, width) for f in dataclasses.fields(Slots)[1:]))
    head, tokens = run(head)
    end = cache.end

    def written(new, old, axis):  # columns [end, end + steps) of the head's rows, put back into rows [0, width)
        columns = jax.lax.dynamic_slice_in_dim(new, end, steps, axis=axis)
        return jax.lax.dynamic_update_slice_in_dim(old, columns, end, axis=axis)

    new_cache = dataclasses.replace(cache, k=written(head.cache.k, cache.k, 2), v=written(head.cache.v, cache.v, 2),
                                    valid=written(head.cache.valid, cache.valid, 1), end=head.cache.end)
    rest = {f.name: getattr(slots, f.name).at[:width].set(getattr(head, f.name))
            for f in dataclasses.fields(Slots)[1:]}
    return Slots(new_cache, **rest), tokens


def move_row(slots: Slots, source: jax.Array, target: jax.Array) -> Slots:
    """Row `source` of every field copied to row `target` (to pack live rows into the first ones)."""
    def move(x, axis):
        row = jax.lax.dynamic_index_in_dim(x, source, axis, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(x, row, target, axis)

    cache = slots.cache
    return Slots(dataclasses.replace(cache, k=move(cache.k, 1), v=move(cache.v, 1), valid=move(cache.valid, 0)),
                 **{f.name: move(getattr(slots, f.name), 0) for f in dataclasses.fields(Slots)[1:]})


def admit(model: C2CModel, slots: Slots, batch: PromptBatch, prompt_cache: KVCache, rows: jax.Array,
          sampling: RowSampling, sampled: bool) -> tuple[Slots, jax.Array]:
    """The prompts' last token on their (fused) `prompt_cache`, their first tokens (`sampled` as
    `sample_rows`), and their caches copied into slots `rows` [B] at columns [end - W, end). Rows may
    repeat with identical inputs (batch padding). Returns the new slots and the first tokens int32 [B]."""
    width = batch.tokens.shape[1]
    logits, cache = model.finish_prompt(batch, prompt_cache, width)
    first = sample_rows(logits, sampling, jnp.zeros_like(rows), sampled)
    target = slots.cache
    start = target.end - width
    k, v, valid = target.k, target.v, target.valid
    for i in range(rows.shape[0]):
        k = jax.lax.dynamic_update_slice(k, cache.k[:, i:i + 1].astype(k.dtype), (0, rows[i], start, 0, 0))
        v = jax.lax.dynamic_update_slice(v, cache.v[:, i:i + 1].astype(v.dtype), (0, rows[i], start, 0, 0))
        row_valid = jax.lax.dynamic_update_slice(jnp.zeros((target.capacity,), bool), cache.valid[i], (start,))
        valid = valid.at[rows[i]].set(row_valid)
    return Slots(
        cache=dataclasses.replace(target, k=k, v=v, valid=valid),
        tokens=slots.tokens.at[rows].set(first),
        positions=slots.positions.at[rows].set(batch.positions[:, -1] + 1),
        temperature=slots.temperature.at[rows].set(sampling.temperature),
        top_k=slots.top_k.at[rows].set(sampling.top_k),
        top_p=slots.top_p.at[rows].set(sampling.top_p),
        keys=slots.keys.at[rows].set(sampling.keys),
        steps=slots.steps.at[rows].set(1),
    ), first


def compact(slots: Slots, shift: jax.Array) -> Slots:
    """Every row's columns moved `shift` to the left (the first `shift` must be free), end with them.

    One layer at a time, written back into the (donated) cache: the move needs one layer's copy of
    the columns, not a second copy of the whole cache, which the slots of a 16 GiB chip leave no room for.
    """
    cache = slots.cache
    capacity = cache.capacity
    kept = jnp.arange(capacity) < capacity - shift

    def move_layer(layer, kv):
        return tuple(x.at[layer].set(jnp.roll(x[layer], -shift, axis=1)) for x in kv)

    k, v = jax.lax.fori_loop(0, cache.num_layers, move_layer, (cache.k, cache.v))
    return dataclasses.replace(slots, cache=dataclasses.replace(
        cache, k=k, v=v, valid=jnp.roll(cache.valid, -shift, axis=1) & kept, end=cache.end - shift))


class Executables:
    """A jitted function compiled once per input-shape key and static arguments: on its first call
    with them, or ahead of time by `prepare` (from any thread: `Engine.warm_up` compiles them side by
    side). The key names what varies between calls (a prompt width and batch size), so a call hashes
    no pytree of shapes; static arguments are keywords (`sampled`)."""

    def __init__(self, fn, **jit_kwargs):
        self.jitted = jax.jit(fn, **jit_kwargs)
        self.compiled = {}

    @staticmethod
    def full_key(key, static: dict) -> tuple:
        """The key of `compiled`: the caller's key and the static arguments' values."""
        return key, *sorted(static.items())

    def prepare(self, key, *args, **static):
        """args: arrays or `jax.ShapeDtypeStruct`s of the shapes and dtypes the calls will pass."""
        full_key = self.full_key(key, static)
        if full_key not in self.compiled:
            self.compiled[full_key] = self.jitted.lower(*args, **static).compile()
        return self.compiled[full_key]

    def __call__(self, key, *args, **static):
        executable = self.compiled.get(self.full_key(key, static))
        return (executable or self.prepare(key, *args, **static))(*args)


class DecodePrograms:
    """The decode-side programs; they close over the receiver's graphdef (see
    `infer.generator.InferencePrograms` for why) and donate the slots, which are updated in place. The step
    is keyed by its width (`slot_widths`) and `sampled` (`sample_rows`), and runs `steps` decode steps
    per call."""

    def __init__(self, graphdef: nnx.GraphDef, steps: int = 1):
        self.step = Executables(
            lambda state, slots, active, *, sampled: decode_rows(nnx.merge(graphdef, state), slots, active, steps,
                                                                 sampled),
            donate_argnums=1, static_argnames="sampled")
        self.compact = Executables(compact, donate_argnums=0)
        self.move_row = Executables(move_row, donate_argnums=0)


class PrefillPrograms:
    """One route's prefill as one program: the (fused) prompt cache, then `admit` into the slots.
    Keyed by the [B, W] prompt batch's shape and the slots' (routes may serve several engines), and
    `sampled` (`sample_rows`)."""

    def __init__(self, graphdef: nnx.GraphDef, fuse: bool):
        def prefill(state, slots, batch, rows, sampling, *, sampled):
            model = nnx.merge(graphdef, state)
            return admit(model, slots, batch, model.prompt_cache(batch, fuse=fuse), rows, sampling, sampled)

        self.prefill = Executables(prefill, donate_argnums=1, static_argnames="sampled")

    @staticmethod
    def key(slots: Slots, batch_shape: tuple[int, int]) -> tuple:
        return batch_shape, slots.cache.k.shape

    def run(self, state, slots: Slots, batch: PromptBatch, rows, sampling: RowSampling, *,
            sampled: bool) -> tuple[Slots, jax.Array]:
        return self.prefill(self.key(slots, batch.tokens.shape), state, slots, batch, rows, sampling, sampled=sampled)


# ------------------------------------------------------------------------------------------------
# Host side: requests, routes, the scheduler.


class QueueFull(Exception):
    """The engine's waiting queue is at its limit."""


class InvalidRequest(ValueError):
    """A request the engine cannot serve (its message says why)."""


@dataclasses.dataclass(frozen=True)
class EngineLimits:
    slots: int = 16  # rows of the decode batch
    max_prompt_tokens: int = 1024  # receiver tokens of a prompt, chat template included
    max_tokens: int = 512  # new tokens of one request
    max_queue: int = 256  # requests waiting for a slot; more are refused (QueueFull)
    max_prefill_batch: int = 8  # requests prefilled together
    decode_steps: int = 1  # decode steps per dispatch: the host's work per token / decode_steps (module doc)


# `python -m c2c_jax.serve`'s defaults (its flags read them) and what the TPU compile check compiles
# (`python -m c2c_jax.aot --programs=serve_*`). Four steps a call: docs/design.md, "Several decode steps".
SERVER_LIMITS = EngineLimits(slots=32, max_prompt_tokens=2048, max_tokens=1024, max_queue=256, max_prefill_batch=8,
                             decode_steps=4)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """One request's settings (OpenAI's names)."""

    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @property
    def samples(self) -> bool:
        """Whether the request draws its tokens (temperature > 0) rather than taking the argmax."""
        return self.temperature > 0


@dataclasses.dataclass
class Route:
    """A way to answer: the receiver alone, or C2C with a sharer and its fuser."""

    name: str
    model: C2CModel
    encoder: PromptEncoder
    fuse: bool
    programs: PrefillPrograms = dataclasses.field(init=False)
    state: nnx.State = dataclasses.field(init=False)

    def __post_init__(self):
        graphdef, self.state = nnx.split(self.model)
        self.programs = PrefillPrograms(graphdef, self.fuse)


# on_tokens(new token ids, finish reason or None), called on the engine thread in order. The finish
# reason is "stop" (an end-of-sequence id, not passed on), "length" (max_tokens) or "error: ...".
TokenSink = Callable[[list, "str | None"], None]


@dataclasses.dataclass(eq=False)
class Request:
    route: Route
    prompt: EncodedPrompt
    sampling: Sampling
    on_tokens: TokenSink
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    id: int = dataclasses.field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    row: int | None = None  # its decode slot while it has one (rows move: `Engine._pack`)
    generated: int = 0
    last_token_time: float = 0.0

    @property
    def prompt_tokens(self) -> int:
        return int(np.sum(self.prompt.valid))


# What the engine thread does in an iteration (`Engine.iteration`), in order; `Metrics.engine_phase`
# gets the seconds of each. The two waits are the device's share, the rest the host's: taking waiting
# requests and building their batch (admit), launching the prefill and the decode call, handing out
# tokens (a dispatch that blocks, as a GPU conditional makes it, shows as host time: `sample_rows`).
ENGINE_PHASES = ("wait_decode", "admit", "dispatch_prefill", "wait_prefill", "deliver_first", "dispatch_decode",
                 "deliver")


class Metrics:
    """What the engine reports; the server passes one that feeds Prometheus."""

    def queue_depth(self, n: int) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...  # from a request's arrival to its prefill
    def engine_phase(self, phase: str, seconds: float) -> None: ...  # once per phase and iteration
    def slots_busy(self, n: int) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def tokens(self, n: int) -> None: ...


def row_sampling(settings: Sequence[Sampling]) -> RowSampling:
    """Host arrays of the requests' settings; a seed's 64 bits are its PRNG key's data."""
    seeds = np.array([s.seed for s in settings], np.uint64)
    return RowSampling(
        temperature=np.array([s.temperature for s in settings], np.float32),
        top_k=np.array([s.top_k for s in settings], np.int32),
        top_p=np.array([s.top_p for s in settings], np.float32),
        keys=np.stack([seeds >> np.uint64(32), seeds & np.uint64(0xFFFFFFFF)], axis=1).astype(np.uint32))


def stop_token_ids(receiver: Decoder, tokenizer) -> tuple[int, ...]:
    """End-of-sequence ids: the model config's, the tokenizer's, and ChatML's <|im_end|>."""
    ids = set(receiver.config.eos_token_ids)
    ids.update(i for i in (tokenizer.eos_token_id,) if i is not None)
    if "<|im_end|>" in tokenizer.get_vocab():
        ids.add(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return tuple(sorted(int(i) for i in ids))


class PhaseClock:
    """Times the phases of one engine iteration: `lap(phase)` reports the seconds since the last lap."""

    def __init__(self, metrics: Metrics):
        self.metrics, self.last = metrics, time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.metrics.engine_phase(phase, now - self.last)
        self.last = now


# How long a thread may hold the GIL while another asks for it. CPython's 5 ms default lets a busy
# event loop keep the engine thread from its next dispatch for up to 5 ms after every decode step:
# with 128 streams a step took 11-14 ms on an H100 whose device work was 5 ms (docs/design.md).
SWITCH_INTERVAL_S = 1e-4


@dataclasses.dataclass(frozen=True)
class Admission:
    """One prefill chunk, taken from the queue (`Engine._take_chunk`): its requests (in their rows) and
    the prefill's inputs, rows and batch padded to a prefill size."""

    route: Route
    requests: list[Request]
    batch: PromptBatch
    rows: np.ndarray  # int32 [B]
    sampling: RowSampling

    def prefill(self, slots: Slots) -> tuple[Slots, jax.Array]:
        """The chunk's prefill dispatched on `slots`: the new slots and the first tokens int32 [B]."""
        return self.route.programs.run(self.route.state, slots, self.batch, self.rows, self.sampling,
                                       sampled=any(r.sampling.samples for r in self.requests))


class Engine:
    """Continuous batching over `limits.slots` decode rows for a receiver and its routes.

    `submit` (any thread) queues a request; `run` (one thread, `start` makes it) serves them; each
    request's tokens go to its `on_tokens`. All jitted work happens on the engine thread.
    """

    def __init__(self, receiver: Decoder, routes: Sequence[Route], limits: EngineLimits = EngineLimits(), *,
                 eos_ids: Sequence[int], pad_id: int, metrics: Metrics | None = None):
        if not routes:
            raise ValueError("the engine needs at least one route")
        for route in routes:
            if route.model.receiver is not receiver:
                raise ValueError(f"route {route.name!r} decodes with another receiver than the engine's")
        pad_to = {route.encoder.pad_to for route in routes}
        if len(pad_to) != 1:
            raise ValueError(f"routes bucket prompts differently ({sorted(pad_to)}): give them one pad_to")
        self.padded_width = routes[0].encoder.padded_width  # one padding for every route
        if limits.decode_steps < 1:
            raise ValueError(f"decode_steps must be at least 1, not {limits.decode_steps}")
        self.receiver = receiver
        self.routes = {route.name: route for route in routes}
        self.limits = limits
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.pad_id = pad_id
        self.metrics = metrics or Metrics()
        self.prompt_width = self.padded_width(limits.max_prompt_tokens)  # the longest bucket
        self.capacity = slots_capacity(self.prompt_width, limits.max_tokens, limits.decode_steps)
        self.context = receiver.config.max_position_embeddings
        graphdef, self.receiver_state = nnx.split(receiver)
        self.decode = DecodePrograms(graphdef, limits.decode_steps)
        self.widths = slot_widths(limits.slots)
        self.slots = Slots.empty(receiver, limits.slots, self.capacity, self.prompt_width)
        self.end = self.prompt_width  # host copy of slots.cache.end
        self.rows: list[Request | None] = [None] * limits.slots
        self.row_start = [0] * limits.slots  # first column of each row's tokens
        self.waiting: collections.deque[Request] = collections.deque()
        self.pending = None  # the call in flight: (its tokens, [(row, request)]), read by the next iteration
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- any thread --------------------------------------------------------------------------------

    def check(self, route: Route, prompt: EncodedPrompt, sampling: Sampling) -> None:
        """Raises InvalidRequest for a request the engine cannot serve."""
        n = len(prompt.tokens)
        if n > self.limits.max_prompt_tokens:
            raise InvalidRequest(f"the prompt has {n} tokens; this server takes at most "
                                 f"{self.limits.max_prompt_tokens} (--max_prompt_tokens)")
        if not 1 <= sampling.max_tokens <= self.limits.max_tokens:
            raise InvalidRequest(f"max_tokens must be between 1 and {self.limits.max_tokens}, "
                                 f"not {sampling.max_tokens}")
        width = self.padded_width(n)
        if width + sampling.max_tokens > self.context:
            raise InvalidRequest(f"the prompt ({n} tokens, {width} padded) and max_tokens {sampling.max_tokens} "
                                 f"exceed the model's context of {self.context} tokens")

    def submit(self, request: Request) -> None:
        self.check(request.route, request.prompt, request.sampling)
        with self._lock:
            if len(self.waiting) >= self.limits.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already (--max_queue)")
            self.waiting.append(request)
            self.metrics.queue_depth(len(self.waiting))
            self._lock.notify()

    def cancel(self, request: Request) -> None:
        """Stops a request (its client left, or a stop string matched): its row is freed before the next step."""
        request.cancelled = True
        with self._lock:
            self._lock.notify()

    def start(self) -> None:
        """Starts the engine thread (again, after `stop`), with the process's GIL switch interval
        at `SWITCH_INTERVAL_S` until `stop`."""
        if self._thread is not None:
            raise RuntimeError("the engine is running already: stop it before starting it again")
        self._stopping = False
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, SWITCH_INTERVAL_S))
        self._thread = threading.Thread(target=self.run, name="c2c-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            sys.setswitchinterval(self._switch_interval)

    @property
    def busy_rows(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def compiled_programs(self) -> int:
        """Programs compiled so far for this engine: its decode side's, and its routes' prefills into its slots."""
        decode = sum(len(p.compiled) for p in (self.decode.step, self.decode.compact, self.decode.move_row))
        return decode + sum(key[0][1] == self.slots.cache.k.shape for route in self.routes.values()
                            for key in route.programs.prefill.compiled)

    def prefill_sizes(self) -> list[int]:
        """The batch sizes a prefill chunk is padded to: 1 (a lone request, no padding) and
        `max_prefill_batch`. Two shapes per prompt bucket keep the compiled programs few; a padded
        row costs the prefill's compute, which at these batches is far from the device's limit."""
        return sorted({1, self.limits.max_prefill_batch})

    def warm_up(self, widths: Sequence[int], threads: int = 16, sampling: bool = True) -> None:
        """Compiles, side by side, the decode step at each slot width, the row move, the compaction
        and every route's prefill at each prompt width in `widths` (rounded up to the bucket) and
        each prefill batch size, so that no request waits for a compilation. Each decode step and
        prefill comes greedy and, unless `sampling` is False (only greedy requests will come),
        sampling (`sample_rows`). Call before `start`."""
        import concurrent.futures

        widths = sorted({self.padded_width(w) for w in widths})
        if widths and widths[-1] > self.prompt_width:
            raise ValueError(f"width {widths[-1]} exceeds the longest prompt bucket {self.prompt_width}")
        variants = [{"sampled": False}, {"sampled": True}][: 1 + sampling]
        jobs = [(self.decode.step, w, (self.receiver_state, self.slots, np.zeros((w,), bool)), static)
                for w in self.widths for static in variants]
        jobs += [(self.decode.compact, (), (self.slots, np.int32(0)), {}),
                 (self.decode.move_row, (), (self.slots, np.int32(0), np.int32(0)), {})]
        for route in self.routes.values():
            for width in widths:
                for size in self.prefill_sizes():
                    prompt = route.encoder.encode_ids(np.full((width,), self.pad_id, np.int32))
                    batch = route.encoder.batch([prompt] * size, width=width)
                    settings = row_sampling([Sampling(max_tokens=1)] * size)
                    key = route.programs.key(self.slots, batch.tokens.shape)
                    jobs += [(route.programs.prefill, key,
                              (route.state, self.slots, batch, np.zeros((size,), np.int32), settings), static)
                             for static in variants]
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            for done in [pool.submit(programs.prepare, key, *args, **static) for programs, key, args, static in jobs]:
                done.result()

    # -- the engine thread -------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self.waiting or any(self.rows) or self.pending is not None):
                    self._lock.wait()
                if self._stopping:
                    break
            try:
                self.iteration()
            except Exception as error:  # noqa: BLE001 - fail the requests in flight, keep serving
                self._fail_all(error)

    def iteration(self) -> None:
        """Waits for the decode call in flight, frees cancelled rows, admits one prefill chunk and
        hands out its first tokens, dispatches the next decode call (`decode_steps` steps), then hands
        out the waited-for call's tokens.

        Waiting before admitting lets a request that arrived during the call be prefilled straight
        after it. Its first token depends on its prefill alone, so it is handed out before the next
        call is dispatched: it leaves as soon as the prefill has run, ahead of every running stream's
        tokens in the server's event loop, and the device idles only for the host's handout of at
        most `max_prefill_batch` tokens. The call's tokens are handed out after the dispatch, so that
        the host's per-token work overlaps the next call. A row that finished in call k therefore
        still computes in call k + 1, unseen: its tokens are dropped, as are those after its last
        token and any of a request no longer in its row.
        """
        clock = PhaseClock(self.metrics)
        done, self.pending = self.pending, None
        if done is not None:  # its tokens [decode_steps, width]: blocks until the call has run
            done_tokens, done_rows = np.asarray(done[0]), done[1]
        clock.lap("wait_decode")
        self._free_cancelled()
        admission = self._take_chunk()
        clock.lap("admit")
        admitted, first = [], []
        if admission is not None:
            admitted = admission.requests
            self.slots, first = admission.prefill(self.slots)
        clock.lap("dispatch_prefill")
        first = np.asarray(first).tolist()  # blocks until the prefill has run
        clock.lap("wait_prefill")
        for request, token in zip(admitted, first):
            self._emit(request, [token])
        clock.lap("deliver_first")
        if self.busy_rows:
            width = self._pack()
            if self.end + self.limits.decode_steps > self.capacity:
                self._compact()
            live = [(row, request) for row, request in enumerate(self.rows[:width]) if request is not None]
            active = np.zeros((width,), bool)
            active[[row for row, _ in live]] = True
            sampled = any(request.sampling.samples for _, request in live)
            self.slots, tokens = self.decode.step(width, self.receiver_state, self.slots, active, sampled=sampled)
            self.end += self.limits.decode_steps
            self.pending = (tokens, live)
        clock.lap("dispatch_decode")
        if done is not None:
            for row, request in done_rows:
                self._emit(request, done_tokens[:, row].tolist())
        self.metrics.slots_busy(self.busy_rows)
        clock.lap("deliver")

    def _pack(self) -> int:
        """The narrowest step width that holds every live row, after moving the live rows beyond it
        into free rows within it (a row moves only when the load has fallen below a width)."""
        width = next(w for w in self.widths if w >= self.busy_rows)
        free = [row for row in range(width) if self.rows[row] is None]
        for source in range(width, self.limits.slots):
            request = self.rows[source]
            if request is not None:
                target = free.pop(0)
                self.slots = self.decode.move_row((), self.slots, np.int32(source), np.int32(target))
                self.rows[target], self.rows[source], request.row = request, None, target
                self.row_start[target] = self.row_start[source]
        return width

    def _emit(self, request: Request, tokens: list[int]) -> None:
        """Hands `tokens` (in order) to `request` up to its end of sequence or `max_tokens`, unless it
        no longer has a row (finished, cancelled or failed). Tokens that arrive together count one
        inter-token gap and then gaps of 0: that is what the client sees."""
        if request.row is None or request.cancelled:
            return
        ids, finish, used = [], None, 0
        for token in tokens:
            used += 1
            if token in self.eos_ids:
                finish = "stop"
                break
            ids.append(token)
            if request.generated + used >= request.sampling.max_tokens:
                finish = "length"
                break
        now = time.perf_counter()
        if request.generated == 0:
            self.metrics.first_token(now - request.arrival)
        else:
            self.metrics.inter_token(now - request.last_token_time)
        for _ in range(used - 1):
            self.metrics.inter_token(0.0)
        request.last_token_time = now
        request.generated += used
        self.metrics.tokens(used)
        if finish is not None:
            self.rows[request.row], request.row = None, None
        request.on_tokens(ids, finish)

    def _free_cancelled(self) -> None:
        for row, request in enumerate(self.rows):
            if request is not None and request.cancelled:
                self.rows[row], request.row = None, None
        with self._lock:
            if any(r.cancelled for r in self.waiting):
                self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
                self.metrics.queue_depth(len(self.waiting))

    def _take_chunk(self) -> Admission | None:
        """Up to `max_prefill_batch` waiting requests of the first waiting one's route, taken from the
        queue into free rows, with their prompt batch (padded to a prefill size with copies of the
        first); None when nobody waits or no row is free."""
        free = [r for r, req in enumerate(self.rows) if req is None]
        with self._lock:
            if not free or not self.waiting:
                return None
            route = self.waiting[0].route
            chunk = [r for r in self.waiting if r.route is route][: min(len(free), self.limits.max_prefill_batch)]
            for request in chunk:
                self.waiting.remove(request)
            self.metrics.queue_depth(len(self.waiting))
        now = time.perf_counter()
        for request in chunk:
            self.metrics.queue_wait(now - request.arrival)
        rows = free[: len(chunk)]
        padded = next(size for size in self.prefill_sizes() if size >= len(chunk))
        chunk_rows = rows + [rows[0]] * (padded - len(chunk))
        requests = chunk + [chunk[0]] * (padded - len(chunk))
        batch = route.encoder.batch([r.prompt for r in requests])
        width = batch.tokens.shape[1]
        for row, request in zip(rows, chunk):  # in their rows first: if the programs fail, `_fail_all` ends them
            self.rows[row], request.row = request, row
            self.row_start[row] = self.end - width
        return Admission(route, chunk, batch, np.asarray(chunk_rows, np.int32),
                         row_sampling([r.sampling for r in requests]))

    def _compact(self) -> None:
        live = [self.row_start[r] for r, req in enumerate(self.rows) if req is not None]
        shift = min(min(live, default=self.end), self.end - self.prompt_width)
        if shift <= 0:  # cannot happen: rows span at most prompt_width + max_tokens columns
            raise RuntimeError(f"no free columns to compact (end {self.end}, capacity {self.capacity})")
        self.slots = self.decode.compact((), self.slots, np.int32(shift))
        self.end -= shift
        self.row_start = [s - shift for s in self.row_start]

    def _fail_all(self, error: Exception) -> None:
        """An error inside the engine's programs ends the requests in flight with it, not the server."""
        for row, request in enumerate(self.rows):
            if request is not None:
                self.rows[row], request.row = None, None
                request.on_tokens([], f"error: {type(error).__name__}: {error}")
        # The slots may have been donated to the failed program: start over from empty ones.
        self.pending = None
        self.slots = Slots.empty(self.receiver, self.limits.slots, self.capacity, self.prompt_width)
        self.end = self.prompt_width
