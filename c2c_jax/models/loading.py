"""Loading real checkpoints into `Decoder`: local HF directories, hub ids and GGUF files.

Weights are read one tensor at a time (safetensors are memory-mapped, GGUF tensors dequantized one
by one), converted to the target dtype, stacked over layers and placed on devices, so no full fp32
host copy of a large model is ever built.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from pathlib import Path
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from c2c_jax.models.config import ModelConfig, RopeConfig, UnsupportedModelError
from c2c_jax.models.decoder import Decoder

# Returns the sharding of one parameter from its path (e.g. ("layers", "mlp", "up_proj", "kernel")) and shape.
ParamSharding = Callable[[tuple[str, ...], tuple[int, ...]], jax.sharding.Sharding]

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
RANDOM_PREFIX = "random:"
# Tensors a checkpoint may carry that the model does not need.
_IGNORED_TENSORS = re.compile(r"(.*rotary_emb\.inv_freq$)")


class CheckpointError(ValueError):
    """A checkpoint is incomplete, corrupt or does not match its config."""


# ------------------------------------------------------------------------------------------------
# Tensor sources: name -> numpy array (HF layout: Linear weights are [out, in]).


class SafetensorsReader:
    """Lazily memory-maps the tensors of one or several (sharded) `.safetensors` files."""

    def __init__(self, directory: Path):
        self.directory = directory
        index_file = directory / "model.safetensors.index.json"
        if index_file.exists():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {directory}")
        self._entries: dict[str, tuple[Path, int, str, tuple[int, ...], int, int]] = {}
        for name in files:
            file = directory / name
            if not file.exists():
                raise FileNotFoundError(f"checkpoint shard {name} listed in {index_file.name} is missing from {directory}")
            self._read_header(file)

    def _read_header(self, file: Path) -> None:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file} is truncated (no safetensors header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise CheckpointError(f"{file} is corrupt: header length {header_len} exceeds the file size")
            try:
                header = json.loads(f.read(header_len))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{file} is corrupt: unreadable safetensors header ({e})") from None
        data_start = 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if data_start + end > size:
                raise CheckpointError(f"{file} is truncated: tensor {name} ends past the end of the file")
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"tensor {name} in {file} has unsupported dtype {info['dtype']}")
            self._entries[name] = (file, data_start, info["dtype"], tuple(info["shape"]), begin, end)

    def names(self) -> Iterable[str]:
        return self._entries.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> np.ndarray:
        file, data_start, dtype, shape, begin, _ = self._entries[name]
        if not shape or 0 in shape:
            return np.zeros(shape, _SAFETENSORS_DTYPES[dtype])
        return np.memmap(file, dtype=_SAFETENSORS_DTYPES[dtype], mode="r", offset=data_start + begin, shape=shape)


# ------------------------------------------------------------------------------------------------
# Mapping between our parameter paths and HF tensor names.


# Our fused projections (one matmul instead of several) and the HF tensors they concatenate
# along the output dimension, in order.
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def hf_tensor_name(path: tuple[str, ...], layer: int | None) -> str:
    """("layers", "self_attn", "o_proj", "kernel"), 3 -> "model.layers.3.self_attn.o_proj.weight"."""
    *modules, leaf = path
    if modules == ["lm_head"]:
        return "lm_head.weight"
    suffix = "bias" if leaf == "bias" else "weight"
    if modules[0] == "layers":
        modules = ["layers", str(layer), *modules[1:]]
    return ".".join(["model", *modules, suffix])


def hf_tensor_names(path: tuple[str, ...], layer: int | None) -> list[str]:
    """The HF tensors behind one of our parameters (several for a fused projection)."""
    *modules, leaf = path
    parts = FUSED_PROJECTIONS.get(modules[-1], (modules[-1],))
    return [hf_tensor_name((*modules[:-1], part, leaf), layer) for part in parts]


def _hf_param(path: tuple[str, ...], layer: int | None, get_tensor) -> np.ndarray:
    arrays = [get_tensor(name) for name in hf_tensor_names(path, layer)]
    array = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    # HF Linear weights are [out, in]; Flax kernels are [in, out].
    return array.T if path[-1] == "kernel" else array


def path_names(path) -> tuple[str, ...]:
    """A parameter's key path in an NNX state as names: ("layers", "mlp", "down_proj", "kernel")."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":
                names.append(key.name)
        else:
            names.append(str(getattr(key, "idx", key)))
    return tuple(names)


