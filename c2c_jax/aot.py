"""Compile the train step and the inference programs for a TPU slice, on any machine with libtpu.

    python -m c2c_jax.aot --config=configs/qwen.py --topology=v5e-16

Deviceless ahead-of-time compilation (as MaxText's `train_compile.py`): XLA:TPU compiles for the
compile-only devices of a named topology, through the project's own mesh, sharding rules and
step-building code, with abstract weights (`nnx.eval_shape`: no checkpoint, no download). For each
program it prints the compile time, the per-chip memory (arguments, outputs, temporaries, peak)
against the chip's HBM, XLA's FLOP count, the collectives and the attention route of every call,
and it exits with status 1 when a program does not fit. Nothing runs on a TPU.

Programs: `train` (one optimizer step at the config's largest buckets), and inference's
`prompt_cache` (prefill of receiver and sharer + fusion), `logits` (the last prompt token) and
`generate` (the last prompt token and the decode loop), and `eval_variants` (logits-mode evaluation:
the receiver alone, C2C and the config's controls from one prefill), on an evaluation batch split over
all chips; and the server's engine on one chip, as `python -m c2c_jax.serve` runs it (`serve_prefill`,
`serve_decode`, `serve_move_row`, `serve_compact`: see `serve_programs`).
Needs `pip install "jax[tpu]"`; only one process on a machine may hold libtpu at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import struct
import sys
import time
from typing import Any

GIB = 1024**3
LIBTPU_LOCKFILE = "/tmp/libtpu_lockfile"


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: its topology name for `get_topology_desc`, and each chip's usable HBM."""

    name: str  # "v5e-16": the accelerator type a user books
    topology: str  # "v5e:4x4"
    chip_config: str  # "default", or "megacore" (v4, v5p: one device per chip of two TensorCores)
    chips_per_host: tuple[int, int, int]
    hbm_gib: float

    @property
    def generation(self) -> str:
        return self.topology.split(":")[0]


# Usable HBM per chip as XLA:TPU reports it in its out-of-memory errors (v5e: 15.75 of 16 GiB).
_HBM_GIB = {"v4": 32.0, "v5e": 15.75, "v5p": 95.74, "v6e": 31.25}
_CHIP_CONFIG = {"v4": "megacore", "v5e": "default", "v5p": "megacore", "v6e": "default"}


def _slice(name: str, topology: str) -> Topology:
    generation = topology.split(":")[0]
    single_chip = topology.endswith(":1x1")
    return Topology(name, topology, _CHIP_CONFIG[generation], (1, 1, 1) if single_chip else (2, 2, 1),
                    _HBM_GIB[generation])


# Accelerator types (v4 and v5p count TensorCores: v4-8 is 4 chips) and their topologies.
TOPOLOGIES: dict[str, Topology] = {t.name: t for t in (
    _slice("v4-8", "v4:2x2x1"), _slice("v4-16", "v4:2x2x2"), _slice("v4-32", "v4:2x2x4"),
    _slice("v5p-8", "v5p:2x2x1"), _slice("v5p-16", "v5p:2x2x2"), _slice("v5p-32", "v5p:2x2x4"),
    _slice("v5e-1", "v5e:1x1"), _slice("v5e-4", "v5e:2x2"), _slice("v5e-8", "v5e:2x4"),
    _slice("v5e-16", "v5e:4x4"), _slice("v5e-32", "v5e:4x8"),
    _slice("v6e-1", "v6e:1x1"), _slice("v6e-4", "v6e:2x2"), _slice("v6e-8", "v6e:2x4"),
    _slice("v6e-16", "v6e:4x4"), _slice("v6e-32", "v6e:4x8"),
)}
INFERENCE_PROGRAMS = ("prompt_cache", "logits", "generate", "eval_variants")
SERVE_PROGRAMS = ("serve_prefill", "serve_decode", "serve_move_row", "serve_compact")
PROGRAMS = ("train",) + INFERENCE_PROGRAMS + SERVE_PROGRAMS


