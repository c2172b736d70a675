"""Decode-time fusion (upstream's `include_response`, docs/upstream_reference.md §2.6) against a PyTorch lockstep decode.

The reference is upstream's route on transformers' models (same tiny random configs) and the NumPy
fuser: the prompt but its last token is fused from the receiver's unfused pass; then for the last
prompt token and every generated token, the receiver extends its unfused cache, the sharer its own,
the fuser maps the new token's K/V, and the receiver's real step on the fused cache uses those fused
K/V in every layer (upstream patches the attention; here the cache's `update` swaps them in, which is
where the attention takes the new K/V from).
"""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from c2c_jax.c2c.fuser import Fuser, FuserConfig
from c2c_jax.c2c.layer_map import layer_map
from c2c_jax.c2c.model import C2CModel
from c2c_jax.c2c.prompt import PromptEncoder
from c2c_jax.infer.decode import SamplingConfig
from c2c_jax.infer.fuser_io import export_upstream_fuser, import_upstream_fuser, load_fuser, save_fuser
from c2c_jax.infer.generator import Generator
from c2c_jax.models import load_model, load_tokenizer
from reference_c2c import reference_fuse
from tiny_models import make_tiny_model, make_tiny_tokenizer

FAMILY_SHAPES = {"qwen3": (2, 24), "llama3": (2, 16)}  # receiver (kv heads, head dim) in tiny_models


@pytest.fixture(scope="module", params=sorted(FAMILY_SHAPES))
def lockstep_pair(request, tmp_path_factory):
    """Each receiver family's pair, for the reference test."""
    return _make_pair(request.param, tmp_path_factory.mktemp(f"lockstep_{request.param}"))


@pytest.fixture(scope="module")
def qwen3_pair(tmp_path_factory):
    """One pair, for the tests whose subject is not the receiver's family."""
    return _make_pair("qwen3", tmp_path_factory.mktemp("lockstep_one"))


def _make_pair(family, root):
    torch_receiver = make_tiny_model(family, root / "receiver")
    torch_sharer = make_tiny_model("qwen2", root / "sharer", seed=1, num_hidden_layers=2, num_key_value_heads=4)
    for d in ("receiver", "sharer"):
        make_tiny_tokenizer(root / d)
    heads, head_dim = FAMILY_SHAPES[family]
    config = FuserConfig(
        receiver_layers=3, receiver_kv_heads=heads, receiver_head_dim=head_dim, sharer_kv_heads=4, sharer_head_dim=16,
        layer_map=layer_map("terminal", 3, 2), hidden_dim=32, intermediate_dim=48, dtype="float32",
        include_response=True)
    fuser = Fuser(config, rngs=nnx.Rngs(3))
    fuser.projectors.gate_logit[...] = jnp.array([[0.5, 1.0], [-0.5, 2.0], [1.5, 0.1]])
    export_upstream_fuser(fuser, root / "upstream", dtype="float32")
    dicts = [{k: v.numpy() for k, v in torch.load(root / "upstream" / f"projector_{i}.pt").items()} for i in range(3)]
    return dict(root=root, torch_receiver=torch_receiver, torch_sharer=torch_sharer, fuser=fuser, dicts=dicts,
                receiver=load_model(root / "receiver", dtype=jnp.float32),
                sharer=load_model(root / "sharer", dtype=jnp.float32), tokenizer=load_tokenizer(root / "receiver"))


def _layers(cache):
    return (np.stack([layer.keys.numpy() for layer in cache.layers]).transpose(0, 1, 3, 2, 4),
            np.stack([layer.values.numpy() for layer in cache.layers]).transpose(0, 1, 3, 2, 4))


def _to_torch(x):  # [B, T, H, D] -> HF's [B, H, T, D]
    return torch.tensor(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))


