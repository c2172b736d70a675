"""Model architecture read from a Hugging Face `config.json`.

One frozen dataclass describes every supported decoder (Qwen2/2.5, Qwen3, Llama 3.x and other
Llama-architecture models such as SmolLM2). It reads both the transformers v4 layout
(`rope_theta`, `rope_scaling`) and the v5 layout (`rope_parameters`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import numpy as np

# HF `model_type` -> our family name. Families differ only in the flags of `ModelConfig`.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one this library implements."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    divisors: tuple[float, ...] = ()  # rope_type "divisors": explicit per-frequency scaling (GGUF rope_freqs)

    def inverse_frequencies(self, head_dim: int) -> np.ndarray:
        """float32 [head_dim // 2], computed exactly as transformers does (float32 throughout)."""
        exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
        inv_freq = (np.float32(1.0) / (np.float32(self.theta) ** exponent)).astype(np.float32)
        if self.rope_type == "linear":
            inv_freq = inv_freq / np.float32(self.factor)
        elif self.rope_type == "llama3":
            inv_freq = _llama3_scaled(inv_freq, self)
        elif self.rope_type == "divisors":
            inv_freq = inv_freq / np.asarray(self.divisors, np.float32)
        return inv_freq.astype(np.float32)


def _llama3_scaled(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
    # Llama 3.1+ frequency scaling: long wavelengths are divided by `factor`, short ones kept,
    # and the band in between is interpolated smoothly.
    old_len = np.float32(rope.original_max_position_embeddings)
    low, high, factor = np.float32(rope.low_freq_factor), np.float32(rope.high_freq_factor), np.float32(rope.factor)
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder-only LM. Hashable, so it can be a static jit argument."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: bias on q/k/v projections
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: per-head RMSNorm on q and k before RoPE
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @property
    def kv_dim(self) -> int:
        """Width of one layer's flattened K (or V) per token: kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = hf.get("architectures") or [model_type]
            raise UnsupportedModelError(
                f"unsupported architecture {archs[0]!r} (model_type={model_type!r}); c2c_jax supports "
                f"model types {', '.join(SUPPORTED_MODEL_TYPES)} (Qwen2/Qwen2.5, Qwen3, Llama 3.x and "
                "Llama-architecture models such as SmolLM2)"
            )
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError("sliding-window attention (use_sliding_window=true) is not supported")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks required field(s): {', '.join(missing)}")
        num_heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        is_qwen2 = model_type == "qwen2"
        attention_bias = bool(hf.get("attention_bias", False))
        eos_ids = _token_ids(hf.get("eos_token_id"), "config.json")
        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True if is_qwen2 else attention_bias,
            o_bias=False if is_qwen2 else attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        """Reads `config.json` from a checkpoint directory (or the file itself).

        End-of-sequence ids are those of `generation_config.json` next to it, when it has any, then
        config.json's: generation stops on every one of them, as transformers and upstream C2C do
        (Qwen3's config.json names only <|im_end|>; its generation config adds <|endoftext|>).
        """
        path = os.fspath(path)
        file = path if path.endswith(".json") else os.path.join(path, "config.json")
        if not os.path.exists(file):
            raise FileNotFoundError(f"no config.json in {path!r}: a Hugging Face checkpoint directory needs one")
        with open(file, encoding="utf-8") as f:
            config = cls.from_hf_dict(json.load(f))
        generation_file = os.path.join(os.path.dirname(file), "generation_config.json")
        if not os.path.exists(generation_file):
            return config
        with open(generation_file, encoding="utf-8") as f:
            try:
                generation = json.load(f)
            except ValueError as error:
                raise ValueError(f"{generation_file} is not valid JSON: {error}") from error
        eos = generation.get("eos_token_id") if isinstance(generation, Mapping) else None
        eos_ids = _token_ids(eos, generation_file)
        return dataclasses.replace(config, eos_token_ids=tuple(dict.fromkeys(eos_ids + config.eos_token_ids)))


def _token_ids(value, source: str) -> tuple[int, ...]:
    """An `eos_token_id` field (one id, a list of ids, or absent) as a tuple of ints."""
    if value is None:
        return ()
    values = value if isinstance(value, (list, tuple)) else (value,)
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{source}: eos_token_id must be an integer or a list of integers, not {value!r}")
    return tuple(dict.fromkeys(int(v) for v in values))


def _rope_from_hf(hf: Mapping[str, Any]) -> RopeConfig:
    # transformers v5 folds theta and scaling into `rope_parameters`; v4 has top-level `rope_theta`
    # and an optional `rope_scaling` dict (with "type" in older files, "rope_type" in newer ones).
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported RoPE type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    kwargs: dict[str, Any] = {"theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        kwargs["factor"] = float(merged["factor"])
    if rope_type == "llama3":
        kwargs["low_freq_factor"] = float(merged["low_freq_factor"])
        kwargs["high_freq_factor"] = float(merged["high_freq_factor"])
        kwargs["original_max_position_embeddings"] = int(merged["original_max_position_embeddings"])
    return RopeConfig(**kwargs)