def topology_named(name: str) -> Topology:
    """An accelerator type ("v5e-16") or a topology name ("v5e:4x4")."""
    if name in TOPOLOGIES:
        return TOPOLOGIES[name]
    for t in TOPOLOGIES.values():
        if t.topology == name:
            return t
    generation = name.split(":")[0]
    if ":" in name and generation in _HBM_GIB and re.fullmatch(r"\d+(x\d+){1,2}", name.split(":")[1]):
        return _slice(name, name)
    raise ValueError(f"unknown TPU topology {name!r}; choose an accelerator type ({', '.join(TOPOLOGIES)}) or a "
                     "topology name such as v5e:4x4 or v5p:2x2x2")


def libtpu_holder(lockfile: str = LIBTPU_LOCKFILE) -> int | None:
    """The id of the process that holds libtpu's lock (libtpu takes a POSIX record lock), or None.

    Only asks (F_GETLK), never locks: call it before this process loads libtpu, since closing a file
    would drop this process's own locks on it.
    """
    import fcntl

    if not os.path.exists(lockfile):
        return None
    fd = os.open(lockfile, os.O_RDONLY)
    try:
        query = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        lock_type, _, _, _, pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, query))
        return None if lock_type == fcntl.F_UNLCK else pid
    finally:
        os.close(fd)


def tpu_devices(topology: Topology):
    """The compile-only devices of `topology` (loads libtpu in this process)."""
    import importlib.util

    import jax

    # The runtime backend stays the CPU (as a user's JAX_PLATFORMS may say otherwise): a machine
    # without TPUs has no TPU to open and no metadata server to ask.
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError('libtpu is not installed: `pip install "jax[tpu]"` (Python >= 3.11) to compile for TPU')
    holder = libtpu_holder()
    if holder is not None:
        raise RuntimeError(f"libtpu is held by process {holder} ({LIBTPU_LOCKFILE}); only one process on a machine "
                           "can use it at a time. Wait for that process to end and try again. (On a machine without "
                           "TPUs, any JAX process started without JAX_PLATFORMS=cpu loads libtpu and holds it.)")
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.topology,
                                        chip_config_name=topology.chip_config,
                                        chips_per_host_bounds=topology.chips_per_host, num_slices=1)
    return list(desc.devices)


# ------------------------------------------------------------------------------------------------
# Abstract models and the programs' arguments.


