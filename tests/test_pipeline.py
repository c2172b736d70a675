"""Fused inference against an independent route: PyTorch models + NumPy fuser + PyTorch decode step."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from c2c_jax.c2c.fuser import FuserCheckpointError
from c2c_jax.c2c.fuser import Fuser, FuserConfig
from c2c_jax.c2c.layer_map import layer_map
from c2c_jax.c2c.model import C2CModel, kv_pass
from c2c_jax.c2c.prefix import PackedRows
from c2c_jax.c2c.prompt import own_positions
from c2c_jax.c2c.prompt import PromptEncoder
from c2c_jax.infer.decode import SamplingConfig, sample_tokens
from c2c_jax.infer.fuser_io import export_upstream_fuser
from c2c_jax.infer.generator import Generator
from c2c_jax.models import load_model, load_tokenizer
from reference_c2c import reference_fuse
from tiny_models import make_tiny_model, make_tiny_tokenizer, torch_forward


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Receiver: tiny Qwen3 (3 layers); sharer: tiny Qwen2 (2 layers, other head shapes); same tokenizer."""
    root = tmp_path_factory.mktemp("pair")
    torch_receiver = make_tiny_model("qwen3", root / "receiver")
    torch_sharer = make_tiny_model("qwen2", root / "sharer", seed=1, num_hidden_layers=2, num_key_value_heads=4)
    for d in ("receiver", "sharer"):
        make_tiny_tokenizer(root / d)
    receiver = load_model(root / "receiver", dtype=jnp.float32)
    sharer = load_model(root / "sharer", dtype=jnp.float32)
    config = FuserConfig(
        receiver_layers=3, receiver_kv_heads=2, receiver_head_dim=24, sharer_kv_heads=4, sharer_head_dim=16,
        layer_map=layer_map("terminal", 3, 2), hidden_dim=32, intermediate_dim=48, dtype="float32")
    fuser = Fuser(config, rngs=nnx.Rngs(3))
    # Open every gate but layer 1's key gate.
    fuser.projectors.gate_logit[...] = jnp.array([[0.5, 1.0], [-0.5, 2.0], [1.5, 0.1]])
    tokenizer = load_tokenizer(root / "receiver")
    return dict(root=root, torch_receiver=torch_receiver, torch_sharer=torch_sharer, receiver=receiver,
                sharer=sharer, fuser=fuser, tokenizer=tokenizer)


def generator(pair, fuser=None, **encoder_kwargs):
    model = C2CModel(pair["receiver"], [pair["sharer"]], [fuser or pair["fuser"]])
    encoder = PromptEncoder(pair["tokenizer"], [pair["tokenizer"]], **encoder_kwargs)
    return Generator(model, encoder)


@pytest.mark.parametrize("suffix_length", [1, 3])
def test_next_token_logits_match_independent_reference(pair, tmp_path, suffix_length):
    tokens = np.random.default_rng(0).integers(4, 149, (1, 12))
    split = 12 - suffix_length
    # Reference: PyTorch prefix passes, NumPy fusion, PyTorch pass of the suffix on the fused DynamicCache.
    _, rk, rv = torch_forward(pair["torch_receiver"], tokens[:, :split])
    _, sk, sv = torch_forward(pair["torch_sharer"], tokens[:, :split])
    export_upstream_fuser(pair["fuser"], tmp_path / "up", dtype="float32")
    dicts = [{k: v.numpy() for k, v in torch.load(tmp_path / "up" / f"projector_{i}.pt").items()} for i in range(3)]
    fk, fv = reference_fuse(dicts, pair["fuser"].config.layer_map, sk, sv, rk, rv, np.ones((1, split), bool))
    cache = transformers.DynamicCache()
    for layer in range(3):
        cache.update(torch.tensor(fk[layer].transpose(0, 2, 1, 3)), torch.tensor(fv[layer].transpose(0, 2, 1, 3)),
                     layer)
    with torch.no_grad():
        ref = pair["torch_receiver"](input_ids=torch.tensor(tokens[:, split:]),
                                     position_ids=torch.arange(split, 12)[None], past_key_values=cache
                                     ).logits[:, -1].numpy()

    gen = generator(pair, pad_to=1)
    batch = gen.encoder.batch([gen.encoder.encode_ids(tokens[0])])
    ours = gen.next_token_logits(batch, suffix_length=suffix_length)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    receiver_only, _, _ = torch_forward(pair["torch_receiver"], tokens)
    assert np.abs(np.asarray(ours) - receiver_only[:, -1]).max() > 1e-3  # fusion really changed the answer
    np.testing.assert_allclose(gen.next_token_logits(batch, fuse=False, suffix_length=suffix_length),
                               receiver_only[:, -1], atol=1e-4, rtol=0)


