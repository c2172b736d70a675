"""Which parts of the C2C TTFT program overlap? Times its pieces as whole programs, in one process.

Issue 3's C2C TTFT (512 tokens, batch 1) is about the serial sum of its parts, although the
receiver's and the sharer's prefix passes are independent and `CONCURRENT` command buffers could
run them at once. This times, on one card and one process, programs that differ in one thing:

    receiver_pass, sharer_pass      each prefix pass alone (as the library runs it: `kv_pass`)
    both_passes                     both, in one program, one after the other in program order
    both_passes_interleaved         both, layer i of each before layer i + 1 of either
    *_unmasked                      the same as if no column were padding (`kv_pass` without `valid`)
    c2c_ttft, receiver_ttft         `C2CModel.prefill` + argmax as one program (the route up to session 8)
    c2c_ttft_interleaved            the same with interleaved prefix passes
    c2c_ttft_two_programs           prompt cache + fusion, then the last token + argmax: the library's
                                    route since session 9 (`InferencePrograms.next_token_logits`), plus an argmax
    c2c_ttft_three_programs         prefix passes, fusion, last token
    c2c_ttft_two_programs_pair_suffix   the same, the last token run as two rows (a masked copy)
                                    instead of through `one_row_gemm`
    c2c_ttft_small_first_program    the passes' first `--first-layers` layers, then the rest and
                                    fusion, then the last token: three programs, the first small
    c2c_ttft_small_first_pair_suffix    the same with the two-row last token
    c2c_ttft_overlapped             one program whose dataflow has per-layer dependencies: fusion in
                                    chunks of `--fuse-chunk` receiver layers, the last token's layer i
                                    right after fused layer i, so they may overlap the prefix passes
    c2c_ttft_small_first_overlapped the passes' first layers, then the overlapped rest: two programs
    receiver_ttft_two_programs      receiver-only as the library runs it: the prompt pass, then the last
                                    token + argmax (the last token cannot overlap the pass, as in one)
    *_two_programs_masked           c2c_ttft_two_programs or receiver_ttft_two_programs with prefix passes
                                    that hide padding by an attention mask (the library up to session 10)
                                    instead of moving each row's real tokens to its front
    *_two_programs_slice_write      the same two programs with the last token's attention of the library
                                    up to session 10: its K/V written into the layer's cache slice, then
                                    one attention over the slice (`cache_attention` now attends to the
                                    cache and the new tokens as two parts of one softmax)
    *_two_programs_xla_attention    the same two programs with the last token's attention as XLA's
                                    fusions (the library up to session 11) instead of the Pallas kernel
                                    `attention.decode_attention` (which the library runs on a GPU only:
                                    elsewhere both are the same programs)
    c2c_ttft_donated_output         one program writing its token into a donated buffer
    dispatch_floor                  one tiny kernel with the same arguments: the host's cost of a call

If both_passes ~ receiver_pass + sharer_pass, the two passes do not overlap. Every variant also
reports `dispatch_ms`, the host's time until all its programs are dispatched (before any result is
waited for). `--pipelined N` also times N calls queued back to back: the difference to one
synchronised call is host work that the GPU waits for, as long as the host dispatches a call faster
than the GPU runs it. On hosts that do not (session 12: 2.5-3.7 ms to dispatch the C2C programs on
one machine), queued calls took longer than synchronised ones, so read them next to `dispatch_ms`.

    python bench/ttft_programs.py [--variants a,b/f10c2,...] [--rounds 3] [--pipelined N] [--smoke]

A variant name may end in /f<F>c<C>: its own --first-layers F and --fuse-chunk C.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import re
import statistics
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(__file__))

from c2c_jax.config import use_inference_xla_flags  # noqa: E402

use_inference_xla_flags()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import bench_inference as bi  # noqa: E402
import common  # noqa: E402
from c2c_jax.models import KVCache  # noqa: E402
from c2c_jax.models.attention import cache_attention, resolve_implementation  # noqa: E402
from c2c_jax.models.decoder import attention_mask, rope_tables  # noqa: E402
from c2c_jax.fuser import Fuser  # noqa: E402
from c2c_jax.pipeline import C2CModel, kv_pass  # noqa: E402


def _runs(passes, xs=None):
    """Per pass, the state of a layer-by-layer KV-only fresh prefill; `xs`: hidden states to resume from."""
    runs = []
    for j, (model, tokens, positions, valid, depth) in enumerate(passes):
        t = tokens.shape[1]
        mask = None if valid is None else attention_mask(valid, 0, t)
        cos, sin = rope_tables(positions, model.config.rope, model.config.head_dim)
        runs.append(dict(x=model.embed_tokens(tokens) if xs is None else xs[j], cos=cos, sin=sin, depth=depth,
                         k=[], v=[], layer_at=model._layer_getter(), dtype=model.dtype, t=t,
                         valid=jnp.ones(tokens.shape, bool) if valid is None else valid,
                         attend=functools.partial(cache_attention, mask=mask, end=0,
                                                  implementation=model.attention_impl)))
    return runs


def _run_layers(runs, start, stop):
    """Layers [start, stop) of every run, layer i of each before layer i + 1 of either."""
    for i in range(start, stop):
        for r in runs:
            if i < r["depth"] - 1:
                r["x"], k, v = r["layer_at"](i)(r["x"], r["cos"], r["sin"], r["attend"])
            elif i == r["depth"] - 1:
                k, v = r["layer_at"](i).kv(r["x"], r["cos"], r["sin"])
            else:
                continue
            r["k"].append(k[None])
            r["v"].append(v[None])


def _caches(runs):
    return [KVCache(k=jnp.concatenate(r["k"]).astype(r["dtype"]), v=jnp.concatenate(r["v"]).astype(r["dtype"]),
                    valid=r["valid"], end=jnp.asarray(r["t"], jnp.int32)) for r in runs]


def interleaved_kv_passes(passes):
    """KV-only fresh prefills of several decoders, emitted layer by layer in turn.

    passes: (model, tokens, positions, valid or None, depth) each; the same caches as `kv_pass`.
    """
    runs = _runs(passes)
    _run_layers(runs, 0, max(r["depth"] for r in runs))
    return _caches(runs)


def route_passes(m, batch, length, *, masked=True, with_sharers=True):
    """`C2CModel.prefix_caches`' passes (one sharer) as `interleaved_kv_passes` takes them."""
    c = slice(0, length)
    passes = [(m.receiver, batch.tokens[:, c], batch.positions[:, c], batch.valid[:, c] if masked else None,
               m.receiver.config.num_layers)]
    if with_sharers:
        passes.append((m.sharers[0], batch.sharer_tokens[0][:, c], batch.sharer_positions[0][:, c],
                       batch.sharer_valid[0][:, c] if masked else None, m.fusers[0].config.sharer_depth))
    return passes


