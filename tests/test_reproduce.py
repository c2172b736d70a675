"""`reproduce="upstream"`: upstream's training recipe where c2c_jax's defaults differ (docs/upstream.md).

References: torch.optim.AdamW on bfloat16 parameters (upstream's optimizer, as its trainer runs it),
upstream's loss normalisation written out as its loop computes it, and the epoch permutation itself
for uniform shuffling.
"""

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import pytest
import torch
import transformers

from c2c_jax import sharding
from c2c_jax.config import UPSTREAM_TRAINING, resolve_reproduce
from c2c_jax.train import loop
from c2c_jax.train.batching import BatchIterator
from c2c_jax.train.step import OptimSettings, loss_weights, make_optimizer, make_schedule
from test_data import ITER, _examples, _ids
from test_train import tiny_config


def test_reproduce_upstream_sets_every_upstream_setting_and_nothing_else():
    config = tiny_config()
    resolved = resolve_reproduce(ml_collections.ConfigDict(dict(config, reproduce="upstream")))
    for dotted, value in UPSTREAM_TRAINING.items():
        section, key = dotted.split(".")
        assert resolved[section][key] == value
    assert config.train.param_dtype == "float32"  # the caller's config is left alone
    assert resolve_reproduce(config).to_dict() == config.to_dict()
    optim = resolved.optim
    schedule = make_schedule(OptimSettings.from_config(optim), 100)  # HF's linear schedule with warmup, as upstream steps it
    hf = transformers.get_linear_schedule_with_warmup(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr), num_warmup_steps=10,
        num_training_steps=100)
    for step in range(100):
        assert float(schedule(step)) == pytest.approx(hf.get_last_lr()[0], rel=1e-6, abs=1e-12)
        hf.optimizer.step()
        hf.step()
    with pytest.raises(ValueError, match="unknown reproduce mode 'paper'"):
        resolve_reproduce(ml_collections.ConfigDict(dict(config, reproduce="paper")))


