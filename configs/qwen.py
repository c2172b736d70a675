"""Qwen3-0.6B receiver <- Qwen2.5-0.5B-Instruct sharer: the upstream main recipe (C2C_0.6+0.5.json).

OpenHermes-2.5 (first 500k rows, chats <= 2048 receiver tokens), fuser h = m = 1024 with 3 layers
(477,848,056 parameters), terminal layer alignment, AdamW lr 1e-4 with 10% linear warmup and linear
decay, weight decay 0.01, global batch 256, one epoch, gate temperature 1.0 -> 0.001 over 1929 steps.
"""

from c2c_jax.config import default_config


def get_config():
    return default_config()
