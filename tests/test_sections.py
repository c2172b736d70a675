"""Token-aligned prompts run as upstream runs them: section by section (docs/upstream_reference.md §2.3).

The reference is upstream's `RosettaModel.forward` route rebuilt on transformers' models (same tiny
random configs) and the NumPy fuser: the aligned chat is cut into sections where fusion switches on
or off; each non-final section runs the receiver on the (already fused) cache, the sharer on its own
cache, and, if it is a message section, the fuser rewrites that section's receiver K/V in place; the
final section (the trailing chat template) runs on the fused cache and gives the logits.
"""

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import jax.numpy as jnp

from c2c_jax.c2c.fuser import Fuser, FuserConfig
from c2c_jax.c2c.layer_map import layer_map
from c2c_jax.c2c.model import C2CModel
from c2c_jax.c2c.prompt import PromptEncoder, fusion_sections
from c2c_jax.c2c.token_alignment import TokenAligner
from c2c_jax.infer.fuser_io import export_upstream_fuser
from c2c_jax.infer.generator import Generator
from c2c_jax.models import load_model
from reference_c2c import reference_fuse
from test_alignment import _receiver_backend, _sharer_backend, _wrap_receiver, _wrap_sharer
from tiny_models import make_tiny_model

TWO_MESSAGES = [{"role": "user", "content": "The receiver model reads the cache."},
                {"role": "assistant", "content": "The capital of France is Paris."},
                {"role": "user", "content": "What is the capital of France?"}]
ONE_MESSAGE = [{"role": "user", "content": "Hello there, how are you doing today?"}]


@pytest.fixture(scope="module")
def aligned_pair(tmp_path_factory):
    """Receiver: tiny Qwen3 with a ChatML BPE tokenizer; sharer: tiny Llama with another BPE and a
    Llama-3 template (so the pair needs token alignment)."""
    root = tmp_path_factory.mktemp("aligned")
    rtok, stok = _wrap_receiver(_receiver_backend()), _wrap_sharer(_sharer_backend())
    torch_receiver = make_tiny_model("qwen3", root / "receiver", vocab_size=len(rtok) + 8)
    torch_sharer = make_tiny_model("llama", root / "sharer", seed=1, vocab_size=len(stok) + 8, num_hidden_layers=2)
    receiver = load_model(root / "receiver", dtype=jnp.float32)
    sharer = load_model(root / "sharer", dtype=jnp.float32)
    config = FuserConfig(
        receiver_layers=3, receiver_kv_heads=2, receiver_head_dim=24, sharer_kv_heads=4, sharer_head_dim=16,
        layer_map=layer_map("terminal", 3, 2), hidden_dim=32, intermediate_dim=48, dtype="float32")
    fuser = Fuser(config, rngs=nnx.Rngs(3))
    fuser.projectors.gate_logit[...] = jnp.array([[0.5, 1.0], [-0.5, 2.0], [1.5, 0.1]])
    export_upstream_fuser(fuser, root / "upstream", dtype="float32")
    dicts = [{k: v.numpy() for k, v in torch.load(root / "upstream" / f"projector_{i}.pt").items()} for i in range(3)]
    return dict(rtok=rtok, stok=stok, torch_receiver=torch_receiver, torch_sharer=torch_sharer, receiver=receiver,
                sharer=sharer, fuser=fuser, dicts=dicts)


def _layers(cache):
    """A DynamicCache's K/V in our layout [layers, B, T, kv_heads, head_dim] (copies)."""
    return (np.stack([layer.keys.numpy() for layer in cache.layers]).transpose(0, 1, 3, 2, 4),
            np.stack([layer.values.numpy() for layer in cache.layers]).transpose(0, 1, 3, 2, 4))