@pytest.mark.parametrize("micro_batch_size", [2, 4, 8])
def test_reference_loss_is_upstreams_mean_of_group_token_means_at_any_micro_batch_size(micro_batch_size):
    """Upstream: per GPU a micro-batch of 4 sequences, its loss the token mean; the loss is divided by
    the accumulation steps and averaged over GPUs, i.e. the mean of the 4-sequence token means."""
    rng = np.random.default_rng(0)
    rows, r = 16, 7
    mask = rng.random((rows, r)) < 0.6
    token_losses = rng.random((rows, r)) * mask
    groups = [slice(g, g + 4) for g in range(0, rows, 4)]
    upstream = np.mean([token_losses[g].sum() / mask[g].sum() for g in groups])
    shape = (rows // micro_batch_size, micro_batch_size)
    weights = loss_weights(jnp.asarray(mask.reshape(*shape, r)), "reference", 4)
    ours = float(jnp.sum(weights * token_losses.sum(-1).reshape(shape)))
    assert ours == pytest.approx(upstream, rel=1e-6)
    tokens = loss_weights(jnp.asarray(mask.reshape(*shape, r)), "tokens")
    assert float(jnp.sum(tokens * token_losses.sum(-1).reshape(shape))) == pytest.approx(
        token_losses.sum() / mask.sum(), rel=1e-6)
    assert abs(upstream - token_losses.sum() / mask.sum()) > 1e-3  # the two normalisations differ here


def test_bfloat16_adamw_matches_torch_adamw_on_bfloat16_parameters():
    """Parameters, gradients and both moments in bfloat16 with no float32 copy, as upstream trains;
    updates below half a bfloat16 step are then lost, unlike with float32 master weights."""
    optim = tiny_config().optim.copy_and_resolve_references()
    optim.update(lr=1e-4, warmup_fraction=0.0, clip_norm=1e9, weight_decay=0.01)
    total = 10**6  # the linear decay barely moves the learning rate over the few steps here
    tx = make_optimizer(OptimSettings.from_config(optim), total)
    rng = np.random.default_rng(0)
    start = np.concatenate([[0.03, -0.03, 0.5], rng.normal(size=61) * 0.2]).astype(np.float32)
    params = {"w": jnp.asarray(start, jnp.bfloat16)}
    state = tx.init(params)
    torch_param = torch.nn.Parameter(torch.tensor(start).to(torch.bfloat16))
    torch_opt = torch.optim.AdamW([torch_param], lr=1e-4, betas=(optim.b1, optim.b2), eps=optim.eps,
                                  weight_decay=0.01, foreach=False)
    schedule = make_schedule(OptimSettings.from_config(optim), total)
    for step in range(5):
        grad = rng.normal(size=start.shape).astype(np.float32)
        grads = {"w": jnp.asarray(grad, jnp.bfloat16)}
        updates, state = tx.update(grads, state, params)
        params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
        for group in torch_opt.param_groups:
            group["lr"] = float(schedule(step))
        torch_param.grad = torch.tensor(grad).to(torch.bfloat16)
        torch_opt.step()
        assert params["w"].dtype == jnp.bfloat16
        assert state[1][0].mu["w"].dtype == state[1][0].nu["w"].dtype == jnp.bfloat16
        ours = np.asarray(params["w"], np.float32)
        ref = torch_param.detach().float().numpy()
        ulp = np.abs(ref) * 2.0 ** -7  # bfloat16 keeps 8 significant bits: rounding order may differ by one step
        assert np.all(np.abs(ours - ref) <= ulp + 1e-12)
    # A weight at 0.5 (bfloat16 step 2^-8) never moves at lr 1e-4; with float32 master weights it does.
    assert ours[2] == ref[2] == 0.5
    master = {"w": jnp.asarray(start)}
    master_state = tx.init(master)
    updates, _ = tx.update({"w": jnp.ones_like(master["w"])}, master_state, master)
    assert float(master["w"][2] + updates["w"][2]) != 0.5


def test_uniform_shuffle_takes_the_permutation_in_order():
    ex = _examples()
    it = BatchIterator(ex, micro_batch_size=2, micro_batches=2, shuffle="uniform", **ITER)
    fits = [i for i in np.random.default_rng([ITER["seed"], 0]).permutation(len(ex)) if ex[i].split <= 40]
    taken = []
    for _ in range(it.num_steps_per_epoch()):
        batch = next(it)
        ids = _ids(batch)
        taken += ids
        longest = max(ex[i].split for i in ids)
        assert batch.prefix_tokens.shape[-1] == min(b for b in ITER["prefix_buckets"] if b >= longest)
    assert taken == fits[:len(taken)] and len(fits) - len(taken) < 4
    bucketed = BatchIterator(ex, micro_batch_size=2, micro_batches=2, **ITER)
    assert [i for _ in range(3) for i in _ids(next(bucketed))] != fits[:12]  # the default differs
    state = it.state()
    again = BatchIterator(ex, micro_batch_size=2, micro_batches=2, shuffle="uniform", **ITER)
    again.restore(state)
    assert _ids(next(again)) == _ids(next(it))


def test_train_step_in_reproduce_mode_keeps_everything_in_bfloat16():
    config = tiny_config()
    config.reproduce = "upstream"
    config.train.micro_batch_size = 2
    run = loop.setup(config)
    assert run.config.data.shuffle == "uniform" and run.config.train.loss_normalization == "reference"
    batch = sharding.place_batch(next(run.train_iter), run.mesh, batch_axis=1)
    state, metrics = run.step_fn(run.state, run.frozen, batch, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
    moments = state.opt_state[1][0]
    assert {x.dtype for x in jax.tree.leaves((moments.mu, moments.nu))} == {jnp.dtype(jnp.bfloat16)}
    assert np.isfinite(float(metrics["loss"]))


def test_bad_training_settings_are_clear_errors():
    for field, value, message in (("train.param_dtype", "float16", "train.param_dtype must be"),
                                  ("train.loss_normalization", "mean", "train.loss_normalization must be"),
                                  ("train.reference_group_size", 3, "not a multiple of train.reference_group_size"),
                                  ("data.shuffle", "random", "data.shuffle must be")):
        config = tiny_config(**{field: value})
        if field == "train.reference_group_size":
            config.train.loss_normalization = "reference"
        with pytest.raises(ValueError, match=message):
            loop.setup(config)
