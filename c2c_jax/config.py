"""The default configuration every file in `configs/` starts from.

Architectures are never written here: they come from each checkpoint's own `config.json` (or GGUF
metadata). A config names the models, the fuser's hyper-parameters, the data, the optimizer and the
run; every field can be overridden on the command line (`--config.optim.lr=3e-4`).
"""

from __future__ import annotations

import ml_collections

from c2c_jax.evaluate.scoring import T2T_BACKGROUND_PROMPT


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    # "upstream": train exactly as upstream C2C does where c2c_jax's defaults differ (UPSTREAM_TRAINING;
    # docs/upstream.md lists every difference); "": the defaults.
    c.reproduce = ""

    # Frozen models: a local HF directory, a hub id, a .gguf file, or "random:<family>" (tiny, random).
    c.receiver = ml_collections.ConfigDict(dict(path="Qwen/Qwen3-0.6B", dtype="bfloat16"))
    c.sharer = ml_collections.ConfigDict(dict(path="Qwen/Qwen2.5-0.5B-Instruct", dtype="bfloat16"))

    c.alignment = ml_collections.ConfigDict(dict(
        tokens="auto",  # "auto": align only when the tokenizers differ; "on"; "off"
        strategy="first",  # per-token mapping when aligning: "first" or "longest" piece
        # "shared": both models see the aligned sequence's column positions (upstream);
        # "own": each model counts only its own real tokens (no gaps at inserted pads).
        sharer_positions="shared",
        layer_map="terminal",  # "terminal" (paper) or "nearest"
    ))

    c.fuser = ml_collections.ConfigDict(dict(
        hidden_dim=1024, intermediate_dim=1024, num_layers=3, dropout=0.1,
        initial_temperature=1.0, final_temperature=0.001, anneal_steps=1929,
        gate_noise="gumbel",  # upstream's single-Gumbel gate; "logistic" opens with P = sigmoid(logit)
        ablation="none",  # none | no_weight | no_weight_no_gate | project | fuse
        zero_init=False,
        # "real"; "zeros" / "noise": the trained control, the same recipe with the sharer's K/V withheld
        # (c2c_jax/c2c/controls.py). Saved with the fuser, which then reads the same input at inference.
        sharer_input="real",
        include_response=False,  # decode-time fusion (upstream's include_response): response tokens fused too
        dtype="bfloat16",  # compute dtype; parameters and optimizer state are float32
        init_from="",  # start from this fuser (our format or upstream layout) instead of a random one
    ))

    c.data = ml_collections.ConfigDict(dict(
        source="openhermes",  # openhermes | mc_train | synthetic | path to .jsonl / .json / .parquet chats
        max_rows=500_000,  # take the first rows of the source, then filter by length (upstream order)
        max_length=2048,  # receiver tokens per chat, template included
        eval_fraction=0.01,
        enable_thinking=False,
        prefix_buckets=(128, 256, 512, 1024, 2048),
        suffix_buckets=(128, 512, 2048),
        # "bucketed": each step from one (prefix, suffix) length bucket, little padding; "uniform": as
        # upstream, the next batch_size examples of the epoch's shuffle, padded to the longest
        shuffle="bucketed",
    ))

    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, warmup_fraction=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
        decay_gates=True,  # upstream decays the gate logits too (toward 0 = closed at inference)
        gate_lr_multiplier=1.0,  # the gate logits' learning rate is lr times this (upstream: 1)
        clip_norm=1.0,
        warmup_from_zero=False,  # True: HF's schedule, whose first step has lr 0 (upstream); False: lr / warmup
    ))

    c.train = ml_collections.ConfigDict(dict(
        batch_size=256,  # sequences per optimizer step, all devices and micro-batches together
        # Sequences per forward/backward, all devices together (resolve_micro_batch). 0: one row per
        # chip on a TPU (a 16 GiB v5e chip holds one 2048 + 2048-token row of the qwen step, not two),
        # 16 (at most batch_size) elsewhere. A micro-batch holds whole rows per device: a smaller one
        # grows to the next multiple of the device count, and batch_size with it (same micro-batches).
        micro_batch_size=0,
        epochs=1,
        max_steps=-1,  # -1: run the epochs
        log_every=10,
        eval_every=100,
        eval_batches=20,
        # Stop after this many held-out evaluations without a lower loss; `final` is then the fuser of the
        # lowest held-out loss (also kept in `best`). 0: run every step.
        patience=0,
        remat=False,  # rematerialise the receiver's differentiated pass
        # "tokens": mean over the step's answer tokens; "reference": upstream's, the answer-token mean of
        # each group of `reference_group_size` sequences (its per-GPU micro-batch), averaged over groups
        loss_normalization="tokens",
        reference_group_size=4,
        # float32: fp32 master parameters and Adam state (compute in fuser.dtype); bfloat16: as upstream,
        # parameters, gradients and Adam moments all bfloat16, no fp32 copy
        param_dtype="float32",
    ))

    c.mesh = ml_collections.ConfigDict(dict(
        data=-1,  # -1: all devices (with fsdp); else the first data x fsdp devices
        fsdp=0,  # 0: all devices on a TPU (FSDP over the slice), 1 elsewhere; see sharding.make_mesh
        # Split parameters over the fsdp axis by sharding.LOGICAL_AXIS_RULES (no effect when fsdp=1):
        shard_frozen=True,  # the frozen receiver and sharer
        shard_fuser=True,  # the fuser's float32 parameters and its optimizer state
    ))

    c.ckpt = ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True, export_upstream=False))

    c.eval = ml_collections.ConfigDict(dict(
        fuser="",  # fuser directory (ours or upstream layout), or several comma-separated; required for c2c
        sharers="",  # one sharer model per fuser (comma-separated); default: sharer.path for each
        benchmarks="openbookqa,arc-challenge,mmlu-redux,ceval",
        methods="receiver,sharer,t2t,c2c",
        source="hub",  # hub | offline | path to a local benchmark file
        answer_mode="generate",  # generate | logits
        limit=0,  # items per benchmark, 0 = all
        batch_size=16,
        # Batch widths in tokens ("256,512"): a batch is padded to the smallest that holds its longest prompt
        # (longer ones: to a multiple of 64, 128 on a TPU). Each width compiles every method's programs once.
        prompt_buckets="",
        max_new_tokens=64,
        t2t_message_tokens=0,  # sharer's text-to-text message, new tokens; 0: upstream's (1024 generate, 64 logits)
        background_prompt=T2T_BACKGROUND_PROMPT,  # text-to-text stage 1; must contain {question}
        use_cot=False,
        latency_items=10,  # items per benchmark timed at batch size 1 (after a warm-up call)
        output_dir="",  # default: <workdir>/eval
    ))

    c.generate = ml_collections.ConfigDict(dict(
        fuser="", max_new_tokens=256, temperature=0.0, top_k=0, top_p=1.0))
    return c