def _with_shardings(abstract, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def _sharded_state(state, mesh, *, shard: bool):
    from c2c_jax import sharding

    return _with_shardings(state, sharding.tree_shardings(state, mesh, shard=shard))


def abstract_models(config, platform: str, *, remat: bool, receiver_config_file=None, sharer_config_file=None):
    """Functions building the receiver, sharer and fuser of `config` for `platform` (to call under
    `nnx.eval_shape`), architectures from `models.architectures` (no weights)."""
    from flax import nnx

    from c2c_jax import build
    from c2c_jax.c2c.fuser import Fuser
    from c2c_jax.models import Decoder
    from c2c_jax.models.architectures import architecture_of

    receiver_arch = architecture_of(config.receiver.path, receiver_config_file)
    sharer_arch = architecture_of(config.sharer.path, sharer_config_file)

    def decoder(arch, model_config):
        return Decoder(arch, dtype=build.dtype_of(model_config.dtype), remat=remat, platform=platform,
                       rngs=nnx.Rngs(0))

    receiver = lambda: decoder(receiver_arch, config.receiver)  # noqa: E731
    sharer = lambda: decoder(sharer_arch, config.sharer)  # noqa: E731

    def fuser(r, s):
        return Fuser(build.fuser_config(config, r, s), rngs=nnx.Rngs(0))

    return receiver, sharer, fuser


def train_program(config, mesh, models, prefix: int, suffix: int):
    """(the jitted train step, its abstract arguments, the train state's shardings)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from c2c_jax import sharding
    from c2c_jax.train.batching import TrainBatch
    from c2c_jax.train.step import StepSettings, TrainState, jit_train_step, make_optimizer, train_state_shardings

    make_receiver, make_sharer, make_fuser = models
    receiver_def, receiver_state = nnx.split(nnx.eval_shape(make_receiver))
    sharer_def, sharer_state = nnx.split(nnx.eval_shape(make_sharer))
    fuser_abstract = nnx.eval_shape(lambda: make_fuser(make_receiver(), make_sharer()))
    fuser_def, fuser_state = nnx.split(fuser_abstract)
    total_steps = max(config.train.max_steps, 1)
    settings = StepSettings.from_config(config)
    tx = make_optimizer(settings.optim, total_steps)
    params = nnx.to_pure_dict(fuser_state)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params))
    state_sharding = train_state_shardings(mesh, tx, state, shard_fuser=settings.shard_fuser)
    graphdefs = (receiver_def, sharer_def, fuser_def)
    step = jit_train_step(settings, graphdefs, tx, fuser_abstract.config, total_steps, state_sharding)

    micro, batch_size = config.train.micro_batch_size, config.train.batch_size  # resolved (run)
    if batch_size % micro or micro % mesh.size:
        raise ValueError(f"train.batch_size {batch_size} / micro_batch_size {micro} do not split over "
                         f"{mesh.size} chips (micro_batch_size must be a multiple of the chip count)")
    shape = {"prefix": (batch_size // micro, micro, prefix), "suffix": (batch_size // micro, micro, suffix)}
    fields = {}
    for f in dataclasses.fields(TrainBatch):
        if f.metadata.get("static"):  # the step's layout: one fused section, as for one tokenizer
            continue
        dims = shape["suffix" if f.name.startswith("suffix") or f.name in ("targets", "loss_mask") else "prefix"]
        dtype = jnp.bool_ if f.name.endswith(("valid", "mask")) else jnp.int32
        fields[f.name] = jax.ShapeDtypeStruct(dims, dtype, sharding=sharding.batch_sharding(mesh, 3, 1))
    frozen = (_sharded_state(receiver_state, mesh, shard=config.mesh.shard_frozen),
              _sharded_state(sharer_state, mesh, shard=config.mesh.shard_frozen))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    args = (_with_shardings(state, state_sharding), frozen, TrainBatch(**fields), key)
    return step, args, state_sharding


def inference_programs(config, mesh, models, *, batch: int, width: int, max_new_tokens: int):
    """[(name, jitted program, abstract args, static kwargs)] of fused inference (`InferencePrograms`):
    weights replicated on every chip, the batch split over all of them."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from c2c_jax import sharding
    from c2c_jax.c2c.controls import CONTROL_METHODS
    from c2c_jax.c2c.model import C2CModel
    from c2c_jax.c2c.prompt import PromptBatch
    from c2c_jax.evaluate.methods import Route
    from c2c_jax.evaluate.settings import FUSED_METHODS, split_list
    from c2c_jax.infer.decode import SamplingConfig
    from c2c_jax.infer.generator import InferencePrograms

    make_receiver, make_sharer, make_fuser = models

    def c2c_model():
        receiver, sharer = make_receiver(), make_sharer()
        return C2CModel(receiver, [sharer], [make_fuser(receiver, sharer)])

    model = nnx.eval_shape(c2c_model)
    graphdef, state = nnx.split(model)
    state = _with_shardings(state, jax.tree.map(lambda _: sharding.replicated(mesh), state))
    programs = InferencePrograms(graphdef, mesh)
    rows = sharding.batch_sharding(mesh, 2, 0)

    def columns(dtype):
        return jax.ShapeDtypeStruct((batch, width), dtype, sharding=rows)

    prompts = PromptBatch(columns(jnp.int32), columns(jnp.bool_), columns(jnp.int32), (columns(jnp.int32),),
                          (columns(jnp.bool_),), (columns(jnp.int32),), (columns(jnp.bool_),))
    # The program's function, not its jit: a jit traced here would not be traced again (nor its
    # attention routes recorded) when it is lowered.
    cache = jax.eval_shape(lambda s, b: programs._prompt_cache_program(s, b, None, fuse=True, suffix_length=1),
                           state, prompts)
    cache_rows = jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim, 1 if x.ndim == 5 else 0)
                              if x.ndim else sharding.replicated(mesh), cache)
    cache = _with_shardings(cache, cache_rows)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    receiver = model.receiver.config
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    # Logits-mode evaluation: the receiver alone, C2C and the config's controls from one prefill (a
    # control's randomness is an argument, so any seed compiles the same program).
    methods = split_list(config.eval.methods)
    controls = tuple(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
                                  Route.batch_control(CONTROL_METHODS.get(m), 0, batch, batch, seed=0))
                     for m in methods if m in FUSED_METHODS)
    return [
        ("prompt_cache", programs._prompt_cache, (state, prompts, None), dict(fuse=True, suffix_length=1)),
        ("logits", programs._logits, (state, prompts, cache), dict(suffix_length=1)),
        ("generate", programs._generate, (state, prompts, cache, key),
         dict(sampling=sampling, eos_ids=tuple(receiver.eos_token_ids), pad_id=int(receiver.pad_token_id or 0),
              stream=False)),
    ] + ([("eval_variants", programs._variants, (state, prompts, controls),
           dict(suffix_length=1, receiver_only="receiver" in methods))] if controls else [])


