"""Inference benchmarks at Qwen3-0.6B <- Qwen2.5-0.5B shapes, random bf16 weights.

Models: prefill of 512 and 2048 tokens (full logits and KV-only), decode ms/token at
batch 1 and 64, for both models, next to transformers' PyTorch models on the same card.
Fusion: fusing all 28 layers, C2C time-to-first-token and receiver-only TTFT at 512 and
2048 prompt tokens, batch 1 and 16.
TTFT alone (`--only ttft`): the fusion part's TTFT rows without its fusion timings.
TTFT parts (`--only ttft_parts`): the four steps of the C2C TTFT route timed one by one.
Generate (`--only generate`): the library's decode loop (`infer.decode.decode`, a while loop that
checks for EOS after every token) for Qwen3-0.6B at a 512-token context, ms per token.
Methods: first-token latency of receiver, sharer, text-to-text (sharer writes an
80-token message first) and C2C at a 512-token prompt.
Decode attention (`--only decode_attention`): one new token's attention over every layer of a
server's stacked cache (Qwen3-0.6B, 384 columns), the GPU's Pallas kernel against XLA's route, with
each row seeing the first `--seen` columns: the kernel loads no block a row cannot see.

    python bench/bench_inference.py [--smoke] [--skip-torch]
                                    [--only models,fusion,ttft,methods,ttft_parts,generate,decode_attention]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from c2c_jax.config import use_inference_xla_flags  # noqa: E402

use_inference_xla_flags()  # as the generate/evaluate CLIs do, before JAX starts its backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import common  # noqa: E402
from common import (QWEN2_5_0_5B, QWEN3_0_6B, SMOKE_RECEIVER, SMOKE_SHARER, Report, device_name,  # noqa: E402
                    random_decoder, time_ms)

from c2c_jax.c2c.fuser import Fuser  # noqa: E402
from c2c_jax.c2c.model import C2CModel, kv_pass  # noqa: E402
from c2c_jax.c2c.prefix import PackedRows  # noqa: E402
from c2c_jax.c2c.prompt import PromptBatch  # noqa: E402
from c2c_jax.infer.decode import SamplingConfig, decode  # noqa: E402
from c2c_jax.infer.generator import InferencePrograms  # noqa: E402
from c2c_jax.models.attention import cache_attention  # noqa: E402
from c2c_jax.models.decoder import attention_mask  # noqa: E402
from c2c_jax.models.kv_cache import decode_capacity  # noqa: E402


def prefill_fn(graphdef, output):
    @jax.jit
    def run(state, tokens):
        model = nnx.merge(graphdef, state)
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        num_layers = model.config.num_layers
        cache = model.init_cache(b, t, num_layers=num_layers)
        out, cache = model(tokens, positions, cache, output=output)
        return cache.k if out is None else out
    return run


def decode_fn(graphdef, steps):
    @functools.partial(jax.jit, donate_argnums=(1,))
    def run(state, cache, token, start):
        model = nnx.merge(graphdef, state)

        def body(i, carry):
            cache, token = carry
            logits, cache = model(token, jnp.full(token.shape, start + i), cache)
            return cache, jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)

        cache, token = jax.lax.fori_loop(0, steps, body, (cache, token))
        return cache, token
    return run


def bench_models(report, receiver_cfg, sharer_cfg, lengths, decode_batches, decode_steps, context, torch_compare,
                 names=("qwen3-0.6b", "qwen2.5-0.5b")):
    for name, cfg in (("qwen3-0.6b", receiver_cfg), ("qwen2.5-0.5b", sharer_cfg)):
        if name not in names:
            continue
        model = random_decoder(cfg)
        graphdef, state = nnx.split(model)
        for t in lengths:
            tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg["vocab_size"], (1, t)), jnp.int32)
            for output in ("logits", "kv"):
                ms = time_ms(prefill_fn(graphdef, output), state, tokens)
                report.add(model=name, what=f"prefill_{output}", tokens=t, batch=1, ms=round(ms, 3))
        for b in decode_batches:
            prompt = context
            cache = model.init_cache(b, decode_capacity(prompt + decode_steps + 1))  # as `Generator` sizes it
            run = decode_fn(graphdef, decode_steps)
            token = jnp.zeros((b, 1), jnp.int32)
            cache = _fill(model, cache, prompt)
            # Each call decodes `decode_steps` tokens; the cache is donated and threaded through.
            for _ in range(2):
                cache, token = run(state, cache, token, prompt)
                jax.block_until_ready(token)
                cache = _rewind(cache, prompt)
            start = time.perf_counter()
            cache, token = run(state, cache, token, prompt)
            jax.block_until_ready(token)
            ms = (time.perf_counter() - start) * 1e3 / decode_steps
            report.add(model=name, what="decode_ms_per_token", batch=b, context=prompt, ms=round(ms, 3))
        if torch_compare:
            bench_torch(report, name, cfg, lengths, decode_batches, decode_steps)
        del model, state


def _fill(model, cache, prompt):
    """Marks `prompt` columns as filled (contents do not matter for timing)."""
    valid = cache.valid.at[:, :prompt].set(True)
    return dataclasses.replace(cache, valid=valid, end=jnp.asarray(prompt, jnp.int32))


def _rewind(cache, prompt):
    return dataclasses.replace(cache, end=jnp.asarray(prompt, jnp.int32))


def bench_torch(report, name, cfg, lengths, decode_batches, decode_steps):
    """transformers' PyTorch model of the same architecture, random bf16 weights, same card."""
    try:
        import torch
        import transformers
    except ImportError:
        report.add(model=name, what="torch", note="torch/transformers not installed")
        return
    if not torch.cuda.is_available():
        report.add(model=name, what="torch", note="no CUDA device for torch")
        return
    hf = dict(cfg)
    model_type = hf.pop("model_type")
    config_cls = {"qwen3": transformers.Qwen3Config, "qwen2": transformers.Qwen2Config}[model_type]
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**hf), dtype=torch.bfloat16).cuda().eval()

    def timed(fn, iters=10, warmup=2):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(iters):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        return float(np.median(samples))

    with torch.no_grad():
        for t in lengths:
            ids = torch.randint(0, cfg["vocab_size"], (1, t), device="cuda")
            ms = timed(lambda: model(input_ids=ids, use_cache=True))
            report.add(model=name, what="torch_prefill_logits", tokens=t, batch=1, ms=round(ms, 3))
        for b in decode_batches:
            ids = torch.randint(0, cfg["vocab_size"], (b, 512), device="cuda")

            def torch_decode():
                out = model(input_ids=ids, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                for _ in range(decode_steps):
                    out = model(input_ids=token, past_key_values=cache, use_cache=True)
                    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            prefill_ms = timed(lambda: model(input_ids=ids, use_cache=True), iters=3, warmup=1)
            ms = (timed(torch_decode, iters=3, warmup=1) - prefill_ms) / decode_steps
            report.add(model=name, what="torch_decode_ms_per_token", batch=b, context=512, ms=round(ms, 3))
    del model
    torch.cuda.empty_cache()


def make_c2c(receiver_cfg, sharer_cfg, gates_open=True):
    receiver = random_decoder(receiver_cfg)
    sharer = random_decoder(sharer_cfg, seed=1)
    config = common.fuser_config(receiver, sharer, 1024 if receiver_cfg is QWEN3_0_6B else 32)
    fuser = nnx.jit(lambda: Fuser(config, rngs=nnx.Rngs(2)))()
    if gates_open:
        fuser.projectors.gate_logit[...] = jnp.ones_like(fuser.projectors.gate_logit[...])
    return C2CModel(receiver, [sharer], [fuser])


def prompt_batch(b, t, vocab):
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, vocab, (b, t)), jnp.int32)
    ones = jnp.ones((b, t), bool)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return PromptBatch(tokens, ones, positions, (tokens,), (ones,), (positions,), (ones,))


