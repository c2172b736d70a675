"""Qwen3-0.6B receiver <- Llama-3.2-1B-Instruct sharer, with token alignment (different tokenizers).

The published fuser of this pair was trained with upstream's aligner ("first" piece in training,
"longest" in its evaluation configs) and shared positions.
"""

from c2c_jax.config import default_config


def get_config():
    c = default_config()
    c.sharer.path = "meta-llama/Llama-3.2-1B-Instruct"
    c.alignment.tokens = "on"
    c.alignment.strategy = "first"
    return c