def server_limits() -> dict:
    """The limits `serve_programs` takes, at `python -m c2c_jax.serve`'s defaults (`engine.SERVER_LIMITS`)."""
    from c2c_jax.infer.engine import SERVER_LIMITS

    return {key: getattr(SERVER_LIMITS, key)
            for key in ("slots", "max_prompt_tokens", "max_tokens", "max_prefill_batch", "decode_steps")}


def serve_programs(config, device, models, *, slots: int, max_prompt_tokens: int, max_tokens: int,
                   max_prefill_batch: int, decode_steps: int):
    """[(name, jitted program, abstract args, static kwargs)] of the server's engine (`infer/engine.py`) on
    one chip, as the server runs: the C2C route's prefill with fusion and admission into the slots
    of a full prefill batch at the widest prompt bucket (`serve_prefill`), the decode call over all
    slots (`serve_decode`, its widest, `decode_steps` steps), both with sampling (the larger of their
    greedy and sampling variants: `engine.sample_rows`), a row's move to a lower slot
    (`serve_move_row`) and the slots' compaction (`serve_compact`)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from c2c_jax.c2c.model import C2CModel
    from c2c_jax.c2c.prompt import PromptBatch
    from c2c_jax.infer.engine import DecodePrograms, PrefillPrograms, RowSampling, Slots, slots_capacity
    from c2c_jax.models.attention import TPU_BLOCK

    make_receiver, make_sharer, make_fuser = models

    def c2c_model():
        receiver, sharer = make_receiver(), make_sharer()
        return C2CModel(receiver, [sharer], [make_fuser(receiver, sharer)])

    on_chip = jax.sharding.SingleDeviceSharding(device)
    place = lambda tree: _with_shardings(tree, jax.tree.map(lambda _: on_chip, tree))  # noqa: E731
    model = nnx.eval_shape(c2c_model)
    graphdef, state = nnx.split(model)
    receiver_graphdef, receiver_state = nnx.split(model.receiver)
    state, receiver_state = place(state), place(receiver_state)
    # As `Engine`: prompts padded to the TPU kernels' block, the cache as `slots_capacity` sizes it.
    width = -(-max_prompt_tokens // TPU_BLOCK) * TPU_BLOCK
    capacity = slots_capacity(width, max_tokens, decode_steps, platform="tpu")
    slots_state = place(jax.eval_shape(lambda: Slots.empty(model.receiver, slots, capacity, width)))

    def array(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=on_chip)

    batch = max_prefill_batch
    columns = lambda dtype: array((batch, width), dtype)  # noqa: E731
    prompts = PromptBatch(columns(jnp.int32), columns(jnp.bool_), columns(jnp.int32), (columns(jnp.int32),),
                          (columns(jnp.bool_),), (columns(jnp.int32),), (columns(jnp.bool_),))
    prefill, decode = PrefillPrograms(graphdef, fuse=True), DecodePrograms(receiver_graphdef, decode_steps)
    sampling = RowSampling(array((batch,), jnp.float32), array((batch,), jnp.int32), array((batch,), jnp.float32),
                           array((batch, 2), jnp.uint32))
    row = array((), jnp.int32)
    return [
        ("serve_prefill", prefill.prefill.jitted,
         (state, slots_state, prompts, array((batch,), jnp.int32), sampling), {"sampled": True}),
        ("serve_decode", decode.step.jitted, (receiver_state, slots_state, array((slots,), jnp.bool_)),
         {"sampled": True}),
        ("serve_move_row", decode.move_row.jitted, (slots_state, row, row), {}),
        ("serve_compact", decode.compact.jitted, (slots_state, row), {}),
    ]


# ------------------------------------------------------------------------------------------------
# Compile and measure.

_COLLECTIVE = re.compile(r"\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_MOSAIC = 'custom_call_target="tpu_custom_call"'
_GPU_ONLY = re.compile(r'custom_call_target="(__cudnn[^"]*|__gpu[^"]*|[^"]*triton[^"]*)"')


@dataclasses.dataclass
class ProgramReport:
    name: str
    compile_s: float
    hbm_bytes: int
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    peak_bytes: int = 0
    flops: float = 0.0
    collectives: dict = dataclasses.field(default_factory=dict)
    attention_routes: dict = dataclasses.field(default_factory=dict)  # traced: "prefill:mosaic" -> calls
    mosaic_calls: int = 0  # Pallas TPU (Mosaic) kernels in the compiled HLO
    gpu_only_calls: list = dataclasses.field(default_factory=list)
    error: str = ""  # the compile error, e.g. XLA's out-of-memory message
    state_bytes: int = 0  # train: the fuser's parameters and optimizer state, in all
    state_bytes_per_chip: int = 0  # ... and on one chip

    @property
    def fits(self) -> bool:
        return not self.error and self.peak_bytes <= self.hbm_bytes and not self.gpu_only_calls


def compile_and_measure(name: str, program, args, kwargs, hbm_bytes: int) -> tuple[ProgramReport, Any]:
    """(the report, the compiled program or None) of `program(*args, **kwargs)` compiled for the
    devices its arguments' shardings name."""
    from c2c_jax.models import attention

    start = time.perf_counter()
    try:
        with attention.recorded_routes() as routes:
            lowered = program.lower(*args, **kwargs)
        compiled = lowered.compile()
    except Exception as error:  # noqa: BLE001 - XLA reports "does not fit" as a compile error
        message = str(error).strip().splitlines()
        return ProgramReport(name, time.perf_counter() - start, hbm_bytes, attention_routes=dict(routes),
                             error=(message[0] if message else type(error).__name__)[:400]), None
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo = compiled.as_text()
    total = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes \
        + memory.temp_size_in_bytes
    report = ProgramReport(
        name, seconds, hbm_bytes, memory.argument_size_in_bytes, memory.output_size_in_bytes,
        memory.alias_size_in_bytes, memory.temp_size_in_bytes,
        max(getattr(memory, "peak_memory_in_bytes", 0), total), float((cost or {}).get("flops", 0.0)),
        dict(sorted(collections.Counter(_COLLECTIVE.findall(hlo)).items())), dict(sorted(routes.items())),
        hlo.count(_MOSAIC), sorted(set(_GPU_ONLY.findall(hlo))))
    return report, compiled


