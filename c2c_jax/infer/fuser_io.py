"""Saving and loading fusers: our own format, and the published upstream PyTorch layout.

Our format (a directory):
    fuser.json          FuserConfig fields
    fuser.safetensors   stacked float32 parameters, "projectors/in_proj/kernel" -> [layers, 2, in, hidden]

Upstream layout (docs/upstream_reference.md §7; what the trainer of thu-nics/C2C writes and HF
`nics-efc/C2C_Fuser` holds):
    projector_{i}.pt      torch state dict of receiver layer i's projector (bf16)
    projector_{i}.json    {"class": "C2CProjector" | "AblationProjector", "init_args": {...}}
    projector_config.json {"0": {"1": {"<receiver layer>": [[<sharer layer>, <projector index>]]}}}
Import is strict: every tensor is used, every shape is checked against the model pair.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from c2c_jax.c2c.fuser import FuserCheckpointError, check_pair, ABLATIONS, BRANCHES, Fuser, FuserConfig
from c2c_jax.infer.torch_pickle import load_state_dict
from c2c_jax.models.config import ModelConfig
from c2c_jax.models.loading import path_names

log = logging.getLogger(__name__)

FUSER_CONFIG_FILE = "fuser.json"
FUSER_PARAMS_FILE = "fuser.safetensors"


# ------------------------------------------------------------------------------------------------
# Parameter paths.


def _param_names(path) -> str:
    return "/".join(path_names(path))


def flat_params(fuser: Fuser) -> dict[str, jax.Array]:
    """{"projectors/in_proj/kernel": [layers, 2, in, hidden], ...}."""
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(fuser, nnx.Param))[0]
    return {_param_names(path): leaf for path, leaf in leaves}


def fuser_from_flat(config: FuserConfig, arrays: dict[str, np.ndarray], source: str) -> Fuser:
    abstract = nnx.eval_shape(lambda: Fuser(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    missing, used = [], set()

    def fill(path, leaf):
        name = _param_names(path)
        if name not in arrays:
            missing.append(name)
            return jnp.zeros(leaf.shape, leaf.dtype)
        used.add(name)
        value = np.asarray(arrays[name])
        if value.shape != leaf.shape:
            raise FuserCheckpointError(f"{source}: parameter {name} has shape {value.shape}, the fuser config "
                                       f"implies {leaf.shape}")
        return jnp.asarray(value, leaf.dtype)

    state = jax.tree_util.tree_map_with_path(fill, abstract_state)
    if missing:
        raise FuserCheckpointError(f"{source} lacks parameter(s) {', '.join(missing[:5])}")
    unused = sorted(set(arrays) - used)
    if unused:
        raise FuserCheckpointError(f"{source} has parameter(s) the fuser does not use: {', '.join(unused[:5])}")
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------------
# Our own format.


def save_fuser(fuser: Fuser, directory: str | os.PathLike) -> Path:
    """Writes `fuser.json` and `fuser.safetensors` into `directory` (atomically per file)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.asarray(jax.device_get(value), np.float32) for name, value in flat_params(fuser).items()}
    _atomic_write(directory / FUSER_PARAMS_FILE, lambda tmp: save_file(arrays, str(tmp)))
    config_json = json.dumps(dataclasses.asdict(fuser.config), indent=2)
    _atomic_write(directory / FUSER_CONFIG_FILE, lambda tmp: tmp.write_text(config_json))
    return directory


def _atomic_write(target: Path, write) -> None:
    tmp = target.with_name(target.name + ".tmp")
    write(tmp)
    os.replace(tmp, target)


def load_fuser_config(directory: str | os.PathLike) -> FuserConfig:
    file = Path(directory) / FUSER_CONFIG_FILE
    if not file.exists():
        raise FileNotFoundError(f"{directory} is not a fuser directory: it has neither {FUSER_CONFIG_FILE} (c2c_jax's "
                                "format) nor projector_config.json (the upstream PyTorch layout)")
    try:
        fields = json.loads(file.read_text())
        fields["layer_map"] = tuple(fields["layer_map"])
        return FuserConfig(**fields)
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise FuserCheckpointError(f"{file} is corrupt ({type(e).__name__}: {e})") from None