def bench_fusion(report, receiver_cfg, sharer_cfg, lengths, batches, ttft_batches):
    model = make_c2c(receiver_cfg, sharer_cfg)
    graphdef, state = nnx.split(model)
    programs = InferencePrograms(graphdef)
    fuser = model.fusers[0]
    n_params = fuser.config.num_params()

    @jax.jit
    def fuse_only(state, batch):
        m = nnx.merge(graphdef, state)
        receiver_cache, sharer_caches = m.prefill_kv(batch.prefix())
        return receiver_cache, sharer_caches

    @functools.partial(jax.jit, static_argnames=("repeats",))
    def fuse(state, receiver_cache, sharer_caches, mask, repeats=1):
        """`repeats` fusions in one program, each into the cache the one before it fused."""
        m = nnx.merge(graphdef, state)
        for _ in range(repeats):
            receiver_cache = m.fuse(receiver_cache, sharer_caches, [mask])
        return receiver_cache.k

    for t in lengths:
        for b in batches:
            batch = prompt_batch(b, t, receiver_cfg["vocab_size"])
            receiver_cache, sharer_caches = fuse_only(state, batch)
            # A standalone fusion call (dispatch and synchronisation included), and what fusion adds
            # inside a program such as the TTFT route: the difference of 10 chained fusions and 1, per fusion.
            ms_fuse, ms_fuse_10 = (time_ms(functools.partial(fuse, repeats=n), state, receiver_cache, sharer_caches,
                                           batch.fuse_mask[0]) for n in (1, 10))
            ms_in_program = (ms_fuse_10 - ms_fuse) / 9
            flops = 2 * n_params * b * t
            report.add(what="fusion_all_layers", tokens=t, batch=b, ms=round(ms_fuse, 3),
                       tflops=round(flops / ms_fuse / 1e9, 1), in_program_ms=round(ms_in_program, 3),
                       in_program_tflops=round(flops / ms_in_program / 1e9, 1))
            if b in ttft_batches:  # each TTFT shape compiles the full pipelines (minutes, fully unrolled)
                bench_ttft(report, programs, state, batch)