def torch_lockstep(pair, prompt: np.ndarray, steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits of each step, upstream's include_response route at batch 1."""
    receiver, sharer, layers = pair["torch_receiver"], pair["torch_sharer"], pair["fuser"].config.layer_map
    unfused, shared = transformers.DynamicCache(), transformers.DynamicCache()

    def run(model, tokens, cache, start):
        with torch.no_grad():
            return model(input_ids=torch.tensor(tokens[None], dtype=torch.long), past_key_values=cache,
                         position_ids=torch.arange(start, start + len(tokens))[None], use_cache=True).logits

    n = len(prompt) - 1
    run(receiver, prompt[:n], unfused, 0)
    run(sharer, prompt[:n], shared, 0)
    fused = copy.deepcopy(unfused)
    rk, rv = _layers(unfused)
    sk, sv = _layers(shared)
    fk, fv = reference_fuse(pair["dicts"], layers, sk, sv, rk, rv, np.ones((1, n), bool))
    for layer in range(len(fused.layers)):
        fused.layers[layer].keys[...] = _to_torch(fk[layer])
        fused.layers[layer].values[...] = _to_torch(fv[layer])
    token, position, tokens, all_logits = int(prompt[-1]), n, [], []
    for _ in range(steps):
        run(receiver, np.array([token]), unfused, position)
        run(sharer, np.array([token]), shared, position)
        rk, rv = _layers(unfused)
        sk, sv = _layers(shared)
        new_k, new_v = reference_fuse(pair["dicts"], layers, sk[:, :, -1:], sv[:, :, -1:], rk[:, :, -1:],
                                      rv[:, :, -1:], np.ones((1, 1), bool))
        update = fused.update

        def fused_update(key_states, value_states, layer_idx, *args, **kwargs):
            return update(_to_torch(new_k[layer_idx]), _to_torch(new_v[layer_idx]), layer_idx, *args, **kwargs)

        fused.update = fused_update
        logits = run(receiver, np.array([token]), fused, position)[0, -1].numpy()
        del fused.update
        token, position = int(np.argmax(logits)), position + 1
        tokens.append(token)
        all_logits.append(logits)
    return tokens, all_logits


def test_decode_time_fusion_matches_a_pytorch_lockstep_decode(lockstep_pair):
    pair = lockstep_pair
    model = C2CModel(pair["receiver"], [pair["sharer"]], [pair["fuser"]])
    assert model.include_response
    gen = Generator(model, PromptEncoder(pair["tokenizer"], [pair["tokenizer"]], pad_to=8))
    prompts = [np.random.default_rng(1).integers(4, 149, 11), np.random.default_rng(2).integers(4, 149, 6)]
    batch = gen.encoder.batch([gen.encoder.encode_ids(p) for p in prompts])
    steps = 5
    out = jax.device_get(gen.generate_batch(batch, SamplingConfig(max_new_tokens=steps)))
    first = np.asarray(gen.next_token_logits(batch))
    # Our decode step by step (eager), fed the reference's tokens, for per-step logits.
    caches = model.prompt_cache(batch)
    logits, caches = model.finish_prompt(batch, caches, 64)
    step = model.decode_step(batch)
    ours_steps = [np.asarray(logits)]
    references = [torch_lockstep(pair, p, steps) for p in prompts]
    for k in range(steps - 1):
        tokens = jnp.asarray([[ref[0][k]] for ref in references])
        positions = batch.positions[:, -1:] + 1 + k
        logits, caches = step(caches, tokens, positions)
        ours_steps.append(np.asarray(logits[:, 0]))
    for row, (tokens, ref_logits) in enumerate(references):
        np.testing.assert_array_equal(out.tokens[row], tokens)
        np.testing.assert_allclose(first[row], ref_logits[0], atol=1e-5, rtol=0)
        for k in range(steps):
            np.testing.assert_allclose(ours_steps[k][row], ref_logits[k], atol=1e-5, rtol=0)
    # Without decode-time fusion (the same weights, trained without it) the logits differ.
    plain = Fuser(dataclasses.replace(pair["fuser"].config, include_response=False), rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(pair["fuser"]))
    plain_gen = Generator(C2CModel(pair["receiver"], [pair["sharer"]], [plain]), gen.encoder)
    assert np.abs(np.asarray(plain_gen.next_token_logits(batch)) - first).max() > 1e-3


def test_decode_time_fusion_is_recognised_on_import_and_kept_on_save(qwen3_pair, tmp_path):
    pair = qwen3_pair
    imported = import_upstream_fuser(pair["root"] / "upstream")  # export wrote the recipe's include_response
    assert imported.config.include_response
    save_fuser(imported, tmp_path / "ours")
    assert load_fuser(tmp_path / "ours").config.include_response
    (pair["root"] / "upstream" / "config.json").unlink()
    run_root = tmp_path / "run"
    (run_root / "final").mkdir(parents=True)
    for f in (pair["root"] / "upstream").iterdir():
        (run_root / "final" / f.name).write_bytes(f.read_bytes())
    assert not import_upstream_fuser(run_root / "final").config.include_response
    # Upstream keeps the recipe (with model.include_response) in the run root, above final/.
    (run_root / "config.json").write_text('{"model": {"base_model": "Qwen/Qwen3-0.6B", "include_response": true}}')
    assert import_upstream_fuser(run_root / "final").config.include_response


def test_a_fuser_is_used_only_the_way_it_was_trained(qwen3_pair):
    pair = qwen3_pair
    with pytest.raises(ValueError, match="trained with decode-time fusion .* cannot be used without it"):
        C2CModel(pair["receiver"], [pair["sharer"]], [pair["fuser"]], include_response=False)
    plain = Fuser(dataclasses.replace(pair["fuser"].config, include_response=False), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="trained without decode-time fusion .* cannot be used with it"):
        C2CModel(pair["receiver"], [pair["sharer"]], [plain], include_response=True)
    with pytest.raises(ValueError, match="fusers disagree on decode-time fusion"):
        C2CModel(pair["receiver"], [pair["sharer"]] * 2, [pair["fuser"], plain])


def test_training_with_decode_time_fusion_is_the_lockstep_route_teacher_forced(qwen3_pair):
    """fuser.include_response training: each answer token's loss is that of the lockstep decode
    (checked against PyTorch above) fed the answer, from the same fuser."""
    from c2c_jax.c2c.prompt import TrainExample
    from c2c_jax.train.batching import collate
    from c2c_jax.train.step import micro_batch_loss

    pair = qwen3_pair
    tokens = np.random.default_rng(3).integers(4, 149, 14).astype(np.int32)
    s, n = 8, 14
    valid = np.ones(n, bool)
    example = TrainExample(tokens, valid, tokens, valid, valid, s)
    mb = jax.tree.map(lambda x: jnp.asarray(x[0]), collate([example], prefix_length=16, suffix_length=8, pad_id=0,
                                                           sharer_pad_id=0))
    graphdefs, states = zip(*(nnx.split(m) for m in (pair["receiver"], pair["sharer"], pair["fuser"])))
    row_losses, count = micro_batch_loss(nnx.to_pure_dict(states[2]), states[:2], mb, None, None,
                                                 graphdefs=graphdefs)
    assert int(count) == n - s - 1

    model = C2CModel(pair["receiver"], [pair["sharer"]], [pair["fuser"]])
    encoder = PromptEncoder(pair["tokenizer"], [pair["tokenizer"]], pad_to=1)
    batch = encoder.batch([encoder.encode_ids(tokens[:s + 1])])
    logits, caches = model.finish_prompt(batch, model.prompt_cache(batch), 32)
    step = model.decode_step(batch)
    expected = 0.0
    for k in range(s + 1, n):
        row = np.asarray(logits, np.float64).reshape(-1)
        expected += np.log(np.exp(row - row.max()).sum()) + row.max() - row[tokens[k]]
        if k < n - 1:
            logits, caches = step(caches, jnp.asarray([[tokens[k]]]), jnp.asarray([[k]]))
    assert float(row_losses[0]) == pytest.approx(expected, rel=2e-5)


def test_a_train_step_with_decode_time_fusion_moves_the_fuser_and_saves_the_mode(tmp_path):
    from c2c_jax import sharding
    from c2c_jax.train import loop
    from test_train import host, tiny_config

    run = loop.setup(tiny_config(**{"fuser.include_response": True}))
    assert run.fuser_template.config.include_response
    before = host(run.state.params)
    batch = sharding.place_batch(next(run.train_iter), run.mesh, batch_axis=1)
    state, metrics = run.step_fn(run.state, run.frozen, batch, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"]))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(host(state.params))))
    save_fuser(nnx.merge(run.graphdefs[2], host(state.params)), tmp_path / "final")
    assert load_fuser(tmp_path / "final").config.include_response