def upstream_route(pair, messages, *, in_order=True):
    """Next-token logits of upstream's route on one aligned chat (batch 1, float32).

    in_order=False is the route c2c_jax used to take: one unfused receiver pass over all columns but
    the last, every message column fused from it, then the last column alone.
    """
    chat = TokenAligner(pair["rtok"], pair["stok"]).align_chat(messages, add_generation_prompt=True)
    n = int(np.flatnonzero(chat.receiver_valid)[-1]) + 1  # as PromptEncoder: end on a receiver token
    r_ids, s_ids = chat.receiver_ids[:n], chat.sharer_ids[:n]
    r_valid, s_valid = chat.receiver_valid[:n], chat.sharer_valid[:n]
    fused = chat.message_mask[:n] & r_valid & s_valid
    if not in_order:
        fused = fused.copy()
        fused[-1] = False
        bounds = [0, n - 1, n]
        flags = [True, False]
    else:
        bounds = [0] + [c for c in range(1, n) if fused[c] != fused[c - 1]] + [n]
        flags = [bool(fused[s]) for s in bounds[:-1]]
    assert not flags[-1]  # the final section is the trailing template
    rcache, scache = transformers.DynamicCache(), transformers.DynamicCache()

    def run(model, ids, valid, cache, s, e):
        with torch.no_grad():
            return model(input_ids=torch.tensor(ids[None, s:e], dtype=torch.long),
                         attention_mask=torch.tensor(valid[None, :e], dtype=torch.long),
                         position_ids=torch.arange(s, e)[None], past_key_values=cache, use_cache=True).logits

    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        logits = run(pair["torch_receiver"], r_ids, r_valid, rcache, s, e)
        if i == len(flags) - 1:
            return logits[0, -1].numpy()
        run(pair["torch_sharer"], s_ids, s_valid, scache, s, e)
        if not flags[i]:
            continue
        rk, rv = _layers(rcache)
        sk, sv = _layers(scache)
        mask = fused[None, s:e] if not in_order else np.ones((1, e - s), bool)
        fk, fv = reference_fuse(pair["dicts"], pair["fuser"].config.layer_map, sk[:, :, s:e], sv[:, :, s:e],
                                rk[:, :, s:e], rv[:, :, s:e], mask)
        for layer in range(len(rcache.layers)):
            rcache.layers[layer].keys[:, :, s:e] = torch.tensor(fk[layer].transpose(0, 2, 1, 3))
            rcache.layers[layer].values[:, :, s:e] = torch.tensor(fv[layer].transpose(0, 2, 1, 3))


def generator(pair, **encoder_kwargs):
    model = C2CModel(pair["receiver"], [pair["sharer"]], [pair["fuser"]])
    return Generator(model, PromptEncoder(pair["rtok"], [pair["stok"]], **encoder_kwargs))


def test_aligned_prompts_fuse_section_by_section_as_upstream(aligned_pair):
    """Two prompts in one batch (two fused messages and one): first-token logits of each equal
    upstream's section-by-section route on it alone."""
    gen = generator(aligned_pair, pad_to=8)
    assert gen.encoder.aligners[0] is not None
    batch = gen.encoder.batch([gen.encoder.encode_chat(c) for c in (TWO_MESSAGES, ONE_MESSAGE)])
    assert batch.fused_sections == 3 and batch.final_section > 1
    ours = np.asarray(gen.next_token_logits(batch))
    for row, messages in enumerate((TWO_MESSAGES, ONE_MESSAGE)):
        np.testing.assert_allclose(ours[row], upstream_route(aligned_pair, messages), atol=1e-5, rtol=0)
    # The test tells the routes apart: one unfused pass and the last column alone is far off.
    assert np.abs(upstream_route(aligned_pair, TWO_MESSAGES, in_order=False) - ours[0]).max() > 1e-3
    assert np.abs(np.asarray(gen.next_token_logits(batch, fuse=False)) - ours).max() > 1e-3


def test_fusion_sections_count_runs_so_the_last_is_fused_last():
    fuse = np.array([[0, 1, 1, 0, 0, 1, 0, 0],
                     [0, 0, 0, 0, 1, 1, 0, 0],
                     [0, 0, 0, 0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(fusion_sections(fuse, 2, xp=np), [[0, 0, 0, 1, 1, 1, 2, 2],
                                                                    [1, 1, 1, 1, 1, 1, 2, 2],
                                                                    [2, 2, 2, 2, 2, 2, 2, 2]])


def test_a_token_aligned_train_step_runs_its_sections():
    """With alignment on, only message contents are fused: the step fuses section by section and
    runs the chat template before each answer after fusion."""
    import jax

    from c2c_jax import sharding
    from c2c_jax.train import loop
    from test_train import tiny_config

    run = loop.setup(tiny_config(**{"alignment.tokens": "on"}))
    host_batch = next(run.train_iter)
    assert host_batch.trailing_section and host_batch.fused_sections >= 1
    state, metrics = run.step_fn(run.state, run.frozen, sharding.place_batch(host_batch, run.mesh, batch_axis=1),
                                 jax.random.key(0))
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