def bench_ttft(report, programs: InferencePrograms, state, batch):
    """C2C and receiver-only time to first token: the library's route to the first token's logits
    (`InferencePrograms.next_token_logits`, two programs)."""
    def ttft(state, batch, fuse_flag):
        return programs.next_token_logits(state, batch, fuse=fuse_flag)

    b, t = batch.tokens.shape
    ms_c2c = time_ms(ttft, state, batch, True)
    ms_recv = time_ms(ttft, state, batch, False)
    report.add(what="ttft", tokens=t, batch=b, c2c_ms=round(ms_c2c, 3), receiver_only_ms=round(ms_recv, 3))


def bench_ttft_parts(report, receiver_cfg, sharer_cfg, t):
    """The C2C TTFT route at batch 1 cut into its four steps as `C2CModel.prefill` runs them, each its
    own jitted call (so each also pays one dispatch and one synchronisation): receiver and sharer KV
    passes over the t prompt tokens, fusion of the first t - 1 columns, and the last prompt token
    again on the fused cache (with logits and argmax)."""
    model = make_c2c(receiver_cfg, sharer_cfg)
    graphdef, state = nnx.split(model)
    batch = prompt_batch(1, t, receiver_cfg["vocab_size"])
    split = t - 1
    prefix = (batch.tokens, batch.positions, batch.valid)
    mask = batch.fuse_mask[0].at[:, split:].set(False)

    @jax.jit
    def sharer_prefix(state, tokens, positions, valid):
        m = nnx.merge(graphdef, state)
        return kv_pass(m.sharers[0], PackedRows.pack(tokens, positions, valid), m.fusers[0].config.sharer_depth)

    @jax.jit
    def fuse(state, receiver_cache, sharer_cache, mask):
        return nnx.merge(graphdef, state).fuse(receiver_cache, [sharer_cache], [mask])

    @jax.jit
    def last_token(state, cache, batch):
        logits, _ = nnx.merge(graphdef, state).finish_prompt(batch, dataclasses.replace(cache, end=cache.end - 1), t)
        return jnp.argmax(logits, -1)

    # The receiver's prefix pass over `width` columns, with the pipeline's all-valid padding mask or
    # none: what the width and the mask cost it.
    @functools.partial(jax.jit, static_argnames=("width", "masked"))
    def receiver_prefix(state, tokens, positions, valid, width=t, masked=True):
        m = nnx.merge(graphdef, state)
        rows = PackedRows.pack(tokens[:, :width], positions[:, :width], valid[:, :width] if masked else None)
        return kv_pass(m.receiver, rows, m.receiver.config.num_layers)

    variants = {f"receiver_{w}_{'masked' if masked else 'unmasked'}_ms":
                time_ms(functools.partial(receiver_prefix, width=w, masked=masked), state, *prefix)
                for w in (split, t) for masked in (False, True)}
    receiver_cache, sharer_cache = receiver_prefix(state, *prefix), sharer_prefix(state, *prefix)
    fused = fuse(state, receiver_cache, sharer_cache, mask)
    parts = dict(receiver_prefix_ms=variants[f"receiver_{t}_masked_ms"],  # the route's own pass
                 sharer_prefix_ms=time_ms(sharer_prefix, state, *prefix),
                 fusion_ms=time_ms(fuse, state, receiver_cache, sharer_cache, mask),
                 last_token_ms=time_ms(last_token, state, fused, batch), **variants)
    report.add(what="ttft_parts", tokens=t, batch=1, **{k: round(v, 3) for k, v in parts.items()})


