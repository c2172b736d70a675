"""Tiny random models and a byte-level tokenizer, for CPU smoke runs with no checkpoint at all.

`load_model("random:qwen3")` (and `load_tokenizer`) give a randomly initialised decoder of the
named family at a few thousand parameters per layer, with a 256-byte vocabulary (plus ChatML
specials) that can tokenize any text.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from c2c_jax.models.config import ModelConfig
from c2c_jax.models.decoder import Decoder

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # pad, ChatML start, ChatML end (eos)
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0, eos_token_id=258,
               pad_token_id=256)
TINY_ARCHITECTURES = {
    "qwen3": dict(_COMMON, model_type="qwen3", num_hidden_layers=4, num_key_value_heads=2, head_dim=32,
                  tie_word_embeddings=True),
    "qwen2": dict(_COMMON, model_type="qwen2", num_hidden_layers=3, num_key_value_heads=1,
                  tie_word_embeddings=False),
    "llama": dict(_COMMON, model_type="llama", num_hidden_layers=3, num_key_value_heads=2,
                  tie_word_embeddings=True),
}


def tiny_config(family: str) -> ModelConfig:
    if family not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny model {family!r}; choose one of {', '.join(TINY_ARCHITECTURES)}")
    return ModelConfig.from_hf_dict(TINY_ARCHITECTURES[family])


def random_model(family: str, *, seed: int = 0, dtype=jnp.float32, param_dtype=None, **decoder_kwargs) -> Decoder:
    return Decoder(tiny_config(family), dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed), **decoder_kwargs)


def byte_tokenizer():
    """Byte-level BPE without merges: one token per UTF-8 byte, ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # ids 256, 257, 258, in this order
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_TEMPLATE
    return fast
