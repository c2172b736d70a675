"""Timings of upstream's routes at Qwen3-0.6B <- Qwen2.5-0.5B shapes, random bf16 weights.

* decode ms/token, usual decode against decode-time fusion (`include_response`: the sharer and the
  receiver's unfused pass decode in lockstep, each token fused), and the streaming program against
  the non-streaming one;
* time to first token of a 512-token prompt fused in one section (a sharer with the receiver's
  tokenizer), against token-aligned layouts run section by section: one message and a 9-token
  trailing template, and two messages.

    python bench/bench_upstream_routes.py [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from c2c_jax.config import use_inference_xla_flags  # noqa: E402

use_inference_xla_flags()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import common  # noqa: E402
from common import QWEN2_5_0_5B, QWEN3_0_6B, SMOKE_RECEIVER, SMOKE_SHARER, device_name, random_decoder, time_ms  # noqa: E402

from c2c_jax.c2c.fuser import Fuser  # noqa: E402
from c2c_jax.c2c.model import C2CModel  # noqa: E402
from c2c_jax.c2c.prompt import PromptBatch, section_layout  # noqa: E402
from c2c_jax.infer.decode import SamplingConfig  # noqa: E402
from c2c_jax.infer.generator import InferencePrograms  # noqa: E402


def batch_of(b, t, vocab, fuse=None):
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, vocab, (b, t)), jnp.int32)
    valid = np.ones((b, t), bool)
    fuse = valid if fuse is None else fuse
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    ones = jnp.asarray(valid)
    return PromptBatch(tokens, ones, positions, (tokens,), (ones,), (positions,), (jnp.asarray(fuse),),
                       **section_layout(valid, [fuse]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    receiver_cfg, sharer_cfg = (SMOKE_RECEIVER, SMOKE_SHARER) if args.smoke else (QWEN3_0_6B, QWEN2_5_0_5B)
    receiver, sharer = random_decoder(receiver_cfg), random_decoder(sharer_cfg, seed=1)
    config = common.fuser_config(receiver, sharer, 32 if args.smoke else 1024)
    vocab = receiver.config.vocab_size
    print(f"device: {device_name()}")
    t = 64 if args.smoke else 512
    sampling = SamplingConfig(max_new_tokens=16 if args.smoke else args.tokens)
    for include_response in (False, True):
        fuser = nnx.jit(lambda: Fuser(dataclasses.replace(config, include_response=include_response),
                                      rngs=nnx.Rngs(2)))()
        fuser.projectors.gate_logit[...] = jnp.ones_like(fuser.projectors.gate_logit[...])
        graphdef, state = nnx.split(C2CModel(receiver, [sharer], [fuser]))
        programs = InferencePrograms(graphdef)
        for b in (1, 16):
            batch = batch_of(b, t, vocab)
            key = jax.random.key(0)

            def generate():
                return programs.generate(state, batch, key, sampling=sampling, eos_ids=(), pad_id=0)

            def stream():
                return list(programs.stream(state, batch, key, sampling=sampling, eos_ids=(), pad_id=0))

            ttft = time_ms(lambda: programs.next_token_logits(state, batch))
            total = time_ms(generate, iters=5)
            row = (f"decode include_response={include_response} batch {b} prompt {t}: TTFT {ttft:.2f} ms, "
                   f"{(total - ttft) / (sampling.max_new_tokens - 1):.3f} ms/token ({sampling.max_new_tokens} tokens "
                   f"{total:.1f} ms)")
            if not include_response:
                stream()
                start = time.perf_counter()
                stream()
                row += f"; streamed {(time.perf_counter() - start) * 1e3:.1f} ms"
            print(row, flush=True)
    fuser = nnx.jit(lambda: Fuser(config, rngs=nnx.Rngs(2)))()
    fuser.projectors.gate_logit[...] = jnp.ones_like(fuser.projectors.gate_logit[...])
    graphdef, state = nnx.split(C2CModel(receiver, [sharer], [fuser]))
    programs = InferencePrograms(graphdef)
    for b in (1, 16):
        one = np.zeros((b, t), bool)
        one[:, 20:t - 9] = True  # a chat template, one message, a 9-token trailing template
        two = one.copy()
        two[:, t // 2:t // 2 + 8] = False  # two messages
        for name, fuse in (("one section", None), ("aligned, 1 message", one), ("aligned, 2 messages", two)):
            batch = batch_of(b, t, vocab, fuse)
            ms = time_ms(lambda: programs.next_token_logits(state, batch))
            print(f"TTFT {name} batch {b} prompt {t}: {ms:.2f} ms (passes {batch.fused_sections}, final window "
                  f"{batch.final_section or 1})", flush=True)


if __name__ == "__main__":
    main()