def bench_methods(report, receiver_cfg, sharer_cfg, prompt, message_tokens):
    """First-token latency per evaluation method at batch 1 (greedy, no EOS so lengths are fixed)."""
    model = make_c2c(receiver_cfg, sharer_cfg)
    sharer_only = C2CModel(model.sharers[0])
    vocab = receiver_cfg["vocab_size"]
    c2c_def, c2c_state = nnx.split(model)
    sharer_def, sharer_state = nnx.split(sharer_only)
    c2c, sharer = InferencePrograms(c2c_def), InferencePrograms(sharer_def)
    key = jax.random.key(0)

    def first_token(programs, state, batch, fuse):
        return programs.generate(state, batch, key, sampling=SamplingConfig(max_new_tokens=1), eos_ids=(),
                                 pad_id=0, fuse=fuse).tokens

    batch = prompt_batch(1, prompt, vocab)
    receiver_ms = time_ms(first_token, c2c, c2c_state, batch, False)
    c2c_ms = time_ms(first_token, c2c, c2c_state, batch, True)
    sharer_ms = time_ms(first_token, sharer, sharer_state, batch, False)

    def t2t(batch, long_batch):
        message = sharer.generate(sharer_state, batch, key, sampling=SamplingConfig(max_new_tokens=message_tokens),
                                  eos_ids=(), pad_id=0, fuse=False).tokens
        jax.block_until_ready(message)
        return first_token(c2c, c2c_state, long_batch, False)

    long_batch = prompt_batch(1, 2 * prompt + message_tokens, vocab)  # question twice (both turns) + message
    t2t_ms = time_ms(t2t, batch, long_batch, iters=5)
    report.add(what="method_first_token_latency", prompt_tokens=prompt, message_tokens=message_tokens,
               receiver_ms=round(receiver_ms, 2), sharer_ms=round(sharer_ms, 2), c2c_ms=round(c2c_ms, 2),
               t2t_ms=round(t2t_ms, 2), c2c_speedup_over_t2t=round(t2t_ms / c2c_ms, 1))


def bench_generate(report, cfg, batches, context, new_tokens):
    """Qwen3-0.6B's decode loop as the library runs it (`infer.decode.decode`: a `lax.while_loop` that
    checks for EOS after every token; no EOS here, so every row runs `new_tokens`). `decode_fn`'s
    rows time a `fori_loop` of the same steps, whose trip count XLA knows."""
    model = random_decoder(cfg)
    graphdef, state = nnx.split(model)
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    for b in batches:
        first_logits = jax.random.normal(jax.random.key(0), (b, cfg["vocab_size"]), jnp.float32)

        @jax.jit
        def run(state, cache, first_logits):
            return decode(nnx.merge(graphdef, state), first_logits, cache, jnp.full((b,), context, jnp.int32),
                          jax.random.key(1), sampling, (), 0).tokens

        cache = _fill(model, model.init_cache(b, decode_capacity(context + new_tokens)), context)  # as `Generator`
        ms = time_ms(run, state, cache, first_logits, iters=3)
        report.add(what="generate", batch=b, context=context, new_tokens=new_tokens, ms=round(ms, 2),
                   ms_per_token=round(ms / (new_tokens - 1), 3))


