"""Which parts of the C2C TTFT program overlap? Times its pieces as whole programs, in one process.

Issue 3's C2C TTFT (512 tokens, batch 1) is about the serial sum of its parts, although the
receiver's and the sharer's prefix passes are independent and `CONCURRENT` command buffers could
run them at once. This times, on one card and one process, programs that differ in one thing:

    receiver_pass, sharer_pass      each prefix pass alone (with the pipeline's padding mask)
    both_passes                     both, in one program, one after the other in program order
    both_passes_interleaved         both, layer i of each before layer i + 1 of either
    *_unmasked                      the same without the padding mask (what an unpadded batch needs)
    c2c_ttft, receiver_ttft         `C2CModel.prefill` + argmax as one program (the route up to session 8)
    c2c_ttft_interleaved            the same with interleaved prefix passes
    c2c_ttft_two_programs           prompt cache + fusion, then the last token + argmax: the library's
                                    route since session 9 (`pipeline.next_token_logits`), plus an argmax
    c2c_ttft_three_programs         prefix passes, fusion, last token
    c2c_ttft_two_programs_pair_suffix   the same, the last token run as two rows (a masked copy)
                                    instead of through `one_row_gemm`
    c2c_ttft_small_first_program    the passes' first `--first-layers` layers, then the rest and
                                    fusion, then the last token: three programs, the first small
    c2c_ttft_donated_output         one program writing its token into a donated buffer
    dispatch_floor                  one tiny kernel with the same arguments: the host's cost of a call

If both_passes ~ receiver_pass + sharer_pass, the two passes do not overlap. `--pipelined N` also
times N calls queued back to back: the difference to one synchronised call is host work that the
GPU waits for.

    python bench/ttft_programs.py [--variants a,b,...] [--rounds 3] [--pipelined N] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
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
from c2c_jax.models.attention import cache_attention  # noqa: E402
from c2c_jax.models.decoder import attention_mask, rope_tables  # noqa: E402
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


def programs(graphdef, first_layers: int = 4):
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

    def fused_prompt_cache(m, batch, receiver_cache, sharer_caches):
        """`C2CModel.prompt_cache`'s fusion and rewind, on caches from an earlier program."""
        split = batch.tokens.shape[1] - 1
        fused = m.fuse(receiver_cache, sharer_caches, [k.at[:, split:].set(False) for k in batch.fuse_mask])
        return dataclasses.replace(fused, end=fused.end - 1)

    @jax.jit
    def stage_fuse(state, batch, receiver_cache, sharer_caches):
        return fused_prompt_cache(nnx.merge(graphdef, state), batch, receiver_cache, sharer_caches)

    @jax.jit
    def stage_passes_fuse(state, batch):  # the library's first program (`pipeline._prompt_cache`)
        return nnx.merge(graphdef, state).prompt_cache(batch)

    @jax.jit
    def stage_suffix(state, batch, cache):  # the library's second program, plus the first token
        logits, _ = nnx.merge(graphdef, state).finish_prompt(batch, cache, batch.tokens.shape[1])
        return first_token(logits)

    @jax.jit
    def stage_suffix_pair(state, batch, cache):
        """The last token as the first of two rows, the second a masked copy written one column
        further (which decoding would overwrite): T = 2 keeps every projection a GEMM without
        `one_row_gemm`'s concatenations."""
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
        return fused_prompt_cache(m, batch, receiver_cache, [sharer_cache])

    def small_first_program(state, batch):
        return stage_suffix(state, batch, stage_rest_fuse(state, batch, *stage_first_layers(state, batch)))

    def two_programs_pair_suffix(state, batch):
        return stage_suffix_pair(state, batch, stage_passes_fuse(state, batch))

    def two_programs(state, batch):
        return stage_suffix(state, batch, stage_passes_fuse(state, batch))

    def three_programs(state, batch):
        return stage_suffix(state, batch, stage_fuse(state, batch, *stage_passes(state, batch)))

    both = ("receiver", "sharer")
    return {
        "c2c_ttft_two_programs": two_programs,
        "c2c_ttft_two_programs_pair_suffix": two_programs_pair_suffix,
        "c2c_ttft_small_first_program": small_first_program,
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
    parser.add_argument("--pipelined", type=int, default=0, help="also time this many calls queued back to back")
    args = parser.parse_args()
    receiver_cfg, sharer_cfg, t = ((common.SMOKE_RECEIVER, common.SMOKE_SHARER, 32) if args.smoke
                                   else (common.QWEN3_0_6B, common.QWEN2_5_0_5B, args.tokens))
    print("device:", common.device_name(), flush=True)
    report = common.Report("ttft_programs")
    model = bi.make_c2c(receiver_cfg, sharer_cfg)
    graphdef, state = nnx.split(model)
    batch = bi.prompt_batch(1, t, receiver_cfg["vocab_size"])
    available = programs(graphdef, args.first_layers)
    names = args.variants.split(",")
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
    outputs = {n: [available[n](state, p)[0] for p in prompts] for n in names if "ttft" in n and "receiver" not in n}
    report.add(what="check_first_tokens", **{n: [int(o[0]) for o in out] for n, out in outputs.items()})
    report.add(what="check_first_token_logits", **{n: [float(o[1]) for o in out] for n, out in outputs.items()})
    samples = {n: [] for n in names}
    for round_ in range(args.rounds):
        for n in names:
            samples[n].append(common.time_ms(available[n], state, batch))
            print(f"round {round_}: {n} {samples[n][-1]:.3f} ms", flush=True)
    for n in names:
        row = dict(median_ms=round(statistics.median(samples[n]), 3), each_round_ms=[round(s, 3) for s in samples[n]])
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
