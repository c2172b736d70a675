"""Qwen3-0.6B receiver <- Qwen3-4B-Base sharer (36 layers; receiver layer t reads sharer layer t + 8)."""

from c2c_jax.config import default_config


def get_config():
    c = default_config()
    c.sharer.path = "Qwen/Qwen3-4B-Base"
    return c