def load_fuser(directory: str | os.PathLike) -> Fuser:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
    config = load_fuser_config(directory)
    params_file = directory / FUSER_PARAMS_FILE
    if not params_file.exists():
        raise FileNotFoundError(f"{directory} has {FUSER_CONFIG_FILE} but no {FUSER_PARAMS_FILE}")
    try:
        arrays = load_file(str(params_file))
    except (SafetensorError, OSError) as e:
        raise FuserCheckpointError(f"{params_file} is corrupt ({e})") from None
    return fuser_from_flat(config, arrays, str(params_file))


# ------------------------------------------------------------------------------------------------
# The upstream PyTorch layout.

# Our parameter path (below "projectors/") -> upstream state-dict key template for one branch.
_FFN = {"norm_scale": "norm.weight", "w1/kernel": "w1.weight", "w2/kernel": "w2.weight"}


def _upstream_key(name: str, branch: str) -> str:
    """"in_proj/kernel" -> "key_in.weight"; "proj_blocks/0/w1/kernel" -> "key_proj_mlp2.blocks.0.w1.weight"."""
    linear = {"in_proj": "in", "proj_out": "proj_out", "weight_head": "scalar_head"}
    blocks = {"trunk": "mlp1.blocks.0", "weight_block": "scalar_mlp2.blocks.0"}
    if name == "gate_logit":
        return f"{branch}_gate_logit"
    head, _, rest = name.partition("/")
    if head in linear:
        return f"{branch}_{linear[head]}.{'weight' if rest == 'kernel' else 'bias'}"
    if head in blocks:
        return f"{branch}_{blocks[head]}.{_FFN[rest]}"
    if head == "proj_blocks":
        index, _, leaf = rest.partition("/")
        return f"{branch}_proj_mlp2.blocks.{index}.{_FFN[leaf]}"
    raise KeyError(name)


def _init_args_to_config(init_args: dict, cls: str, layer_map: tuple[int, ...], source: str) -> FuserConfig:
    if cls == "C2CProjector":
        ablation = "none"
    elif cls == "AblationProjector":
        level = int(init_args.get("ablation_level", 0))
        ablation = {v: k for k, v in ABLATIONS.items()}[level]
    else:
        raise FuserCheckpointError(f"{source}: projector class {cls!r} is not supported (C2CProjector or "
                                   "AblationProjector)")
    try:
        return FuserConfig(
            receiver_layers=len(layer_map),
            receiver_kv_heads=int(init_args["target_num_heads"]),
            receiver_head_dim=int(init_args["target_dim"]),
            sharer_kv_heads=int(init_args["source_num_heads"]),
            sharer_head_dim=int(init_args["source_dim"]),
            layer_map=layer_map,
            hidden_dim=int(init_args.get("hidden_dim", 1024)),
            intermediate_dim=int(init_args.get("intermediate_dim", 1024)),
            num_layers=int(init_args.get("num_layers", 3)),
            dropout=float(init_args.get("dropout", 0.1)),
            initial_temperature=float(init_args.get("initial_temperature", 1.0)),
            final_temperature=float(init_args.get("final_temperature", 0.001)),
            anneal_steps=int(init_args.get("anneal_steps", 1929)),
            ablation=ablation,
            zero_init=bool(init_args.get("zero_init", False)),
        )
    except KeyError as e:
        raise FuserCheckpointError(f"{source}: init_args lack {e.args[0]!r}") from None