def _fill_state(abstract_state, get_tensor: Callable[[str], np.ndarray], num_layers: int,
                param_sharding: ParamSharding | None):
    """Builds the concrete parameter state from the abstract one, tensor by tensor."""

    def fill(path, leaf):
        names = path_names(path)
        dtype = leaf.dtype
        if names[0] == "layers":
            stacked = np.empty(leaf.shape, dtype)
            for i in range(num_layers):
                stacked[i] = _checked(names, i, _hf_param(names, i, get_tensor), leaf.shape[1:])
            host = stacked
        else:
            host = _checked(names, None, _hf_param(names, None, get_tensor), leaf.shape)
            host = np.asarray(host, dtype)
        sharding = param_sharding(names, leaf.shape) if param_sharding else None
        return jax.device_put(host, sharding) if sharding is not None else jnp.asarray(host)

    return jax.tree_util.tree_map_with_path(fill, abstract_state)


def _checked(names, layer, array, expected_shape):
    if tuple(array.shape) != tuple(expected_shape):
        raise CheckpointError(
            f"tensor {' + '.join(hf_tensor_names(names, layer))} has shape {tuple(array.shape)}, the config implies "
            f"{tuple(expected_shape)}")
    return array


def _build(config: ModelConfig, get_tensor, available: Iterable[str], *, dtype, param_dtype,
           param_sharding, decoder_kwargs) -> Decoder:
    abstract = nnx.eval_shape(
        lambda: Decoder(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0), **decoder_kwargs))
    graphdef, abstract_state = nnx.split(abstract)
    used: set[str] = set()

    def tracking_get(name: str) -> np.ndarray:
        used.add(name)
        return get_tensor(name)

    state = _fill_state(abstract_state, tracking_get, config.num_layers, param_sharding)
    unused = [n for n in available if n not in used and not _IGNORED_TENSORS.match(n)
              and not (config.tie_word_embeddings and n == "lm_head.weight")]
    if unused:
        raise CheckpointError(
            f"checkpoint has {len(unused)} tensor(s) the {config.model_type} model does not use, e.g. "
            f"{', '.join(sorted(unused)[:5])}: the weights do not match config.json")
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------------
# Public entry points.


