"""Training: only the fuser moves, resume is exact, sharding does not change the math, it learns."""

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from c2c_jax import sharding
from c2c_jax.train import loop
from c2c_jax.train.loop import train_and_evaluate
from c2c_jax.train.step import OptimSettings, make_optimizer, micro_batch_loss
from configs import tiny

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**overrides):
    config = tiny.get_config()
    config.mesh.data = 1  # one device unless a test asks for more
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        config[section][key] = value
    return config


def host(tree):
    return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


def test_one_step_moves_only_the_fuser_and_checkpoints_hold_only_the_fuser(tmp_path):
    run = loop.setup(tiny_config())
    frozen_before = host(run.frozen)
    params_before = host(run.state.params)
    batch = sharding.place_batch(next(run.train_iter), run.mesh, batch_axis=1)
    state, metrics = run.step_fn(run.state, run.frozen, batch, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(host(run.frozen))):
        np.testing.assert_array_equal(a, b)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params_before), jax.tree.leaves(host(state.params)))]
    assert all(changed), "every fuser parameter should move after one AdamW step"
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
    # Optimizer moments mirror the fuser exactly: no slot for any frozen weight.
    adam = state.opt_state[1][0]
    assert jax.tree.structure(adam.mu) == jax.tree.structure(state.params)
    fuser_shapes = {np.shape(x) for x in jax.tree.leaves(state.params)}
    assert all(np.shape(x) in fuser_shapes | {()} for x in jax.tree.leaves(state.opt_state))

    # A checkpoint holds the fuser, its optimizer state and metadata, nothing of the LLMs.
    from c2c_jax.train.checkpointer import TrainCheckpointer

    ckpt = TrainCheckpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, state, {"data": run.train_iter.state()})
    step_dir = tmp_path / "ckpt" / "1"
    assert {p.name for p in step_dir.iterdir() if p.is_dir()} == {"params", "opt_state", "meta"}
    frozen_shapes = {np.shape(x) for x in jax.tree.leaves(run.frozen)}
    stored = ocp.PyTreeCheckpointer().restore(step_dir / "opt_state")
    stored_shapes = {np.shape(x) for x in jax.tree.leaves(stored)} | {
        np.shape(x) for x in jax.tree.leaves(ocp.PyTreeCheckpointer().restore(step_dir / "params"))}
    assert stored_shapes <= fuser_shapes | {()}
    assert not (frozen_shapes - fuser_shapes) & stored_shapes
    restored, meta = ckpt.restore(run.state)
    for a, b in zip(jax.tree.leaves(host(state.params)), jax.tree.leaves(host(restored.params))):
        np.testing.assert_array_equal(a, b)
    assert meta["data"] == run.train_iter.state() and int(restored.step) == 1


def test_step_on_8_device_fsdp_mesh_equals_single_device():
    assert jax.device_count() == 8
    single = loop.setup(tiny_config(**{"train.micro_batch_size": 8}))
    sharded_config = tiny_config(**{"train.micro_batch_size": 8, "mesh.data": 4, "mesh.fsdp": 2,
                                    "mesh.shard_frozen": True, "mesh.shard_fuser": True})
    sharded = loop.setup(sharded_config)
    assert sharded.mesh.size == 8
    # Parameters really are split across the fsdp axis.
    spec = jax.tree.leaves(sharded.state.params)[3].sharding.spec
    assert "fsdp" in tuple(spec)
    results = []
    for run in (single, sharded):
        batch = sharding.place_batch(next(run.train_iter), run.mesh, batch_axis=1)
        state, metrics = run.step_fn(run.state, run.frozen, batch, jax.random.key(0))
        results.append((host(state.params), float(metrics["loss"]), float(metrics["grad_norm"]),
                        float(metrics["lr"])))
    (p1, loss1, norm1, lr), (p8, loss8, norm8, _) = results
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    np.testing.assert_allclose(norm8, norm1, rtol=1e-5)
    # Adam's first update is about lr * sign(grad) for every element; summation-order noise can only
    # flip elements whose gradient is ~eps, so 10% of one update separates noise from a wrong split.
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(b, a, atol=0.1 * lr, rtol=0)


def _train_args(workdir, steps):
    return [sys.executable, "-m", "c2c_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
            "--config.mesh.data=1", f"--config.train.max_steps={steps}", "--config.train.log_every=1",
            "--config.train.eval_every=100000", "--config.ckpt.every=3"]