def fuse_layers(fuser, layers: range, sharer_k, sharer_v, receiver_k, receiver_v, fuse_mask):
    """`Fuser.__call__` (inference) for receiver `layers` alone, from per-layer K/V lists: a batched
    computation that needs only those layers and the sharer layers they map to."""
    c = fuser.config
    mapped = [c.layer_map[i] for i in layers]
    low, high = min(mapped), max(mapped)
    sub_config = dataclasses.replace(c, receiver_layers=len(layers), layer_map=tuple(s - low for s in mapped))
    sub_graphdef, _ = nnx.split(nnx.eval_shape(lambda: Fuser(sub_config, rngs=nnx.Rngs(0))))
    state = jax.tree.map(lambda p: p[layers.start:layers.stop], nnx.state(fuser))
    sub = nnx.merge(sub_graphdef, state)
    stack = lambda arrays: jnp.stack(arrays)  # noqa: E731
    shape = receiver_k[layers.start].shape
    cache = lambda k, v: KVCache(k=stack(k), v=stack(v), valid=jnp.ones(shape[:2], bool),  # noqa: E731
                                 end=jnp.asarray(shape[1], jnp.int32))
    fused = sub(cache(sharer_k[low:high + 1], sharer_v[low:high + 1]),
                cache(receiver_k[layers.start:layers.stop], receiver_v[layers.start:layers.stop]), fuse_mask)
    return list(fused.k), list(fused.v)