def bench_decode_attention(report, cfg, rows, capacity, seen):
    """For each count `visible` in `seen`: one new token per row at column `visible` over the layers of a
    stacked cache of `capacity` columns whose first `visible` columns the rows see, as `cache_attention`
    computes it in a decode step, once per layer (a `fori_loop`, so that each implementation compiles
    one attention): "pallas", the GPU kernel over the stacked cache in place (Pallas' interpreter off
    the GPU), against "xla"."""
    layers, heads, kv_heads, d = (cfg[k] for k in ("num_hidden_layers", "num_attention_heads",
                                                   "num_key_value_heads", "head_dim"))
    for b in rows:
        keys = jax.random.split(jax.random.key(0), 5)
        q = jax.random.normal(keys[0], (b, 1, heads, d), jnp.bfloat16)
        new_k, new_v = (jax.random.normal(k, (b, 1, kv_heads, d), jnp.bfloat16) for k in keys[1:3])
        cache_k, cache_v = (jax.random.normal(k, (layers, b, capacity, kv_heads, d), jnp.bfloat16) for k in keys[3:])
        for visible in seen:
            mask = attention_mask(jnp.broadcast_to(jnp.arange(capacity) <= visible, (b, capacity)), visible, 1)
            ms = {}
            for implementation in ("pallas", "xla"):
                @jax.jit
                def run(q, new_k, new_v, cache_k, cache_v, mask, implementation=implementation):
                    def layer(index, total):
                        out = cache_attention(q, new_k, new_v, cache_k, cache_v, index, mask=mask,
                                              end=jnp.int32(visible), implementation=implementation)
                        return total + out.astype(jnp.float32)
                    return jax.lax.fori_loop(0, layers, layer, jnp.zeros(q.shape, jnp.float32))

                ms[implementation] = time_ms(run, q, new_k, new_v, cache_k, cache_v, mask, iters=20)
            report.add(what="decode_attention", rows=b, capacity=capacity, seen=visible, layers=layers,
                       pallas_ms=round(ms["pallas"], 3), xla_ms=round(ms["xla"], 3))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for a CPU check of this script")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--only", default="models,fusion,methods")
    parser.add_argument("--unroll", type=int, default=None, help="layers per scan iteration (default: Decoder's)")
    parser.add_argument("--lengths", default="512,2048", help="prompt lengths (models and fusion; '' with "
                        "--only models: decode alone)")
    parser.add_argument("--batches", default="1,16", help="batch sizes (fusion and TTFT)")
    parser.add_argument("--ttft-batches", default=None, help="batch sizes with TTFT rows (default: --batches)")
    parser.add_argument("--decode-batches", default="1,64")
    parser.add_argument("--models", default="qwen3-0.6b,qwen2.5-0.5b", help="which models --only models runs")
    parser.add_argument("--generate-tokens", type=int, default=128, help="--only generate: new tokens per row")
    parser.add_argument("--rows", default="1,32,256", help="--only decode_attention: rows (server slots)")
    parser.add_argument("--seen", default="192,383", help="--only decode_attention: columns each row sees, of 384")
    args = parser.parse_args()
    common.SCAN_UNROLL = args.unroll
    parts = args.only.split(",")
    print("device:", device_name(), flush=True)
    if args.smoke:
        receiver_cfg, sharer_cfg, lengths, batches, decode_batches, steps = SMOKE_RECEIVER, SMOKE_SHARER, (32,), (2,), (2,), 4
    else:
        receiver_cfg, sharer_cfg, steps = QWEN3_0_6B, QWEN2_5_0_5B, 64
        lengths, batches, decode_batches = (tuple(int(x) for x in a.split(",") if x) for a in
                                            (args.lengths, args.batches, args.decode_batches))
    report = Report("inference")
    report.add(what="settings", device=device_name(), scan_unroll=random_decoder(receiver_cfg).scan_unroll)
    if "models" in parts:
        bench_models(report, receiver_cfg, sharer_cfg, lengths, decode_batches, steps, 512 if not args.smoke else 16,
                     not args.skip_torch, args.models.split(","))
    if "fusion" in parts:
        ttft_batches = batches if args.smoke or args.ttft_batches is None else \
            tuple(int(x) for x in args.ttft_batches.split(","))
        bench_fusion(report, receiver_cfg, sharer_cfg, lengths, batches, ttft_batches)
    if "ttft" in parts:  # TTFT rows alone, for --batches
        model = make_c2c(receiver_cfg, sharer_cfg)
        graphdef, state = nnx.split(model)
        programs = InferencePrograms(graphdef)
        for t in lengths:
            for b in batches:
                bench_ttft(report, programs, state, prompt_batch(b, t, receiver_cfg["vocab_size"]))
    if "ttft_parts" in parts:
        bench_ttft_parts(report, receiver_cfg, sharer_cfg, lengths[0])
    if "generate" in parts:  # Qwen3-0.6B's decode loop as the library runs it, at --decode-batches
        bench_generate(report, receiver_cfg, decode_batches, 512 if not args.smoke else 16,
                       args.generate_tokens if not args.smoke else 6)
    if "decode_attention" in parts:
        rows, seen = (tuple(int(x) for x in a.split(",")) for a in (args.rows, args.seen))
        bench_decode_attention(report, receiver_cfg, (2,) if args.smoke else rows, 128 if args.smoke else 384,
                               (64, 127) if args.smoke else seen)
    if "methods" in parts:
        bench_methods(report, receiver_cfg, sharer_cfg, 512 if not args.smoke else 32, 80 if not args.smoke else 8)
    report.save()


if __name__ == "__main__":
    main()