def test_data_parallel_step_all_reduces_gradients_once_per_update():
    """With 4 micro-batches per update on a 2-device data mesh, the compiled step's only cross-device
    reductions are outside the accumulation loop: gradients are summed over replicas once."""
    run = loop.setup(tiny_config(**{"mesh.data": 2, "train.micro_batch_size": 2, "train.batch_size": 8}))
    batch = sharding.place_batch(next(run.train_iter), run.mesh, batch_axis=1)
    assert batch.prefix_tokens.shape[0] == 4
    hlo = run.step_fn.lower(run.state, run.frozen, batch, jax.random.key(0)).compile().as_text()
    computations = re.split(r"\n(?=\S[^\n]*\{\n)", hlo)
    reducing = [c.split("\n", 1)[0] for c in computations if re.search(r" (all-reduce|all-reduce-start|reduce-scatter)\(", c)]
    assert reducing and all(name.startswith("ENTRY") for name in reducing), reducing
    (entry,) = [c for c in computations if c.startswith("ENTRY")]
    assert " while(" in entry  # the accumulation loop is still a loop (not unrolled around the reductions)
    # The gradients' all-reduce: one tuple holding every fuser parameter's gradient.
    num_params = len(jax.tree.leaves(run.state.params))
    assert any(line.count("f32[") >= num_params for line in entry.splitlines() if "all-reduce(" in line)


def test_frozen_models_run_on_the_whole_micro_batch_not_per_replica(monkeypatch):
    """Only the fuser is mapped over data-parallel replicas. Under `vmap`, jax's cuDNN attention
    fails to batch a mask that broadcasts over heads (seen on an H200, invisible on a CPU, whose
    attention is XLA's), so every attention call of the train step must see all rows of the
    micro-batch, unmapped: the prefix passes' (`jax.nn.dot_product_attention`) and the answer
    pass's (`prefix_attention`, which binds cuDNN's primitives itself)."""
    from c2c_jax.models import decoder

    run = loop.setup(tiny_config(**{"mesh.data": 2, "train.micro_batch_size": 4, "train.batch_size": 8}))
    batch = sharding.place_batch(next(run.train_iter), run.mesh, batch_axis=1)
    rows = batch.prefix_tokens.shape[1]
    seen = {"dot_product_attention": [], "prefix_attention": []}

    def recording(name, attention):
        def record(query, *args, **kwargs):
            seen[name].append(query.shape[0])  # inside a vmap over replicas this would be rows / replicas
            return attention(query, *args, **kwargs)
        return record

    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        recording("dot_product_attention", jax.nn.dot_product_attention))
    monkeypatch.setattr(decoder, "prefix_attention", recording("prefix_attention", decoder.prefix_attention))
    jax.eval_shape(run.step_fn, run.state, run.frozen, batch, jax.random.key(0))
    assert rows == 4 and all(seen.values()), seen
    assert all(b == rows for calls in seen.values() for b in calls), seen