def state_footprint(abstract_state, shardings) -> tuple[int, int]:
    """(bytes of the whole tree, bytes on one device) of arrays placed by `shardings`."""
    import jax
    import numpy as np

    whole = per_device = 0
    for x, s in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings)):
        itemsize = np.dtype(x.dtype).itemsize
        whole += int(np.prod(x.shape)) * itemsize
        per_device += int(np.prod(s.shard_shape(x.shape))) * itemsize
    return whole, per_device


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def format_report(r: ProgramReport) -> str:
    lines = [f"{r.name}: {'fits' if r.fits else 'DOES NOT FIT'} (compiled in {r.compile_s:.1f} s)"]
    if r.error:
        lines.append(f"  compile error: {r.error}")
    else:
        lines.append(f"  memory per chip (GiB): arguments {_gib(r.argument_bytes)}, outputs {_gib(r.output_bytes)}"
                     f" (aliased {_gib(r.alias_bytes)}), temporaries {_gib(r.temp_bytes)}, peak {_gib(r.peak_bytes)}"
                     f" of {_gib(r.hbm_bytes)} HBM ({100 * r.peak_bytes / r.hbm_bytes:.0f} %)")
        lines.append(f"  FLOPs per chip: {r.flops:.3e}")
        lines.append("  collectives: " + (", ".join(f"{k} x{v}" for k, v in r.collectives.items()) or "none"))
        lines.append(f"  Mosaic (Pallas TPU) kernels in the HLO: {r.mosaic_calls}")
    lines.append("  attention calls traced: " + (", ".join(f"{k} x{v}" for k, v in r.attention_routes.items())
                                                  or "none"))
    if r.gpu_only_calls:
        lines.append(f"  GPU-only custom calls: {', '.join(r.gpu_only_calls)}")
    return "\n".join(lines)


