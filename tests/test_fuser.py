"""The fuser against an independent NumPy implementation of the reference formulas (docs/upstream_reference.md §1)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from c2c_jax.c2c import fuser as fuser_module
from c2c_jax.c2c.fuser import FuserCheckpointError
from c2c_jax.c2c.fuser import ABLATIONS, Fuser, FuserConfig, FuserNoise, count_params, gate_temperature
from c2c_jax.infer.fuser_io import export_upstream_fuser, flat_params, fuser_from_flat, import_upstream_fuser, load_fuser, save_fuser
from c2c_jax.infer.torch_pickle import load_state_dict
from c2c_jax.models import KVCache
from reference_c2c import reference_fuse

RECEIVER_LAYERS, HT, DT = 3, 2, 8  # receiver: 3 layers, 2 KV heads x 8
SHARER_LAYERS, HS, DS = 2, 3, 4  # sharer: 2 layers, 3 KV heads x 4
H, M, L = 16, 24, 4  # fuser hidden, intermediate, num_layers (2 projection blocks)
LAYER_MAP = (0, 0, 1)


# ------------------------------------------------------------------------------------------------
# Random fusers under the exact upstream key names.


def random_state_dicts(rng, level=0):
    """Per receiver layer, a state dict under the exact upstream key names (docs/upstream_reference.md §7.2)."""
    in_dim = HS * DS + (0 if level == 3 else HT * DT)
    dicts = []
    for t in range(RECEIVER_LAYERS):
        sd = {}
        for b in ("key", "value"):
            def lin(name, dout, din, bias=True):
                sd[f"{name}.weight"] = rng.normal(0, din ** -0.5, (dout, din)).astype(np.float32)
                if bias:
                    sd[f"{name}.bias"] = rng.normal(0, 0.1, (dout,)).astype(np.float32)

            def ffn(name, inner):
                sd[f"{name}.norm.weight"] = (1 + 0.1 * rng.normal(size=H)).astype(np.float32)
                lin(f"{name}.w1", inner, H, bias=False)
                lin(f"{name}.w2", H, inner, bias=False)

            lin(f"{b}_in", H, in_dim)
            ffn(f"{b}_mlp1.blocks.0", M)
            for j in range(L - 2):
                ffn(f"{b}_proj_mlp2.blocks.{j}", M)
            lin(f"{b}_proj_out", HT * DT, H)
            if level in (0, 4):
                ffn(f"{b}_scalar_mlp2.blocks.0", H)
                lin(f"{b}_scalar_head", HT, H)
            if level in (0, 1):
                # Layer 1's key gate is closed, every other gate open or closed at random.
                sd[f"{b}_gate_logit"] = np.float32(-0.5 if (t, b) == (1, "key") else rng.normal())
        if level in (0, 1):
            sd["gate_temperature"] = np.float32(0.001)
        dicts.append(sd)
    return dicts


def write_upstream(directory, dicts, level=0, dtype=torch.float32):
    import json

    directory.mkdir(parents=True, exist_ok=True)
    init_args = {"source_dim": DS, "target_dim": DT, "source_num_heads": HS, "target_num_heads": HT,
                 "intermediate_dim": M, "hidden_dim": H, "num_layers": L, "dropout": 0.1,
                 "initial_temperature": 1.0, "final_temperature": 0.001, "anneal_steps": 1929,
                 "dtype": {"__type__": "torch.dtype", "value": str(dtype).split(".")[-1]}}
    cls = "C2CProjector"
    if level:
        cls, init_args["ablation_level"] = "AblationProjector", level
    for i, sd in enumerate(dicts):
        torch.save({k: torch.tensor(v).to(dtype) for k, v in sd.items()}, directory / f"projector_{i}.pt")
        (directory / f"projector_{i}.json").write_text(json.dumps({"class": cls, "init_args": init_args}))
    mapping = {"0": {"1": {str(t): [[s, t]] for t, s in enumerate(LAYER_MAP)}}}
    (directory / "projector_config.json").write_text(json.dumps(mapping))
    return directory


def random_caches(rng, batch=2, capacity=5):
    def cache(layers, heads, dim):
        shape = (layers, batch, capacity, heads, dim)
        return KVCache(k=jnp.asarray(rng.normal(size=shape), jnp.float32),
                       v=jnp.asarray(rng.normal(size=shape), jnp.float32),
                       valid=jnp.ones((batch, capacity), bool), end=jnp.asarray(capacity, jnp.int32))

    fuse_mask = np.ones((batch, capacity), bool)
    fuse_mask[0, -1] = fuse_mask[1, :2] = False
    return cache(SHARER_LAYERS, HS, DS), cache(RECEIVER_LAYERS, HT, DT), fuse_mask


def fp32(fuser):
    return fuser_from_flat(dataclasses.replace(fuser.config, dtype="float32"),
                           {k: np.asarray(v) for k, v in flat_params(fuser).items()}, "test")


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers_at_once", [RECEIVER_LAYERS, 2, 1])
@pytest.mark.parametrize("level", sorted(ABLATIONS.values()))
def test_inference_matches_numpy_reference(tmp_path, monkeypatch, level, layers_at_once):
    # Large inference batches run the projectors in groups of layers (2 of 3: a short last group).
    monkeypatch.setattr(fuser_module, "INFERENCE_ROWS_AT_ONCE", layers_at_once * 2 * 2 * 5)  # x 2 branches x B x S
    rng = np.random.default_rng(level)
    dicts = random_state_dicts(rng, level)
    fuser = fp32(import_upstream_fuser(write_upstream(tmp_path / "up", dicts, level)))
    assert fuser.config.ablation == {v: k for k, v in ABLATIONS.items()}[level]
    sharer, receiver, fuse_mask = random_caches(rng)
    fused = fuser(sharer, receiver, jnp.asarray(fuse_mask))
    ref_k, ref_v = reference_fuse(dicts, LAYER_MAP, sharer.k, sharer.v, receiver.k, receiver.v, fuse_mask, level)
    np.testing.assert_allclose(fused.k, ref_k, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(fused.v, ref_v, atol=2e-5, rtol=1e-5)
    # Unfused columns are untouched bit for bit.
    np.testing.assert_array_equal(np.asarray(fused.k)[:, ~fuse_mask], np.asarray(receiver.k)[:, ~fuse_mask])


def test_train_mode_with_fixed_noise_matches_numpy_reference(tmp_path):
    rng = np.random.default_rng(10)
    dicts = random_state_dicts(rng)
    fuser = fp32(import_upstream_fuser(write_upstream(tmp_path / "up", dicts)))
    fuser = fuser_from_flat(dataclasses.replace(fuser.config, dropout=0.0),
                            {k: np.asarray(v) for k, v in flat_params(fuser).items()}, "test")
    sharer, receiver, fuse_mask = random_caches(rng)
    uniform = rng.uniform(size=(RECEIVER_LAYERS, 2, 2, 5, HT, 1)).astype(np.float32)
    noise = FuserNoise(jnp.asarray(uniform), jax.random.split(jax.random.key(0), 2))
    temperature = 0.7
    fused = jax.jit(lambda f, s, r, m, n: f(s, r, m, noise=n, temperature=temperature))(
        fuser, sharer, receiver, jnp.asarray(fuse_mask), noise)
    ref_k, ref_v = reference_fuse(dicts, LAYER_MAP, sharer.k, sharer.v, receiver.k, receiver.v, fuse_mask, 0,
                                  uniform, temperature)
    np.testing.assert_allclose(fused.k, ref_k, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(fused.v, ref_v, atol=2e-5, rtol=1e-5)


def test_dropout_is_active_only_in_training(tmp_path):
    rng = np.random.default_rng(11)
    fuser = fp32(import_upstream_fuser(write_upstream(tmp_path / "up", random_state_dicts(rng))))
    sharer, receiver, fuse_mask = random_caches(rng)
    mask = jnp.asarray(fuse_mask)
    noise = fuser.sample_noise(jax.random.key(1), 2, 5)
    a = fuser(sharer, receiver, mask, noise=noise, temperature=1.0)
    other_keys = jax.random.split(jax.random.key(2), 2)
    b = fuser(sharer, receiver, mask, noise=dataclasses.replace(noise, dropout_keys=other_keys), temperature=1.0)
    assert not np.allclose(a.k, b.k)  # only the dropout keys differ
    np.testing.assert_array_equal(fuser(sharer, receiver, mask).k, fuser(sharer, receiver, mask).k)


def test_training_noise_of_a_row_does_not_depend_on_the_batch_split(tmp_path):
    """The trainer gives each device a slice of a micro-batch and the matching slice of its noise;
    every row must then be fused exactly as in the whole batch (dropout included)."""
    rng = np.random.default_rng(12)
    fuser = fp32(import_upstream_fuser(write_upstream(tmp_path / "up", random_state_dicts(rng))))
    sharer, receiver, mask = random_caches(rng, batch=4)
    mask = jnp.asarray(mask)
    noise = fuser.sample_noise(jax.random.key(3), 4, 5)
    whole = fuser(sharer, receiver, mask, noise=noise, temperature=0.5)

    def rows_of(cache, rows):
        return dataclasses.replace(cache, k=cache.k[:, rows], v=cache.v[:, rows], valid=cache.valid[rows])

    for rows in (slice(0, 2), slice(2, 4)):
        part = fuser(rows_of(sharer, rows), rows_of(receiver, rows), mask[rows],
                     noise=FuserNoise(noise.gate_uniform[:, :, rows], noise.dropout_keys[rows]), temperature=0.5)
        np.testing.assert_allclose(part.k, whole.k[:, rows], atol=1e-6, rtol=0)
        np.testing.assert_allclose(part.v, whole.v[:, rows], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="does not match a batch of 4 rows"):
        fuser(sharer, receiver, mask, noise=FuserNoise(noise.gate_uniform, noise.dropout_keys[:2]), temperature=0.5)


def test_logistic_gate_noise_opens_with_probability_sigmoid_logit():
    config = FuserConfig(receiver_layers=1, receiver_kv_heads=1, receiver_head_dim=2, sharer_kv_heads=1,
                         sharer_head_dim=2, layer_map=(0,), hidden_dim=4, intermediate_dim=4, dtype="float32")
    u = jax.random.uniform(jax.random.key(0), (200_000,))
    for noise_type, expected in (("gumbel", 1 - np.exp(-np.exp(0.3))), ("logistic", 1 / (1 + np.exp(-0.3)))):
        c = dataclasses.replace(config, gate_noise=noise_type)
        branch = nnx.eval_shape(lambda: Fuser(c, rngs=nnx.Rngs(0))).projectors
        gate_fn = type(branch)._gate
        fake = type("B", (), {"gate_logit": jnp.float32(0.3), "config": c})()
        gate = gate_fn(fake, u, 1e-4)  # near-zero temperature: the gate is a coin flip
        assert abs(float((gate > 0.5).mean()) - expected) < 0.005


def test_temperature_schedule():
    config = FuserConfig(receiver_layers=1, receiver_kv_heads=1, receiver_head_dim=2, sharer_kv_heads=1,
                         sharer_head_dim=2, layer_map=(0,))
    np.testing.assert_allclose(
        [gate_temperature(s, config) for s in (0, 1929 / 2, 1929, 5000)], [1.0, 0.001 ** 0.5, 0.001, 0.001],
        rtol=1e-5)


def pair_config(receiver_layers, receiver_kv, receiver_hd, sharer_layers, sharer_kv, sharer_hd, **kw):
    layer_map = tuple(min(max(t + sharer_layers - receiver_layers, 0), sharer_layers - 1)
                      for t in range(receiver_layers))
    return FuserConfig(receiver_layers=receiver_layers, receiver_kv_heads=receiver_kv, receiver_head_dim=receiver_hd,
                       sharer_kv_heads=sharer_kv, sharer_head_dim=sharer_hd, layer_map=layer_map, **kw)


def test_parameter_count_of_the_published_pairs():
    qwen = pair_config(28, 8, 128, 24, 2, 64)
    assert qwen.num_params() == 477_848_056
    assert count_params(nnx.eval_shape(lambda: Fuser(qwen, rngs=nnx.Rngs(0)))) == 477_848_056
    assert round(pair_config(28, 8, 128, 36, 8, 128).num_params() / 1e6, 1) == 529.2  # Qwen3-4B sharer
    assert round(pair_config(28, 8, 128, 16, 8, 64).num_params() / 1e6, 1) == 499.9  # Llama-3.2-1B sharer
    for ablation in ABLATIONS:
        small = pair_config(4, 2, 8, 3, 3, 4, hidden_dim=16, intermediate_dim=24, num_layers=4, ablation=ablation)
        assert count_params(Fuser(small, rngs=nnx.Rngs(0))) == small.num_params()


def test_pytorch_default_init_and_zero_init():
    config = pair_config(2, 2, 8, 2, 3, 4, hidden_dim=64, intermediate_dim=32)
    fuser = Fuser(config, rngs=nnx.Rngs(0))
    kernel = np.asarray(fuser.projectors.in_proj.kernel[...])
    bound = 1 / np.sqrt(config.in_dim)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
    assert np.all(np.asarray(fuser.projectors.gate_logit[...]) == 0)
    zero = Fuser(dataclasses.replace(config, zero_init=True), rngs=nnx.Rngs(0))
    assert not np.any(np.asarray(zero.projectors.proj_out.kernel[...]))
    assert not np.any(np.asarray(zero.projectors.proj_out.bias[...]))


# ------------------------------------------------------------------------------------------------
# Published (upstream) checkpoints.


@pytest.mark.parametrize("level", [0, 3])
def test_upstream_checkpoint_round_trip_is_exact(tmp_path, level):
    dicts = random_state_dicts(np.random.default_rng(20 + level), level)
    source = write_upstream(tmp_path / "up", dicts, level, dtype=torch.bfloat16)
    fuser = import_upstream_fuser(source)
    export_upstream_fuser(fuser, tmp_path / "back")
    for i in range(RECEIVER_LAYERS):
        original = torch.load(source / f"projector_{i}.pt")
        exported = torch.load(tmp_path / "back" / f"projector_{i}.pt")
        assert set(original) == set(exported)
        for key in original:
            assert exported[key].dtype == original[key].dtype == torch.bfloat16
            assert torch.equal(exported[key].view(torch.int16), original[key].view(torch.int16)), key
        assert (source / f"projector_{i}.json").read_text() != ""  # config files exist on both sides
    assert (tmp_path / "back" / "projector_config.json").read_text() == (source / "projector_config.json").read_text()
    # Our own format round-trips too.
    again = load_fuser(save_fuser(fuser, tmp_path / "ours"))
    assert again.config == fuser.config
    for name, value in flat_params(fuser).items():
        np.testing.assert_array_equal(flat_params(again)[name], value)


def test_torch_reader_matches_torch_load(tmp_path):
    tensors = {"a": torch.randn(3, 4).bfloat16(), "b": torch.randn(5).t().contiguous(), "c": torch.tensor(2.5),
               "d": torch.randn(4, 6)[:, 1:4], "e": torch.arange(6, dtype=torch.int64)}
    torch.save(tensors, tmp_path / "x.pt")
    ours = load_state_dict(tmp_path / "x.pt")
    for key, value in tensors.items():
        np.testing.assert_array_equal(np.asarray(ours[key], np.float64), value.double().numpy())


def test_upstream_import_errors(tmp_path):
    import json
    from c2c_jax.models import ModelConfig

    dicts = random_state_dicts(np.random.default_rng(30))
    source = write_upstream(tmp_path / "up", dicts)
    # Wrong pair: a receiver with other head shapes.
    receiver = ModelConfig.from_hf_dict(dict(model_type="qwen3", vocab_size=10, hidden_size=32, intermediate_size=8,
                                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                                             head_dim=8))
    sharer = ModelConfig.from_hf_dict(dict(model_type="qwen2", vocab_size=10, hidden_size=12, intermediate_size=8,
                                           num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3))
    with pytest.raises(FuserCheckpointError, match="another model pair"):
        import_upstream_fuser(source, receiver, sharer)
    right_receiver = dataclasses.replace(receiver, num_kv_heads=HT, head_dim=DT)
    assert import_upstream_fuser(source, right_receiver, sharer).config.receiver_layers == 3
    # Missing file.
    (source / "projector_2.pt").unlink()
    with pytest.raises(FileNotFoundError, match="projector_2.pt"):
        import_upstream_fuser(source)
    # Missing tensor.
    torch.save({k: torch.tensor(v) for k, v in dicts[2].items() if k != "value_scalar_head.bias"},
               source / "projector_2.pt")
    with pytest.raises(FuserCheckpointError, match="value_scalar_head.bias"):
        import_upstream_fuser(source)
    # Unexpected tensor.
    torch.save({**{k: torch.tensor(v) for k, v in dicts[2].items()}, "key_extra.weight": torch.zeros(2)},
               source / "projector_2.pt")
    with pytest.raises(FuserCheckpointError, match="key_extra.weight"):
        import_upstream_fuser(source)
    # Corrupt file.
    (source / "projector_2.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a torch zip"):
        import_upstream_fuser(source)
    # Not an upstream directory at all.
    with pytest.raises(FileNotFoundError, match="projector_config.json"):
        import_upstream_fuser(tmp_path)
    # Projector config with several pairs per layer.
    (source / "projector_config.json").write_text(json.dumps({"0": {"1": {"0": [[0, 0], [1, 0]]}}}))
    with pytest.raises(FuserCheckpointError, match="receiver layer 0"):
        import_upstream_fuser(source)


def test_corrupt_own_format_is_reported(tmp_path):
    fuser = Fuser(pair_config(2, 2, 8, 2, 3, 4, hidden_dim=16, intermediate_dim=8), rngs=nnx.Rngs(0))
    directory = save_fuser(fuser, tmp_path / "f")
    (directory / "fuser.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(FuserCheckpointError, match="corrupt"):
        load_fuser(directory)
    with pytest.raises(FileNotFoundError, match="is not a fuser directory: it has neither fuser.json"):
        load_fuser(tmp_path)
