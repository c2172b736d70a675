"""Test setup: CPU only, 8 virtual devices for sharding tests, fp32 matmuls."""

import os

from cpu_flags import cpu_xla_flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
for flag in cpu_xla_flags(8).split():  # each unless the caller's XLA_FLAGS set it already
    if flag.split("=")[0] not in flags:
        flags += " " + flag
os.environ["XLA_FLAGS"] = flags.strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