# What `reproduce="upstream"` sets: upstream's training recipe where c2c_jax's defaults differ.
UPSTREAM_TRAINING = {
    "train.param_dtype": "bfloat16",
    "train.loss_normalization": "reference",
    "train.reference_group_size": 4,
    "data.shuffle": "uniform",
    "fuser.gate_noise": "gumbel",
    "optim.decay_gates": True,
    "optim.warmup_from_zero": True,
}
REPRODUCE = ("", "upstream")


def resolve_reproduce(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with `reproduce`'s settings applied (a copy; the config itself is left alone)."""
    if config.get("reproduce", "") not in REPRODUCE:
        raise ValueError(f"unknown reproduce mode {config.reproduce!r}; choose one of "
                         f"{', '.join(repr(r) for r in REPRODUCE)}")
    config = config.copy_and_resolve_references()
    if config.get("reproduce", "") == "upstream":
        for dotted, value in UPSTREAM_TRAINING.items():
            section, key = dotted.split(".")
            config[section][key] = value
    return config


AUTO_MICRO_BATCH = 16  # train.micro_batch_size 0 off a TPU: the qwen recipe's micro-batch on one H100 or H200


def resolve_micro_batch(config: ml_collections.ConfigDict, n_devices: int, platform: str) -> ml_collections.ConfigDict:
    """The config with train.micro_batch_size (and batch_size) for `n_devices` devices of `platform`
    (a copy): 0 becomes one row per device on a TPU, else AUTO_MICRO_BATCH (at most batch_size); a
    micro-batch that does not give every device whole rows grows to the next multiple of `n_devices`,
    and batch_size by the same factor. The loss is normalised over the whole step, so only memory and
    speed change (docs/design.md, "The micro-batch")."""
    config = config.copy_and_resolve_references()
    t = config.train
    if t.micro_batch_size < 0 or t.batch_size < 1:
        raise ValueError(f"train.micro_batch_size {t.micro_batch_size} and batch_size {t.batch_size} must be positive "
                         "(micro_batch_size 0: automatic)")
    micro = t.micro_batch_size or (n_devices if platform == "tpu" else min(AUTO_MICRO_BATCH, t.batch_size))
    whole_rows = -(-micro // n_devices) * n_devices
    if t.micro_batch_size == 0:
        t.batch_size = max(t.batch_size, whole_rows)
    elif t.batch_size % micro == 0:
        t.batch_size = t.batch_size // micro * whole_rows
    t.micro_batch_size = whole_rows
    return config


# XLA flags the inference CLIs (generate, evaluate) start with on a GPU. CONCURRENT lets the commands
# of a CUDA graph that share no buffer run at the same time, so the receiver's and the sharer's prefix
# passes overlap: C2C time-to-first-token at 512 tokens on an H200 went from 9.0 to 7.6 ms
# (docs/performance.md). Training gains nothing from it (measured) and keeps XLA's default.
GPU_INFERENCE_XLA_FLAGS = ("--xla_gpu_command_buffer_scheduling_mode=CONCURRENT",)


def use_inference_xla_flags(environ=None, *, gpu: bool | None = None) -> str:
    """Puts `GPU_INFERENCE_XLA_FLAGS` in front of XLA_FLAGS when a CUDA build of jax is installed.

    Flags already in XLA_FLAGS come after ours, so a user's setting of the same flag wins. XLA reads
    the variable once, when JAX starts its backend: call this before the first computation.
    Returns the resulting XLA_FLAGS.
    """
    import os

    environ = os.environ if environ is None else environ
    if gpu is None:
        gpu = _cuda_jax_installed()
    current = environ.get("XLA_FLAGS", "")
    if gpu:
        ours = [f for f in GPU_INFERENCE_XLA_FLAGS if f.split("=", 1)[0] not in current]
        environ["XLA_FLAGS"] = " ".join(ours + ([current] if current else []))
    return environ.get("XLA_FLAGS", "")


def _cuda_jax_installed() -> bool:
    """Whether jax's CUDA plugin is installed (without starting a backend, which would read XLA_FLAGS)."""
    import importlib.metadata

    return any((d.metadata["Name"] or "").lower().replace("_", "-").startswith("jax-cuda")
               for d in importlib.metadata.distributions())


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing for the CLIs (`app.run(main, flags_parser=parse_flags)`).

    ml_collections reports a `--config.*` override of a field the config does not have as a bare
    KeyError/AttributeError traceback; this names the override and the fields that do exist.
    """
    import re
    import sys

    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as error:
        # The message is the missing name, quoted (and re-quoted when wrapped), maybe with a suggestion.
        missing = re.search(r"[A-Za-z_]\w*", str(error))
        missing = missing.group(0) if missing else ""
        overrides = [a[2:].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        culprit = next((o for o in overrides if missing in o.split(".")[1:]), None)
        if culprit is None:
            raise
        parent = culprit.split(".")[1:culprit.split(".").index(missing, 1)]
        known = _fields(argv, parent)
        suggestion = re.search(r'Did you mean "(\w+)"', str(error))
        sys.exit(f"error: --{culprit}: the config has no field {'.'.join(parent + [missing])!r}"
                 + (f" (did you mean {suggestion.group(1)!r}?)" if suggestion else "")
                 + (f"; {'.'.join(['config'] + parent)} has: {', '.join(known)}" if known else ""))


def _fields(argv: list[str], path: list[str]) -> list[str]:
    """Field names at `path` of the config file given as --config=FILE (empty if it cannot be read)."""
    import importlib.util

    files = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
    try:
        spec = importlib.util.spec_from_file_location("_c2c_cli_config", files[-1].split(":", 1)[0])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        node = module.get_config()
        for name in path:
            node = node[name]
        return sorted(node.keys())
    except Exception:  # noqa: BLE001 - only for a better message; the error itself is already known
        return []
