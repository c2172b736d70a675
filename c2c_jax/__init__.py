"""c2c-jax: Cache-to-Cache communication between LLMs, in JAX/Flax."""

from c2c_jax.platform import keep_jax_off_absent_tpus

keep_jax_off_absent_tpus()  # before anything imports jax

from c2c_jax.models import Decoder, KVCache, ModelConfig, load_model, load_tokenizer  # noqa: E402

__all__ = ["Decoder", "KVCache", "ModelConfig", "load_model", "load_tokenizer"]
__version__ = "0.1.0"