def test_kv_pass_over_padding_matches_transformers_on_each_rows_real_tokens(pair):
    """Leading padding and padding inside a row (as token alignment inserts): every real column's K/V
    equal transformers' over that row's real tokens alone, and `valid` is kept."""
    rng = np.random.default_rng(5)
    valid = np.ones((3, 14), bool)
    valid[0, :4] = False  # left padding
    valid[1, [0, 5, 6, 11]] = False  # leading and inner pads
    tokens = rng.integers(4, 149, valid.shape)
    positions = own_positions(valid)
    rows = PackedRows.pack(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid))
    cache = kv_pass(pair["receiver"], rows, 3)
    np.testing.assert_array_equal(cache.valid, valid)
    for row in range(3):
        _, k, v = torch_forward(pair["torch_receiver"], tokens[row, valid[row]][None])
        np.testing.assert_allclose(np.asarray(cache.k)[:, row, valid[row]], k[:, 0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(cache.v)[:, row, valid[row]], v[:, 0], atol=1e-5, rtol=0)


def test_closed_gates_give_receiver_only_logits_exactly(pair):
    closed = Fuser(pair["fuser"].config, rngs=nnx.Rngs(4))
    closed.projectors.gate_logit[...] = jnp.array([[0.0, -1.0], [-0.3, 0.0], [-2.0, -0.1]])
    gen = generator(pair, closed)
    prompts = [np.random.default_rng(i).integers(4, 149, n) for i, n in enumerate((9, 17, 30))]
    batch = gen.encoder.batch([gen.encoder.encode_ids(p) for p in prompts])
    np.testing.assert_array_equal(gen.next_token_logits(batch), gen.next_token_logits(batch, fuse=False))


def test_batched_generation_equals_per_prompt(pair):
    gen = generator(pair, pad_to=16)
    chats = [[{"role": "user", "content": "what is the capital of france ?"}],
             [{"role": "system", "content": "you are good"}, {"role": "user", "content": "one two three"},
              {"role": "assistant", "content": "four five"}, {"role": "user", "content": "why is the sun red"}],
             [{"role": "user", "content": "hello"}]]
    sampling = SamplingConfig(max_new_tokens=6)
    batch = gen.encoder.batch([gen.encoder.encode_chat(c) for c in chats])
    together = jax.device_get(gen.generate_batch(batch, sampling))
    for r, chat in enumerate(chats):
        alone = jax.device_get(gen.generate_batch(gen.encoder.batch([gen.encoder.encode_chat(chat)]), sampling))
        np.testing.assert_array_equal(together.tokens[r], alone.tokens[0])
        assert together.lengths[r] == alone.lengths[0]
    # Greedy generation is the argmax chain of the fused model, step by step.
    logits = gen.next_token_logits(batch)
    np.testing.assert_array_equal(together.tokens[:, 0], np.argmax(logits, -1))


def test_generation_stops_at_eos_and_pads(pair):
    gen = generator(pair, pad_to=8)
    batch = gen.encoder.batch([gen.encoder.encode_ids(np.arange(5, 20))])
    first = int(np.argmax(gen.next_token_logits(batch), -1)[0])
    gen.eos_ids = (first,)  # the very first token ends the answer
    out = jax.device_get(gen.generate_batch(batch, SamplingConfig(max_new_tokens=5)))
    assert out.lengths[0] == 1 and out.tokens[0, 0] == first
    assert np.all(out.tokens[0, 1:] == gen.encoder.pad_id)


def test_generation_stops_on_every_eos_id_of_generation_config(pair, tmp_path):
    """config.json names one eos id, generation_config.json two: generation stops at either, as
    transformers' `generate` (which reads generation_config.json) does."""
    import shutil

    prompt = np.random.default_rng(4).integers(4, 149, 12)
    with torch.no_grad():
        free = pair["torch_receiver"].generate(torch.tensor(prompt[None]), max_new_tokens=10, do_sample=False,
                                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].numpy()
    # Stop on the first greedy token after the first that is new (the tiny model repeats itself; else
    # on the first token), named only by generation_config.json.
    n = next((k for k in range(1, len(free)) if free[k] not in free[:k]), 0) + 1
    stop = int(free[n - 1])
    directory = tmp_path / "receiver"
    shutil.copytree(pair["root"] / "receiver", directory)
    config = json.loads((directory / "config.json").read_text())
    config["eos_token_id"] = 3
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, stop]}))
    receiver = load_model(directory, dtype=jnp.float32)
    assert receiver.config.eos_token_ids == (3, stop)
    gen = Generator(C2CModel(receiver), PromptEncoder(pair["tokenizer"], pad_to=1))
    out = jax.device_get(gen.generate_batch(gen.encoder.batch([gen.encoder.encode_ids(prompt)]),
                                            SamplingConfig(max_new_tokens=10), fuse=False))
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    assert list(torch_model.generation_config.eos_token_id) == [3, stop]
    with torch.no_grad():
        ref = torch_model.generate(torch.tensor(prompt[None]), max_new_tokens=10, do_sample=False,
                                   pad_token_id=0)[0, len(prompt):].numpy()
    assert out.lengths[0] == n == len(ref)
    np.testing.assert_array_equal(out.tokens[0, :n], ref)
    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    (bad / "generation_config.json").write_text(json.dumps({"eos_token_id": "end"}))
    with pytest.raises(ValueError, match="eos_token_id must be an integer"):
        load_model(bad, dtype=jnp.float32)


