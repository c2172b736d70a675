"""Shared helpers for the GPU benchmarks: real model shapes with random weights, timing, reporting."""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from c2c_jax import build
from c2c_jax.c2c.fuser import FuserConfig  # noqa: E402
from c2c_jax.config import default_config  # noqa: E402
from c2c_jax.models import Decoder, ModelConfig  # noqa: E402

# Architectures of the paper's main pair (their HF config.json files), so no weights are needed.
QWEN3_0_6B = dict(
    model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
    max_position_embeddings=40960, tie_word_embeddings=True, eos_token_id=151645)
QWEN2_5_0_5B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
    max_position_embeddings=32768, tie_word_embeddings=True, eos_token_id=151645)
# Tiny stand-ins for a CPU smoke run of the benchmark scripts (--smoke).
SMOKE_RECEIVER = dict(QWEN3_0_6B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
SMOKE_SHARER = dict(QWEN2_5_0_5B, vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)


SCAN_UNROLL = None  # set by the scripts' --unroll flag


def random_decoder(hf_config: dict, *, dtype=jnp.bfloat16, seed: int = 0, **kwargs) -> Decoder:
    """A decoder of the given architecture with random weights, created directly on the device."""
    config = ModelConfig.from_hf_dict(hf_config)
    kwargs.setdefault("scan_unroll", SCAN_UNROLL)
    return nnx.jit(lambda: Decoder(config, dtype=dtype, rngs=nnx.Rngs(seed), **kwargs))()


def fuser_config(receiver: Decoder, sharer: Decoder, hidden: int = 1024) -> FuserConfig:
    """The configs/qwen.py fuser for this pair (terminal layer map, 3 layers), with h = m = hidden."""
    config = default_config()
    config.fuser.hidden_dim = config.fuser.intermediate_dim = hidden
    return build.fuser_config(config, receiver, sharer)


def time_ms(fn, *args, warmup: int = 2, iters: int = 10) -> float:
    """Median wall time of `fn(*args)` in ms, synchronised on its outputs; compile excluded by warm-up."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def dispatch_ms(fn, *args, iters: int = 10) -> float:
    """Median host time in ms until `fn(*args)` returns, before its results are waited for: what
    dispatching its programs costs the host (they are compiled by then)."""
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        out = fn(*args)
        samples.append((time.perf_counter() - start) * 1e3)
        jax.block_until_ready(out)
    return statistics.median(samples)


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.device_kind} ({d.platform}, {jax.device_count()} device(s), jax {jax.__version__})"


def library_digest() -> str:
    """12 hex digits of a SHA-256 over c2c_jax's source files: which library code a result measured
    (the GPU machine runs a copy of the tree without its git history)."""
    import hashlib
    import pathlib

    import c2c_jax

    root = pathlib.Path(c2c_jax.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


class Report:
    """Collects result rows and prints/saves them as JSON lines (one file per benchmark)."""

    def __init__(self, name: str):
        self.name = name
        self.rows = []
        self.out_dir = os.environ.get("OUT", ".")
        self.header = {"device": device_name(), "library": library_digest(),
                       "xla_flags": os.environ.get("XLA_FLAGS", "")}

    def add(self, **row) -> None:
        row = {"bench": self.name, **row}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.save()  # after every row, so a run stopped by a time limit keeps what it measured

    def save(self) -> None:
        path = os.path.join(self.out_dir, f"{self.name}.jsonl")
        with open(path, "w") as f:
            f.write(json.dumps(self.header) + "\n")
            for row in self.rows:
                f.write(json.dumps(row) + "\n")