def test_training_loss_equals_upstreams_section_route_on_each_example_alone():
    """The train step's layout (each model's real prefix tokens packed to the left, alignment pads
    dropped, the sharer's cache moved onto the receiver's columns, no attention mask anywhere) and
    its section passes give every row the answer loss of upstream's route: each example alone in its
    own columns, with alignment pads, masked passes section by section, each fused section fused
    right after it ran, and the answer on the written cache."""
    from flax import nnx

    from c2c_jax.c2c.model import kv_pass
    from c2c_jax.c2c.prefix import PackedRows
    from c2c_jax.c2c.prompt import TrainExample
    from c2c_jax.train.batching import collate

    run = loop.setup(tiny_config())
    receiver_def, sharer_def, fuser_def = run.graphdefs
    receiver, sharer = nnx.merge(receiver_def, run.frozen[0]), nnx.merge(sharer_def, run.frozen[1])
    rng = np.random.default_rng(0)
    # A fuser far from its initialisation (the final projection starts at zero), all gates open.
    params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(p.dtype), host(run.state.params))
    params["projectors"]["gate_logit"] = np.abs(params["projectors"]["gate_logit"]) + 1.0
    fuser = nnx.merge(fuser_def, params)
    vocab = min(receiver.config.vocab_size, sharer.config.vocab_size)

    def example(split, length, receiver_pads=(), sharer_pads=()):
        valid, sharer_valid = np.ones(length, bool), np.ones(length, bool)
        valid[list(receiver_pads)] = sharer_valid[list(sharer_pads)] = False
        tokens, sharer_tokens = rng.integers(0, vocab, (2, length)).astype(np.int32)
        return TrainExample(tokens, valid, sharer_tokens, sharer_valid,
                            (np.arange(length) % 4 != 1) & valid & sharer_valid, split)

    examples = [example(9, 14, receiver_pads=(2, 3), sharer_pads=(6,)), example(12, 15),
                example(5, 12, receiver_pads=(0,), sharer_pads=(1, 4))]
    batch = collate(examples, prefix_length=16, suffix_length=8, pad_id=0, sharer_pad_id=0)
    mb = jax.tree.map(lambda x: jnp.asarray(x[0]), batch)
    loss_fn = jax.jit(functools.partial(micro_batch_loss, graphdefs=run.graphdefs))
    row_losses, _ = loss_fn(params, run.frozen, mb, None, None)

    assert batch.fused_sections == 4 and batch.trailing_section  # several fused runs, some rows end unfused
    for ex, row_loss in zip(examples, np.asarray(row_losses)):
        s, n = ex.split, ex.length
        # Upstream's route (docs/upstream_reference.md §2.3) through the cache API: the receiver extends its cache
        # one section at a time (runs of fused columns, and the columns between them) and each fused
        # section's K/V are rewritten right after it ran; the sharer never sees fusion (one pass).
        fuse = ex.fuse_mask[:s]
        bounds = [0] + [c for c in range(1, s) if fuse[c] != fuse[c - 1]] + [s]
        sharer_rows = PackedRows.pack(jnp.asarray(ex.sharer_tokens[None, :s]), jnp.arange(s)[None],
                                      jnp.asarray(ex.sharer_valid[None, :s]))
        sharer_cache = kv_pass(sharer, sharer_rows, fuser.config.sharer_depth).with_capacity(n)
        cache = receiver.init_cache(1, n)
        for a, e in zip(bounds[:-1], bounds[1:]):
            _, cache = receiver(jnp.asarray(ex.tokens[None, a:e]), jnp.arange(a, e)[None], cache,
                                jnp.asarray(ex.valid[None, a:e]))
            if fuse[a]:
                cache = fuser(sharer_cache, cache, jnp.asarray((np.arange(n) >= a) & (np.arange(n) < e))[None])
        logits, _ = receiver(jnp.asarray(ex.tokens[None, s:]), jnp.arange(s, n)[None], cache)
        logits = np.asarray(logits[0, :-1], np.float64)
        targets = ex.tokens[s + 1:]
        expected = np.sum(np.log(np.exp(logits).sum(-1)) - logits[np.arange(n - s - 1), targets])
        assert float(row_loss) == pytest.approx(expected, rel=2e-5)
    # ... and the fuser does matter to these losses.
    row_losses_closed, _ = loss_fn(loop.closed_gates(params), run.frozen, mb, None, None)
    assert np.abs(np.asarray(row_losses_closed) - np.asarray(row_losses)).min() > 1e-3