def test_chat_returns_text_for_both_modes(pair):
    gen = generator(pair)
    answers = gen.chat([[{"role": "user", "content": "what is water"}]], SamplingConfig(max_new_tokens=4))
    baseline = gen.chat([[{"role": "user", "content": "what is water"}]], SamplingConfig(max_new_tokens=4), fuse=False)
    assert isinstance(answers[0], str) and isinstance(baseline[0], str)


def test_two_sharers_sequential_and_parallel(pair):
    second = Fuser(pair["fuser"].config, rngs=nnx.Rngs(9))
    second.projectors.gate_logit[...] = jnp.ones((3, 2))
    fusers = [pair["fuser"], second]
    encoder = PromptEncoder(pair["tokenizer"], [pair["tokenizer"]] * 2, pad_to=1)
    batch = encoder.batch([encoder.encode_ids(np.arange(4, 20))])
    sequential = C2CModel(pair["receiver"], [pair["sharer"]] * 2, fusers, multi_sharer_mode="sequential")
    parallel = C2CModel(pair["receiver"], [pair["sharer"]] * 2, fusers, multi_sharer_mode="parallel")
    receiver_cache, sharer_caches = sequential.prefill_kv(batch.prefix())
    mask = batch.fuse_mask[0]
    once = fusers[0](sharer_caches[0], receiver_cache, mask)
    chained = fusers[1](sharer_caches[1], once, mask)
    np.testing.assert_allclose(sequential.fuse(receiver_cache, sharer_caches, [mask, mask]).k, chained.k, atol=1e-6)
    other = fusers[1](sharer_caches[1], receiver_cache, mask)
    summed = receiver_cache.k + (once.k - receiver_cache.k) + (other.k - receiver_cache.k)
    np.testing.assert_allclose(parallel.fuse(receiver_cache, sharer_caches, [mask, mask]).k, summed, atol=1e-5)
    assert np.abs(np.asarray(summed) - np.asarray(chained.k)).max() > 1e-4  # the modes do differ


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.key(0)
    greedy = sample_tokens(logits, keys, SamplingConfig())
    assert np.all(np.asarray(greedy) == 0)
    top1 = sample_tokens(logits, keys, SamplingConfig(temperature=1.0, top_k=1))
    assert np.all(np.asarray(top1) == 0)
    top2 = np.asarray(sample_tokens(logits, keys, SamplingConfig(temperature=1.0, top_k=2)))
    assert set(top2) == {0, 1} and abs((top2 == 0).mean() - 0.5 / 0.8) < 0.03
    # top_p 0.8: cumulative 0.5, 0.8 are kept, 0.95 is not.
    nucleus = np.asarray(sample_tokens(logits, keys, SamplingConfig(temperature=1.0, top_p=0.8)))
    assert set(nucleus) == {0, 1}
    free = np.asarray(sample_tokens(logits, keys, SamplingConfig(temperature=1.0)))
    np.testing.assert_allclose(np.bincount(free, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_bad_inputs_are_clear_errors(pair):
    wrong = Fuser(dataclasses.replace(pair["fuser"].config, receiver_head_dim=16), rngs=nnx.Rngs(0))
    with pytest.raises(FuserCheckpointError, match="another model pair"):
        C2CModel(pair["receiver"], [pair["sharer"]], [wrong])
    with pytest.raises(ValueError, match="each sharer needs its fuser"):
        C2CModel(pair["receiver"], [pair["sharer"]], [])
    gen = generator(pair)
    long = gen.encoder.batch([gen.encoder.encode_ids(np.arange(250) % 140 + 4)])
    with pytest.raises(ValueError, match="exceeds the receiver's context of 256 tokens"):
        gen.generate_batch(long, SamplingConfig(max_new_tokens=16))
    with pytest.raises(ValueError, match="does not fit the batch width"):
        gen.encoder.batch([gen.encoder.encode_ids(np.arange(30))], width=16)