def _is_hub_id(text: str) -> bool:
    """Whether a path that does not exist could be a hub id ("owner/name"), not a missing local path."""
    return not (text.startswith((".", "/", "~")) or text.count("/") != 1 or text.endswith(".gguf"))


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint directory or GGUF file; hub ids are fetched with `huggingface_hub`."""
    path = Path(os.fspath(path_or_id)).expanduser()
    if path.exists():
        return path
    text = os.fspath(path_or_id)
    if not _is_hub_id(text):
        raise FileNotFoundError(f"checkpoint {text!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            text, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt",
                                  "*.jinja"]))
    except Exception as e:  # offline, unknown repo, network down, gated: all end the same way for the user
        raise RuntimeError(
            f"could not fetch {text!r} from the Hugging Face Hub ({type(e).__name__}: {e}). Without hub access, "
            f"download the checkpoint elsewhere (e.g. `huggingface-cli download {text} --local-dir DIR`) and pass "
            f"the local directory DIR, or a .gguf file, instead of the hub id.") from e


def read_config(path_or_id: str | os.PathLike) -> ModelConfig | None:
    """A checkpoint's architecture without reading its weights (config.json, GGUF metadata, a tiny family).

    None for a hub id that is not on disk: its config is known only once it is fetched.
    """
    text = os.fspath(path_or_id)
    if text.startswith(RANDOM_PREFIX):
        from c2c_jax.models.tiny import tiny_config

        return tiny_config(text[len(RANDOM_PREFIX):])
    path = Path(text).expanduser()
    if not path.exists():
        if not _is_hub_id(text):
            raise FileNotFoundError(f"checkpoint {text!r} does not exist")
        return None
    if path.is_file() and path.suffix == ".gguf":
        return gguf_config(_gguf_reader(path))
    return ModelConfig.from_pretrained(path)


def load_model(path_or_id: str | os.PathLike, *, dtype=jnp.bfloat16, param_dtype=None,
               param_sharding: ParamSharding | None = None, **decoder_kwargs) -> Decoder:
    """Loads a decoder from a local HF directory, a hub id, a `.gguf` file, or "random:<family>".

    dtype: compute (and KV-cache) dtype; param_dtype: weight dtype (defaults to dtype).
    decoder_kwargs: passed to `Decoder` (scan_unroll, remat, attention_impl).
    "random:qwen3" (qwen2, llama) is a tiny randomly initialised model for smoke runs.
    """
    if os.fspath(path_or_id).startswith(RANDOM_PREFIX):
        from c2c_jax.models.tiny import random_model

        model = random_model(os.fspath(path_or_id)[len(RANDOM_PREFIX):], dtype=dtype, param_dtype=param_dtype,
                             **decoder_kwargs)
        if param_sharding is not None:
            graphdef, state = nnx.split(model)
            state = jax.tree_util.tree_map_with_path(
                lambda path, x: jax.device_put(x, param_sharding(path_names(path), x.shape)), state)
            model = nnx.merge(graphdef, state)
        return model
    path = resolve_checkpoint(path_or_id)
    param_dtype = dtype if param_dtype is None else param_dtype
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, dtype=dtype, param_dtype=param_dtype, param_sharding=param_sharding, **decoder_kwargs)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a checkpoint directory nor a .gguf file")
    config = ModelConfig.from_pretrained(path)
    reader = SafetensorsReader(path)

    def get(name: str) -> np.ndarray:
        if name not in reader:
            raise CheckpointError(f"checkpoint {path} lacks tensor {name}")
        return reader[name]

    return _build(config, get, reader.names(), dtype=dtype, param_dtype=param_dtype,
                  param_sharding=param_sharding, decoder_kwargs=decoder_kwargs)


def load_tokenizer(path_or_id: str | os.PathLike):
    """The `transformers` tokenizer of a checkpoint directory, hub id, GGUF file or "random:<family>"."""
    from transformers import AutoTokenizer

    if os.fspath(path_or_id).startswith(RANDOM_PREFIX):
        from c2c_jax.models.tiny import byte_tokenizer

        return byte_tokenizer()
    path = resolve_checkpoint(path_or_id)
    if path.is_file() and path.suffix == ".gguf":
        from c2c_jax.models.gguf_tokenizer import gguf_tokenizer

        return gguf_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


# ------------------------------------------------------------------------------------------------
# GGUF.

_GGUF_ARCHS = ("llama", "qwen2", "qwen3")
_GGUF_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def gguf_to_hf_name(name: str) -> str | None:
    """"blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"; None for tensors we do not use."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m:
        module = _GGUF_LAYER.get(m.group(2))
        return None if module is None else f"model.layers.{m.group(1)}.{module}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
    if m and m.group(1) in _GGUF_GLOBAL:
        return f"{_GGUF_GLOBAL[m.group(1)]}.{m.group(2)}"
    return None


