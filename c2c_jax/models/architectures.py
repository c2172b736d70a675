"""Architectures of the models the shipped configs name, pinned, for work that needs no weights.

A deviceless TPU compile (`c2c_jax.aot`) needs each model's shapes, not its checkpoint. These are
the architecture fields of the models' own `config.json` files on the Hugging Face Hub (copied
verbatim; tokenizer and generation fields left out), so the compile runs offline. Any other model
is described by its local checkpoint directory, `config.json`, or GGUF file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from c2c_jax.models.config import ModelConfig

_QWEN = dict(hidden_act="silu", rms_norm_eps=1e-06, rope_theta=1000000.0, tie_word_embeddings=True,
             use_sliding_window=False, vocab_size=151936, bos_token_id=151643)

PINNED_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-0.6B": dict(
        _QWEN, model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        attention_bias=False, eos_token_id=151645),
    "Qwen/Qwen3-4B-Base": dict(
        _QWEN, model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
        attention_bias=False, eos_token_id=151643),
    "Qwen/Qwen2.5-0.5B-Instruct": dict(
        _QWEN, model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, eos_token_id=151645),
    "meta-llama/Llama-3.2-1B-Instruct": dict(
        model_type="llama", hidden_act="silu", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-05, rope_theta=500000.0, attention_bias=False, mlp_bias=False, tie_word_embeddings=True,
        rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                          original_max_position_embeddings=8192, rope_type="llama3"),
        vocab_size=128256, bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    # Qwen2.5-Coder-0.5B / 1.5B-Instruct, the research-only GGUFs of configs/qwen_coder.py (untied heads).
    "qwen2.5-coder-0.5b": dict(
        _QWEN, model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=False,
        eos_token_id=151645, pad_token_id=151643),
    "qwen2.5-coder-1.5b": dict(
        _QWEN, model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=False,
        eos_token_id=151645, pad_token_id=151643),
    # SmolLM2-135M-Instruct, the offline demo's model ("smollm2" in configs/demo.py).
    "smollm2": dict(
        model_type="llama", hidden_act="silu", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        rms_norm_eps=1e-05, rope_theta=100000.0, tie_word_embeddings=True, vocab_size=49152, bos_token_id=1,
        eos_token_id=2, pad_token_id=2),
}


def architecture_of(path: str, config_file: str | os.PathLike | None = None) -> ModelConfig:
    """The architecture of the model a config names, without loading (or fetching) its weights.

    config_file: a `config.json` (or checkpoint directory) that describes it; else "random:<family>",
    a local checkpoint directory or GGUF file, or a pinned model (`PINNED_ARCHITECTURES`).
    """
    from c2c_jax.models.loading import RANDOM_PREFIX, gguf_config

    if config_file:
        return ModelConfig.from_pretrained(config_file)
    if path.startswith(RANDOM_PREFIX):
        from c2c_jax.models.tiny import tiny_config

        return tiny_config(path[len(RANDOM_PREFIX):])
    local = Path(path).expanduser()
    if local.is_dir():
        return ModelConfig.from_pretrained(local)
    if local.is_file() and local.suffix == ".gguf":
        import gguf

        return gguf_config(gguf.GGUFReader(local))
    if path in PINNED_ARCHITECTURES:
        return ModelConfig.from_hf_dict(PINNED_ARCHITECTURES[path])
    raise ValueError(f"no architecture known offline for model {path!r}: pass its config.json (or checkpoint "
                     f"directory); pinned models: {', '.join(PINNED_ARCHITECTURES)}")
