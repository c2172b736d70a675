"""The training loop: data, models and fuser from a config, the jitted steps (`train.step`), periodic
evaluation, checkpoints (`train.checkpointer`) and the final fuser (`infer.fuser_io`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from c2c_jax import build, cli, sharding
from c2c_jax.c2c.fuser import Fuser
from c2c_jax.c2c.token_alignment import pad_id_of
from c2c_jax.infer.fuser_io import export_upstream_fuser, load_fuser, save_fuser
from c2c_jax.train.batching import DataSettings, batch_iterator, load_train_data
from c2c_jax.train.checkpointer import TrainCheckpointer
from c2c_jax.train.sources import check_source
from c2c_jax.train.step import StepSettings, TrainState, build_steps

log = logging.getLogger("c2c_jax.train")


# ------------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """What the loop does between steps: logging, held-out evaluation, early stopping, checkpoints."""

    log_every: int  # steps between logged metrics
    eval_every: int  # steps between held-out evaluations
    eval_batches: int  # micro-batches per held-out evaluation (at most one epoch of the held-out set)
    patience: int  # held-out evaluations without a lower loss before stopping; 0: never
    ckpt_every: int  # steps between checkpoints (the last step is always saved)
    ckpt_keep: int  # checkpoints kept
    ckpt_async: bool  # save in the background while training goes on
    export_upstream: bool  # also write the final fuser in upstream's layout

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "LoopSettings":
        t, c = config.train, config.ckpt
        return cls(log_every=t.log_every, eval_every=t.eval_every, eval_batches=t.eval_batches, patience=t.patience,
                   ckpt_every=c.every, ckpt_keep=c.keep, ckpt_async=c.async_save, export_upstream=c.export_upstream)


@dataclasses.dataclass
class Run:
    """Everything a training run holds between steps (built by `setup`, used by `train_and_evaluate`)."""

    config: ml_collections.ConfigDict
    loop: LoopSettings
    data: DataSettings
    mesh: jax.sharding.Mesh
    graphdefs: tuple
    frozen: tuple
    state: TrainState
    step_fn: Any
    eval_fn: Any
    train_iter: Any
    eval_examples: list
    total_steps: int
    fuser_template: Fuser
    tokenizers: tuple
    data_stats: dict


def setup(config: ml_collections.ConfigDict, *, loaded: build.Loaded | None = None) -> Run:
    """loaded: models already loaded (`build.load_frozen`), reused and added to."""
    from c2c_jax.config import resolve_micro_batch, resolve_reproduce

    config = resolve_reproduce(config)
    check_train_settings(config)
    sharding.maybe_initialize_distributed()
    mesh = sharding.make_mesh(config.mesh)
    config = resolve_micro_batch(config, mesh.size, sharding.platform_of(mesh))
    n_devices = mesh.size
    micro, batch_size = config.train.micro_batch_size, config.train.batch_size
    if batch_size % micro:
        raise ValueError(f"train.batch_size {batch_size} is not a multiple of train.micro_batch_size {micro}")
    if micro % n_devices:
        raise ValueError(f"train.micro_batch_size {micro} must be divisible by the {n_devices} devices")
    check_source(config.data.source)
    build.check_before_loading(config, [(config.fuser.init_from, config.sharer.path)] if config.fuser.init_from else [])
    param_sharding = sharding.param_sharding_fn(mesh, config.mesh.shard_frozen)
    receiver, receiver_tok, sharer, sharer_tok = build.load_pair(
        config, loaded=loaded, param_sharding=param_sharding, remat=config.train.remat,
        platform=sharding.platform_of(mesh))
    fuser = build.new_fuser(config, receiver, sharer)

    data = DataSettings.from_config(config)
    cli.phase(f"reading and tokenizing the training data ({data.source})")
    train_examples, eval_examples, stats = load_train_data(
        data, receiver_tok, sharer_tok, receiver.config.vocab_size, sharer.config.vocab_size)
    train_iter = batch_iterator(
        data, train_examples, pad_id=pad_id_of(receiver_tok), sharer_pad_id=pad_id_of(sharer_tok),
        process_index=jax.process_index(), process_count=jax.process_count())
    steps_per_epoch = train_iter.num_steps_per_epoch()
    total_steps = config.train.max_steps if config.train.max_steps > 0 else config.train.epochs * steps_per_epoch
    if total_steps <= 0:
        raise ValueError(f"no training steps: {len(train_examples)} examples do not fill one batch of {batch_size}")

    steps = build_steps(StepSettings.from_config(config), mesh, receiver, sharer, fuser, total_steps)
    return Run(config, LoopSettings.from_config(config), data, mesh, steps.graphdefs, steps.frozen, steps.state,
               steps.step_fn, steps.eval_fn, train_iter, eval_examples, total_steps, fuser, (receiver_tok, sharer_tok),
               stats)


def check_train_settings(config: ml_collections.ConfigDict) -> None:
    """Clear errors for bad precision, normalisation and shuffle settings (before any model loads)."""
    t = config.train
    if t.patience < 0:
        raise ValueError(f"train.patience must be >= 0 (0: no early stopping), not {t.patience}")
    if t.patience and not config.data.eval_fraction:
        raise ValueError("train.patience stops on the held-out loss, but data.eval_fraction is 0: nothing is held out")
    if t.param_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"train.param_dtype must be 'float32' or 'bfloat16', not {t.param_dtype!r}")
    if t.loss_normalization not in ("tokens", "reference"):
        raise ValueError(f"train.loss_normalization must be 'tokens' or 'reference', not {t.loss_normalization!r}")
    if t.loss_normalization == "reference" and (t.reference_group_size < 1
                                                or t.batch_size % t.reference_group_size):
        raise ValueError(f"train.batch_size {t.batch_size} is not a multiple of train.reference_group_size "
                         f"{t.reference_group_size} (the sequences of one token mean in the 'reference' loss)")
    if config.data.shuffle not in ("bucketed", "uniform"):
        raise ValueError(f"data.shuffle must be 'bucketed' or 'uniform', not {config.data.shuffle!r}")


def _batch_tokens(batch) -> int:
    return int(np.sum(batch.prefix_valid) + np.sum(batch.suffix_valid))


def evaluate_loss(run: Run, params) -> float:

    if not run.eval_examples:
        return float("nan")
    one_micro_batch = dataclasses.replace(run.data, batch_size=run.data.micro_batch_size)  # per eval step
    it = batch_iterator(
        one_micro_batch, run.eval_examples, pad_id=pad_id_of(run.tokenizers[0]),
        sharer_pad_id=pad_id_of(run.tokenizers[1]), process_index=jax.process_index(),
        process_count=jax.process_count(), seed=run.data.seed + 1)
    n = min(run.loop.eval_batches, max(it.num_steps_per_epoch(), 1))
    total_loss, total_count = 0.0, 0
    for _ in range(n):
        batch = sharding.place_batch(next(it), run.mesh, batch_axis=1)
        loss, count = jax.device_get(run.eval_fn(params, run.frozen, batch))
        total_loss, total_count = total_loss + float(loss), total_count + int(count)
    return total_loss / max(total_count, 1)


def closed_gates(params: dict) -> dict:
    """The fuser's parameters with every gate logit negative: inference-mode fusion then adds gate 0 x the
    projection, exactly nothing, so the held-out loss is the receiver's alone."""
    projectors = dict(params["projectors"], gate_logit=-jnp.abs(params["projectors"]["gate_logit"]) - 1.0)
    return dict(params, projectors=projectors)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *,
                       loaded: build.Loaded | None = None) -> dict:
    """Trains a fuser; checkpoints under `workdir/checkpoints`, exports `workdir/final`. Resumes if it can.

    loaded: models already loaded (`build.load_frozen`), reused and added to."""
    from tqdm import tqdm

    if str(workdir).startswith(("gs://", "s3://", "http://", "https://")):
        raise ValueError(f"workdir {workdir} is a URL; c2c_jax writes through the local filesystem. Mount the bucket "
                         "(gcsfuse, as launch/tpu_vm.sh does on every TPU worker) and pass the mount path.")
    workdir = Path(workdir)
    run = setup(config, loaded=loaded)
    config = run.config  # with `reproduce` applied
    is_main = jax.process_index() == 0
    loop = run.loop
    checkpointer = TrainCheckpointer(workdir / "checkpoints", keep=loop.ckpt_keep, async_save=loop.ckpt_async)
    resumed = checkpointer.restore_newest_intact(run.state)
    best = None  # {"step", "eval_loss"} of the lowest held-out loss so far
    if resumed is not None:
        run.state, meta, _ = resumed
        run.train_iter.restore(meta["data"])
        best = meta.get("best")
        cli.phase(f"resuming from the checkpoint of step {int(run.state.step)}")
    elif is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    writer = _summary_writer(workdir) if is_main else None
    start = int(run.state.step)
    if is_main:
        stats, buckets = run.data_stats, run.train_iter.bucket_counts
        cli.phase(f"data {config.data.source!r}: {stats['train']} training and {stats['eval']} held-out examples "
                  f"of {stats['rows']} rows; {len(buckets)} batch shape(s) (prompt x answer tokens: "
                  + ", ".join(f"{p}x{a}" for p, a in sorted(buckets)) + ")")
        cli.phase(f"fuser: {run.fuser_template.config.num_params():,} parameters; steps {start + 1}-{run.total_steps}")

    base_key = jax.random.key(config.seed)
    summary_file = workdir / "train_summary.json"
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())
        if start >= run.total_steps or summary.get("stopped_at") == start:
            log.info("%s already finished at step %d; nothing to do", workdir, start)
            return summary
    receiver_loss = None  # the baseline the fuser's held-out loss is read against
    if run.eval_examples and run.fuser_template.config.uses_gate:
        receiver_loss = evaluate_loss(run, closed_gates(run.state.params))
        if is_main:
            cli.phase(f"held-out loss of the receiver alone (every gate closed): {receiver_loss:.4f}")
        if writer:
            writer.add_scalar("eval/receiver_loss", receiver_loss, start)
    bar = tqdm(total=run.total_steps, initial=start, disable=not is_main, dynamic_ncols=True, desc="train",
               smoothing=0.1)
    history, compiled = [], {}
    patience, stopped_at = loop.patience, None
    tokens_since, time_since = 0, time.perf_counter()

    def pause(seconds: float) -> None:  # compiling and held-out evaluation stay out of the reported rates
        nonlocal time_since
        time_since += seconds
        if not bar.disable:
            bar.unpause()

    def step_program(batch):
        """The train step compiled for this batch shape, announced, and kept out of the bar's rate."""
        shape = (batch.prefix_tokens.shape[-1], batch.suffix_tokens.shape[-1])
        if shape not in compiled:
            cli.phase(f"compiling the train step for {shape[0]} prompt + {shape[1]} answer tokens "
                      f"(once per batch shape; {len(compiled)} compiled so far)")
            began = time.perf_counter()
            compiled[shape] = run.step_fn.lower(run.state, run.frozen, batch, base_key).compile()
            took = time.perf_counter() - began
            cli.phase(f"compiled in {took:.0f} s")
            pause(took)
        return compiled[shape]

    for step in range(start, run.total_steps):
        host_batch = next(run.train_iter)
        tokens_since += _batch_tokens(host_batch) * jax.process_count()
        batch = sharding.place_batch(host_batch, run.mesh, batch_axis=1)
        run.state, metrics = step_program(batch)(run.state, run.frozen, batch, base_key)
        done = step + 1
        jax.block_until_ready(metrics["loss"])  # the bar counts finished steps, not queued ones
        bar.update(1)
        if done % loop.log_every == 0 or done == run.total_steps:
            m = jax.device_get(metrics)
            elapsed = time.perf_counter() - time_since
            tokens_per_s = tokens_since / max(elapsed, 1e-9)
            tokens_since, time_since = 0, time.perf_counter()
            record = {"step": done, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                      "lr": float(m["lr"]), "temperature": float(m["temperature"]), "tokens_per_s": tokens_per_s}
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            if writer:
                for key in ("loss", "grad_norm", "lr", "temperature", "tokens_per_s"):
                    writer.add_scalar(f"train/{key}", record[key], done)
                for (layer, branch), logit in np.ndenumerate(np.asarray(m["gate_logits"]).reshape(-1, 2)):
                    writer.add_scalar(f"gates/layer{layer:02d}_{'kv'[branch]}", float(logit), done)
        if (done % loop.eval_every == 0 or done == run.total_steps) and run.eval_examples:
            began = time.perf_counter()
            eval_loss = evaluate_loss(run, run.state.params)
            pause(time.perf_counter() - began)
            if is_main:
                cli.phase(f"step {done}: held-out loss {eval_loss:.4f} (train loss {history[-1]['loss']:.4f})"
                          if history else f"step {done}: held-out loss {eval_loss:.4f}")
            if history:
                history[-1]["eval_loss"] = eval_loss
            if writer:
                writer.add_scalar("eval/loss", eval_loss, done)
            if best is None or eval_loss < best["eval_loss"]:
                best = {"step": done, "eval_loss": eval_loss}
                if patience and is_main:
                    save_fuser(nnx.merge(run.graphdefs[2], jax.device_get(run.state.params)), workdir / "best")
            elif patience and (done - best["step"]) // loop.eval_every >= patience:
                stopped_at = done
                cli.phase(f"step {done}: no lower held-out loss in {patience} evaluations; stopping, keeping "
                          f"the fuser of step {best['step']} (held-out loss {best['eval_loss']:.4f})")
        if done % loop.ckpt_every == 0 or done == run.total_steps or stopped_at:
            checkpointer.save(done, run.state, {"data": run.train_iter.state(), "step": done, "best": best})
        if stopped_at:
            break
    bar.close()
    checkpointer.wait()
    shapes = sorted(compiled)
    log.info("compiled %d distinct batch shapes: %s", len(shapes), shapes)

    fuser = nnx.merge(run.graphdefs[2], jax.device_get(run.state.params))
    summary = {"steps": run.total_steps, "history": history, "batch_shapes": shapes, "best": best,
               "stopped_at": stopped_at, "receiver_eval_loss": receiver_loss}
    if is_main:
        if patience and best is not None:  # `final` is the fuser of the lowest held-out loss
            fuser = load_fuser(workdir / "best")
        save_fuser(fuser, workdir / "final")
        if loop.export_upstream:
            export_upstream_fuser(fuser, workdir / "final_upstream")
        plot_gates(fuser, workdir / "gates.png")
        summary_file.write_text(json.dumps(summary, indent=2))
    if writer:
        writer.close()
    return summary