def run(config, topology: Topology, *, programs=PROGRAMS, prefix: int = 0, suffix: int = 0, eval_batch: int = 0,
        prompt_length: int = 0, serve_limits: dict | None = None, receiver_config_file=None, sharer_config_file=None,
        devices=None, log=print) -> list[ProgramReport]:
    """Compiles `programs` for `topology`; returns their reports (printing each as it is done)."""
    from c2c_jax import sharding
    from c2c_jax.config import resolve_micro_batch

    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        raise ValueError(f"unknown program(s) {', '.join(unknown)}; choose from {', '.join(PROGRAMS)}")
    devices = tpu_devices(topology) if devices is None else devices
    mesh = sharding.make_mesh(config.mesh, devices)
    platform = sharding.platform_of(mesh)
    hbm = int(topology.hbm_gib * GIB)
    log(f"{topology.name} ({topology.topology}, {len(devices)} chips of {topology.hbm_gib} GiB HBM, {platform}); "
        f"mesh {dict(mesh.shape)}; receiver {config.receiver.path}, sharer {config.sharer.path}")
    reports = []
    if "train" in programs:
        config = resolve_micro_batch(config, mesh.size, platform)
        prefix = prefix or max(config.data.prefix_buckets)
        suffix = suffix or max(config.data.suffix_buckets)
        models = abstract_models(config, platform, remat=config.train.remat,
                                 receiver_config_file=receiver_config_file, sharer_config_file=sharer_config_file)
        step, args, state_sharding = train_program(config, mesh, models, prefix, suffix)
        whole, per_device = state_footprint(args[0], state_sharding)
        log(f"train: step over {config.train.batch_size // config.train.micro_batch_size} micro-batches of "
            f"{config.train.micro_batch_size} rows, prefix {prefix} + suffix {suffix} tokens; fuser parameters and "
            f"optimizer state {_gib(whole)} GiB, {_gib(per_device)} GiB per chip")
        report, _ = compile_and_measure("train", step, args, {}, hbm)
        report.state_bytes, report.state_bytes_per_chip = whole, per_device
        reports.append(report)
        log(format_report(report))
    inference = [p for p in programs if p in INFERENCE_PROGRAMS]
    if inference:
        batch = eval_batch or config.eval.batch_size
        batch = -(-batch // mesh.size) * mesh.size  # whole rows on every chip
        width = prompt_length or config.data.max_length
        models = abstract_models(config, platform, remat=False, receiver_config_file=receiver_config_file,
                                 sharer_config_file=sharer_config_file)
        log(f"inference: batch {batch} ({batch // mesh.size} per chip), prompts of {width} tokens, "
            f"{config.eval.max_new_tokens} new tokens; weights replicated")
        for name, program, args, kwargs in inference_programs(config, mesh, models, batch=batch, width=width,
                                                              max_new_tokens=config.eval.max_new_tokens):
            if name in inference:
                report, _ = compile_and_measure(name, program, args, kwargs, hbm)
                reports.append(report)
                log(format_report(report))
    serve = [p for p in programs if p in SERVE_PROGRAMS]
    if serve:
        limits = dict(server_limits(), **(serve_limits or {}))
        models = abstract_models(config, platform, remat=False, receiver_config_file=receiver_config_file,
                                 sharer_config_file=sharer_config_file)
        log(f"serve (one chip, as the server runs): {limits['slots']} slots, prompts up to "
            f"{limits['max_prompt_tokens']} tokens prefilled {limits['max_prefill_batch']} at a time, "
            f"{limits['max_tokens']} new tokens")
        for name, program, args, kwargs in serve_programs(config, devices[0], models, **limits):
            if name in serve:
                report, _ = compile_and_measure(name, program, args, kwargs, hbm)
                reports.append(report)
                log(format_report(report))
    return reports


def main() -> None:
    from absl import flags
    from ml_collections import config_flags

    from c2c_jax import cli

    cli.starting("aot")
    config_flag = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    topology_flag = flags.DEFINE_string("topology", "v5e-16", "Accelerator type (v5e-16) or topology (v5e:4x4).")
    programs_flag = flags.DEFINE_list("programs", list(PROGRAMS), "Programs to compile.")
    prefix_flag = flags.DEFINE_integer("prefix", 0, "Train prefix length (default: the largest prefix bucket).")
    suffix_flag = flags.DEFINE_integer("suffix", 0, "Train suffix length (default: the largest suffix bucket).")
    batch_flag = flags.DEFINE_integer("eval_batch", 0, "Inference batch (default eval.batch_size, rounded up to "
                                                       "a multiple of the chips).")
    length_flag = flags.DEFINE_integer("prompt_length", 0, "Inference prompt width (default data.max_length).")
    receiver_flag = flags.DEFINE_string("receiver_config", None, "config.json of the receiver, if not pinned.")
    sharer_flag = flags.DEFINE_string("sharer_config", None, "config.json of the sharer, if not pinned.")
    serve_flags = {key: flags.DEFINE_integer(f"serve_{key}", value, f"The server's {key} (serve's --{key}).")
                   for key, value in server_limits().items()}
    json_flag = flags.DEFINE_string("json", None, "Also write the reports to this JSON file.")
    flags.mark_flags_as_required(["config"])

    def main_():
        topology = topology_named(topology_flag.value)
        reports = run(config_flag.value, topology, programs=programs_flag.value, prefix=prefix_flag.value,
                      suffix=suffix_flag.value, eval_batch=batch_flag.value, prompt_length=length_flag.value,
                      serve_limits={key: flag.value for key, flag in serve_flags.items()},
                      receiver_config_file=receiver_flag.value, sharer_config_file=sharer_flag.value)
        if json_flag.value:
            with open(json_flag.value, "w") as f:
                json.dump({"topology": dataclasses.asdict(topology),
                           "reports": [dict(dataclasses.asdict(r), fits=r.fits) for r in reports]}, f, indent=2)
        failed = [r.name for r in reports if not r.fits]
        print(f"{topology.name}: " + (f"{', '.join(failed)} do(es) not fit" if failed else "every program fits"))
        if set(failed) & set(SERVE_PROGRAMS):  # the slots' cache lives on one chip and grows with --serve_slots
            print(f"the server's programs were compiled for {serve_flags['slots'].value} slots on one chip; "
                  "fewer (--serve_slots, serve's --slots) need less memory")
        sys.exit(1 if failed else 0)

    cli.run(main_)


if __name__ == "__main__":
    main()