def _read_layer_map(directory: Path) -> tuple[int, ...]:
    file = directory / "projector_config.json"
    if not file.exists():
        raise FileNotFoundError(f"{directory} has no projector_config.json: not an upstream C2C fuser directory "
                                "(expected projector_config.json, projector_{i}.json and projector_{i}.pt)")
    mapping = json.loads(file.read_text())
    if list(mapping) != ["0"] or len(mapping["0"]) != 1:
        raise FuserCheckpointError(f"{file}: expected one receiver (model 0) and one sharer, got {mapping!r:.200}")
    (per_layer,) = mapping["0"].values()
    layers = sorted(int(t) for t in per_layer)
    if layers != list(range(len(layers))):
        raise FuserCheckpointError(f"{file}: receiver layers {layers} are not 0..{len(layers) - 1}")
    layer_map = []
    for t in layers:
        pairs = per_layer[str(t)]
        if len(pairs) != 1 or int(pairs[0][1]) != t:
            raise FuserCheckpointError(f"{file}: receiver layer {t} maps to {pairs}; expected one "
                                       f"[sharer layer, {t}] pair")
        layer_map.append(int(pairs[0][0]))
    return tuple(layer_map)


def _upstream_include_response(directory: Path) -> bool:
    """Whether the upstream run that saved `directory` (its `final/` or `checkpoint-*/`) trained with
    decode-time fusion: `model.include_response` of the recipe copy `config.json` in the run root."""
    for file in (directory / "config.json", directory.parent / "config.json"):
        if file.exists():
            try:
                recipe = json.loads(file.read_text())
            except ValueError as error:
                raise FuserCheckpointError(f"{file} (the upstream run's recipe) is not valid JSON: {error}") from None
            model = recipe.get("model") if isinstance(recipe, dict) else None
            if isinstance(model, dict):
                return bool(model.get("include_response", False))
    return False