def _summary_writer(workdir: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # TensorBoard logging is optional
        return None
    return SummaryWriter(str(workdir / "tensorboard"))


def plot_gates(fuser: Fuser, path: Path) -> None:
    """Per-layer gate logits of the K and V branches, open ones highlighted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's plotting backend alone

    if not fuser.config.uses_gate:
        return
    logits = np.asarray(fuser.projectors.gate_logit[...], np.float32)
    layers = np.arange(logits.shape[0])
    fig = Figure(figsize=(max(6, 0.3 * len(layers)), 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for branch, (name, offset, marker) in enumerate((("K", -0.2, "o"), ("V", 0.2, "s"))):
        values = logits[:, branch]
        colors = ["tab:green" if v > 0 else "tab:gray" for v in values]
        ax.bar(layers + offset, values, width=0.4, color=colors, edgecolor="black")
        # A marker at each value, so a logit at (or near) 0 is still seen.
        ax.scatter(layers + offset, values, c=colors, marker=marker, edgecolors="black", zorder=3, label=name)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(layers[:: max(1, len(layers) // 16)])  # whole layer numbers only
    ax.legend(loc="best", fontsize="small")
    ax.set_xlabel("receiver layer")
    ax.set_ylabel("gate logit (open if > 0)")
    ax.set_title(f"fuser gates: {int((logits > 0).sum())} of {logits.size} open at inference (green: logit > 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