def test_killed_run_resumes_exactly(tmp_path):
    steps = 30
    full = train_and_evaluate(
        tiny_config(**{"train.max_steps": steps, "train.log_every": 1, "train.eval_every": 100000,
                       "ckpt.every": 3}), tmp_path / "full")
    losses = {h["step"]: h["loss"] for h in full["history"]}

    workdir = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(_train_args(workdir, steps), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 1800  # a guard against a hang, not a speed limit
    while not (workdir / "checkpoints" / "3").exists():
        assert proc.poll() is None and time.time() < deadline, "training died before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # mid-run, possibly mid-save
    proc.wait()
    resumed_from = ocp.CheckpointManager(workdir / "checkpoints").latest_step()
    assert resumed_from < steps, "the run finished before it could be killed; the test proves nothing"

    result = subprocess.run(_train_args(workdir, steps), cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    history = json.loads((workdir / "train_summary.json").read_text())["history"]
    assert history[0]["step"] == resumed_from + 1 and history[-1]["step"] == steps
    for h in history:
        assert h["loss"] == pytest.approx(losses[h["step"]], rel=1e-6, abs=1e-7), h["step"]


def test_damaged_latest_checkpoint_resumes_from_the_newest_intact_one(tmp_path, caplog):
    overrides = {"train.log_every": 1, "train.eval_every": 100000, "ckpt.every": 3, "ckpt.async_save": False}
    first = train_and_evaluate(tiny_config(**{**overrides, "train.max_steps": 6}), tmp_path)
    losses = {h["step"]: h["loss"] for h in first["history"]}
    # Truncate the largest array file of the newest checkpoint, as a crash mid-write or a full disk leaves it.
    files = [p for p in (tmp_path / "checkpoints" / "6" / "params").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])

    with caplog.at_level("WARNING"):
        resumed = train_and_evaluate(tiny_config(**{**overrides, "train.max_steps": 6}), tmp_path)
    assert [h["step"] for h in resumed["history"]] == [4, 5, 6]
    for h in resumed["history"]:  # steps 4-6 again, from step 3's checkpoint: the same losses
        assert h["loss"] == pytest.approx(losses[h["step"]], rel=1e-6, abs=1e-7), h["step"]
    warning = next(r.getMessage() for r in caplog.records if "damaged" in r.getMessage())
    assert "checkpoints/6" in warning and len(warning.splitlines()) == 1
    # Nothing is lost: the damaged checkpoint is kept aside, and step 6 was saved again.
    assert (tmp_path / "checkpoints" / "damaged" / "6" / "params").is_dir()
    assert sorted(ocp.CheckpointManager(tmp_path / "checkpoints").all_steps()) == [3, 6]


def test_tiny_fuser_overfits_a_small_set(tmp_path):
    config = tiny_config(**{
        "data.max_rows": 8, "data.eval_fraction": 0.0, "train.max_steps": 150, "train.micro_batch_size": 8,
        "train.log_every": 1, "train.eval_every": 100000, "ckpt.every": 100000, "optim.lr": 3e-3,
        "optim.warmup_fraction": 0.05, "fuser.dropout": 0.0, "fuser.hidden_dim": 64, "fuser.intermediate_dim": 128})
    history = train_and_evaluate(config, tmp_path)["history"]
    first, last = history[0]["loss"], np.mean([h["loss"] for h in history[-5:]])
    assert first / last >= 5, (first, last)
    assert (tmp_path / "final" / "fuser.safetensors").exists() and (tmp_path / "gates.png").exists()
    # Running a finished run again changes nothing and reports what it did.
    assert train_and_evaluate(config, tmp_path)["history"] == history


def test_url_workdir_is_a_clear_error():
    with pytest.raises(ValueError, match="Mount the bucket"):
        train_and_evaluate(tiny_config(), "gs://bucket/run")


def test_bad_batch_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="not a multiple of train.micro_batch_size"):
        loop.setup(tiny_config(**{"train.batch_size": 10, "train.micro_batch_size": 4}))
    with pytest.raises(ValueError, match="does not fit the 8 available devices"):
        loop.setup(tiny_config(**{"mesh.data": 16}))