def _hf_to_gguf_name(name: str) -> str:
    """Inverse of `gguf_to_hf_name`, for error messages."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        module = {hf: g for g, hf in _GGUF_LAYER.items()}.get(m.group(2), m.group(2))
        return f"blk.{m.group(1)}.{module}.{m.group(3)}"
    module, leaf = name.rsplit(".", 1)
    return f"{ {hf: g for g, hf in _GGUF_GLOBAL.items()}.get(module, module)}.{leaf}"


def _unpermute_rope(weight: np.ndarray, num_heads: int) -> np.ndarray:
    # llama.cpp's converter reorders the rows of Llama q/k projections (weights and biases) for its
    # interleaved RoPE; our RoPE (like HF's) is rotate-half, so restore HF's row order.
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_config(reader) -> ModelConfig:
    fields = reader.fields

    def get(key, default=None):
        return fields[key].contents() if key in fields else default

    arch = get("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(_GGUF_ARCHS)}")

    def require(key):
        if key not in fields:
            raise CheckpointError(f"GGUF file lacks metadata key {key}")
        return get(key)

    if get(f"{arch}.expert_count", 0):
        raise UnsupportedModelError(f"mixture-of-experts GGUF models ({arch} with experts) are not supported")
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise CheckpointError("GGUF file lacks tensor token_embd.weight")
    hidden, vocab = (int(d) for d in names["token_embd.weight"].shape)  # GGUF lists dims innermost first
    num_heads = int(require(f"{arch}.attention.head_count"))
    head_dim = int(get(f"{arch}.attention.key_length", hidden // num_heads))
    if int(get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedModelError("partial rotary embeddings (rope.dimension_count != head_dim) are not supported")
    theta = float(get(f"{arch}.rope.freq_base", 10000.0))
    # llama.cpp's converter writes linear scaling as metadata and Llama 3.1+ scaling as a tensor.
    scaling = get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        rope = RopeConfig(theta=theta, rope_type="linear", factor=float(require(f"{arch}.rope.scaling.factor")))
    elif scaling == "none":
        rope = RopeConfig(theta=theta)
    else:
        raise UnsupportedModelError(f"unsupported GGUF RoPE scaling {scaling!r}; supported: none, linear")
    if "rope_freqs.weight" in names:
        # Per-frequency divisors that llama.cpp computes from the llama3 rope_scaling parameters.
        divisors = _gguf_array(names["rope_freqs.weight"])
        if divisors.shape != (head_dim // 2,):
            raise CheckpointError(
                f"GGUF tensor rope_freqs.weight has shape {divisors.shape}, expected ({head_dim // 2},)")
        rope = dataclasses.replace(rope, rope_type="divisors", divisors=tuple(float(d) for d in divisors))
    hf = {
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(require(f"{arch}.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(get(f"{arch}.attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "max_position_embeddings": int(get(f"{arch}.context_length", 32768)),
        # GGUF has no flags for these: the tensors present say it (as llama.cpp's loader decides too).
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        # Every end-of-generation id the metadata names (end of text, of turn, of message), as llama.cpp stops on.
        "eos_token_id": [int(i) for i in (get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom"))
                         if i is not None],
        "pad_token_id": get("tokenizer.ggml.padding_token_id"),
    }
    return dataclasses.replace(ModelConfig.from_hf_dict(hf), rope=rope)


def _gguf_array(tensor) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        return np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
    except NotImplementedError:
        raise UnsupportedModelError(
            f"GGUF tensor {tensor.name} is stored as {tensor.tensor_type.name}, which gguf cannot dequantize") from None


def _gguf_reader(path: Path):
    import gguf

    if not path.exists():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader fails with a bare reshape/view error on a truncated file
        raise CheckpointError(
            f"{path} is not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from e


def load_gguf(path: str | os.PathLike, *, dtype=jnp.bfloat16, param_dtype=None,
              param_sharding: ParamSharding | None = None, **decoder_kwargs) -> Decoder:
    """Loads a (possibly quantized) GGUF file; tensors are dequantized one at a time."""
    path = Path(path)
    reader = _gguf_reader(path)
    config = gguf_config(reader)
    tensors = {}
    for t in reader.tensors:
        hf_name = gguf_to_hf_name(t.name)
        if hf_name is not None:
            tensors[hf_name] = t

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise CheckpointError(f"GGUF file {path} lacks tensor {_hf_to_gguf_name(name)} (for {name})")
        array = _gguf_array(tensors[name])
        if config.model_type == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
            array = _unpermute_rope(array, heads)
        return array

    return _build(config, get, tensors.keys(), dtype=dtype, param_dtype=dtype if param_dtype is None else param_dtype,
                  param_sharding=param_sharding, decoder_kwargs=decoder_kwargs)
