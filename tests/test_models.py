"""Our decoder against transformers' PyTorch models: logits and every layer's cached K and V."""

import dataclasses
import json
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c2c_jax.models import CheckpointError, ModelConfig, UnsupportedModelError, attention, load_model
from tiny_models import FAMILIES, make_tiny_model, torch_forward

TOL = 1e-4


def run(model, tokens, positions=None, token_mask=None, capacity=None, output="logits"):
    b, t = tokens.shape
    if positions is None:
        positions = np.broadcast_to(np.arange(t), (b, t))
    cache = model.init_cache(b, capacity or t)
    return model(jnp.asarray(tokens), jnp.asarray(positions), cache,
                 None if token_mask is None else jnp.asarray(token_mask), output=output)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tmp_path_factory):
    family = request.param
    directory = tmp_path_factory.mktemp(family)
    torch_model = make_tiny_model(family, directory)
    model = load_model(directory, dtype=jnp.float32)
    return family, torch_model, model, directory


def test_logits_and_cache_match_transformers(tiny):
    _, torch_model, model, _ = tiny
    tokens = np.random.default_rng(0).integers(0, 160, (2, 19))
    ref_logits, ref_k, ref_v = torch_forward(torch_model, tokens)
    logits, cache = run(model, tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(cache.k, ref_k, atol=TOL, rtol=0)
    np.testing.assert_allclose(cache.v, ref_v, atol=TOL, rtol=0)
    assert int(cache.end) == 19 and np.asarray(cache.valid).all()


def test_prefill_then_decode_equals_full_forward(tiny):
    _, _, model, _ = tiny
    tokens = np.random.default_rng(1).integers(0, 160, (2, 16))
    full_logits, full_cache = run(model, tokens)
    prompt = 11
    logits, cache = run(model, tokens[:, :prompt], capacity=16)
    step_logits = [logits]
    decode = jax.jit(lambda c, tok, pos: model(tok, pos, c))
    for t in range(prompt, 16):
        positions = np.full((2, 1), t)
        out, cache = decode(cache, jnp.asarray(tokens[:, t:t + 1]), jnp.asarray(positions))
        step_logits.append(out)
    np.testing.assert_allclose(np.concatenate(step_logits, axis=1), full_logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(cache.k, full_cache.k, atol=TOL, rtol=0)
    np.testing.assert_allclose(cache.v, full_cache.v, atol=TOL, rtol=0)


@pytest.mark.parametrize("one_row_gemm", [False, True])
def test_batch_one_decode_matches_transformers(tiny, one_row_gemm):
    """One token of one row: XLA's vector-matrix products, or the two identical rows prefill's last
    token goes through (`one_row_gemm`)."""
    _, torch_model, model, _ = tiny
    tokens = np.random.default_rng(5).integers(0, 160, (1, 9))
    ref_logits, ref_k, ref_v = torch_forward(torch_model, tokens)
    logits, cache = run(model, tokens[:, :6], capacity=9)
    step = jax.jit(lambda c, tok, pos: model(tok, pos, c, one_row_gemm=one_row_gemm))
    step_logits = [logits]
    for t in range(6, 9):
        out, cache = step(cache, jnp.asarray(tokens[:, t:t + 1]), jnp.full((1, 1), t))
        step_logits.append(out)
    np.testing.assert_allclose(np.concatenate(step_logits, axis=1), ref_logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(cache.k, ref_k, atol=TOL, rtol=0)
    np.testing.assert_allclose(cache.v, ref_v, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pallas_decode_attention_matches_transformers(family, tmp_path):
    """The GPU's Pallas kernel for one new token's attention over a cache, run by Pallas'
    interpreter: a prompt, then decode steps on its cache, against transformers' full forward."""
    # The kernel needs a power-of-two head_dim; the tiny Qwen3's 24 would fall back to XLA.
    torch_model = make_tiny_model(family, tmp_path, **({"head_dim": 32} if family == "qwen3" else {}))
    model = load_model(tmp_path, dtype=jnp.float32, attention_impl="pallas")
    tokens = np.random.default_rng(3).integers(0, 160, (2, 11))
    ref_logits, ref_k, ref_v = torch_forward(torch_model, tokens)
    positions = jnp.asarray(np.broadcast_to(np.arange(11), (2, 11)))
    cache = model.init_cache(2, 16)  # a capacity the decode kernel tiles (kv_cache.decode_capacity)
    logits, cache = model(jnp.asarray(tokens[:, :8]), positions[:, :8], cache)
    steps = [logits]
    with mock.patch("c2c_jax.models.attention.decode_attention", wraps=attention.decode_attention) as kernel:
        for t in range(8, 11):
            step_logits, cache = model(jnp.asarray(tokens[:, t:t + 1]), positions[:, t:t + 1], cache)
            steps.append(step_logits)
    assert kernel.call_count >= 3  # traced in every decode step (once per scan, or once per unrolled layer)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), ref_logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(cache.k[:, :, :11], ref_k, atol=TOL, rtol=0)
    np.testing.assert_allclose(cache.v[:, :, :11], ref_v, atol=TOL, rtol=0)


def test_left_padded_batch_equals_rows_alone(tiny):
    _, _, model, _ = tiny
    rng = np.random.default_rng(2)
    lengths = [13, 6, 9]
    width = max(lengths)
    tokens = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), bool)
    positions = np.zeros((3, width), np.int64)
    rows = []
    for r, n in enumerate(lengths):
        row = rng.integers(0, 160, n)
        rows.append(row)
        tokens[r, width - n:] = row
        mask[r, width - n:] = True
        positions[r, width - n:] = np.arange(n)
    # One decode step after the padded prefill, too.
    logits, cache = run(model, tokens, positions, mask, capacity=width + 1)
    next_tokens = rng.integers(0, 160, (3, 1))
    step, _ = model(jnp.asarray(next_tokens), jnp.asarray(np.array(lengths)[:, None]), cache)
    for r, n in enumerate(lengths):
        alone, alone_cache = run(model, np.concatenate([rows[r], next_tokens[r]])[None])
        np.testing.assert_allclose(logits[r, width - n:], alone[0, :n], atol=TOL, rtol=0)
        np.testing.assert_allclose(step[r, 0], alone[0, n], atol=TOL, rtol=0)
        np.testing.assert_allclose(cache.k[:, r, width - n:width], alone_cache.k[:, 0, :n], atol=TOL, rtol=0)
        assert np.isfinite(np.asarray(logits)).all()
    # Filling the cache exactly takes the fresh-prefill path (attention over the new K/V, causal
    # from column 0); it must agree with the general path, padding included.
    fresh_logits, fresh_cache = run(model, tokens, positions, mask)
    np.testing.assert_allclose(fresh_logits, logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(fresh_cache.k, cache.k[:, :, :width], atol=TOL, rtol=0)


@pytest.mark.parametrize("loop", ["scan", "unrolled"])
def test_extend_over_a_padded_prefix_matches_transformers_and_the_cache_route(tiny, loop):
    """`extend` (the training suffix pass, mask-free attention) on prefix caches whose real columns
    come first and answers padded at the end: logits equal transformers' on each row's real tokens
    alone, and gradients w.r.t. the prefix cache equal those through `__call__`'s masked attention
    and central differences. The prefix cache comes from a pass with no mask at all, as in training.
    Both layer loops: a scan (the CPU default) and the Python loop (the GPU default)."""
    _, torch_model, model, directory = tiny
    if loop == "unrolled":
        model = load_model(directory, dtype=jnp.float32, scan_unroll=model.config.num_layers)
    rng = np.random.default_rng(5)
    p, t = 9, 5
    prefix_lengths = np.array([9, 5, 7])
    prefix_mask = np.arange(p)[None, :] < prefix_lengths[:, None]  # real columns first, then padding
    answer_lengths = [5, 3, 4]
    prefix = rng.integers(0, 160, (3, p))
    answer = rng.integers(0, 160, (3, t))
    prefix_positions = np.arange(p)[None, :].repeat(3, 0)
    answer_positions = prefix_lengths[:, None] + np.arange(t)
    _, cache = run(model, prefix, prefix_positions)
    cache = dataclasses.replace(cache, valid=jnp.asarray(prefix_mask))
    extend = jax.jit(lambda c: model.extend(jnp.asarray(answer), jnp.asarray(answer_positions), c, output="logits"))
    logits = extend(cache)
    for r, m in enumerate(answer_lengths):
        tokens = np.concatenate([prefix[r][prefix_mask[r]], answer[r, :m]])[None]
        ref_logits, _, _ = torch_forward(torch_model, tokens)
        np.testing.assert_allclose(logits[r, :m], ref_logits[0, -m:], atol=TOL, rtol=0)

    answer_mask = np.arange(t)[None, :] < np.array(answer_lengths)[:, None]
    weights = jnp.asarray(rng.normal(size=(3, t, 160)) * answer_mask[..., None], jnp.float32)

    def through_extend(k, v):
        return jnp.sum(weights * extend(dataclasses.replace(cache, k=k, v=v)))

    def through_call(k, v):
        out, _ = model(jnp.asarray(answer), jnp.asarray(answer_positions),
                       dataclasses.replace(cache, k=k, v=v).with_capacity(p + t), jnp.asarray(answer_mask))
        return jnp.sum(weights * out)

    grads = jax.grad(through_extend, argnums=(0, 1))(cache.k, cache.v)
    ref_grads = jax.grad(through_call, argnums=(0, 1))(cache.k, cache.v)
    for grad, ref_grad in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref_grad, atol=TOL, rtol=0)
    assert np.asarray(grads[0]).any()
    assert not np.asarray(grads[0][:, 1, 5:]).any() and not np.asarray(grads[1][:, 2, 7:]).any()  # pads get none
    # Both routes share the layer loop's VJP; central differences along a random direction do not.
    directions = [jnp.asarray(rng.normal(size=cache.k.shape), jnp.float32) for _ in range(2)]
    eps = 1e-2
    plus = through_extend(cache.k + eps * directions[0], cache.v + eps * directions[1])
    minus = through_extend(cache.k - eps * directions[0], cache.v - eps * directions[1])
    slope = sum(jnp.sum(g * d) for g, d in zip(grads, directions))
    np.testing.assert_allclose((plus - minus) / (2 * eps), slope, rtol=2e-3)
    shallow = model.init_cache(3, p, num_layers=1)
    with pytest.raises(ValueError, match="prefix cache of 1 layers"):
        model.extend(jnp.asarray(answer), jnp.asarray(answer_positions), shallow)
    left_padded = dataclasses.replace(cache, valid=jnp.asarray(prefix_mask[:, ::-1]))
    with pytest.raises(ValueError, match="real prefix columns first"):
        model.extend(jnp.asarray(answer), jnp.asarray(answer_positions), left_padded)


def test_kv_only_mode_matches_full_cache(tiny):
    _, _, model, _ = tiny
    tokens = np.random.default_rng(3).integers(0, 160, (2, 10))
    _, full = run(model, tokens)
    for depth in (1, 2, model.config.num_layers):
        cache = model.init_cache(2, 10, num_layers=depth)
        out, kv = model(jnp.asarray(tokens), jnp.asarray(np.broadcast_to(np.arange(10), (2, 10))), cache,
                        output="kv")
        assert out is None and kv.k.shape[0] == depth
        np.testing.assert_allclose(kv.k, full.k[:depth], atol=TOL, rtol=0)
        np.testing.assert_allclose(kv.v, full.v[:depth], atol=TOL, rtol=0)


def test_bf16_model_tracks_fp32(tiny):
    family, torch_model, _, directory = tiny
    model = load_model(directory, dtype=jnp.bfloat16)
    assert model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    tokens = np.random.default_rng(4).integers(0, 160, (1, 12))
    ref_logits, _, _ = torch_forward(torch_model, tokens)
    logits, cache = run(model, tokens)
    assert cache.k.dtype == jnp.bfloat16
    np.testing.assert_allclose(logits, ref_logits, atol=0.1, rtol=0.05)


def test_v4_and_v5_config_layouts_agree():
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2)
    scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    v4 = ModelConfig.from_hf_dict({**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **scaling}})
    v4_old = ModelConfig.from_hf_dict({**base, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **scaling}})
    v5 = ModelConfig.from_hf_dict({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling}})
    assert v4 == v5 == v4_old
    assert v5.rope.rope_type == "llama3" and v5.rope.factor == 32.0 and v5.rope.theta == 5e5


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel.*llama, qwen2, qwen3"):
        load_model(tmp_path)
    with pytest.raises(UnsupportedModelError, match="RoPE type 'yarn'"):
        ModelConfig.from_hf_dict(dict(model_type="qwen2", vocab_size=1, hidden_size=8, intermediate_size=8,
                                      num_hidden_layers=1, num_attention_heads=1,
                                      rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def test_unknown_attention_implementation_is_named_when_the_model_is_built(tmp_path):
    make_tiny_model("llama", tmp_path)
    with pytest.raises(ValueError, match="attention implementation 'triton'; choose one of auto, xla, cudnn, pallas"):
        load_model(tmp_path, attention_impl="triton")


def test_missing_and_corrupt_checkpoints_name_the_problem(tmp_path, tiny):
    family, _, _, directory = tiny
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(empty)
    # Drop one tensor: the error names it.
    import safetensors.numpy as stn
    tensors = stn.load_file(str(directory / "model.safetensors"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((directory / "config.json").read_text())
    missing = "model.layers.1.mlp.up_proj.weight"
    stn.save_file({k: v for k, v in tensors.items() if k != missing}, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        load_model(broken, dtype=jnp.float32)
    # Truncated file.
    data = (directory / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(broken, dtype=jnp.float32)
    # Config that does not match the weights.
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 128
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"shape .* config implies"):
        load_model(broken, dtype=jnp.float32)


def test_sharded_safetensors_with_index(tmp_path):
    torch_model = make_tiny_model("qwen2", tmp_path / "src")
    torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    tokens = np.random.default_rng(5).integers(0, 160, (1, 8))
    ref_logits, _, _ = torch_forward(torch_model, tokens)
    logits, _ = run(load_model(tmp_path / "sharded", dtype=jnp.float32), tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=TOL, rtol=0)


def test_hub_id_without_network_names_the_local_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"Hugging Face Hub.*local directory"):
        load_model("Qwen/Qwen3-0.6B-not-cached-here")


def test_vocab_projection_gradients_match_autodiff():
    from c2c_jax.models.decoder import vocab_projection

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k1, (2, 5, 16))
    weight = jax.random.normal(k2, (16, 40))
    probe = jax.random.normal(k3, (2, 5, 40))

    def grads(project, h, w):
        return jax.grad(lambda h, w: jnp.sum(jnp.sin(project(h, w)) * probe), argnums=(0, 1))(h, w)

    plain = lambda h, w: jnp.dot(h, w, preferred_element_type=jnp.float32)  # noqa: E731
    for ours, reference in zip(grads(vocab_projection, hidden, weight), grads(plain, hidden, weight)):
        np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=1e-5)
    # In bfloat16 the backward matmuls run in bfloat16 (the cotangent is rounded once).
    bf16 = [x.astype(jnp.bfloat16) for x in (hidden, weight)]
    for ours, reference in zip(grads(vocab_projection, *bf16), grads(plain, hidden, weight)):
        assert ours.dtype == jnp.bfloat16
        np.testing.assert_allclose(ours.astype(jnp.float32), reference, atol=0.05 * float(jnp.abs(reference).max()))


@pytest.mark.parametrize("unroll", [2, 3])
def test_unrolled_layer_loops_match_transformers(tmp_path, unroll):
    # unroll 2: a partially unrolled scan; 3 (all layers): the Python loop with static layer indices.
    torch_model = make_tiny_model("qwen3", tmp_path)
    model = load_model(tmp_path, dtype=jnp.float32, scan_unroll=unroll)
    tokens = np.random.default_rng(5).integers(0, 160, (2, 9))
    ref_logits, ref_k, _ = torch_forward(torch_model, tokens)
    logits, cache = run(model, tokens, capacity=12)  # not fresh: attention reads the cache
    np.testing.assert_allclose(logits, ref_logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(cache.k[:, :, :9], ref_k, atol=TOL, rtol=0)
    _, kv = run(model, tokens, output="kv")
    np.testing.assert_allclose(kv.k, ref_k, atol=TOL, rtol=0)