def overlapped_route(m, batch, chunk: int, resume=None):
    """The C2C TTFT route as one dataflow graph with per-layer dependencies: fusion runs in chunks of
    `chunk` receiver layers as soon as their K/V (and their sharer layers') exist, and the last
    token's layer i as soon as fused layer i does, so CONCURRENT command buffers may run fusion and
    the last token alongside the remaining prefix layers. resume: (xs, ks, vs) of a first program
    that ran the passes' first layers (`stage_first_layers`)."""
    t = batch.tokens.shape[1]
    runs = _runs(route_passes(m, batch, t), None if resume is None else resume[0])
    done = 0
    if resume is not None:
        for r, k, v in zip(runs, resume[1], resume[2]):
            r["k"], r["v"] = [a[None] for a in k], [a[None] for a in v]
        done = len(resume[1][0])
    receiver, sharer = runs
    fuser = m.fusers[0]
    split = t - 1
    fuse_mask = batch.fuse_mask[0].at[:, split:].set(False)
    # The last token, layer by layer on the fused cache (`finish_prompt`, capacity t).
    last = slice(split, t)
    x = m.receiver.embed_tokens(batch.tokens[:, last])
    x = jnp.concatenate([x, x])  # one row as two (`Decoder.__call__`'s one_row_gemm)
    cos, sin = rope_tables(batch.positions[:, last], m.receiver.config.rope, m.receiver.config.head_dim)
    mask = attention_mask(batch.valid, split, 1)
    layer_at = m.receiver._layer_getter()
    num_layers = m.receiver.config.num_layers
    fused_k, fused_v = [], []
    for stop in range(chunk, num_layers + chunk, chunk):
        stop = min(stop, num_layers)
        needed = max(stop, max(fuser.config.layer_map[:stop]) + 1)
        if needed > done:
            _run_layers(runs, done, needed)
            done = needed
        rk, rv = [a[0] for a in receiver["k"]], [a[0] for a in receiver["v"]]
        sk, sv = [a[0] for a in sharer["k"]], [a[0] for a in sharer["v"]]
        start = len(fused_k)
        k_chunk, v_chunk = fuse_layers(fuser, range(start, stop), sk, sv, rk, rv, fuse_mask)
        fused_k += k_chunk
        fused_v += v_chunk
        for i in range(start, stop):
            attend = functools.partial(cache_attention, cache_k=fused_k[i][None], cache_v=fused_v[i][None], layer=0,
                                       mask=mask, end=split, implementation=m.receiver.attention_impl)
            x, _, _ = layer_at(i)(x, cos, sin, attend, paired=True)
    return first_token(m.receiver.logits(m.receiver.norm(x[:1])[:, -1]))


def masked_kv_pass(model, tokens, positions, valid, depth):
    """`kv_pass` as the library ran it up to session 10: padding hidden by an attention mask."""
    cache = model.init_cache(tokens.shape[0], tokens.shape[1], num_layers=depth)
    return model(tokens, positions, cache, valid, output="kv")[1]


def slice_write_cache_attention(q, k_new, v_new, cache_k=None, cache_v=None, layer=None, *, mask, end,
                                implementation):
    """`cache_attention` as the library ran it up to session 10."""
    if cache_k is None:
        return cache_attention(q, k_new, v_new, mask=mask, end=end, implementation=implementation)
    cached_k, cached_v = cache_k[layer], cache_v[layer]
    keys = jax.lax.dynamic_update_slice(cached_k, k_new.astype(cached_k.dtype), (0, end, 0, 0))
    values = jax.lax.dynamic_update_slice(cached_v, v_new.astype(cached_v.dtype), (0, end, 0, 0))
    return jax.nn.dot_product_attention(q.astype(keys.dtype), keys, values, mask=mask,
                                        implementation=resolve_implementation(implementation, q, q.shape[1]))


def first_token(logits):
    """float32 [B, 2]: the greedy first token and its logit (which the variants' check compares too)."""
    return jnp.stack([jnp.argmax(logits, -1).astype(jnp.float32), jnp.max(logits, -1)], axis=-1)


def prefix_caches_variant(interleaved: bool, masked: bool):
    """A replacement for `C2CModel.prefix_caches` (one sharer)."""
    def prefix_caches(self, batch, length, *, with_sharers=True):
        passes = route_passes(self, batch, length, masked=masked, with_sharers=with_sharers)
        caches = interleaved_kv_passes(passes) if interleaved else [kv_pass(*p) for p in passes]
        return caches[0], caches[1:]
    return prefix_caches


