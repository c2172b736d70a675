"""Flax NNX decoders with an explicit KV cache, and their checkpoint loaders."""

from c2c_jax.models.config import ModelConfig, RopeConfig, UnsupportedModelError
from c2c_jax.models.decoder import Decoder
from c2c_jax.models.kv_cache import KVCache
from c2c_jax.models.loading import CheckpointError, load_gguf, load_model, load_tokenizer

__all__ = ["CheckpointError", "Decoder", "KVCache", "ModelConfig", "RopeConfig", "UnsupportedModelError",
           "load_gguf", "load_model", "load_tokenizer"]