def import_upstream_fuser(directory: str | os.PathLike, receiver: ModelConfig | None = None,
                          sharer: ModelConfig | None = None) -> Fuser:
    """Loads a published PyTorch fuser (`.../final/`), strictly; checks it against the pair if given."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"upstream fuser directory {directory} does not exist")
    layer_map = _read_layer_map(directory)
    config = None
    per_layer_tensors = []
    for i in range(len(layer_map)):
        json_file, pt_file = directory / f"projector_{i}.json", directory / f"projector_{i}.pt"
        for file in (json_file, pt_file):
            if not file.exists():
                raise FileNotFoundError(f"upstream fuser {directory} lacks {file.name}")
        spec = json.loads(json_file.read_text())
        layer_config = _init_args_to_config(spec.get("init_args", {}), spec.get("class"), layer_map, str(json_file))
        if config is None:
            config = layer_config
        elif layer_config != config:
            raise FuserCheckpointError(f"{json_file}: init_args differ from projector_0.json; all projectors of a "
                                       "fuser must have the same shape")
        per_layer_tensors.append((pt_file, load_state_dict(pt_file)))
    if config is None:
        raise FuserCheckpointError(f"{directory}: projector_config.json lists no layers")
    if _upstream_include_response(directory):
        config = dataclasses.replace(config, include_response=True)
    if receiver is not None and sharer is not None:
        check_pair(config, receiver, sharer, source=f"upstream fuser {directory}")

    abstract = nnx.eval_shape(lambda: Fuser(config, rngs=nnx.Rngs(0)))
    names = [n.removeprefix("projectors/") for n in flat_params(abstract)]
    arrays = {}
    for name in names:
        stacked = []
        for pt_file, tensors in per_layer_tensors:
            branches = []
            for branch in BRANCHES:
                key = _upstream_key(name, branch)
                if key not in tensors:
                    raise FuserCheckpointError(f"{pt_file} lacks tensor {key}")
                value = np.asarray(tensors[key], np.float32)
                branches.append(value.T if name.endswith("kernel") else value)
            stacked.append(np.stack(branches))
        arrays[f"projectors/{name}"] = np.stack(stacked)
    expected = {_upstream_key(n, b) for n in names for b in BRANCHES} | {"gate_temperature"}
    for pt_file, tensors in per_layer_tensors:
        unexpected = sorted(set(tensors) - expected)
        if unexpected:
            raise FuserCheckpointError(f"{pt_file} has tensor(s) this fuser does not use: {', '.join(unexpected[:5])}")
    return fuser_from_flat(config, arrays, str(directory))


def export_upstream_fuser(fuser: Fuser, directory: str | os.PathLike, *, dtype: str = "bfloat16",
                          gate_temperature: float | None = None) -> Path:
    """Writes the upstream layout (needs torch). Round-trips exactly with `import_upstream_fuser`.

    gate_temperature: value of the upstream `gate_temperature` buffer (unused at inference). By
    default the final temperature, which is what a fully annealed upstream run stores.
    """
    try:
        import torch
    except ImportError:
        raise ImportError("exporting to the upstream PyTorch layout needs torch (pip install torch)") from None
    c = fuser.config
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}[dtype]

    def to_torch(array: np.ndarray):
        array = np.array(np.asarray(array, np.float32), np_dtype, order="C")  # keeps 0-d tensors 0-d
        if np_dtype is ml_dtypes.bfloat16:
            return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(array)

    params = {n.removeprefix("projectors/"): np.asarray(jax.device_get(v)) for n, v in flat_params(fuser).items()}
    init_args = {
        "source_dim": c.sharer_head_dim, "target_dim": c.receiver_head_dim,
        "source_num_heads": c.sharer_kv_heads, "target_num_heads": c.receiver_kv_heads,
        "intermediate_dim": c.intermediate_dim, "hidden_dim": c.hidden_dim, "num_layers": c.num_layers,
        "dropout": c.dropout, "initial_temperature": c.initial_temperature,
        "final_temperature": c.final_temperature, "anneal_steps": c.anneal_steps,
        "dtype": {"__type__": "torch.dtype", "value": dtype},
    }
    cls = "C2CProjector"
    if c.ablation != "none":
        cls, init_args["ablation_level"] = "AblationProjector", ABLATIONS[c.ablation]
    elif c.zero_init:
        init_args["zero_init"] = True
    for i in range(c.receiver_layers):
        state = {}
        for name, value in params.items():
            for b, branch in enumerate(BRANCHES):
                array = value[i, b]
                state[_upstream_key(name, branch)] = to_torch(array.T if name.endswith("kernel") else array)
        if c.uses_gate:
            temperature = c.final_temperature if gate_temperature is None else gate_temperature
            state["gate_temperature"] = to_torch(np.asarray(temperature, np.float32))
        torch.save(state, directory / f"projector_{i}.pt")
        (directory / f"projector_{i}.json").write_text(json.dumps({"class": cls, "init_args": init_args}, indent=2))
    mapping = {"0": {"1": {str(t): [[s, t]] for t, s in enumerate(c.layer_map)}}}
    (directory / "projector_config.json").write_text(json.dumps(mapping))
    if c.include_response:  # where upstream's loaders read it: the recipe's model section
        (directory / "config.json").write_text(json.dumps({"model": {"include_response": True}}, indent=2))
    return directory


def is_upstream_fuser(directory: str | os.PathLike) -> bool:
    return (Path(directory) / "projector_config.json").exists()


def read_fuser_config(directory: str | os.PathLike) -> FuserConfig:
    """The config of the fuser in `directory` (ours or the upstream layout), without reading its tensors."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"fuser directory {directory} does not exist")
    if not is_upstream_fuser(directory):
        return load_fuser_config(directory)
    spec_file = directory / "projector_0.json"
    if not spec_file.exists():
        raise FileNotFoundError(f"upstream fuser {directory} lacks {spec_file.name}")
    spec = json.loads(spec_file.read_text())
    return _init_args_to_config(spec.get("init_args", {}), spec.get("class"), _read_layer_map(directory),
                                str(spec_file))


def load_any_fuser(directory: str | os.PathLike, receiver: ModelConfig | None = None,
                   sharer: ModelConfig | None = None) -> Fuser:
    """Our format or the upstream layout, whichever `directory` holds; checked against the pair if given."""
    if is_upstream_fuser(directory):
        return import_upstream_fuser(directory, receiver, sharer)
    fuser = load_fuser(directory)
    if receiver is not None and sharer is not None:
        check_pair(fuser.config, receiver, sharer, source=f"fuser {directory}")
    return fuser