def programs(graphdef, first_layers: int = 4, fuse_chunk: int = 4):
    def passes(state, batch, which, interleaved=False, masked=True):
        m = nnx.merge(graphdef, state)
        receiver_cache, sharer_caches = prefix_caches_variant(interleaved, masked)(m, batch, batch.tokens.shape[1])
        out = {"receiver": receiver_cache.k, "sharer": sharer_caches[0].k}
        return {k: out[k] for k in which}

    def ttft(state, batch, fuse, interleaved=False, masked=True):
        m = nnx.merge(graphdef, state)
        patch = (mock.patch.object(C2CModel, "prefix_caches", prefix_caches_variant(interleaved, masked))
                 if interleaved or not masked else contextlib.nullcontext())
        with patch:  # only tracing reads it
            logits, _ = m.prefill(batch, batch.tokens.shape[1], fuse=fuse)
        return first_token(logits)

    def ttft_into(state, batch, out):
        return out.at[:].set(ttft(state, batch, True))

    passes = jax.jit(passes, static_argnames=("which", "interleaved", "masked"))
    ttft_into = jax.jit(ttft_into, donate_argnums=2)
    ttft = jax.jit(ttft, static_argnames=("fuse", "interleaved", "masked"))
    # What one call costs the host without GPU work: the same arguments, one tiny kernel.
    floor = jax.jit(lambda state, batch: batch.tokens[:, -1] + 1, keep_unused=True)
    holder = {}

    def donated(state, batch):
        """The C2C TTFT program writing its token into a donated buffer: the output keeps one
        device address from call to call (a fresh output buffer may not)."""
        if "out" not in holder:
            holder["out"] = jnp.zeros((batch.tokens.shape[0], 2), jnp.float32)
        holder["out"] = ttft_into(state, batch, holder.pop("out"))
        return holder["out"]

    # The route split into separately dispatched programs: the host launches the next program's
    # command buffer while the GPU still runs the one before it.
    @jax.jit
    def stage_passes(state, batch):
        return nnx.merge(graphdef, state).prefix_caches(batch, batch.tokens.shape[1])

    @jax.jit
    def stage_fuse(state, batch, receiver_cache, sharer_caches):
        return nnx.merge(graphdef, state).fused_prefix(batch, receiver_cache, sharer_caches)

    @functools.partial(jax.jit, static_argnames="fuse")
    def stage_passes_fuse(state, batch, fuse=True):  # the library's first program (`InferencePrograms`)
        return nnx.merge(graphdef, state).prompt_cache(batch, fuse=fuse)

    @functools.partial(jax.jit, static_argnames="fuse")
    def stage_masked_passes_fuse(state, batch, fuse=True):
        with mock.patch("c2c_jax.pipeline.kv_pass", masked_kv_pass):  # only tracing reads it
            return nnx.merge(graphdef, state).prompt_cache(batch, fuse=fuse)

    @jax.jit
    def stage_suffix(state, batch, cache):  # the library's second program, plus the first token
        logits, _ = nnx.merge(graphdef, state).finish_prompt(batch, cache, batch.tokens.shape[1])
        return first_token(logits)

    @jax.jit
    def stage_suffix_slice_write(state, batch, cache):
        with mock.patch("c2c_jax.models.decoder.cache_attention", slice_write_cache_attention):  # tracing only
            return stage_suffix.__wrapped__(state, batch, cache)

    @jax.jit
    def stage_suffix_pair(state, batch, cache):
        """The last token as the first of two rows, the second a masked copy written one column
        further (which decoding would overwrite): T = 2 keeps every projection a GEMM without
        `one_row_gemm`'s paired rows."""
        m = nnx.merge(graphdef, state)
        cache = cache.with_capacity(batch.tokens.shape[1] + 1)
        pair = lambda a: jnp.concatenate([a[:, -1:], a[:, -1:]], axis=1)  # noqa: E731
        mask = jnp.concatenate([batch.valid[:, -1:], jnp.zeros_like(batch.valid[:, -1:])], axis=1)
        hidden, _ = m.receiver(pair(batch.tokens), pair(batch.positions), cache, mask, output="hidden")
        return first_token(m.receiver.logits(hidden[:, 0]))

    @jax.jit
    def stage_first_layers(state, batch):
        """The prefix passes' first layers alone: a small first program, whose graph the host starts
        quickly, while it starts the next program's."""
        runs = _runs(route_passes(nnx.merge(graphdef, state), batch, batch.tokens.shape[1]))
        _run_layers(runs, 0, first_layers)
        return [r["x"] for r in runs], [jnp.concatenate(r["k"]) for r in runs], [jnp.concatenate(r["v"]) for r in runs]

    @jax.jit
    def stage_rest_fuse(state, batch, xs, ks, vs):
        m = nnx.merge(graphdef, state)
        runs = _runs(route_passes(m, batch, batch.tokens.shape[1]), xs)
        for r, k, v in zip(runs, ks, vs):
            r["k"], r["v"] = [k], [v]
        _run_layers(runs, first_layers, max(r["depth"] for r in runs))
        receiver_cache, sharer_cache = _caches(runs)
        return m.fused_prefix(batch, receiver_cache, [sharer_cache])

    @jax.jit
    def overlapped(state, batch):
        return overlapped_route(nnx.merge(graphdef, state), batch, fuse_chunk)

    @jax.jit
    def stage_rest_overlapped(state, batch, xs, ks, vs):
        return overlapped_route(nnx.merge(graphdef, state), batch, fuse_chunk, resume=(xs, ks, vs))

    def small_first_overlapped(state, batch):
        return stage_rest_overlapped(state, batch, *stage_first_layers(state, batch))

    def small_first_pair_suffix(state, batch):
        return stage_suffix_pair(state, batch, stage_rest_fuse(state, batch, *stage_first_layers(state, batch)))

    def small_first_program(state, batch):
        return stage_suffix(state, batch, stage_rest_fuse(state, batch, *stage_first_layers(state, batch)))

    def two_programs_pair_suffix(state, batch):
        return stage_suffix_pair(state, batch, stage_passes_fuse(state, batch))

    def two_programs(state, batch):
        return stage_suffix(state, batch, stage_passes_fuse(state, batch))

    def receiver_two_programs(state, batch):  # the library's receiver-only route since session 9
        return stage_suffix(state, batch, stage_passes_fuse(state, batch, fuse=False))

    def two_programs_masked(state, batch, fuse=True):
        return stage_suffix(state, batch, stage_masked_passes_fuse(state, batch, fuse=fuse))

    def two_programs_slice_write(state, batch, fuse=True):
        return stage_suffix_slice_write(state, batch, stage_passes_fuse(state, batch, fuse=fuse))

    @functools.partial(jax.jit, static_argnames="fuse")
    def stage_passes_fuse_xla_attention(state, batch, fuse=True):  # the same program: no last token in it
        return stage_passes_fuse.__wrapped__(state, batch, fuse=fuse)

    @jax.jit
    def stage_suffix_xla_attention(state, batch, cache):
        with mock.patch("c2c_jax.models.attention._pallas_decode_fits", lambda *_: False):  # tracing only
            return stage_suffix.__wrapped__(state, batch, cache)

    def two_programs_xla_attention(state, batch, fuse=True):
        return stage_suffix_xla_attention(state, batch, stage_passes_fuse_xla_attention(state, batch, fuse=fuse))

    def three_programs(state, batch):
        return stage_suffix(state, batch, stage_fuse(state, batch, *stage_passes(state, batch)))

    both = ("receiver", "sharer")
    return {
        "c2c_ttft_two_programs": two_programs,
        "c2c_ttft_two_programs_pair_suffix": two_programs_pair_suffix,
        "c2c_ttft_two_programs_masked": two_programs_masked,
        "receiver_ttft_two_programs_masked": functools.partial(two_programs_masked, fuse=False),
        "c2c_ttft_two_programs_slice_write": two_programs_slice_write,
        "receiver_ttft_two_programs_slice_write": functools.partial(two_programs_slice_write, fuse=False),
        "c2c_ttft_two_programs_xla_attention": two_programs_xla_attention,
        "receiver_ttft_two_programs_xla_attention": functools.partial(two_programs_xla_attention, fuse=False),
        "c2c_ttft_small_first_program": small_first_program,
        "c2c_ttft_small_first_pair_suffix": small_first_pair_suffix,
        "c2c_ttft_overlapped": overlapped,
        "c2c_ttft_small_first_overlapped": small_first_overlapped,
        "c2c_ttft_three_programs": three_programs,
        "dispatch_floor": floor,
        "c2c_ttft_donated_output": donated,
        "receiver_pass": functools.partial(passes, which=("receiver",)),
        "receiver_pass_unmasked": functools.partial(passes, which=("receiver",), masked=False),
        "sharer_pass": functools.partial(passes, which=("sharer",)),
        "sharer_pass_unmasked": functools.partial(passes, which=("sharer",), masked=False),
        "both_passes": functools.partial(passes, which=both),
        "both_passes_unmasked": functools.partial(passes, which=both, masked=False),
        "both_passes_interleaved": functools.partial(passes, which=both, interleaved=True),
        "c2c_ttft": functools.partial(ttft, fuse=True),
        "c2c_ttft_unmasked": functools.partial(ttft, fuse=True, masked=False),
        "c2c_ttft_interleaved": functools.partial(ttft, fuse=True, interleaved=True),
        "c2c_ttft_interleaved_unmasked": functools.partial(ttft, fuse=True, interleaved=True, masked=False),
        "receiver_ttft": functools.partial(ttft, fuse=False),
        "receiver_ttft_two_programs": receiver_two_programs,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for a CPU check of this script")
    parser.add_argument("--variants", default="receiver_pass,sharer_pass,both_passes,both_passes_interleaved,"
                        "c2c_ttft,c2c_ttft_interleaved,receiver_ttft")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3, help="each round times every variant once, in turn")
    parser.add_argument("--first-layers", type=int, default=4, help="layers in c2c_ttft_small_first_program's "
                        "first program")
    parser.add_argument("--fuse-chunk", type=int, default=4, help="receiver layers per fusion in the "
                        "*_overlapped variants")
    parser.add_argument("--pipelined", type=int, default=0, help="also time this many calls queued back to back")
    args = parser.parse_args()
    receiver_cfg, sharer_cfg, t = ((common.SMOKE_RECEIVER, common.SMOKE_SHARER, 32) if args.smoke
                                   else (common.QWEN3_0_6B, common.QWEN2_5_0_5B, args.tokens))
    print("device:", common.device_name(), flush=True)
    report = common.Report("ttft_programs")
    model = bi.make_c2c(receiver_cfg, sharer_cfg)
    graphdef, state = nnx.split(model)
    batch = bi.prompt_batch(1, t, receiver_cfg["vocab_size"])
    available = programs(graphdef, args.first_layers, args.fuse_chunk)
    names = args.variants.split(",")
    for name in names:  # "variant/f<first layers>c<fuse chunk>": the variant with its own settings
        if "/" in name:
            base, settings = name.split("/")
            match = re.fullmatch(r"f(\d+)c(\d+)", settings)
            if not match or base not in available:
                raise SystemExit(f"variant {name!r} is not <variant>/f<first layers>c<fuse chunk> with a variant "
                                 f"from {sorted(available)}")
            available[name] = programs(graphdef, int(match[1]), int(match[2]))[base]
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {sorted(available)}")
    # The variants must compute the same caches and first token as the library's route.
    reference = available["both_passes"](state, batch) if "both_passes" in names else {}
    for n in [n for n in ("both_passes_interleaved", "both_passes_unmasked") if n in names]:
        out = available[n](state, batch)
        diff = max(float(jnp.max(jnp.abs(out[k].astype(jnp.float32) - reference[k].astype(jnp.float32))))
                   for k in reference)
        report.add(what=f"check_{n}", max_abs_diff_vs_both_passes=diff)
    # First tokens of three prompts (a wrong cache rarely keeps all three argmaxes).
    prompts = [batch] + [dataclasses.replace(batch, tokens=shuffled, sharer_tokens=(shuffled,)) for shuffled in
                         (jax.random.permutation(jax.random.key(i), batch.tokens, axis=1) for i in (1, 2))]
    outputs = {n: [available[n](state, p)[0] for p in prompts] for n in names if "ttft" in n}
    report.add(what="check_first_tokens", **{n: [int(o[0]) for o in out] for n, out in outputs.items()})
    report.add(what="check_first_token_logits", **{n: [float(o[1]) for o in out] for n, out in outputs.items()})
    samples = {n: [] for n in names}
    for round_ in range(args.rounds):
        for n in names:
            samples[n].append(common.time_ms(available[n], state, batch))
            print(f"round {round_}: {n} {samples[n][-1]:.3f} ms", flush=True)
    for n in names:
        row = dict(median_ms=round(statistics.median(samples[n]), 3), each_round_ms=[round(s, 3) for s in samples[n]],
                   dispatch_ms=round(common.dispatch_ms(available[n], state, batch), 3))
        if args.pipelined and n != "c2c_ttft_donated_output":
            # Throughput with calls queued back to back: the GPU's time per call, once host work
            # (dispatch, command-buffer launch) overlaps the previous call's kernels.
            start = time.perf_counter()
            jax.block_until_ready([available[n](state, batch) for _ in range(args.pipelined)])
            row["pipelined_ms_per_call"] = round((time.perf_counter() - start) * 1e3 / args.pipelined, 3)
        report.add(what=n, tokens=t, batch=1, **row)
    report.save()


if __name__ == "__main__":
    main()