@pytest.mark.parametrize("module", ["train", "evaluate", "generate"])
def test_unknown_config_override_is_a_clear_error(tmp_path, module):
    result = subprocess.run(
        [sys.executable, "-m", f"c2c_jax.{module}", "--config=configs/tiny.py", "--config.fuser.hiden_dim=8",
         f"--workdir={tmp_path}" if module == "train" else "--config.eval.limit=1"],
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: --config.fuser.hiden_dim: the config has no field 'fuser.hiden_dim'"), message
    assert "did you mean 'hidden_dim'?" in message and "config.fuser has: " in message and "intermediate_dim" in message


def test_gate_lr_multiplier_scales_only_the_gate_updates_decay_included():
    import ml_collections

    from c2c_jax.config import default_config

    params = {"projectors": {"gate_logit": jnp.asarray([0.5, -0.2]), "kernel": jnp.ones((2, 3))}}
    grads = jax.tree.map(lambda p: 0.01 * jnp.arange(1, p.size + 1, dtype=jnp.float32).reshape(p.shape), params)
    updates = {}
    for multiplier in (1.0, 10.0):
        optim = ml_collections.ConfigDict(default_config().optim.to_dict())
        optim.update(gate_lr_multiplier=multiplier, warmup_fraction=0.0)
        tx = make_optimizer(OptimSettings.from_config(optim), total_steps=10)
        updates[multiplier], _ = tx.update(grads, tx.init(params), params)
    base, scaled = updates[1.0]["projectors"], updates[10.0]["projectors"]
    np.testing.assert_allclose(scaled["gate_logit"], 10 * base["gate_logit"], rtol=1e-6)
    np.testing.assert_array_equal(scaled["kernel"], base["kernel"])
    # The decoupled weight decay (lr * wd * param) is part of the gates' update, as in a torch param group.
    optim.update(gate_lr_multiplier=10.0, weight_decay=0.5)
    tx = make_optimizer(OptimSettings.from_config(optim), total_steps=10)
    zero = jax.tree.map(jnp.zeros_like, grads)
    decayed, _ = tx.update(zero, tx.init(params), params)
    # (step 0 with no warmup runs at the full lr)
    np.testing.assert_allclose(decayed["projectors"]["gate_logit"],
                               -10 * optim.lr * 0.5 * params["projectors"]["gate_logit"], rtol=1e-5)


def test_patience_stops_after_evaluations_without_gain_and_keeps_the_best_fuser(tmp_path, monkeypatch):
    from c2c_jax.infer.fuser_io import flat_params, load_fuser

    # The held-out losses the run sees: the receiver alone's before the first step, then at steps 2, 4, 6,
    # 8, ...: lowest at step 4, then two without gain.
    held_out = iter([4.0, 3.0, 2.0, 2.5, 2.6, 1.0, 1.0])
    monkeypatch.setattr(loop, "evaluate_loss", lambda run, params: next(held_out))
    config = tiny_config(**{"train.max_steps": 20, "train.eval_every": 2, "train.patience": 2, "train.log_every": 1,
                            "ckpt.every": 2, "ckpt.keep": 10, "ckpt.async_save": False, "optim.lr": 1e-2})
    summary = train_and_evaluate(config, tmp_path)
    assert summary["stopped_at"] == 8 and summary["best"] == {"step": 4, "eval_loss": 2.0}
    assert summary["history"][-1]["step"] == 8

    def fingerprint(arrays):
        return sorted((a.shape, np.asarray(a, np.float32).tobytes()) for a in map(np.asarray, arrays))

    manager = ocp.CheckpointManager(tmp_path / "checkpoints")
    checkpointed = {step: jax.tree.leaves(manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore()))["params"]) for step in (4, 8)}
    final = fingerprint(flat_params(load_fuser(tmp_path / "final")).values())
    assert final == fingerprint(checkpointed[4])  # `final` is step 4's fuser,
    assert final != fingerprint(checkpointed[8])  # not the last one's
    assert final == fingerprint(flat_params(load_fuser(tmp_path / "best")).values())
    # A run that stopped is not restarted.
    assert train_and_evaluate(config, tmp_path)["stopped_at"] == 8


def test_the_receiver_alones_held_out_loss_is_measured_before_training(tmp_path):
    """The baseline a fuser's held-out loss is read against: the receiver without fusion, even when the run
    starts from a fuser whose gates are open (`fuser.init_from`)."""
    from c2c_jax import build
    from c2c_jax.infer.fuser_io import save_fuser
    from c2c_jax.models import load_model

    config = tiny_config(**{"train.max_steps": 2, "train.eval_every": 2, "ckpt.async_save": False})
    receiver, sharer = load_model(config.receiver.path), load_model(config.sharer.path)
    opened = build.new_fuser(config, receiver, sharer)
    opened.projectors.gate_logit[...] = jnp.ones_like(opened.projectors.gate_logit[...])
    save_fuser(opened, tmp_path / "opened")
    config.fuser.init_from = str(tmp_path / "opened")
    summary = train_and_evaluate(config, tmp_path / "run")
    # Independently: a fuser whose output projections are zero adds nothing, whatever its gates.
    silent = tiny_config()
    silent.fuser.zero_init = True
    run = loop.setup(silent)
    params = host(run.state.params)
    params["projectors"]["gate_logit"] = np.ones_like(params["projectors"]["gate_logit"])  # open, yet silent
    receiver_alone = loop.evaluate_loss(run, params)
    assert summary["receiver_eval_loss"] == pytest.approx(receiver_alone, rel=1e-5)
    # With its gates open the starting fuser does change the loss (so closing them was needed).
    with_open_gates = loop.evaluate_loss(run, host(loop.setup(config).state.params))
    assert abs(with_open_gates - receiver_alone) > 1e-4
